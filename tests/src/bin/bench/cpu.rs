//! How busy the machine is with work that is not the benchmark's.
//!
//! The benchmark shares its machine with whatever else runs there (builds,
//! other tests). Its own processes all live in one cgroup, so the CPU time
//! the rest of the machine used over an interval is the busy time of
//! `/proc/stat` (user, nice, system, irq, softirq) minus the cgroup's
//! `usage_usec` (kernel threads working for the benchmark, such as
//! `ksoftirqd`, count as others). When the benchmark's processes are pinned to one CPU,
//! only that CPU's line of `/proc/stat` counts: other work elsewhere does
//! not disturb them. The runner waits for a quiet CPU before each run and
//! repeats runs that other work disturbed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One reading.
#[derive(Clone, Copy, Debug)]
pub struct Snap {
    at: Instant,
    /// user + nice + system over all CPUs, µs.
    busy_us: u64,
    /// irq + softirq over all CPUs, µs.
    irq_us: u64,
    /// The benchmark cgroup's CPU time, µs.
    ours_us: u64,
}

impl Snap {
    /// Wall-clock time from `earlier` to this reading.
    pub fn elapsed_since(&self, earlier: &Snap) -> Duration {
        self.at.duration_since(earlier.at)
    }
}

/// Reads the counters for the benchmark cgroup `cgroup`.
pub struct CpuMeter {
    cgroup: PathBuf,
    tick_us: u64,
    cpus: f64,
    /// The `/proc/stat` line read: `cpu` (all) or `cpuN`.
    line: String,
}

impl CpuMeter {
    /// A meter for the processes under `cgroup`, pinned to `cpu` or
    /// running anywhere (`None`).
    pub fn new(cgroup: &Path, cpu: Option<usize>) -> CpuMeter {
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        CpuMeter {
            cgroup: cgroup.to_path_buf(),
            tick_us: 1_000_000 / u64::try_from(hz).unwrap_or(100).max(1),
            cpus: match cpu {
                Some(_) => 1.0,
                None => std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
            },
            line: cpu.map_or_else(|| "cpu".to_owned(), |c| format!("cpu{c}")),
        }
    }

    /// Takes a reading.
    pub fn snap(&self) -> Snap {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(self.line.as_str()))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal ...
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        let busy_ticks = field(0) + field(1) + field(2);
        let irq_ticks = field(5) + field(6);
        let ours_us = std::fs::read_to_string(self.cgroup.join("cpu.stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        Snap {
            at: Instant::now(),
            busy_us: busy_ticks * self.tick_us,
            irq_us: irq_ticks * self.tick_us,
            ours_us,
        }
    }

    /// The share of the benchmark's CPU(s) (0-1) used by processes outside
    /// it between `a` and `b`.
    pub fn foreign(&self, a: &Snap, b: &Snap) -> f64 {
        let wall = b.at.duration_since(a.at).as_secs_f64() * 1e6 * self.cpus;
        if wall <= 0.0 {
            return 0.0;
        }
        // Interrupt and softirq time included: the cgroup's time includes
        // the softirqs its tasks ran (see `ours_us`), so leaving them out
        // here would hide other work behind them.
        let busy = (b.busy_us + b.irq_us).saturating_sub(a.busy_us + a.irq_us) as f64;
        let ours = b.ours_us.saturating_sub(a.ours_us) as f64;
        ((busy - ours) / wall).max(0.0)
    }

    /// CPU time, µs, the benchmark used between `a` and `b`.
    ///
    /// Pinned to one CPU: everything that CPU did (user, system, interrupt
    /// and softirq time, so also softirqs the kernel ran for it in
    /// `ksoftirqd`); [`CpuMeter::foreign`] tells how much of it others took.
    /// Unpinned: the cgroup's own time (which, on kernels without
    /// `CONFIG_IRQ_TIME_ACCOUNTING`, includes the softirqs run in its
    /// tasks' context).
    pub fn ours_us(&self, a: &Snap, b: &Snap) -> f64 {
        if self.line == "cpu" {
            b.ours_us.saturating_sub(a.ours_us) as f64
        } else {
            (b.busy_us + b.irq_us).saturating_sub(a.busy_us + a.irq_us) as f64
        }
    }

    /// Waits until a 250 ms window has other work below `threshold`, or
    /// `max` has passed; returns how long it waited.
    pub fn wait_quiet(&self, threshold: f64, max: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let a = self.snap();
            std::thread::sleep(Duration::from_millis(250));
            let b = self.snap();
            if self.foreign(&a, &b) < threshold || started.elapsed() >= max {
                return started.elapsed();
            }
        }
    }
}
