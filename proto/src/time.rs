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
