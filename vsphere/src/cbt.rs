//! Changed block tracking: turning it on, asking which areas changed (vCenter answers
//! part of the disk per call), widening the areas to whole grains (`READ_ALIGNMENT`), and the tasks running on
//! a VM.

use std::future::Future;
use std::time::Duration;

use tracing::info;

use crate::client::{Client, protocol, returnval};
use crate::error::{Error, Result};
use crate::soap::model::{DiskChangeInfo, TaskInfo, TaskState};
use crate::soap::{MoRef, Request};

/// A reconfiguration is quick; a host under load may queue it for a while.
const RECONFIGURE_TIMEOUT: Duration = Duration::from_secs(600);

/// The change id that asks for every allocated area.
pub const ALL_AREAS: &str = "*";

impl Client {
    /// Turns CBT on for `vm`. It takes effect at the VM's next stun (a snapshot, a power
    /// cycle), so the first snapshot after this one reports a change id.
    pub async fn enable_change_tracking(&self, vm: &MoRef) -> Result<()> {
        let mut req = Request::new("ReconfigVM_Task", vm);
        req.raw("<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>");
        let task = self.call_moref(&req).await?;
        self.wait_for_task(&task, RECONFIGURE_TIMEOUT, |_| {})
            .await?;
        info!(vm = %vm, "changed block tracking enabled");
        Ok(())
    }

    /// One QueryChangedDiskAreas call: changes of disk `device_key` in `snapshot` since
    /// `change_id` (`*`: every allocated area), from `start_offset` on.
    pub async fn query_changed_disk_areas(
        &self,
        vm: &MoRef,
        snapshot: &MoRef,
        device_key: i32,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo> {
        let mut req = Request::new("QueryChangedDiskAreas", vm);
        req.moref("snapshot", snapshot)
            .text("deviceKey", &device_key.to_string())
            .text("startOffset", &start_offset.to_string())
            .text("changeId", change_id);
        let response = self.call(&req).await?;
        DiskChangeInfo::from_node(returnval(&response, req.method())?)
            .map_err(|e| protocol(req.method(), e))
    }

    /// Every changed area of the disk, `(start, length)`, asking again from where each
    /// answer ends until `capacity` is covered.
    pub async fn changed_areas(
        &self,
        vm: &MoRef,
        snapshot: &MoRef,
        device_key: i32,
        change_id: &str,
        capacity: u64,
    ) -> Result<Vec<(u64, u64)>> {
        collect_changed_areas(capacity, |offset| {
            self.query_changed_disk_areas(vm, snapshot, device_key, offset, change_id)
        })
        .await
    }

    /// Tasks on `vm` that are queued or running (from its `recentTask`).
    pub async fn running_tasks(&self, vm: &MoRef) -> Result<Vec<TaskInfo>> {
        let content = self.retrieve_one(vm, &["recentTask"]).await?;
        let Some(list) = content.prop("recentTask") else {
            return Ok(Vec::new());
        };
        let mut running = Vec::new();
        for node in &list.children {
            let task = MoRef::from_node(node).map_err(|e| protocol("RetrievePropertiesEx", e))?;
            match self.task_info(&task).await {
                Ok(info) if matches!(info.state, TaskState::Queued | TaskState::Running) => {
                    running.push(info);
                }
                Ok(_) => {}
                // A task can age out of the task manager between the two reads.
                Err(Error::ManagedObjectNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(running)
    }
}

/// Calls `query(offset)` from 0 until the answers cover `[0, capacity)`, collecting the
/// areas; an answer that does not move past its offset is an error, not a hang.
pub async fn collect_changed_areas<F, Fut>(capacity: u64, mut query: F) -> Result<Vec<(u64, u64)>>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<DiskChangeInfo>>,
{
    let mut areas = Vec::new();
    let mut offset = 0u64;
    while offset < capacity {
        let info = query(offset).await?;
        let end = info.start_offset.saturating_add(info.length);
        if end <= offset || info.start_offset > offset {
            return Err(Error::NoProgress {
                offset,
                start: info.start_offset,
                length: info.length,
            });
        }
        areas.extend(info.changed_areas.into_iter().filter(|(_, len)| *len > 0));
        offset = end;
    }
    Ok(areas)
}

/// Widens areas outward to `block` boundaries, merges those that touch or overlap, and
/// clips them to `capacity`: the sorted, disjoint ranges to read, as `(start, length)`.
pub fn widen_and_merge(areas: &[(u64, u64)], block: u64, capacity: u64) -> Vec<(u64, u64)> {
    let block = block.max(1);
    let mut widened: Vec<(u64, u64)> = areas
        .iter()
        .filter(|(start, len)| *len > 0 && *start < capacity)
        .map(|&(start, len)| {
            let end = start.saturating_add(len).min(capacity);
            let lo = start / block * block;
            let hi = end.div_ceil(block).saturating_mul(block).min(capacity);
            (lo, hi)
        })
        .collect();
    widened.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(widened.len());
    for (lo, hi) in widened {
        match merged.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    merged.into_iter().map(|(lo, hi)| (lo, hi - lo)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;

    const B: u64 = 512 * 1024;

    #[test]
    fn widening_examples() {
        assert_eq!(widen_and_merge(&[(1, 1)], B, 10 * B), vec![(0, B)]);
        assert_eq!(
            widen_and_merge(&[(B + 5, 10), (0, 1), (3 * B, B)], B, 10 * B),
            vec![(0, 2 * B), (3 * B, B)]
        );
        // Clipped to a capacity that is not a multiple of the block.
        assert_eq!(widen_and_merge(&[(B, 100)], B, B + 10), vec![(B, 10)]);
        assert_eq!(widen_and_merge(&[(5 * B, 1)], B, 2 * B), vec![]);
    }

    proptest! {
        #[test]
        fn widened_areas_cover_input_aligned_sorted_disjoint_within_capacity(
            areas in proptest::collection::vec((0u64..64 * B, 0u64..4 * B), 0..40),
            capacity in 1u64..80 * B,
        ) {
            let out = widen_and_merge(&areas, B, capacity);
            for w in out.windows(2) {
                // Sorted and disjoint, not even touching (touching ones are merged).
                prop_assert!(w[0].0 + w[0].1 < w[1].0);
            }
            for &(start, len) in &out {
                prop_assert!(len > 0);
                prop_assert_eq!(start % B, 0);
                let end = start + len;
                prop_assert!(end <= capacity);
                prop_assert!(end % B == 0 || end == capacity);
            }
            for &(start, len) in &areas {
                let end = (start + len).min(capacity);
                if len == 0 || start >= capacity { continue; }
                prop_assert!(out.iter().any(|&(s, l)| s <= start && end <= s + l));
            }
        }
    }

    fn answer(start: u64, length: u64, areas: &[(u64, u64)]) -> DiskChangeInfo {
        DiskChangeInfo {
            start_offset: start,
            length,
            changed_areas: areas.to_vec(),
        }
    }

    #[tokio::test]
    async fn chunked_answers_are_followed_to_the_end() {
        let capacity = 10 * B;
        let calls = RefCell::new(Vec::new());
        // A server answering at most 3 blocks per call, with one area per chunk.
        let areas = collect_changed_areas(capacity, |offset| {
            calls.borrow_mut().push(offset);
            let len = (3 * B).min(capacity - offset);
            let reply = answer(offset, len, &[(offset + 1, 7)]);
            async move { Ok(reply) }
        })
        .await
        .unwrap();
        assert_eq!(*calls.borrow(), vec![0, 3 * B, 6 * B, 9 * B]);
        assert_eq!(
            areas,
            vec![(1, 7), (3 * B + 1, 7), (6 * B + 1, 7), (9 * B + 1, 7)]
        );
    }

    #[tokio::test]
    async fn an_answer_without_progress_is_an_error() {
        let err = collect_changed_areas(10 * B, |offset| async move { Ok(answer(offset, 0, &[])) })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NoProgress { offset: 0, .. }), "{err}");
        // Nor may an answer start past where we asked (areas in between would be lost).
        let err = collect_changed_areas(
            10 * B,
            |offset| async move { Ok(answer(offset + B, B, &[])) },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::NoProgress { .. }), "{err}");
    }
}
