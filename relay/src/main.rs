//! `ztmesh-relay`: serve, print the identity, print the stats.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use ztmesh_proto::keys::PublicKey;
use ztmesh_relay::datadir::{read_identity, DataDir};
use ztmesh_relay::server::{self, ServeConfig, DEFAULT_MAX_NODES, DEFAULT_MEMORY_BUDGET};

#[derive(Parser)]
#[command(
    name = "ztmesh-relay",
    version = ztmesh_proto::version_line!(),
    about = "Relays already-encrypted WireGuard datagrams between paired ztmesh nodes (QUIC, TLS/TCP) and answers STUN"
)]
struct Cli {
    #[command(flatten)]
    log: ztmesh_proto::ops::logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the relay until SIGINT or SIGTERM.
    Serve(Serve),
    /// Prints the relay's identity (name, addresses, certificate SHA-256) as
    /// one JSON line, the fields of the netmap's `Relay` message.
    Identity {
        #[arg(long, default_value = "./ztmesh-relay-data")]
        data_dir: PathBuf,
    },
    /// Prints the version and the git revision it was built from.
    Version,
    /// Prints a shell completion script: `source <(ztmesh-relay completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Writes man pages for every command into DIR (packaging).
    #[command(hide = true)]
    ManPages { dir: PathBuf },
    /// Prints the stats the running relay writes every second.
    Stats {
        #[arg(long, default_value = "./ztmesh-relay-data")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct Serve {
    /// The relay's name; node proofs are bound to it.
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "./ztmesh-relay-data")]
    data_dir: PathBuf,
    /// UDP address for QUIC.
    #[arg(long)]
    quic_listen: SocketAddr,
    /// TCP address for the TLS fallback (443 in production).
    #[arg(long)]
    tcp_listen: SocketAddr,
    /// UDP address(es) answering STUN binding requests (at most two).
    #[arg(long)]
    stun_listen: Vec<SocketAddr>,
    /// The controller's netmap signing key (base64), as `ztmesh-controller serve` prints it.
    #[arg(long, conflicts_with = "controller_key_file")]
    controller_key: Option<String>,
    /// A file holding the controller's key.
    #[arg(long)]
    controller_key_file: Option<PathBuf>,
    /// Most nodes connected at once.
    #[arg(long, default_value_t = DEFAULT_MAX_NODES)]
    max_nodes: usize,
    /// Most estimated bytes of session state; beyond it new nodes are refused.
    #[arg(long, default_value_t = DEFAULT_MEMORY_BUDGET)]
    memory_budget: u64,
    /// Transport handshake plus HELLO must finish within this many seconds.
    #[arg(long, default_value_t = 10)]
    handshake_timeout_secs: u64,
    /// Open connections per source address.
    #[arg(long, default_value_t = 32)]
    max_conns_per_source: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(s) => {
            cli.log.init().map_err(anyhow::Error::msg)?;
            serve(s)
        }
        Command::Version => {
            println!("ztmesh-relay {}", ztmesh_proto::version_line!());
            Ok(())
        }
        Command::Completion { shell } => {
            ztmesh_proto::ops::print_completion(Cli::command(), shell);
            Ok(())
        }
        Command::ManPages { dir } => {
            ztmesh_proto::ops::write_man_pages(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            Ok(())
        }
        Command::Identity { data_dir } => {
            let id = read_identity(&DataDir::new(data_dir))?;
            println!("{}", serde_json::to_string(&id)?);
            Ok(())
        }
        Command::Stats { data_dir } => {
            let dir = DataDir::new(data_dir);
            let text = std::fs::read_to_string(dir.stats()).with_context(|| {
                format!("reading {} (is the relay running?)", dir.stats().display())
            })?;
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            Ok(())
        }
    }
}

fn serve(s: Serve) -> anyhow::Result<()> {
    let key_text = match (&s.controller_key, &s.controller_key_file) {
        (Some(k), None) => k.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        _ => anyhow::bail!("give --controller-key KEY or --controller-key-file FILE"),
    };
    let controller_key: PublicKey = key_text
        .trim()
        .parse()
        .context("the controller key is not base64 of an ed25519 public key")?;
    let mut cfg = ServeConfig::new(
        &s.name,
        DataDir::new(s.data_dir),
        s.quic_listen,
        s.tcp_listen,
        s.stun_listen,
        controller_key,
    );
    cfg.max_nodes = s.max_nodes;
    cfg.memory_budget = s.memory_budget;
    cfg.handshake_timeout = Duration::from_secs(s.handshake_timeout_secs.max(1));
    cfg.max_conns_per_source = s.max_conns_per_source.max(1);
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        // Signals are caught before the identity is printed, so a caller
        // may stop the relay as soon as it has read that line.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("installing the SIGINT handler")?;
        let running = server::start(cfg).await?;
        println!("{}", serde_json::to_string(&running.identity)?);
        // Under systemd (Type=notify): ready once every listener is bound.
        let notify = ztmesh_proto::ops::notify::Notifier::from_env();
        if let Some(n) = &notify {
            n.ready(&format!("relay {} serving", running.identity.name));
        }
        running
            .run_until(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if let Some(n) = &notify {
                    n.stopping();
                }
            })
            .await
    })
}
