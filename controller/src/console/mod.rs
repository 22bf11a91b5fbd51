//! The admin console: the mesh seen and run from a browser, on the sign-in
//! pages' web stack (`crate::web`: the session cookie, CSRF tokens, the
//! strict CSP, no script at all).
//!
//! Every page and every button calls the admin API in-process ([`Admin`],
//! the same [`AdminService`] as remote gRPC callers), as the signed-in
//! person ([`ConsoleActor`]): the role check, the refusal (PERMISSION_DENIED
//! naming the role needed) and the audit row are the API's, so the console
//! can do nothing the person's role could not do over gRPC. Forms a role
//! may not use are not shown, and posting them anyway is refused by the API
//! (and audited as `api.denied`). Pages are rendered by pure functions of
//! the API's answers (below the handlers); handlers only authenticate, call
//! and pick the page.

#![allow(
    clippy::result_large_err,
    reason = "the error of a page helper is the response to send at once; boxing it buys nothing"
)]

pub mod graph;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use tonic::{Code, Request, Status};
use ztmesh_proto::admin::{self as apb, admin_server::Admin};
use ztmesh_proto::time::ms_to_text;

use crate::api::{AdminService, ConsoleActor};
use crate::mesh::Actor;
use crate::roles::{Access, Role};
use crate::web::html::{esc, hidden};
use crate::web::{self, Web};

/// The console's state: the sign-in pages' sessions and the admin API.
pub struct Console {
    web: Arc<Web>,
    admin: AdminService,
}

/// The largest form the console takes, but for a policy edit.
const MAX_FORM: usize = 16 * 1024;
/// The largest policy edit (the admin API takes up to 4 MiB from a file).
const MAX_POLICY_FORM: usize = 1 << 20;
/// Policy errors listed at most (the rest are counted).
const MAX_ERRORS_SHOWN: usize = 200;
/// Rows a log page shows (newest first).
const LOG_ROWS: u32 = 200;

/// The console's routes, to be merged with the sign-in pages'.
pub fn router(web: Arc<Web>, admin: AdminService) -> Router {
    // Only a policy edit is large; every other form stays small.
    let policy_limit = DefaultBodyLimit::max(MAX_POLICY_FORM);
    Router::new()
        .route("/nodes", get(nodes))
        .route("/node", get(node_page))
        .route("/node/action", post(node_action))
        .route("/users", get(users))
        .route("/users/role", post(user_role))
        .route("/keys", get(keys))
        .route("/keys/create", post(key_create))
        .route("/keys/revoke", post(key_revoke))
        .route("/policy", get(policy_page))
        .route("/policy/plan", post(policy_plan).layer(policy_limit))
        .route("/policy/apply", post(policy_apply).layer(policy_limit))
        .route("/policy/explain", get(policy_explain))
        .route("/graph", get(graph_page))
        .route("/audit", get(audit))
        .route("/flows", get(flows))
        .layer(DefaultBodyLimit::max(MAX_FORM))
        .layer(axum::middleware::map_response(web::security_headers))
        .with_state(Arc::new(Console { web, admin }))
}

// ---- who is asking --------------------------------------------------------

/// The signed-in person a page is for.
struct Viewer {
    login: String,
    role: Role,
    csrf: String,
}

impl Viewer {
    fn may(&self, access: Access) -> bool {
        self.role.allows(access)
    }

    /// An admin API request made as this person.
    fn call<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.extensions_mut()
            .insert(ConsoleActor(Actor::user(&self.login, self.role)));
        r
    }
}

/// The person signed in, else a redirect to sign in (and back to `here`).
fn viewer(c: &Console, headers: &HeaderMap, here: &str) -> Result<Viewer, Response> {
    let sign_in = || web::redirect(&format!("/login?next={}", web::percent(here)), None);
    let id = web::cookie(headers).ok_or_else(sign_in)?;
    let (login, role) = web::current_user(&c.web, &id).ok_or_else(sign_in)?;
    let csrf = web::with_session(&c.web, &id, |s| s.csrf.clone()).ok_or_else(sign_in)?;
    Ok(Viewer { login, role, csrf })
}

/// A signed-in session, checked from the headers before a handler reads
/// its form: a stranger's post is refused before its body is read.
struct SignedIn;

impl axum::extract::FromRequestParts<Arc<Console>> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        c: &Arc<Console>,
    ) -> Result<Self, Response> {
        web::cookie(&parts.headers)
            .and_then(|id| web::current_user(&c.web, &id))
            .map(|_| SignedIn)
            .ok_or_else(|| {
                web::problem(
                    StatusCode::FORBIDDEN,
                    "Form expired",
                    "You are not signed in any more. Sign in again and retry.",
                )
            })
    }
}

/// The person behind a form post: a live session whose CSRF token the form
/// carries, from this site (see `web::check_post`).
fn poster(c: &Console, uri: &Uri, headers: &HeaderMap, csrf: &str) -> Result<Viewer, Response> {
    let id = web::check_post(&c.web, uri, headers, csrf)?;
    let (login, role) =
        web::current_user(&c.web, &id).ok_or_else(|| web::redirect("/login", None))?;
    Ok(Viewer {
        login,
        role,
        csrf: csrf.to_string(),
    })
}

/// The page for a refused or failed call: the API's own message.
fn refused(v: &Viewer, here: &str, s: &Status) -> Response {
    let status = match s.code() {
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    page(
        v,
        "Not done",
        here,
        status,
        &format!(
            "<p id=\"error\" class=\"error\" role=\"alert\">{}</p><p><a href=\"{here}\">Back</a></p>",
            esc(s.message())
        ),
    )
}

/// Calls the admin API as `v`; a refusal becomes its page.
macro_rules! api {
    ($c:expr, $v:expr, $here:expr, $method:ident, $msg:expr) => {
        match $c.admin.$method($v.call($msg)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return refused(&$v, $here, &s),
        }
    };
}

// ---- handlers ---------------------------------------------------------------

#[derive(Deserialize, Default)]
struct Done {
    done: Option<String>,
}

async fn nodes(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Done>,
) -> Response {
    let v = match viewer(&c, &headers, "/nodes") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let list = api!(c, v, "/nodes", list_nodes, apb::ListNodesRequest {});
    let body = notice(q.done.as_deref()) + &nodes_table(&list.nodes, web::now());
    page(&v, "Nodes", "/nodes", StatusCode::OK, &body)
}

/// A node by id: a name that is all digits would be taken for another
/// node's id.
#[derive(Deserialize)]
struct NodeQuery {
    id: u64,
    done: Option<String>,
}

async fn node_page(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<NodeQuery>,
) -> Response {
    let v = match viewer(&c, &headers, "/nodes") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let n = api!(
        c,
        v,
        "/nodes",
        get_node,
        apb::NodeRef {
            node: q.id.to_string()
        }
    );
    let body = notice(q.done.as_deref()) + &node_detail(&n, &v, web::now());
    page(
        &v,
        &format!("Node {}", n.name),
        "/nodes",
        StatusCode::OK,
        &body,
    )
}

#[derive(Deserialize)]
struct NodeAction {
    csrf: String,
    node: String,
    op: String,
    #[serde(default)]
    new_name: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    confirm: Option<String>,
}

async fn node_action(
    State(c): State<Arc<Console>>,
    _: SignedIn,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<NodeAction>,
) -> Response {
    let v = match poster(&c, &uri, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let node = apb::NodeRef {
        node: f.node.clone(),
    };
    let (id, done) = match f.op.as_str() {
        "rename" => {
            let req = apb::RenameNodeRequest {
                node: f.node.clone(),
                new_name: f.new_name.trim().to_string(),
            };
            (api!(c, v, "/nodes", rename_node, req).id, "renamed")
        }
        "expire" => (api!(c, v, "/nodes", expire_node, node).id, "expired"),
        "release" => (api!(c, v, "/nodes", release_node, node).id, "released"),
        "quarantine" => {
            let req = apb::QuarantineNodeRequest {
                node: f.node.clone(),
                reason: f.reason.clone(),
            };
            (api!(c, v, "/nodes", quarantine_node, req).id, "quarantined")
        }
        "delete" => {
            if f.confirm.as_deref() != Some("yes") {
                let s = Status::invalid_argument("tick the box to confirm the deletion");
                return refused(&v, "/nodes", &s);
            }
            api!(c, v, "/nodes", delete_node, node);
            return web::redirect("/nodes?done=deleted", None);
        }
        _ => return refused(&v, "/nodes", &Status::invalid_argument("unknown action")),
    };
    web::redirect(&format!("/node?id={id}&done={done}"), None)
}

async fn users(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Done>,
) -> Response {
    let v = match viewer(&c, &headers, "/users") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let list = api!(c, v, "/users", list_users, apb::ListUsersRequest {});
    let body = notice(q.done.as_deref()) + &users_table(&list.users, &v);
    page(&v, "Users and roles", "/users", StatusCode::OK, &body)
}

#[derive(Deserialize)]
struct RoleForm {
    csrf: String,
    login: String,
    role: String,
}

async fn user_role(
    State(c): State<Arc<Console>>,
    _: SignedIn,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<RoleForm>,
) -> Response {
    let v = match poster(&c, &uri, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let req = apb::UpdateUserRequest {
        login: f.login,
        role: f.role,
        ..Default::default()
    };
    api!(c, v, "/users", update_user, req);
    web::redirect("/users?done=role", None)
}

async fn keys(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Done>,
) -> Response {
    let v = match viewer(&c, &headers, "/keys") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let list = api!(c, v, "/keys", list_auth_keys, apb::ListKeysRequest {});
    let body = notice(q.done.as_deref()) + &keys_page(&list.keys, &v, None, web::now());
    page(&v, "Auth keys", "/keys", StatusCode::OK, &body)
}

#[derive(Deserialize)]
struct KeyForm {
    csrf: String,
    #[serde(default)]
    tags: String,
    #[serde(default)]
    reusable: Option<String>,
    #[serde(default)]
    ephemeral: Option<String>,
    #[serde(default)]
    expiry_secs: u64,
}

async fn key_create(
    State(c): State<Arc<Console>>,
    _: SignedIn,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<KeyForm>,
) -> Response {
    let v = match poster(&c, &uri, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let tags: Vec<String> = f
        .tags
        .split([',', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    let req = apb::CreateAuthKeyRequest {
        // No tags: a key for the person's own devices.
        user: if tags.is_empty() {
            v.login.clone()
        } else {
            String::new()
        },
        tags,
        reusable: f.reusable.is_some(),
        ephemeral: f.ephemeral.is_some(),
        expiry_secs: f.expiry_secs,
    };
    let created = api!(c, v, "/keys", create_auth_key, req);
    let list = api!(c, v, "/keys", list_auth_keys, apb::ListKeysRequest {});
    // Shown once, on this answer (no-store); never stored or shown again.
    let body = keys_page(&list.keys, &v, Some(&created.secret), web::now());
    page(&v, "Auth keys", "/keys", StatusCode::OK, &body)
}

#[derive(Deserialize)]
struct RevokeForm {
    csrf: String,
    key_id: String,
}

async fn key_revoke(
    State(c): State<Arc<Console>>,
    _: SignedIn,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<RevokeForm>,
) -> Response {
    let v = match poster(&c, &uri, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    api!(
        c,
        v,
        "/keys",
        revoke_auth_key,
        apb::KeyRef { key_id: f.key_id }
    );
    web::redirect("/keys?done=revoked", None)
}

async fn policy_page(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Done>,
) -> Response {
    let v = match viewer(&c, &headers, "/policy") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let p = api!(c, v, "/policy", get_policy, apb::GetPolicyRequest {});
    let editor = PolicyEditor {
        file_name: file_name(&p.file_name),
        text: &p.text,
        version: p.version,
        outcome: Outcome::None,
    };
    let body = notice(q.done.as_deref()) + &editor.render(&v) + &explain_form(None, None);
    page(&v, "Policy", "/policy", StatusCode::OK, &body)
}

#[derive(Deserialize)]
struct PolicyForm {
    csrf: String,
    text: String,
    /// The version the edit started from.
    version: u64,
}

async fn policy_plan(
    State(c): State<Arc<Console>>,
    _: SignedIn,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<PolicyForm>,
) -> Response {
    let v = match poster(&c, &uri, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let text = as_shown(&f.text);
    let current = api!(c, v, "/policy", get_policy, apb::GetPolicyRequest {});
    let name = file_name(&current.file_name);
    let req = apb::PlanPolicyRequest {
        file_name: name.to_string(),
        text: text.clone(),
    };
    let (status, outcome) = match c.admin.plan_policy(v.call(req)).await {
        Ok(r) => (StatusCode::OK, Outcome::Plan(r.into_inner().changes)),
        Err(s) if s.code() == Code::InvalidArgument => (
            StatusCode::BAD_REQUEST,
            Outcome::Errors(s.message().to_string()),
        ),
        Err(s) => return refused(&v, "/policy", &s),
    };
    let editor = PolicyEditor {
        file_name: name,
        text: &text,
        version: f.version,
        outcome,
    };
    page(&v, "Policy", "/policy", status, &editor.render(&v))
}

async fn policy_apply(
    State(c): State<Arc<Console>>,
    _: SignedIn,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<PolicyForm>,
) -> Response {
    let v = match poster(&c, &uri, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let current = api!(c, v, "/policy", get_policy, apb::GetPolicyRequest {});
    let name = file_name(&current.file_name);
    let text = as_shown(&f.text);
    // Applied only over the version the plan was made against (checked by
    // the mesh in the same turn as the write).
    let req = apb::SetPolicyRequest {
        file_name: name.to_string(),
        text: text.clone(),
        if_version: Some(f.version),
    };
    match c.admin.set_policy(v.call(req)).await {
        Ok(_) => web::redirect("/policy?done=applied", None),
        Err(s) if s.code() == Code::InvalidArgument => {
            let editor = PolicyEditor {
                file_name: name,
                text: &text,
                version: f.version,
                outcome: Outcome::Errors(s.message().to_string()),
            };
            page(
                &v,
                "Policy",
                "/policy",
                StatusCode::BAD_REQUEST,
                &editor.render(&v),
            )
        }
        Err(s) => refused(&v, "/policy", &s),
    }
}

#[derive(Deserialize)]
struct ExplainQuery {
    src: String,
    dst: String,
    #[serde(default)]
    port: String,
    #[serde(default)]
    proto: String,
}

async fn policy_explain(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<ExplainQuery>,
) -> Response {
    let v = match viewer(&c, &headers, "/policy") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let port = match q.port.trim() {
        "" => 0,
        p => match p.parse::<u32>() {
            Ok(p) => p,
            Err(_) => {
                let s = Status::invalid_argument(format!("port {p:?} is not a number"));
                return refused(&v, "/policy", &s);
            }
        },
    };
    let req = apb::ExplainPolicyRequest {
        src: q.src.clone(),
        dst: q.dst.clone(),
        port,
        proto: q.proto.clone(),
    };
    let e = api!(c, v, "/policy", explain_policy, req);
    let body = explain_form(Some(&q), Some(&e));
    page(&v, "Explain", "/policy", StatusCode::OK, &body)
}

async fn graph_page(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let v = match viewer(&c, &headers, "/graph") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let g = api!(
        c,
        v,
        "/graph",
        get_policy_graph,
        apb::GetPolicyGraphRequest {}
    );
    page(
        &v,
        "Who may reach whom",
        "/graph",
        StatusCode::OK,
        &graph_body(&g),
    )
}

#[derive(Deserialize, Default)]
struct AuditQuery {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    text: String,
    /// Seconds back from now; 0 or absent: all kept.
    #[serde(default)]
    within: i64,
}

async fn audit(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let v = match viewer(&c, &headers, "/audit") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let since_ms = if q.within > 0 {
        web::now().saturating_sub(q.within.saturating_mul(1000))
    } else {
        0
    };
    let req = apb::ListAuditRequest {
        limit: LOG_ROWS,
        actor: q.actor.clone(),
        action: q.action.clone(),
        text: q.text.clone(),
        since_ms,
        before_id: 0,
    };
    let list = api!(c, v, "/audit", list_audit, req);
    page(
        &v,
        "Audit log",
        "/audit",
        StatusCode::OK,
        &audit_body(&q, &list.events),
    )
}

#[derive(Deserialize, Default)]
struct FlowQuery {
    #[serde(default)]
    node: String,
    /// "allowed", "denied" or anything else: both.
    #[serde(default)]
    verdict: String,
}

async fn flows(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<FlowQuery>,
) -> Response {
    let v = match viewer(&c, &headers, "/flows") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let req = apb::ListFlowsRequest {
        node: q.node.trim().to_string(),
        denied_only: q.verdict == "denied",
        allowed_only: q.verdict == "allowed",
        limit: LOG_ROWS,
        ..Default::default()
    };
    let list = api!(c, v, "/flows", list_flows, req);
    page(
        &v,
        "Flow log",
        "/flows",
        StatusCode::OK,
        &flows_body(&q, &list.flows),
    )
}

// ---- rendering (pure) -------------------------------------------------------

const NAV: &[(&str, &str)] = &[
    ("/nodes", "Nodes"),
    ("/users", "Users"),
    ("/keys", "Auth keys"),
    ("/policy", "Policy"),
    ("/graph", "Graph"),
    ("/audit", "Audit log"),
    ("/flows", "Flows"),
];

/// A console page: the navigation, who is signed in, and `body`.
fn page(v: &Viewer, title: &str, here: &str, status: StatusCode, body: &str) -> Response {
    web::respond(status, None, layout(v, title, here, body))
}

fn layout(v: &Viewer, title: &str, here: &str, body: &str) -> String {
    let nav: String = NAV
        .iter()
        .map(|(href, label)| {
            let current = if *href == here {
                " aria-current=\"page\""
            } else {
                ""
            };
            format!("<a href=\"{href}\"{current}>{label}</a>")
        })
        .collect();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · ztmesh</title><link rel=\"stylesheet\" href=\"/static/style.css\"></head>\
         <body class=\"console\"><header><strong>ztmesh</strong><nav>{nav}</nav>\
         <span id=\"whoami\">{} ({})</span>\
         <form method=\"post\" action=\"/logout\">{}<button id=\"sign-out\" class=\"secondary\">Sign out</button></form>\
         </header><main class=\"wide\"><h1>{}</h1>\n{body}\n</main></body></html>\n",
        esc(title),
        esc(&v.login),
        esc(v.role.as_str()),
        hidden("csrf", &v.csrf),
        esc(title),
    )
}

/// The notice after a redirect (`?done=`): only these words, never text
/// from the URL.
fn notice(done: Option<&str>) -> String {
    let msg = match done {
        Some("renamed") => "Node renamed.",
        Some("expired") => {
            "Node key expired: the node is out of every map until it signs in again."
        }
        Some("released") => "Node released: it is back in the maps.",
        Some("quarantined") => "Node quarantined: it is out of every map until released.",
        Some("deleted") => "Node deleted.",
        Some("role") => "Role changed.",
        Some("revoked") => "Auth key revoked.",
        Some("applied") => "Policy applied: every node has been sent its new map.",
        _ => return String::new(),
    };
    format!("<p id=\"notice\" class=\"notice\" role=\"status\">{msg}</p>")
}

fn table(id: &str, head: &[&str], rows: &[String]) -> String {
    let head: String = head.iter().map(|h| format!("<th>{h}</th>")).collect();
    format!(
        "<div class=\"scroll\"><table id=\"{id}\"><thead><tr>{head}</tr></thead><tbody>{}</tbody></table></div>",
        rows.concat()
    )
}

fn state_of(n: &apb::Node, now: i64) -> String {
    let mut s = vec![if n.online { "online" } else { "offline" }];
    if n.quarantined_since_ms > 0 {
        s.push("quarantined");
    }
    if n.expiry_ms > 0 && n.expiry_ms <= now {
        s.push("expired");
    }
    s.join(", ")
}

fn posture_of(n: &apb::Node) -> String {
    if n.posture.is_empty() {
        return "—".into();
    }
    let passed = n.posture.iter().filter(|p| p.passed).count();
    format!("{passed}/{} passed", n.posture.len())
}

fn owner_of(n: &apb::Node) -> String {
    if n.tags.is_empty() {
        n.user.clone()
    } else {
        n.tags.join(", ")
    }
}

fn nodes_table(nodes: &[apb::Node], now: i64) -> String {
    if nodes.is_empty() {
        return "<p id=\"no-nodes\">No nodes yet. Create an auth key and run \
                <code>ztmesh up --auth-key KEY</code> on a machine.</p>"
            .into();
    }
    let rows: Vec<String> = nodes
        .iter()
        .map(|n| {
            format!(
                "<tr data-node=\"{}\"><td><a href=\"/node?id={}\">{}</a></td><td>{}</td><td>{}</td>\
                 <td class=\"state\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&n.name),
                n.id,
                esc(&n.name),
                esc(&n.addresses.join(" ")),
                esc(&owner_of(n)),
                esc(&state_of(n, now)),
                esc(&posture_of(n)),
                esc(&path_of(n)),
                esc(&ms_to_text(n.last_seen_ms)),
            )
        })
        .collect();
    table(
        "nodes",
        &[
            "Name",
            "Addresses",
            "Owner",
            "State",
            "Posture",
            "Path",
            "Last seen",
        ],
        &rows,
    )
}

/// Which path the node's peers take, as the node last said (self-reported).
fn path_of(n: &apb::Node) -> String {
    if n.paths_reported_ms == 0 {
        return "—".into();
    }
    let mut parts = vec![
        format!("{} direct", n.peers_direct),
        format!("{} relayed", n.peers_relayed),
    ];
    if n.peers_no_path > 0 {
        parts.push(format!("{} no path", n.peers_no_path));
    }
    parts.join(", ")
}

fn node_detail(n: &apb::Node, v: &Viewer, now: i64) -> String {
    let mut dl = vec![
        ("Name", n.name.clone()),
        ("Hostname", n.hostname.clone()),
        ("Addresses", n.addresses.join(" ")),
        ("Owner", owner_of(n)),
        ("State", state_of(n, now)),
        ("Path", path_of(n)),
        ("Last seen", ms_to_text(n.last_seen_ms)),
        ("Key expires", ms_to_text(n.expiry_ms)),
        ("Endpoints", n.endpoints.join(" ")),
        ("WireGuard key", n.wg_key.clone()),
        ("Netmap serial", n.netmap_serial.to_string()),
    ];
    if n.quarantined_since_ms > 0 {
        dl.push((
            "Quarantined",
            format!(
                "since {}: {}",
                ms_to_text(n.quarantined_since_ms),
                n.quarantine_reason
            ),
        ));
    }
    if !n.approved_routes.is_empty() || !n.advertised_routes.is_empty() {
        dl.push((
            "Routes",
            format!(
                "advertised {} · approved {}",
                n.advertised_routes.join(" "),
                n.approved_routes.join(" ")
            ),
        ));
    }
    let posture: String = n
        .posture
        .iter()
        .map(|p| {
            format!(
                "<li class=\"{}\">{} {}{}</li>",
                if p.passed { "pass" } else { "fail" },
                esc(&p.name),
                if p.passed { "passed" } else { "failed" },
                if p.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", esc(&p.detail))
                }
            )
        })
        .collect();
    let dl: String = dl
        .iter()
        .map(|(k, val)| format!("<dt>{k}</dt><dd>{}</dd>", esc(val)))
        .collect();
    let mut out = format!("<dl id=\"node\">{dl}</dl>");
    if !posture.is_empty() {
        out.push_str(&format!(
            "<h2>Posture</h2><ul id=\"posture\">{posture}</ul>"
        ));
    }
    if !v.may(Access::Network) {
        out.push_str("<p class=\"muted\">Your role may look, not change.</p>");
        return out;
    }
    let form = |op: &str, fields: &str, button: &str, class: &str| {
        format!(
            "<form method=\"post\" action=\"/node/action\" class=\"inline\">{}{}{}{fields}\
             <button id=\"{op}\" class=\"{class}\">{button}</button></form>",
            hidden("csrf", &v.csrf),
            hidden("node", &n.id.to_string()),
            hidden("op", op),
        )
    };
    out.push_str("<h2>Actions</h2><div class=\"actions\">");
    out.push_str(&form(
        "rename",
        &format!(
            "<label for=\"new-name\">New name</label><input type=\"text\" id=\"new-name\" \
             name=\"new_name\" value=\"{}\" required maxlength=\"63\">",
            esc(&n.name)
        ),
        "Rename",
        "",
    ));
    if n.quarantined_since_ms > 0 {
        out.push_str(&form("release", "", "Release from quarantine", ""));
    } else {
        out.push_str(&form(
            "quarantine",
            "<label for=\"reason\">Reason</label><input type=\"text\" id=\"reason\" \
             name=\"reason\" required maxlength=\"200\">",
            "Quarantine",
            "danger",
        ));
    }
    out.push_str(&form("expire", "", "Expire key now", "danger"));
    out.push_str(&form(
        "delete",
        "<label class=\"check\"><input type=\"checkbox\" id=\"confirm-delete\" name=\"confirm\" \
         value=\"yes\" required> Delete this node: it must enroll again</label>",
        "Delete",
        "danger",
    ));
    out.push_str("</div>");
    out
}

const ROLES: &[&str] = &["admin", "network-admin", "auditor", "member"];

fn users_table(users: &[apb::User], v: &Viewer) -> String {
    let admin = v.may(Access::Identity);
    let rows: Vec<String> = users
        .iter()
        .map(|u| {
            let role = if admin {
                let options: String = ROLES
                    .iter()
                    .map(|r| {
                        let sel = if *r == u.role { " selected" } else { "" };
                        format!("<option value=\"{r}\"{sel}>{r}</option>")
                    })
                    .collect();
                format!(
                    "<form method=\"post\" action=\"/users/role\" class=\"inline\">{}{}\
                     <select name=\"role\" aria-label=\"role of {}\">{options}</select>\
                     <button class=\"small\">Change</button></form>",
                    hidden("csrf", &v.csrf),
                    hidden("login", &u.login),
                    esc(&u.login),
                )
            } else {
                esc(&u.role)
            };
            let yes = |b: bool| if b { "yes" } else { "no" };
            format!(
                "<tr data-user=\"{}\"><td>{}</td><td class=\"role\">{role}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&u.login),
                esc(&u.login),
                yes(u.has_password),
                yes(u.has_totp),
                esc(&u.sso_identities.join(" ")),
                esc(&ms_to_text(u.created_ms)),
            )
        })
        .collect();
    let note = if admin {
        ""
    } else {
        "<p class=\"muted\">Only an admin changes roles.</p>"
    };
    table(
        "users",
        &["Login", "Role", "Password", "TOTP", "SSO", "Created"],
        &rows,
    ) + note
}

fn key_state(k: &apb::AuthKey, now: i64) -> &'static str {
    if k.revoked {
        "revoked"
    } else if k.expires_ms > 0 && k.expires_ms <= now {
        "expired"
    } else if k.used && !k.reusable {
        "used"
    } else {
        "valid"
    }
}

fn keys_page(keys: &[apb::AuthKey], v: &Viewer, created: Option<&str>, now: i64) -> String {
    let network = v.may(Access::Network);
    let mut out = String::new();
    if let Some(secret) = created {
        out.push_str(&format!(
            "<div class=\"notice\" role=\"status\"><p>Auth key created. Copy it now: it is shown \
             once and never again.</p><p><code id=\"new-key\">{}</code></p></div>",
            esc(secret)
        ));
    }
    if network {
        out.push_str(&format!(
            "<h2>New auth key</h2><form id=\"create-key\" method=\"post\" action=\"/keys/create\">{}\
             <label for=\"tags\">Tags (comma-separated; none: the key enrolls your own devices)</label>\
             <input type=\"text\" id=\"tags\" name=\"tags\" placeholder=\"tag:web\">\
             <label class=\"check\"><input type=\"checkbox\" id=\"reusable\" name=\"reusable\" value=\"yes\"> Reusable</label>\
             <label class=\"check\"><input type=\"checkbox\" id=\"ephemeral\" name=\"ephemeral\" value=\"yes\"> Ephemeral nodes</label>\
             <label for=\"expiry\">Valid for</label><select id=\"expiry\" name=\"expiry_secs\">\
             <option value=\"3600\">1 hour</option><option value=\"86400\">1 day</option>\
             <option value=\"604800\">7 days</option><option value=\"2592000\">30 days</option></select>\
             <button id=\"create\">Create key</button></form>",
            hidden("csrf", &v.csrf)
        ));
    }
    let rows: Vec<String> = keys
        .iter()
        .map(|k| {
            let state = key_state(k, now);
            let revoke = if network && state == "valid" {
                format!(
                    "<form method=\"post\" action=\"/keys/revoke\" class=\"inline\">{}{}\
                     <button class=\"small danger\">Revoke</button></form>",
                    hidden("csrf", &v.csrf),
                    hidden("key_id", &k.key_id)
                )
            } else {
                String::new()
            };
            format!(
                "<tr data-key=\"{}\"><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{revoke}</td></tr>",
                esc(&k.key_id),
                esc(&k.key_id),
                esc(&if k.tags.is_empty() {
                    k.user.clone()
                } else {
                    k.tags.join(", ")
                }),
                match (k.reusable, k.ephemeral) {
                    (true, true) => "reusable, ephemeral",
                    (true, false) => "reusable",
                    (false, true) => "one use, ephemeral",
                    (false, false) => "one use",
                },
                state,
                esc(&ms_to_text(k.expires_ms)),
                esc(&k.created_by),
                esc(&ms_to_text(k.created_ms)),
            )
        })
        .collect();
    out.push_str("<h2>Keys</h2>");
    out.push_str(&table(
        "keys",
        &[
            "Key id",
            "For",
            "Kind",
            "State",
            "Expires",
            "Created by",
            "Created",
            "",
        ],
        &rows,
    ));
    out
}

/// The file name a console edit is checked and stored under.
fn file_name(current: &str) -> &str {
    if current.is_empty() {
        "policy.hujson"
    } else {
        current
    }
}

/// What a check of the edit gave.
enum Outcome {
    None,
    /// `FILE:LINE:COL: message` lines.
    Errors(String),
    /// The edit is valid: what it would change.
    Plan(Vec<apb::FlowChange>),
}

struct PolicyEditor<'a> {
    file_name: &'a str,
    text: &'a str,
    /// The version in force when the edit started.
    version: u64,
    outcome: Outcome,
}

impl PolicyEditor<'_> {
    fn render(&self, v: &Viewer) -> String {
        let network = v.may(Access::Network);
        let mut out = format!(
            "<p>Version {} · <code>{}</code>. Edits are checked and planned first; nothing \
             changes until you apply the plan.</p>",
            self.version,
            esc(self.file_name)
        );
        let bad_lines = match &self.outcome {
            Outcome::Errors(e) => error_lines(e),
            _ => Vec::new(),
        };
        match &self.outcome {
            Outcome::None => {}
            Outcome::Errors(e) => {
                let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
                let mut items: String = lines
                    .iter()
                    .take(MAX_ERRORS_SHOWN)
                    .map(|l| format!("<li>{}</li>", esc(l)))
                    .collect();
                if lines.len() > MAX_ERRORS_SHOWN {
                    items.push_str(&format!(
                        "<li>… and {} more</li>",
                        lines.len() - MAX_ERRORS_SHOWN
                    ));
                }
                out.push_str(&format!(
                    "<div class=\"error\" role=\"alert\"><p>The policy has errors; the policy in \
                     force is unchanged.</p><ul id=\"policy-errors\">{items}</ul></div>"
                ));
            }
            Outcome::Plan(changes) => out.push_str(&plan_html(changes, v, self)),
        }
        if network {
            out.push_str(&format!(
                "<form id=\"policy-form\" method=\"post\" action=\"/policy/plan\">{}{}\
                 <label for=\"policy-text\">Policy ({})</label>\
                 <textarea id=\"policy-text\" name=\"text\" rows=\"24\" spellcheck=\"false\">{}</textarea>\
                 <button id=\"check\">Check and plan</button></form>",
                hidden("csrf", &v.csrf),
                hidden("version", &self.version.to_string()),
                esc(self.file_name),
                esc_text(self.text),
            ));
        }
        out.push_str(&listing(self.text, &bad_lines));
        out
    }
}

/// The line numbers `FILE:LINE:COL: message` lines name.
fn error_lines(errors: &str) -> Vec<usize> {
    errors
        .lines()
        .filter_map(|l| {
            // The file name may hold colons; LINE:COL are the two numbers
            // before the message.
            let head = l.split(": ").next()?;
            let mut parts = head.rsplitn(3, ':');
            let _col = parts.next()?.parse::<usize>().ok()?;
            parts.next()?.parse::<usize>().ok()
        })
        .collect()
}

/// The text with line numbers, the lines with errors marked (`#L<n>`).
fn listing(text: &str, bad: &[usize]) -> String {
    let bad: std::collections::HashSet<usize> = bad.iter().copied().collect();
    let lines: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let n = i + 1;
            let class = if bad.contains(&n) {
                " class=\"bad\""
            } else {
                ""
            };
            format!("<li id=\"L{n}\"{class}><code>{}</code></li>", esc_text(l))
        })
        .collect();
    format!(
        "<details{}><summary>Numbered listing</summary><ol id=\"listing\">{lines}</ol></details>",
        if bad.is_empty() { "" } else { " open" }
    )
}

/// A policy as the editor shows it, which is what is planned and applied:
/// `\n` line ends (browsers send `\r\n`), without the control and
/// deceptive characters the pages never show (bidirectional overrides,
/// zero-width characters), so an edit cannot hide what it changes.
fn as_shown(text: &str) -> String {
    text.replace("\r\n", "\n")
        .chars()
        .filter(|&c| {
            c == '\n' || c == '\t' || !(c.is_control() || crate::nodeinput::is_deceptive(c))
        })
        .collect()
}

/// Text for a `<textarea>` or `<code>`: like [`esc`], keeping newlines and
/// tabs.
fn esc_text(s: &str) -> String {
    s.split('\n')
        .map(|l| l.split('\t').map(esc).collect::<Vec<_>>().join("\t"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn plan_html(changes: &[apb::FlowChange], v: &Viewer, e: &PolicyEditor<'_>) -> String {
    let mut out = String::from("<h2>Plan</h2>");
    if changes.is_empty() {
        out.push_str("<p id=\"plan-empty\">No node pair gains or loses anything.</p>");
    } else {
        let rows: Vec<String> = changes
            .iter()
            .map(|c| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td class=\"gain\">{}</td><td class=\"loss\">{}</td></tr>",
                    esc(&c.src),
                    esc(&c.dst),
                    esc(&c.gained.join(" ")),
                    esc(&c.lost.join(" "))
                )
            })
            .collect();
        out.push_str(&table("plan", &["From", "To", "Gains", "Loses"], &rows));
    }
    if v.may(Access::Network) {
        out.push_str(&format!(
            "<form id=\"apply-form\" method=\"post\" action=\"/policy/apply\">{}{}\
             <input type=\"hidden\" name=\"text\" value=\"{}\">\
             <button id=\"apply\">Apply this policy</button></form>",
            hidden("csrf", &v.csrf),
            hidden("version", &e.version.to_string()),
            esc_attr(e.text),
        ));
    }
    out
}

/// An attribute value keeping newlines (as character references).
fn esc_attr(s: &str) -> String {
    esc_text(s).replace('\n', "&#10;").replace('\t', "&#9;")
}

fn explain_form(q: Option<&ExplainQuery>, e: Option<&apb::ExplainPolicyResponse>) -> String {
    let val = |f: fn(&ExplainQuery) -> &str| q.map(f).map(esc).unwrap_or_default();
    let mut out = format!(
        "<h2>Explain</h2><form id=\"explain-form\" method=\"get\" action=\"/policy/explain\" class=\"row\">\
         <label>From <input type=\"text\" id=\"explain-src\" name=\"src\" value=\"{}\" required></label>\
         <label>To <input type=\"text\" id=\"explain-dst\" name=\"dst\" value=\"{}\" required></label>\
         <label>Port <input type=\"text\" id=\"explain-port\" name=\"port\" value=\"{}\" size=\"6\"></label>\
         <label>Protocol <input type=\"text\" id=\"explain-proto\" name=\"proto\" value=\"{}\" size=\"6\" placeholder=\"tcp\"></label>\
         <button id=\"explain\">Explain</button></form>",
        val(|q| &q.src),
        val(|q| &q.dst),
        val(|q| &q.port),
        val(|q| &q.proto),
    );
    if let Some(e) = e {
        let posture: String = e
            .posture
            .iter()
            .map(|p| format!("<li>{}</li>", esc(p)))
            .collect();
        out.push_str(&format!(
            "<div id=\"explain-result\" class=\"{}\"><p><strong>{}</strong>{}</p><p>{}</p>{}</div>",
            if e.allowed { "allowed" } else { "denied" },
            if e.allowed { "Allowed" } else { "Denied" },
            if e.rule_id.is_empty() {
                String::new()
            } else {
                format!(" by <code>{}</code>", esc(&e.rule_id))
            },
            esc(&e.detail),
            if posture.is_empty() {
                String::new()
            } else {
                format!("<ul>{posture}</ul>")
            }
        ));
    }
    out
}

fn graph_body(g: &apb::PolicyGraph) -> String {
    let rows: Vec<String> = g
        .edges
        .iter()
        .map(|e| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                esc(&e.src),
                esc(&e.dst),
                esc(&e.ports),
                esc(&e.postures.join(" or ")),
                esc(&e.rule_id),
            )
        })
        .collect();
    format!(
        "<p>Drawn from the policy in force (version {}): each arrow is one allowed direction, \
         labelled with its ports; dashed arrows need a device posture. The numbers are the \
         nodes each selector selects now. Everything not drawn is denied.</p>\
         <div class=\"scroll\">{}</div>{}",
        g.version,
        graph::svg(&g.edges),
        table("edges", &["From", "To", "Ports", "Posture", "Rule"], &rows)
    )
}

fn audit_body(q: &AuditQuery, events: &[apb::AuditEvent]) -> String {
    let within = |secs: i64, label: &str| {
        format!(
            "<option value=\"{secs}\"{}>{label}</option>",
            if q.within == secs { " selected" } else { "" }
        )
    };
    let form = format!(
        "<form id=\"audit-filter\" method=\"get\" action=\"/audit\" class=\"row\">\
         <label>Actor <input type=\"text\" id=\"f-actor\" name=\"actor\" value=\"{}\" placeholder=\"user:*\"></label>\
         <label>Action <input type=\"text\" id=\"f-action\" name=\"action\" value=\"{}\" placeholder=\"node.*\"></label>\
         <label>Text <input type=\"text\" id=\"f-text\" name=\"text\" value=\"{}\"></label>\
         <label>Within <select id=\"f-within\" name=\"within\">{}{}{}{}</select></label>\
         <button id=\"filter\">Filter</button></form>",
        esc(&q.actor),
        esc(&q.action),
        esc(&q.text),
        within(0, "all kept"),
        within(3600, "1 hour"),
        within(86_400, "1 day"),
        within(604_800, "7 days"),
    );
    let rows: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "<tr data-action=\"{}\"><td>{}</td><td>{}</td><td class=\"action\">{}</td><td>{}</td><td class=\"detail\">{}</td></tr>",
                esc(&e.action),
                esc(&ms_to_text(e.time_ms)),
                esc(&e.actor),
                esc(&e.action),
                esc(&e.target),
                esc(&e.detail),
            )
        })
        .collect();
    format!(
        "{form}<p class=\"muted\">Newest first, at most {LOG_ROWS}; filters search the newest {} \
         events. Actor and action match exactly, or by prefix ending in <code>*</code>.</p>{}",
        crate::api::AUDIT_SEARCH_WINDOW,
        table(
            "audit",
            &["Time", "Actor", "Action", "Target", "Detail"],
            &rows
        )
    )
}

fn flows_body(q: &FlowQuery, flows: &[apb::FlowRecord]) -> String {
    let opt = |v: &str, label: &str| {
        format!(
            "<option value=\"{v}\"{}>{label}</option>",
            if q.verdict == v { " selected" } else { "" }
        )
    };
    let form = format!(
        "<form id=\"flow-filter\" method=\"get\" action=\"/flows\" class=\"row\">\
         <label>Node <input type=\"text\" id=\"f-node\" name=\"node\" value=\"{}\"></label>\
         <label>Verdict <select id=\"f-verdict\" name=\"verdict\">{}{}{}</select></label>\
         <button id=\"filter\">Filter</button></form>",
        esc(&q.node),
        opt("", "all"),
        opt("allowed", "allowed"),
        opt("denied", "denied"),
    );
    let rows: Vec<String> =
        flows
            .iter()
            .map(|f| {
                let port = if f.dst_port == 0 {
                    String::new()
                } else {
                    format!(":{}", f.dst_port)
                };
                format!(
                "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}{port}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{} / {}</td></tr>",
                if f.allowed { "allowed" } else { "denied" },
                esc(&ms_to_text(f.time_ms)),
                esc(&f.node),
                esc(&f.src),
                esc(&f.dst),
                esc(&ztmesh_policy::proto_name(u8::try_from(f.protocol).unwrap_or(255))),
                if f.allowed { "allowed" } else { "denied" },
                esc(if f.allowed { &f.rule_id } else { &f.reason }),
                f.packets,
                f.bytes,
            )
            })
            .collect();
    format!(
        "{form}<p class=\"muted\">As the receiving node's filter decided, newest first, at most {LOG_ROWS}.</p>{}",
        table(
            "flows",
            &["Time", "Receiver", "From", "To", "Proto", "Verdict", "Rule / reason", "Packets / bytes"],
            &rows
        )
    )
}

#[cfg(test)]
mod tests;
