//! Standalone mode: `ztmesh tunnel --config FILE.conf` runs the data plane
//! from a wg-quick file, as a userspace WireGuard. There is no controller and no
//! policy: all traffic from configured peers is accepted, with strict cryptokey
//! routing still enforced. `wg` works against the UAPI socket, and `wg set` is
//! accepted.

use std::path::PathBuf;

use anyhow::Context as _;
use ipnet::IpNet;

use crate::io::{DataPlane, DataPlaneConfig, DEFAULT_INTERFACE, DEFAULT_MTU, DEFAULT_UAPI_DIR};
use crate::wgconf;

/// Arguments of `ztmesh tunnel`.
#[derive(clap::Args, Debug, Clone)]
pub struct TunnelArgs {
    /// wg-quick configuration file ([Interface] and [Peer] sections).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// TUN interface name; also names the UAPI socket IFACE.sock.
    #[arg(long, short = 'i', default_value = DEFAULT_INTERFACE)]
    pub interface: String,
    /// Directory of the UAPI socket (`wg show IFACE` looks in /var/run/wireguard).
    #[arg(long, default_value = DEFAULT_UAPI_DIR)]
    pub uapi_dir: PathBuf,
    /// Do not create a UAPI socket.
    #[arg(long)]
    pub no_uapi: bool,
}

/// Runs the tunnel until SIGINT or SIGTERM.
///
/// # Errors
/// The file cannot be read or parsed, has no PrivateKey, an endpoint does not
/// resolve, or the data plane cannot start.
pub async fn run(args: TunnelArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg = wgconf::parse(&text).with_context(|| format!("{}", args.config.display()))?;
    for (line, key) in &cfg.ignored {
        tracing::warn!(line, key = %key, "wg-quick key ignored by ztmesh tunnel");
    }
    let private_key = cfg
        .interface
        .private_key
        .clone()
        .with_context(|| format!("{}: [Interface] has no PrivateKey", args.config.display()))?;
    let mut peers = Vec::with_capacity(cfg.peers.len());
    for p in &cfg.peers {
        peers.push(
            p.to_peer_config()
                .with_context(|| format!("peer {}", p.public_key))?,
        );
    }
    // As wg-quick: route every AllowedIP into the tunnel. Default routes would
    // capture the underlay itself and need policy routing, which is out of scope.
    let mut routes: Vec<IpNet> = Vec::new();
    for net in peers.iter().flat_map(|p| p.allowed_ips.iter()) {
        if net.prefix_len() == 0 {
            tracing::warn!(%net, "not routing a default route into the tunnel");
        } else if !routes.contains(net) {
            routes.push(*net);
        }
    }
    let plane = DataPlane::start(DataPlaneConfig {
        interface: args.interface.clone(),
        mtu: cfg.interface.mtu.unwrap_or(DEFAULT_MTU),
        private_key: private_key.clone(),
        listen_port: cfg.interface.listen_port.unwrap_or(0),
        addresses: cfg.interface.addresses.clone(),
        routes,
        uapi_dir: (!args.no_uapi).then(|| args.uapi_dir.clone()),
        managed: false,
    })
    .await?;
    plane.set_filter(None);
    plane.set_peers(peers);
    tracing::info!(
        interface = %args.interface,
        public_key = %private_key.public(),
        port = plane.local_port(),
        peers = cfg.peers.len(),
        "tunnel up"
    );
    wait_for_signal().await?;
    plane.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
