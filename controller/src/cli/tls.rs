//! `tls`: rotate the controller's TLS certificate with the mesh running:
//! `rotate` stages a next certificate (maps list its pin), `switch` makes
//! it current and retains the old one, `status` shows what is held.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::{parse_duration, Output, OutputArg};

#[derive(Subcommand, Debug)]
pub enum TlsCmd {
    /// Stage a next certificate (yours, or a new self-signed one): every
    /// map lists its fingerprint from now on, so nodes learn the new pin
    /// before the switch. Prints the fingerprint.
    Rotate {
        /// The certificate (PEM); with --key. Without both: self-signed.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Present the staged certificate from the next handshake on. The old
    /// one is retained for clients that ask for it (auth keys created
    /// before the switch) for the grace period and while such keys are live.
    Switch {
        /// How long the old certificate is retained at least, e.g. 1h, 7d.
        #[arg(long, value_parser = parse_duration, default_value = "7d")]
        grace: Duration,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show the current, staged and retained certificates' fingerprints.
    Status {
        #[command(flatten)]
        output: OutputArg,
    },
}

/// Runs a `tls` command.
pub(super) async fn run(c: &mut Client, cmd: TlsCmd) -> anyhow::Result<()> {
    let (status, output) = match cmd {
        TlsCmd::Rotate { cert, key, output } => {
            let (cert_pem, key_pem) = match (cert, key) {
                (Some(c), Some(k)) => (
                    std::fs::read_to_string(&c)
                        .with_context(|| format!("--cert {}", c.display()))?,
                    std::fs::read_to_string(&k)
                        .with_context(|| format!("--key {}", k.display()))?,
                ),
                _ => (String::new(), String::new()),
            };
            let s = c
                .stage_tls_cert(apb::StageTlsCertRequest { cert_pem, key_pem })
                .await
                .map_err(status_err)?
                .into_inner();
            if output.get() == Output::Text {
                println!("{}", s.next);
                eprintln!(
                    "staged; nodes learn this pin with their next map. Run `tls switch` once \
                     they have."
                );
                return Ok(());
            }
            (s, output)
        }
        TlsCmd::Switch { grace, output } => {
            let s = c
                .switch_tls_cert(apb::SwitchTlsCertRequest {
                    grace_ms: i64::try_from(grace.as_millis()).unwrap_or(i64::MAX),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            (s, output)
        }
        TlsCmd::Status { output } => {
            let s = c
                .get_tls_status(apb::GetTlsStatusRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            (s, output)
        }
    };
    print_status(&status, output.get());
    Ok(())
}

fn print_status(s: &apb::TlsStatus, output: Output) {
    match output {
        Output::Json => print_json(&json!({
            "current": s.current,
            "next": s.next,
            "previous": s.previous,
            "previous_switched_ms": s.previous_switched_ms,
            "previous_until_ms": s.previous_until_ms,
        })),
        Output::Text => {
            let or_none = |f: &str| {
                if f.is_empty() {
                    "-".to_string()
                } else {
                    f.to_string()
                }
            };
            println!("current:  {}", s.current);
            println!("next:     {}", or_none(&s.next));
            if s.previous.is_empty() {
                println!("previous: -");
            } else {
                println!(
                    "previous: {} (retained at least until {}, and while auth keys created \
                     before {} are live)",
                    s.previous,
                    ms_to_text(s.previous_until_ms),
                    ms_to_text(s.previous_switched_ms)
                );
            }
        }
    }
}
