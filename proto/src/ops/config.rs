//! Config files for the daemons (`/etc/ztmesh/controller.toml` for
//! `ztmesh-controller serve`, `/etc/ztmesh/node.toml` for `ztmesh daemon`).
//!
//! A file is flat TOML whose keys are the daemon's long flags without the
//! dashes (`listen = "[::]:8443"`, `detect-exempt-tag = ["tag:scanner"]`,
//! `metrics-listen = "127.0.0.1:9464"`); a switch takes `true` or `false`.
//! The clap definition is the schema, so every flag is settable and no key
//! can drift from its flag: an unknown key, a value of the wrong shape or a
//! value the flag's own parser refuses is an error naming FILE:LINE:COL.
//!
//! Order, highest first: the command line, the file, the environment
//! (`ZTMESH_*` variables of the flags that have one), the default. A file
//! key that hides a set environment variable says so on stderr.
//!
//! The file is applied by adding `--KEY=VALUE` to the command line for every
//! key the command line does not already give, so clap checks the result
//! exactly as it checks flags. Other subcommands take the keys they share
//! with the daemon (`data-dir` for the admin CLI, `socket` for `ztmesh
//! status`), and only those.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::Command;
use toml::de::{DeTable, DeValue};

/// Where a key or value starts in the file, 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// A config file that cannot be used, with where and why.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub pos: Option<Pos>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(f, "{}:{}:{}: {}", self.file, p.line, p.col, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// One `key = value` line, its value as the flag's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub at: Pos,
    /// The value's words: one per array element, none for a switch set to
    /// `false`, and `None` for a switch set to `true` (the bare flag).
    pub values: Vec<Option<String>>,
}

/// A parsed config file, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFile {
    pub path: String,
    pub entries: Vec<Entry>,
}

impl ConfigFile {
    /// The entry of `key`, if the file sets it.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The flag words this file adds to a command line: `--KEY=VALUE` per
    /// value of every entry `keep` accepts.
    fn words(&self, keep: impl Fn(&Entry) -> bool) -> Vec<OsString> {
        let mut out = Vec::new();
        for e in self.entries.iter().filter(|e| keep(e)) {
            for v in &e.values {
                out.push(match v {
                    Some(v) => format!("--{}={v}", e.key).into(),
                    None => format!("--{}", e.key).into(),
                });
            }
        }
        out
    }
}

/// The config file to read: `--config PATH` or `--config=PATH` on the
/// command line, else `$env_var`, else `default` if it exists. `None` when
/// none applies; an explicit path that is missing is an error later, when
/// it is read. `--config ""` turns the file off.
pub fn locate(args: &[OsString], env_var: &str, default: &Path) -> Option<PathBuf> {
    let mut explicit = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let Some(a) = a.to_str() else { continue };
        if a == "--" {
            break;
        }
        if a == "--config" {
            explicit = it.next().map(PathBuf::from);
        } else if let Some(p) = a.strip_prefix("--config=") {
            explicit = Some(PathBuf::from(p));
        }
    }
    let chosen = explicit.or_else(|| std::env::var_os(env_var).map(PathBuf::from));
    match chosen {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p),
        None => default.exists().then(|| default.to_path_buf()),
    }
}

/// Reads and parses `path` against `daemon` (the subcommand the file
/// configures, as built by [`daemon_command`]).
///
/// # Errors
/// The file unreadable, not TOML, or a key or value `daemon` refuses.
pub fn load(path: &Path, daemon: &Command) -> Result<ConfigFile, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: shown.clone(),
        pos: None,
        message: e.to_string(),
    })?;
    parse(&shown, &text, daemon)
}

/// `cmd`'s subcommand `name` with the root's global flags propagated into
/// it, which [`load`] checks keys against.
///
/// # Panics
/// If `cmd` has no subcommand `name` (a programming error).
pub fn daemon_command(mut cmd: Command, name: &str) -> Command {
    cmd.build();
    cmd.find_subcommand(name)
        .unwrap_or_else(|| panic!("no subcommand {name}"))
        .clone()
}

/// Flags a config file may not set: they choose the file, end the
/// program, or are a secret (a config file is readable by the service's
/// user; secrets come from 0600 files or the unit's EnvironmentFile).
const NOT_KEYS: [&str; 4] = ["config", "help", "version", "api-key"];

/// Parses config `text` (named `file` in errors) against `daemon`. Pure.
///
/// # Errors
/// See [`load`].
pub fn parse(file: &str, text: &str, daemon: &Command) -> Result<ConfigFile, ConfigError> {
    let err = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
        file: file.to_owned(),
        pos: span.map(|s| pos_of(text, s.start)),
        message,
    };
    let table = DeTable::parse(text).map_err(|e| err(e.span(), e.message().to_owned()))?;
    let mut entries = Vec::new();
    // The table is a map; its keys are taken in file order, so the first
    // mistake reported is the first in the file.
    let mut pairs: Vec<_> = table.get_ref().iter().collect();
    pairs.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in pairs {
        let name: &str = key.get_ref();
        let arg = daemon
            .get_arguments()
            .find(|a| a.get_long() == Some(name) && !NOT_KEYS.contains(&name));
        let Some(arg) = arg else {
            let hint = match daemon
                .get_arguments()
                .filter_map(|a| a.get_long())
                .find(|l| !NOT_KEYS.contains(l) && *l == name.replace('_', "-"))
            {
                Some(l) => format!("; did you mean `{l}`?"),
                None => format!(
                    "; keys are the long flags of `{} --help` without the dashes",
                    daemon.get_name()
                ),
            };
            return Err(err(Some(key.span()), format!("unknown key `{name}`{hint}")));
        };
        let takes_value = arg.get_action().takes_values();
        let many = matches!(arg.get_action(), clap::ArgAction::Append)
            || arg.get_value_delimiter().is_some();
        let words = |v: &toml::Spanned<DeValue<'_>>| -> Result<Option<String>, ConfigError> {
            let word = match v.get_ref() {
                DeValue::String(s) => s.to_string(),
                DeValue::Integer(i) if i.radix() == 10 => i.as_str().replace('_', ""),
                DeValue::Integer(_) => {
                    return Err(err(
                        Some(v.span()),
                        format!("`{name}`: write the number in decimal"),
                    ))
                }
                DeValue::Boolean(b) if takes_value => b.to_string(),
                DeValue::Boolean(true) => return Ok(None),
                other => {
                    let expected = if takes_value {
                        "a string or an integer"
                    } else {
                        "true or false"
                    };
                    return Err(err(
                        Some(v.span()),
                        format!("`{name}`: expected {expected}, not {}", other.type_str()),
                    ));
                }
            };
            if !takes_value {
                return Err(err(
                    Some(v.span()),
                    format!("`{name}` is a switch: expected true or false"),
                ));
            }
            if let Err(e) = check_value(arg, &word) {
                return Err(err(
                    Some(v.span()),
                    format!("`{name}`: {}", clap_reason(&e)),
                ));
            }
            Ok(Some(word))
        };
        let values = match value.get_ref() {
            DeValue::Array(items) if many => items.iter().map(&words).collect::<Result<_, _>>()?,
            DeValue::Array(_) => {
                return Err(err(
                    Some(value.span()),
                    format!("`{name}` takes one value, not a list"),
                ))
            }
            DeValue::Boolean(false) if !takes_value => Vec::new(),
            _ => vec![words(value)?],
        };
        entries.push(Entry {
            key: name.to_owned(),
            at: pos_of(text, key.span().start),
            values,
        });
    }
    Ok(ConfigFile {
        path: file.to_owned(),
        entries,
    })
}

/// A config file documenting every key of `daemon`: its help and default,
/// commented out, except the `set` keys, which are written active with the
/// given TOML values (the packaged defaults). Pure.
pub fn example(daemon: &Command, header: &str, set: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str(format!("# {line}").trim_end());
        out.push('\n');
    }
    for arg in daemon.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_KEYS.contains(&long) || arg.is_hide_set() {
            continue;
        }
        out.push('\n');
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        if !help.trim().is_empty() {
            for line in wrap(&help, 76) {
                out.push_str(format!("# {line}").trim_end());
                out.push('\n');
            }
        }
        let takes_value = arg.get_action().takes_values();
        let many = matches!(arg.get_action(), clap::ArgAction::Append)
            || arg.get_value_delimiter().is_some();
        if let Some(env) = arg.get_env() {
            out.push_str(&format!("# (environment: ${})\n", env.to_string_lossy()));
        }
        if let Some((_, v)) = set.iter().find(|(k, _)| *k == long) {
            out.push_str(&format!("{long} = {v}\n"));
            continue;
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| toml_value(&d.to_string_lossy()))
            .collect();
        let value = match (takes_value, many, defaults.as_slice()) {
            (false, _, _) => "false".to_owned(),
            (true, true, d) => format!("[{}]", d.join(", ")),
            (true, false, [d]) => d.clone(),
            (true, false, _) => {
                let name = arg
                    .get_value_names()
                    .and_then(|n| n.first())
                    .map_or_else(|| long.to_uppercase(), ToString::to_string);
                out.push_str("# (unset by default)\n");
                format!("\"{name}\"")
            }
        };
        out.push_str(&format!("#{long} = {value}\n"));
    }
    out
}

/// A default as a TOML value: integers bare, the rest quoted.
fn toml_value(v: &str) -> String {
    if !v.is_empty() && v.len() < 19 && v.bytes().all(|b| b.is_ascii_digit()) {
        v.to_owned()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// `text` in lines of at most `width` characters (words kept whole);
/// paragraphs (blank lines) kept.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.split("\n\n") {
        if !lines.is_empty() {
            lines.push(String::new());
        }
        let mut cur = String::new();
        for word in para.split_whitespace() {
            if !cur.is_empty() && cur.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut cur));
            }
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
        lines.push(cur);
    }
    lines
}

/// Runs `arg`'s value parser on one `word`, on a command of its own (its
/// relations to other flags are checked later, on the whole command line).
fn check_value(arg: &clap::Arg, word: &str) -> Result<(), clap::Error> {
    let long = arg.get_long().unwrap_or_default();
    let value_name = arg
        .get_value_names()
        .and_then(|n| n.first())
        .map_or_else(|| long.to_uppercase(), ToString::to_string);
    let alone = clap::Arg::new(arg.get_id().clone())
        .long(long.to_owned())
        .value_name(value_name)
        .value_parser(arg.get_value_parser().clone())
        .value_delimiter(arg.get_value_delimiter())
        .action(clap::ArgAction::Append)
        .allow_hyphen_values(true);
    Command::new("config")
        .no_binary_name(true)
        .arg(alone)
        .try_get_matches_from([OsString::from(format!("--{long}={word}"))])
        .map(drop)
}

/// Why clap refused a value, without its `error: ` prefix and usage lines.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let reason: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    reason.join(" ").trim_start_matches("error: ").to_owned()
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn pos_of(text: &str, offset: usize) -> Pos {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Pos {
        line: before.matches('\n').count() + 1,
        col: before[line_start..].chars().count() + 1,
    }
}

/// `args` (a whole command line, program name first) with `file`'s keys
/// added for everything the command line leaves out, and a warning for
/// each key that hides a set environment variable. `invoked` is the
/// subcommand being run, with the root's globals propagated (see
/// [`daemon_command`]): the daemon takes every key, another subcommand only
/// the global flags it shares with it (`data-dir`, `socket`): a local flag
/// of the same name may mean something else there.
pub fn apply(
    args: Vec<OsString>,
    file: &ConfigFile,
    invoked: &Command,
    is_daemon: bool,
) -> (Vec<OsString>, Vec<String>) {
    let given = given_longs(&args);
    let flag = |key: &str| {
        invoked
            .get_arguments()
            .find(|a| a.get_long() == Some(key) && (is_daemon || a.is_global_set()))
    };
    let applies = |e: &Entry| !given.iter().any(|g| g == &e.key) && flag(&e.key).is_some();
    let mut warnings = Vec::new();
    for e in file
        .entries
        .iter()
        .filter(|e| applies(e) && !e.values.is_empty())
    {
        let env = flag(&e.key).and_then(|a| a.get_env());
        if let Some(var) = env.filter(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty())) {
            warnings.push(format!(
                "warning: {}:{}: `{}` is set here, so ${} is ignored",
                file.path,
                e.at.line,
                e.key,
                var.to_string_lossy()
            ));
        }
    }
    let words = file.words(applies);
    let mut out = args;
    let at = out.iter().position(|a| a == "--").unwrap_or(out.len());
    out.splice(at..at, words);
    (out, warnings)
}

/// Where a binary's config file is and which command it configures.
#[derive(Clone, Copy, Debug)]
pub struct Layout<'a> {
    /// The subcommand the file configures (`serve`, `daemon`).
    pub daemon: &'a str,
    /// The environment variable naming the file.
    pub env_var: &'a str,
    /// The file read when neither `--config` nor the variable names one.
    pub default: &'a str,
    /// Subcommands that never read it (one with a `--config` of its own).
    pub skip: &'a [&'a str],
}

/// A command line with its config file applied.
#[derive(Debug)]
pub struct Applied {
    pub args: Vec<OsString>,
    pub file: Option<ConfigFile>,
    pub warnings: Vec<String>,
}

/// Subcommands that never read the config file: they must work to fix a
/// broken one.
const NO_CONFIG: [&str; 5] = ["help", "version", "completion", "man-pages", "example"];

/// `args` with the config file of `layout` applied (see the module doc).
/// Help, version, completion, man pages and `config example` never read it,
/// nor does a command line clap cannot parse (its error comes later, from
/// clap, naming the flags).
///
/// # Errors
/// The file unreadable or refused, except for a command line asking for
/// help or the version.
pub fn command_line(
    root: Command,
    layout: &Layout<'_>,
    args: Vec<OsString>,
) -> Result<Applied, ConfigError> {
    let unchanged = |args| Applied {
        args,
        file: None,
        warnings: Vec::new(),
    };
    let Some(invoked) = invoked_command(root.clone(), &args) else {
        return Ok(unchanged(args));
    };
    let name = invoked.get_name();
    if NO_CONFIG.contains(&name) || layout.skip.contains(&name) {
        return Ok(unchanged(args));
    }
    let Some(path) = locate(&args, layout.env_var, Path::new(layout.default)) else {
        return Ok(unchanged(args));
    };
    let file = match load(&path, &daemon_command(root, layout.daemon)) {
        Ok(f) => f,
        Err(_) if asks_for_help(&args) => return Ok(unchanged(args)),
        Err(e) => return Err(e),
    };
    let (args, warnings) = apply(args, &file, &invoked, name == layout.daemon);
    Ok(Applied {
        args,
        file: Some(file),
        warnings,
    })
}

/// `-h`, `--help`, `-V` or `--version` anywhere before `--`.
fn asks_for_help(args: &[OsString]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| matches!(a.to_str(), Some("-h" | "--help" | "-V" | "--version")))
}

/// The long flags a command line gives (`--name` or `--name=value`),
/// before any `--`.
fn given_longs(args: &[OsString]) -> Vec<String> {
    args.iter()
        .skip(1)
        .map_while(|a| a.to_str().filter(|a| *a != "--").map(str::to_owned))
        .filter_map(|a| {
            let name = a.strip_prefix("--")?;
            Some(name.split_once('=').map_or(name, |(n, _)| n).to_owned())
        })
        .collect()
}

/// `argv` (a daemon command line made by [`apply`] for `config check`)
/// parsed by `root`; clap's refusal as one line naming `file`.
///
/// # Errors
/// What clap refuses (a flag's relation to another, e.g. one that requires
/// a second).
pub fn parse_whole(
    root: Command,
    argv: Vec<OsString>,
    file: &str,
) -> Result<clap::ArgMatches, ConfigError> {
    root.try_get_matches_from(argv).map_err(|e| ConfigError {
        file: file.to_owned(),
        pos: None,
        message: clap_reason(&e),
    })
}

/// The subcommand a command line runs, with the root's globals propagated:
/// the deepest one clap recognizes, parsing leniently (a command line with
/// a bad value still names its subcommand; clap reports the error later).
/// `None` when clap stops early: help or the version asked for, or no
/// subcommand it knows.
pub fn invoked_command(root: Command, args: &[OsString]) -> Option<Command> {
    let m = root
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(args)
        .ok()?;
    let mut cur = root;
    cur.build();
    let mut matches = &m;
    while let Some((name, sub)) = matches.subcommand() {
        cur = cur.find_subcommand(name)?.clone();
        matches = sub;
    }
    Some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn daemon() -> Command {
        let root = Command::new("ztm")
            .arg(Arg::new("config").long("config").global(true))
            .arg(
                Arg::new("data-dir")
                    .long("data-dir")
                    .global(true)
                    .env("ZTM_TEST_DATA_DIR"),
            )
            .subcommand(
                Command::new("serve")
                    .arg(
                        Arg::new("listen")
                            .long("listen")
                            .value_parser(clap::value_parser!(std::net::SocketAddr)),
                    )
                    .arg(
                        Arg::new("limit")
                            .long("limit")
                            .value_parser(clap::value_parser!(u32)),
                    )
                    .arg(Arg::new("tag").long("tag").action(ArgAction::Append))
                    .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue)),
            )
            .subcommand(Command::new("status"));
        daemon_command(root, "serve")
    }

    fn at(line: usize, col: usize) -> Option<Pos> {
        Some(Pos { line, col })
    }

    #[test]
    fn every_kind_of_value_becomes_flag_words() {
        let text = "listen = \"[fd00::1]:8443\"\nlimit = 1_000\ntag = [\"a\", \"b\"]\nquiet = true\ndata-dir = \"/var/lib/x\"\n";
        let f = parse("c.toml", text, &daemon()).unwrap();
        let words: Vec<_> = f.words(|_| true);
        assert_eq!(
            words,
            [
                "--listen=[fd00::1]:8443",
                "--limit=1000",
                "--tag=a",
                "--tag=b",
                "--quiet",
                "--data-dir=/var/lib/x"
            ]
            .map(OsString::from)
        );
        assert_eq!(f.entries[2].at, Pos { line: 3, col: 1 });
        let off = parse("c.toml", "quiet = false\n", &daemon()).unwrap();
        assert!(off.words(|_| true).is_empty());
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let cases = [
            (
                "listen = \"[::]:1\"\nlisen = \"y\"\n",
                at(2, 1),
                "unknown key `lisen`",
            ),
            (
                "  data_dir = \"/x\"\n",
                at(1, 3),
                "did you mean `data-dir`?",
            ),
            ("limit = \"many\"\n", at(1, 9), "`limit`: invalid value"),
            ("listen = [\"[::]:1\"]\n", at(1, 10), "takes one value"),
            ("quiet = \"yes\"\n", at(1, 9), "is a switch"),
            ("tag = [1.5]\n", at(1, 8), "not float"),
            ("[section]\nlisten = 1\n", at(1, 2), "unknown key `section`"),
            ("config = \"/etc/x\"\n", at(1, 1), "unknown key `config`"),
            ("listen = \n", at(1, 10), ""),
        ];
        for (text, pos, want) in cases {
            let e = parse("/etc/ztm.toml", text, &daemon()).unwrap_err();
            assert_eq!(e.pos, pos, "{text:?}: {e}");
            assert!(e.message.contains(want), "{text:?}: {e}");
            assert!(e.to_string().starts_with("/etc/ztm.toml:"), "{e}");
        }
    }

    #[test]
    fn the_command_line_wins_and_other_subcommands_take_only_shared_globals() {
        let text = "listen = \"[::]:1\"\ntag = [\"a\"]\ndata-dir = \"/d\"\n";
        let f = parse("c.toml", text, &daemon()).unwrap();
        let argv = |s: &str| -> Vec<OsString> { s.split(' ').map(OsString::from).collect() };
        // `status` has a `--listen` of its own: it means something else
        // there and takes nothing from the daemon's file.
        let root = Command::new("ztm")
            .version("1")
            .arg(Arg::new("config").long("config").global(true))
            .arg(Arg::new("data-dir").long("data-dir").global(true))
            .subcommand(daemon())
            .subcommand(Command::new("status").arg(Arg::new("listen").long("listen")));
        let serve = invoked_command(root.clone(), &argv("ztm serve --tag=z")).unwrap();
        assert_eq!(serve.get_name(), "serve");
        assert_eq!(
            apply(argv("ztm serve --tag=z -- rest"), &f, &serve, true).0,
            argv("ztm serve --tag=z --listen=[::]:1 --data-dir=/d -- rest")
        );
        let status = invoked_command(root.clone(), &argv("ztm --data-dir /e status")).unwrap();
        assert_eq!(status.get_name(), "status");
        assert_eq!(
            apply(argv("ztm status"), &f, &status, false).0,
            argv("ztm status --data-dir=/d")
        );
        assert_eq!(
            apply(argv("ztm --data-dir /e status"), &f, &status, false).0,
            argv("ztm --data-dir /e status")
        );
        // Help and the version stop clap early: no subcommand to configure.
        assert!(invoked_command(root.clone(), &argv("ztm help status")).is_none());
        assert!(invoked_command(root, &argv("ztm --version")).is_none());
    }

    #[test]
    fn a_delimited_flag_takes_its_comma_separated_form_from_a_file_too() {
        let root = Command::new("ztm").subcommand(
            Command::new("serve").arg(
                Arg::new("url")
                    .long("url")
                    .value_delimiter(',')
                    .action(ArgAction::Append)
                    .value_parser(|s: &str| {
                        s.starts_with("https://")
                            .then(|| s.to_owned())
                            .ok_or("must start with https://")
                    }),
            ),
        );
        let serve = daemon_command(root, "serve");
        let f = parse("c.toml", "url = \"https://a,https://b\"\n", &serve).unwrap();
        assert_eq!(
            f.words(|_| true),
            ["--url=https://a,https://b"].map(OsString::from)
        );
        let e = parse("c.toml", "url = \"https://a,http://b\"\n", &serve).unwrap_err();
        assert!(e.message.contains("must start with https://"), "{e}");
        let e = parse("c.toml", "url = 0x10\n", &serve).unwrap_err();
        assert!(e.message.contains("decimal"), "{e}");
    }

    #[test]
    fn the_file_is_chosen_by_flag_then_environment_then_default() {
        let argv = |s: &str| -> Vec<OsString> { s.split(' ').map(OsString::from).collect() };
        let missing = Path::new("/nonexistent/ztm.toml");
        let var = "ZTM_TEST_CONFIG_UNSET";
        assert_eq!(
            locate(&argv("ztm serve --config /a.toml"), var, missing),
            Some(PathBuf::from("/a.toml"))
        );
        assert_eq!(
            locate(&argv("ztm --config=/b.toml serve"), var, missing),
            Some(PathBuf::from("/b.toml"))
        );
        assert_eq!(locate(&argv("ztm serve --config="), var, missing), None);
        assert_eq!(locate(&argv("ztm serve"), var, missing), None);
        let present = Path::new("/");
        assert_eq!(
            locate(&argv("ztm serve"), var, present),
            Some(PathBuf::from("/"))
        );
    }
}
