//! Waiting for a task by polling its `info` with backoff: simpler than WaitForUpdatesEx's
//! filter and version bookkeeping, and the calls are cheap.

use std::time::{Duration, Instant};

use tracing::debug;

use crate::client::{Client, protocol};
use crate::error::{Error, Result, from_fault_parts};
use crate::soap::model::{TaskInfo, TaskState};
use crate::soap::{MoRef, Node};

/// First poll delay; doubled up to [`MAX_POLL`]. Snapshot creation of a small VM takes a
/// second or two, so the first answers come quickly without hammering vCenter on long ones.
const FIRST_POLL: Duration = Duration::from_millis(100);
const MAX_POLL: Duration = Duration::from_secs(2);

impl Client {
    /// The current `info` of a task.
    pub async fn task_info(&self, task: &MoRef) -> Result<TaskInfo> {
        let content = self.retrieve_one(task, &["info"]).await?;
        let info = content.prop("info").ok_or_else(|| Error::Protocol {
            method: "RetrievePropertiesEx".into(),
            detail: format!("{task} has no info"),
        })?;
        TaskInfo::from_node(info).map_err(|e| protocol("RetrievePropertiesEx", e))
    }

    /// Waits until `task` ends; returns its result (if any), or its fault as a typed
    /// error. `progress` is called with each new percentage.
    pub async fn wait_for_task(
        &self,
        task: &MoRef,
        timeout: Duration,
        progress: impl Fn(u8),
    ) -> Result<Option<Node>> {
        let started = Instant::now();
        let mut delay = FIRST_POLL;
        let mut last_progress = None;
        loop {
            let info = self.task_info(task).await?;
            if info.progress != last_progress {
                if let Some(p) = info.progress {
                    progress(p);
                }
                last_progress = info.progress;
            }
            match info.state {
                TaskState::Success => return Ok(info.result),
                TaskState::Error => {
                    let (fault, message, detail) = info.error.unwrap_or_default();
                    let method = if info.description_id.is_empty() {
                        task.to_string()
                    } else {
                        info.description_id.clone()
                    };
                    return Err(from_fault_parts(&method, &fault, &message, &detail));
                }
                TaskState::Queued | TaskState::Running => {}
            }
            if started.elapsed() >= timeout {
                return Err(Error::TaskTimeout {
                    task: task.value.clone(),
                    description: info.description_id,
                    seconds: timeout.as_secs(),
                });
            }
            debug!(task = %task, state = ?info.state, "waiting for task");
            tokio::time::sleep(delay.min(timeout.saturating_sub(started.elapsed()))).await;
            delay = (delay * 2).min(MAX_POLL);
        }
    }
}
