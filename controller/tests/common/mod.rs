//! A real controller for in-process tests: TLS listener on 127.0.0.1, admin
//! unix socket and SQLite file in a temp dir, driven through real tonic
//! clients. Shared by the gRPC and hostile-client suites.
//!
//! With `ZTMESH_TEST_STORE=postgres` the controller keeps its state in a
//! fresh database on the PostgreSQL test cluster instead (`scripts/pg.sh`,
//! `ZTMESH_TEST_PG`): `scripts/test.sh` runs the gRPC suite both ways.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use ztmesh_controller::cli::{self, ConnArgs};
use ztmesh_controller::mesh::{Mesh, MeshConfig};
use ztmesh_controller::server::{self, DataDir, ListenerLimits};
use ztmesh_controller::store::PgOptions;
use ztmesh_proto::admin as apb;
use ztmesh_proto::control::control_client::ControlClient;

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
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    if std::env::var("ZTMESH_TEST_STORE").ok()? != "postgres" {
        return None;
    }
    let sock =
        std::env::var("ZTMESH_TEST_PG").expect("ZTMESH_TEST_STORE=postgres needs ZTMESH_TEST_PG");
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
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(&dir.path().join("data"));
        let database = postgres_database();
        let server::Opened {
            mesh,
            cert,
            key,
            claim,
        } = server::open(&data, cfg, database.as_ref()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let d2 = DataDir::new(&data.root);
        let m2 = mesh.clone();
        let task = tokio::spawn(async move {
            let _claim = claim;
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
