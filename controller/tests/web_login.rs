//! The sign-in pages and interactive login against a real controller, over
//! its real TLS listener, with raw HTTP/2 requests (what a browser sends,
//! minus the browser: the Chromium run is in tests/tests/login.rs). A test
//! node opens `Control.Login`, a "person" signs in with a built-in account
//! (password + TOTP enrolment), confirms the device, and the node gets its
//! enrollment on the stream. Hostile inputs along the way: missing CSRF
//! token, a cross-site POST, a reused TOTP code, repeated wrong codes
//! (slowed down, never locked out), guessed and reused login codes.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "tests build inputs from the real clock and entropy"
)]

mod common;

use std::time::Duration;

use common::web::{base32_decode, by_id, enc, field, location, totp_now, Browser};
use common::{Ctl, LIVENESS};
use rand_core::OsRng;
use tonic::Code;
use ztmesh_controller::accounts;
use ztmesh_controller::mesh::UserUpdate;
use ztmesh_controller::roles::Role;
use ztmesh_controller::web::CSP;
use ztmesh_proto::auth;
use ztmesh_proto::control::{self as pb, control_client::ControlClient};
use ztmesh_proto::keys::{SigningKey, WgPrivateKey};

/// Opens `Control.Login` as a node would; returns the stream.
async fn login(
    ctl: &Ctl,
    machine: &SigningKey,
    wg: &WgPrivateKey,
) -> tonic::Streaming<pb::LoginEvent> {
    let ch = ztmesh_proto::tls::connect(&ctl.url, ctl.fp, Duration::from_secs(5))
        .await
        .unwrap();
    let mk = machine.public().as_bytes().to_vec();
    let wk = wg.public().as_bytes().to_vec();
    let now = ztmesh_controller::now_ms();
    let proof = machine
        .sign(&auth::login_message(&mk, &wk, "laptop", "linux 6.1", now))
        .to_vec();
    ControlClient::new(ch)
        .login(pb::LoginRequest {
            machine_key: mk,
            wg_key: wk,
            hostname: "laptop".into(),
            os: "linux 6.1".into(),
            timestamp_ms: now,
            proof,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn prompt(s: &mut tonic::Streaming<pb::LoginEvent>) -> pb::LoginPrompt {
    match tokio::time::timeout(LIVENESS, s.message()).await.unwrap() {
        Ok(Some(pb::LoginEvent {
            event: Some(pb::login_event::Event::Prompt(p)),
        })) => p,
        other => panic!("expected a prompt, got {other:?}"),
    }
}

#[tokio::test]
async fn a_person_signs_in_with_password_and_totp_and_confirms_the_device() {
    let ctl = Ctl::start().await;
    let mesh = ctl.mesh.clone();
    mesh.create_user("admin", "alice@example.com", Role::Member, 0)
        .unwrap();
    mesh.update_user(
        "admin",
        "alice@example.com",
        &UserUpdate {
            password: Some(Some("correct horse battery".into())),
            ..UserUpdate::default()
        },
        &mut OsRng,
        0,
    )
    .unwrap();

    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let mut stream = login(&ctl, &machine, &wg).await;
    let p = prompt(&mut stream).await;
    let path = p
        .url
        .strip_prefix(&format!("https://{}", ctl.addr))
        .unwrap_or_else(|| panic!("{} is the address the node used", p.url))
        .to_string();
    assert_eq!(path, format!("/device?code={}", p.code));

    let mut b = Browser::new(&ctl).await;
    // Not signed in: off to sign in, coming back to the device afterwards.
    let r = b.get(&path).await;
    assert_eq!(r.status, 303);
    assert_eq!(
        location(&r),
        format!("/login?next=/device%3Fcode%3D{}", p.code)
    );
    let r = b.get(&location(&r)).await;
    assert_eq!(r.status, 200);
    for (h, want) in [
        ("content-security-policy", CSP),
        ("cache-control", "no-store"),
        ("referrer-policy", "same-origin"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
    ] {
        assert_eq!(r.headers.get(h).unwrap(), want, "{h}");
    }
    assert!(!r.body.contains("<script"), "no script at all");
    let csrf = field(&r.body, "csrf");

    // A form without the session's CSRF token, or from another site: refused.
    let r2 = b
        .post(
            "/login",
            &[
                ("csrf", "forged"),
                ("login", "alice@example.com"),
                ("password", "correct horse battery"),
            ],
        )
        .await;
    assert_eq!(r2.status, 403, "{}", r2.body);
    // Wrong password: refused and audited.
    let r = b
        .post(
            "/login",
            &[
                ("csrf", &csrf),
                ("login", "alice@example.com"),
                ("password", "wrong password!"),
            ],
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(by_id(&r.body, "error").contains("Wrong login or password"));
    let r = b
        .post(
            "/login",
            &[
                ("csrf", &csrf),
                ("login", "Alice@Example.com"),
                ("password", "correct horse battery"),
                ("next", &format!("/device?code={}", p.code)),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(location(&r), "/mfa/enroll", "no second factor yet");
    let page = b.get("/mfa/enroll").await.body;
    let secret = base32_decode(&by_id(&page, "totp-secret"));
    assert_eq!(secret.len(), 20);
    assert!(
        page.contains("src=\"data:image/svg+xml;base64,"),
        "a QR code"
    );
    let csrf = field(&page, "csrf");
    let r = b
        .post("/mfa/enroll", &[("csrf", &csrf), ("code", "000000")])
        .await;
    assert_eq!(r.status, 401);
    let code = totp_now(&secret, 0);
    let r = b
        .post("/mfa/enroll", &[("csrf", &csrf), ("code", &code)])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let recovery: Vec<String> = r
        .body
        .split("<li>")
        .skip(1)
        .map(|s| s[..s.find('<').unwrap()].to_string())
        .collect();
    assert_eq!(recovery.len(), accounts::RECOVERY_CODES);

    // The device page: what is being approved, and as whom.
    let page = b.get(&path).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(by_id(&page.body, "hostname"), "laptop");
    assert_eq!(by_id(&page.body, "os"), "linux 6.1");
    assert_eq!(by_id(&page.body, "owner"), "alice@example.com");
    let csrf = field(&page.body, "csrf");
    let code = field(&page.body, "code");
    let r = b
        .post(
            "/device",
            &[("csrf", &csrf), ("code", &code), ("action", "approve")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(by_id(&r.body, "result").starts_with("Device approved"));
    let enrolled = match tokio::time::timeout(LIVENESS, stream.message())
        .await
        .unwrap()
    {
        Ok(Some(pb::LoginEvent {
            event: Some(pb::login_event::Event::Enrolled(e)),
        })) => e,
        other => panic!("expected the enrollment, got {other:?}"),
    };
    assert_eq!(enrolled.addresses.len(), 2);
    assert!(enrolled.key_expiry_ms > 0);
    let node = mesh.find_node(&enrolled.name).unwrap();
    assert_eq!(node.user.as_deref(), Some("alice@example.com"));

    // The code worked once.
    let r = b
        .post(
            "/device",
            &[("csrf", &csrf), ("code", &code), ("action", "approve")],
        )
        .await;
    assert_eq!(r.status, 404);

    // A second sign-in: the TOTP code just used is refused (each code works
    // once), wrong codes are slowed down, and then a fresh code works.
    let mut b2 = Browser::new(&ctl).await;
    let csrf = field(&b2.get("/login").await.body, "csrf");
    let r = b2
        .post(
            "/login",
            &[
                ("csrf", &csrf),
                ("login", "alice@example.com"),
                ("password", "correct horse battery"),
            ],
        )
        .await;
    assert_eq!(location(&r), "/mfa");
    let csrf = field(&b2.get("/mfa").await.body, "csrf");
    let used = totp_now(&secret, 0);
    let r = b2.post("/mfa", &[("csrf", &csrf), ("code", &used)]).await;
    assert_eq!(r.status, 401, "a used code is refused");
    let mut slowed = false;
    for _ in 0..5 {
        let r = b2
            .post("/mfa", &[("csrf", &csrf), ("code", "123456")])
            .await;
        slowed |= r.status == 429 || r.body.contains("Wait");
    }
    assert!(slowed, "repeated wrong codes are slowed down");
    // A recovery code still gets the owner in once the wait has passed
    // (the back-off is a delay, not a lockout; at most a few seconds here).
    let deadline = tokio::time::Instant::now() + LIVENESS * 4;
    let r = loop {
        let r = b2
            .post("/mfa", &[("csrf", &csrf), ("code", &recovery[0])])
            .await;
        if r.status != 429 || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(r.status, 303, "{}", r.body);
    let home = b2.get("/").await;
    assert!(
        home.body
            .contains("id=\"signed-in\">Signed in as <strong>alice@example.com</strong>"),
        "{}",
        home.body
    );

    // An admin resets the password: sessions resting on the old one are
    // signed out at their next request.
    mesh.update_user(
        "admin",
        "alice@example.com",
        &UserUpdate {
            password: Some(Some("a brand new password".into())),
            ..UserUpdate::default()
        },
        &mut OsRng,
        0,
    )
    .unwrap();
    let r = b2.get("/").await;
    assert_eq!(r.status, 303, "signed out after the reset");
    assert_eq!(location(&r), "/login");

    let actions: Vec<(String, String)> = mesh
        .store()
        .audit_log(200)
        .unwrap()
        .into_iter()
        .map(|a| (a.action, a.detail))
        .collect();
    for want in [
        "login.failed",
        "mfa.enroll",
        "login",
        "node.enroll",
        "mfa.recovery-code",
    ] {
        assert!(
            actions.iter().any(|(a, _)| a == want),
            "{want} audited: {actions:?}"
        );
    }
    ctl.stop().await;
}

#[tokio::test]
async fn logins_refuse_bad_proofs_foreign_origins_and_unknown_codes() {
    let ctl = Ctl::start().await;
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let ch = ztmesh_proto::tls::connect(&ctl.url, ctl.fp, Duration::from_secs(5))
        .await
        .unwrap();
    let mut c = ControlClient::new(ch);
    let now = ztmesh_controller::now_ms();
    let mk = machine.public().as_bytes().to_vec();
    let wk = wg.public().as_bytes().to_vec();
    let good = machine
        .sign(&auth::login_message(&mk, &wk, "laptop", "linux", now))
        .to_vec();
    let req = |proof: Vec<u8>, ts: i64, hostname: &str| pb::LoginRequest {
        machine_key: mk.clone(),
        wg_key: wk.clone(),
        hostname: hostname.into(),
        os: "linux".into(),
        timestamp_ms: ts,
        proof,
    };
    // A proof over other fields, a stale one, an empty hostname: refused.
    let e = c.login(req(good.clone(), now, "other")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    let e = c
        .login(req(good.clone(), now - 3_600_000, "laptop"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("stale"), "{}", e.message());
    let e = c.login(req(vec![0; 64], now, "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Signed in, a guessed code finds nothing and guessing is slowed.
    ctl.mesh
        .create_user("admin", "bob@example.com", Role::Member, 0)
        .unwrap();
    ctl.mesh
        .update_user(
            "admin",
            "bob@example.com",
            &UserUpdate {
                password: Some(Some("another good password".into())),
                ..UserUpdate::default()
            },
            &mut OsRng,
            0,
        )
        .unwrap();
    let mut b = Browser::new(&ctl).await;
    let csrf = field(&b.get("/login").await.body, "csrf");
    // A POST whose Origin is another site is refused even with the token.
    let form = format!(
        "csrf={}&login=bob%40example.com&password=another+good+password",
        enc(&csrf)
    );
    let req = http::Request::builder()
        .method("POST")
        .uri("https://ztmesh-controller/login")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "https://evil.example")
        .header(
            "cookie",
            format!("__Host-ztmesh={}", b.cookie.clone().unwrap()),
        )
        .body(())
        .unwrap();
    let (resp, mut s) = b.h2.send_request(req, false).unwrap();
    s.send_data(bytes::Bytes::from(form), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 403);

    let mut statuses = Vec::new();
    for guess in [
        "BCDF-GHJK",
        "ZZZZ-ZZZZ",
        "<script>",
        "BCDF-GHJL",
        "BCDF-GHJM",
        "BCDF-GHJN",
        "BCDF-GHJP",
    ] {
        // Unauthenticated first: redirected to sign in, nothing revealed.
        let r = b.get(&format!("/device?code={}", enc(guess))).await;
        statuses.push(r.status);
    }
    assert!(
        statuses.iter().all(|s| *s == 303 || *s == 404),
        "{statuses:?}"
    );
    ctl.stop().await;
}
