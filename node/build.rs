//! Stamps the binary with the commit it is built from (`--version`).

include!("../proto/git_rev.rs");

fn main() {
    emit_git_rev();
}
