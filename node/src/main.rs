//! The `ztmesh` binary: the node daemon, its CLI, and standalone tunnel mode.

use std::process::ExitCode;
use std::time::Duration;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ztmesh_node::cli::{self, AgentCmd};
use ztmesh_node::privs;
use ztmesh_proto::ops::{self, config};

/// Longest wait for the runtime's remaining tasks once `main`'s future is
/// done.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// ztmesh node: userspace WireGuard data plane and mesh agent.
#[derive(Parser, Debug)]
#[command(name = "ztmesh", version = ztmesh_proto::version_line!(), about)]
struct Cli {
    /// The daemon's local API socket (`daemon` listens on it, the other
    /// commands talk to it); before or after the subcommand.
    #[arg(
        long,
        global = true,
        env = "ZTMESH_SOCKET",
        default_value = "/run/ztmesh/ztmesh.sock"
    )]
    socket: PathBuf,
    /// Config file: `daemon`'s long flags as TOML keys (`port = 41641`).
    /// Flags given here win over the file, the file over environment
    /// variables; other commands take the keys they share with `daemon`
    /// (`socket`). Default: $ZTMESH_NODE_CONFIG, else /etc/ztmesh/node.toml
    /// if it exists; "" for none.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    log: ztmesh_proto::ops::logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

/// Where the config file is read from when `--config` is not given.
const DEFAULT_CONFIG: &str = "/etc/ztmesh/node.toml";

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a standalone WireGuard tunnel from a wg-quick config (no controller).
    Tunnel(ztmesh_node::standalone::TunnelArgs),
    #[command(flatten)]
    Agent(AgentCmd),
    #[command(flatten)]
    Ops(ops::OpsCmd),
}

/// The head of the packaged config file.
const CONFIG_HEADER: &str = "\
ztmesh node: the settings of `ztmesh daemon`.

Every key is a long flag of `ztmesh daemon --help`, without the dashes. A
flag on the command line wins over this file, and this file over environment
variables. Check it with `ztmesh config check`, then `systemctl restart
ztmesh`. The other commands (`ztmesh status`...) read `socket` from here too.
The defaults match the packaged unit (StateDirectory=ztmesh,
RuntimeDirectory=ztmesh).";

fn main() -> ExitCode {
    let (args, config_file) = match command_line(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    let cli = match Cli::command()
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Command::Ops(cmd) = &cli.command {
        let bin = ops::Binary {
            command: Cli::command(),
            name: "ztmesh",
            version: ztmesh_proto::version_line!(),
            layout: LAYOUT,
            header: CONFIG_HEADER,
            packaged: &[],
        };
        return ops::run(cmd, bin, config_file.as_ref(), check_daemon);
    }
    // Only long-running commands log; CLI commands print results and errors.
    if matches!(
        cli.command,
        Command::Tunnel(_) | Command::Agent(AgentCmd::Daemon { .. })
    ) {
        if let Err(e) = cli.log.init() {
            return fail(&anyhow::anyhow!(e));
        }
    }
    // The daemon takes its lock and socket, then drops every capability but
    // the ones it needs, while it is still one thread: capabilities are per
    // thread, and the runtime's threads inherit the reduced sets.
    let mut daemon = None;
    if let Command::Agent(cmd) = &cli.command {
        if let Some(cfg) = cli::daemon_config(cmd, &cli.socket) {
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
            (Command::Agent(cmd), None) => cli::run(cmd, &cli.socket).await,
            (Command::Ops(_), None) => unreachable!("answered before the runtime"),
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

/// Where the node's config file is; see [`config::command_line`]. `tunnel`
/// has a `--config` of its own (the wg-quick file) and no key in node.toml.
const LAYOUT: config::Layout<'static> = config::Layout {
    daemon: "daemon",
    env_var: "ZTMESH_NODE_CONFIG",
    default: DEFAULT_CONFIG,
    skip: &["tunnel"],
};

/// The command line with the config file's keys added, and the file; its
/// warnings printed.
fn command_line(
    args: Vec<OsString>,
) -> anyhow::Result<(Vec<OsString>, Option<config::ConfigFile>)> {
    let applied = config::command_line(Cli::command(), &LAYOUT, args)?;
    for w in &applied.warnings {
        eprintln!("{w}");
    }
    Ok((applied.args, applied.file))
}

/// `config check`'s part here: the daemon's settings, as it would start
/// with them.
fn check_daemon(matches: clap::ArgMatches) -> Result<String, String> {
    let parsed = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    let Command::Agent(cmd) = parsed.command else {
        unreachable!("parsed as daemon")
    };
    let cfg = cli::daemon_config(&cmd, &parsed.socket).expect("a daemon command");
    Ok(format!(
        "state dir {}, socket {}, interface {}, port {}",
        cfg.state_dir.display(),
        cfg.socket.display(),
        cfg.interface,
        cfg.listen_port
    ))
}
