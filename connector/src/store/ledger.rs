//! The snapshot ledger: every source snapshot rehost created, recorded before it is
//! asked for and closed only when it is gone.

use anyhow::Result;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{NOW, Store};

/// A row of the snapshot ledger.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerSnapshot {
    pub id: i64,
    pub source: String,
    pub vm_id: String,
    pub vm_ref: String,
    pub name: String,
    pub snapshot_ref: Option<String>,
    pub purpose: String,
    pub created_at: String,
    pub removed_at: Option<String>,
}

impl Store {
    /// Records that a snapshot named `name` is about to be created. Call before asking
    /// the source, so a crash in between still leaves a trace to clean up.
    pub fn snapshot_intended(
        &self,
        source: &str,
        vm_id: &str,
        vm_ref: &str,
        name: &str,
        purpose: &str,
    ) -> Result<i64> {
        self.conn.execute(
            &format!(
                "INSERT INTO source_snapshots (source, vm_id, vm_ref, name, purpose, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, {NOW})"
            ),
            params![source, vm_id, vm_ref, name, purpose],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Records the source's handle of a created snapshot.
    pub fn snapshot_created(&self, id: i64, snapshot_ref: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE source_snapshots SET snapshot_ref = ?2 WHERE id = ?1",
            params![id, snapshot_ref],
        )?;
        Ok(())
    }

    /// Records that a snapshot is gone (removed, or found to be absent).
    pub fn snapshot_removed(&self, id: i64) -> Result<()> {
        self.conn.execute(
            &format!(
                "UPDATE source_snapshots SET removed_at = {NOW}, last_error = NULL WHERE id = ?1"
            ),
            params![id],
        )?;
        Ok(())
    }

    /// Records why removing a snapshot failed (it stays open in the ledger).
    pub fn snapshot_removal_failed(&self, id: i64, error: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE source_snapshots SET last_error = ?2 WHERE id = ?1",
            params![id, error],
        )?;
        Ok(())
    }

    /// Snapshots of `source` not yet known to be removed.
    pub fn open_snapshots(&self, source: &str) -> Result<Vec<LedgerSnapshot>> {
        let mut query = self.conn.prepare(
            "SELECT id, source, vm_id, vm_ref, name, snapshot_ref, purpose, created_at, removed_at
             FROM source_snapshots WHERE source = ?1 AND removed_at IS NULL ORDER BY id",
        )?;
        let rows = query.query_map(params![source], |row| {
            Ok(LedgerSnapshot {
                id: row.get(0)?,
                source: row.get(1)?,
                vm_id: row.get(2)?,
                vm_ref: row.get(3)?,
                name: row.get(4)?,
                snapshot_ref: row.get(5)?,
                purpose: row.get(6)?,
                created_at: row.get(7)?,
                removed_at: row.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The ledger row of the snapshot named `name`, if any.
    pub fn snapshot_by_name(&self, name: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id FROM source_snapshots WHERE name = ?1",
                params![name],
                |row| row.get(0),
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_ledger_tracks_open_snapshots() {
        let store = Store::in_memory().unwrap();
        let a = store
            .snapshot_intended("vc1", "u1", "vm-1", "rehost-a", "export")
            .unwrap();
        let b = store
            .snapshot_intended("vc1", "u1", "vm-1", "rehost-b", "export")
            .unwrap();
        store.snapshot_created(a, "snapshot-1").unwrap();
        store.snapshot_removed(b).unwrap();
        let open = store.open_snapshots("vc1").unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].snapshot_ref.as_deref(), Some("snapshot-1"));
        assert_eq!(store.snapshot_by_name("rehost-b").unwrap(), Some(b));
        assert!(store.open_snapshots("vc2").unwrap().is_empty());
    }
}
