//! A small wrapper around [`std::process::Command`] that shows what it runs.
//!
//! Every command that changes something is printed as a shell line
//! (`$ VAR=value cargo build ...`) before it starts, so a CI log can be
//! replayed by hand, and a failure names the exact command and its exit status
//! instead of a bare "exit code 101".

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// A command line with its environment changes, built up step by step.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    /// `None` removes the variable from the child's environment.
    envs: Vec<(OsString, Option<OsString>)>,
    dir: Option<PathBuf>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            dir: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    pub fn dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Prints the command, runs it with inherited stdio and fails unless it
    /// exits with status 0.
    pub fn run(&self) -> Result<()> {
        let status = self.status()?;
        self.check(status)
    }

    /// Prints the command, runs it with inherited stdio and returns its exit
    /// status whatever it is (for commands whose exit code we pass on).
    pub fn status(&self) -> Result<ExitStatus> {
        println!("$ {self}");
        self.command().status().with_context(|| self.spawn_error())
    }

    /// Prints the command, runs it with stderr inherited (cargo's progress and
    /// diagnostics stay visible) and returns what it wrote to stdout.
    pub fn run_capture_stdout(&self) -> Result<String> {
        println!("$ {self}");
        let output = self
            .command()
            .stdin(Stdio::inherit())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| self.spawn_error())?;
        self.check(output.status)?;
        String::from_utf8(output.stdout).with_context(|| format!("`{self}` printed non-UTF-8"))
    }

    /// Runs a query quietly and returns its trimmed stdout.
    ///
    /// Used for probes (`rustc --print sysroot`) that run on every
    /// invocation: printing them would bury the steps that matter.
    pub fn read(&self) -> Result<String> {
        let output = self
            .command()
            .stdin(Stdio::null())
            .output()
            .with_context(|| self.spawn_error())?;
        if !output.status.success() {
            bail!(
                "`{self}` failed with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        String::from_utf8(output.stdout)
            .map(|s| s.trim().to_owned())
            .with_context(|| format!("`{self}` printed non-UTF-8"))
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (key, value) in &self.envs {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        command
    }

    fn check(&self, status: ExitStatus) -> Result<()> {
        if status.success() {
            Ok(())
        } else {
            bail!("command failed with {status}: {self}")
        }
    }

    fn spawn_error(&self) -> String {
        format!(
            "could not start `{}` (is it installed and on PATH?)",
            self.program.to_string_lossy()
        )
    }
}

/// Shell-like rendering: set variables first, then the command line. Removed
/// variables are left out; they only matter when they were set by the caller.
impl std::fmt::Display for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut line = String::new();
        for (key, value) in &self.envs {
            if let Some(value) = value {
                let _ = write!(
                    line,
                    "{}={} ",
                    key.to_string_lossy(),
                    shell_quote(&value.to_string_lossy())
                );
            }
        }
        line.push_str(&shell_quote(&self.program.to_string_lossy()));
        for arg in &self.args {
            line.push(' ');
            line.push_str(&shell_quote(&arg.to_string_lossy()));
        }
        f.write_str(&line)
    }
}

/// Quotes `word` for a POSIX shell when it contains anything but plainly safe
/// characters, so printed commands can be pasted back into a terminal.
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(shell_quote("build"), "build");
        assert_eq!(shell_quote("--target-dir=/a/b"), "--target-dir=/a/b");
        assert_eq!(shell_quote("^0.13"), "'^0.13'");
        assert_eq!(shell_quote("-C debuginfo=2"), "'-C debuginfo=2'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn displays_set_variables_before_the_command() {
        let cmd = Cmd::new("cargo")
            .args(["build", "--release"])
            .env("RUSTC", "/usr/bin/rustc")
            .env_remove("RUSTFLAGS")
            .env("FLAGS", "-C x");
        assert_eq!(
            cmd.to_string(),
            "RUSTC=/usr/bin/rustc FLAGS='-C x' cargo build --release"
        );
    }

    #[test]
    fn failure_names_the_command() {
        let err = Cmd::new("sh").args(["-c", "exit 3"]).run().unwrap_err();
        let message = err.to_string();
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.contains("sh -c 'exit 3'"), "{message}");
    }

    #[test]
    fn read_trims_stdout_and_applies_env() {
        let out = Cmd::new("sh")
            .args(["-c", "echo \"$WEIR_XTASK_PROBE\""])
            .env("WEIR_XTASK_PROBE", " value ")
            .read()
            .unwrap();
        assert_eq!(out, "value");
    }
}
