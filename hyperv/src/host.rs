//! Hyper-V through its WMI classes (`root/virtualization/v2`): the VMs and their settings,
//! recovery checkpoints, RCT reference points and the changed ranges of a disk.
//! Class and method semantics follow Microsoft's `hyperv_v2` reference.

use rehost_core::{DiskId, DiskInfo, Firmware, PowerState, VmId, VmInfo};

use crate::client::{Client, V2};
use crate::error::{Error, Result};
use crate::wsman::{Epr, Instance, Param, embedded_instance};

/// `VirtualSystemType` of a VM's current settings.
const REALIZED: &str = "Microsoft:Hyper-V:System:Realized";
/// `VirtualSystemType` of a recovery checkpoint (the kind backup applications take).
pub const RECOVERY: &str = "Microsoft:Hyper-V:Snapshot:Recovery";
/// `SnapshotType` of a recovery checkpoint in `CreateSnapshot`.
const SNAPSHOT_TYPE_RECOVERY: &str = "32768";
/// The largest disk a VHD (our output) can describe: 2040 GiB.
pub const VHD_MAX_BYTES: u64 = 2040 * 1024 * 1024 * 1024;

/// One VM as the host describes it.
#[derive(Debug, Clone)]
pub struct HyperVm {
    pub info: VmInfo,
    /// `Msvm_ComputerSystem.Name`, the VM id.
    pub guid: String,
    /// The configuration version (`9.0`).
    pub version: String,
    /// Generation 1 or 2.
    pub generation: u8,
    pub disks: Vec<VmDisk>,
    /// The VM's existing checkpoints (anyone's).
    pub checkpoints: Vec<Checkpoint>,
}

/// One virtual hard disk attached to a VM (or held by a checkpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    /// `scsi0-1`, `ide1-0`: controller kind and index, then the location on it.
    pub id: String,
    /// The `Msvm_StorageAllocationSettingData` InstanceID.
    pub instance_id: String,
    /// The InstanceID without its settings' GUID: the same slot in a VM and its checkpoints.
    pub slot: String,
    /// The Windows path of the file (`C:\…\disk.vhdx`, an `.avhdx` while checkpoints exist).
    pub path: String,
}

/// A checkpoint of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// `Microsoft:GUID`.
    pub instance_id: String,
    pub name: String,
    /// `VirtualSystemType` (standard or recovery).
    pub kind: String,
}

/// What `GetVirtualHardDiskSettingData` says of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdInfo {
    /// 2 VHD, 3 VHDX, 4 VHD set.
    pub format: u64,
    /// 2 fixed, 3 dynamic, 4 differencing.
    pub kind: u64,
    pub max_internal_size: u64,
    pub parent_path: Option<String>,
}

/// An RCT reference point: the per-disk RCT ids a later run asks changes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferencePoint {
    pub instance_id: String,
    /// (the VM disk's `Msvm_StorageAllocationSettingData` InstanceID, its RCT id).
    pub disks: Vec<(String, String)>,
}

/// The `Msvm_ComputerSystem` reference of a VM.
pub fn vm_epr(guid: &str) -> Epr {
    Epr::new(
        V2,
        "Msvm_ComputerSystem",
        &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", guid)],
    )
}

fn settings_epr(instance_id: &str) -> Epr {
    Epr::new(
        V2,
        "Msvm_VirtualSystemSettingData",
        &[("InstanceID", instance_id)],
    )
}

fn reference_point_epr(instance_id: &str) -> Epr {
    Epr::new(
        V2,
        "Msvm_VirtualSystemReferencePoint",
        &[("InstanceID", instance_id)],
    )
}

/// The slot part of a component InstanceID: `Microsoft:SETTINGS\CTRL\0\1\L` → `CTRL\0\1\L`.
pub fn slot_of(instance_id: &str) -> &str {
    instance_id
        .split_once('\\')
        .map_or(instance_id, |(_, rest)| rest)
}

/// The `InstanceID` inside a WMI object path
/// (`\\HOST\root\virtualization\v2:CLASS.InstanceID="Microsoft:A\\B"` → `Microsoft:A\B`).
pub fn instance_id_in_path(path: &str) -> Option<String> {
    let start = path.find("InstanceID=\"")? + "InstanceID=\"".len();
    let rest = &path[start..];
    let end = rest.rfind('"')?;
    Some(rest[..end].replace("\\\\", "\\"))
}

/// WQL string literals: double quotes, with `\` and `"` escaped.
fn wql_quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Client {
    fn op_error(operation: &str) -> impl Fn(String) -> Error + '_ {
        move |detail| Error::Reply {
            operation: operation.to_owned(),
            detail,
        }
    }

    /// The host's operating system: (caption, version), e.g. (`Microsoft Windows Server
    /// 2019 Datacenter`, `10.0.17763`).
    pub async fn host_os(&self) -> Result<(String, String)> {
        let found = self
            .wql("root/cimv2", "SELECT * FROM Win32_OperatingSystem")
            .await?;
        let os = found.first().ok_or_else(|| Error::Reply {
            operation: "Enumerate Win32_OperatingSystem".into(),
            detail: "no instance".into(),
        })?;
        Ok((
            os.text("Caption").unwrap_or_default().trim().to_owned(),
            os.text("Version").unwrap_or_default().trim().to_owned(),
        ))
    }

    /// The instance of a singleton service class, as a reference (asked for once).
    async fn service(&self, class: &str) -> Result<Epr> {
        if let Ok(known) = self.services.lock()
            && let Some(epr) = known.get(class)
        {
            return Ok(epr.clone());
        }
        let found = self.wql(V2, &format!("SELECT * FROM {class}")).await?;
        let service = found.first().ok_or_else(|| {
            Error::NotFound(format!("the host has no {class} (is Hyper-V installed?)"))
        })?;
        let mut keys = Vec::new();
        for key in [
            "CreationClassName",
            "Name",
            "SystemCreationClassName",
            "SystemName",
        ] {
            let value = service.text(key).ok_or_else(|| Error::Reply {
                operation: format!("Enumerate {class}"),
                detail: format!("the service has no {key}"),
            })?;
            keys.push((key, value));
        }
        let epr = Epr::new(V2, class, &keys);
        if let Ok(mut known) = self.services.lock() {
            known.insert(class.to_owned(), epr.clone());
        }
        Ok(epr)
    }

    /// Every VM of the host.
    pub async fn vms(&self, host_label: &str) -> Result<Vec<HyperVm>> {
        let systems = self
            .wql(
                V2,
                "SELECT * FROM Msvm_ComputerSystem WHERE Caption = \"Virtual Machine\"",
            )
            .await?;
        let mut vms = Vec::with_capacity(systems.len());
        for system in &systems {
            vms.push(self.describe(system, host_label).await?);
        }
        vms.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        Ok(vms)
    }

    /// One VM, by name or VM id (GUID, any case). Only that VM is described.
    pub async fn find_vm(&self, name_or_id: &str, host_label: &str) -> Result<HyperVm> {
        let query = |property: &str| {
            format!(
                "SELECT * FROM Msvm_ComputerSystem WHERE Caption = \"Virtual Machine\" AND {property} = {}",
                wql_quote(name_or_id)
            )
        };
        // A VM id is a GUID, which no sensible name is; WQL compares strings without case.
        let by_id = self.wql(V2, &query("Name")).await?;
        if let [system] = by_id.as_slice() {
            return self.describe(system, host_label).await;
        }
        let by_name = self.wql(V2, &query("ElementName")).await?;
        let mut vms = Vec::with_capacity(by_name.len());
        for system in &by_name {
            vms.push(self.describe(system, host_label).await?);
        }
        let by_name: Vec<_> = vms.iter().filter(|vm| vm.info.name == name_or_id).collect();
        match by_name.as_slice() {
            [vm] => Ok((*vm).clone()),
            [] => Err(Error::NotFound(format!(
                "no VM named or with id {name_or_id:?} on {host_label}"
            ))),
            many => Err(Error::NotFound(format!(
                "{} VMs are named {name_or_id:?} on {host_label}; name one by its id ({})",
                many.len(),
                many.iter()
                    .map(|vm| vm.guid.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    async fn describe(&self, system: &Instance, host_label: &str) -> Result<HyperVm> {
        let guid = system
            .text("Name")
            .ok_or_else(|| Error::Reply {
                operation: "Enumerate Msvm_ComputerSystem".into(),
                detail: "a VM without Name".into(),
            })?
            .trim()
            .to_owned();
        let name = system.text("ElementName").unwrap_or(&guid).to_owned();
        let operation = format!("reading the settings of VM {name}");
        let settings = self
            .wql(
                V2,
                &format!(
                    "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = {} AND VirtualSystemType = {}",
                    wql_quote(&guid),
                    wql_quote(REALIZED)
                ),
            )
            .await?;
        let current = settings.first().ok_or_else(|| Error::Reply {
            operation: operation.clone(),
            detail: "the VM has no realized settings".into(),
        })?;
        let settings_id = current
            .text("InstanceID")
            .ok_or_else(|| Error::Reply {
                operation: operation.clone(),
                detail: "settings without InstanceID".into(),
            })?
            .to_owned();
        let generation = match current.text("VirtualSystemSubType") {
            Some(t) if t.ends_with(":2") => 2,
            _ => 1,
        };
        let version = current
            .text("Version")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let epr = settings_epr(&settings_id);
        let component = "Msvm_VirtualSystemSettingDataComponent";
        let cpus = self
            .associated(&epr, component, "Msvm_ProcessorSettingData")
            .await?
            .first()
            .map(|p| p.u64("VirtualQuantity"))
            .transpose()
            .map_err(Self::op_error(&operation))?
            .flatten()
            .unwrap_or(0);
        let memory_mib = self
            .associated(&epr, component, "Msvm_MemorySettingData")
            .await?
            .first()
            .map(|m| m.u64("VirtualQuantity"))
            .transpose()
            .map_err(Self::op_error(&operation))?
            .flatten()
            .unwrap_or(0);
        let disks = self.disks_of(&settings_id).await?;
        let mut disk_infos = Vec::with_capacity(disks.len());
        for disk in &disks {
            disk_infos.push(self.disk_info(disk).await?);
        }
        let checkpoints = self.checkpoints(&guid).await?;
        let power_state = match system.u64("EnabledState").ok().flatten() {
            Some(2) => PowerState::PoweredOn,
            Some(3) => PowerState::PoweredOff,
            Some(6 | 9 | 32768 | 32769) => PowerState::Suspended,
            _ => PowerState::Unknown,
        };
        Ok(HyperVm {
            info: VmInfo {
                id: VmId(guid.clone()),
                name: name.clone(),
                path: format!("/{host_label}/{name}"),
                source_ref: guid.clone(),
                power_state,
                // Hyper-V knows the guest OS only through the guest's KVP integration
                // service, which a powered-off VM does not run.
                guest_os: String::new(),
                cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
                memory_mib,
                firmware: if generation == 2 {
                    Firmware::Efi
                } else {
                    Firmware::Bios
                },
                change_tracking: rct_capable(&version),
                disks: disk_infos,
            },
            guid,
            version,
            generation,
            disks,
            checkpoints,
        })
    }

    /// The virtual hard disks of a settings instance (a VM's or a checkpoint's), with the
    /// controller each sits on.
    pub async fn disks_of(&self, settings_id: &str) -> Result<Vec<VmDisk>> {
        let epr = settings_epr(settings_id);
        let component = "Msvm_VirtualSystemSettingDataComponent";
        let resources = self
            .associated(&epr, component, "Msvm_ResourceAllocationSettingData")
            .await?;
        let storage = self
            .associated(&epr, component, "Msvm_StorageAllocationSettingData")
            .await?;
        // Controllers of each kind in InstanceID order give the indexes Hyper-V Manager shows.
        let mut controllers: Vec<(&str, String)> = Vec::new();
        for r in &resources {
            let kind = match r.text("ResourceSubType") {
                Some("Microsoft:Hyper-V:Emulated IDE Controller") => "ide",
                Some("Microsoft:Hyper-V:Synthetic SCSI Controller") => "scsi",
                _ => continue,
            };
            if let Some(id) = r.text("InstanceID") {
                controllers.push((kind, id.to_owned()));
            }
        }
        controllers.sort();
        let controller_name = |id: &str| -> Option<String> {
            let (kind, _) = controllers.iter().find(|(_, c)| c == id)?;
            let index = controllers
                .iter()
                .filter(|(k, _)| k == kind)
                .position(|(_, c)| c == id)?;
            Some(format!("{kind}{index}"))
        };
        let mut disks = Vec::new();
        for s in &storage {
            if s.text("ResourceSubType") != Some("Microsoft:Hyper-V:Virtual Hard Disk") {
                continue;
            }
            let instance_id = s.text("InstanceID").unwrap_or_default().to_owned();
            let Some(path) = s.texts("HostResource").first().map(|p| (*p).to_owned()) else {
                continue;
            };
            let drive = s
                .text("Parent")
                .and_then(instance_id_in_path)
                .and_then(|id| {
                    resources
                        .iter()
                        .find(|r| r.text("InstanceID") == Some(id.as_str()))
                });
            let location = drive
                .and_then(|d| d.text("AddressOnParent"))
                .unwrap_or("0")
                .trim()
                .to_owned();
            let controller = drive
                .and_then(|d| d.text("Parent"))
                .and_then(instance_id_in_path)
                .and_then(|id| controller_name(&id))
                .unwrap_or_else(|| "disk".to_owned());
            disks.push(VmDisk {
                id: format!("{controller}-{location}"),
                slot: slot_of(&instance_id).to_owned(),
                instance_id,
                path,
            });
        }
        disks.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(disks)
    }

    async fn disk_info(&self, disk: &VmDisk) -> Result<DiskInfo> {
        let file = disk.path.rsplit('\\').next().unwrap_or(&disk.path);
        let (capacity_bytes, unsupported) = match self.vhd_info(&disk.path).await {
            Ok(info) => {
                let unsupported = if info.format == 4 {
                    Some("a VHD Set (shared) disk: its changes are tracked per set, which rehost does not read".to_owned())
                } else if info.max_internal_size > VHD_MAX_BYTES {
                    Some(format!(
                        "{} bytes: larger than the 2040 GiB a VHD image can hold",
                        info.max_internal_size
                    ))
                } else {
                    None
                };
                (info.max_internal_size, unsupported)
            }
            Err(Error::Method { code: 32779, .. }) => {
                (0, Some(format!("its file {} is missing", disk.path)))
            }
            Err(e) => return Err(e),
        };
        Ok(DiskInfo {
            id: DiskId(disk.id.clone()),
            label: format!("{} ({file})", disk.id.to_uppercase()),
            capacity_bytes,
            location: disk.path.clone(),
            change_id: None,
            unsupported,
        })
    }

    /// `GetVirtualHardDiskSettingData` of a file.
    pub async fn vhd_info(&self, path: &str) -> Result<VhdInfo> {
        let service = self.service("Msvm_ImageManagementService").await?;
        let operation = format!("reading the settings of {path}");
        let done = self
            .invoke_and_wait(
                &service,
                "GetVirtualHardDiskSettingData",
                &[("Path", Param::Text(path.to_owned()))],
                &operation,
            )
            .await?;
        let text = done
            .output
            .text("SettingData")
            .ok_or_else(|| Error::Reply {
                operation: operation.clone(),
                detail: "no SettingData".into(),
            })?;
        let data = Instance::from_cim_xml(text).map_err(Self::op_error(&operation))?;
        let number = |name: &str| -> Result<u64> {
            data.u64(name)
                .map_err(Self::op_error(&operation))?
                .ok_or_else(|| Error::Reply {
                    operation: operation.clone(),
                    detail: format!("the setting data has no {name}"),
                })
        };
        Ok(VhdInfo {
            format: number("Format")?,
            kind: number("Type")?,
            max_internal_size: number("MaxInternalSize")?,
            parent_path: data
                .text("ParentPath")
                .filter(|p| !p.is_empty())
                .map(str::to_owned),
        })
    }

    /// The checkpoints of a VM.
    pub async fn checkpoints(&self, guid: &str) -> Result<Vec<Checkpoint>> {
        let found = self
            .wql(
                V2,
                &format!(
                    "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = {} AND VirtualSystemType LIKE \"Microsoft:Hyper-V:Snapshot%\"",
                    wql_quote(guid)
                ),
            )
            .await?;
        Ok(found
            .iter()
            .filter_map(|c| {
                Some(Checkpoint {
                    instance_id: c.text("InstanceID")?.to_owned(),
                    name: c.text("ElementName").unwrap_or_default().to_owned(),
                    kind: c.text("VirtualSystemType").unwrap_or_default().to_owned(),
                })
            })
            .collect())
    }

    /// Takes a recovery checkpoint of a VM (crash-consistent, or application-consistent
    /// through the guest's VSS when `quiesce`), names it `name`, and returns its InstanceID.
    pub async fn create_checkpoint(
        &self,
        vm_guid: &str,
        name: &str,
        quiesce: bool,
    ) -> Result<String> {
        let service = self.service("Msvm_VirtualSystemSnapshotService").await?;
        let operation = format!("taking a recovery checkpoint of VM {vm_guid}");
        let settings = embedded_instance(
            "Msvm_VirtualSystemSnapshotSettingData",
            &[
                ("ConsistencyLevel", "uint8", if quiesce { "1" } else { "2" }),
                ("IgnoreNonSnapshottableDisks", "boolean", "true"),
            ],
        );
        let done = self
            .invoke_and_wait(
                &service,
                "CreateSnapshot",
                &[
                    ("AffectedSystem", Param::Reference(vm_epr(vm_guid))),
                    ("SnapshotSettings", Param::Embedded(settings)),
                    ("SnapshotType", Param::Text(SNAPSHOT_TYPE_RECOVERY.into())),
                ],
                &operation,
            )
            .await?;
        // Synchronous answers name the checkpoint; a job names it as its affected element
        // (as Microsoft's backup sample finds it).
        let instance_id = match (&done.job, done.output.reference("ResultingSnapshot")) {
            (_, Some(epr)) if epr.selector("InstanceID").is_some() => {
                epr.selector("InstanceID").map(str::to_owned)
            }
            (Some(job), _) => self
                .associated(
                    job,
                    "Msvm_AffectedJobElement",
                    "Msvm_VirtualSystemSettingData",
                )
                .await?
                .iter()
                .find(|s| s.text("VirtualSystemType") == Some(RECOVERY))
                .and_then(|s| s.text("InstanceID"))
                .map(str::to_owned),
            _ => None,
        }
        .ok_or_else(|| Error::Reply {
            operation: operation.clone(),
            detail: "the checkpoint was created but neither the method nor its job names it".into(),
        })?;
        self.rename_checkpoint(&instance_id, name).await?;
        Ok(instance_id)
    }

    /// Sets a checkpoint's name (`ModifySystemSettings` with its settings' ElementName).
    async fn rename_checkpoint(&self, instance_id: &str, name: &str) -> Result<()> {
        let service = self.service("Msvm_VirtualSystemManagementService").await?;
        let settings = embedded_instance(
            "Msvm_VirtualSystemSettingData",
            &[
                ("InstanceID", "string", instance_id),
                ("ElementName", "string", name),
            ],
        );
        self.invoke_and_wait(
            &service,
            "ModifySystemSettings",
            &[("SystemSettings", Param::Embedded(settings))],
            &format!("naming checkpoint {instance_id} {name}"),
        )
        .await?;
        Ok(())
    }

    /// Deletes a checkpoint (its `.avhdx` is merged back). A checkpoint already gone is
    /// success.
    pub async fn destroy_checkpoint(&self, instance_id: &str) -> Result<()> {
        if !self.exists(&settings_epr(instance_id)).await? {
            return Ok(());
        }
        let service = self.service("Msvm_VirtualSystemSnapshotService").await?;
        self.invoke_and_wait(
            &service,
            "DestroySnapshot",
            &[(
                "AffectedSnapshot",
                Param::Reference(settings_epr(instance_id)),
            )],
            &format!("deleting checkpoint {instance_id}"),
        )
        .await?;
        Ok(())
    }

    async fn exists(&self, epr: &Epr) -> Result<bool> {
        match self.get(epr).await {
            Ok(_) => Ok(true),
            Err(Error::Fault { fault, .. }) if fault.subcode == "InvalidSelectors" => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Turns a checkpoint into an RCT reference point (its `.avhdx` is merged; the
    /// reference point keeps one RCT id per disk).
    pub async fn convert_to_reference_point(&self, instance_id: &str) -> Result<ReferencePoint> {
        let service = self.service("Msvm_VirtualSystemSnapshotService").await?;
        let operation = format!("converting checkpoint {instance_id} to a reference point");
        let done = self
            .invoke_and_wait(
                &service,
                "ConvertToReferencePoint",
                &[(
                    "AffectedSnapshot",
                    Param::Reference(settings_epr(instance_id)),
                )],
                &operation,
            )
            .await?;
        let found = match (&done.job, done.output.reference("ResultingReferencePoint")) {
            (_, Some(epr)) => Some(self.get(epr).await?),
            (Some(job), None) => self
                .associated(
                    job,
                    "Msvm_AffectedJobElement",
                    "Msvm_VirtualSystemReferencePoint",
                )
                .await?
                .into_iter()
                .next(),
            (None, None) => None,
        };
        let point = found.ok_or_else(|| Error::Reply {
            operation: operation.clone(),
            detail: "the reference point was made but nothing names it".into(),
        })?;
        reference_point(&point).map_err(Self::op_error(&operation))
    }

    /// The reference points of a VM.
    pub async fn reference_points(&self, guid: &str) -> Result<Vec<ReferencePoint>> {
        let found = self
            .wql(
                V2,
                &format!(
                    "SELECT * FROM Msvm_VirtualSystemReferencePoint WHERE VirtualSystemIdentifier = {}",
                    wql_quote(guid)
                ),
            )
            .await?;
        found
            .iter()
            .map(|p| {
                reference_point(p)
                    .map_err(Self::op_error("Enumerate Msvm_VirtualSystemReferencePoint"))
            })
            .collect()
    }

    /// Deletes a reference point; one already gone is success.
    pub async fn destroy_reference_point(&self, instance_id: &str) -> Result<()> {
        if !self.exists(&reference_point_epr(instance_id)).await? {
            return Ok(());
        }
        let service = self
            .service("Msvm_VirtualSystemReferencePointService")
            .await?;
        self.invoke_and_wait(
            &service,
            "DestroyReferencePoint",
            &[(
                "AffectedReferencePoint",
                Param::Reference(reference_point_epr(instance_id)),
            )],
            &format!("deleting reference point {instance_id}"),
        )
        .await?;
        Ok(())
    }

    /// The ranges of the disk file `path` changed since the RCT id `since`, asking again
    /// from where each answer stopped until `[0, capacity)` is covered.
    pub async fn changed_ranges(
        &self,
        path: &str,
        since: &str,
        capacity: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let service = self.service("Msvm_ImageManagementService").await?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut offset = 0u64;
        while offset < capacity {
            let operation = format!("asking RCT for the changes of {path} from byte {offset}");
            let length = capacity - offset;
            let done = self
                .invoke_and_wait(
                    &service,
                    "GetVirtualDiskChanges",
                    &[
                        ("Path", Param::Text(path.to_owned())),
                        ("LimitId", Param::Text(since.to_owned())),
                        ("TargetSnapshotId", Param::Text(String::new())),
                        ("ByteOffset", Param::Text(offset.to_string())),
                        ("ByteLength", Param::Text(length.to_string())),
                    ],
                    &operation,
                )
                .await;
            let done = match done {
                Ok(done) => done,
                Err(Error::Method { code: 32773, .. }) => {
                    return Err(Error::RctInvalid {
                        path: path.to_owned(),
                        rct_id: since.to_owned(),
                        detail: "GetVirtualDiskChanges answered 32773 (invalid parameter)".into(),
                    });
                }
                Err(e) => return Err(e),
            };
            let out = &done.output;
            let processed = out
                .u64("ProcessedByteLength")
                .map_err(Self::op_error(&operation))?
                .unwrap_or(0);
            let offsets = numbers(out, "ChangedByteOffsets").map_err(Self::op_error(&operation))?;
            let lengths = numbers(out, "ChangedByteLengths").map_err(Self::op_error(&operation))?;
            if offsets.len() != lengths.len() {
                return Err(Error::Reply {
                    operation,
                    detail: format!(
                        "{} changed offsets but {} lengths",
                        offsets.len(),
                        lengths.len()
                    ),
                });
            }
            if processed == 0 || processed > length {
                return Err(Error::Reply {
                    operation,
                    detail: format!(
                        "ProcessedByteLength {processed} of {length} asked: the scan would not move on"
                    ),
                });
            }
            let scanned_end = offset + processed;
            for (&start, &len) in offsets.iter().zip(&lengths) {
                let end = start.checked_add(len).filter(|&e| e <= capacity);
                let Some(end) = end.filter(|_| start >= offset && len > 0) else {
                    return Err(Error::Reply {
                        operation,
                        detail: format!(
                            "changed range {start}+{len} lies outside the scanned {offset}..{scanned_end} of a {capacity}-byte disk"
                        ),
                    });
                };
                match ranges.last_mut() {
                    Some(last) if start < last.0 + last.1 => {
                        return Err(Error::Reply {
                            operation,
                            detail: format!(
                                "changed range {start}+{len} overlaps or precedes the one before"
                            ),
                        });
                    }
                    Some(last) if start == last.0 + last.1 => last.1 += len,
                    _ => ranges.push((start, end - start)),
                }
            }
            offset = scanned_end;
        }
        Ok(ranges)
    }
}

fn numbers(instance: &Instance, name: &str) -> Result<Vec<u64>, String> {
    instance
        .texts(name)
        .iter()
        .map(|t| {
            t.trim()
                .parse()
                .map_err(|_| format!("{name} holds {t:?}, not a number"))
        })
        .collect()
}

fn reference_point(point: &Instance) -> Result<ReferencePoint, String> {
    let instance_id = point
        .text("InstanceID")
        .ok_or("a reference point without InstanceID")?
        .to_owned();
    let disks = point.texts("VirtualDiskIdentifiers");
    let rct = point.texts("ResilientChangeTrackingIdentifiers");
    if disks.len() != rct.len() {
        return Err(format!(
            "reference point {instance_id} lists {} disks but {} RCT ids",
            disks.len(),
            rct.len()
        ));
    }
    Ok(ReferencePoint {
        instance_id,
        disks: disks
            .iter()
            .zip(&rct)
            .map(|(d, r)| ((*d).to_owned(), (*r).to_owned()))
            .collect(),
    })
}

/// Whether a configuration version has Resilient Change Tracking (6.2, Windows Server
/// 2016 technical preview, and later).
pub fn rct_capable(version: &str) -> bool {
    let mut parts = version.trim().split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_paths() {
        assert_eq!(slot_of("Microsoft:A1B2\\83F8\\0\\1\\L"), "83F8\\0\\1\\L");
        assert_eq!(
            instance_id_in_path(
                "\\\\HV01\\root\\virtualization\\v2:Msvm_ResourceAllocationSettingData.InstanceID=\"Microsoft:A\\\\C\\\\0\\\\1\\\\D\""
            )
            .as_deref(),
            Some("Microsoft:A\\C\\0\\1\\D")
        );
        assert_eq!(instance_id_in_path("nothing"), None);
        assert_eq!(wql_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn rct_needs_configuration_6_2() {
        assert!(rct_capable("8.0"));
        assert!(rct_capable("6.2"));
        assert!(rct_capable("10.0"));
        assert!(!rct_capable("5.0"));
        assert!(!rct_capable(""));
    }
}
