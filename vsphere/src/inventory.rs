//! The VM inventory: one ContainerView over the root folder read page by page, with the
//! folders and datacenters needed to name each VM by its inventory path.

use std::collections::HashMap;

use rehost_core::{DiskId, DiskInfo, Firmware, PowerState, VmId, VmInfo};
use tracing::warn;

use crate::client::{Client, path_set, protocol};
use crate::error::{Error, Result};
use crate::soap::model::{ObjectContent, VirtualDisk};
use crate::soap::{MoRef, Node};

/// The VM properties read for the inventory.
const VM_PATHS: &[&str] = &[
    "name",
    "parent",
    "parentVApp",
    "config.instanceUuid",
    "config.hardware",
    "config.firmware",
    "config.changeTrackingEnabled",
    "config.guestFullName",
    "config.guestId",
    "runtime.powerState",
];

/// A VM as listed, with what later calls need besides [`VmInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// What the connector stores.
    pub info: VmInfo,
    /// The VM's managed object.
    pub moref: MoRef,
    /// The datacenter's path from the root folder (`DC0`, `Folder/DC1`), the `dcPath` of
    /// datastore URLs.
    pub datacenter: String,
}

/// Name and parent of an inventory object, for paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entity {
    pub(crate) name: String,
    pub(crate) parent: Option<MoRef>,
}

impl Client {
    /// Every VM the user can see.
    pub async fn list_vms(&self) -> Result<Vec<VmInfo>> {
        Ok(self
            .inventory_vms()
            .await?
            .into_iter()
            .map(|v| v.info)
            .collect())
    }

    /// Every VM with its managed object and datacenter.
    pub async fn inventory_vms(&self) -> Result<Vec<Vm>> {
        let generation = self.session_generation();
        match self.inventory_vms_once().await {
            // The container view belonged to a session that expired meanwhile: the
            // re-login made a new session, in which the view does not exist. Once more,
            // from a new view.
            Err(Error::ManagedObjectNotFound { .. } | Error::NotAuthenticated { .. })
                if self.session_generation() != generation =>
            {
                self.inventory_vms_once().await
            }
            other => other,
        }
    }

    async fn inventory_vms_once(&self) -> Result<Vec<Vm>> {
        let view = self
            .create_container_view(&["Folder", "Datacenter", "VirtualApp", "VirtualMachine"])
            .await?;
        let spec = format!(
            "<specSet>\
             <propSet><type>VirtualMachine</type>{}</propSet>\
             <propSet><type>Folder</type>{names}</propSet>\
             <propSet><type>Datacenter</type>{names}</propSet>\
             <propSet><type>VirtualApp</type>{}</propSet>\
             <objectSet><obj type=\"ContainerView\">{}</obj><skip>true</skip>\
             <selectSet xsi:type=\"TraversalSpec\"><name>view</name><type>ContainerView</type>\
             <path>view</path><skip>false</skip></selectSet></objectSet></specSet>",
            path_set(VM_PATHS),
            path_set(&["name", "parentFolder"]),
            crate::soap::escape(&view.value),
            names = path_set(&["name", "parent"]),
        );
        let result = self.retrieve(&spec).await;
        self.destroy_view(&view).await;
        let objects = result?;

        let mut entities = HashMap::new();
        for o in &objects {
            let parent = ["parent", "parentVApp", "parentFolder"]
                .iter()
                .find_map(|p| o.prop(p))
                .map(MoRef::from_node)
                .transpose()
                .map_err(|e| protocol("RetrievePropertiesEx", e))?;
            let name = o.prop("name").map(|n| n.text.clone()).unwrap_or_default();
            entities.insert(o.obj.clone(), Entity { name, parent });
        }
        let mut vms = Vec::new();
        for o in objects.iter().filter(|o| o.obj.kind == "VirtualMachine") {
            let (path, datacenter) = inventory_path(&o.obj, &entities);
            match vm_from_content(o, path, datacenter) {
                Ok(Some(vm)) => vms.push(vm),
                Ok(None) => {}
                Err(e) => return Err(protocol("RetrievePropertiesEx", e)),
            }
        }
        vms.sort_by(|a, b| a.info.path.cmp(&b.info.path));
        Ok(vms)
    }

    /// The VM with this instance UUID or name.
    pub async fn find_vm(&self, name_or_uuid: &str) -> Result<Vm> {
        let vms = self.inventory_vms().await?;
        if let Some(vm) = vms
            .iter()
            .find(|v| v.info.id.0.eq_ignore_ascii_case(name_or_uuid))
        {
            return Ok(vm.clone());
        }
        let named: Vec<&Vm> = vms.iter().filter(|v| v.info.name == name_or_uuid).collect();
        match named.as_slice() {
            [] => Err(Error::VmNotFound {
                query: name_or_uuid.to_owned(),
            }),
            [one] => Ok((*one).clone()),
            many => Err(Error::AmbiguousVm {
                query: name_or_uuid.to_owned(),
                count: many.len(),
                refs: many
                    .iter()
                    .map(|v| v.moref.value.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The VM with this instance UUID, found by the SearchIndex (one call, whatever the
    /// inventory's size).
    pub async fn find_vm_by_instance_uuid(&self, uuid: &str) -> Result<MoRef> {
        let mut req = crate::soap::Request::new("FindByUuid", &self.service_content().search_index);
        req.text("uuid", uuid)
            .text("vmSearch", "true")
            .text("instanceUuid", "true");
        let response = self.call(&req).await?;
        match response.child("returnval") {
            Some(rv) => MoRef::from_node(rv).map_err(|e| protocol("FindByUuid", e)),
            None => Err(Error::VmNotFound {
                query: uuid.to_owned(),
            }),
        }
    }

    /// The datacenter path (`dcPath`) of an inventory object, walking its parents.
    pub async fn datacenter_of(&self, obj: &MoRef) -> Result<String> {
        let mut entities = HashMap::new();
        let mut current = Some(obj.clone());
        // Inventories are a few levels deep; the bound stops a cycle a broken server
        // could report.
        for _ in 0..64 {
            let Some(o) = current.take() else { break };
            let paths: &[&str] = match o.kind.as_str() {
                "VirtualMachine" => &["name", "parent", "parentVApp"],
                "VirtualApp" => &["name", "parentFolder", "parent"],
                _ => &["name", "parent"],
            };
            let content = self.retrieve_one(&o, paths).await?;
            let parent = paths[1..]
                .iter()
                .find_map(|p| content.prop(p))
                .map(MoRef::from_node)
                .transpose()
                .map_err(|e| protocol("RetrievePropertiesEx", e))?;
            let name = content
                .prop("name")
                .map(|n| n.text.clone())
                .unwrap_or_default();
            current = parent.clone();
            entities.insert(o, Entity { name, parent });
        }
        let (_, datacenter) = inventory_path(obj, &entities);
        if datacenter.is_empty() {
            return Err(Error::Protocol {
                method: "RetrievePropertiesEx".into(),
                detail: format!("{obj} is in no datacenter"),
            });
        }
        Ok(datacenter)
    }
}

/// The inventory path of `obj` (`/DC0/vm/name`) and its datacenter's path (`DC0`), from
/// the names and parents known. The root folder (not in a container view) ends the walk.
pub(crate) fn inventory_path(obj: &MoRef, entities: &HashMap<MoRef, Entity>) -> (String, String) {
    let mut chain: Vec<(&MoRef, &str)> = Vec::new();
    let mut current = Some(obj);
    while let Some(o) = current {
        // A parent chain longer than the map has a cycle.
        if chain.len() > entities.len() {
            break;
        }
        let Some(e) = entities.get(o) else { break };
        chain.push((o, e.name.as_str()));
        current = e.parent.as_ref();
    }
    chain.reverse();
    // The walk may have reached the root folder, which is named `Datacenters` and has no
    // parent: it is not part of paths.
    if chain.first().is_some_and(|(o, _)| {
        o.kind == "Folder" && entities.get(*o).is_some_and(|e| e.parent.is_none())
    }) {
        chain.remove(0);
    }
    let path = chain
        .iter()
        .map(|(_, n)| format!("/{n}"))
        .collect::<String>();
    let datacenter = chain
        .iter()
        .position(|(o, _)| o.kind == "Datacenter")
        .map(|i| {
            chain[..=i]
                .iter()
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default();
    (path, datacenter)
}

fn text_of<'a>(o: &'a ObjectContent, path: &str) -> Option<&'a str> {
    o.prop(path).map(Node::trimmed)
}

/// The [`Vm`] of an ObjectContent; `None` for a VM without configuration (being created,
/// orphaned or inaccessible), which cannot be replicated and is skipped with a warning.
fn vm_from_content(
    o: &ObjectContent,
    path: String,
    datacenter: String,
) -> std::result::Result<Option<Vm>, String> {
    let name = text_of(o, "name").unwrap_or_default().to_owned();
    let (Some(uuid), Some(hardware)) =
        (text_of(o, "config.instanceUuid"), o.prop("config.hardware"))
    else {
        warn!(vm = %o.obj, name, "VM without configuration skipped");
        return Ok(None);
    };
    let disks = VirtualDisk::list(hardware)
        .map_err(|e| format!("{} config.hardware: {e}", o.obj))?
        .into_iter()
        .map(|d| DiskInfo {
            id: DiskId(d.key.to_string()),
            unsupported: d.unsupported_reason(),
            label: d.label,
            capacity_bytes: d.capacity_bytes,
            location: d.file_name,
            change_id: d.change_id,
        })
        .collect();
    let number = |n: &str| -> u64 {
        hardware
            .child_text(n)
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    };
    let power_state = match text_of(o, "runtime.powerState") {
        Some("poweredOn") => PowerState::PoweredOn,
        Some("poweredOff") => PowerState::PoweredOff,
        Some("suspended") => PowerState::Suspended,
        _ => PowerState::Unknown,
    };
    let firmware = match text_of(o, "config.firmware") {
        Some("bios") => Firmware::Bios,
        Some("efi") => Firmware::Efi,
        _ => Firmware::Unknown,
    };
    let guest_os = text_of(o, "config.guestFullName")
        .filter(|s| !s.is_empty())
        .or_else(|| text_of(o, "config.guestId"))
        .unwrap_or_default()
        .to_owned();
    Ok(Some(Vm {
        info: VmInfo {
            id: VmId(uuid.to_owned()),
            name,
            path,
            source_ref: o.obj.value.clone(),
            power_state,
            guest_os,
            cpus: u32::try_from(number("numCPU")).unwrap_or(u32::MAX),
            memory_mib: number("memoryMB"),
            firmware,
            change_tracking: text_of(o, "config.changeTrackingEnabled") == Some("true"),
            disks,
        },
        moref: o.obj.clone(),
        datacenter,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soap::model::RetrieveResult;
    use crate::soap::xml::parse;

    fn e(name: &str, parent: Option<(&str, &str)>) -> Entity {
        Entity {
            name: name.into(),
            parent: parent.map(|(k, v)| MoRef::new(k, v)),
        }
    }

    #[test]
    fn paths_from_parents() {
        let mut m = HashMap::new();
        m.insert(MoRef::new("Folder", "group-d1"), e("Datacenters", None));
        m.insert(
            MoRef::new("Folder", "f1"),
            e("Prod", Some(("Folder", "group-d1"))),
        );
        m.insert(
            MoRef::new("Datacenter", "dc1"),
            e("DC1", Some(("Folder", "f1"))),
        );
        m.insert(
            MoRef::new("Folder", "v1"),
            e("vm", Some(("Datacenter", "dc1"))),
        );
        m.insert(
            MoRef::new("Folder", "web"),
            e("web", Some(("Folder", "v1"))),
        );
        m.insert(
            MoRef::new("VirtualMachine", "vm-1"),
            e("w1", Some(("Folder", "web"))),
        );
        let (path, dc) = inventory_path(&MoRef::new("VirtualMachine", "vm-1"), &m);
        assert_eq!(path, "/Prod/DC1/vm/web/w1");
        assert_eq!(dc, "Prod/DC1");
        // A container view does not include the root folder: the walk stops above DC1's
        // folder and gives the same path.
        m.remove(&MoRef::new("Folder", "group-d1"));
        assert_eq!(
            inventory_path(&MoRef::new("VirtualMachine", "vm-1"), &m).0,
            "/Prod/DC1/vm/web/w1"
        );
        // A cycle ends instead of looping.
        m.insert(
            MoRef::new("Folder", "f1"),
            e("Prod", Some(("Folder", "web"))),
        );
        let _ = inventory_path(&MoRef::new("VirtualMachine", "vm-1"), &m);
    }

    #[test]
    fn vm_from_simulator_shaped_content() {
        let doc = r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="VirtualMachine">vm-61</obj>
<propSet><name>config.changeTrackingEnabled</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:boolean">false</val></propSet>
<propSet><name>config.firmware</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">bios</val></propSet>
<propSet><name>config.guestFullName</name><val XMLSchema-instance:type="xsd:string" xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance">otherGuest</val></propSet>
<propSet><name>config.hardware</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="VirtualHardware"><numCPU>1</numCPU><numCoresPerSocket>1</numCoresPerSocket><memoryMB>32</memoryMB><device XMLSchema-instance:type="VirtualDisk"><key>204</key><deviceInfo><label>disk-202-0</label><summary>1,024 KB</summary></deviceInfo><backing XMLSchema-instance:type="VirtualDiskFlatVer2BackingInfo"><fileName>[LocalDS_0] DC0_H0_VM0/disk1.vmdk</fileName><datastore type="Datastore">datastore-53</datastore><diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned></backing><controllerKey>202</controllerKey><unitNumber>0</unitNumber><capacityInKB>1024</capacityInKB><capacityInBytes>1048576</capacityInBytes></device></val></propSet>
<propSet><name>config.instanceUuid</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">b4689bed-97f0-5bcd-8a4c-07477cc8f06f</val></propSet>
<propSet><name>name</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">DC0_H0_VM0</val></propSet>
<propSet><name>runtime.powerState</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="VirtualMachinePowerState">poweredOn</val></propSet>
</objects><objects><obj type="VirtualMachine">vm-62</obj><propSet><name>name</name><val>orphan</val></propSet></objects></returnval></RetrievePropertiesExResponse>"#;
        let r = RetrieveResult::from_response(&parse(doc.as_bytes()).unwrap()).unwrap();
        let vm = vm_from_content(&r.objects[0], "/DC0/vm/DC0_H0_VM0".into(), "DC0".into())
            .unwrap()
            .unwrap();
        assert_eq!(vm.info.id.0, "b4689bed-97f0-5bcd-8a4c-07477cc8f06f");
        assert_eq!(vm.info.source_ref, "vm-61");
        assert_eq!(vm.info.power_state, PowerState::PoweredOn);
        assert_eq!((vm.info.cpus, vm.info.memory_mib), (1, 32));
        assert_eq!(vm.info.firmware, Firmware::Bios);
        assert!(!vm.info.change_tracking);
        assert_eq!(vm.info.disks.len(), 1);
        assert_eq!(vm.info.disks[0].id.0, "204");
        assert_eq!(
            vm.info.disks[0].location,
            "[LocalDS_0] DC0_H0_VM0/disk1.vmdk"
        );
        assert_eq!(vm.info.disks[0].unsupported, None);
        // A VM without configuration is skipped.
        assert_eq!(
            vm_from_content(&r.objects[1], String::new(), String::new()).unwrap(),
            None
        );
    }
}
