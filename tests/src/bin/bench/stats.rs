//! Medians, spreads and percentiles.

use serde::Serialize;

/// The `p`-th percentile (0-100) of `sorted` by nearest rank: the smallest
/// sample with at least `p`% of the samples at or below it. 0 when empty.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median and spread of a few repetitions.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Every value, in run order.
    pub runs: Vec<f64>,
}

impl Summary {
    /// Summarizes `runs` (in run order). `None` when empty.
    pub fn of(runs: &[f64]) -> Option<Summary> {
        if runs.is_empty() {
            return None;
        }
        let mut v = runs.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
            runs: runs.to_vec(),
        })
    }
}

/// `a[i] / b[i]` for each repetition `i` (the two were measured back to
/// back, so their ratio cancels slow drifts of the machine), summarized.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> Option<Summary> {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, y)| **y != 0.0)
        .map(|(x, y)| x / y)
        .collect();
    Summary::of(&ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 99.9), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn summaries_and_ratios() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.runs, [3.0, 1.0, 2.0]);
        assert_eq!(Summary::of(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert!(Summary::of(&[]).is_none());
        let r = paired_ratio(&[2.0, 3.0], &[4.0, 3.0]).unwrap();
        assert_eq!((r.min, r.max, r.median), (0.5, 1.0, 0.75));
    }
}
