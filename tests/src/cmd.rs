//! Running the system tools (`ip`) the harness drives.

use std::process::{Command, Output};

/// Runs `program args…` and returns its output, whatever its exit status.
/// Panics only when the program cannot be started at all.
pub(crate) fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}` (is it installed?): {e}"))
}

/// Runs `program args…` and panics with its stderr unless it succeeds.
/// Returns its stdout.
pub(crate) fn run(program: &str, args: &[&str]) -> String {
    try_run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `program args…`; returns its stdout when it succeeds, else an
/// error quoting the command, its status and its output.
pub(crate) fn try_run(program: &str, args: &[&str]) -> std::io::Result<String> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot run `{program}` (is it installed?): {e}"),
        )
    })?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            String::from_utf8_lossy(&out.stdout).trim_end(),
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args…` quietly for cleanup; returns whether it succeeded.
pub(crate) fn quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
