//! Figures for the benchmarks: each measurement runs in alternating rounds
//! next to its baseline, so a load swing on the machine hits both alike, and
//! the report gives medians and the spread of the per-round ratios. Bulk
//! comparisons also report the CPU time each side spends per MiB, summed
//! over every process taking part: a figure that scheduling swings move far
//! less than throughput, and that says whether a path is short of CPU or
//! waiting.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

/// Rounds each side of a comparison runs, alternating.
pub const ROUNDS: usize = 5;

/// The runtime a benchmark and each echo peer it starts run on: the one the
/// binaries run on, the same for the measured path and for its baseline.
pub fn two_worker_runtime() -> tokio::runtime::Runtime {
    p2p_usb_common::service::runtime().expect("a tokio runtime")
}

/// Keeps up to `depth` submissions in flight over `count` rounds: each
/// round `submit`s one, after `settle`-ing the oldest when `depth` are out;
/// the rest are settled at the end. The windowed bulk loop of the paths the
/// benchmarks measure.
pub async fn keep_in_flight<T>(
    count: usize,
    depth: usize,
    mut submit: impl AsyncFnMut() -> T,
    mut settle: impl AsyncFnMut(T),
) {
    let mut window = VecDeque::new();
    for _ in 0..count {
        if window.len() == depth {
            settle(window.pop_front().unwrap()).await;
        }
        window.push_back(submit().await);
    }
    while let Some(oldest) = window.pop_front() {
        settle(oldest).await;
    }
}

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

/// CPU time (user and system) of a set of processes: the benchmark's own
/// and the binaries it drives.
pub struct CpuMeter {
    pids: Vec<u32>,
    ticks_per_second: f64,
}

impl CpuMeter {
    /// This process and `others`.
    pub fn new(others: &[u32]) -> CpuMeter {
        let mut pids = vec![std::process::id()];
        pids.extend_from_slice(others);
        // SAFETY: sysconf only reads a system constant.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        CpuMeter {
            pids,
            ticks_per_second,
        }
    }

    /// CPU seconds all of them have used so far (threads that ended count).
    pub fn seconds(&self) -> f64 {
        self.pids
            .iter()
            .map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
                cpu_ticks(&stat)
            })
            .sum::<u64>() as f64
            / self.ticks_per_second
    }
}

/// utime + stime from the text of `/proc/PID/stat` (fields 14 and 15; the
/// command name before them may contain spaces, so count from its `)`).
fn cpu_ticks(stat: &str) -> u64 {
    let after_name = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Throughput of a path and of its baseline, [`ROUNDS`] rounds each, and
/// the CPU time each side used.
pub struct Throughput {
    pub path: Vec<f64>,
    pub baseline: Vec<f64>,
    /// CPU seconds of all of the path's rounds.
    pub path_cpu: f64,
    pub baseline_cpu: f64,
    /// Bytes each round moves.
    pub bytes_per_round: usize,
}

impl Throughput {
    /// Runs `path` and `baseline` alternately, each moving `bytes_per_round`
    /// and returning MiB/s; `cpu` is read around every round.
    pub async fn compare<P, PF, B, BF>(
        cpu: &CpuMeter,
        bytes_per_round: usize,
        mut path: P,
        mut baseline: B,
    ) -> Throughput
    where
        P: FnMut() -> PF,
        PF: Future<Output = f64>,
        B: FnMut() -> BF,
        BF: Future<Output = f64>,
    {
        let mut result = Throughput {
            path: Vec::with_capacity(ROUNDS),
            baseline: Vec::with_capacity(ROUNDS),
            path_cpu: 0.0,
            baseline_cpu: 0.0,
            bytes_per_round,
        };
        for _ in 0..ROUNDS {
            let start = cpu.seconds();
            result.path.push(path().await);
            let middle = cpu.seconds();
            result.baseline.push(baseline().await);
            result.path_cpu += middle - start;
            result.baseline_cpu += cpu.seconds() - middle;
        }
        result
    }

    /// The header matching [`Throughput::row`].
    pub fn header(path: &str, baseline: &str) -> String {
        format!(
            "{:<26} {:>13} {:>13} {:>7}   {:<12} {:>21}",
            "bulk loopback (medians)",
            format!("{path} MiB/s"),
            format!("{baseline} MiB/s"),
            "ratio",
            "round ratios",
            "CPU ms/MiB path, base",
        )
    }

    /// One table row: medians, their ratio, the lowest and highest ratio of
    /// a round to its neighbouring baseline round, and the CPU milliseconds
    /// each side spent per MiB.
    pub fn row(&self, name: &str) -> String {
        let (path, baseline) = (percentile(&self.path, 50), percentile(&self.baseline, 50));
        let ratios: Vec<f64> = self
            .path
            .iter()
            .zip(&self.baseline)
            .map(|(p, b)| p / b)
            .collect();
        let mib = (self.bytes_per_round * self.path.len()) as f64 / (1024.0 * 1024.0);
        format!(
            "{name:<26} {path:>13.1} {baseline:>13.1} {:>7.2}   {:<12} {:>10.2} {:>10.2}",
            path / baseline,
            format!(
                "{:.2}-{:.2}",
                percentile(&ratios, 0),
                percentile(&ratios, 100)
            ),
            self.path_cpu * 1000.0 / mib,
            self.baseline_cpu * 1000.0 / mib,
        )
    }
}

/// Runs the bulk comparison at every queue depth and transfer size and
/// prints a [`Throughput::row`] for each: the table every benchmark prints,
/// with the same rows in the same order, after one untimed round of each
/// side. `prepare` runs before each comparison; `path` and `baseline` are
/// given the depth and the size.
pub async fn print_bulk_rows<P, PF, B, BF>(
    cpu: &CpuMeter,
    bytes_per_round: usize,
    mut prepare: impl AsyncFnMut(),
    path: P,
    baseline: B,
) where
    P: Fn(usize, usize) -> PF,
    PF: Future<Output = f64>,
    B: Fn(usize, usize) -> BF,
    BF: Future<Output = f64>,
{
    // One untimed round each first: the first rounds of a run also pay for
    // heaps growing and connections settling, on both sides alike.
    prepare().await;
    path(8, 16 * 1024).await;
    baseline(8, 16 * 1024).await;
    for depth in [8usize, 32] {
        for size in [16 * 1024usize, 64 * 1024] {
            prepare().await;
            let result = Throughput::compare(
                cpu,
                bytes_per_round,
                || path(depth, size),
                || baseline(depth, size),
            )
            .await;
            println!(
                "{}",
                result.row(&format!("{depth} x {} KiB in flight", size / 1024))
            );
        }
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

    /// The header matching [`RoundTrips::rows`].
    pub fn header(path: &str, baseline: &str) -> String {
        format!(
            "{:<26} {:>11} {:>11} {:>7}",
            "64-byte round trip", path, baseline, "ratio"
        )
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
        let cpu = CpuMeter::new(&[]);
        let result = rt.block_on(Throughput::compare(
            &cpu,
            1024 * 1024,
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
        assert!(row.contains(" 0.50-0.50 "), "{row}");
    }

    #[test]
    fn keep_in_flight_settles_the_oldest_once_the_window_is_full() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut next = 0;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(keep_in_flight(
            4,
            2,
            async || {
                next += 1;
                order.borrow_mut().push(format!("s{next}"));
                next
            },
            async |n| order.borrow_mut().push(format!("d{n}")),
        ));
        assert_eq!(order.into_inner().join(" "), "s1 s2 d1 s3 d2 s4 d3 d4");
    }

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces() {
        let stat = "42 (tokio rt) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), 12);
    }

    #[test]
    fn cpu_meter_counts_work_done_by_this_process() {
        fn thread_cpu_seconds() -> f64 {
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes into the timespec it is given.
            assert_eq!(
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) },
                0
            );
            now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
        }
        let cpu = CpuMeter::new(&[]);
        let before = cpu.seconds();
        let spin_start = thread_cpu_seconds();
        let mut x = 1u64;
        while thread_cpu_seconds() - spin_start < 0.2 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let used = cpu.seconds() - before;
        // One clock tick of slack: the meter counts in ticks.
        assert!(
            used >= 0.18,
            "0.2 s of this thread's CPU counted as {used} s"
        );
    }
}
