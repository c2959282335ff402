//! Operations: the asynchronous half of every mutating API call. The call
//! answers 202 with the operation; the work runs on a task and records its
//! progress and outcome, which clients poll (or wait on).
//!
//! Operations are stored jobs: what a job needs is in its record (action,
//! target, params) and in the resource's stored intent, so a keeld that
//! restarts resumes the jobs that were running ([`resume`]) instead of
//! failing them; the few that cannot be resumed end `failed` with their
//! resource set right.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use super::jobs;
use crate::keel::Keel;
use crate::model::{Operation, OperationStatus, new_id, now};
use crate::store::StoreError;

/// Operations finished longer ago than this are forgotten.
const KEEP_FINISHED: u64 = 24 * 3600;

/// A running operation's handle for its task.
#[derive(Clone)]
pub struct Progress {
    keel: Arc<Keel>,
    pub id: String,
    last: Arc<AtomicU8>,
}

impl Progress {
    /// Records progress; a value already recorded costs nothing.
    pub fn set(&self, percent: u8) {
        let percent = percent.min(99);
        if self.last.swap(percent, Ordering::Relaxed) == percent {
            return;
        }
        let result = self.keel.operations.update::<StoreError>(&self.id, |op| {
            op.progress = percent;
            Ok(())
        });
        if let Err(e) = result {
            log::warn!("Cannot record the progress of {}: {e}", self.id);
        }
    }
}

/// Records a new operation and runs `work` for it. `work`'s error, if any,
/// becomes the operation's error message. Such an operation is not resumed
/// after a restart ([`jobs::interrupted`] ends it); [`start_job`] is.
pub fn start<F, Fut, E>(
    keel: &Arc<Keel>,
    project: &str,
    action: &str,
    target: &str,
    user: &str,
    work: F,
) -> Result<Arc<Operation>, StoreError>
where
    F: FnOnce(Progress) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<Failure>,
{
    let op = record(keel, project, action, target, user, serde_json::Value::Null)?;
    run(keel, &op, work);
    Ok(op)
}

/// Records an operation whose job is in [`jobs::run`] and runs it; a
/// restarted keeld runs it again from its record.
pub fn start_job(
    keel: &Arc<Keel>,
    project: &str,
    action: &str,
    target: &str,
    user: &str,
    params: serde_json::Value,
) -> Result<Arc<Operation>, StoreError> {
    let op = record(keel, project, action, target, user, params)?;
    let (k, o) = (keel.clone(), op.clone());
    run(keel, &op, move |progress| async move {
        jobs::run(&k, &o, progress, false).await
    });
    Ok(op)
}

fn record(
    keel: &Arc<Keel>,
    project: &str,
    action: &str,
    target: &str,
    user: &str,
    params: serde_json::Value,
) -> Result<Arc<Operation>, StoreError> {
    forget_old(keel);
    keel.operations.insert(Operation {
        id: new_id("op"),
        project: project.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        status: OperationStatus::Running,
        progress: 0,
        error: String::new(),
        user: user.to_string(),
        created_at: now(),
        finished_at: 0,
        params,
    })
}

/// Why an operation failed: any error (its whole chain is recorded) or a
/// message.
pub type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Runs `work` for a recorded operation and records how it ended.
fn run<F, Fut, E>(keel: &Arc<Keel>, op: &Operation, work: F)
where
    F: FnOnce(Progress) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<Failure>,
{
    let progress = Progress {
        keel: keel.clone(),
        id: op.id.clone(),
        last: Arc::new(AtomicU8::new(op.progress)),
    };
    let keel = keel.clone();
    let id = op.id.clone();
    tokio::spawn(async move {
        let outcome = work(progress)
            .await
            .map_err(|e| keel_api::error_chain(&*e.into()));
        let result = keel.operations.update::<StoreError>(&id, |op| {
            op.finished_at = now();
            match &outcome {
                Ok(()) => {
                    op.status = OperationStatus::Succeeded;
                    op.progress = 100;
                }
                Err(message) => {
                    op.status = OperationStatus::Failed;
                    op.error = message.clone();
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            log::error!("Cannot record the end of operation {id}: {e}");
        }
        if let Err(message) = outcome {
            log::warn!("Operation {id} failed: {message}");
        }
    });
}

/// Waits up to `timeout` for an operation to finish; returns its latest
/// state either way.
pub async fn wait(keel: &Keel, id: &str, timeout: Duration) -> Option<Arc<Operation>> {
    keel.operations
        .wait_for(id, timeout, |op| op.status != OperationStatus::Running)
        .await
}

fn forget_old(keel: &Keel) {
    let cutoff = now().saturating_sub(KEEP_FINISHED);
    for op in keel
        .operations
        .filter(|op| op.status != OperationStatus::Running && op.finished_at < cutoff)
    {
        let _ = keel.operations.remove(&op.id);
    }
}

/// At keeld's start: every operation that was running is resumed from its
/// record, or (where it cannot be) ended with its resource set right.
pub fn resume(keel: &Arc<Keel>) {
    for op in keel
        .operations
        .filter(|op| op.status == OperationStatus::Running)
    {
        if jobs::resumable(&op.action) {
            log::info!("Resuming operation {} ({} {})", op.id, op.action, op.target);
            let (k, o) = (keel.clone(), op.clone());
            run(keel, &op, move |progress| async move {
                jobs::run(&k, &o, progress, true).await
            });
        } else {
            let message = jobs::interrupted(keel, &op);
            let _ = keel.operations.update::<StoreError>(&op.id, |op| {
                op.status = OperationStatus::Failed;
                op.error = message;
                op.finished_at = now();
                Ok(())
            });
        }
    }
}
