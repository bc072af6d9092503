//! Where a new VM can go: datacenters, their compute resources and hosts, datastores and
//! networks, read with the PropertyCollector; and the VM calls a deployment ends with
//! (power on, its state).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::client::{Client, path_set, protocol};
use crate::error::{Error, Result};
use crate::soap::model::ObjectContent;
use crate::soap::{MoRef, Node, Request, escape};

/// A datacenter and the folders and lists a placement starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datacenter {
    /// Its managed object.
    pub moref: MoRef,
    /// Its name.
    pub name: String,
    /// The root folder of its VMs.
    pub vm_folder: MoRef,
    /// The root folder of its clusters and hosts.
    pub host_folder: MoRef,
    /// Its datastores.
    pub datastores: Vec<MoRef>,
    /// Its networks (standard and distributed port groups).
    pub networks: Vec<MoRef>,
}

/// A datastore as a placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datastore {
    /// Its managed object.
    pub moref: MoRef,
    /// Its name.
    pub name: String,
    /// Free space in bytes.
    pub free_bytes: u64,
    /// Whether the hosts can reach it.
    pub accessible: bool,
}

/// A named inventory object (network, host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// Its managed object.
    pub moref: MoRef,
    /// Its name.
    pub name: String,
}

/// A cluster or standalone host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeResource {
    /// Its managed object (`ClusterComputeResource` or `ComputeResource`).
    pub moref: MoRef,
    /// Its name.
    pub name: String,
    /// Its root resource pool.
    pub resource_pool: MoRef,
    /// Its hosts, with their names.
    pub hosts: Vec<Named>,
}

/// What the deployment reports of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState {
    /// Its name.
    pub name: String,
    /// `config.instanceUuid`.
    pub instance_uuid: String,
    /// `runtime.powerState` (`poweredOn`, …).
    pub power_state: String,
}

fn text(content: &ObjectContent, path: &str) -> String {
    content
        .prop(path)
        .map(|n| n.trimmed().to_owned())
        .unwrap_or_default()
}

fn moref(content: &ObjectContent, path: &str) -> Result<MoRef> {
    let node = content.prop(path).ok_or_else(|| {
        protocol(
            "RetrievePropertiesEx",
            format!("{} has no {path}", content.obj),
        )
    })?;
    MoRef::from_node(node).map_err(|e| protocol("RetrievePropertiesEx", e))
}

/// The morefs of an `ArrayOfManagedObjectReference`, without repeats (vcsim repeats some).
fn morefs(content: &ObjectContent, path: &str) -> Result<Vec<MoRef>> {
    let mut out: Vec<MoRef> = Vec::new();
    if let Some(list) = content.prop(path) {
        for n in &list.children {
            let r = MoRef::from_node(n).map_err(|e| protocol("RetrievePropertiesEx", e))?;
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

impl Client {
    /// Properties `paths` of each object of `objects` (of any types), in one call.
    async fn retrieve_objects(
        &self,
        objects: &[MoRef],
        paths: &[&str],
    ) -> Result<Vec<ObjectContent>> {
        if objects.is_empty() {
            return Ok(Vec::new());
        }
        let kinds: std::collections::BTreeSet<&str> =
            objects.iter().map(|o| o.kind.as_str()).collect();
        let mut spec = String::from("<specSet>");
        for kind in kinds {
            spec.push_str(&format!(
                "<propSet><type>{}</type>{}</propSet>",
                escape(kind),
                path_set(paths)
            ));
        }
        for o in objects {
            spec.push_str(&format!(
                "<objectSet><obj type=\"{}\">{}</obj><skip>false</skip></objectSet>",
                escape(&o.kind),
                escape(&o.value)
            ));
        }
        spec.push_str("</specSet>");
        self.retrieve(&spec).await
    }

    /// Properties of every object of `types` under `container` (recursive): a container
    /// view read and destroyed. Types are matched exactly (list subtypes too).
    async fn retrieve_in(
        &self,
        container: &MoRef,
        types: &[(&str, &[&str])],
    ) -> Result<Vec<ObjectContent>> {
        let names: Vec<&str> = types.iter().map(|(t, _)| *t).collect();
        let view = self.create_container_view_in(container, &names).await?;
        let mut spec = String::from("<specSet>");
        for (kind, paths) in types {
            spec.push_str(&format!(
                "<propSet><type>{kind}</type>{}</propSet>",
                path_set(paths)
            ));
        }
        spec.push_str(&format!(
            "<objectSet><obj type=\"ContainerView\">{}</obj><skip>true</skip>\
             <selectSet xsi:type=\"TraversalSpec\"><name>view</name><type>ContainerView</type>\
             <path>view</path><skip>false</skip></selectSet></objectSet></specSet>",
            escape(&view.value)
        ));
        let result = self.retrieve(&spec).await;
        self.destroy_view(&view).await;
        result
    }

    /// Every datacenter, in inventory order.
    pub async fn datacenters(&self) -> Result<Vec<Datacenter>> {
        let root = self.service_content().root_folder.clone();
        let paths: &[&str] = &["name", "vmFolder", "hostFolder", "datastore", "network"];
        self.retrieve_in(&root, &[("Datacenter", paths)])
            .await?
            .iter()
            .map(|c| {
                Ok(Datacenter {
                    moref: c.obj.clone(),
                    name: text(c, "name"),
                    vm_folder: moref(c, "vmFolder")?,
                    host_folder: moref(c, "hostFolder")?,
                    datastores: morefs(c, "datastore")?,
                    networks: morefs(c, "network")?,
                })
            })
            .collect()
    }

    /// The datastores `refs`, with their free space.
    pub async fn datastores(&self, refs: &[MoRef]) -> Result<Vec<Datastore>> {
        let paths = ["name", "summary.freeSpace", "summary.accessible"];
        let mut out = Vec::new();
        for c in self.retrieve_objects(refs, &paths).await? {
            let free = text(&c, "summary.freeSpace");
            out.push(Datastore {
                name: text(&c, "name"),
                free_bytes: free.parse().map_err(|_| {
                    protocol(
                        "RetrievePropertiesEx",
                        format!("{} summary.freeSpace is {free:?}", c.obj),
                    )
                })?,
                accessible: text(&c, "summary.accessible") != "false",
                moref: c.obj,
            });
        }
        Ok(out)
    }

    /// The names of `refs` (networks, hosts, …).
    pub async fn names(&self, refs: &[MoRef]) -> Result<Vec<Named>> {
        Ok(self
            .retrieve_objects(refs, &["name"])
            .await?
            .into_iter()
            .map(|c| Named {
                name: text(&c, "name"),
                moref: c.obj,
            })
            .collect())
    }

    /// The clusters and standalone hosts under `host_folder`, in inventory order.
    pub async fn compute_resources(&self, host_folder: &MoRef) -> Result<Vec<ComputeResource>> {
        let compute: &[&str] = &["name", "resourcePool", "host"];
        let contents = self
            .retrieve_in(
                host_folder,
                &[
                    ("ClusterComputeResource", compute),
                    ("ComputeResource", compute),
                    ("HostSystem", &["name"]),
                ],
            )
            .await?;
        let host_names: BTreeMap<&MoRef, String> = contents
            .iter()
            .filter(|c| c.obj.kind == "HostSystem")
            .map(|c| (&c.obj, text(c, "name")))
            .collect();
        contents
            .iter()
            .filter(|c| c.obj.kind != "HostSystem")
            .map(|c| {
                Ok(ComputeResource {
                    moref: c.obj.clone(),
                    name: text(c, "name"),
                    resource_pool: moref(c, "resourcePool")?,
                    hosts: morefs(c, "host")?
                        .into_iter()
                        .map(|h| Named {
                            name: host_names.get(&h).cloned().unwrap_or_default(),
                            moref: h,
                        })
                        .collect(),
                })
            })
            .collect()
    }

    /// A VM's name, instance UUID and power state.
    pub async fn vm_state(&self, vm: &MoRef) -> Result<VmState> {
        let c = self
            .retrieve_one(vm, &["name", "config.instanceUuid", "runtime.powerState"])
            .await?;
        Ok(VmState {
            name: text(&c, "name"),
            instance_uuid: text(&c, "config.instanceUuid"),
            power_state: text(&c, "runtime.powerState"),
        })
    }

    /// PowerOnVM_Task, waited for.
    pub async fn power_on(&self, vm: &MoRef, timeout: Duration) -> Result<Option<Node>> {
        let req = Request::new("PowerOnVM_Task", vm);
        let task = self.call_moref(&req).await?;
        self.wait_for_task(&task, timeout, |_| {}).await
    }

    /// Destroy_Task of a VM, waited for.
    pub async fn destroy_vm(&self, vm: &MoRef, timeout: Duration) -> Result<()> {
        let task = self.call_moref(&Request::new("Destroy_Task", vm)).await?;
        self.wait_for_task(&task, timeout, |_| {}).await?;
        Ok(())
    }

    /// Whether `vm` still exists.
    pub async fn vm_exists(&self, vm: &MoRef) -> Result<bool> {
        match self.retrieve_one(vm, &["name"]).await {
            Ok(_) => Ok(true),
            Err(Error::ManagedObjectNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
