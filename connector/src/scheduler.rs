//! PLACEHOLDER of the scheduler's interface, so that `rehost serve` compiles and starts it.
//! The lead's real scheduler (the loop that starts due runs and the run pipeline)
//! replaces this file on merge; only the shape of `Scheduler` below is relied on.

use std::sync::Arc;

use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::store::SharedStore;

/// The scheduler's loop, started by `rehost serve`.
#[derive(Debug)]
pub struct Scheduler {
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Scheduler {
    /// Starts the scheduler's loop on the current runtime; it stops when `shutdown` turns true.
    pub fn start(
        config: Arc<Config>,
        store: SharedStore,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Scheduler> {
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        // The placeholder runs nothing: it only waits to be woken or stopped.
        let task = tokio::spawn(async move {
            let _ = (config, store);
            loop {
                tokio::select! {
                    () = woken.notified() => tracing::debug!("scheduler woken (placeholder: no runs are executed)"),
                    changed = shutdown.changed() => {
                        if changed.is_err() || *shutdown.borrow() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Scheduler { wake, task })
    }

    /// Wakes the loop now (a new on-demand run, a resumed or deleted job).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits for the loop (and runs it owns) to stop after shutdown.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}
