//! Upgrades: databases written by earlier releases, committed under
//! `tests/fixtures/vX.Y.Z/`, open with this binary, migrate to its schema
//! and keep their data usable.
//!
//! A database a newer binary wrote is refused on both engines.
//!
//! `make_fixture` (ignored) writes this release's fixtures for the next
//! release to test against: it drives a real in-process controller through
//! its gRPC APIs (users with a password and TOTP, auth and API keys, nodes
//! with tags, routes, posture and endpoints, two policy versions, flows, a
//! quarantine, a signed audit checkpoint), then copies the SQLite database
//! (`VACUUM INTO`) and, with the PostgreSQL test cluster, `pg_dump`s the same
//! population made on PostgreSQL. See `tests/fixtures/README.md`.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::path::{Path, PathBuf};

use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};
use ztmesh_controller::accounts;
use ztmesh_controller::cli::{self, ConnArgs};
use ztmesh_controller::mesh::MeshConfig;
use ztmesh_controller::now_ms;
use ztmesh_controller::secrets::{self, KeyDetail, Presented, SecretKind};
use ztmesh_controller::server::DataDir;
use ztmesh_controller::store::{
    FlowQuery, PgOptions, PgStore, SqliteStore, Store, POSTGRES_SCHEMA_VERSION,
    SQLITE_SCHEMA_VERSION,
};
use ztmesh_proto::admin as apb;
use ztmesh_proto::auth::{self, methods, signed_request};
use ztmesh_proto::control as pb;
use ztmesh_proto::keys::{PublicKey, SigningKey, WgPrivateKey};
use ztmesh_proto::netmap;

mod common;
use common::{enroll_request, Ctl};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The longest key lifetime the controller issues: the fixture's keys stay
/// valid for the releases that test against it.
const TEN_YEARS_SECS: u64 = 10 * 365 * 24 * 3600;

/// The fixture's built-in account with a password and a TOTP factor.
const ALICE: &str = "alice@example.com";
const ALICE_PASSWORD: &str = "fixture password for alice";

const POLICY_V1: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]}],
}"#;

const POLICY_V2: &str = r#"{
  "groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
  "tagOwners": {"tag:web": ["group:eng"], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["tag:db"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["198.19.50.0/24:80"]},
  ],
}"#;

/// The configuration the fixtures are made and opened with: tagged servers'
/// keys never expire (so the fixture's servers can still connect years
/// later); people's devices keep the default lifetime.
fn fixture_config() -> MeshConfig {
    MeshConfig {
        tagged_key_ttl_ms: 0,
        ..MeshConfig::default()
    }
}

/// A node of the fixture: its keys travel in the manifest (test-only keys).
struct FixtureNode {
    machine: SigningKey,
    machine_b64: String,
    wg: WgPrivateKey,
    wg_b64: String,
    name: String,
    id: u64,
}

/// A machine key from 32 bytes of base64 (the key file format).
fn machine_key(b64: &str) -> SigningKey {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("machine.key");
    std::fs::write(&path, b64).unwrap();
    SigningKey::load(&path).unwrap()
}

fn random_b64() -> String {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    B64.encode(b)
}

async fn enroll_fixture_node(ctl: &Ctl, key: &str, host: &str) -> FixtureNode {
    let machine_b64 = random_b64();
    let wg_b64 = random_b64();
    let machine = machine_key(&machine_b64);
    let wg: WgPrivateKey = wg_b64.parse().unwrap();
    let r = ctl
        .control()
        .await
        .enroll(enroll_request(key, &machine, &wg, host))
        .await
        .unwrap()
        .into_inner();
    FixtureNode {
        machine,
        machine_b64,
        wg,
        wg_b64,
        name: r.name,
        id: r.node_id,
    }
}

fn signed<T>(n: &FixtureNode, method: &str, msg: T) -> tonic::Request<T> {
    signed_request(&n.machine, method, msg, now_ms(), &mut OsRng)
}

async fn auth_key(ctl: &Ctl, user: &str, tags: &[&str], reusable: bool, ephemeral: bool) -> String {
    ctl.admin()
        .await
        .create_auth_key(apb::CreateAuthKeyRequest {
            user: user.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            reusable,
            ephemeral,
            expiry_secs: TEN_YEARS_SECS,
        })
        .await
        .unwrap()
        .into_inner()
        .secret
}

async fn api_key(ctl: &Ctl, description: &str, role: &str) -> String {
    ctl.admin()
        .await
        .create_api_key(apb::CreateApiKeyRequest {
            description: description.into(),
            expiry_secs: TEN_YEARS_SECS,
            role: role.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret
}

/// The key id of an auth key or API key (`prefix.key_id.…`).
fn key_id(secret: &str) -> String {
    secret.split('.').nth(1).unwrap().to_string()
}

async fn node_v4(ctl: &Ctl, name: &str) -> String {
    ctl.admin()
        .await
        .get_node(apb::NodeRef { node: name.into() })
        .await
        .unwrap()
        .into_inner()
        .addresses
        .into_iter()
        .find(|a| !a.contains(':'))
        .unwrap()
}

/// Populates `ctl` through its APIs; returns the manifest: what a test of
/// the fixture checks, with the (test-only) secrets it needs.
async fn populate(ctl: &Ctl) -> Value {
    let mut admin = ctl.admin().await;
    for (login, role) in [
        (ALICE, "admin"),
        ("bob@example.com", "member"),
        ("carol@example.com", "auditor"),
    ] {
        admin
            .create_user(apb::CreateUserRequest {
                login: login.into(),
                role: role.into(),
            })
            .await
            .unwrap();
    }
    admin
        .update_user(apb::UpdateUserRequest {
            login: ALICE.into(),
            password: ALICE_PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .update_user(apb::UpdateUserRequest {
            login: "bob@example.com".into(),
            key_expiry_ms: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut totp_secret = [0u8; 20];
    OsRng.fill_bytes(&mut totp_secret);
    let now = now_ms();
    let recovery_codes = ctl
        .mesh
        .enroll_totp(
            ALICE,
            &totp_secret,
            accounts::totp_step(now),
            &mut OsRng,
            now,
        )
        .unwrap();

    // Auth keys: used single-use, used reusable, unused, revoked.
    let web_key = auth_key(ctl, "", &["tag:web"], false, false).await;
    let db_key = auth_key(ctl, "", &["tag:db"], true, false).await;
    let alice_key = auth_key(ctl, ALICE, &[], false, false).await;
    let spare_key = auth_key(ctl, "", &["tag:web"], true, true).await;
    let revoked_key = auth_key(ctl, "", &["tag:web"], true, false).await;
    admin
        .revoke_auth_key(apb::KeyRef {
            key_id: key_id(&revoked_key),
        })
        .await
        .unwrap();
    // API keys: an admin's, an auditor's, a revoked one.
    let admin_api = api_key(ctl, "fixture admin", "admin").await;
    let auditor_api = api_key(ctl, "fixture auditor", "auditor").await;
    let revoked_api = api_key(ctl, "fixture revoked", "admin").await;
    admin
        .revoke_api_key(apb::KeyRef {
            key_id: key_id(&revoked_api),
        })
        .await
        .unwrap();

    // Two policy versions.
    ctl.set_policy(POLICY_V1).await;
    let web = enroll_fixture_node(ctl, &web_key, "web").await;
    let db = enroll_fixture_node(ctl, &db_key, "db").await;
    let db2 = enroll_fixture_node(ctl, &db_key, "db").await;
    let laptop = enroll_fixture_node(ctl, &alice_key, "Alice's Laptop").await;
    let scanner = enroll_fixture_node(ctl, &db_key, "scanner").await;
    ctl.set_policy(POLICY_V2).await;
    let nodes = [&web, &db, &db2, &laptop, &scanner];

    // Every node holds a session, reports endpoints and posture.
    // Reports must come over the connection that holds the session.
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut client = ctl.control().await;
        let s = client
            .stream_net_map(signed(
                n,
                methods::STREAM_NETMAP,
                pb::StreamNetMapRequest {
                    have_serial: 0,
                    accept_deltas: true,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        streams.push(s);
        client
            .report_endpoints(signed(
                n,
                methods::REPORT_ENDPOINTS,
                pb::ReportEndpointsRequest {
                    endpoints: vec![
                        format!("198.18.0.{}:41641", i + 1),
                        format!("[fd00::{}]:41641", i + 1),
                    ],
                },
            ))
            .await
            .unwrap();
        let attr = |key: &str, value| pb::PostureAttribute {
            key: key.into(),
            value: Some(value),
        };
        use pb::posture_attribute::Value as V;
        client
            .report_posture(signed(
                n,
                methods::REPORT_POSTURE,
                pb::ReportPostureRequest {
                    attributes: vec![
                        attr("node:os", V::Text("linux".into())),
                        attr("node:firewall", V::Flag(true)),
                    ],
                },
            ))
            .await
            .unwrap();
        clients.push(client);
    }
    // A subnet router, approved by an admin; a custom attribute.
    clients[1]
        .set_routes(signed(
            &db,
            methods::SET_ROUTES,
            pb::SetRoutesRequest {
                routes: vec!["198.19.50.0/24".into()],
                exit_node: false,
            },
        ))
        .await
        .unwrap();
    admin
        .set_node_routes(apb::SetNodeRoutesRequest {
            node: db.name.clone(),
            approve: vec!["198.19.50.0/24".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .set_node_attributes(apb::SetNodeAttributesRequest {
            node: web.name.clone(),
            set: vec![apb::Attribute {
                key: "custom:tier".into(),
                value: Some(apb::attribute::Value::Text("frontend".into())),
            }],
            unset: vec![],
        })
        .await
        .unwrap();

    // Flows: db saw web's allowed connection; db and db-2 saw the scanner
    // sweep ports, which quarantines it.
    let web_ip = node_v4(ctl, &web.name).await;
    let db_ip = node_v4(ctl, &db.name).await;
    let scanner_ip = node_v4(ctl, &scanner.name).await;
    let allowed = pb::FlowSummary {
        src: web_ip.clone(),
        dst: db_ip.clone(),
        protocol: 6,
        dst_port: 5432,
        allowed: true,
        packets: 10,
        bytes: 1000,
        ..Default::default()
    };
    let scan: Vec<pb::FlowSummary> = (1..=100)
        .map(|port| pb::FlowSummary {
            src: scanner_ip.clone(),
            dst: db_ip.clone(),
            protocol: 6,
            dst_port: port,
            allowed: false,
            reason: "port_not_allowed".into(),
            packets: 1,
            ..Default::default()
        })
        .collect();
    for (i, n, flows) in [
        (1, &db, [vec![allowed], scan.clone()].concat()),
        (2, &db2, scan),
    ] {
        clients[i]
            .report_flows(signed(
                n,
                methods::REPORT_FLOWS,
                pb::ReportFlowsRequest {
                    flows,
                    unknown_handshakes: vec![],
                    paths: None,
                },
            ))
            .await
            .unwrap();
    }
    let q = admin
        .get_node(apb::NodeRef {
            node: scanner.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        q.quarantined_since_ms > 0,
        "the scanner is quarantined: {q:?}"
    );

    ctl.mesh.flush();
    ctl.mesh.sign_audit_head(now_ms());
    drop(streams);

    let node_json = |n: &FixtureNode| {
        json!({
            "id": n.id,
            "name": n.name,
            "machine_key": n.machine_b64,
            "machine_public": n.machine.public().to_string(),
            "wg_key": n.wg_b64,
            "wg_public": n.wg.public().to_string(),
        })
    };
    json!({
        "generated_at_ms": now_ms(),
        "release": env!("CARGO_PKG_VERSION"),
        "controller_key": ctl.mesh.controller_key().to_string(),
        "users": {
            "alice@example.com": {"role": "admin", "password": ALICE_PASSWORD,
                "totp_secret": B64.encode(totp_secret), "recovery_codes": recovery_codes},
            "bob@example.com": {"role": "member", "key_expiry_ms": 0},
            "carol@example.com": {"role": "auditor"},
        },
        "auth_keys": {
            "web": {"secret": web_key, "state": "used up"},
            "db": {"secret": db_key, "state": "ok"},
            "alice": {"secret": alice_key, "state": "used up"},
            "spare": {"secret": spare_key, "state": "ok"},
            "revoked": {"secret": revoked_key, "state": "revoked"},
        },
        "api_keys": {
            "admin": {"secret": admin_api, "role": "admin", "state": "ok"},
            "auditor": {"secret": auditor_api, "role": "auditor", "state": "ok"},
            "revoked": {"secret": revoked_api, "role": "admin", "state": "revoked"},
        },
        "nodes": {
            "web": node_json(&web),
            "db": node_json(&db),
            "db2": node_json(&db2),
            "laptop": node_json(&laptop),
            "scanner": node_json(&scanner),
        },
        "routes": {"db": ["198.19.50.0/24"]},
        "policy": {"version": 2, "text": POLICY_V2},
    })
}

/// The PostgreSQL test cluster (`scripts/pg.sh`: `ZTMESH_TEST_PG` is its
/// socket directory).
struct PgCluster {
    sock: String,
    port: String,
}

impl PgCluster {
    /// The cluster, or `None` without one (which fails the test when
    /// `ZTMESH_REQUIRE_POSTGRES` is set).
    fn from_env() -> Option<Self> {
        let Ok(sock) = std::env::var("ZTMESH_TEST_PG") else {
            assert!(
                std::env::var_os("ZTMESH_REQUIRE_POSTGRES").is_none(),
                "ZTMESH_REQUIRE_POSTGRES is set but ZTMESH_TEST_PG is not (scripts/pg.sh)"
            );
            eprintln!("skipped: no PostgreSQL test cluster (scripts/pg.sh, ZTMESH_TEST_PG)");
            return None;
        };
        let port = std::env::var("ZTMESH_TEST_PG_PORT").unwrap_or_else(|_| "5432".into());
        Some(Self { sock, port })
    }

    fn psql(&self, db: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new("psql")
            .args([
                "-h", &self.sock, "-p", &self.port, "-U", "postgres", "-d", db,
            ])
            .args(["-qAt", "-v", "ON_ERROR_STOP=1"])
            .args(args)
            .output()
            .unwrap()
    }

    /// A new empty database: its name, options and URL.
    fn fresh(&self, prefix: &str) -> (String, PgOptions, String) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = self.psql("postgres", &["-c", &format!("CREATE DATABASE {name}")]);
        assert!(out.status.success(), "{out:?}");
        let url = format!(
            "postgres://postgres@/{name}?host={}&port={}",
            self.sock, self.port
        );
        (name, PgOptions::parse(&url).unwrap(), url)
    }
}

fn write_manifest(path: &Path, manifest: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(manifest).unwrap() + "\n").unwrap();
}

/// Where `make_fixture` writes: `ZTMESH_FIXTURE_DIR`, else this release's
/// directory under `tests/fixtures/`.
fn fixture_out() -> PathBuf {
    std::env::var_os("ZTMESH_FIXTURE_DIR").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(format!("v{}", env!("CARGO_PKG_VERSION")))
        },
        PathBuf::from,
    )
}

/// Writes this release's upgrade fixtures (see the module doc and
/// `tests/fixtures/README.md`): `cargo test -p ztmesh-controller --test
/// upgrade -- --ignored make_fixture`, with the PostgreSQL test cluster's
/// environment (`scripts/pg.sh`) for the PostgreSQL dump.
#[tokio::test]
#[ignore = "writes the release's upgrade fixtures; run by hand at a release"]
async fn make_fixture() {
    let out = fixture_out();
    std::fs::create_dir_all(&out).unwrap();

    // SQLite: the data dir's database, compacted, and the identity files.
    let ctl = Ctl::start_with(fixture_config()).await;
    let manifest = populate(&ctl).await;
    let db = out.join("ztmesh.db");
    let _ = std::fs::remove_file(&db);
    rusqlite::Connection::open(ctl.data.db())
        .unwrap()
        .execute("VACUUM INTO ?1", [db.to_str().unwrap()])
        .unwrap();
    for (src, name) in [
        (ctl.data.signing_key(), "controller.key"),
        (ctl.data.tls_cert(), "tls.crt"),
        (ctl.data.tls_key(), "tls.key"),
    ] {
        std::fs::copy(src, out.join(name)).unwrap();
    }
    write_manifest(&out.join("sqlite.json"), &manifest);

    // PostgreSQL: the same population, with the same identity.
    let Some(cluster) = PgCluster::from_env() else {
        ctl.stop().await;
        return;
    };
    let (name, database, _) = cluster.fresh("fixture");
    let pg = Ctl::start_from(fixture_config(), Some(database), &ctl.data).await;
    let manifest = populate(&pg).await;
    pg.stop().await;
    ctl.stop().await;
    let dump = std::process::Command::new("pg_dump")
        .args(["-h", &cluster.sock, "-p", &cluster.port, "-U", "postgres"])
        .args([
            "-d",
            &name,
            "--no-owner",
            "--no-privileges",
            "--format=plain",
        ])
        .output()
        .unwrap();
    assert!(dump.status.success(), "{dump:?}");
    std::fs::write(out.join("postgres.sql"), &dump.stdout).unwrap();
    write_manifest(&out.join("postgres.json"), &manifest);
}

/// The releases whose fixtures this binary must open.
const RELEASES: &[&str] = &["v0.1.0"];

fn fixture_dir(release: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(release)
}

fn manifest(release: &str, engine: &str) -> Value {
    let path = fixture_dir(release).join(format!("{engine}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A fixture node's keys, from its manifest entry.
fn fixture_node(m: &Value) -> FixtureNode {
    let machine_b64 = m["machine_key"].as_str().unwrap().to_string();
    let wg_b64 = m["wg_key"].as_str().unwrap().to_string();
    FixtureNode {
        machine: machine_key(&machine_b64),
        wg: wg_b64.parse().unwrap(),
        machine_b64,
        wg_b64,
        name: m["name"].as_str().unwrap().to_string(),
        id: m["id"].as_u64().unwrap(),
    }
}

/// Checks, on the migrated store, that everything the fixture's manifest
/// lists is there and usable.
fn check_store(s: &dyn Store, m: &Value) {
    // Just after the fixture was made: keys are judged as of then.
    let then = m["generated_at_ms"].as_i64().unwrap() + 1;

    let users = s.users().unwrap();
    for (login, want) in m["users"].as_object().unwrap() {
        let u = users
            .iter()
            .find(|u| &u.login == login)
            .unwrap_or_else(|| panic!("user {login} kept"));
        assert_eq!(u.role.as_str(), want["role"].as_str().unwrap(), "{login}");
    }
    let bob = users.iter().find(|u| u.login == "bob@example.com").unwrap();
    assert_eq!(bob.key_expiry_ms, Some(0));
    let alice = &m["users"][ALICE];
    let creds = s.credentials(ALICE).unwrap().expect("alice's credentials");
    assert!(accounts::verify_password(
        alice["password"].as_str().unwrap(),
        creds.password_hash.as_deref().expect("a password")
    ));
    assert!(!accounts::verify_password(
        "not alice's password",
        creds.password_hash.as_deref().unwrap()
    ));
    let secret = B64.decode(alice["totp_secret"].as_str().unwrap()).unwrap();
    assert_eq!(creds.totp_secret.as_deref(), Some(&secret[..]));
    // A code of today's clock checks against the stored factor.
    let now = now_ms();
    let code = format!(
        "{:06}",
        accounts::hotp(&secret, accounts::totp_step(now) as u64)
    );
    assert!(accounts::check_totp(&secret, &code, now, creds.totp_last_step).is_some());
    let recovery = alice["recovery_codes"][0].as_str().unwrap();
    assert!(accounts::match_recovery_code(recovery, &creds.recovery).is_some());

    for (kind, section) in [
        (SecretKind::AuthKey, "auth_keys"),
        (SecretKind::ApiKey, "api_keys"),
    ] {
        for (name, k) in m[section].as_object().unwrap() {
            let presented = Presented::parse(kind, k["secret"].as_str().unwrap()).unwrap();
            let record = s.find_key(kind, presented.key_id()).unwrap();
            let got = match secrets::verify(&presented, record.as_ref(), then) {
                Ok(()) => "ok".to_string(),
                Err(r) => r.to_string(),
            };
            assert_eq!(got, k["state"].as_str().unwrap(), "{section} {name}");
            if let Some(role) = k.get("role") {
                let Some(KeyDetail::Api { role: got, .. }) = record.map(|r| r.detail) else {
                    panic!("{name} is an API key");
                };
                assert_eq!(got.as_str(), role.as_str().unwrap(), "{name}");
            }
        }
    }

    let nodes = s.nodes().unwrap();
    let want = m["nodes"].as_object().unwrap();
    assert_eq!(nodes.len(), want.len(), "{nodes:?}");
    for (label, n) in want {
        let row = nodes
            .iter()
            .find(|r| r.id == n["id"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("node {label} kept"));
        let keys = fixture_node(n);
        assert_eq!(row.name, keys.name);
        assert_eq!(
            row.machine_key,
            *keys.machine.public().as_bytes(),
            "{label}"
        );
        assert_eq!(row.wg_key, *keys.wg.public().as_bytes(), "{label}");
        assert_eq!(row.endpoints.len(), 2, "{label}: {:?}", row.endpoints);
        assert!(row.endpoints[0].starts_with("198.18.0."), "{label}");
        assert!(
            row.posture.reported.contains_key("node:os"),
            "{label}: {:?}",
            row.posture
        );
        assert!(row.ipv4.to_string().starts_with("100.64."), "{label}");
        let tags = match label.as_str() {
            "web" => vec!["tag:web".to_string()],
            "laptop" => vec![],
            _ => vec!["tag:db".to_string()],
        };
        assert_eq!(row.tags, tags, "{label}");
        assert_eq!(row.quarantine.is_some(), label == "scanner", "{label}");
    }
    let by_label = |l: &str| {
        let id = m["nodes"][l]["id"].as_u64().unwrap();
        nodes.iter().find(|r| r.id == id).unwrap()
    };
    assert_eq!(by_label("laptop").user.as_deref(), Some(ALICE));
    assert!(by_label("laptop").expiry_ms > 0, "people's devices expire");
    assert_eq!(by_label("web").expiry_ms, 0, "tagged servers do not");
    assert!(by_label("web").posture.custom.contains_key("custom:tier"));
    let routes: Vec<String> = by_label("db")
        .routes
        .approved
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(routes, ["198.19.50.0/24"]);

    let policy = s.policy().unwrap().expect("a policy");
    assert_eq!(policy.version, m["policy"]["version"].as_u64().unwrap());
    assert_eq!(policy.text, m["policy"]["text"].as_str().unwrap());

    let key: PublicKey = m["controller_key"].as_str().unwrap().parse().unwrap();
    let verified = s
        .verify_audit(&key)
        .unwrap()
        .unwrap_or_else(|e| panic!("audit chain broken at {e}"));
    assert!(verified.signed_head.is_some(), "a signed checkpoint");
    assert!(verified.rows > 20, "{} audit rows", verified.rows);

    let flows = s
        .flows(&FlowQuery {
            limit: 1000,
            ..Default::default()
        })
        .unwrap();
    assert!(flows.iter().any(|f| f.allowed), "an allowed flow");
    assert!(
        flows.iter().filter(|f| !f.allowed).count() >= 100,
        "denied flows"
    );
    let detections = s.detections(10, None).unwrap();
    assert_eq!(detections.len(), 1, "{detections:?}");
    assert_eq!(detections[0].node_name, by_label("scanner").name);
    assert_eq!(detections[0].action, "quarantine");
}

/// Checks that a controller serving the migrated fixture works: a fixture
/// server streams a signed map with its peers, the reusable key enrolls a
/// new node, the revoked one does not, the admin API key lists the nodes.
async fn check_serving(ctl: &Ctl, m: &Value) {
    let key: PublicKey = m["controller_key"].as_str().unwrap().parse().unwrap();
    assert_eq!(ctl.mesh.controller_key(), key);
    let db = fixture_node(&m["nodes"]["db"]);
    let mut stream = ctl
        .control()
        .await
        .stream_net_map(signed(
            &db,
            methods::STREAM_NETMAP,
            pb::StreamNetMapRequest {
                have_serial: 0,
                accept_deltas: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(common::LIVENESS, stream.message())
        .await
        .expect("a netmap in time")
        .unwrap()
        .expect("stream open");
    let map = netmap::verify(&key, &first, 0, now_ms()).expect("signed by the fixture's key");
    let mut peers: Vec<String> = map.peers.iter().map(|p| p.name.clone()).collect();
    peers.sort();
    let name = |l: &str| m["nodes"][l]["name"].as_str().unwrap().to_string();
    let mut want = vec![name("web"), name("db2")];
    want.sort();
    assert_eq!(peers, want, "the quarantined scanner is in no map");
    drop(stream);

    let secret = |section: &str, k: &str| m[section][k]["secret"].as_str().unwrap().to_string();
    let new = enroll_fixture_node(ctl, &secret("auth_keys", "db"), "db").await;
    assert!(new.name.starts_with("db-"), "{}", new.name);
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let e = ctl
        .control()
        .await
        .enroll(enroll_request(
            &secret("auth_keys", "revoked"),
            &machine,
            &wg,
            "x",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{}", e.message());

    let mut remote = cli::connect(&ConnArgs {
        data_dir: "/nonexistent".into(),
        server: Some(ctl.url.clone()),
        api_key: Some(secret("api_keys", "admin")),
        fingerprint: Some(auth::hex(&ctl.fp)),
    })
    .await
    .unwrap();
    let listed = remote
        .list_nodes(apb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(listed.len(), m["nodes"].as_object().unwrap().len() + 1);
}

/// `ztmesh-controller audit verify` (the real binary, offline) on the data
/// dir, with `database` if given.
fn audit_verify(data_dir: &Path, database: Option<&str>) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ztmesh-controller"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["audit", "verify"]);
    if let Some(url) = database {
        cmd.args(["--database", url]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("audit chain ok"), "{stdout}");
}

fn sqlite_version(db: &Path) -> u64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

/// Each release's SQLite fixture, copied, opens with this binary at its
/// schema, keeps its data, and serves.
#[tokio::test]
async fn sqlite_databases_of_earlier_releases_migrate_and_serve() {
    for release in RELEASES {
        eprintln!("release: {release}");
        let m = manifest(release, "sqlite");
        let fixture = fixture_dir(release);
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ztmesh.db");
        std::fs::copy(fixture.join("ztmesh.db"), &db).unwrap();
        assert!(sqlite_version(&db) <= SQLITE_SCHEMA_VERSION);
        let store = SqliteStore::open(&db).unwrap();
        check_store(&store, &m);
        drop(store);
        assert_eq!(
            sqlite_version(&db),
            SQLITE_SCHEMA_VERSION,
            "migrated to current"
        );

        let ctl = Ctl::start_from(MeshConfig::default(), None, &DataDir::new(&fixture)).await;
        check_serving(&ctl, &m).await;
        audit_verify(&ctl.data.root, None);
        ctl.stop().await;
    }
}

/// Each release's PostgreSQL fixture (a `pg_dump`), loaded into a fresh
/// database on the test cluster, opens with this binary at its schema,
/// keeps its data, and serves.
#[tokio::test]
async fn postgres_databases_of_earlier_releases_migrate_and_serve() {
    let Some(cluster) = PgCluster::from_env() else {
        return;
    };
    for release in RELEASES {
        eprintln!("release: {release}");
        let m = manifest(release, "postgres");
        let fixture = fixture_dir(release);
        let (name, options, url) = cluster.fresh("upgrade");
        let dump = fixture.join("postgres.sql");
        let out = cluster.psql(&name, &["-f", dump.to_str().unwrap()]);
        assert!(out.status.success(), "loading {}: {out:?}", dump.display());
        let version = |c: &PgCluster| {
            let out = c.psql(&name, &["-c", "SELECT version FROM ztmesh_schema"]);
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap()
        };
        assert!(version(&cluster) <= POSTGRES_SCHEMA_VERSION);
        let store = PgStore::connect(options.clone()).unwrap();
        check_store(&store, &m);
        drop(store);
        assert_eq!(
            version(&cluster),
            POSTGRES_SCHEMA_VERSION,
            "migrated to current"
        );

        let ctl = Ctl::start_from(
            MeshConfig::default(),
            Some(options),
            &DataDir::new(&fixture),
        )
        .await;
        check_serving(&ctl, &m).await;
        audit_verify(&ctl.data.root, Some(&url));
        ctl.stop().await;
    }
}

/// A database a newer binary wrote is refused, saying so, on both engines;
/// nothing in it changes.
#[test]
fn a_database_from_a_newer_binary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ztmesh.db");
    drop(SqliteStore::open(&db).unwrap());
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", SQLITE_SCHEMA_VERSION + 1)
        .unwrap();
    let e = SqliteStore::open(&db).err().expect("refused").to_string();
    assert!(e.contains("use the newer binary"), "{e}");
    assert!(
        e.contains(&format!("version {}", SQLITE_SCHEMA_VERSION + 1)),
        "{e}"
    );
    assert_eq!(
        sqlite_version(&db),
        SQLITE_SCHEMA_VERSION + 1,
        "left as it was"
    );

    let Some(cluster) = PgCluster::from_env() else {
        return;
    };
    let (name, options, _) = cluster.fresh("newer");
    drop(PgStore::connect(options.clone()).unwrap());
    let newer = POSTGRES_SCHEMA_VERSION + 1;
    let out = cluster.psql(
        &name,
        &["-c", &format!("UPDATE ztmesh_schema SET version = {newer}")],
    );
    assert!(out.status.success(), "{out:?}");
    let e = PgStore::connect(options)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("use the newer binary"), "{e}");
    assert!(e.contains(&format!("version {newer}")), "{e}");
}
