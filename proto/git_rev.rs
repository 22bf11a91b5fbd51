// The commit a binary is built from, as `ZTMESH_GIT_REV` for
// `ztmesh_proto::version_line!`: `$ZTMESH_GIT_REV` when set (a source
// tarball), else git's, else `unknown`.
// Included by the build scripts of the three binaries' packages; reruns when
// HEAD or the branch it points at moves.
fn emit_git_rev() {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
    };
    let rev = std::env::var("ZTMESH_GIT_REV")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=ZTMESH_GIT_REV={rev}");
    println!("cargo:rerun-if-env-changed=ZTMESH_GIT_REV");
    // Only files that exist: cargo reruns a script for a missing one on
    // every build. A branch in a worktree lives in the common dir.
    let watch = |path: String| {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    };
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watch(format!("{dir}/HEAD"));
    }
    if let Some(common) = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]) {
        watch(format!("{common}/packed-refs"));
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch(format!("{common}/{branch}"));
        }
    }
}
