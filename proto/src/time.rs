//! The wall clock in Unix milliseconds, the one unit every timestamp on the
//! wire uses. [`now_ms`] is the only clock read shared by controller and node;
//! [`unix_ms`] is its pure conversion.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::UnixMs;

/// The wall clock in Unix milliseconds; read only by the I/O shells (pure
/// code takes `now_ms` as an argument).
#[expect(clippy::disallowed_methods, reason = "the one wall-clock read")]
pub fn now_ms() -> UnixMs {
    unix_ms(SystemTime::now())
}

/// Converts `t` to Unix milliseconds. Pure. A time before the epoch reads as
/// 0 and one beyond `i64::MAX` ms saturates, so a wild clock never wraps.
pub fn unix_ms(t: SystemTime) -> UnixMs {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ`, or `never` for 0 and below.
pub fn ms_to_text(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let secs = ms / 1000;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn unix_ms_saturates_instead_of_wrapping() {
        assert_eq!(unix_ms(UNIX_EPOCH), 0);
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1_234)), 1_234);
        if let Some(before) = UNIX_EPOCH.checked_sub(Duration::from_secs(1)) {
            assert_eq!(unix_ms(before), 0, "before the epoch");
        }
        // Far beyond i64::MAX ms (where the platform can represent it).
        let far = Duration::from_secs(u64::MAX / 2);
        if let Some(t) = UNIX_EPOCH.checked_add(far) {
            assert_eq!(unix_ms(t), i64::MAX, "saturates");
        }
        assert!(
            now_ms() > 1_700_000_000_000,
            "the clock reads a plausible now"
        );
    }
}
