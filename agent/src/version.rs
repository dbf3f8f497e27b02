//! What this agent is: version, commit, and the kernel it runs on.

/// The workspace version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the agent was built from (`WEIR_GIT_COMMIT` at build
/// time, else the checkout's HEAD), or "unknown".
pub const COMMIT: &str = env!("WEIR_BUILD_COMMIT");

/// `weir --version`: version and commit.
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("WEIR_BUILD_COMMIT"),
    ")"
);

/// The running kernel's release (`uname -r`), or "unknown".
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The line the agent logs first: what runs, where.
pub fn startup_line() -> String {
    format!(
        "weir {VERSION} (commit {COMMIT}, map layout v{}) on Linux {}",
        weir_common::LAYOUT_VERSION,
        kernel()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn startup_line_names_version_commit_and_kernel() {
        let l = super::startup_line();
        assert!(
            l.starts_with(&format!("weir {} (commit ", super::VERSION)),
            "{l}"
        );
        assert!(!super::COMMIT.is_empty());
        // This test runs on Linux: the kernel release is known.
        let k = super::kernel();
        assert!(
            k != "unknown" && l.ends_with(&format!("on Linux {k}")),
            "{l}"
        );
    }
}
