//! The admin API client: over the data dir's unix socket, or to a remote
//! controller with a pinned TLS fingerprint and an API key.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use ztmesh_proto::admin::admin_client::AdminClient;

use super::ConnArgs;
use crate::server::DataDir;

#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = AdminClient<InterceptedService<Channel, Auth>>;

/// Connects to the controller's admin API.
pub async fn connect(conn: &ConnArgs) -> anyhow::Result<Client> {
    let timeout = Duration::from_secs(10);
    if let Some(url) = &conn.server {
        let key = conn
            .api_key
            .as_deref()
            .ok_or_else(|| anyhow!("--server needs --api-key"))?;
        let fp = conn
            .fingerprint
            .as_deref()
            .and_then(ztmesh_proto::auth::parse_fingerprint)
            .ok_or_else(|| anyhow!("--server needs --fingerprint (64 hex characters)"))?;
        let ch = ztmesh_proto::tls::connect(url, fp, timeout).await?;
        let v: MetadataValue<Ascii> = format!("Bearer {key}")
            .parse()
            .map_err(|_| anyhow!("API key contains invalid characters"))?;
        return Ok(AdminClient::with_interceptor(ch, Auth(Some(v))));
    }
    let sock = DataDir::new(&conn.data_dir).admin_socket();
    let ch = connect_unix(&sock, timeout).await?;
    Ok(AdminClient::with_interceptor(ch, Auth(None)))
}

/// A refused call as the one-line error the CLI prints (the status message).
pub(super) fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}", s.message())
}

async fn connect_unix(sock: &Path, timeout: Duration) -> anyhow::Result<Channel> {
    let path = sock.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    });
    Endpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .connect_with_connector(connector)
        .await
        .with_context(|| {
            format!(
                "cannot reach the controller's admin socket {} (is `ztmesh-controller serve` running with this --data-dir?)",
                sock.display()
            )
        })
}
