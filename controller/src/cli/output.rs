//! Output helpers shared by the groups: UTC timestamps and pretty JSON.

pub(super) use ztmesh_proto::time::ms_to_text;

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
