//! The admin console against a real controller over its real TLS listener,
//! with raw HTTP/2 requests (the Chromium run is tests/tests/console.rs):
//! every page as each role sees it, the actions going through the admin API
//! as the signed-in person (audited under their name), and what a hostile
//! page, a lesser role or a stale session tries: a form without the CSRF
//! token or from another site, an auditor posting a change, an expired
//! session — each refused with nothing changed.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "tests build inputs from the real clock and entropy"
)]

mod common;

use std::time::Duration;

use common::web::{base32_decode, by_id, field, location, totp_now, Browser};
use common::{enroll, Ctl};
use rand_core::OsRng;
use ztmesh_controller::mesh::{MeshConfig, UserUpdate};
use ztmesh_controller::roles::Role;
use ztmesh_controller::web::CSP;

const PASSWORD: &str = "correct horse battery";

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "proto": "tcp", "dst": ["tag:db:5432"]},
  ],
}"#;

fn user(ctl: &Ctl, login: &str, role: Role) {
    ctl.mesh.create_user("admin", login, role, 0).unwrap();
    ctl.mesh
        .update_user(
            "admin",
            login,
            &UserUpdate {
                password: Some(Some(PASSWORD.into())),
                ..UserUpdate::default()
            },
            &mut OsRng,
            0,
        )
        .unwrap();
}

/// A browser signed in as `login` (password, then a TOTP factor enrolled).
async fn signed_in(ctl: &Ctl, login: &str) -> Browser {
    let mut b = Browser::new(ctl).await;
    let csrf = field(&b.get("/login").await.body, "csrf");
    let r = b
        .post(
            "/login",
            &[("csrf", &csrf), ("login", login), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(location(&r), "/mfa/enroll", "{}", r.body);
    let page = b.get("/mfa/enroll").await.body;
    let secret = base32_decode(&by_id(&page, "totp-secret"));
    let csrf = field(&page, "csrf");
    let r = b
        .post(
            "/mfa/enroll",
            &[("csrf", &csrf), ("code", &totp_now(&secret, 0))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    b
}

/// The audit rows with `action`, as (actor, target).
fn audited(ctl: &Ctl, action: &str) -> Vec<(String, String)> {
    ctl.mesh
        .store()
        .audit_log(1000)
        .unwrap()
        .into_iter()
        .filter(|a| a.action == action)
        .map(|a| (a.actor, a.target))
        .collect()
}

#[tokio::test]
async fn the_console_acts_through_the_admin_api_as_the_person_and_refuses_forged_and_lesser_posts()
{
    let ctl = Ctl::start().await;
    ctl.set_policy(POLICY).await;
    let key = ctl.key("", &["tag:web"], true).await;
    enroll(&ctl, &key, "web1").await.unwrap();
    let db_key = ctl.key("", &["tag:db"], false).await;
    enroll(&ctl, &db_key, "db1").await.unwrap();
    user(&ctl, "root@example.com", Role::Admin);
    user(&ctl, "audit@example.com", Role::Auditor);

    // Not signed in: every page sends the person to sign in, and back.
    let mut anon = Browser::new(&ctl).await;
    for page in ["/nodes", "/audit", "/policy", "/graph"] {
        let r = anon.get(page).await;
        assert_eq!(r.status, 303, "{page}");
        assert_eq!(location(&r), format!("/login?next={page}"));
    }
    let db_id = ctl.mesh.find_node("db1").unwrap().id;
    let r = anon.get("/node?id=1").await;
    assert_eq!(location(&r), "/login?next=/nodes");

    let mut admin = signed_in(&ctl, "root@example.com").await;
    let r = admin.get("/nodes").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers.get("content-security-policy").unwrap(), CSP);
    assert!(!r.body.contains("<script"));
    assert!(r.body.contains("data-node=\"web1\"") && r.body.contains("data-node=\"db1\""));
    let csrf = field(&r.body, "csrf");
    // Reads are audited under the person's name, as the API's are.
    assert!(audited(&ctl, "api.read")
        .iter()
        .any(|(actor, _)| actor == "user:root@example.com"));

    // A form without the session's token, or posted from another site:
    // refused before the API is called; the node is still there.
    let r = admin
        .post(
            "/node/action",
            &[
                ("csrf", "forged"),
                ("node", "web1"),
                ("op", "delete"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(ctl.mesh.find_node("web1").is_ok(), "nothing deleted");
    let r = admin
        .post(
            "/node/action",
            &[("csrf", &csrf), ("node", "web1"), ("op", "delete")],
        )
        .await;
    assert_eq!(r.status, 400, "unconfirmed: {}", r.body);
    let r = admin
        .post(
            "/node/action",
            &[
                ("csrf", &csrf),
                ("node", "web1"),
                ("op", "delete"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(ctl.mesh.find_node("web1").is_err(), "deleted");
    assert_eq!(location(&r), "/nodes?done=deleted");
    assert_eq!(
        audited(&ctl, "node.delete"),
        vec![("user:root@example.com".to_string(), "web1".to_string())]
    );

    // Quarantine with a reason, then release: each audited as the person.
    let r = admin
        .post(
            "/node/action",
            &[
                ("csrf", &csrf),
                ("node", "db1"),
                ("op", "quarantine"),
                ("reason", "lost laptop"),
            ],
        )
        .await;
    assert_eq!(location(&r), format!("/node?id={db_id}&done=quarantined"));
    let page = admin.get(&location(&r)).await.body;
    assert!(
        page.contains("by user:root@example.com: lost laptop"),
        "{page}"
    );
    assert!(page.contains("id=\"release\""));
    assert!(ctl.mesh.find_node("db1").unwrap().quarantine.is_some());
    let r = admin
        .post(
            "/node/action",
            &[("csrf", &csrf), ("node", "db1"), ("op", "release")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(ctl.mesh.find_node("db1").unwrap().quarantine.is_none());

    // An auditor sees everything and can change nothing: no forms, and a
    // forged post with a valid token is refused by the API and audited.
    let mut auditor = signed_in(&ctl, "audit@example.com").await;
    let db_page = format!("/node?id={db_id}");
    for page in [
        "/nodes", &db_page, "/users", "/keys", "/policy", "/graph", "/audit", "/flows",
    ] {
        let r = auditor.get(page).await;
        assert_eq!(r.status, 200, "{page}: {}", r.body);
        let posts = r.body.matches("method=\"post\"").count();
        assert_eq!(posts, 1, "{page}: only the sign-out form");
    }
    let csrf_a = field(&auditor.get("/keys").await.body, "csrf");
    let keys_before = audited(&ctl, "authkey.create").len();
    let r = auditor
        .post("/keys/create", &[("csrf", &csrf_a), ("tags", "tag:web")])
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(by_id(&r.body, "error").contains("needs network-admin or admin"));
    let r = auditor
        .post(
            "/policy/apply",
            &[("csrf", &csrf_a), ("text", "{}"), ("version", "1")],
        )
        .await;
    assert_eq!(r.status, 403);
    let r = auditor
        .post(
            "/users/role",
            &[
                ("csrf", &csrf_a),
                ("login", "audit@example.com"),
                ("role", "admin"),
            ],
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(audited(&ctl, "authkey.create").len(), keys_before);
    assert_eq!(
        ctl.mesh.policy_row().unwrap().version,
        1,
        "policy unchanged"
    );
    let denied = audited(&ctl, "api.denied");
    assert!(
        denied
            .iter()
            .any(|(a, t)| a == "user:audit@example.com" && t == "CreateAuthKey"),
        "{denied:?}"
    );
    // (A role refused is audited at most once per actor per minute.)

    // The admin's auth key: shown once, on the answer to the create.
    let r = admin
        .post(
            "/keys/create",
            &[
                ("csrf", &csrf),
                ("tags", "tag:web"),
                ("expiry_secs", "3600"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let secret = by_id(&r.body, "new-key");
    assert!(secret.starts_with("ztmk1."), "{secret}");
    assert!(
        !admin.get("/keys").await.body.contains(&secret),
        "never shown again"
    );
    assert!(enroll(&ctl, &secret, "web2").await.is_ok(), "the key works");
    // No tags: a key for the person's own devices.
    let r = admin
        .post(
            "/keys/create",
            &[("csrf", &csrf), ("tags", ""), ("expiry_secs", "3600")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let own = by_id(&r.body, "new-key");
    enroll(&ctl, &own, "laptop").await.unwrap();
    let row = ctl.mesh.find_node("laptop").unwrap();
    assert_eq!(row.user.as_deref(), Some("root@example.com"));
    // A node named like another node's id is still itself in the console.
    let k = ctl.key("", &["tag:web"], false).await;
    let digits = format!("{db_id}");
    let n = enroll(&ctl, &k, &digits).await.unwrap();
    assert_eq!(n.name, digits);
    assert_ne!(n.id, db_id);
    let list = admin.get("/nodes").await.body;
    assert!(
        list.contains(&format!(
            "data-node=\"{digits}\"><td><a href=\"/node?id={}\">",
            n.id
        )),
        "{list}"
    );
    // Bodies: a stranger's post is refused before its body is read; a
    // signed-in one is bounded (only a policy edit may be large).
    let big = "x".repeat(20 * 1024);
    let r = anon
        .post(
            "/node/action",
            &[("csrf", "c"), ("node", "db1"), ("op", &big)],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = admin
        .post(
            "/node/action",
            &[("csrf", &csrf), ("node", "db1"), ("op", &big)],
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.body);

    // Policy: a broken edit shows the error in place and changes nothing;
    // a good one shows the plan, then applies.
    let broken = POLICY.replace("tag:db:5432", "tag:nope:5432");
    let r = admin
        .post(
            "/policy/plan",
            &[("csrf", &csrf), ("text", &broken), ("version", "1")],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("policy.hujson:4:"),
        "FILE:LINE:COL: {}",
        r.body
    );
    assert!(r.body.contains("<li id=\"L4\" class=\"bad\">"));
    assert!(!r.body.contains("id=\"apply\""));
    assert_eq!(ctl.mesh.policy_row().unwrap().version, 1);
    let good = POLICY.replace("tag:db:5432", "tag:db:5432,6432");
    let r = admin
        .post(
            "/policy/plan",
            &[("csrf", &csrf), ("text", &good), ("version", "1")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("<td class=\"gain\">tcp:6432</td>"),
        "{}",
        r.body
    );
    assert_eq!(
        ctl.mesh.policy_row().unwrap().version,
        1,
        "a plan changes nothing"
    );
    let text = field(&r.body, "text")
        .replace("&#10;", "\n")
        .replace("&quot;", "\"");
    let r = admin
        .post(
            "/policy/apply",
            &[("csrf", &csrf), ("text", &text), ("version", "1")],
        )
        .await;
    assert_eq!(location(&r), "/policy?done=applied", "{}", r.body);
    let row = ctl.mesh.policy_row().unwrap();
    assert_eq!((row.version, row.text.as_str()), (2, good.as_str()));
    // Applying a plan made against an older version is refused.
    let r = admin
        .post(
            "/policy/apply",
            &[("csrf", &csrf), ("text", POLICY), ("version", "1")],
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(ctl.mesh.policy_row().unwrap().version, 2);

    // Explain, the graph and the filtered audit log read the same state.
    let r = admin
        .get("/policy/explain?src=web2&dst=db1&port=6432&proto=tcp")
        .await;
    assert!(
        r.body
            .contains("<strong>Allowed</strong> by <code>policy.hujson:4</code>"),
        "{}",
        r.body
    );
    let g = admin.get("/graph").await.body;
    assert!(
        g.contains("<svg id=\"graph\"") && g.contains(">tcp:5432,6432</text>"),
        "{g}"
    );
    let a = admin
        .get("/audit?actor=user%3Aroot%40example.com&action=node.*")
        .await
        .body;
    assert!(
        a.contains("data-action=\"node.delete\"") && a.contains("data-action=\"node.quarantine\"")
    );
    assert!(
        !a.contains("data-action=\"policy.set\""),
        "filtered by action"
    );

    // Roles are the admin's to change, through the console too.
    let r = admin
        .post(
            "/users/role",
            &[
                ("csrf", &csrf),
                ("login", "audit@example.com"),
                ("role", "network-admin"),
            ],
        )
        .await;
    assert_eq!(location(&r), "/users?done=role");
    // The auditor's session rested on the old role: it is signed out.
    assert_eq!(auditor.get("/nodes").await.status, 303);
    ctl.stop().await;
}

#[tokio::test]
async fn an_idle_console_session_expires_and_its_forms_with_it() {
    let ctl = Ctl::start_with(MeshConfig {
        web_session_idle_ms: 3_000,
        ..MeshConfig::default()
    })
    .await;
    user(&ctl, "root@example.com", Role::Admin);
    let mut b = signed_in(&ctl, "root@example.com").await;
    let page = b.get("/keys").await;
    assert_eq!(page.status, 200);
    let csrf = field(&page.body, "csrf");
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let r = b.get("/keys").await;
    assert_eq!(r.status, 303, "expired");
    assert_eq!(location(&r), "/login?next=/keys");
    let r = b
        .post("/keys/create", &[("csrf", &csrf), ("tags", "")])
        .await;
    assert_eq!(r.status, 403, "the old form is stale: {}", r.body);
    assert!(audited(&ctl, "authkey.create").is_empty(), "no key made");
    ctl.stop().await;
}
