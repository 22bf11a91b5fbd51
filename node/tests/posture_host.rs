//! Posture collection on the machine the tests run on: the attributes the
//! real collector reads must agree with what the host's own tools say
//! (`uname -r`, a shell sourcing os-release), and `nft`'s real JSON output
//! must be understood.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ztmesh_node::posture::collect::{find_program, run_bounded, Collector};
use ztmesh_node::posture::{self, firewall_active, AttrValue};

fn text(v: Option<&AttrValue>) -> Option<&str> {
    match v {
        Some(AttrValue::Str(s)) => Some(s),
        _ => None,
    }
}

fn shell(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(out.status.success(), "{script}");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

#[test]
fn the_real_collection_agrees_with_the_host() {
    let now = ztmesh_proto::time::now_ms();
    let got = Collector::default().collect(now, true);
    let set = &got.attrs;
    // Every attribute is reported or its absence explained.
    for (key, _) in ztmesh_policy::NODE_ATTRIBUTES {
        assert!(
            set.get(key).is_some() != got.unreported.contains_key(key),
            "{key}: {:?}",
            got.unreported.get(key)
        );
    }
    assert_eq!(text(set.get(posture::OS)), Some("linux"));
    assert_eq!(
        text(set.get(posture::KERNEL)),
        Some(shell("uname -r").as_str())
    );
    assert_eq!(
        text(set.get(posture::AGENT_VERSION)),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let os_release = ["/etc/os-release", "/usr/lib/os-release"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if let Some(file) = os_release {
        let field = |name: &str| {
            let v = shell(&format!(". {file} && printf '%s' \"${name}\""));
            (!v.is_empty()).then_some(v)
        };
        assert_eq!(
            text(set.get(posture::OS_DISTRO)),
            field("ID").as_deref(),
            "ID"
        );
        assert_eq!(
            text(set.get(posture::OS_VERSION)),
            field("VERSION_ID").as_deref(),
            "VERSION_ID"
        );
    }
    // The rest depends on the host; where reported, it has its type.
    for key in [posture::FIREWALL, posture::DISK_ENCRYPTED] {
        assert!(
            matches!(set.get(key), None | Some(AttrValue::Bool(_))),
            "{key}"
        );
    }
    let apt = find_program("apt-get").is_some();
    for key in [posture::SECURITY_UPDATES, posture::DAYS_SINCE_UPGRADE] {
        match set.get(key) {
            Some(AttrValue::Int(n)) => assert!(apt && *n >= 0, "{key} = {n}"),
            None => {}
            other => panic!("{key} = {other:?}"),
        }
    }
    if apt && Path::new("/var/lib/dpkg/status").exists() {
        assert!(set.get(posture::DAYS_SINCE_UPGRADE).is_some());
    }
    if find_program("nft").is_none() {
        assert_eq!(
            set.get(posture::FIREWALL),
            None,
            "no nft: unknown, not false"
        );
    }
    assert!(set.len() <= posture::MAX_ATTRIBUTES);
    eprintln!("collected: {set:?}; not reported: {:?}", got.unreported);
}

/// Loads `ruleset` with nft in a fresh network namespace and reads it
/// back as the collector does; `None` where nft or `unshare -n` (root) is
/// unavailable.
fn firewall_in_fresh_netns(ruleset: &str) -> Option<bool> {
    let nft = find_program("nft")?;
    let unshare = find_program("unshare")?;
    let nft = nft.display().to_string();
    let script = format!("{nft} -f - <<'EOF'\n{ruleset}\nEOF\nexec {nft} -j -t list ruleset");
    let out = run_bounded(
        &unshare,
        &["-n", "sh", "-c", &script],
        Duration::from_secs(10),
        1 << 20,
    )
    .inspect_err(|e| eprintln!("skipped: {e}"))
    .ok()?;
    Some(firewall_active(&String::from_utf8_lossy(&out)).expect("nft JSON understood"))
}

#[test]
fn nft_rulesets_in_a_fresh_namespace_read_as_expected() {
    let cases = [
        ("", false),
        (
            "table inet filter { chain input { type filter hook input priority 0; policy drop; }; }",
            true,
        ),
        (
            "table inet filter { chain input { type filter hook input priority 0; policy accept; tcp dport 22 accept; }; }",
            true,
        ),
        (
            "table inet filter { chain input { type filter hook input priority 0; policy accept; }; chain forward { type filter hook forward priority 0; policy drop; }; }",
            false,
        ),
        (
            "table inet ztmesh_ztm0 { chain input { type filter hook input priority -10; policy accept; iifname \"ztm0\" drop; }; }",
            false,
        ),
        // A blocklist: its elements are left out of the terse listing.
        (
            "table inet t { set bl { type ipv4_addr; elements = { 198.18.0.1, 198.18.0.2 }; }; chain input { type filter hook input priority 0; policy accept; ip saddr @bl drop; }; }",
            true,
        ),
        // A dormant table does not run; a nat chain on input does not filter.
        (
            "table ip d { flags dormant; chain input { type filter hook input priority 0; policy drop; }; }",
            false,
        ),
        (
            "table ip n { chain pre { type nat hook input priority 100; policy accept; counter; }; }",
            false,
        ),
    ];
    for (ruleset, want) in cases {
        match firewall_in_fresh_netns(ruleset) {
            Some(got) => assert_eq!(got, want, "{ruleset}"),
            None => {
                eprintln!("nft or unshare -n unavailable: skipped");
                return;
            }
        }
    }
}
