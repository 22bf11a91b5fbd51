#!/usr/bin/env bash
# Builds the Debian packages with cargo-deb: ztmesh (node), ztmesh-controller
# and ztmesh-relay, each with its binary, hardened systemd unit
# (deploy/systemd/), default config as a conffile (deploy/config/), shell
# completions (bash, zsh, fish) and man pages generated from the clap
# definitions. The .debs land in target/package/.
#
#   scripts/package.sh                  release build, then the packages
#   scripts/package.sh --check          ... then install them into a fresh
#                                       directory tree and check them
#   scripts/package.sh --check --profile dev
#                                       package the debug binaries (what
#                                       scripts/test.sh does: checks the
#                                       packaging without a release build)
#
# --check: `dpkg --root` into an empty tree (no maintainer scripts run, the
# host is not touched); files, owners and modes; conffiles registered; the
# installed binaries run and the installed configs pass `config check`;
# `lintian` reports no errors; `systemd-analyze security` exposure at most
# 2.0 for the controller, 4.0 for the node, 2.0 for the relay (offline, on
# the unit files); remove keeps the conffiles, purge removes them.
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
profile=release
while (($#)); do
  case $1 in
    --check) check=1 ;;
    --profile) profile=$2; shift ;;
    --profile=*) profile=${1#--profile=} ;;
    *) echo "usage: $0 [--check] [--profile release|dev]" >&2; exit 2 ;;
  esac
  shift
done
case $profile in
  dev) bindir=target/debug ;;
  *) bindir=target/$profile ;;
esac
command -v cargo-deb >/dev/null || { echo "package: cargo-deb missing (scripts/setup.sh installs it)" >&2; exit 1; }

echo "== package: cargo build --profile $profile"
cargo build --profile "$profile" -p ztmesh-node -p ztmesh-controller -p ztmesh-relay --bins

out=target/package
rm -rf "$out"
mkdir -p "$out/completions"
for bin in ztmesh ztmesh-controller ztmesh-relay; do
  "$bindir/$bin" completion bash >"$out/completions/$bin.bash"
  "$bindir/$bin" completion zsh >"$out/completions/_$bin"
  "$bindir/$bin" completion fish >"$out/completions/$bin.fish"
  "$bindir/$bin" man-pages "$out/man/$bin"
done
# The packaged configs are generated from the clap definitions and
# committed; a flag added without regenerating them fails here.
for pair in "ztmesh-controller:controller" "ztmesh:node"; do
  bin=${pair%%:*} name=${pair#*:}
  if ! diff -u "deploy/config/$name.toml" <("$bindir/$bin" config example); then
    echo "package: deploy/config/$name.toml is stale: $bin config example > deploy/config/$name.toml" >&2
    exit 1
  fi
done

echo "== package: cargo deb"
for pkg in ztmesh-node ztmesh-controller ztmesh-relay; do
  # cargo-deb warns that assets outside target/release are not built by
  # it (they are, above); its log is shown only if it fails.
  cargo deb --no-build --strip --profile "$profile" -p "$pkg" -o "$out/" >"$out/cargo-deb.log" 2>&1 ||
    { cat "$out/cargo-deb.log" >&2; exit 1; }
done
ls -l "$out"/*.deb

((check)) || exit 0

echo "== package: install into a fresh tree (dpkg --root)"
root=$(mktemp -d /tmp/ztmesh-pkgroot.XXXXXX)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/var/lib/dpkg/triggers"
touch "$root/var/lib/dpkg/status" "$root/var/lib/dpkg/available"
# --force-depends: the empty tree has no libc6 etc.; dpkg's complaints about
# that go to a log, shown if dpkg fails.
dpkg_root() {
  dpkg --root="$root" --log=/dev/null --force-depends "$@" >"$root/dpkg.log" 2>&1 ||
    { cat "$root/dpkg.log" >&2; return 1; }
}
dpkg_root -i "$out"/*.deb

fail() { echo "package check: $*" >&2; exit 1; }
expect_mode() { # PATH MODE: exists, owned by root, with MODE
  local got
  got=$(stat -c '%a %U:%G' "$root$1" 2>/dev/null) || fail "$1 not installed"
  [[ $got == "$2 root:root" ]] || fail "$1 is $got, expected $2 root:root"
}
for bin in ztmesh ztmesh-controller ztmesh-relay; do
  expect_mode "/usr/bin/$bin" 755
  expect_mode "/usr/share/bash-completion/completions/$bin" 644
  expect_mode "/usr/share/zsh/vendor-completions/_$bin" 644
  expect_mode "/usr/share/fish/vendor_completions.d/$bin.fish" 644
  expect_mode "/usr/share/man/man1/$bin.1.gz" 644
  "$root/usr/bin/$bin" --version | grep -Eq "^$bin [0-9]+\.[0-9]+\.[0-9]+ \(git [0-9a-f]+\)$" ||
    fail "$bin --version does not name its version and git revision"
done
expect_mode /usr/share/man/man1/ztmesh-controller-serve.1.gz 644
expect_mode /usr/share/man/man1/ztmesh-daemon.1.gz 644
expect_mode /usr/share/man/man1/ztmesh-up.1.gz 644
for unit in ztmesh ztmesh-controller ztmesh-relay; do
  expect_mode "/usr/lib/systemd/system/$unit.service" 644
done
expect_mode /etc/ztmesh/controller.toml 644
expect_mode /etc/ztmesh/node.toml 644
for pair in ztmesh-controller:controller ztmesh:node; do
  pkg=${pair%%:*} name=${pair#*:}
  dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Conffiles}\n' "$pkg" |
    grep -q "/etc/ztmesh/$name.toml" || fail "$pkg does not register /etc/ztmesh/$name.toml as a conffile"
done
# The packaged configs pass their own check (the state dirs they name are
# not created: nothing runs).
"$root/usr/bin/ztmesh-controller" --config "$root/etc/ztmesh/controller.toml" config check
"$root/usr/bin/ztmesh" --config "$root/etc/ztmesh/node.toml" config check
# Completions load in bash and define the completion function.
bash -c "source '$root/usr/share/bash-completion/completions/ztmesh' && complete -p ztmesh" >/dev/null ||
  fail "the bash completion of ztmesh does not load"
man -l "$root/usr/share/man/man1/ztmesh-controller-serve.1.gz" 2>/dev/null | grep -q -- "--listen" ||
  fail "man ztmesh-controller-serve does not document --listen"

echo "== package: lintian (no errors)"
lintian --fail-on error "$out"/*.deb 2> >(grep -v 'running with root privileges' >&2) ||
  fail "lintian reports errors"

echo "== package: systemd-analyze security (offline, on the installed units)"
exposure() { # UNIT MAX
  local line
  line=$(systemd-analyze security --offline=true "$root/usr/lib/systemd/system/$1.service" 2>&1 | tail -1)
  echo "  $line"
  local level
  level=$(grep -Eo '[0-9]+\.[0-9]+' <<<"$line" | tail -1)
  awk -v l="$level" -v m="$2" 'BEGIN { exit !(l != "" && l <= m) }' ||
    fail "$1.service exposure ${level:-unknown} is above $2"
}
exposure ztmesh-controller 2.0
exposure ztmesh 4.0
exposure ztmesh-relay 2.0
# verify, on copies whose ExecStart names the installed binaries (the host
# has none in /usr/bin); Documentation=man: lines need the pages on the host.
mkdir -p "$root/verify"
for f in "$root"/usr/lib/systemd/system/ztmesh*.service; do
  sed "s|/usr/bin/|$root/usr/bin/|" "$f" >"$root/verify/${f##*/}"
done
problems=$(systemd-analyze verify "$root"/verify/*.service 2>&1 | grep -v "Command 'man " || true)
[[ -z $problems ]] || fail "systemd-analyze verify: $problems"

echo "== package: remove keeps the conffiles, purge removes them"
dpkg_root -r ztmesh ztmesh-controller ztmesh-relay
[[ ! -e $root/usr/bin/ztmesh && -f $root/etc/ztmesh/node.toml ]] || fail "remove did not keep node.toml"
dpkg_root -P ztmesh ztmesh-controller ztmesh-relay
[[ ! -e $root/etc/ztmesh/node.toml && ! -e $root/etc/ztmesh/controller.toml ]] || fail "purge left a config"
echo "== package: ok"
