//! The agent's log: level and format (`--log-level`, `--log-format`), on
//! stderr through env_logger.
//!
//! The JSON format writes one object per line (`time`, `level`, `target`,
//! `message`), encoded by serde_json, for log collectors that parse JSON
//! (Loki, Elasticsearch, Cloud Logging).

use std::io::Write;

/// How log records are written.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// env_logger's human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Log levels of `--log-level`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// The default: what the agent does (pods enrolled, CNI requests).
    Info,
    /// Details of every pass.
    Debug,
    /// Everything.
    Trace,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

/// Log options of every `weir` command.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Level of the agent's log [default: RUST_LOG's filter when set
    /// (env_logger syntax, e.g. info,weir::k8s=debug), else info]. The
    /// kernel programs' records have their own level (--kernel-log-level).
    #[arg(long, env = "WEIR_LOG_LEVEL", value_enum, global = true)]
    pub log_level: Option<Level>,
    /// Format of the log on stderr: text, or json (one object per line).
    #[arg(
        long,
        env = "WEIR_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: Format,
}

/// The env_logger filter: `--log-level` when given, else `RUST_LOG`, else
/// `info`. Kernel records (target `weir_ebpf`) are filtered in the kernel
/// (--kernel-log-level, `weir log-level`), so all of them are let through
/// unless the filter names them.
pub fn filter(level: Option<Level>, rust_log: Option<&str>) -> String {
    let mut f = match (level, rust_log) {
        (Some(l), _) => l.as_str().to_string(),
        (None, Some(r)) if !r.trim().is_empty() => r.to_string(),
        (None, _) => "info".to_string(),
    };
    if !f.contains("weir_ebpf") {
        f.push_str(",weir_ebpf=trace");
    }
    f
}

/// One record as a JSON line (without the newline).
pub fn json_line(time: &str, level: log::Level, target: &str, message: &str) -> String {
    serde_json::json!({
        "time": time,
        "level": level.as_str(),
        "target": target,
        "message": message,
    })
    .to_string()
}

/// Installs the logger.
pub fn init(args: &LogArgs) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let mut b = env_logger::Builder::new();
    b.parse_filters(&filter(args.log_level, rust_log.as_deref()));
    if args.log_format == Format::Json {
        b.format(|buf, record| {
            let line = json_line(
                &buf.timestamp_micros().to_string(),
                record.level(),
                record.target(),
                &record.args().to_string(),
            );
            writeln!(buf, "{line}")
        });
    }
    b.init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_wins_over_rust_log_and_info_is_the_default() {
        assert_eq!(filter(None, None), "info,weir_ebpf=trace");
        assert_eq!(filter(None, Some("")), "info,weir_ebpf=trace");
        assert_eq!(
            filter(None, Some("info,weir::k8s=debug")),
            "info,weir::k8s=debug,weir_ebpf=trace"
        );
        assert_eq!(
            filter(Some(Level::Warn), Some("debug")),
            "warn,weir_ebpf=trace"
        );
        assert_eq!(filter(None, Some("weir_ebpf=off")), "weir_ebpf=off");
    }

    #[test]
    fn json_lines_parse_back_with_every_field() {
        let msg = "pod \"a\\b\"\nsecond line\t✓";
        let l = json_line(
            "2026-12-04T16:00:00.000001Z",
            log::Level::Warn,
            "weir::k8s",
            msg,
        );
        assert!(!l.contains('\n'), "one line: {l}");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["target"], "weir::k8s");
        assert_eq!(v["message"], msg);
        assert_eq!(v["time"], "2026-12-04T16:00:00.000001Z");
    }

    #[test]
    fn flags_parse_from_arguments_and_environment() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            log: LogArgs,
        }
        let t = T::try_parse_from(["t", "--log-format", "json", "--log-level", "debug"]).unwrap();
        assert_eq!(t.log.log_format, Format::Json);
        assert_eq!(t.log.log_level, Some(Level::Debug));
        let bad = T::try_parse_from(["t", "--log-format", "yaml"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            bad.contains("--log-format") && bad.contains("json"),
            "{bad}"
        );
    }
}
