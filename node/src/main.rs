//! `ztmesh`: the node daemon, its CLI, and standalone tunnel mode.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ztmesh_node::cli::{self, AgentCmd};

#[derive(Parser, Debug)]
#[command(name = "ztmesh", version, about = "ztmesh node: zero-trust WireGuard mesh agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Agent(AgentCmd),
}

fn main() -> ExitCode {
    let args = Cli::parse();
    let daemonish = matches!(args.cmd, Command::Agent(AgentCmd::Daemon { .. }));
    if daemonish {
        tracing_subscriber::fmt()
            .with_max_level(log_level())
            .with_target(false)
            .init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match args.cmd {
            Command::Agent(cmd) => cli::run(cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', "\n  "));
            ExitCode::FAILURE
        }
    }
}

fn log_level() -> tracing::Level {
    match std::env::var("ZTMESH_LOG").as_deref() {
        Ok("trace") => tracing::Level::TRACE,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("warn") => tracing::Level::WARN,
        Ok("error") => tracing::Level::ERROR,
        _ => tracing::Level::INFO,
    }
}
