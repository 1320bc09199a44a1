//! Fault injection for tests: every filesystem step that changes something under a root or a
//! state directory (create, sync, rename, link, remove, chmod, set time...) passes through
//! [`step`], which counts the steps under an armed scope and can make one of them fail.
//!
//! A crash is a panic that unwinds out of the operation without running any of its error
//! handling, and every later step under the scope panics too, so that nothing more is written:
//! what is on disk is what a `kill -9` at that instant would leave (unsynced data aside).
//! Unarmed, [`step`] costs one atomic load.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What happens at the chosen step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The process dies: a panic with a [`Crash`] payload.
    Crash,
    /// The step fails with this errno (`ENOSPC` = 28, `EIO` = 5); later steps succeed, so
    /// that the operation's own roll back is exercised.
    Errno(i32),
}

/// The panic payload of an injected crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crash {
    pub step: usize,
}

type Action = Box<dyn FnOnce(&Path) + Send>;

struct Plan {
    scope: PathBuf,
    at: usize,
    fault: Fault,
    /// Run just before step `at` instead of failing it (see [`arm_action`]).
    action: Option<Action>,
    seen: usize,
    fired: bool,
    /// Every step seen, in order, when tracing (see [`arm_trace`]).
    trace: Option<Vec<(&'static str, PathBuf)>>,
}

static ARMED: AtomicBool = AtomicBool::new(false);
static PLANS: Mutex<Vec<Plan>> = Mutex::new(Vec::new());

fn plans() -> std::sync::MutexGuard<'static, Vec<Plan>> {
    // A crash panics while no guard is held, so the lock is never poisoned by one; recover
    // from any other poisoning rather than cascade.
    PLANS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Count the steps under `scope` from now on; step number `at` (1-based) gets `fault`. Use
/// `at = usize::MAX` to count only. Replaces an earlier plan for the same scope.
pub fn arm(scope: &Path, at: usize, fault: Fault) {
    let mut plans = plans();
    plans.retain(|p| p.scope != scope);
    plans.push(Plan {
        scope: scope.to_owned(),
        at,
        fault,
        action: None,
        seen: 0,
        fired: false,
        trace: None,
    });
    ARMED.store(true, Ordering::SeqCst);
}

/// Like [`arm`], but step `at` runs `action` first (an adversary changing the tree at that
/// instant), given the path the step is about to change, and then proceeds normally.
pub fn arm_action(scope: &Path, at: usize, action: impl FnOnce(&Path) + Send + 'static) {
    arm(scope, at, Fault::Crash);
    let mut plans = plans();
    if let Some(plan) = plans.iter_mut().find(|p| p.scope == scope) {
        plan.action = Some(Box::new(action));
    }
}

/// Record the steps under `scope` from now on, what each does and the path it changes; none
/// fails. [`take_trace`] returns them.
pub fn arm_trace(scope: &Path) {
    arm(scope, usize::MAX, Fault::Crash);
    if let Some(plan) = plans().iter_mut().find(|p| p.scope == scope) {
        plan.trace = Some(Vec::new());
    }
}

/// Stop watching `scope`; returns the steps [`arm_trace`] recorded under it, in order.
pub fn take_trace(scope: &Path) -> Vec<(&'static str, PathBuf)> {
    let trace = plans()
        .iter_mut()
        .find(|p| p.scope == scope)
        .and_then(|p| p.trace.take())
        .unwrap_or_default();
    disarm(scope);
    trace
}

/// Stop watching `scope`; returns how many steps were seen under it.
pub fn disarm(scope: &Path) -> usize {
    let mut plans = plans();
    let seen = plans
        .iter()
        .find(|p| p.scope == scope)
        .map_or(0, |p| p.seen);
    plans.retain(|p| p.scope != scope);
    ARMED.store(!plans.is_empty(), Ordering::SeqCst);
    seen
}

/// Called before every filesystem step that changes `path`; `action` says what it does.
pub(crate) fn step(action: &'static str, path: &Path) -> io::Result<()> {
    if !ARMED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let outcome = {
        let mut plans = plans();
        let Some(plan) = plans.iter_mut().find(|p| path.starts_with(&p.scope)) else {
            return Ok(());
        };
        if let Some(trace) = plan.trace.as_mut() {
            trace.push((action, path.to_owned()));
        }
        if plan.action.is_some() {
            plan.seen += 1;
            let action = (plan.seen == plan.at).then(|| plan.action.take()).flatten();
            drop(plans);
            if let Some(action) = action {
                action(path);
            }
            return Ok(());
        }
        if plan.fired {
            (plan.fault == Fault::Crash).then_some((plan.fault, plan.at))
        } else {
            plan.seen += 1;
            if plan.seen == plan.at {
                plan.fired = true;
                Some((plan.fault, plan.at))
            } else {
                None
            }
        }
    };
    match outcome {
        None => Ok(()),
        Some((Fault::Crash, at)) => std::panic::panic_any(Crash { step: at }),
        Some((Fault::Errno(errno), _)) => Err(io::Error::from_raw_os_error(errno)),
    }
}

static FREE_SPACE: Mutex<Vec<(PathBuf, u64)>> = Mutex::new(Vec::new());

/// Make the free-space check see `bytes` free for paths under `scope` (`None`: the real figure),
/// as on a nearly full disk.
pub fn pretend_free_space(scope: &Path, bytes: Option<u64>) {
    let mut list = FREE_SPACE.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|(s, _)| s != scope);
    if let Some(bytes) = bytes {
        list.push((scope.to_owned(), bytes));
    }
}

/// The pretended free space for `path`, if a test set one.
pub(crate) fn pretended_free_space(path: &Path) -> Option<u64> {
    let list = FREE_SPACE.lock().unwrap_or_else(|e| e.into_inner());
    list.iter()
        .find(|(scope, _)| path.starts_with(scope))
        .map(|(_, bytes)| *bytes)
}
