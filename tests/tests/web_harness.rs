//! Self-test of the browser-login harness (`ztmesh_tests::web`): a real
//! OpenID provider and a real headless Chromium, each in its own namespace.
//!
//! ```text
//!                  switch ns: br0
//!          ┌──────────────┴──────────────┐
//!   ns "idp" eth0 198.18.0.1       ns "user" eth0 198.18.0.2
//!   idp.mjs on :8443 (HTTPS,       Chromium (driver.mjs), curl;
//!   leaf of a test CA)             nothing listens on :8444, so the
//!                                  redirect to the client's callback
//!                                  fails and its URL (with the code) is kept
//! ```
//!
//! The last test runs a browser alone in a namespace, on `data:` pages.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};
use ztmesh_tests::web::{
    https_get, https_post_form, jwt_claims_unverified, jwt_verify_rs256, query_param,
    AuthorizationRequest, Browser, IdTokenTamper, Idp, IdpClient, IdpConfig, IdpUser, Pkce,
    TamperSignature, TestCa, ViolationKind, WebTools,
};
use ztmesh_tests::{require_root_or_skip, Netns, TempDir, Topology};

const CLIENT: &str = "ztmesh-test";
const SECRET: &str = "client-secret-for-tests";
const PUBLIC_CLIENT: &str = "ztmesh-cli";
/// The user namespace's own address, on a port nothing listens on.
const REDIRECT: &str = "https://198.18.0.2:8444/callback";
const IDP_PORT: u16 = 8443;
const ID_TOKEN_TTL: u32 = 120;

fn ready() -> bool {
    require_root_or_skip() && WebTools::require_or_skip()
}

fn alice() -> IdpUser {
    let mut alice = IdpUser::new("alice", "correct horse battery");
    alice.groups = vec!["eng".to_owned(), "ops".to_owned()];
    alice.acr = Some("urn:example:mfa".to_owned());
    alice
}

fn start_idp(topo: &Topology, dir: &TempDir, clients: Vec<IdpClient>) -> Idp {
    let config = IdpConfig {
        clients,
        users: vec![alice()],
        id_token_ttl_secs: ID_TOKEN_TTL,
        ..IdpConfig::default()
    };
    let addr = SocketAddr::new(IpAddr::V4(topo.addr("idp")), IDP_PORT);
    Idp::start(topo.ns("idp"), addr, &config, dir.path()).expect("start the OpenID provider")
}

fn discovery_url(idp: &Idp) -> String {
    format!("{}/.well-known/openid-configuration", idp.issuer())
}

/// The URL of the last load that failed: where the provider sent the browser.
fn last_failed_url(browser: &mut Browser) -> String {
    let navs = browser.navigations().expect("navigations");
    navs.failed
        .last()
        .unwrap_or_else(|| panic!("no failed load; requests were {:?}", navs.urls))
        .url
        .clone()
}

fn callback_code(url: &str, state: &str, issuer: &str) -> String {
    assert!(url.starts_with(&format!("{REDIRECT}?")), "{url}");
    assert_eq!(query_param(url, "state").as_deref(), Some(state), "{url}");
    assert_eq!(query_param(url, "iss").as_deref(), Some(issuer), "{url}");
    query_param(url, "code").unwrap_or_else(|| panic!("no code in {url}"))
}

fn token_form<'a>(code: &'a str, verifier: &'a str) -> [(&'static str, &'a str); 4] {
    [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier),
    ]
}

#[test]
fn code_flow_with_pkce_in_chromium_yields_an_id_token_with_mfa_claims() {
    if !ready() {
        return;
    }
    let topo = Topology::new(&["idp", "user"]);
    let dir = TempDir::new("web-idp");
    let idp = start_idp(
        &topo,
        &dir,
        vec![IdpClient::confidential(CLIENT, SECRET, REDIRECT)],
    );
    assert_eq!(idp.issuer(), "https://198.18.0.1:8443");
    let user = topo.ns("user");
    let mut browser = Browser::launch(user, &[idp.spki().to_owned()]).expect("launch Chromium");

    // Discovery, as the browser and as a relying party (curl, CA file) see it.
    let nav = browser
        .goto(&discovery_url(&idp))
        .expect("browser loads discovery");
    assert_eq!(nav.status, Some(200));
    let seen: Value = serde_json::from_str(&browser.text("body").unwrap()).unwrap();
    assert_eq!(seen["issuer"], idp.issuer());
    assert_eq!(seen["code_challenge_methods_supported"], json!(["S256"]));
    let discovery = https_get(user, idp.ca_path(), &discovery_url(&idp))
        .expect("curl trusts the provider's CA")
        .json()
        .unwrap();
    assert_eq!(discovery["issuer"], idp.issuer());
    let token_endpoint = discovery["token_endpoint"].as_str().unwrap().to_owned();

    // No PKCE: sent back to the client with an error, and no code.
    let no_pkce = idp.authorization_url(&AuthorizationRequest {
        client_id: CLIENT,
        redirect_uri: REDIRECT,
        scope: "openid email groups",
        state: "state-0",
        nonce: "nonce-0",
        code_challenge: None,
    });
    let err = browser.goto(&no_pkce).unwrap_err();
    assert!(err.contains("ERR_CONNECTION_REFUSED"), "{err}");
    let refused = last_failed_url(&mut browser);
    assert!(refused.starts_with(REDIRECT), "{refused}");
    assert_eq!(
        query_param(&refused, "error").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(query_param(&refused, "code"), None);

    // Sign in: a wrong password first, then the right one.
    let pkce = Pkce::generate();
    let login = idp.authorization_url(&AuthorizationRequest {
        client_id: CLIENT,
        redirect_uri: REDIRECT,
        scope: "openid email groups",
        state: "state-1",
        nonce: "nonce-1",
        code_challenge: Some(&pkce.challenge),
    });
    let nav = browser.goto(&login).expect("authorization request");
    assert_eq!(nav.status, Some(200));
    assert!(nav.url.contains("/interaction/"), "{}", nav.url);
    browser.fill("#login", "alice").unwrap();
    browser.fill("#password", "not the password").unwrap();
    let click = browser.click("#submit").unwrap();
    assert!(click.navigated && click.failed.is_none(), "{click:?}");
    assert_eq!(browser.text("#error").unwrap(), "wrong login or password");
    assert_eq!(browser.status().unwrap(), Some(401));
    browser.fill("#login", "alice").unwrap();
    browser.fill("#password", "correct horse battery").unwrap();
    let click = browser.click("#submit").unwrap();
    let callback = click.failed.expect("redirected to the client's callback");
    assert!(
        callback.error.contains("ERR_CONNECTION_REFUSED"),
        "{callback:?}"
    );
    let code = callback_code(&callback.url, "state-1", idp.issuer());

    // The relying party's side: exchange the code, read the ID token.
    let reply = https_post_form(
        user,
        idp.ca_path(),
        &token_endpoint,
        Some((CLIENT, SECRET)),
        &token_form(&code, &pkce.verifier),
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let tokens = reply.json().unwrap();
    let claims = jwt_claims_unverified(tokens["id_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["iss"], idp.issuer());
    assert_eq!(claims["aud"], CLIENT);
    assert_eq!(claims["sub"], "sub-alice");
    assert_eq!(claims["nonce"], "nonce-1");
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["email_verified"], true);
    assert_eq!(claims["groups"], json!(["eng", "ops"]));
    assert_eq!(claims["amr"], json!(["pwd", "otp"]));
    assert_eq!(claims["acr"], "urn:example:mfa");
    let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(lifetime, u64::from(ID_TOKEN_TTL));

    // The same code twice: refused.
    let replay = https_post_form(
        user,
        idp.ca_path(),
        &token_endpoint,
        Some((CLIENT, SECRET)),
        &token_form(&code, &pkce.verifier),
    )
    .unwrap();
    assert_eq!(replay.status, 400, "{}", replay.body);
    assert_eq!(replay.json().unwrap()["error"], "invalid_grant");

    // The provider's session signs the next request in without a form; that
    // code with another request's verifier, or a wrong client secret: refused.
    let pkce2 = Pkce::generate();
    let again = idp.authorization_url(&AuthorizationRequest {
        state: "state-2",
        nonce: "nonce-2",
        code_challenge: Some(&pkce2.challenge),
        client_id: CLIENT,
        redirect_uri: REDIRECT,
        scope: "openid email groups",
    });
    let err = browser.goto(&again).unwrap_err();
    assert!(err.contains("ERR_CONNECTION_REFUSED"), "{err}");
    let code2 = callback_code(&last_failed_url(&mut browser), "state-2", idp.issuer());
    let bad_secret = https_post_form(
        user,
        idp.ca_path(),
        &token_endpoint,
        Some((CLIENT, "wrong-secret")),
        &token_form(&code2, &pkce2.verifier),
    )
    .unwrap();
    assert_eq!(bad_secret.status, 401, "{}", bad_secret.body);
    assert_eq!(bad_secret.json().unwrap()["error"], "invalid_client");
    let bad_verifier = https_post_form(
        user,
        idp.ca_path(),
        &token_endpoint,
        Some((CLIENT, SECRET)),
        &token_form(&code2, &pkce.verifier),
    )
    .unwrap();
    assert_eq!(bad_verifier.status, 400, "{}", bad_verifier.body);
    assert_eq!(bad_verifier.json().unwrap()["error"], "invalid_grant");

    // The provider's pages ran no script and broke no policy.
    let problems: Vec<_> = browser
        .violations()
        .unwrap()
        .into_iter()
        .filter(|v| v.kind != ViolationKind::Resource)
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn consent_page_and_cancel_are_driven_by_their_buttons() {
    if !ready() {
        return;
    }
    let topo = Topology::new(&["idp", "user"]);
    let dir = TempDir::new("web-idp");
    let mut client = IdpClient::public(PUBLIC_CLIENT, REDIRECT);
    client.consent = true;
    let idp = start_idp(&topo, &dir, vec![client]);
    let user = topo.ns("user");
    let mut browser = Browser::launch(user, &[idp.spki().to_owned()]).expect("launch Chromium");
    let pkce = Pkce::generate();
    let request = |state| AuthorizationRequest {
        client_id: PUBLIC_CLIENT,
        redirect_uri: REDIRECT,
        scope: "openid email",
        state,
        nonce: "n",
        code_challenge: Some(&pkce.challenge),
    };

    // Cancel at the sign-in page: the client hears access_denied.
    browser
        .goto(&idp.authorization_url(&request("s-cancel")))
        .unwrap();
    let click = browser.click("#abort").unwrap();
    let back = click.failed.expect("sent back to the client");
    assert!(back.url.starts_with(REDIRECT), "{back:?}");
    assert_eq!(
        query_param(&back.url, "error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(query_param(&back.url, "state").as_deref(), Some("s-cancel"));

    // Sign in, then the consent page, then a code a public client redeems
    // with its verifier alone.
    browser
        .goto(&idp.authorization_url(&request("s-ok")))
        .unwrap();
    browser.fill("#login", "alice").unwrap();
    browser.fill("#password", "correct horse battery").unwrap();
    let click = browser.click("#submit").unwrap();
    assert!(click.failed.is_none(), "{click:?}");
    assert_eq!(browser.text("#client").unwrap(), PUBLIC_CLIENT);
    assert!(browser.text("#scopes").unwrap().contains("email"));
    let click = browser.click("#continue").unwrap();
    let back = click.failed.expect("sent back to the client");
    let code = callback_code(&back.url, "s-ok", idp.issuer());
    let token_endpoint = format!("{}/token", idp.issuer());
    let mut form = token_form(&code, &pkce.verifier).to_vec();
    form.push(("client_id", PUBLIC_CLIENT));
    let reply = https_post_form(user, idp.ca_path(), &token_endpoint, None, &form).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let claims =
        jwt_claims_unverified(reply.json().unwrap()["id_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["aud"], PUBLIC_CLIENT);
    assert_eq!(claims["email_verified"], true);
    assert_eq!(claims.get("groups"), None, "groups were not asked for");

    // The sign-in cookie the provider set is Secure and HttpOnly.
    let cookies = browser.cookies().unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name == "_session")
        .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert!(session.secure && session.http_only, "{session:?}");
}

#[test]
fn browser_pinned_to_another_key_refuses_the_idp() {
    if !ready() {
        return;
    }
    let topo = Topology::new(&["idp", "user"]);
    let dir = TempDir::new("web-idp");
    let idp = start_idp(
        &topo,
        &dir,
        vec![IdpClient::confidential(CLIENT, SECRET, REDIRECT)],
    );
    let user = topo.ns("user");
    let url = discovery_url(&idp);

    // A certificate for the same address from another CA: a different key.
    let (other_cert, _) = TestCa::new("other").leaf(IpAddr::V4(topo.addr("idp")));
    let other_pin = TestCa::spki_sha256_b64(&other_cert).unwrap();
    assert_ne!(other_pin, idp.spki());
    for pins in [vec![other_pin], Vec::new()] {
        let mut browser = Browser::launch(user, &pins).expect("launch Chromium");
        let err = browser.goto(&url).unwrap_err();
        assert!(
            err.contains("ERR_CERT_AUTHORITY_INVALID"),
            "pins {pins:?}: {err}"
        );
        assert_eq!(browser.status().unwrap(), None);
        assert_eq!(browser.count("#login").unwrap(), 0, "no provider page");
        drop(browser);
        assert_eq!(user.pids(), Vec::<i32>::new(), "Chromium left running");
    }

    // The same browser pinned to the provider's key loads it.
    let mut browser = Browser::launch(user, &[idp.spki().to_owned()]).expect("launch Chromium");
    assert_eq!(browser.goto(&url).unwrap().status, Some(200));
}

#[test]
fn page_problems_are_reported_so_a_clean_page_means_something() {
    if !ready() {
        return;
    }
    let ns = Netns::new("browser");
    let mut browser = Browser::launch(&ns, &[]).expect("launch Chromium");
    browser
        .goto(concat!(
            "data:text/html,<meta http-equiv=\"Content-Security-Policy\" content=\"script-src 'none'\">",
            "<script>document.title='ran'</script><p id=p>blocked</p>"
        ))
        .unwrap();
    assert_eq!(browser.text("#p").unwrap(), "blocked");
    let csp = browser.take_violations().unwrap();
    assert!(
        csp.iter()
            .any(|v| v.kind == ViolationKind::Csp && v.text.contains("script-src")),
        "{csp:?}"
    );
    assert!(browser.violations().unwrap().is_empty(), "taken");

    browser
        .goto("data:text/html,<script>console.error('oops'); throw new Error('boom')</script>")
        .unwrap();
    let found = browser.violations().unwrap();
    let kinds: Vec<ViolationKind> = found.iter().map(|v| v.kind).collect();
    assert!(kinds.contains(&ViolationKind::Console), "{found:?}");
    assert!(
        found
            .iter()
            .any(|v| v.kind == ViolationKind::PageError && v.text.contains("boom")),
        "{found:?}"
    );
}

/// Signs `login` in through the browser (a new visitor each time) and
/// redeems the code; returns the ID token.
fn sign_in_for_id_token(browser: &mut Browser, idp: &Idp, user: &Netns, login: &str) -> String {
    browser.clear_cookies().unwrap();
    let pkce = Pkce::generate();
    let url = idp.authorization_url(&AuthorizationRequest {
        client_id: CLIENT,
        redirect_uri: REDIRECT,
        scope: "openid email",
        state: login,
        nonce: "n",
        code_challenge: Some(&pkce.challenge),
    });
    browser.goto(&url).unwrap();
    browser.fill("#login", login).unwrap();
    browser.fill("#password", "pw").unwrap();
    let back = browser.click("#submit").unwrap().failed.expect("callback");
    let code = callback_code(&back.url, login, idp.issuer());
    let reply = https_post_form(
        user,
        idp.ca_path(),
        &format!("{}/token", idp.issuer()),
        Some((CLIENT, SECRET)),
        &token_form(&code, &pkce.verifier),
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json().unwrap()["id_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn tampering_users_get_the_id_tokens_a_relying_party_must_refuse() {
    if !ready() {
        return;
    }
    let topo = Topology::new(&["idp", "user"]);
    let dir = TempDir::new("web-idp");
    let tampered = |login: &str, tamper: IdTokenTamper| IdpUser {
        tamper: Some(tamper),
        ..IdpUser::new(login, "pw")
    };
    let mut other_aud = serde_json::Map::new();
    other_aud.insert("aud".to_owned(), json!("someone-else"));
    let config = IdpConfig {
        clients: vec![IdpClient::confidential(CLIENT, SECRET, REDIRECT)],
        users: vec![
            IdpUser::new("honest", "pw"),
            tampered(
                "late",
                IdTokenTamper {
                    shift_time_secs: -3600,
                    remove_claims: vec!["amr".to_owned()],
                    set_claims: other_aud,
                    ..IdTokenTamper::default()
                },
            ),
            tampered(
                "forged",
                IdTokenTamper {
                    signature: TamperSignature::ForeignKey,
                    ..IdTokenTamper::default()
                },
            ),
            tampered(
                "nokid",
                IdTokenTamper {
                    signature: TamperSignature::UnknownKid,
                    ..IdTokenTamper::default()
                },
            ),
            tampered(
                "unsigned",
                IdTokenTamper {
                    signature: TamperSignature::None,
                    ..IdTokenTamper::default()
                },
            ),
        ],
        ..IdpConfig::default()
    };
    let addr = SocketAddr::new(IpAddr::V4(topo.addr("idp")), IDP_PORT);
    let idp = Idp::start(topo.ns("idp"), addr, &config, dir.path()).expect("start the provider");
    let user = topo.ns("user");
    let discovery = https_get(user, idp.ca_path(), &discovery_url(&idp))
        .unwrap()
        .json()
        .unwrap();
    let jwks = https_get(user, idp.ca_path(), discovery["jwks_uri"].as_str().unwrap())
        .unwrap()
        .json()
        .unwrap();
    let mut browser = Browser::launch(user, &[idp.spki().to_owned()]).expect("launch Chromium");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let honest = sign_in_for_id_token(&mut browser, &idp, user, "honest");
    let claims = jwt_verify_rs256(&honest, &jwks).expect("the provider's own token verifies");
    assert!(claims["exp"].as_u64().unwrap() > now);
    assert_eq!(claims["aud"], CLIENT);
    assert_eq!(claims["amr"], json!(["pwd", "otp"]));

    let late = sign_in_for_id_token(&mut browser, &idp, user, "late");
    let claims = jwt_verify_rs256(&late, &jwks).expect("re-signed with the provider's key");
    assert!(claims["exp"].as_u64().unwrap() + 3000 < now, "{claims}");
    assert_eq!(claims["aud"], "someone-else");
    assert_eq!(claims.get("amr"), None);
    assert_eq!(claims["sub"], "sub-late");

    let forged = sign_in_for_id_token(&mut browser, &idp, user, "forged");
    let err = jwt_verify_rs256(&forged, &jwks).unwrap_err();
    assert!(err.contains("does not verify"), "{err}");
    assert_eq!(jwt_claims_unverified(&forged).unwrap()["sub"], "sub-forged");

    let nokid = sign_in_for_id_token(&mut browser, &idp, user, "nokid");
    let err = jwt_verify_rs256(&nokid, &jwks).unwrap_err();
    assert!(err.contains("no key with kid"), "{err}");

    let unsigned = sign_in_for_id_token(&mut browser, &idp, user, "unsigned");
    assert!(unsigned.ends_with('.'), "no signature: {unsigned}");
    let err = jwt_verify_rs256(&unsigned, &jwks).unwrap_err();
    assert!(err.contains("\"none\""), "{err}");
}
