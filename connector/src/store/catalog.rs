//! The server catalog: the VMs each source had when it was last read.

use anyhow::{Context, Result};
use rehost_core::VmInfo;
use rusqlite::{Connection, params};
use serde::Serialize;

use super::{NOW, Store, enum_name};
use crate::jobs::JobError;
use crate::jobs::ids;
use crate::jobs::model::ServerId;

/// A catalogued server, as `servers list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Server {
    /// `s-` and 17 hex digits, derived from the source and the VM id: what jobs name.
    pub server_id: ServerId,
    pub source: String,
    #[serde(flatten)]
    pub info: VmInfo,
    pub unsupported: Vec<String>,
    pub catalogued_at: String,
}

impl Store {
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
                    cpus, memory_mib, firmware, change_tracking, info, unsupported, catalogued_at,
                    server_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, {NOW}, ?14)"
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
                        ids::server_id(source, &vm.id.0).0,
                    ])
                    .with_context(|| format!("storing VM {} ({})", vm.name, vm.id))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The catalog, optionally of one source, ordered by source and name.
    pub fn servers(&self, source: Option<&str>) -> Result<Vec<Server>> {
        query_servers(&self.conn, "WHERE ?1 IS NULL OR source = ?1", &source)
    }

    /// The catalogued server `id`.
    #[allow(dead_code)] // for the API and `rehost jobs` (written alongside)
    pub fn server(&self, id: &ServerId) -> Result<Option<Server>> {
        server_in(&self.conn, id)
    }

    /// The server `text` names: a server id, a VM id or a VM name. A name (or VM id) that
    /// several servers share is refused with their ids, so the user can pick one.
    #[allow(dead_code)] // for the API and `rehost jobs` (written alongside)
    pub fn find_server(&self, text: &str) -> Result<Server, JobError> {
        let text = text.trim();
        if let Some(server) = self.server(&ServerId(text.to_owned()))? {
            return Ok(server);
        }
        for (column, what) in [("vm_id", "VM id"), ("name", "VM name")] {
            let mut found = query_servers(&self.conn, &format!("WHERE {column} = ?1"), &text)?;
            match found.len() {
                0 => {}
                1 => return Ok(found.remove(0)),
                _ => {
                    let ids: Vec<String> = found
                        .iter()
                        .map(|s| format!("{} (source {})", s.server_id, s.source))
                        .collect();
                    return Err(JobError::InvalidParameter(format!(
                        "{what} {text:?} names {} servers: {}; give a server id",
                        found.len(),
                        ids.join(", ")
                    )));
                }
            }
        }
        Err(JobError::NotFound(format!(
            "no server {text:?} in the catalog (by server id, VM id or name); `rehost servers list` shows it"
        )))
    }
}

/// The catalogued server `id`, read through `conn` (a transaction's, too).
pub(super) fn server_in(conn: &Connection, id: &ServerId) -> Result<Option<Server>> {
    Ok(query_servers(conn, "WHERE server_id = ?1", &id.0)?
        .into_iter()
        .next())
}

fn query_servers(
    conn: &Connection,
    filter: &str,
    value: &dyn rusqlite::ToSql,
) -> Result<Vec<Server>> {
    let mut query = conn.prepare(&format!(
        "SELECT source, info, unsupported, catalogued_at, server_id, vm_id FROM servers
         {filter} ORDER BY source, name, vm_id"
    ))?;
    let rows = query.query_map(params![value], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, Option<String>>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, Option<String>>(4)?,
            row.get::<_, String>(5)?,
        ))
    })?;
    let mut servers = Vec::new();
    for row in rows {
        let (source, info, unsupported, catalogued_at, server_id, vm_id) = row?;
        let info: VmInfo = serde_json::from_str(&info).with_context(|| {
            format!("the store's catalog entry of source {source} is not valid")
        })?;
        servers.push(Server {
            // Every row has one since migration 2; derive it should one be missing.
            server_id: server_id.map_or_else(|| ids::server_id(&source, &vm_id), ServerId),
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rehost_core::{DiskId, DiskInfo, Firmware, PowerState, VmId};

    pub(crate) fn vm(id: &str, name: &str, rdm: bool) -> VmInfo {
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
        assert_eq!(servers[0].server_id, ids::server_id("vc1", "u2"));
    }

    #[test]
    fn servers_are_found_by_id_vm_id_or_name() {
        let mut store = Store::in_memory().unwrap();
        store
            .replace_catalog(
                "vc1",
                "vsphere",
                "https://a/sdk",
                &[vm("u1", "web", false), vm("u2", "db", false)],
            )
            .unwrap();
        store
            .replace_catalog("vc2", "vsphere", "https://b/sdk", &[vm("u3", "web", false)])
            .unwrap();
        let db = ids::server_id("vc1", "u2");
        assert_eq!(store.server(&db).unwrap().unwrap().info.name, "db");
        assert_eq!(store.find_server(&db.0).unwrap().server_id, db);
        assert_eq!(store.find_server("u2").unwrap().server_id, db);
        assert_eq!(store.find_server("db").unwrap().server_id, db);
        let err = store.find_server("web").unwrap_err();
        assert_eq!(err.http_status(), 400);
        let text = err.to_string();
        assert!(
            text.contains(&ids::server_id("vc1", "u1").0)
                && text.contains(&ids::server_id("vc2", "u3").0),
            "{text}"
        );
        assert_eq!(store.find_server("nope").unwrap_err().http_status(), 404);
        assert!(
            store
                .server(&ids::server_id("vc9", "u1"))
                .unwrap()
                .is_none()
        );
    }
}
