//! `policy`: check and explain offline against a file; set, get, plan and
//! explain against the running controller.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Validate FILE and run its tests (offline).
    Check { file: PathBuf },
    /// Replace the policy (refused, keeping the old one, if invalid or its tests fail).
    Set { file: PathBuf },
    /// Print the policy in force.
    Get,
    /// Show which node pairs would gain or lose flows if FILE replaced the policy.
    Plan { file: PathBuf },
    /// Explain whether SRC may reach DST:PORT and which rule decides.
    Explain {
        /// Evaluate offline against this file instead of the running controller.
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        src: String,
        /// IDENTITY:PORT
        #[arg(long)]
        dst: String,
        /// A protocol name or number, exactly as a policy's "proto" accepts it.
        #[arg(long, default_value = "tcp")]
        proto: String,
    },
}

impl PolicyCmd {
    /// Whether the command works on a local file alone (no controller needed).
    pub(super) fn is_offline(&self) -> bool {
        matches!(
            self,
            PolicyCmd::Check { .. }
                | PolicyCmd::Explain {
                    policy: Some(_),
                    ..
                }
        )
    }
}

/// Splits `IDENTITY:PORT` at the last colon (IPv6 in brackets).
pub fn split_dst(dst: &str) -> anyhow::Result<(String, u16)> {
    let (id, port) = dst
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--dst must be IDENTITY:PORT, e.g. tag:web:443"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow!("invalid port {port:?} in --dst"))?;
    Ok((id.trim_matches(['[', ']']).to_string(), port))
}

/// Runs an offline command (see [`PolicyCmd::is_offline`]).
pub(super) fn run_offline(cmd: &PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Check { file } => check(file),
        PolicyCmd::Explain {
            policy: Some(file),
            src,
            dst,
            proto,
        } => explain_offline(file, src, dst, proto),
        _ => unreachable!("only offline commands are passed here"),
    }
}

pub(super) async fn run(c: &mut Client, cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Check { .. } => unreachable!("handled offline"),
        PolicyCmd::Set { file } => {
            let (name, text) = read_policy(&file)?;
            let r = c
                .set_policy(apb::SetPolicyRequest {
                    file_name: name,
                    text,
                    if_version: None,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("policy version {} in force", r.version);
        }
        PolicyCmd::Get => {
            let r = c
                .get_policy(apb::GetPolicyRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if r.version == 0 {
                eprintln!("no policy set: everything is denied");
            } else {
                print!("{}", r.text);
            }
        }
        PolicyCmd::Plan { file } => {
            let (name, text) = read_policy(&file)?;
            let changes = c
                .plan_policy(apb::PlanPolicyRequest {
                    file_name: name,
                    text,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .changes;
            if changes.is_empty() {
                println!("no changes: every node pair keeps exactly its current flows");
            }
            for ch in changes {
                for g in &ch.gained {
                    println!("+ {} -> {} {}", ch.src, ch.dst, g);
                }
                for l in &ch.lost {
                    println!("- {} -> {} {}", ch.src, ch.dst, l);
                }
            }
        }
        PolicyCmd::Explain {
            policy: _,
            src,
            dst,
            proto,
        } => {
            let (dst_id, port) = split_dst(&dst)?;
            let r = c
                .explain_policy(apb::ExplainPolicyRequest {
                    src,
                    dst: dst_id,
                    port: port.into(),
                    proto,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print_explain(r.allowed, &r.rule_id, &r.detail, &r.posture);
        }
    }
    Ok(())
}

fn read_policy(file: &Path) -> anyhow::Result<(String, String)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    Ok((file.display().to_string(), text))
}

fn check(file: &Path) -> anyhow::Result<()> {
    let (name, text) = read_policy(file)?;
    match ztmesh_policy::Policy::check(&name, &text) {
        Ok(_) => {
            println!("{name}: ok");
            Ok(())
        }
        Err(e) => bail!("{e}"),
    }
}

fn explain_offline(file: &Path, src: &str, dst: &str, proto: &str) -> anyhow::Result<()> {
    let (name, text) = read_policy(file)?;
    let policy = ztmesh_policy::Policy::parse(&name, &text).map_err(|e| anyhow!("{e}"))?;
    let (dst_id, port) = split_dst(dst)?;
    let proto = ztmesh_policy::parse_proto(proto)?;
    let e = policy.explain(&[], src, &dst_id, port, proto);
    print_explain(
        e.allowed,
        e.rule_id.as_deref().unwrap_or(""),
        &e.detail,
        &e.posture,
    );
    Ok(())
}

/// The verdict, then one line per rule skipped for the source's posture.
fn print_explain(allowed: bool, rule_id: &str, detail: &str, posture: &[String]) {
    let verdict = if allowed { "ALLOW" } else { "DENY" };
    if rule_id.is_empty() {
        println!("{verdict}: {detail}");
    } else {
        println!("{verdict} by {rule_id}: {detail}");
    }
    // The first line is already in a denial's detail.
    for line in posture.iter().filter(|l| !detail.contains(l.as_str())) {
        println!("  posture: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_destinations() {
        assert_eq!(split_dst("tag:web:443").unwrap(), ("tag:web".into(), 443));
        assert_eq!(split_dst("[fd00::1]:22").unwrap(), ("fd00::1".into(), 22));
        assert!(split_dst("tag:web").is_err());
    }
}
