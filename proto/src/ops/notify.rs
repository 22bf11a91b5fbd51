//! systemd's service notifications (`sd_notify(3)`), for units with
//! `Type=notify` and `WatchdogSec=`: `READY=1` once the daemon serves,
//! `WATCHDOG=1` keep-alives while its main loop answers, `STOPPING=1` when it
//! shuts down. Datagrams to `$NOTIFY_SOCKET` (a path, or `@name` in the
//! abstract namespace); without that variable every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The notification socket of this service, if systemd gave one.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`; `None`
    /// outside a notify unit (or when the socket cannot be opened, which is
    /// logged: systemd would then time the start out, and says why).
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let addr = match socket_addr(path.as_encoded_bytes()) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET unusable");
                return None;
            }
        };
        let sock = match UnixDatagram::unbound() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a socket for NOTIFY_SOCKET");
                return None;
            }
        };
        let watchdog = keepalive_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Some(Self {
            sock,
            addr,
            watchdog,
        })
    }

    /// A notifier for the socket at `path` with a watchdog asking for a
    /// keep-alive every `keepalive_every` (for tests of what sends them).
    ///
    /// # Errors
    /// The socket cannot be opened.
    pub fn at(path: &std::path::Path, keepalive_every: Option<Duration>) -> std::io::Result<Self> {
        Ok(Self {
            sock: UnixDatagram::unbound()?,
            addr: std::os::unix::net::SocketAddr::from_pathname(path)?,
            watchdog: keepalive_every,
        })
    }

    /// How often to send [`Self::keep_alive`] (half systemd's watchdog
    /// timeout), if the watchdog is on for this process.
    pub fn keepalive_every(&self) -> Option<Duration> {
        self.watchdog
    }

    /// The daemon serves; `status` is shown by `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// The main loop is alive.
    pub fn keep_alive(&self) {
        self.send("WATCHDOG=1");
    }

    /// Shutdown began (systemd then waits up to TimeoutStopSec).
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::warn!(error = %e, "service notification not sent");
        }
    }
}

/// `$NOTIFY_SOCKET` as an address: an absolute path, or `@name` for the
/// abstract namespace.
fn socket_addr(raw: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    match raw {
        [b'@', name @ ..] => std::os::unix::net::SocketAddr::from_abstract_name(name),
        [b'/', ..] => std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(raw),
        )),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither an absolute path nor @abstract",
        )),
    }
}

/// Half the watchdog timeout of `usec`, if it is set, positive and meant
/// for `my_pid` (`pid` unset or equal). Pure.
fn keepalive_interval(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(my_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// `s` on one line (a STATUS= value ends at the newline).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keepalive_runs_at_half_the_timeout_for_this_process_only() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(keepalive_interval(Some("30000000"), None, 7), half);
        assert_eq!(keepalive_interval(Some("30000000"), Some("7"), 7), half);
        assert_eq!(keepalive_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(keepalive_interval(Some("0"), None, 7), None);
        assert_eq!(keepalive_interval(Some("x"), None, 7), None);
        assert_eq!(keepalive_interval(None, Some("7"), 7), None);
    }

    #[test]
    fn notifications_reach_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("ztm-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            sock: UnixDatagram::unbound().unwrap(),
            addr: socket_addr(path.as_os_str().as_encoded_bytes()).unwrap(),
            watchdog: None,
        };
        n.ready("serving\non 8443");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving on 8443");
        std::fs::remove_dir_all(&dir).unwrap();

        let name = format!("@ztm-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt as _;
        let abs =
            std::os::unix::net::SocketAddr::from_abstract_name(&name.as_bytes()[1..]).unwrap();
        let server = UnixDatagram::bind_addr(&abs).unwrap();
        let n = Notifier {
            sock: UnixDatagram::unbound().unwrap(),
            addr: socket_addr(name.as_bytes()).unwrap(),
            watchdog: None,
        };
        n.keep_alive();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        assert!(socket_addr(b"relative").is_err());
    }
}
