//! Figures for the benchmarks: each measurement runs in alternating rounds
//! next to its baseline, so a load swing on the machine hits both alike, and
//! the report gives medians and the spread of the per-round ratios.

use std::future::Future;
use std::time::Duration;

/// Rounds each side of a comparison runs, alternating.
pub const ROUNDS: usize = 5;

/// MiB per second for `bytes` moved in `elapsed`.
pub fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

/// The `p`th percentile (0-100) of `samples`, nearest rank.
pub fn percentile(samples: &[f64], p: usize) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Throughput of a path and of its baseline, [`ROUNDS`] rounds each.
pub struct Throughput {
    pub path: Vec<f64>,
    pub baseline: Vec<f64>,
}

impl Throughput {
    /// Runs `path` and `baseline` alternately, each returning MiB/s.
    pub async fn compare<P, PF, B, BF>(mut path: P, mut baseline: B) -> Throughput
    where
        P: FnMut() -> PF,
        PF: Future<Output = f64>,
        B: FnMut() -> BF,
        BF: Future<Output = f64>,
    {
        let mut result = Throughput {
            path: Vec::with_capacity(ROUNDS),
            baseline: Vec::with_capacity(ROUNDS),
        };
        for _ in 0..ROUNDS {
            result.path.push(path().await);
            result.baseline.push(baseline().await);
        }
        result
    }

    /// One table row: medians, their ratio, and the lowest and highest
    /// ratio of a round to its neighbouring baseline round.
    pub fn row(&self, name: &str) -> String {
        let (path, baseline) = (percentile(&self.path, 50), percentile(&self.baseline, 50));
        let ratios: Vec<f64> = self
            .path
            .iter()
            .zip(&self.baseline)
            .map(|(p, b)| p / b)
            .collect();
        format!(
            "{name:<26} {path:>11.1} {baseline:>11.1} {:>7.2}   {:.2}-{:.2}",
            path / baseline,
            percentile(&ratios, 0),
            percentile(&ratios, 100),
        )
    }
}

/// Round-trip samples (microseconds) of a path and of its baseline, taken in
/// [`ROUNDS`] alternating blocks.
pub struct RoundTrips {
    pub path: Vec<f64>,
    pub baseline: Vec<f64>,
}

impl RoundTrips {
    /// Runs `path` and `baseline` alternately, each returning a block of samples.
    pub async fn compare<P, PF, B, BF>(mut path: P, mut baseline: B) -> RoundTrips
    where
        P: FnMut() -> PF,
        PF: Future<Output = Vec<f64>>,
        B: FnMut() -> BF,
        BF: Future<Output = Vec<f64>>,
    {
        let mut result = RoundTrips {
            path: Vec::new(),
            baseline: Vec::new(),
        };
        for _ in 0..ROUNDS {
            result.path.extend(path().await);
            result.baseline.extend(baseline().await);
        }
        result
    }

    /// Table rows for p50 and p99.
    pub fn rows(&self) -> Vec<String> {
        [("p50", 50), ("p99", 99)]
            .into_iter()
            .map(|(name, p)| {
                let (path, baseline) = (percentile(&self.path, p), percentile(&self.baseline, p));
                format!(
                    "{name:<26} {path:>9.1}us {baseline:>9.1}us {:>7.2}",
                    path / baseline
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 50), 51.0);
        assert_eq!(percentile(&samples, 99), 100.0);
        assert_eq!(percentile(&samples, 0), 1.0);
        assert_eq!(percentile(&samples, 100), 100.0);
    }

    #[test]
    fn comparisons_alternate_and_report_medians() {
        let order = std::cell::RefCell::new(Vec::new());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let result = rt.block_on(Throughput::compare(
            || {
                order.borrow_mut().push('p');
                async { 50.0 }
            },
            || {
                order.borrow_mut().push('b');
                async { 100.0 }
            },
        ));
        assert_eq!(order.borrow().iter().collect::<String>(), "pbpbpbpbpb");
        let row = result.row("x");
        assert!(row.contains(" 0.50 "), "{row}");
        assert!(row.ends_with("0.50-0.50"), "{row}");
    }
}
