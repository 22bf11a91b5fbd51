//! The `ztmesh` binary: the node daemon, its CLI, and standalone tunnel mode.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ztmesh_node::cli::{self, AgentCmd};
use ztmesh_node::privs;

/// Longest wait for the runtime's remaining tasks once `main`'s future is
/// done.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

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
    #[command(flatten)]
    Agent(AgentCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only long-running commands log; CLI commands print results and errors.
    if matches!(
        cli.command,
        Command::Tunnel(_) | Command::Agent(AgentCmd::Daemon { .. })
    ) {
        // ZTMESH_LOG=debug|trace|warn…; per-packet events are at trace.
        let level = std::env::var("ZTMESH_LOG")
            .ok()
            .and_then(|l| l.parse().ok())
            .unwrap_or(tracing::Level::INFO);
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(level)
            .init();
    }
    // The daemon takes its lock and socket, then drops every capability but
    // the ones it needs, while it is still one thread: capabilities are per
    // thread, and the runtime's threads inherit the reduced sets.
    let mut daemon = None;
    if let Command::Agent(cmd) = &cli.command {
        if let Some(cfg) = cli::daemon_config(cmd) {
            let prepared = match ztmesh_node::agent::prepare(&cfg) {
                Ok(p) => p,
                Err(e) => return fail(&e),
            };
            match privs::restrict_to(privs::daemon_keeps()) {
                Ok(kept) => tracing::info!(
                    effective = format_args!("{:#x}", kept.effective),
                    "capabilities reduced"
                ),
                Err(e) => return fail(&e.into()),
            }
            daemon = Some((cfg, prepared));
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match (cli.command, daemon) {
            (_, Some((cfg, prepared))) => ztmesh_node::agent::run(cfg, prepared).await,
            (Command::Tunnel(args), None) => ztmesh_node::standalone::run(args).await,
            (Command::Agent(cmd), None) => cli::run(cmd).await,
        }
    });
    // Dropping the runtime would wait for every blocking task, and a posture
    // collection may be running apt-get (seconds) or stuck in a read: after
    // SIGTERM the daemon exits within this bound instead, and takes the
    // commands it started with it.
    ztmesh_node::posture::collect::kill_running();
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", format!("{e:#}").replace('\n', "\n  "));
    ExitCode::FAILURE
}
