//! The `ztmesh` binary.

use clap::{Parser, Subcommand};

/// ztmesh node: userspace WireGuard data plane and mesh agent.
#[derive(Parser, Debug)]
#[command(name = "ztmesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a standalone WireGuard tunnel from a wg-quick config (no controller).
    Tunnel(ztmesh_node::standalone::TunnelArgs),
}

fn main() -> anyhow::Result<()> {
    // ZTMESH_LOG=debug|trace|warn…; per-packet events are at trace.
    let level = std::env::var("ZTMESH_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Tunnel(args) => ztmesh_node::standalone::run(args).await,
        }
    })
}
