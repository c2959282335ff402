//! Operations: the asynchronous half of every mutating API call. The call
//! answers 202 with the operation; the work runs on a task and records its
//! progress and outcome, which clients poll (or wait on).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

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
/// becomes the operation's error message.
pub fn start<F, Fut>(
    keel: &Arc<Keel>,
    project: &str,
    action: &str,
    target: &str,
    user: &str,
    work: F,
) -> Result<Arc<Operation>, StoreError>
where
    F: FnOnce(Progress) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    forget_old(keel);
    let op = keel.operations.insert(Operation {
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
    })?;
    let progress = Progress {
        keel: keel.clone(),
        id: op.id.clone(),
        last: Arc::new(AtomicU8::new(0)),
    };
    let keel = keel.clone();
    let id = op.id.clone();
    tokio::spawn(async move {
        let outcome = work(progress).await;
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
    Ok(op)
}

/// Waits up to `timeout` for an operation to finish; returns its latest
/// state either way.
pub async fn wait(keel: &Keel, id: &str, timeout: Duration) -> Option<Arc<Operation>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let op = keel.operations.get(id)?;
        if op.status != OperationStatus::Running || tokio::time::Instant::now() >= deadline {
            return Some(op);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Operations that were running when keeld stopped never finish: mark them.
pub fn fail_interrupted(keel: &Keel) {
    for op in keel
        .operations
        .filter(|op| op.status == OperationStatus::Running)
    {
        let _ = keel.operations.update::<StoreError>(&op.id, |op| {
            op.status = OperationStatus::Failed;
            op.error =
                "keeld restarted while this operation ran; check the resource and retry".into();
            op.finished_at = now();
            Ok(())
        });
    }
}
