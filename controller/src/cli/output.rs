//! Output helpers shared by the groups: UTC timestamps and pretty JSON.

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ`, or `never` for 0 and below.
pub(super) fn ms_to_text(ms: i64) -> String {
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

/// Prints `v` as pretty JSON on stdout (the `-o json` format).
pub(super) fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_as_utc() {
        assert_eq!(ms_to_text(0), "never");
        assert_eq!(ms_to_text(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}
