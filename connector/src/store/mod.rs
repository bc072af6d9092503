//! The connector's embedded store: one SQLite file (WAL), with numbered migrations.
//!
//! It holds what must survive the process: the sources seen, the server catalog
//! ([`catalog`]), the ledger of every source snapshot rehost created ([`ledger`]),
//! written *before* the snapshot is asked for and closed only when it is gone, so a
//! crash never loses track of one; and replication jobs ([`jobs`]) and their runs
//! ([`runs`]), whose every state change goes through [`crate::jobs::transition::apply`]
//! and, when a job's state changes, writes an event to the outbox in the same
//! transaction.

use std::path::Path;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::jobs::ids;
use crate::jobs::transition::Policy;

mod catalog;
mod jobs;
mod ledger;
mod runs;

#[cfg(test)]
mod jobs_tests;

pub use catalog::Server;
// For the scheduler and API (being written alongside); unused by the binary until they land.
#[allow(unused_imports)]
pub use runs::ActiveRun;

/// Schema changes, in order; the database's `user_version` is how many were applied.
/// Never edit one that has shipped: append a new one.
const MIGRATIONS: &[Migration] = &[
    // 1: sources, the server catalog, the snapshot ledger.
    Migration {
        sql: r"
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
        then: None,
    },
    // 2: replication jobs, runs, disk lineage, the event outbox, the connector's id,
    // and a server id on every catalog row (filled for existing rows by `fill_v2`).
    Migration {
        sql: r"
    ALTER TABLE servers ADD COLUMN server_id TEXT;
    CREATE UNIQUE INDEX servers_by_server_id ON servers (server_id);
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    -- Times are whole seconds since the Unix epoch (they are compared and added to).
    CREATE TABLE jobs (
        id                   TEXT PRIMARY KEY,
        server_id            TEXT NOT NULL,
        source               TEXT NOT NULL,
        vm_id                TEXT NOT NULL,
        vm_name              TEXT NOT NULL,
        seed_time            INTEGER NOT NULL,
        frequency_hours      INTEGER,
        run_once             INTEGER NOT NULL,
        license_type         TEXT NOT NULL,
        amis_to_keep         INTEGER NOT NULL,
        encrypted            INTEGER NOT NULL,
        kms_key_id           TEXT,
        description          TEXT,
        state                TEXT NOT NULL,
        status_message       TEXT,
        next_run_at          INTEGER,
        consecutive_failures INTEGER NOT NULL,
        latest_ami_id        TEXT,
        delete_keep_amis     INTEGER,         -- set when deletion was asked for
        created_at           INTEGER NOT NULL,
        updated_at           INTEGER NOT NULL
    );
    -- One live job per server, even against two writers racing.
    CREATE UNIQUE INDEX jobs_one_live_per_server ON jobs (server_id) WHERE state <> 'DELETED';
    CREATE TABLE runs (
        id               TEXT PRIMARY KEY,
        job_id           TEXT NOT NULL REFERENCES jobs (id),
        run_type         TEXT NOT NULL,
        state            TEXT NOT NULL,
        stage            TEXT NOT NULL,
        progress_percent INTEGER NOT NULL,
        bytes_moved      INTEGER NOT NULL,
        status_message   TEXT,
        ami_id           TEXT,
        scheduled_at     INTEGER NOT NULL,
        started_at       INTEGER,
        completed_at     INTEGER,
        attempt          INTEGER NOT NULL,
        description      TEXT,
        owner            TEXT,               -- the worker running it (ACTIVE)
        heartbeat_at     INTEGER,
        checkpoint       TEXT,               -- JSON the pipeline resumes from
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL
    );
    -- At most one PENDING or ACTIVE run per job.
    CREATE UNIQUE INDEX runs_one_open_per_job ON runs (job_id) WHERE state IN ('PENDING', 'ACTIVE');
    CREATE INDEX runs_by_job ON runs (job_id, created_at);
    CREATE INDEX runs_by_state ON runs (state);
    CREATE TABLE disk_lineage (
        job_id            TEXT NOT NULL REFERENCES jobs (id),
        disk_key          TEXT NOT NULL,
        last_change_id    TEXT,
        last_snapshot_id  TEXT,
        last_manifest     TEXT,
        last_staged_image TEXT,
        last_run_id       TEXT,
        updated_at        INTEGER NOT NULL,
        PRIMARY KEY (job_id, disk_key)
    );
    -- The outbox: written in the transaction that changed the state, delivered later.
    CREATE TABLE events (
        id           INTEGER PRIMARY KEY,
        created_at   INTEGER NOT NULL,
        body         TEXT NOT NULL,
        delivered_at INTEGER
    );
    CREATE INDEX events_undelivered ON events (id) WHERE delivered_at IS NULL;
    ",
        then: Some(fill_v2),
    },
];

/// One schema change: SQL, then optionally a Rust step (in the same transaction) for
/// what SQL cannot compute.
struct Migration {
    sql: &'static str,
    then: Option<fn(&rusqlite::Transaction<'_>) -> Result<()>>,
}

/// Migration 2's Rust step: server ids of the rows already catalogued (SHA-256, which
/// SQLite lacks) and the connector's id, made once here and never changed.
fn fill_v2(tx: &rusqlite::Transaction<'_>) -> Result<()> {
    let rows: Vec<(String, String)> = tx
        .prepare("SELECT source, vm_id FROM servers")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (source, vm_id) in rows {
        tx.execute(
            "UPDATE servers SET server_id = ?3 WHERE source = ?1 AND vm_id = ?2",
            params![source, vm_id, ids::server_id(&source, &vm_id).0],
        )?;
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('connector_id', ?1)",
        params![ids::new_connector_id()],
    )?;
    Ok(())
}

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')";

/// The open store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// What `request_run` schedules with (the frequency unit); see [`Store::set_policy`].
    policy: Policy,
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
        let mut store = Store {
            conn,
            policy: Policy::default(),
        };
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
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(migration.sql)
                .with_context(|| format!("applying migration {}", index + 1))?;
            if let Some(step) = migration.then {
                step(&tx).with_context(|| format!("applying migration {}", index + 1))?;
            }
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

    /// Sets the scheduler policy (`Policy::from_config(&config.scheduler)`); the store
    /// uses its frequency unit to move a job's next slot when an automatic run is
    /// requested. The default is `[scheduler]`'s defaults (hours).
    #[allow(dead_code)] // for `rehost serve` (written alongside)
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// The connector's stable id (`c-` and 17 hex digits), made when the store was.
    #[allow(dead_code)] // for `rehost serve` (written alongside)
    pub fn connector_id(&self) -> Result<String> {
        self.conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'connector_id'",
                [],
                |row| row.get(0),
            )
            .optional()?
            .context("the store has no connector id (its meta table was emptied)")
    }
}

/// The store shared by the API and the scheduler: one connection behind a mutex.
/// SQLite serialises writers anyway; one connection keeps every transaction in order.
#[allow(dead_code)] // for `rehost serve` (written alongside)
#[derive(Debug, Clone)]
pub struct SharedStore(Arc<Mutex<Store>>);

#[allow(dead_code)] // for `rehost serve` (written alongside)
impl SharedStore {
    /// Shares `store`.
    pub fn new(store: Store) -> SharedStore {
        SharedStore(Arc::new(Mutex::new(store)))
    }

    /// Opens the config's store, with the config's scheduling policy (the frequency unit
    /// and the retry rules its transitions apply), and shares it.
    pub fn for_config(config: &crate::config::Config) -> Result<SharedStore> {
        let mut store = Store::open(&config.store_path())?;
        store.set_policy(crate::jobs::transition::Policy::from_config(
            &config.scheduler,
        ));
        Ok(SharedStore::new(store))
    }

    /// Opens the store at `path` and shares it.
    pub fn open(path: &Path) -> Result<SharedStore> {
        Ok(SharedStore::new(Store::open(path)?))
    }

    /// Runs `f` with the store locked. Never call it across an `.await`: `f` is
    /// synchronous, and the lock is released when it returns. A lock poisoned by a
    /// panic elsewhere is reported as an error rather than a second panic.
    pub fn with<T>(&self, f: impl FnOnce(&mut Store) -> Result<T>) -> Result<T> {
        let mut store = self
            .0
            .lock()
            .map_err(|_| anyhow!("the store's lock was poisoned by a panic in another thread"))?;
        f(&mut store)
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
}
