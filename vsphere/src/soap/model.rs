//! The typed subset of the vim25 data model rehost reads, each built from a [`Node`]
//! with an error naming what was missing.

use super::xml::Node;

/// A reply that parsed as XML but lacks what the vim25 schema promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct ModelError {
    /// What was missing or wrong (`TaskInfo.state missing`).
    pub what: String,
}

fn missing(what: impl Into<String>) -> ModelError {
    ModelError {
        what: format!("{} missing", what.into()),
    }
}

fn req<'a>(node: &'a Node, name: &str, ty: &str) -> Result<&'a Node, ModelError> {
    node.child(name)
        .ok_or_else(|| missing(format!("{ty}.{name}")))
}

fn req_text<'a>(node: &'a Node, name: &str, ty: &str) -> Result<&'a str, ModelError> {
    Ok(req(node, name, ty)?.trimmed())
}

fn opt_text(node: &Node, name: &str) -> Option<String> {
    node.child(name).map(|n| n.trimmed().to_owned())
}

fn number<T: std::str::FromStr>(node: &Node, name: &str, ty: &str) -> Result<T, ModelError> {
    let text = req_text(node, name, ty)?;
    text.parse().map_err(|_| ModelError {
        what: format!("{ty}.{name} is not a number: {text:?}"),
    })
}

fn opt_number<T: std::str::FromStr>(
    node: &Node,
    name: &str,
    ty: &str,
) -> Result<Option<T>, ModelError> {
    match node.child(name) {
        None => Ok(None),
        Some(_) => number(node, name, ty).map(Some),
    }
}

fn boolean(node: &Node, name: &str) -> Option<bool> {
    node.child(name)
        .map(|n| n.trimmed() == "true" || n.trimmed() == "1")
}

/// A ManagedObjectReference: a type and a value (`VirtualMachine`, `vm-42`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoRef {
    /// The managed object type.
    pub kind: String,
    /// The server's id for it.
    pub value: String,
}

impl MoRef {
    /// A reference of `kind` with `value`.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        MoRef {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// Reads `<x type="T">value</x>`.
    pub fn from_node(node: &Node) -> Result<Self, ModelError> {
        let kind = node
            .type_attr
            .clone()
            .ok_or_else(|| missing(format!("type attribute of <{}>", node.name)))?;
        Ok(MoRef::new(kind, node.trimmed()))
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// The entry points of a vCenter or ESXi (`ServiceContent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContent {
    /// The root of the inventory.
    pub root_folder: MoRef,
    /// The PropertyCollector.
    pub property_collector: MoRef,
    /// The ViewManager (container views).
    pub view_manager: MoRef,
    /// The SessionManager (login, logout).
    pub session_manager: MoRef,
    /// The SearchIndex (VMs by UUID).
    pub search_index: MoRef,
    /// What the server is.
    pub about: AboutInfo,
}

impl ServiceContent {
    /// Reads a `ServiceContent`.
    pub fn from_node(n: &Node) -> Result<Self, ModelError> {
        let t = "ServiceContent";
        Ok(ServiceContent {
            root_folder: MoRef::from_node(req(n, "rootFolder", t)?)?,
            property_collector: MoRef::from_node(req(n, "propertyCollector", t)?)?,
            view_manager: MoRef::from_node(req(n, "viewManager", t)?)?,
            session_manager: MoRef::from_node(req(n, "sessionManager", t)?)?,
            search_index: MoRef::from_node(req(n, "searchIndex", t)?)?,
            about: AboutInfo::from_node(req(n, "about", t)?)?,
        })
    }
}

/// What the server is (`AboutInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AboutInfo {
    /// Product name.
    pub name: String,
    /// Name, version and build in one line.
    pub full_name: String,
    /// Product version (`8.0.2`).
    pub version: String,
    /// Build number.
    pub build: String,
    /// `VirtualCenter` or `HostAgent`.
    pub api_type: String,
    /// The vim25 API version (`8.0.2.0`), used in the SOAPAction header.
    pub api_version: String,
    /// The vCenter's instance UUID (absent on ESXi).
    pub instance_uuid: Option<String>,
}

impl AboutInfo {
    /// Reads an `AboutInfo`.
    pub fn from_node(n: &Node) -> Result<Self, ModelError> {
        let t = "AboutInfo";
        Ok(AboutInfo {
            name: req_text(n, "name", t)?.to_owned(),
            full_name: req_text(n, "fullName", t)?.to_owned(),
            version: req_text(n, "version", t)?.to_owned(),
            build: opt_text(n, "build").unwrap_or_default(),
            api_type: req_text(n, "apiType", t)?.to_owned(),
            api_version: req_text(n, "apiVersion", t)?.to_owned(),
            instance_uuid: opt_text(n, "instanceUuid"),
        })
    }
}

/// One object of a PropertyCollector answer and the properties asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectContent {
    /// The object.
    pub obj: MoRef,
    /// `(path, value)` for each property set on the object; unset ones are absent.
    pub props: Vec<(String, Node)>,
    /// Paths that could not be read, with the fault type (e.g. `NoPermission`).
    pub missing: Vec<(String, String)>,
}

impl ObjectContent {
    /// Reads an `ObjectContent`.
    pub fn from_node(n: &Node) -> Result<Self, ModelError> {
        let t = "ObjectContent";
        let obj = MoRef::from_node(req(n, "obj", t)?)?;
        let mut props = Vec::new();
        for p in n.children_named("propSet") {
            let name = req_text(p, "name", "DynamicProperty")?.to_owned();
            let val = req(p, "val", "DynamicProperty")?.clone();
            props.push((name, val));
        }
        let missing = n
            .children_named("missingSet")
            .map(|m| {
                let path = opt_text(m, "path").unwrap_or_default();
                let fault = m
                    .path(&["fault", "fault"])
                    .and_then(|f| f.xsi_type.clone())
                    .unwrap_or_default();
                (path, fault)
            })
            .collect();
        Ok(ObjectContent {
            obj,
            props,
            missing,
        })
    }

    /// The value of property `path`, if set.
    pub fn prop(&self, path: &str) -> Option<&Node> {
        self.props.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }
}

/// One page of a `RetrievePropertiesEx` answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetrieveResult {
    /// The token for `ContinueRetrievePropertiesEx`, when more pages follow.
    pub token: Option<String>,
    /// The objects of this page.
    pub objects: Vec<ObjectContent>,
}

impl RetrieveResult {
    /// Reads the `returnval` of RetrievePropertiesEx (absent when nothing matched).
    pub fn from_response(response: &Node) -> Result<Self, ModelError> {
        let Some(rv) = response.child("returnval") else {
            return Ok(RetrieveResult::default());
        };
        Ok(RetrieveResult {
            token: opt_text(rv, "token").filter(|t| !t.is_empty()),
            objects: rv
                .children_named("objects")
                .map(ObjectContent::from_node)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// A virtual disk device and its backing (`VirtualDisk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualDisk {
    /// Device key, stable within the VM (`2000`).
    pub key: i32,
    /// `Hard disk 1`.
    pub label: String,
    /// Size in bytes.
    pub capacity_bytes: u64,
    /// The backing's type (`VirtualDiskFlatVer2BackingInfo`, …).
    pub backing_type: String,
    /// `[datastore] folder/disk.vmdk`.
    pub file_name: String,
    /// `persistent`, `independent_persistent`, …
    pub disk_mode: String,
    /// The CBT change id, when tracking is on.
    pub change_id: Option<String>,
    /// For an RDM: `physicalMode` or `virtualMode`.
    pub compatibility_mode: Option<String>,
}

impl VirtualDisk {
    /// The disks among `device` children of an `ArrayOfVirtualDevice` or `VirtualHardware`.
    pub fn list(devices: &Node) -> Result<Vec<Self>, ModelError> {
        devices
            .children
            .iter()
            .filter(|d| d.xsi_type.as_deref() == Some("VirtualDisk"))
            .map(VirtualDisk::from_node)
            .collect()
    }

    /// Reads a `VirtualDisk`.
    pub fn from_node(n: &Node) -> Result<Self, ModelError> {
        let t = "VirtualDisk";
        let capacity_bytes = match opt_number::<u64>(n, "capacityInBytes", t)? {
            Some(b) => b,
            None => number::<u64>(n, "capacityInKB", t)?.saturating_mul(1024),
        };
        let backing = req(n, "backing", t)?;
        Ok(VirtualDisk {
            key: number(n, "key", t)?,
            label: n
                .path(&["deviceInfo", "label"])
                .map(|l| l.trimmed().to_owned())
                .unwrap_or_default(),
            capacity_bytes,
            backing_type: backing.xsi_type.clone().unwrap_or_default(),
            file_name: opt_text(backing, "fileName").unwrap_or_default(),
            disk_mode: opt_text(backing, "diskMode").unwrap_or_default(),
            change_id: opt_text(backing, "changeId").filter(|c| !c.is_empty()),
            compatibility_mode: opt_text(backing, "compatibilityMode"),
        })
    }

    /// Why snapshots cannot capture this disk, if they cannot.
    pub fn unsupported_reason(&self) -> Option<String> {
        match self.backing_type.as_str() {
            "VirtualDiskRawDiskMappingVer1BackingInfo" => {
                let mode = self.compatibility_mode.as_deref().unwrap_or("unknown");
                if mode == "physicalMode" {
                    return Some(
                        "raw device mapping in physical compatibility mode: \
                         vSphere cannot snapshot it"
                            .into(),
                    );
                }
                return Some(format!(
                    "raw device mapping ({mode}): its data is read through the LUN, not a \
                     datastore file"
                ));
            }
            "VirtualDiskFlatVer2BackingInfo"
            | "VirtualDiskSparseVer2BackingInfo"
            | "VirtualDiskSeSparseBackingInfo"
            | "VirtualDiskFlatVer1BackingInfo"
            | "VirtualDiskSparseVer1BackingInfo" => {}
            other => return Some(format!("unsupported disk backing {other:?}")),
        }
        if self.disk_mode.starts_with("independent") {
            return Some(format!(
                "disk mode {}: snapshots do not cover independent disks",
                self.disk_mode
            ));
        }
        None
    }
}

/// One node of a VM's snapshot tree, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot's managed object.
    pub snapshot: MoRef,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// When it was taken (ISO 8601, as the server wrote it).
    pub create_time: String,
}

impl SnapshotInfo {
    /// Flattens the `rootSnapshotList` of a `VirtualMachineSnapshotInfo`, parents first.
    pub fn flatten(info: &Node) -> Result<Vec<Self>, ModelError> {
        let mut out = Vec::new();
        // An explicit stack, not recursion: the depth comes from the server.
        let mut stack: Vec<&Node> = info.children_named("rootSnapshotList").collect();
        stack.reverse();
        while let Some(tree) = stack.pop() {
            let t = "VirtualMachineSnapshotTree";
            out.push(SnapshotInfo {
                snapshot: MoRef::from_node(req(tree, "snapshot", t)?)?,
                name: req_text(tree, "name", t)?.to_owned(),
                description: opt_text(tree, "description").unwrap_or_default(),
                create_time: opt_text(tree, "createTime").unwrap_or_default(),
            });
            let mut children: Vec<&Node> = tree.children_named("childSnapshotList").collect();
            children.reverse();
            stack.extend(children);
        }
        Ok(out)
    }
}

/// State of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting to run.
    Queued,
    /// Running.
    Running,
    /// Done.
    Success,
    /// Failed; `TaskInfo::error` says why.
    Error,
}

/// A task's progress and outcome (`TaskInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// The task.
    pub task: MoRef,
    /// What it is (`VirtualMachine.createSnapshot`).
    pub description_id: String,
    /// The object it acts on.
    pub entity: Option<MoRef>,
    /// Where it is.
    pub state: TaskState,
    /// Percent done, when the server reports it.
    pub progress: Option<u8>,
    /// The fault type and message, when it failed.
    pub error: Option<(String, String, Node)>,
    /// Its result, when it succeeded with one.
    pub result: Option<Node>,
}

impl TaskInfo {
    /// Reads a `TaskInfo`.
    pub fn from_node(n: &Node) -> Result<Self, ModelError> {
        let t = "TaskInfo";
        let state = match req_text(n, "state", t)? {
            "queued" => TaskState::Queued,
            "running" => TaskState::Running,
            "success" => TaskState::Success,
            "error" => TaskState::Error,
            other => {
                return Err(ModelError {
                    what: format!("TaskInfo.state {other:?} unknown"),
                });
            }
        };
        let progress = opt_number::<i64>(n, "progress", t)?.map(|p| {
            // Clamped: the server promises 0..=100, a wrong value must not wrap.
            u8::try_from(p.clamp(0, 100)).unwrap_or(100)
        });
        let error = n.child("error").map(|e| {
            let fault = e.child("fault").cloned().unwrap_or_default();
            let fault_type = fault.xsi_type.clone().unwrap_or_default();
            let message = opt_text(e, "localizedMessage").unwrap_or_default();
            (fault_type, message, fault)
        });
        Ok(TaskInfo {
            task: MoRef::from_node(req(n, "task", t)?)?,
            description_id: opt_text(n, "descriptionId").unwrap_or_default(),
            entity: n.child("entity").map(MoRef::from_node).transpose()?,
            state,
            progress,
            error,
            result: n.child("result").cloned(),
        })
    }
}

/// An answer of QueryChangedDiskAreas (`DiskChangeInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskChangeInfo {
    /// Where the answered range starts.
    pub start_offset: u64,
    /// How far the answer covers; the next call starts at `start_offset + length`.
    pub length: u64,
    /// Changed areas `(start, length)` within the answered range.
    pub changed_areas: Vec<(u64, u64)>,
}

impl DiskChangeInfo {
    /// Reads a `DiskChangeInfo`.
    pub fn from_node(n: &Node) -> Result<Self, ModelError> {
        let t = "DiskChangeInfo";
        let changed_areas = n
            .children_named("changedArea")
            .map(|a| {
                Ok((
                    number(a, "start", "DiskChangeExtent")?,
                    number(a, "length", "DiskChangeExtent")?,
                ))
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(DiskChangeInfo {
            start_offset: number(n, "startOffset", t)?,
            length: number(n, "length", t)?,
            changed_areas,
        })
    }
}

/// One file of an export lease (`HttpNfcLeaseDeviceUrl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseDeviceUrl {
    /// Device key of the disk (`/vm-42/VirtualLsiLogicController0:0`); ties it to a disk.
    pub key: String,
    /// Of an import lease: the `deviceId` of the CreateImportSpec `fileItem` that this URL
    /// takes (`/NAME/disk:0`).
    pub import_key: Option<String>,
    /// Where to GET it; the host may be `*`.
    pub url: String,
    /// Whether it is a disk.
    pub disk: bool,
    /// Target id in the OVF, when set.
    pub target_id: Option<String>,
}

/// The URLs of an export or import lease (`HttpNfcLeaseInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpNfcLeaseInfo {
    /// The VM exported or being imported.
    pub entity: Option<MoRef>,
    /// The files to download.
    pub device_urls: Vec<LeaseDeviceUrl>,
    /// Total capacity of the disks, in KiB.
    pub total_disk_capacity_kib: u64,
    /// Seconds without progress after which the server cancels the lease.
    pub lease_timeout_seconds: Option<u64>,
}

impl HttpNfcLeaseInfo {
    /// Reads an `HttpNfcLeaseInfo`.
    pub fn from_node(n: &Node) -> Result<Self, ModelError> {
        let t = "HttpNfcLeaseDeviceUrl";
        let device_urls = n
            .children_named("deviceUrl")
            .map(|d| {
                Ok(LeaseDeviceUrl {
                    key: req_text(d, "key", t)?.to_owned(),
                    import_key: opt_text(d, "importKey").filter(|k| !k.is_empty()),
                    url: req_text(d, "url", t)?.to_owned(),
                    disk: boolean(d, "disk").unwrap_or(false),
                    target_id: opt_text(d, "targetId"),
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(HttpNfcLeaseInfo {
            entity: n.child("entity").map(MoRef::from_node).transpose()?,
            device_urls,
            total_disk_capacity_kib: opt_number(n, "totalDiskCapacityInKB", "HttpNfcLeaseInfo")?
                .unwrap_or(0),
            lease_timeout_seconds: opt_number(n, "leaseTimeout", "HttpNfcLeaseInfo")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::xml::parse;
    use super::*;

    const XSI: &str = r#"xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance""#;

    #[test]
    fn disks_and_their_unsupported_reasons() {
        let doc = format!(
            r#"<val {XSI} xsi:type="ArrayOfVirtualDevice">
<VirtualDevice xsi:type="VirtualIDEController"><key>200</key></VirtualDevice>
<VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label><summary>1,024 KB</summary></deviceInfo>
 <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[LocalDS_0] DC0_H0_VM0/disk1.vmdk</fileName><datastore type="Datastore">datastore-1</datastore><diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned><changeId>52 de 4c 2b/1</changeId></backing>
 <controllerKey>200</controllerKey><unitNumber>0</unitNumber><capacityInKB>1024</capacityInKB><capacityInBytes>1048576</capacityInBytes></VirtualDevice>
<VirtualDevice xsi:type="VirtualDisk"><key>2001</key><backing xsi:type="VirtualDiskRawDiskMappingVer1BackingInfo"><fileName>[ds] vm/rdm.vmdk</fileName><compatibilityMode>physicalMode</compatibilityMode><diskMode>independent_persistent</diskMode></backing><capacityInKB>2048</capacityInKB></VirtualDevice>
<VirtualDevice xsi:type="VirtualDisk"><key>2002</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds] vm/d3.vmdk</fileName><diskMode>independent_nonpersistent</diskMode></backing><capacityInBytes>4096</capacityInBytes></VirtualDevice>
<VirtualDevice xsi:type="VirtualDisk"><key>2003</key><backing xsi:type="VirtualDiskPartitionedRawDiskVer2BackingInfo"/><capacityInBytes>4096</capacityInBytes></VirtualDevice>
</val>"#
        );
        let disks = VirtualDisk::list(&parse(doc.as_bytes()).unwrap()).unwrap();
        assert_eq!(disks.len(), 4);
        let d = &disks[0];
        assert_eq!(
            (d.key, d.label.as_str(), d.capacity_bytes),
            (2000, "Hard disk 1", 1048576)
        );
        assert_eq!(d.file_name, "[LocalDS_0] DC0_H0_VM0/disk1.vmdk");
        assert_eq!(d.change_id.as_deref(), Some("52 de 4c 2b/1"));
        assert_eq!(d.unsupported_reason(), None);
        assert_eq!(disks[1].capacity_bytes, 2048 * 1024);
        assert!(disks[1].unsupported_reason().unwrap().contains("physical"));
        assert!(
            disks[2]
                .unsupported_reason()
                .unwrap()
                .contains("independent_nonpersistent")
        );
        assert!(
            disks[3]
                .unsupported_reason()
                .unwrap()
                .contains("PartitionedRawDisk")
        );
    }

    #[test]
    fn disk_without_capacity_names_what_is_missing() {
        let doc = format!(
            r#"<val {XSI}><VirtualDevice xsi:type="VirtualDisk"><key>1</key><backing/></VirtualDevice></val>"#
        );
        let err = VirtualDisk::list(&parse(doc.as_bytes()).unwrap()).unwrap_err();
        assert_eq!(err.what, "VirtualDisk.capacityInKB missing");
        let doc = format!(
            r#"<val {XSI}><VirtualDevice xsi:type="VirtualDisk"><key>x</key><backing/><capacityInKB>1</capacityInKB></VirtualDevice></val>"#
        );
        let err = VirtualDisk::list(&parse(doc.as_bytes()).unwrap()).unwrap_err();
        assert!(err.what.contains("VirtualDisk.key is not a number"));
    }

    #[test]
    fn snapshot_tree_is_flattened_parents_first() {
        let doc = r#"<val><currentSnapshot type="VirtualMachineSnapshot">snapshot-3</currentSnapshot>
<rootSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-1</snapshot><vm type="VirtualMachine">vm-1</vm><name>a</name><description>da</description><createTime>2026-11-25T10:00:00Z</createTime>
  <childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-2</snapshot><name>b</name>
    <childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-3</snapshot><name>c</name></childSnapshotList></childSnapshotList></rootSnapshotList>
<rootSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-4</snapshot><name>d</name></rootSnapshotList></val>"#;
        let list = SnapshotInfo::flatten(&parse(doc.as_bytes()).unwrap()).unwrap();
        let names: Vec<_> = list.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert_eq!(
            list[0].snapshot,
            MoRef::new("VirtualMachineSnapshot", "snapshot-1")
        );
        assert_eq!(list[0].create_time, "2026-11-25T10:00:00Z");
    }

    #[test]
    fn task_info_success_and_error() {
        let ok = format!(
            r#"<val {XSI} xsi:type="TaskInfo"><key>task-1</key><task type="Task">task-1</task><descriptionId>VirtualMachine.createSnapshot</descriptionId><entity type="VirtualMachine">vm-1</entity><state>success</state><progress>100</progress><result type="VirtualMachineSnapshot" xsi:type="ManagedObjectReference">snapshot-9</result></val>"#
        );
        let info = TaskInfo::from_node(&parse(ok.as_bytes()).unwrap()).unwrap();
        assert_eq!(info.state, TaskState::Success);
        assert_eq!(info.progress, Some(100));
        let result = MoRef::from_node(info.result.as_ref().unwrap()).unwrap();
        assert_eq!(result, MoRef::new("VirtualMachineSnapshot", "snapshot-9"));

        let err = format!(
            r#"<val {XSI}><task type="Task">task-2</task><state>error</state><progress>250</progress><error><fault xsi:type="InvalidPowerState"><requestedState>poweredOff</requestedState><existingState>poweredOn</existingState></fault><localizedMessage>The attempted operation cannot be performed in the current state (Powered on).</localizedMessage></error></val>"#
        );
        let info = TaskInfo::from_node(&parse(err.as_bytes()).unwrap()).unwrap();
        assert_eq!(info.state, TaskState::Error);
        assert_eq!(info.progress, Some(100));
        let (ty, msg, _) = info.error.unwrap();
        assert_eq!(ty, "InvalidPowerState");
        assert!(msg.contains("Powered on"));

        let bad = r#"<val><task type="Task">t</task><state>exploded</state></val>"#;
        assert!(TaskInfo::from_node(&parse(bad.as_bytes()).unwrap()).is_err());
    }

    #[test]
    fn disk_change_info_and_lease_info() {
        let doc = r#"<returnval><startOffset>0</startOffset><length>1048576</length><changedArea><start>0</start><length>65536</length></changedArea><changedArea><start>524288</start><length>4096</length></changedArea></returnval>"#;
        let info = DiskChangeInfo::from_node(&parse(doc.as_bytes()).unwrap()).unwrap();
        assert_eq!((info.start_offset, info.length), (0, 1048576));
        assert_eq!(info.changed_areas, vec![(0, 65536), (524288, 4096)]);

        let doc = r#"<returnval><deviceUrl><key>/vm-1/VirtualLsiLogicController0:0</key><importKey>/DC0_H0_VM0/VirtualLsiLogicController0:0</importKey><url>https://*/nfc/52a/disk-0.vmdk</url><sslThumbprint></sslThumbprint><disk>true</disk><targetId>disk-0.vmdk</targetId></deviceUrl><totalDiskCapacityInKB>1024</totalDiskCapacityInKB><leaseTimeout>300</leaseTimeout></returnval>"#;
        let lease = HttpNfcLeaseInfo::from_node(&parse(doc.as_bytes()).unwrap()).unwrap();
        assert_eq!(lease.device_urls.len(), 1);
        assert!(lease.device_urls[0].disk);
        assert_eq!(lease.device_urls[0].url, "https://*/nfc/52a/disk-0.vmdk");
        assert_eq!(lease.lease_timeout_seconds, Some(300));
    }

    #[test]
    fn retrieve_result_with_token_and_missing_set() {
        let doc = format!(
            r#"<RetrievePropertiesExResponse {XSI}><returnval><token>1</token><objects><obj type="VirtualMachine">vm-1</obj><propSet><name>name</name><val xsi:type="xsd:string">DC0_H0_VM0</val></propSet><missingSet><path>snapshot</path><fault><fault xsi:type="NoPermission"/></fault></missingSet></objects></returnval></RetrievePropertiesExResponse>"#
        );
        let r = RetrieveResult::from_response(&parse(doc.as_bytes()).unwrap()).unwrap();
        assert_eq!(r.token.as_deref(), Some("1"));
        assert_eq!(r.objects[0].prop("name").unwrap().text, "DC0_H0_VM0");
        assert_eq!(
            r.objects[0].missing,
            vec![("snapshot".into(), "NoPermission".into())]
        );
        let empty = parse(b"<RetrievePropertiesExResponse/>").unwrap();
        assert_eq!(
            RetrieveResult::from_response(&empty).unwrap(),
            RetrieveResult::default()
        );
    }
}
