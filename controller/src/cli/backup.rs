//! `backup FILE` (an online backup, made and encrypted by the running
//! controller, written here atomically with mode 0600), `backup keygen`
//! and `restore` (both offline).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{ArgGroup, Subcommand};
use ztmesh_proto::admin as apb;
use ztmesh_proto::keys::sync_dir;

use super::client::{status_err, Client};
use crate::backup::{Identity, Open, Recipient};
use crate::server::DataDir;

#[derive(clap::Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    group(ArgGroup::new("seal").required(true).multiple(false))
)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub action: Option<BackupCmd>,
    /// The encrypted backup file to write (mode 0600).
    #[arg(required = true)]
    pub file: Option<PathBuf>,
    /// Encrypt with the passphrase in this file (its content, without a
    /// trailing newline).
    #[arg(long, group = "seal", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Encrypt to this recipient (`backup keygen` prints it); the
    /// identity file decrypts.
    #[arg(long, group = "seal", value_name = "ztmr1...")]
    pub recipient: Option<Recipient>,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Write a new backup identity (mode 0600) and print its recipient
    /// for `backup --recipient` (offline). Keep the identity offline:
    /// it decrypts every backup made to its recipient.
    Keygen {
        /// Where to write the identity (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `restore`'s arguments.
#[derive(clap::Args, Debug)]
#[command(group(ArgGroup::new("open").required(true).multiple(false)))]
pub struct RestoreArgs {
    /// The backup file.
    pub file: PathBuf,
    /// The passphrase the backup was made with, in a file.
    #[arg(long, group = "open", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// The identity (`backup keygen --out`) of the recipient it was made to.
    #[arg(long, group = "open", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Restore over an existing controller: its files are moved aside into
    /// DATA_DIR/replaced-<unix ms>/, nothing is deleted.
    #[arg(long)]
    pub force: bool,
}

/// `backup keygen --out FILE`.
///
/// # Errors
/// FILE exists or cannot be written.
#[expect(
    clippy::disallowed_types,
    reason = "a new identity comes from OS entropy"
)]
pub(super) fn keygen(out: &Path) -> anyhow::Result<()> {
    use rand_core::OsRng;
    let id = Identity::generate(&mut OsRng);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| {
            format!(
                "creating {} (an identity is never overwritten)",
                out.display()
            )
        })?;
    f.write_all(id.to_file_text().as_bytes())?;
    f.sync_all()?;
    sync_dir(parent(out))?;
    println!("{}", id.recipient());
    eprintln!(
        "identity written to {}: keep it secret and away from the controller; \
         back up with `ztmesh-controller backup FILE --recipient {}`",
        out.display(),
        id.recipient()
    );
    Ok(())
}

/// `backup FILE`: asks the controller for a backup and writes it.
///
/// # Errors
/// FILE exists (without `--force`), an unreadable passphrase file, a
/// refused call, a failed write.
pub(super) async fn run(c: &mut Client, args: BackupArgs) -> anyhow::Result<()> {
    let file = args.file.context("backup needs a FILE")?;
    if !args.force && file.symlink_metadata().is_ok() {
        bail!(
            "{} exists: choose another name, or add --force",
            file.display()
        );
    }
    let seal = match (&args.recipient, &args.passphrase_file) {
        (Some(r), _) => apb::backup_request::Seal::Recipient(r.to_string()),
        (None, Some(p)) => apb::backup_request::Seal::Passphrase(passphrase(p)?),
        (None, None) => bail!("give --recipient or --passphrase-file"),
    };
    let name = file
        .file_name()
        .context("FILE needs a file name")?
        .to_string_lossy()
        .into_owned();
    let temp = Temp(parent(&file).join(format!(".{name}.tmp-{}", std::process::id())));
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp.0)
        .with_context(|| format!("creating {}", temp.0.display()))?;
    let mut stream = c
        .backup(apb::BackupRequest { seal: Some(seal) })
        .await
        .map_err(status_err)?
        .into_inner();
    let mut info = None;
    let mut size = 0u64;
    while let Some(msg) = stream.message().await.map_err(status_err)? {
        if let Some(i) = msg.info {
            info = Some(i);
        }
        out.write_all(&msg.data)
            .with_context(|| format!("writing {}", temp.0.display()))?;
        size += msg.data.len() as u64;
    }
    let info = info.context("the controller sent no backup")?;
    out.sync_all()?;
    drop(out);
    if args.force {
        fs::rename(&temp.0, &file)?;
    } else {
        // No clobbering, atomically: a link fails if FILE appeared meanwhile.
        fs::hard_link(&temp.0, &file)
            .with_context(|| format!("{} exists: add --force to replace it", file.display()))?;
    }
    sync_dir(parent(&file))?;
    let schema = match info.store.as_str() {
        "sqlite" => format!(", schema {}", info.schema_version),
        _ => String::new(),
    };
    println!(
        "backup written: {} ({size} bytes; {}{schema}; controller key {}; files: {})",
        file.display(),
        info.store,
        info.controller_key,
        info.files.join(", ")
    );
    if info.store == "postgresql" {
        println!("{PG_GUIDANCE}");
    }
    Ok(())
}

/// What a PostgreSQL backup leaves to the operator.
const PG_GUIDANCE: &str = "\
the database is PostgreSQL and is NOT in this backup: it holds the identity \
files only. Dump the database too, at about the same time:
  pg_dump --format=custom --file=ztmesh.pgdump 'postgres://USER@HOST/DB'
and restore it with pg_restore before starting a restored controller:
  pg_restore --clean --if-exists --no-owner --dbname='postgres://USER@HOST/DB' ztmesh.pgdump";

/// `restore FILE --data-dir D`, offline.
///
/// # Errors
/// See [`crate::recovery::restore`].
pub(super) fn restore(data_dir: &Path, args: &RestoreArgs) -> anyhow::Result<()> {
    let pass;
    let id;
    let key = match (&args.passphrase_file, &args.identity) {
        (Some(p), _) => {
            pass = passphrase(p)?;
            Open::Passphrase(pass.as_bytes())
        }
        (None, Some(i)) => {
            let text = fs::read_to_string(i).with_context(|| format!("reading {}", i.display()))?;
            id = Identity::from_file_text(&text)
                .with_context(|| format!("reading {}", i.display()))?;
            Open::Identity(&id)
        }
        (None, None) => bail!("give --passphrase-file or --identity"),
    };
    let input =
        fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let dir = DataDir::new(data_dir);
    let done = crate::recovery::restore(
        &dir.layout(),
        std::io::BufReader::new(input),
        &key,
        args.force,
        &args.file.display().to_string(),
        crate::now_ms(),
    )?;
    let m = &done.manifest;
    println!(
        "restored {} into {} (backup of {} ms; controller key {}; files: {})",
        args.file.display(),
        data_dir.display(),
        m.created_ms,
        m.controller_key,
        m.files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(aside) = &done.replaced {
        println!("the files it replaced are in {}", aside.display());
    }
    if let Some(rows) = done.audit_rows {
        println!("audit chain ok: {rows} rows, the restore recorded (controller.restore)");
    }
    if m.store == crate::backup::StoreKind::Postgresql {
        println!("{PG_GUIDANCE}");
    }
    println!(
        "check that nodes pin this controller key, then start the controller: ztmesh-controller serve --data-dir {}",
        data_dir.display()
    );
    Ok(())
}

/// A passphrase file's content without its trailing newline.
fn passphrase(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let p = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if p.is_empty() {
        bail!("{} holds no passphrase", path.display());
    }
    Ok(p.to_string())
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The temp file the backup is written into; removed unless it was linked
/// or renamed into place (removing it then only drops the extra link).
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Cmd};

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        let mut full = vec!["ztmesh-controller"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).map(|c| c.cmd)
    }

    #[test]
    fn backup_needs_exactly_one_seal_and_keygen_needs_none() {
        let r = "ztmr1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(matches!(
            parse(&["backup", "f.bak", "--recipient", r]),
            Ok(Cmd::Backup(_))
        ));
        assert!(parse(&["backup", "f.bak", "--passphrase-file", "p"]).is_ok());
        assert!(parse(&["backup", "f.bak"]).is_err(), "no seal");
        assert!(parse(&[
            "backup",
            "f.bak",
            "--recipient",
            r,
            "--passphrase-file",
            "p"
        ])
        .is_err());
        assert!(parse(&["backup", "f.bak", "--recipient", "age1xyz"]).is_err());
        match parse(&["backup", "keygen", "--out", "id"]) {
            Ok(Cmd::Backup(b)) => assert!(b.action.is_some() && b.file.is_none()),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["restore", "f.bak"]).is_err(), "no key");
        assert!(parse(&["restore", "f.bak", "--identity", "id", "--force"]).is_ok());
    }
}
