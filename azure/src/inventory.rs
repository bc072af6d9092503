//! The catalog: the subscription's VMs (or those of the configured resource groups), each
//! with its instance view (power state, Hyper-V generation), its size's cores and memory,
//! and its managed disks' exact sizes.

use std::collections::HashMap;

use rehost_core::{DiskId, DiskInfo, Firmware, PowerState, VmId, VmInfo};
use serde_json::Value;

use crate::client::{Client, api};
use crate::error::{Error, Result};

/// The largest disk a dynamic VHD (the export format) holds: 2040 GiB.
pub const MAX_VHD_DISK_BYTES: u64 = 2040 * 1024 * 1024 * 1024;

/// A VM as Resource Manager describes it, with what an export needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureVm {
    /// The catalog's view (id = `vmId`, source_ref = the resource id).
    pub info: VmInfo,
    /// `/subscriptions/…/resourceGroups/…/providers/Microsoft.Compute/virtualMachines/…`.
    pub resource_id: String,
    /// The VM's region; snapshots are made there.
    pub location: String,
    /// The managed disks, OS disk first, then data disks by LUN.
    pub disks: Vec<ManagedDisk>,
}

/// One managed disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedDisk {
    /// Its id within the VM: `os`, or `lun0`, `lun1`…
    pub key: DiskId,
    /// The managed disk's resource id.
    pub resource_id: String,
    /// Its name.
    pub name: String,
    /// Its exact size (`diskSizeBytes`).
    pub size_bytes: u64,
    /// Its SKU (`Premium_LRS`).
    pub sku: String,
}

impl Client {
    /// Every VM the source covers: the configured resource groups', or the subscription's.
    pub async fn list_vms(&self) -> Result<Vec<AzureVm>> {
        let raw = self.list_raw_vms().await?;
        let mut sizes: HashMap<String, HashMap<String, (u32, u64)>> = HashMap::new();
        let mut vms = Vec::with_capacity(raw.len());
        for vm in raw {
            vms.push(self.describe_vm(&vm, &mut sizes).await?);
        }
        Ok(vms)
    }

    /// The VMs as Resource Manager lists them, without their instance views and disks.
    async fn list_raw_vms(&self) -> Result<Vec<Value>> {
        let sub = self.subscription_path();
        let groups = self.options().resource_groups.clone();
        if groups.is_empty() {
            let path = format!("{sub}/providers/Microsoft.Compute/virtualMachines");
            return self.list(&path, api::COMPUTE_VMS, "listing VMs").await;
        }
        let mut raw = Vec::new();
        for group in groups {
            let path =
                format!("{sub}/resourceGroups/{group}/providers/Microsoft.Compute/virtualMachines");
            raw.extend(
                self.list(&path, api::COMPUTE_VMS, &format!("listing VMs of {group}"))
                    .await?,
            );
        }
        Ok(raw)
    }

    /// The VM named `query`: its `vmId`, name or resource id. Only the match is described
    /// (instance view, size, disks): a subscription may hold thousands of VMs.
    pub async fn find_vm(&self, query: &str) -> Result<AzureVm> {
        let raw = self.list_raw_vms().await?;
        let text = |vm: &Value, pointer: &str| {
            vm.pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let matches: Vec<&Value> = raw
            .iter()
            .filter(|vm| {
                text(vm, "/properties/vmId").eq_ignore_ascii_case(query)
                    || text(vm, "/id").eq_ignore_ascii_case(query)
                    || text(vm, "/name") == query
            })
            .collect();
        match matches.as_slice() {
            [one] => self.describe_vm(one, &mut HashMap::new()).await,
            [] => Err(Error::NotFound(format!(
                "no VM named or with id {query:?} in subscription {}{}",
                self.options().subscription_id,
                groups_note(&self.options().resource_groups)
            ))),
            many => Err(Error::Ambiguous(format!(
                "{} VMs are named {query:?} ({}); use the VM id",
                many.len(),
                many.iter()
                    .map(|vm| text(vm, "/id"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    async fn describe_vm(
        &self,
        vm: &Value,
        sizes: &mut HashMap<String, HashMap<String, (u32, u64)>>,
    ) -> Result<AzureVm> {
        let id = str_at(vm, "/id", "VM")?;
        let name = str_at(vm, "/name", id)?;
        let location = str_at(vm, "/location", id)?.to_owned();
        let view = self
            .get_json(
                &format!("{id}/instanceView"),
                api::COMPUTE_VMS,
                &format!("instance view of {name}"),
            )
            .await?;
        if !sizes.contains_key(&location) {
            let path = format!(
                "{}/providers/Microsoft.Compute/locations/{location}/vmSizes",
                self.subscription_path()
            );
            let list = self
                .list(&path, api::COMPUTE_VMS, &format!("VM sizes of {location}"))
                .await?;
            sizes.insert(location.clone(), parse_sizes(&list));
        }
        let size_table = sizes.get(&location).cloned().unwrap_or_default();
        let mut disks = Vec::new();
        for (key, reference) in disk_references(vm)? {
            match reference {
                Some(disk_id) => {
                    let disk = self
                        .get_json(&disk_id, api::COMPUTE_DISKS, &format!("disk {disk_id}"))
                        .await?;
                    let parsed = parse_disk(&key.0, &disk)?;
                    disks.push((key, Some(parsed)));
                }
                None => disks.push((key, None)),
            }
        }
        parse_vm(vm, &view, &size_table, disks)
    }
}

fn groups_note(groups: &[String]) -> String {
    if groups.is_empty() {
        String::new()
    } else {
        format!(" (resource groups {})", groups.join(", "))
    }
}

/// A disk slot of a VM: its key (`os`, `lun0`) and label (the disk's name).
type Slot = (String, String);

/// The VM's disks: their slot and the managed disk's id (`None` for an unmanaged or
/// ephemeral disk, which rehost cannot snapshot).
fn disk_references(vm: &Value) -> Result<Vec<(Slot, Option<String>)>> {
    let mut out = Vec::new();
    let storage = vm
        .pointer("/properties/storageProfile")
        .ok_or_else(|| protocol("VM", "no properties.storageProfile"))?;
    if let Some(os) = storage.get("osDisk") {
        let name = os.get("name").and_then(Value::as_str).unwrap_or("OS disk");
        let ephemeral = os.pointer("/diffDiskSettings/option").is_some();
        let id = os
            .pointer("/managedDisk/id")
            .and_then(Value::as_str)
            .filter(|_| !ephemeral)
            .map(str::to_owned);
        out.push((("os".to_owned(), name.to_owned()), id));
    }
    if let Some(Value::Array(data)) = storage.get("dataDisks") {
        let mut data: Vec<&Value> = data.iter().collect();
        data.sort_by_key(|d| d.get("lun").and_then(Value::as_u64).unwrap_or(u64::MAX));
        for d in data {
            let lun = d
                .get("lun")
                .and_then(Value::as_u64)
                .ok_or_else(|| protocol("VM", "a data disk without lun"))?;
            let name = d.get("name").and_then(Value::as_str).unwrap_or("data disk");
            let id = d
                .pointer("/managedDisk/id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            out.push(((format!("lun{lun}"), name.to_owned()), id));
        }
    }
    Ok(out)
}

/// `(cores, memory MiB)` by size name.
fn parse_sizes(list: &[Value]) -> HashMap<String, (u32, u64)> {
    list.iter()
        .filter_map(|s| {
            let name = s.get("name")?.as_str()?.to_owned();
            let cores = u32::try_from(s.get("numberOfCores")?.as_u64()?).ok()?;
            let memory = s.get("memoryInMB")?.as_u64()?;
            Some((name, (cores, memory)))
        })
        .collect()
}

fn parse_disk(key: &str, disk: &Value) -> Result<ManagedDisk> {
    let id = str_at(disk, "/id", "disk")?;
    let size_bytes = match disk
        .pointer("/properties/diskSizeBytes")
        .and_then(Value::as_u64)
    {
        Some(bytes) => bytes,
        None => disk
            .pointer("/properties/diskSizeGB")
            .and_then(Value::as_u64)
            .map(|gib| gib << 30)
            .ok_or_else(|| protocol(id, "no diskSizeBytes or diskSizeGB"))?,
    };
    Ok(ManagedDisk {
        key: DiskId(key.to_owned()),
        resource_id: id.to_owned(),
        name: str_at(disk, "/name", id)?.to_owned(),
        size_bytes,
        sku: disk
            .pointer("/sku/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    })
}

/// A VM's catalog entry from its JSON, instance view, the size table and its disks.
fn parse_vm(
    vm: &Value,
    view: &Value,
    sizes: &HashMap<String, (u32, u64)>,
    disks: Vec<(Slot, Option<ManagedDisk>)>,
) -> Result<AzureVm> {
    let resource_id = str_at(vm, "/id", "VM")?.to_owned();
    let name = str_at(vm, "/name", &resource_id)?.to_owned();
    let vm_id = str_at(vm, "/properties/vmId", &resource_id)?.to_owned();
    let location = str_at(vm, "/location", &resource_id)?.to_owned();
    let size = vm
        .pointer("/properties/hardwareProfile/vmSize")
        .and_then(Value::as_str)
        .unwrap_or("");
    let (cpus, memory_mib) = sizes.get(size).copied().unwrap_or((0, 0));
    let power_state = view
        .get("statuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| s.get("code")?.as_str())
        .find_map(|code| code.strip_prefix("PowerState/"))
        .map_or(PowerState::Unknown, |state| match state {
            "running" | "starting" => PowerState::PoweredOn,
            "stopped" | "deallocated" | "stopping" | "deallocating" => PowerState::PoweredOff,
            _ => PowerState::Unknown,
        });
    let os_type = vm
        .pointer("/properties/storageProfile/osDisk/osType")
        .and_then(Value::as_str)
        .unwrap_or("");
    let guest_os = match view.get("osName").and_then(Value::as_str) {
        Some(os_name) if !os_name.is_empty() => format!("{os_type} ({os_name})"),
        _ => os_type.to_owned(),
    };
    let firmware = match view.get("hyperVGeneration").and_then(Value::as_str) {
        Some(g) if g.eq_ignore_ascii_case("V2") => Firmware::Efi,
        Some(g) if g.eq_ignore_ascii_case("V1") => Firmware::Bios,
        _ => Firmware::Unknown,
    };
    let mut infos = Vec::new();
    let mut managed = Vec::new();
    for ((key, label), disk) in disks {
        match disk {
            Some(disk) => {
                let unsupported = (disk.size_bytes > MAX_VHD_DISK_BYTES).then(|| {
                    format!(
                        "{} bytes is over the 2040 GiB a VHD image holds",
                        disk.size_bytes
                    )
                });
                infos.push(DiskInfo {
                    id: disk.key.clone(),
                    label: label.clone(),
                    capacity_bytes: disk.size_bytes,
                    location: disk.resource_id.clone(),
                    change_id: None,
                    unsupported,
                });
                managed.push(disk);
            }
            None => infos.push(DiskInfo {
                id: DiskId(key),
                label,
                capacity_bytes: 0,
                location: String::new(),
                change_id: None,
                unsupported: Some(
                    "not a managed disk (unmanaged or ephemeral): it cannot be snapshotted".into(),
                ),
            }),
        }
    }
    Ok(AzureVm {
        info: VmInfo {
            id: VmId(vm_id),
            name,
            path: resource_id.clone(),
            source_ref: resource_id.clone(),
            power_state,
            guest_os,
            cpus,
            memory_mib,
            firmware,
            // Incremental snapshots need nothing turned on in the VM.
            change_tracking: true,
            disks: infos,
        },
        resource_id,
        location,
        disks: managed,
    })
}

fn str_at<'a>(value: &'a Value, pointer: &str, what: &str) -> Result<&'a str> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .ok_or_else(|| protocol(what, &format!("no {pointer}")))
}

fn protocol(what: &str, detail: &str) -> Error {
    Error::Protocol {
        operation: format!("reading {what}"),
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm_json() -> Value {
        json!({
            "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/web1",
            "name": "web1",
            "location": "westeurope",
            "properties": {
                "vmId": "5b7f2c1e-0000-4000-8000-000000000001",
                "hardwareProfile": {"vmSize": "Standard_D2s_v3"},
                "storageProfile": {
                    "osDisk": {"osType": "Linux", "name": "web1-os",
                               "managedDisk": {"id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/web1-os"}},
                    "dataDisks": [
                        {"lun": 3, "name": "web1-logs", "managedDisk": {"id": "/d/logs"}},
                        {"lun": 0, "name": "web1-data", "managedDisk": {"id": "/d/data"}}
                    ]
                }
            }
        })
    }

    #[test]
    fn disks_are_keyed_os_then_by_lun() {
        let refs = disk_references(&vm_json()).expect("refs");
        let keys: Vec<_> = refs.iter().map(|((k, _), _)| k.as_str()).collect();
        assert_eq!(keys, ["os", "lun0", "lun3"]);
    }

    #[test]
    fn a_vm_becomes_a_catalog_entry() {
        let view = json!({"hyperVGeneration": "V2", "osName": "ubuntu",
            "statuses": [{"code": "ProvisioningState/succeeded"}, {"code": "PowerState/deallocated"}]});
        let sizes = HashMap::from([("Standard_D2s_v3".to_owned(), (2, 8192))]);
        let disk = ManagedDisk {
            key: DiskId("os".into()),
            resource_id: "/d/os".into(),
            name: "web1-os".into(),
            size_bytes: 30 << 30,
            sku: "Premium_LRS".into(),
        };
        let vm = parse_vm(
            &vm_json(),
            &view,
            &sizes,
            vec![
                (("os".into(), "web1-os".into()), Some(disk)),
                (("lun0".into(), "scratch".into()), None),
            ],
        )
        .expect("vm");
        assert_eq!(vm.info.id.0, "5b7f2c1e-0000-4000-8000-000000000001");
        assert_eq!(vm.info.firmware, Firmware::Efi);
        assert_eq!(vm.info.power_state, PowerState::PoweredOff);
        assert_eq!((vm.info.cpus, vm.info.memory_mib), (2, 8192));
        assert_eq!(vm.info.guest_os, "Linux (ubuntu)");
        assert_eq!(vm.disks.len(), 1);
        assert!(vm.info.disks[1].unsupported.is_some());
        assert_eq!(vm.location, "westeurope");
    }

    #[test]
    fn a_vm_without_an_id_is_an_error() {
        let err = parse_vm(&json!({"name": "x"}), &json!({}), &HashMap::new(), vec![])
            .expect_err("no id");
        assert!(err.to_string().contains("/id"), "{err}");
    }
}
