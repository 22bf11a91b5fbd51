#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests (Debian's postgresql package).
#
#   scripts/pg.sh start DIR   initdb in DIR, start it, print the environment
#   scripts/pg.sh stop DIR    stop it (by the PID in its postmaster.pid)
#
# The cluster listens on a unix socket in DIR/sock (trust, for the superuser
# the tests create databases with; the directory and socket are 0700, so only
# root, which runs the tests, and postgres reach it) and on 127.0.0.1:PORT
# (the first port from 55432 it can listen on) with TLS only:
# `hostssl … cert`, so a TCP client must present a certificate the test CA
# signed, whose CN is the role (`ztmesh`). The CA, server and client
# certificates are in DIR/tls. `start` prints lines to eval:
#   ZTMESH_TEST_PG=DIR/sock ZTMESH_TEST_PG_PORT=PORT ZTMESH_TEST_PG_TLS=DIR/tls
set -euo pipefail
cmd=${1:?usage: pg.sh start|stop DIR}
dir=${2:?usage: pg.sh start|stop DIR}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[[ -x $bin/initdb ]] || { echo "pg.sh: no PostgreSQL server (apt-get install postgresql)" >&2; exit 1; }
as_pg() { runuser -u postgres -- "$@"; }

case $cmd in
start)
  mkdir -p "$dir/sock" "$dir/tls"
  chmod 700 "$dir" "$dir/sock"
  tls=$dir/tls
  # A CA, a server certificate for 127.0.0.1/localhost, a client one for `ztmesh`.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=ztmesh-test-ca -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
  for who in server client; do
    if [[ $who == server ]]; then cn=localhost; else cn=ztmesh; fi
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$cn" \
      -keyout "$tls/$who.key" -out "$tls/$who.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$tls/$who.ext"
    openssl x509 -req -in "$tls/$who.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
      -CAcreateserial -days 2 -extfile "$tls/$who.ext" -out "$tls/$who.pem" 2>/dev/null
  done
  chmod 600 "$tls"/*.key
  chown -R postgres: "$dir"
  chmod 700 "$dir"
  # The client key stays root's: only the tests read it.
  chown root: "$tls/client.key"
  as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
  cat >"$dir/data/pg_hba.conf" <<EOF
local   all all                trust
hostssl all all 127.0.0.1/32   cert
EOF
  cat >>"$dir/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir/sock'
unix_socket_permissions = 0700
ssl = on
ssl_cert_file = '$tls/server.pem'
ssl_key_file = '$tls/server.key'
ssl_ca_file = '$tls/ca.pem'
max_connections = 200
EOF
  # Tests trade durability for speed; a benchmark (ZTMESH_PG_DURABLE=1)
  # keeps PostgreSQL's defaults, as SQLite keeps synchronous=FULL.
  if [[ -z ${ZTMESH_PG_DURABLE:-} ]]; then
    printf 'fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n' \
      >>"$dir/data/postgresql.conf"
  fi
  # The first port from 55432 it can listen on (a cluster a killed run left
  # behind keeps its own; two runs starting at once take turns).
  port=
  for p in $(seq 55432 55531); do
    [[ -z $(ss -Hltn "sport = :$p") ]] || continue
    if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -o "-p $p" -w -t 60 start >/dev/null; then
      port=$p
      break
    fi
  done
  [[ -n $port ]] || { echo "pg.sh: the cluster did not start on any port in 55432-55531 (see $dir/log)" >&2; exit 1; }
  as_pg psql -h "$dir/sock" -p "$port" -U postgres -d postgres -qAt \
    -c "CREATE ROLE ztmesh LOGIN CREATEDB" >/dev/null
  echo "export ZTMESH_TEST_PG=$dir/sock ZTMESH_TEST_PG_PORT=$port ZTMESH_TEST_PG_TLS=$tls"
  ;;
stop)
  if [[ -f $dir/data/postmaster.pid ]]; then
    as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null || true
  fi
  ;;
*)
  echo "usage: pg.sh start|stop DIR" >&2
  exit 2
  ;;
esac
