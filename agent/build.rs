//! Records the git commit the agent is built from (`weir --version`, the
//! start-up line, `weir_build_info`): `WEIR_GIT_COMMIT` when set (image
//! builds without a git checkout), else `git rev-parse`, else "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=WEIR_GIT_COMMIT");
    let commit = match std::env::var("WEIR_GIT_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => {
            // Build again when HEAD moves (a commit, a checkout).
            for path in [
                git(&["rev-parse", "--git-path", "HEAD"]),
                git(&["symbolic-ref", "-q", "HEAD"])
                    .and_then(|r| git(&["rev-parse", "--git-path", &r])),
                git(&["rev-parse", "--git-path", "packed-refs"]),
            ]
            .into_iter()
            .flatten()
            {
                if std::path::Path::new(&path).exists() {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=WEIR_BUILD_COMMIT={commit}");
}
