//! The connector's embedded store: one SQLite file (WAL), with numbered migrations.
//!
//! It holds what must survive the process: the sources seen, the server catalog, and the
//! ledger of every source snapshot rehost created, written *before* the snapshot is
//! asked for and closed only when it is gone, so a crash never loses track of one.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rehost_core::VmInfo;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// Schema changes, in order; the database's `user_version` is how many were applied.
/// Never edit one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: sources, the server catalog, the snapshot ledger.
    r"
    CREATE TABLE sources (
        name        TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        url         TEXT NOT NULL,
        catalogued_at TEXT
    );
    CREATE TABLE servers (
        source          TEXT NOT NULL,
        vm_id           TEXT NOT NULL,
        name            TEXT NOT NULL,
        path            TEXT NOT NULL,
        source_ref      TEXT NOT NULL,
        power_state     TEXT NOT NULL,
        guest_os        TEXT NOT NULL,
        cpus            INTEGER NOT NULL,
        memory_mib      INTEGER NOT NULL,
        firmware        TEXT NOT NULL,
        change_tracking INTEGER NOT NULL,
        info            TEXT NOT NULL,   -- the whole VmInfo as JSON (disks included)
        unsupported     TEXT,            -- reasons, one per line; NULL when replicable
        catalogued_at   TEXT NOT NULL,
        PRIMARY KEY (source, vm_id)
    );
    CREATE TABLE source_snapshots (
        id           INTEGER PRIMARY KEY,
        source       TEXT NOT NULL,
        vm_id        TEXT NOT NULL,
        vm_ref       TEXT NOT NULL,
        name         TEXT NOT NULL UNIQUE,
        snapshot_ref TEXT,               -- NULL until the source has answered
        purpose      TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        removed_at   TEXT,
        last_error   TEXT
    );
    CREATE INDEX source_snapshots_open ON source_snapshots (source, removed_at);
    ",
];

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')";

/// The open store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

/// A catalogued server, as `servers list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Server {
    pub source: String,
    #[serde(flatten)]
    pub info: VmInfo,
    pub unsupported: Vec<String>,
    pub catalogued_at: String,
}

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
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the store's folder {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening the store {}", path.display()))?;
        Self::init(conn).with_context(|| format!("preparing the store {}", path.display()))
    }

    /// An in-memory store, for tests.
    #[cfg(test)]
    pub fn in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store> {
        // WAL lets the API server read while a run writes; a busy timeout rather than
        // an immediate SQLITE_BUSY when two commands share the file.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: usize = self
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > MIGRATIONS.len() {
            bail!(
                "the store is at schema version {version}, newer than this rehost knows ({}); use a newer rehost",
                MIGRATIONS.len()
            );
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)
                .with_context(|| format!("applying migration {}", index + 1))?;
            tx.pragma_update(None, "user_version", index + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The schema version.
    pub fn schema_version(&self) -> Result<usize> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))?)
    }

    /// Replaces the catalog of `source` with `vms` (VMs no longer there are dropped).
    pub fn replace_catalog(
        &mut self,
        source: &str,
        kind: &str,
        url: &str,
        vms: &[VmInfo],
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            &format!(
                "INSERT INTO sources (name, kind, url, catalogued_at) VALUES (?1, ?2, ?3, {NOW})
                 ON CONFLICT (name) DO UPDATE SET kind = ?2, url = ?3, catalogued_at = {NOW}"
            ),
            params![source, kind, url],
        )?;
        tx.execute("DELETE FROM servers WHERE source = ?1", params![source])?;
        {
            let mut insert = tx.prepare(&format!(
                "INSERT INTO servers (source, vm_id, name, path, source_ref, power_state, guest_os,
                    cpus, memory_mib, firmware, change_tracking, info, unsupported, catalogued_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, {NOW})"
            ))?;
            for vm in vms {
                let reasons = vm.unsupported_reasons();
                insert
                    .execute(params![
                        source,
                        vm.id.0,
                        vm.name,
                        vm.path,
                        vm.source_ref,
                        enum_name(&vm.power_state)?,
                        vm.guest_os,
                        vm.cpus,
                        i64::try_from(vm.memory_mib).unwrap_or(i64::MAX),
                        enum_name(&vm.firmware)?,
                        vm.change_tracking,
                        serde_json::to_string(vm)?,
                        (!reasons.is_empty()).then(|| reasons.join("\n")),
                    ])
                    .with_context(|| format!("storing VM {} ({})", vm.name, vm.id))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The catalog, optionally of one source, ordered by source and name.
    pub fn servers(&self, source: Option<&str>) -> Result<Vec<Server>> {
        let mut query = self.conn.prepare(
            "SELECT source, info, unsupported, catalogued_at FROM servers
             WHERE ?1 IS NULL OR source = ?1 ORDER BY source, name, vm_id",
        )?;
        let rows = query.query_map(params![source], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, String>(3)?,
            ))
        })?;
        let mut servers = Vec::new();
        for row in rows {
            let (source, info, unsupported, catalogued_at) = row?;
            let info: VmInfo = serde_json::from_str(&info).with_context(|| {
                format!("the store's catalog entry of source {source} is not valid")
            })?;
            servers.push(Server {
                source,
                info,
                unsupported: unsupported
                    .map(|s| s.lines().map(str::to_owned).collect())
                    .unwrap_or_default(),
                catalogued_at,
            });
        }
        Ok(servers)
    }

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

/// The serde name of a unit enum variant (`powered_on`), as stored.
fn enum_name<T: Serialize>(value: &T) -> Result<String> {
    match serde_json::to_value(value)? {
        serde_json::Value::String(s) => Ok(s),
        other => bail!("expected a name, got {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rehost_core::{DiskId, DiskInfo, Firmware, PowerState, VmId};

    fn vm(id: &str, name: &str, rdm: bool) -> VmInfo {
        VmInfo {
            id: VmId::from(id),
            name: name.to_owned(),
            path: format!("/DC0/vm/{name}"),
            source_ref: "vm-1".to_owned(),
            power_state: PowerState::PoweredOn,
            guest_os: "Ubuntu Linux (64-bit)".to_owned(),
            cpus: 2,
            memory_mib: 4096,
            firmware: Firmware::Efi,
            change_tracking: false,
            disks: vec![DiskInfo {
                id: DiskId::from("2000"),
                label: "Hard disk 1".to_owned(),
                capacity_bytes: 1 << 30,
                location: format!("[ds] {name}/{name}.vmdk"),
                change_id: None,
                unsupported: rdm.then(|| "raw device mapping".to_owned()),
            }],
        }
    }

    #[test]
    fn migrations_apply_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/rehost.db");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rehost.db");
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = format!("{:#}", Store::open(&path).unwrap_err());
        assert!(err.contains("newer than this rehost knows"), "{err}");
    }

    #[test]
    fn the_catalog_is_replaced_per_source() {
        let mut store = Store::in_memory().unwrap();
        store
            .replace_catalog(
                "vc1",
                "vsphere",
                "https://a/sdk",
                &[vm("u1", "web", false), vm("u2", "db", true)],
            )
            .unwrap();
        store
            .replace_catalog(
                "vc2",
                "vsphere",
                "https://b/sdk",
                &[vm("u3", "other", false)],
            )
            .unwrap();
        store
            .replace_catalog("vc1", "vsphere", "https://a/sdk", &[vm("u2", "db", true)])
            .unwrap();
        let servers = store.servers(Some("vc1")).unwrap();
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].info, vm("u2", "db", true));
        assert_eq!(
            servers[0].unsupported,
            ["disk 2000 (Hard disk 1): raw device mapping"]
        );
        assert_eq!(store.servers(None).unwrap().len(), 2);
    }

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
