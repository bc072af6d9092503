//! VM snapshots: create, list (the tree flattened), remove (idempotent), and the disks as
//! a snapshot froze them.

use std::time::Duration;

use tracing::info;

use crate::client::{Client, protocol};
use crate::error::{Error, Result};
use crate::soap::model::{SnapshotInfo, VirtualDisk};
use crate::soap::{MoRef, Request};

/// How long a snapshot task may take: creating one is seconds, but removing one
/// consolidates its delta into the base, which takes minutes per hundred GiB written.
pub const SNAPSHOT_TASK_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

impl Client {
    /// Takes a snapshot of `vm` (without memory) and returns it once the task is done.
    pub async fn create_snapshot(
        &self,
        vm: &MoRef,
        name: &str,
        description: &str,
        memory: bool,
        quiesce: bool,
    ) -> Result<MoRef> {
        let mut req = Request::new("CreateSnapshot_Task", vm);
        req.text("name", name)
            .text("description", description)
            .text("memory", bool_text(memory))
            .text("quiesce", bool_text(quiesce));
        let task = self.call_moref(&req).await?;
        let result = self
            .wait_for_task(&task, SNAPSHOT_TASK_TIMEOUT, |_| {})
            .await?
            .ok_or_else(|| Error::Protocol {
                method: "CreateSnapshot_Task".into(),
                detail: format!("task {} succeeded without a result", task.value),
            })?;
        let snapshot = MoRef::from_node(&result).map_err(|e| protocol("CreateSnapshot_Task", e))?;
        info!(vm = %vm, snapshot = %snapshot, name, "snapshot created");
        Ok(snapshot)
    }

    /// The VM's snapshots, parents before children; empty when it has none.
    pub async fn list_snapshots(&self, vm: &MoRef) -> Result<Vec<SnapshotInfo>> {
        let content = self.retrieve_one(vm, &["snapshot"]).await?;
        // A VM without snapshots has no `snapshot` property at all.
        match content.prop("snapshot") {
            None => Ok(Vec::new()),
            Some(info) => {
                SnapshotInfo::flatten(info).map_err(|e| protocol("RetrievePropertiesEx", e))
            }
        }
    }

    /// Removes a snapshot (its children are kept, its delta consolidated). A snapshot
    /// already gone is success, so this can be repeated after a crash.
    pub async fn remove_snapshot(&self, snapshot: &MoRef) -> Result<()> {
        let mut req = Request::new("RemoveSnapshot_Task", snapshot);
        req.text("removeChildren", "false")
            .text("consolidate", "true");
        let outcome = match self.call_moref(&req).await {
            // The task's entity is the snapshot, not the VM: we wait on the task itself.
            Ok(task) => self
                .wait_for_task(&task, SNAPSHOT_TASK_TIMEOUT, |_| {})
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match outcome {
            Err(Error::ManagedObjectNotFound { .. }) => {
                info!(snapshot = %snapshot, "snapshot already removed");
                Ok(())
            }
            Ok(()) => {
                info!(snapshot = %snapshot, "snapshot removed");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The virtual disks as the snapshot froze them: capacity, the file that holds the
    /// frozen state, and the CBT change id at snapshot time.
    pub async fn snapshot_disks(&self, snapshot: &MoRef) -> Result<Vec<VirtualDisk>> {
        let content = self
            .retrieve_one(snapshot, &["config.hardware.device"])
            .await?;
        let devices = content
            .prop("config.hardware.device")
            .ok_or_else(|| Error::Protocol {
                method: "RetrievePropertiesEx".into(),
                detail: format!("{snapshot} has no config.hardware.device"),
            })?;
        VirtualDisk::list(devices).map_err(|e| protocol("RetrievePropertiesEx", e))
    }
}

fn bool_text(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}
