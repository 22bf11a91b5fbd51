//! What the three binaries share to run as installed software: config files
//! ([`config`]), logging ([`logging`]), systemd notifications ([`notify`]),
//! and the version line, shell completions and man pages generated from the
//! clap definitions (here).

pub mod config;
pub mod logging;
pub mod notify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Command, Subcommand, ValueEnum};

/// How an admin command prints its answer.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Tables and lines for people.
    #[default]
    Text,
    /// JSON for scripts.
    Json,
}

/// `-o text|json`, and `--json` for `-o json`.
#[derive(Args, Copy, Clone, Debug, Default)]
pub struct OutputArg {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
    /// The same as `-o json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
}

impl OutputArg {
    /// The format chosen.
    pub fn get(self) -> Output {
        if self.json {
            Output::Json
        } else {
            self.output
        }
    }
}

impl PartialEq<Output> for OutputArg {
    fn eq(&self, other: &Output) -> bool {
        self.get() == *other
    }
}

impl From<OutputArg> for Output {
    fn from(o: OutputArg) -> Self {
        o.get()
    }
}

/// `VERSION (git REV)`, for `--version` and `version`; the revision is the
/// commit the binary was built from (`unknown` outside a git checkout).
#[macro_export]
macro_rules! version_line {
    () => {
        concat!(
            env!("CARGO_PKG_VERSION"),
            " (git ",
            env!("ZTMESH_GIT_REV"),
            ")"
        )
    };
}

/// The subcommands the controller and the node share for running as
/// installed software (flattened into each binary's own).
#[derive(Subcommand, Debug)]
pub enum OpsCmd {
    /// Check the daemon's config file, or print one documenting every key.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print the version and the git revision it was built from.
    Version,
    /// Print a shell completion script: `source <(BINARY completion bash)`.
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
pub enum ConfigCmd {
    /// Read the config file (`--config`, else the packaged path) as the
    /// daemon would, down to the files it names, and report the first
    /// problem (FILE:LINE:COL) or that it is fine; changes nothing.
    Check,
    /// Print a config file documenting every key with its default (the
    /// packaged one).
    Example,
}

/// What [`run`] needs to know about a binary.
#[derive(Debug)]
pub struct Binary<'a> {
    /// Its clap definition.
    pub command: Command,
    /// `ztmesh`, `ztmesh-controller`.
    pub name: &'a str,
    /// [`version_line!`] expanded in the binary's crate.
    pub version: &'a str,
    /// Where its config file is and which subcommand it configures.
    pub layout: config::Layout<'a>,
    /// The head comment of `config example`.
    pub header: &'a str,
    /// The keys the packaged config file sets (TOML values).
    pub packaged: &'a [(&'a str, &'a str)],
}

/// Runs one of the shared subcommands: `config check` (the file as
/// [`command_line`](config::command_line) read it, then the binary's own
/// `check` of the settings it makes), `config example`, `version`,
/// `completion`, `man-pages`. Prints the answer, or the error as one line.
pub fn run(
    cmd: &OpsCmd,
    bin: Binary<'_>,
    file: Option<&config::ConfigFile>,
    check: impl FnOnce(clap::ArgMatches) -> Result<String, String>,
) -> ExitCode {
    let answer = match cmd {
        OpsCmd::Version => Ok(format!("{} {}", bin.name, bin.version)),
        OpsCmd::Completion { shell } => {
            print_completion(bin.command, *shell);
            return ExitCode::SUCCESS;
        }
        OpsCmd::ManPages { dir } => write_man_pages(bin.command, dir)
            .map(|_| String::new())
            .map_err(|e| format!("writing man pages into {}: {e}", dir.display())),
        OpsCmd::Config(ConfigCmd::Example) => {
            let daemon = config::daemon_command(bin.command, bin.layout.daemon);
            Ok(config::example(&daemon, bin.header, bin.packaged))
        }
        OpsCmd::Config(ConfigCmd::Check) => check_config(bin, file, check),
    };
    match answer {
        Ok(text) => {
            print!("{text}");
            if !text.is_empty() && !text.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `config check`: the daemon's command line made of the file alone (with
/// the environment the daemon would see), parsed by clap, then `check`.
fn check_config(
    bin: Binary<'_>,
    file: Option<&config::ConfigFile>,
    check: impl FnOnce(clap::ArgMatches) -> Result<String, String>,
) -> Result<String, String> {
    let Some(file) = file else {
        return Err(format!(
            "no config file: {} does not exist (or name one with --config FILE)",
            bin.layout.default
        ));
    };
    let daemon = config::daemon_command(bin.command.clone(), bin.layout.daemon);
    let argv = vec![bin.name.into(), bin.layout.daemon.into()];
    let (argv, _) = config::apply(argv, file, &daemon, true);
    let matches = config::parse_whole(bin.command, argv, &file.path).map_err(|e| e.to_string())?;
    let summary = check(matches).map_err(|e| format!("{}: {e}", file.path))?;
    Ok(format!(
        "{}: ok ({} keys; {summary})",
        file.path,
        file.entries.len()
    ))
}

/// Writes `cmd`'s completion script for `shell` to stdout.
pub fn print_completion(mut cmd: Command, shell: clap_complete::Shell) {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// Writes a man page (section 1) for `cmd` and one per subcommand
/// (`NAME-SUB.1`, as git does) into `dir`; returns the files written.
///
/// # Errors
/// The directory cannot be written.
pub fn write_man_pages(cmd: Command, dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut cmd = cmd;
    cmd.build();
    write_page(&cmd, cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn write_page(
    cmd: &Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<std::path::PathBuf>,
) -> std::io::Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    let page = cmd.clone().name(clap::builder::Str::from(name.to_owned()));
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    std::fs::write(&path, out)?;
    written.push(path);
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        write_page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
