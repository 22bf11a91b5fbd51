//! The `ztmesh` binary: the node daemon, its CLI, and standalone tunnel mode.

use std::process::ExitCode;
use std::time::Duration;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ztmesh_node::cli::{self, AgentCmd};
use ztmesh_node::privs;
use ztmesh_proto::ops::logging::LogFormat;
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
    /// Log filter of `daemon` and `tunnel`: a level (error, warn, info,
    /// debug, trace; per-packet events are at trace) or per module
    /// (`info,ztmesh_node::nat=debug`).
    #[arg(long, global = true, env = "ZTMESH_LOG", default_value = "info")]
    log_level: String,
    /// Log lines as text, or as JSON objects for a log collector.
    #[arg(
        long,
        global = true,
        env = "ZTMESH_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: LogFormat,
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
    /// Check the config file (`--config`, else /etc/ztmesh/node.toml) as
    /// `daemon` would read it.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print the version and the git revision it was built from.
    Version,
    /// Print a shell completion script: `source <(ztmesh completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for every command into DIR (packaging).
    #[command(hide = true)]
    ManPages { dir: PathBuf },
}

/// `config` subcommands.
#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Read the config file as `daemon` would and report the first
    /// problem (FILE:LINE:COL) or that it is fine.
    Check,
    /// Print a config file documenting every key with its default (the
    /// packaged /etc/ztmesh/node.toml).
    Example,
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
    match &cli.command {
        Command::Version => {
            println!("ztmesh {}", ztmesh_proto::version_line!());
            return ExitCode::SUCCESS;
        }
        Command::Completion { shell } => {
            ops::print_completion(Cli::command(), *shell);
            return ExitCode::SUCCESS;
        }
        Command::ManPages { dir } => {
            return match ops::write_man_pages(Cli::command(), dir) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&anyhow::anyhow!(
                    "writing man pages into {}: {e}",
                    dir.display()
                )),
            };
        }
        Command::Config(ConfigCmd::Example) => {
            let daemon = config::daemon_command(Cli::command(), "daemon");
            print!("{}", config::example(&daemon, CONFIG_HEADER, &[]));
            return ExitCode::SUCCESS;
        }
        Command::Config(ConfigCmd::Check) => {
            return match check_config(config_file.as_ref()) {
                Ok(msg) => {
                    println!("{msg}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        _ => {}
    }
    // Only long-running commands log; CLI commands print results and errors.
    if matches!(
        cli.command,
        Command::Tunnel(_) | Command::Agent(AgentCmd::Daemon { .. })
    ) {
        if let Err(e) = ops::logging::init(cli.log_format, &cli.log_level) {
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
            (_, None) => unreachable!("answered before the runtime"),
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

/// `config check`: the file as `daemon` would take it, with the
/// environment `daemon` would see; nothing is bound or written.
fn check_config(file: Option<&config::ConfigFile>) -> anyhow::Result<String> {
    let Some(file) = file else {
        anyhow::bail!(
            "no config file: {DEFAULT_CONFIG} does not exist (or name one with --config FILE)"
        );
    };
    let daemon = config::daemon_command(Cli::command(), "daemon");
    let argv = vec!["ztmesh".into(), "daemon".into()];
    let (argv, _) = config::apply(argv, file, &daemon, true);
    let matches = config::parse_whole(Cli::command(), argv, &file.path)?;
    let parsed =
        Cli::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{}: {e}", file.path))?;
    let Command::Agent(cmd) = parsed.command else {
        unreachable!("parsed as daemon")
    };
    let cfg = cli::daemon_config(&cmd, &parsed.socket).expect("a daemon command");
    Ok(format!(
        "{}: ok ({} keys; state dir {}, socket {}, interface {}, port {})",
        file.path,
        file.entries.len(),
        cfg.state_dir.display(),
        cfg.socket.display(),
        cfg.interface,
        cfg.listen_port
    ))
}
