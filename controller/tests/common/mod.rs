//! A real controller for in-process tests: TLS listener on 127.0.0.1, admin
//! unix socket and SQLite file in a temp dir, driven through real tonic
//! clients. Shared by the gRPC and hostile-client suites.
//!
//! With `ZTMESH_TEST_STORE=postgres` the controller keeps its state in a
//! fresh database on the PostgreSQL test cluster instead (`scripts/pg.sh`,
//! `ZTMESH_TEST_PG`): `scripts/test.sh` runs the gRPC suite both ways.
#![allow(dead_code)]

pub mod web;

use std::sync::Arc;
use std::time::Duration;

use rand_core::OsRng;
use ztmesh_controller::cli::{self, ConnArgs};
use ztmesh_controller::mesh::{Mesh, MeshConfig};
use ztmesh_controller::now_ms;
use ztmesh_controller::server::{self, DataDir, ListenerLimits};
use ztmesh_controller::store::PgOptions;
use ztmesh_proto::admin as apb;
use ztmesh_proto::auth::{self, methods, signed_request};
use ztmesh_proto::control as pb;
use ztmesh_proto::control::control_client::ControlClient;
use ztmesh_proto::keys::{SigningKey, WgPrivateKey};

/// Generous liveness bound for anything the tests wait on.
pub const LIVENESS: Duration = Duration::from_secs(10);

pub struct Ctl {
    _dir: tempfile::TempDir,
    pub data: DataDir,
    pub addr: std::net::SocketAddr,
    pub url: String,
    pub fp: [u8; 32],
    pub mesh: Arc<Mesh>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A fresh PostgreSQL database when `ZTMESH_TEST_STORE=postgres`.
fn postgres_database() -> Option<PgOptions> {
    if std::env::var("ZTMESH_TEST_STORE").ok()? != "postgres" {
        return None;
    }
    Some(fresh_postgres().expect("ZTMESH_TEST_STORE=postgres needs ZTMESH_TEST_PG (scripts/pg.sh)"))
}

/// A fresh database on the PostgreSQL test cluster (`scripts/pg.sh`,
/// `ZTMESH_TEST_PG`), or `None` without one (which fails the test when
/// `ZTMESH_REQUIRE_POSTGRES` is set).
pub fn fresh_postgres() -> Option<PgOptions> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let Ok(sock) = std::env::var("ZTMESH_TEST_PG") else {
        assert!(
            std::env::var_os("ZTMESH_REQUIRE_POSTGRES").is_none(),
            "ZTMESH_REQUIRE_POSTGRES is set but ZTMESH_TEST_PG is not (scripts/pg.sh)"
        );
        eprintln!("skipped: no PostgreSQL test cluster (scripts/pg.sh, ZTMESH_TEST_PG)");
        return None;
    };
    let port = std::env::var("ZTMESH_TEST_PG_PORT").unwrap_or_else(|_| "5432".into());
    let name = format!(
        "ctl{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let out = std::process::Command::new("psql")
        .args([
            "-h", &sock, "-p", &port, "-U", "postgres", "-d", "postgres", "-qAt",
        ])
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let url = format!("postgres://postgres@/{name}?host={sock}&port={port}");
    Some(PgOptions::parse(&url).unwrap())
}

impl Ctl {
    pub async fn start() -> Ctl {
        Self::start_with(MeshConfig::default()).await
    }

    pub async fn start_with(cfg: MeshConfig) -> Ctl {
        Self::start_with_limits(cfg, ListenerLimits::default()).await
    }

    /// Starts a controller and waits until its admin socket answers.
    pub async fn start_with_limits(cfg: MeshConfig, limits: ListenerLimits) -> Ctl {
        Self::start_on(cfg, limits, postgres_database(), None).await
    }

    /// Two controllers serving one fresh PostgreSQL database, with one
    /// identity (the second is given the first's key and certificate);
    /// `None` without the test cluster.
    pub async fn start_pair() -> Option<(Ctl, Ctl)> {
        let database = fresh_postgres()?;
        let a = Self::start_on(
            MeshConfig::default(),
            ListenerLimits::default(),
            Some(database.clone()),
            None,
        )
        .await;
        let b = Self::start_on(
            MeshConfig::default(),
            ListenerLimits::default(),
            Some(database),
            Some(&a.data),
        )
        .await;
        Some((a, b))
    }

    /// Starts a controller on a copy of the data dir `from` (its key,
    /// certificate and, without `database`, its SQLite database), or on
    /// `database` with `from`'s identity.
    pub async fn start_from(cfg: MeshConfig, database: Option<PgOptions>, from: &DataDir) -> Ctl {
        Self::start_on(cfg, ListenerLimits::default(), database, Some(from)).await
    }

    /// Starts a controller on `database` (else SQLite), with the key and
    /// certificate of `identity` if given (and its SQLite database, if it
    /// has one and `database` is not given).
    async fn start_on(
        cfg: MeshConfig,
        limits: ListenerLimits,
        database: Option<PgOptions>,
        identity: Option<&DataDir>,
    ) -> Ctl {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(&dir.path().join("data"));
        if let Some(from) = identity {
            std::fs::create_dir_all(&data.root).unwrap();
            for (src, dst) in [
                (from.signing_key(), data.signing_key()),
                (from.tls_cert(), data.tls_cert()),
                (from.tls_key(), data.tls_key()),
            ] {
                std::fs::copy(src, dst).unwrap();
            }
            // A SQLite database comes along when there is one (a fixture).
            if database.is_none() && from.db().exists() {
                std::fs::copy(from.db(), data.db()).unwrap();
            }
        }
        let server::Opened {
            mesh,
            cert,
            key,
            session,
        } = server::open(&data, cfg, database.as_ref()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let d2 = DataDir::new(&data.root);
        let m2 = mesh.clone();
        let task = tokio::spawn(async move {
            let _following = session.as_ref().map(|s| server::follow(&m2, s));
            let _session = session;
            server::run_with(
                &d2,
                m2,
                cert,
                key,
                listener,
                limits,
                Default::default(),
                async {
                    let _ = rx.await;
                },
            )
            .await
        });
        let fp = mesh.fingerprint();
        let ctl = Ctl {
            _dir: dir,
            data,
            addr,
            url: format!("https://{addr}"),
            fp,
            mesh,
            stop: Some(stop),
            task: Some(task),
        };
        for _ in 0..250 {
            if cli::connect(&ctl.conn_args()).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ctl
    }

    pub fn conn_args(&self) -> ConnArgs {
        ConnArgs {
            data_dir: self.data.root.clone(),
            server: None,
            api_key: None,
            fingerprint: None,
        }
    }

    pub async fn admin(&self) -> cli::Client {
        cli::connect(&self.conn_args()).await.unwrap()
    }

    pub async fn control(&self) -> ControlClient<tonic::transport::Channel> {
        let ch = ztmesh_proto::tls::connect(&self.url, self.fp, LIVENESS)
            .await
            .unwrap();
        ControlClient::new(ch)
    }

    /// A new auth key; its secret.
    pub async fn key(&self, user: &str, tags: &[&str], reusable: bool) -> String {
        self.admin()
            .await
            .create_auth_key(apb::CreateAuthKeyRequest {
                user: user.into(),
                tags: tags.iter().map(|s| s.to_string()).collect(),
                reusable,
                ephemeral: false,
                expiry_secs: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .secret
    }

    pub async fn set_policy(&self, text: &str) {
        self.admin()
            .await
            .set_policy(apb::SetPolicyRequest {
                file_name: "policy.hujson".into(),
                text: text.into(),
                if_version: None,
            })
            .await
            .unwrap();
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            // Cleanup, not an assertion: a stream a test left open may hold
            // the server a while.
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// A node enrolled through the real gRPC API.
pub struct TestNode {
    pub machine: SigningKey,
    pub wg: WgPrivateKey,
    pub id: u64,
    pub name: String,
}

/// A signed enrollment request for `host` with auth key `key`.
pub fn enroll_request(
    key: &str,
    machine: &SigningKey,
    wg: &WgPrivateKey,
    host: &str,
) -> pb::EnrollRequest {
    let ts = now_ms();
    let mk = machine.public().as_bytes().to_vec();
    let wk = wg.public().as_bytes().to_vec();
    let proof = machine
        .sign(&auth::enroll_message(key, &mk, &wk, host, ts))
        .to_vec();
    pb::EnrollRequest {
        auth_key: key.into(),
        machine_key: mk,
        wg_key: wk,
        hostname: host.into(),
        timestamp_ms: ts,
        proof,
    }
}

/// Enrolls a new machine through `ctl` with auth key `key`.
pub async fn enroll(ctl: &Ctl, key: &str, host: &str) -> Result<TestNode, tonic::Status> {
    let machine = SigningKey::generate(&mut OsRng);
    let wg = WgPrivateKey::generate(&mut OsRng);
    let r = ctl
        .control()
        .await
        .enroll(enroll_request(key, &machine, &wg, host))
        .await?
        .into_inner();
    Ok(TestNode {
        machine,
        wg,
        id: r.node_id,
        name: r.name,
    })
}

/// Opens `node`'s netmap stream on `ctl` (full maps only).
pub async fn open_stream(
    ctl: &Ctl,
    node: &TestNode,
) -> Result<tonic::Streaming<pb::SignedNetMap>, tonic::Status> {
    open_stream_with(ctl, node, false).await
}

/// Opens `node`'s netmap stream on `ctl`, taking deltas or not.
pub async fn open_stream_with(
    ctl: &Ctl,
    node: &TestNode,
    accept_deltas: bool,
) -> Result<tonic::Streaming<pb::SignedNetMap>, tonic::Status> {
    let req = signed_request(
        &node.machine,
        methods::STREAM_NETMAP,
        pb::StreamNetMapRequest {
            have_serial: 0,
            accept_deltas,
        },
        now_ms(),
        &mut OsRng,
    );
    Ok(ctl.control().await.stream_net_map(req).await?.into_inner())
}
