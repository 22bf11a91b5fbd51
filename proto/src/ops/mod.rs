//! What the three binaries share to run as installed software: config files
//! ([`config`]), logging ([`logging`]), systemd notifications ([`notify`]),
//! and the version line, shell completions and man pages generated from the
//! clap definitions (here).

pub mod config;
pub mod logging;
pub mod notify;

use std::path::Path;

use clap::{Args, Command, ValueEnum};

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
