//! A real controller for in-process tests: TLS listener on 127.0.0.1, admin
//! unix socket and SQLite file in a temp dir, driven through real tonic
//! clients. Shared by the gRPC and hostile-client suites.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use ztmesh_controller::cli::{self, ConnArgs};
use ztmesh_controller::mesh::{Mesh, MeshConfig};
use ztmesh_controller::server::{self, DataDir, ListenerLimits};
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
        let (mesh, cert, key) = server::open(&data, cfg).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let d2 = DataDir::new(&data.root);
        let m2 = mesh.clone();
        let task = tokio::spawn(async move {
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
