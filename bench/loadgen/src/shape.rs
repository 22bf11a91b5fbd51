//! The mesh shape both benchmarks use: tag groups of a fixed size, each group
//! allowed to reach its own members on port 22 and one marker port.

/// A policy for `groups` tag groups `tag:lg0..`, each `tag:lgN -> tag:lgN:22,<marker>`.
pub fn policy(groups: usize, marker: u32) -> String {
    let owners: Vec<String> = (0..groups).map(|g| format!("\"tag:lg{g}\": []")).collect();
    let acls: Vec<String> = (0..groups)
        .map(|g| {
            format!(
                "{{\"action\": \"accept\", \"src\": [\"tag:lg{g}\"], \"dst\": [\"tag:lg{g}:22,{marker}\"]}}"
            )
        })
        .collect();
    format!(
        "{{\n\"tagOwners\": {{{}}},\n\"acls\": [\n{}\n]\n}}\n",
        owners.join(", "),
        acls.join(",\n")
    )
}
