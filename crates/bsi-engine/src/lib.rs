//! The bsi engine: walks trees, builds packages, verifies them against trees, and applies,
//! reverts and reports patches on a root.
//!
//! Library code never prints; progress goes through [`Progress`] and every failure is a typed
//! error naming the file and the reason.
#![forbid(unsafe_code)]

mod apply;
mod build;
mod entries;
#[doc(hidden)]
pub mod fault;
mod fsx;
mod package;
mod seen;
mod state;
mod tree;
mod txn;
mod update;

use std::path::{Path, PathBuf};

pub use apply::{
    apply, recover, revert, status, ApplyError, ApplyOutcome, RevertError, Session, SessionError,
    Space, Status, StatusError,
};
pub use build::{
    build, build_to_file, write_atomically, BuildError, BuildOptions, BuildSummary, ComponentSpec,
};
pub use entries::Entries;
pub use package::{signer_key, verify_against_tree, OpenError, TreeVerifyError, VerifiedPackage};
pub use state::default_state_dir;
pub use tree::{scan, ScanError, Tree, STATE_DIR_NAME};
pub use txn::{Failed, Interrupted, Recovered, TxnError, TxnKind};
pub use update::{
    update, ChannelSource, DeviceRecord, Policy, UpdateError, UpdateOutcome, UpdateTrust,
};

/// Files at least this large (old or new) are decoded one at a time, and encoded in
/// [`large_batches`], so that memory follows the largest file rather than the sum of the
/// largest few.
pub(crate) const LARGE_FILE: u64 = 32 << 20;

/// Groups of large files (by index into `weights`, their [`entry_weight`]s) to encode at the
/// same time, one group after the other: a group's weights sum to at most the largest weight,
/// so a group needs no more memory than the largest file does alone (an encoding takes at most
/// about six times its file). Firefox ESR 140 -> 153 encodes its two `omni.ja` archives (43 and
/// 54 MB, one core each for half a minute) side by side, and libxul.so (184 MB) alone.
///
/// First fit, largest first; ties keep index order, so the groups depend only on the weights.
pub(crate) fn large_batches(weights: &[u64]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(weights[i]));
    let capacity = order.first().map_or(0, |&i| weights[i]);
    let mut batches: Vec<(u64, Vec<usize>)> = Vec::new();
    for i in order {
        match batches
            .iter_mut()
            .find(|(sum, _)| weights[i] <= capacity - sum)
        {
            Some((sum, batch)) => {
                *sum += weights[i];
                batch.push(i);
            }
            None => batches.push((weights[i], vec![i])),
        }
    }
    batches.into_iter().map(|(_, batch)| batch).collect()
}

/// `f` of every item of `items`, on every core: the largest by `weight` first, each core taking
/// the next as it becomes free, so that the last to finish is a short one and the longest
/// starts at once (the testdata's executables decoded in 95 ms in the order of their paths, 88
/// ms this way; Pillow 10.0.0 -> 10.0.1 built in 823.6 ms, 749.4 ms this way, its libharfbuzz
/// no longer behind four smaller libraries); stops at the first error. The results come in no
/// particular order.
///
/// Between two items, a core first runs what the items in progress handed to the pool (a
/// segment of a diff stream decoded ahead, a region of a search): otherwise it ran only once
/// every item was taken, and Pillow 10.0.0 -> 10.0.1's libharfbuzz was decoded on one core
/// while the other took the small files (apply 111 -> 91 ms, medians of 11, interleaved).
/// Not before every core has started its loop, which the pool would hand out as well.
pub(crate) fn largest_first<T: Send, E: Send>(
    mut items: Vec<usize>,
    weight: impl Fn(usize) -> u64,
    f: impl Fn(usize) -> Result<T, E> + Sync,
) -> Result<Vec<(usize, T)>, E> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    use std::sync::Mutex;
    items.sort_by_key(|&j| std::cmp::Reverse(weight(j)));
    let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
    let done = Mutex::new(Vec::with_capacity(items.len()));
    let error = Mutex::new(None);
    let loops = rayon::current_num_threads().min(items.len());
    let started = AtomicUsize::new(0);
    rayon::scope(|scope| {
        for _ in 0..loops {
            scope.spawn(|_| {
                started.fetch_add(1, Relaxed);
                while !failed.load(Relaxed) {
                    if started.load(Relaxed) == loops {
                        while rayon::yield_now() == Some(rayon::Yield::Executed) {}
                    }
                    let Some(&j) = items.get(next.fetch_add(1, Relaxed)) else {
                        break;
                    };
                    match f(j) {
                        Ok(r) => done.lock().unwrap_or_else(|e| e.into_inner()).push((j, r)),
                        Err(e) => {
                            failed.store(true, Relaxed);
                            let mut error = error.lock().unwrap_or_else(|e| e.into_inner());
                            error.get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    match error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(done.into_inner().unwrap_or_else(|e| e.into_inner())),
    }
}

/// The larger of an entry's old and new file sizes.
pub(crate) fn entry_weight(entry: &bsi_format::Entry) -> u64 {
    let size = |image: &Option<bsi_format::Image>| match image {
        Some(bsi_format::Image::File { size, .. }) => *size,
        _ => 0,
    };
    size(&entry.pre).max(size(&entry.post))
}

/// Receives progress of long operations (a CLI turns it into a progress bar).
pub trait Progress: Sync {
    /// A phase with `total` units of work begins.
    fn start(&self, phase: &str, total: u64);
    /// `units` more units are done.
    fn advance(&self, units: u64);
    fn finish(&self);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _phase: &str, _total: u64) {}
    fn advance(&self, _units: u64) {}
    fn finish(&self) {}
}

/// A filesystem call that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct FsError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FsError {
    pub(crate) fn new(action: &'static str, path: &Path, source: std::io::Error) -> FsError {
        FsError {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Shorthand to attach an action and a path to an I/O result.
pub(crate) trait FsContext<T> {
    fn fs(self, action: &'static str, path: &Path) -> Result<T, FsError>;
}

impl<T> FsContext<T> for std::io::Result<T> {
    fn fs(self, action: &'static str, path: &Path) -> Result<T, FsError> {
        self.map_err(|e| FsError::new(action, path, e))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::{large_batches, largest_first};

    const MB: u64 = 1 << 20;

    #[test]
    fn large_batches_never_outweigh_the_largest_file() {
        // Firefox ESR 140 -> 153: libxul alone, then both omni.ja archives together.
        assert_eq!(
            large_batches(&[54 * MB, 184 * MB, 43 * MB]),
            vec![vec![1], vec![0, 2]]
        );
        // Equal files never share a batch; an empty list has none.
        assert_eq!(
            large_batches(&[40 * MB, 40 * MB, 40 * MB]),
            vec![vec![0], vec![1], vec![2]]
        );
        assert!(large_batches(&[]).is_empty());
        // First fit, largest first: 100 | 60+40 | 50+35 (35 does not fit beside 60+40).
        let weights = [35 * MB, 60 * MB, 100 * MB, 40 * MB, 50 * MB];
        let batches = large_batches(&weights);
        assert_eq!(batches, vec![vec![2], vec![1, 3], vec![4, 0]]);
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4], "every file once");
        for batch in &batches {
            let sum: u64 = batch.iter().map(|&i| weights[i]).sum();
            assert!(sum <= 100 * MB, "{batch:?} weighs {sum}");
        }
    }

    /// What [`largest_first`] gave: each item with its result (ten times the item), or the
    /// item that failed.
    type Outcome = Result<Vec<(usize, usize)>, usize>;

    /// [`largest_first`] of the items weighing `weights`, within a pool of `threads`, failing
    /// at item `fail_at`; with the items in the order it called `f` for them.
    fn run_largest_first(
        threads: usize,
        weights: &[u64],
        fail_at: Option<usize>,
    ) -> (Outcome, Vec<usize>) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a pool");
        let called = Mutex::new(Vec::new());
        let result = pool.install(|| {
            largest_first(
                (0..weights.len()).collect(),
                |i| weights[i],
                |i| {
                    called.lock().expect("not poisoned").push(i);
                    match fail_at {
                        Some(f) if f == i => Err(i),
                        _ => Ok(i * 10),
                    }
                },
            )
        });
        (result, called.into_inner().expect("not poisoned"))
    }

    #[test]
    fn largest_first_starts_with_the_largest_and_gives_every_result_once() {
        let weights = [3, 90, 7, 7, 50, 1, 60];
        // One core: strictly by weight, ties in their order.
        let (result, called) = run_largest_first(1, &weights, None);
        assert_eq!(called, vec![1, 6, 4, 2, 3, 0, 5]);
        let mut done = result.expect("no error");
        done.sort();
        let expected: Vec<(usize, usize)> = (0..weights.len()).map(|i| (i, i * 10)).collect();
        assert_eq!(done, expected);
        // Two cores: the two largest are the first two taken, every item exactly once.
        let (result, called) = run_largest_first(2, &weights, None);
        let mut first_two = called[..2].to_vec();
        first_two.sort();
        assert_eq!(first_two, vec![1, 6]);
        let mut done = result.expect("no error");
        done.sort();
        assert_eq!(done, expected);
    }

    #[test]
    fn largest_first_stops_at_an_error() {
        let weights = [3, 90, 7, 7, 50, 1, 60];
        // Item 4 is the third taken: nothing after it starts, and its error is the answer.
        let (result, called) = run_largest_first(1, &weights, Some(4));
        assert_eq!(result, Err(4));
        assert_eq!(called, vec![1, 6, 4]);
    }

    /// Work that an item hands to the pool (a segment decoded ahead) is taken up by the other
    /// core as soon as it is done with its item, not after every item is done.
    #[test]
    fn largest_first_runs_work_handed_out_between_items() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::time::{Duration, Instant};
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a pool");
        // Item 0 hands out one piece of work and waits for it without taking part; items 1 to
        // 8 take 20 ms each. The piece notes how many of them were done when it ran.
        let others = 8;
        let done = AtomicUsize::new(0);
        let seen_at = Mutex::new(None);
        let result = pool.install(|| {
            largest_first(
                (0..=others).collect(),
                |i| if i == 0 { 100 } else { 1 },
                |i| -> Result<(), ()> {
                    if i > 0 {
                        std::thread::sleep(Duration::from_millis(20));
                        done.fetch_add(1, SeqCst);
                        return Ok(());
                    }
                    rayon::in_place_scope(|scope| {
                        scope.spawn(|_| {
                            *seen_at.lock().expect("not poisoned") = Some(done.load(SeqCst));
                        });
                        let started = Instant::now();
                        while seen_at.lock().expect("not poisoned").is_none()
                            && started.elapsed() < Duration::from_secs(30)
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    });
                    Ok(())
                },
            )
        });
        assert_eq!(result.map(|r| r.len()), Ok(others + 1));
        let seen_at = seen_at.into_inner().expect("not poisoned");
        assert!(
            seen_at.is_some_and(|n| n < others),
            "the work handed out ran after {seen_at:?} of {others} items"
        );
    }
}
