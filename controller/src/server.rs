//! `ztmesh-controller serve`: data-dir initialisation, TLS, listeners, ticker.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use ipnet::Ipv6Net;
use tonic::transport::Server;
use ztmesh_proto::admin::admin_server::AdminServer;
use ztmesh_proto::auth::{hex, sha256};
use ztmesh_proto::keys::write_secret_file;
use ztmesh_proto::ops::notify::Notifier;

use crate::api::{AdminService, ControlRouter, ControlService};
use crate::listener::{self, ConnSlots, Incoming};
use crate::lockfile::DirLock;
use crate::mesh::{Mesh, MeshConfig};
use crate::metrics::Metrics;
use crate::now_ms;
use crate::ratelimit::SharedLimiter;
use crate::recovery::{IdentityFile, Layout};
use crate::store::{PgOptions, PgStore, Session, SqliteStore, Store};
use crate::timedstore::TimedStore;

/// Where `serve --metrics-listen` without an address serves `/metrics`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

const DB_FILE: &str = "ztmesh.db";
const LOCK_FILE: &str = "ztmesh.lock";

/// Files in the data dir.
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    pub fn signing_key(&self) -> PathBuf {
        self.signing_files().key
    }
    /// The signing key and the files of its rotation.
    pub fn signing_files(&self) -> crate::signing::KeyFiles {
        crate::signing::KeyFiles::in_dir(&self.root)
    }
    pub fn tls_cert(&self) -> PathBuf {
        self.root.join("tls.crt")
    }
    pub fn tls_key(&self) -> PathBuf {
        self.root.join("tls.key")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join(DB_FILE)
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.root.join(LOCK_FILE)
    }

    /// Every file of the controller's identity: the one list backup and
    /// restore use (a new identity file is added here, and nowhere else).
    pub const IDENTITY: &'static [IdentityFile] = &[
        IdentityFile {
            name: "controller.key",
            required: true,
        },
        IdentityFile {
            name: "tls.crt",
            required: true,
        },
        IdentityFile {
            name: "tls.key",
            required: true,
        },
        // During a signing-key rotation's grace period: the hand-over the
        // maps carry (`crate::signing`).
        IdentityFile {
            name: "handover.bin",
            required: false,
        },
        // During a TLS certificate rotation: the staged certificate, and
        // the previous one retained after the switch (`crate::tlscerts`).
        IdentityFile {
            name: "tls.next.crt",
            required: false,
        },
        IdentityFile {
            name: "tls.next.key",
            required: false,
        },
        IdentityFile {
            name: "tls.prev.crt",
            required: false,
        },
        IdentityFile {
            name: "tls.prev.key",
            required: false,
        },
        IdentityFile {
            name: "tls.prev.meta",
            required: false,
        },
    ];

    /// The identity files a backup carries now: the required ones, and the
    /// optional ones that exist.
    pub fn identity_files(&self) -> Vec<&'static str> {
        self.layout().identity_files()
    }

    /// The data dir as backup and restore see it.
    pub fn layout(&self) -> Layout {
        Layout {
            root: self.root.clone(),
            identity: Self::IDENTITY,
            db: DB_FILE,
            lock: LOCK_FILE,
        }
    }
}

/// Decodes the first PEM block's body to DER.
pub fn pem_to_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .context("certificate PEM is not valid base64")
}

/// Creates the data dir (0700) and the TLS certificate if missing; returns the
/// certificate PEM, key PEM and the certificate's SHA-256 fingerprint.
pub fn init_tls(dir: &DataDir) -> anyhow::Result<(String, String, [u8; 32])> {
    if !dir.tls_cert().exists() {
        let ck = rcgen::generate_simple_self_signed(vec!["ztmesh-controller".to_string()])
            .context("generating the TLS certificate")?;
        write_secret_file(&dir.tls_key(), ck.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(dir.tls_cert(), ck.cert.pem())?;
    }
    let cert = std::fs::read_to_string(dir.tls_cert()).context("reading tls.crt")?;
    let key = std::fs::read_to_string(dir.tls_key()).context("reading tls.key")?;
    let fp = sha256(&pem_to_der(&cert)?);
    Ok((cert, key, fp))
}

/// Makes an admin's certificate and key (PEM) the listener's identity: both
/// are checked to parse and match, then written into the data dir (the key
/// 0600), so `fingerprint` and every restart see them. Nodes pin the new
/// certificate's fingerprint.
///
/// # Errors
/// Unreadable files, a certificate and key that do not parse or match.
pub fn install_tls(dir: &DataDir, (cert, key): (&Path, &Path)) -> anyhow::Result<()> {
    let cert_pem =
        std::fs::read_to_string(cert).with_context(|| format!("--tls-cert {}", cert.display()))?;
    let key_pem =
        std::fs::read_to_string(key).with_context(|| format!("--tls-key {}", key.display()))?;
    listener::server_tls_config(&cert_pem, &key_pem).with_context(|| {
        format!(
            "--tls-cert {} / --tls-key {}",
            cert.display(),
            key.display()
        )
    })?;
    write_secret_file(&dir.tls_key(), key_pem.as_bytes())?;
    std::fs::write(dir.tls_cert(), cert_pem.as_bytes())?;
    Ok(())
}

/// Reads the controller's fingerprint from an initialised data dir.
pub fn fingerprint(dir: &DataDir) -> anyhow::Result<[u8; 32]> {
    let cert = std::fs::read_to_string(dir.tls_cert())
        .with_context(|| format!("reading {}", dir.tls_cert().display()))?;
    Ok(sha256(&pem_to_der(&cert)?))
}

/// What [`open`] prepared.
pub struct Opened {
    pub mesh: Arc<Mesh>,
    pub cert: String,
    pub key: String,
    /// This controller's session on a shared PostgreSQL database.
    pub session: Option<Session>,
}

/// A database is served by one controller identity: every controller on
/// it must hold the same netmap signing key (nodes pin it, and the audit
/// log's checkpoints are signed with it). The first one to serve records
/// its key; another is refused before it serves.
fn same_identity(store: &dyn Store, key: &str, data_dir: &Path) -> anyhow::Result<()> {
    match store.init_meta("controller_key", key)? {
        k if k == key => Ok(()),
        k => anyhow::bail!(
            "this database belongs to controller key {k}, but {} holds {key}: copy \
             controller.key, tls.crt and tls.key from a data dir that serves it",
            data_dir.display()
        ),
    }
}

/// Prepares the data dir, the store (SQLite in the data dir, or the
/// PostgreSQL `database`, shared with any other controllers on it) and the
/// in-memory state.
pub fn open(
    dir: &DataDir,
    cfg: MeshConfig,
    database: Option<&PgOptions>,
) -> anyhow::Result<Opened> {
    std::fs::create_dir_all(&dir.root)
        .with_context(|| format!("creating data dir {}", dir.root.display()))?;
    std::fs::set_permissions(&dir.root, std::fs::Permissions::from_mode(0o700))?;
    let (signer, handover) = crate::signing::load(&dir.signing_files())?;
    let (cert, key, fp) = init_tls(dir)?;
    let tls_files = crate::tlscerts::TlsFiles::in_dir(&dir.root);
    let metrics = Arc::new(Metrics::default());
    let (store, session): (Arc<dyn Store>, _) = match database {
        None => (
            Arc::new(TimedStore::new(
                SqliteStore::open(&dir.db())?,
                metrics.clone(),
            )),
            None,
        ),
        Some(options) => {
            let (pg, session) = PgStore::connect_shared(options.clone())?;
            same_identity(&pg, &signer.public().to_string(), &dir.root)?;
            tracing::info!(database = options.display(), "store: postgresql");
            (
                Arc::new(TimedStore::new(pg, metrics.clone())),
                Some(session),
            )
        }
    };
    let ula: Ipv6Net = match store.meta("ula")? {
        Some(s) => s,
        None => store.init_meta("ula", &Mesh::random_ula().to_string())?,
    }
    .parse()
    .context("stored ULA prefix is invalid")?;
    let alerts = match &cfg.webhook {
        Some(hook) => Some(
            crate::alert::spawn(hook.clone(), store.clone())
                .map_err(|e| anyhow::anyhow!("--alert-webhook: {e}"))?,
        ),
        None => None,
    };
    let mut mesh = Mesh::load(store, signer, fp, ula, cfg, now_ms())?
        .with_metrics(metrics)
        .with_key_files(dir.signing_files(), handover, now_ms())
        .with_tls(tls_files.load()?, tls_files);
    if session.is_some() {
        mesh = mesh.shared();
    }
    if let Some(tx) = alerts {
        mesh = mesh.with_alerts(tx);
    }
    Ok(Opened {
        mesh: Arc::new(mesh),
        cert,
        key,
        session,
    })
}

/// Keeps `mesh` current with the other controllers on its database: reads
/// the change log on every wake-up of the session (and at least every
/// [`FEED_POLL`]), and follows the session's leadership.
pub fn follow(mesh: &Arc<Mesh>, session: &Session) -> [AbortOnDrop; 2] {
    let changed = session.changed.clone();
    let feed_mesh = mesh.clone();
    let feed = tokio::spawn(async move {
        loop {
            let _ = tokio::time::timeout(FEED_POLL, changed.notified()).await;
            let m = feed_mesh.clone();
            match tokio::task::spawn_blocking(move || m.catch_up(now_ms())).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::debug!(nodes = n, "changes from other controllers applied"),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the change log"),
                Err(e) => tracing::error!(error = %e, "change-log reader failed"),
            }
        }
    });
    let mut leader = session.leader.clone();
    let lead_mesh = mesh.clone();
    let lead = tokio::spawn(async move {
        loop {
            let term = *leader.borrow_and_update();
            let m = lead_mesh.clone();
            let _ = tokio::task::spawn_blocking(move || m.set_leader(term, now_ms())).await;
            if leader.changed().await.is_err() {
                lead_mesh.set_leader(None, now_ms());
                return;
            }
        }
    });
    [AbortOnDrop(feed), AbortOnDrop(lead)]
}

/// Runs the controller until SIGINT/SIGTERM, with `/metrics` on the
/// second address if one is given.
///
/// The data dir is locked first (before anything in it is touched) and
/// stays locked until `serve` returns: a second controller exits at once.
pub async fn serve(
    dir: &DataDir,
    (listen, metrics_listen): (SocketAddr, Option<SocketAddr>),
    cfg: MeshConfig,
    limits: ListenerLimits,
    tls_files: Option<(&Path, &Path)>,
    web: WebOptions,
    database: Option<&PgOptions>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir.root)
        .with_context(|| format!("creating data dir {}", dir.root.display()))?;
    std::fs::set_permissions(&dir.root, std::fs::Permissions::from_mode(0o700))?;
    let _lock = DirLock::acquire(&dir.lock_file())?;
    if let Some(files) = tls_files {
        install_tls(dir, files)?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let metrics_listener = match metrics_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding --metrics-listen {a}"))?,
        ),
        None => None,
    };
    let Opened {
        mesh,
        cert,
        key,
        session,
    } = open(dir, cfg, database)?;
    let _following = session.as_ref().map(|s| follow(&mesh, s));
    let _metrics = metrics_listener.map(|l| {
        let mesh = mesh.clone();
        AbortOnDrop(tokio::spawn(ztmesh_proto::scrape::serve(
            l,
            move |format| {
                let text = mesh.metrics().render(mesh.gauges(now_ms()), format);
                async move { text }
            },
        )))
    });
    println!("ztmesh controller");
    println!("  fingerprint:    {}", hex(&mesh.fingerprint()));
    println!("  controller key: {}", mesh.controller_key());
    println!("  listening:      https://{listen}");
    println!("  admin socket:   {}", dir.admin_socket().display());
    if let Some(a) = metrics_listen {
        println!("  metrics:        http://{a}/metrics");
    }
    run_with(
        dir,
        mesh,
        cert,
        key,
        listener,
        limits,
        web,
        shutdown_signal(),
    )
    .await?;
    // The session (and with it the leadership) ends after the drain.
    drop(session);
    Ok(())
}

/// What the sign-in pages offer besides built-in accounts.
#[derive(Clone, Debug, Default)]
pub struct WebOptions {
    /// Single sign-on at an OpenID provider.
    pub oidc: Option<crate::oidc::OidcConfig>,
}

/// Limits on the TLS listener against hostile clients; the defaults are
/// documented in the README and exposed as `serve` flags.
#[derive(Clone, Debug)]
pub struct ListenerLimits {
    /// A connection that has not completed its TLS handshake and sent the
    /// HTTP/2 client preface by then is closed.
    pub handshake_timeout: Duration,
    /// Open connections (handshaking or established), all sources together.
    pub max_connections: usize,
    /// Open connections per source (an IPv4 address, an IPv6 /64).
    pub max_connections_per_source: usize,
    /// Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// Deadline of a unary call (reading the request through sending the
    /// reply); the long-lived `StreamNetMap` only until its response starts.
    pub request_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 16_384,
            max_connections_per_source: 512,
            max_streams_per_connection: 32,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The period of the server's ticker (offline timers, flushes, pruning).
const TICK: Duration = Duration::from_millis(500);

/// How often the change log is read even without a notification.
const FEED_POLL: Duration = Duration::from_secs(5);

/// The audit table is pruned, and its chain head signed, every this many
/// ticks (one minute).
const AUDIT_PRUNE_TICKS: u64 = 120;

/// Serves the Control and Admin APIs on `listener` (TLS) and the admin socket
/// until `shutdown` completes, with the default [`ListenerLimits`].
pub async fn run(
    dir: &DataDir,
    mesh: Arc<Mesh>,
    cert: String,
    key: String,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let limits = ListenerLimits::default();
    let web = WebOptions::default();
    run_with(dir, mesh, cert, key, listener, limits, web, shutdown).await
}

/// Like [`run`], with explicit listener limits. Used by `serve` and by
/// in-process tests.
#[expect(
    clippy::disallowed_methods,
    reason = "the server shell times its own start-up"
)]
#[expect(
    clippy::too_many_arguments,
    reason = "the shell's wiring: identity, listener, limits, pages and shutdown are distinct inputs"
)]
pub async fn run_with(
    dir: &DataDir,
    mesh: Arc<Mesh>,
    cert: String,
    key: String,
    listener: tokio::net::TcpListener,
    limits: ListenerLimits,
    web: WebOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Admin over the unix socket, authorized by its 0600 permissions.
    let sock = dir.admin_socket();
    let _ = std::fs::remove_file(&sock);
    // The data dir is 0700, so the socket is never reachable by others, even
    // in the moment between bind and chmod.
    let uds = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    // One limiter for every unauthenticated path on the TLS listener, with
    // its own lock (never the mesh lock).
    let limiter = Arc::new(SharedLimiter::default());
    let layout = Arc::new(dir.layout());
    let local_admin = AdminServer::new(AdminService {
        mesh: mesh.clone(),
        local: true,
        limiter: limiter.clone(),
        layout: layout.clone(),
    });
    let uds_task = tokio::spawn(async move {
        Server::builder()
            .add_service(local_admin)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(uds))
            .await
    });

    // Under systemd (Type=notify, `$NOTIFY_SOCKET`): ready once every
    // listener is bound, keep-alives while the mesh answers, stopping on
    // shutdown.
    let notify = Notifier::from_env().map(Arc::new);
    let probed = mesh.clone();
    let _keepalive = notify
        .clone()
        .and_then(|n| keepalive(n, move || probed.probe()));
    let ticker_mesh = mesh.clone();
    let ticker = tokio::spawn(async move {
        // Offline time is measured on this monotonic clock (see Mesh::tick_at).
        let started = std::time::Instant::now();
        let mut t = tokio::time::interval(TICK);
        for n in 0u64.. {
            t.tick().await;
            let mono = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            ticker_mesh.tick_at(now_ms(), mono);
            ticker_mesh.flush();
            if n % AUDIT_PRUNE_TICKS == 0 && ticker_mesh.is_leader() {
                ticker_mesh.prune_audit(now_ms());
                ticker_mesh.prune_flows(now_ms());
            }
        }
    });

    // TLS is done by the listener (handshake deadline, connection caps), so
    // the server itself sees only established connections.
    // With the data dir's certificates, swappable by `tls switch`.
    let tls = Arc::new(match mesh.tls_certs() {
        Some(certs) => certs.server_config(),
        None => listener::server_tls_config(&cert, &key)?,
    });
    let slots = ConnSlots::new(limits.max_connections, limits.max_connections_per_source);
    let bound = listener.local_addr()?;
    let incoming = Incoming::new(listener, tls, slots, limits.handshake_timeout);
    // The sign-in pages share the listener with gRPC: tonic routes by the
    // gRPC service path, everything else falls through to the pages.
    let logins = Arc::new(crate::web::LoginHub::new(mesh.config().public_url.clone()));
    let sso = web.oidc.map(crate::web::Sso::new);
    let discovery = sso
        .clone()
        .map(|s| tokio::spawn(s.discover(Duration::from_secs(10))));
    let web = Arc::new(crate::web::Web::new(mesh.clone(), logins.clone(), sso));
    let admin = AdminService {
        mesh: mesh.clone(),
        local: false,
        limiter: limiter.clone(),
        layout,
    };
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(ControlRouter::new(ControlService {
            mesh: mesh.clone(),
            logins,
            limiter: limiter.clone(),
        }))
        .add_service(AdminServer::new(admin.clone()));
    let routes = routes.routes();
    // The admin console calls the same admin service, as the signed-in person.
    let pages = crate::web::router(web.clone()).merge(crate::console::router(web, admin));
    let routes = tonic::service::Routes::from(routes.into_axum_router().merge(pages));
    if let Some(n) = &notify {
        n.ready(&format!("serving on {bound}"));
    }
    let shutdown = async move {
        shutdown.await;
        if let Some(n) = &notify {
            n.stopping();
        }
    };
    let result = Server::builder()
        // A node whose connection died unseen (power, network) counts as
        // offline within 10 s: its subnet routes fail over to another
        // router, and its next session is not refused as a duplicate.
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .max_concurrent_streams(limits.max_streams_per_connection)
        // Bounds each call until its response starts: all of a unary call,
        // only the opening of a StreamNetMap (its body is not timed).
        .timeout(limits.request_timeout)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    ticker.abort();
    uds_task.abort();
    if let Some(d) = discovery {
        d.abort();
    }
    mesh.flush();
    if mesh.is_leader() {
        mesh.sign_audit_head(now_ms());
    }
    let _ = std::fs::remove_file(&sock);
    if let Err(e) = result {
        bail!("server failed: {}", ztmesh_proto::tls::error_chain(&e));
    }
    Ok(())
}

/// Sends systemd's watchdog keep-alives at the interval it asked for, each
/// after `probe` returned (on a blocking thread). The server's probe takes
/// the mesh lock ([`Mesh::probe`]): a lock held forever stops the
/// keep-alives, and systemd restarts the process. Store I/O (flushes,
/// pruning) runs outside that lock and does not delay them. `None` without
/// a watchdog.
fn keepalive(
    n: Arc<Notifier>,
    probe: impl Fn() + Clone + Send + Sync + 'static,
) -> Option<AbortOnDrop> {
    let every = n.keepalive_every()?;
    Some(AbortOnDrop(tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        loop {
            t.tick().await;
            if tokio::task::spawn_blocking(probe.clone()).await.is_ok() {
                n.keep_alive();
            }
        }
    })))
}

/// A task aborted when this is dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watchdog's point: a wedged mesh (its lock never released) stops
    /// the keep-alives, so systemd restarts the controller; they resume
    /// when it answers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keep_alives_stop_while_the_mesh_lock_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let recv = |within_ms: u64| {
            sock.set_read_timeout(Some(Duration::from_millis(within_ms)))
                .unwrap();
            let mut buf = [0u8; 64];
            sock.recv(&mut buf)
                .ok()
                .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        let lock = Arc::new(std::sync::Mutex::new(()));
        let held = lock.clone();
        let n = Arc::new(Notifier::at(&path, Some(Duration::from_millis(20))).unwrap());
        let _k = keepalive(n, move || drop(held.lock().unwrap())).unwrap();
        assert_eq!(recv(5_000).as_deref(), Some("WATCHDOG=1"));

        let wedged = lock.lock().unwrap();
        while recv(300).is_some() {} // one may have been on its way
        assert_eq!(recv(500), None, "no keep-alive while the lock is held");
        drop(wedged);
        assert_eq!(recv(5_000).as_deref(), Some("WATCHDOG=1"));
    }

    fn pair(name: &str) -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }

    #[test]
    fn an_admins_certificate_replaces_the_self_signed_one_and_a_mismatch_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let (_, _, self_signed) = init_tls(&dir).unwrap();
        let (cert, key) = pair("ztmesh.example.com");
        let (_, other_key) = pair("other.example.com");
        let write = |name: &str, text: &str| {
            let p = tmp.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let (c, k, bad) = (
            write("in.crt", &cert),
            write("in.key", &key),
            write("other.key", &other_key),
        );
        let e = install_tls(&dir, (&c, &bad)).unwrap_err();
        assert!(format!("{e:#}").contains("--tls-cert"), "{e:#}");
        assert_eq!(fingerprint(&dir).unwrap(), self_signed, "nothing changed");
        install_tls(&dir, (&c, &k)).unwrap();
        let fp = fingerprint(&dir).unwrap();
        assert_ne!(fp, self_signed);
        assert_eq!(fp, sha256(&pem_to_der(&cert).unwrap()));
        let mode = std::fs::metadata(dir.tls_key())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A restart keeps it (init_tls does not regenerate).
        assert_eq!(init_tls(&dir).unwrap().2, fp);
    }
}
