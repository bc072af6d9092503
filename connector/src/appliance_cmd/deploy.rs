//! `rehost appliance deploy`: an OVA to vCenter, as `govc import.ova` does it —
//! OvfManager.CreateImportSpec, ResourcePool.ImportVApp, each file streamed from the OVA
//! into the HttpNfcLease (its SHA-256 checked against the `.mf` on the way), then
//! HttpNfcLeaseComplete and PowerOnVM_Task.
//!
//! Everything that can be refused without vCenter (the OVA, `--prop` keys) is, before
//! connecting; once the lease exists, any failure or Ctrl-C aborts it, and vCenter deletes
//! the half-imported VM (checked, and done here if it did not).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Args;
use futures::Stream;
use rehost_appliance::descriptor::Descriptor;
use rehost_appliance::ova::Ova;
use rehost_vsphere::import::UploadTarget;
use rehost_vsphere::placement::{Datacenter, Named};
use rehost_vsphere::{Client, ImportLease, ImportOptions, ImportSpecParams, MoRef, UploadMethod};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::config::Config;
use crate::output::{OutputMode, print_json};

/// `rehost appliance deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The vSphere source, as named in the config.
    #[arg(long)]
    pub source: String,
    /// The OVA to deploy.
    #[arg(long, value_name = "FILE")]
    pub ova: PathBuf,
    /// The new VM's name.
    #[arg(long)]
    pub name: String,
    /// The datastore (default: the one with the most free space the host sees).
    #[arg(long)]
    pub datastore: Option<String>,
    /// The network the appliance's NIC joins (default: the OVF's "VM Network").
    #[arg(long)]
    pub network: Option<String>,
    /// The host to place the VM on (default: the first cluster's or standalone host's
    /// root resource pool, where vCenter picks the host).
    #[arg(long)]
    pub host: Option<String>,
    /// An OVF property, KEY=VALUE (repeat): hostname, ip0, api_token…
    #[arg(long = "prop", value_name = "KEY=VALUE")]
    pub props: Vec<String>,
    /// Leave the VM powered off.
    #[arg(long)]
    pub no_power_on: bool,
    /// The config file (else $REHOST_CONFIG, else ./rehost.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputMode,
}

/// The privileges a deployment needs (vSphere's "Required Privileges" of ImportVApp and
/// PowerOnVM_Task, on the pool, folder, datastore and network).
const DEPLOY_PRIVILEGES: &[&str] = &[
    "VApp.Import",
    "Resource.AssignVMToPool",
    "Datastore.AllocateSpace",
    "Network.Assign",
    "VirtualMachine.Interact.PowerOn",
];

/// How much of a member is read (and hashed) per chunk, and in flight towards the upload:
/// a few MiB of memory whatever the disk's size.
const CHUNK_BYTES: usize = 1 << 20;
const CHUNKS_IN_FLIGHT: usize = 4;

/// How long vCenter may take to power the VM on.
const POWER_ON_TIMEOUT: Duration = Duration::from_secs(600);

/// What `deploy` refuses, with what the user needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("--prop {0:?} is not KEY=VALUE")]
    PropertySyntax(String),
    #[error("--prop {key} is given twice")]
    PropertyRepeated { key: String },
    #[error("the OVF has no property {key:?}; its properties are: {valid}")]
    UnknownProperty { key: String, valid: String },
    #[error("no datastore named {name:?}; there are: {available}")]
    NoSuchDatastore { name: String, available: String },
    #[error("no network named {name:?} in datacenter {datacenter}; there are: {available}")]
    NoSuchNetwork {
        name: String,
        datacenter: String,
        available: String,
    },
    #[error("no host named {name:?} in datacenter {datacenter}; there are: {available}")]
    NoSuchHost {
        name: String,
        datacenter: String,
        available: String,
    },
    #[error("{0}")]
    NoPlacement(String),
    #[error("the user lacks privileges the deployment needs: {0}")]
    MissingPrivileges(String),
    #[error("vCenter cannot import the OVF: {0}")]
    ImportSpec(String),
    #[error("the OVA has no member {0:?}, which the OVF references")]
    MissingMember(String),
    #[error(
        "{member} has SHA-256 {actual}, the OVA's manifest says {expected}: the OVA is corrupt"
    )]
    DigestMismatch {
        member: String,
        expected: String,
        actual: String,
    },
}

/// What `deploy` made.
#[derive(Debug, Serialize)]
pub struct DeployReport {
    pub name: String,
    pub moref: String,
    pub instance_uuid: String,
    pub power_state: String,
    pub datacenter: String,
    pub datastore: String,
    pub resource_pool: String,
    pub networks: Vec<NetworkMapping>,
    pub uploaded_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct NetworkMapping {
    pub ovf: String,
    pub network: String,
}

pub fn run(args: DeployArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let ova = Ova::open(&args.ova)?;
    if !ova.has_manifest() {
        eprintln!(
            "warning: {} has no manifest (.mf): its files cannot be checked",
            args.ova.display()
        );
    }
    let descriptor = Descriptor::parse(ova.descriptor())
        .with_context(|| format!("{} ({})", args.ova.display(), ova.descriptor_name()))?;
    let property_mapping = property_mapping(&args.props, &descriptor)?;
    let config = Config::locate(args.config.as_deref())?;
    let source = config.source(&args.source)?.clone();
    let runtime = crate::aws_args::runtime()?;
    let report = runtime.block_on(async {
        let client = crate::sources::connect_vsphere(&config, &source).await?;
        let result = deploy(&client, &args, &ova, &descriptor, property_mapping).await;
        // Sessions are a limited resource on vCenter.
        let _ = client.logout().await;
        result
    })?;
    let report = DeployReport {
        seconds: started.elapsed().as_secs_f64(),
        ..report
    };
    match args.output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => {
            println!(
                "deployed {} ({}, instance UUID {}): {}",
                report.name, report.moref, report.instance_uuid, report.power_state
            );
            println!(
                "  datacenter {}, datastore {}, pool {}; {:.1} MiB in {:.1} s",
                report.datacenter,
                report.datastore,
                report.resource_pool,
                report.uploaded_bytes as f64 / f64::from(1u32 << 20),
                report.seconds
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--prop KEY=VALUE` checked against the descriptor's ProductSection: each key once, and
/// known.
pub fn property_mapping(
    props: &[String],
    descriptor: &Descriptor,
) -> Result<Vec<(String, String)>, DeployError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for prop in props {
        let (key, value) = prop
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| DeployError::PropertySyntax(redacted(prop)))?;
        let key = key.trim();
        if descriptor.property(key).is_none() {
            let valid: Vec<&str> = descriptor
                .properties
                .iter()
                .map(|p| p.key.as_str())
                .collect();
            return Err(DeployError::UnknownProperty {
                key: key.to_owned(),
                valid: if valid.is_empty() {
                    "(none)".into()
                } else {
                    valid.join(", ")
                },
            });
        }
        if out.iter().any(|(k, _)| k == key) {
            return Err(DeployError::PropertyRepeated {
                key: key.to_owned(),
            });
        }
        out.push((key.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// A malformed `--prop` as shown in an error: without `=` there is no telling a key from
/// a value, and the value may be a secret, so only its length.
fn redacted(prop: &str) -> String {
    format!("<{} characters>", prop.chars().count())
}

/// Where the VM goes.
struct Placement {
    datacenter: Datacenter,
    pool: MoRef,
    pool_owner: String,
    host: Option<MoRef>,
    datastore: Named,
    networks: Vec<(String, Named)>,
}

async fn deploy(
    client: &Client,
    args: &DeployArgs,
    ova: &Ova,
    descriptor: &Descriptor,
    property_mapping: Vec<(String, String)>,
) -> Result<DeployReport> {
    match client.missing_privileges(DEPLOY_PRIVILEGES).await {
        Ok(missing) if !missing.is_empty() => {
            return Err(DeployError::MissingPrivileges(missing.join(", ")).into());
        }
        Ok(_) => {}
        // Reading one's own privileges may itself be refused; the calls will tell.
        Err(e) => warn!(error = %e, "could not check the deployment's privileges"),
    }
    let placement = place(client, args, descriptor).await?;
    let params = ImportSpecParams {
        entity_name: args.name.clone(),
        network_mapping: placement
            .networks
            .iter()
            .map(|(ovf, n)| (ovf.clone(), n.moref.clone()))
            .collect(),
        property_mapping,
        disk_provisioning: "thin".into(),
    };
    let spec = client
        .create_import_spec(
            ova.descriptor(),
            &placement.pool,
            &placement.datastore.moref,
            &params,
        )
        .await?;
    let quiet = args.output == OutputMode::Json;
    for warning in &spec.warnings {
        if !quiet {
            eprintln!("warning: vCenter: {warning}");
        }
        warn!(%warning, "CreateImportSpec warning");
    }
    if !spec.errors.is_empty() {
        return Err(DeployError::ImportSpec(spec.errors.join("; ")).into());
    }
    for item in &spec.file_items {
        if !ova.members().iter().any(|m| m.name == item.path) {
            return Err(DeployError::MissingMember(item.path.clone()).into());
        }
    }

    let lease = client
        .import_vapp(
            &placement.pool,
            &spec.spec,
            &placement.datacenter.vm_folder,
            placement.host.as_ref(),
            ImportOptions::default(),
        )
        .await?;
    let vm = lease.vm().clone();
    let outcome = tokio::select! {
        r = upload_all(&lease, ova, descriptor, &spec.file_items, quiet) => r,
        signal = crate::export::shutdown_signal() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    let uploaded_bytes = match outcome {
        Ok(bytes) => bytes,
        Err(e) => {
            let reason = format!("rehost appliance deploy failed: {e:#}");
            if let Err(abort) = lease.abort(&reason).await {
                warn!(error = %abort, "HttpNfcLeaseAbort failed");
            }
            remove_leftover(client, &vm).await;
            return Err(e);
        }
    };
    lease.complete().await?;
    if !args.no_power_on {
        if !quiet {
            eprintln!("powering {} on…", args.name);
        }
        client
            .power_on(&vm, POWER_ON_TIMEOUT)
            .await
            .with_context(|| format!("powering on {} ({})", args.name, vm.value))?;
    }
    let state = client.vm_state(&vm).await?;
    Ok(DeployReport {
        name: state.name,
        moref: vm.value,
        instance_uuid: state.instance_uuid,
        power_state: state.power_state,
        datacenter: placement.datacenter.name,
        datastore: placement.datastore.name,
        resource_pool: format!("{} ({})", placement.pool.value, placement.pool_owner),
        networks: placement
            .networks
            .into_iter()
            .map(|(ovf, n)| NetworkMapping {
                ovf,
                network: n.name,
            })
            .collect(),
        uploaded_bytes,
        seconds: 0.0,
    })
}

/// After an abort vCenter deletes the VM it was importing; if it is still there after a
/// while, it is destroyed here (it was never powered on and holds nothing).
async fn remove_leftover(client: &Client, vm: &MoRef) {
    for _ in 0..20 {
        match client.vm_exists(vm).await {
            Ok(false) => return,
            Ok(true) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(e) => {
                warn!(vm = %vm, error = %e, "could not check for the half-imported VM");
                return;
            }
        }
    }
    if let Err(e) = client.destroy_vm(vm, Duration::from_secs(300)).await {
        eprintln!(
            "warning: the half-imported VM {} is still there and could not be destroyed: {e}",
            vm.value
        );
    }
}

/// Datacenter, pool, datastore and networks from the arguments and the inventory.
async fn place(client: &Client, args: &DeployArgs, descriptor: &Descriptor) -> Result<Placement> {
    let datacenters = client.datacenters().await?;
    if datacenters.is_empty() {
        return Err(DeployError::NoPlacement("vCenter has no datacenter".into()).into());
    }
    // The datacenter is the one holding the datastore asked for, else the first with one.
    let mut chosen = None;
    let mut all_datastores = Vec::new();
    for dc in datacenters {
        let datastores = client.datastores(&dc.datastores).await?;
        let pick = match &args.datastore {
            Some(name) => datastores.iter().find(|d| &d.name == name).cloned(),
            None => datastores
                .iter()
                .filter(|d| d.accessible)
                .max_by_key(|d| d.free_bytes)
                .cloned(),
        };
        all_datastores.extend(datastores.into_iter().map(|d| d.name));
        if let Some(ds) = pick {
            chosen = Some((dc, ds));
            break;
        }
    }
    let Some((datacenter, datastore)) = chosen else {
        return Err(match &args.datastore {
            Some(name) => DeployError::NoSuchDatastore {
                name: name.clone(),
                available: list(&all_datastores),
            },
            None => DeployError::NoPlacement("no datacenter has an accessible datastore".into()),
        }
        .into());
    };

    let networks = client.names(&datacenter.networks).await?;
    let find_network = |name: &str| {
        networks
            .iter()
            .find(|n| n.name == name)
            .cloned()
            .ok_or_else(|| DeployError::NoSuchNetwork {
                name: name.to_owned(),
                datacenter: datacenter.name.clone(),
                available: list(&names_of(&networks)),
            })
    };
    let mapping = match &args.network {
        Some(name) => {
            let network = find_network(name)?;
            descriptor
                .networks
                .iter()
                .map(|ovf| (ovf.clone(), network.clone()))
                .collect()
        }
        None => descriptor
            .networks
            .iter()
            .map(|ovf| Ok((ovf.clone(), find_network(ovf)?)))
            .collect::<Result<Vec<_>, DeployError>>()?,
    };

    let computes = client.compute_resources(&datacenter.host_folder).await?;
    let (pool, pool_owner, host) = match &args.host {
        Some(name) => {
            let found = computes.iter().find_map(|c| {
                c.hosts.iter().find(|h| &h.name == name).map(|h| {
                    (
                        c.resource_pool.clone(),
                        c.name.clone(),
                        Some(h.moref.clone()),
                    )
                })
            });
            found.ok_or_else(|| DeployError::NoSuchHost {
                name: name.clone(),
                datacenter: datacenter.name.clone(),
                available: list(
                    &computes
                        .iter()
                        .flat_map(|c| c.hosts.iter().map(|h| h.name.clone()))
                        .collect::<Vec<_>>(),
                ),
            })?
        }
        None => {
            let first = computes.first().ok_or_else(|| {
                DeployError::NoPlacement(format!(
                    "datacenter {} has no cluster or host",
                    datacenter.name
                ))
            })?;
            (first.resource_pool.clone(), first.name.clone(), None)
        }
    };
    Ok(Placement {
        datastore: Named {
            moref: datastore.moref,
            name: datastore.name,
        },
        datacenter,
        pool,
        pool_owner,
        host,
        networks: mapping,
    })
}

fn names_of(named: &[Named]) -> Vec<String> {
    named.iter().map(|n| n.name.clone()).collect()
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".into()
    } else {
        names.join(", ")
    }
}

/// Uploads every file item from the OVA, reporting progress; answers the bytes sent.
async fn upload_all(
    lease: &ImportLease,
    ova: &Ova,
    descriptor: &Descriptor,
    items: &[rehost_vsphere::import::FileItem],
    quiet: bool,
) -> Result<u64> {
    let targets = lease.targets(items)?;
    // vCenter's fileItem size is the descriptor's; the member's own is what is sent.
    let mut sized = Vec::new();
    for target in targets {
        let member = ova
            .members()
            .iter()
            .find(|m| m.name == target.path)
            .ok_or_else(|| DeployError::MissingMember(target.path.clone()))?;
        sized.push(UploadTarget {
            size_bytes: member.size,
            ..target
        });
    }
    let total: u64 = sized.iter().map(|t| t.size_bytes).sum();
    let sent = Arc::new(AtomicU64::new(0));
    let bar = crate::progress::bytes_bar(total, "uploading", quiet);
    for target in &sized {
        let method =
            UploadMethod::for_item(target.create, descriptor.is_stream_optimized(&target.path));
        let expected = ova.expected_sha256(&target.path).map(str::to_owned);
        let (_, reader) = ova.open_member(&target.path)?;
        let (body, hashing) = hashed_stream(reader, target.path.clone(), expected, sent.clone());
        let upload = async {
            let (uploaded, hashed) = tokio::join!(lease.upload(target, method, body), hashing);
            // A digest mismatch breaks the body on purpose: it is the cause to report.
            hashed.context("the OVA reader stopped")??;
            uploaded?;
            Ok::<(), anyhow::Error>(())
        };
        tokio::pin!(upload);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                r = &mut upload => { r?; break; }
                _ = tick.tick() => {
                    let done = sent.load(Ordering::Relaxed);
                    bar.set_position(done);
                    lease.set_progress(percent(done, total));
                }
            }
        }
    }
    bar.finish_and_clear();
    Ok(total)
}

fn percent(done: u64, total: u64) -> u8 {
    if total == 0 {
        return 100;
    }
    u8::try_from((u128::from(done) * 100 / u128::from(total)).min(100)).unwrap_or(100)
}

/// The member's bytes as an upload body, read and hashed on a blocking thread. The last
/// chunk is held back until the digest is known: a corrupt member never reaches the server
/// whole (the body ends in an error instead), and the reader answers the mismatch.
fn hashed_stream(
    mut reader: impl std::io::Read + Send + 'static,
    member: String,
    expected: Option<String>,
    sent: Arc<AtomicU64>,
) -> (
    impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    tokio::task::JoinHandle<Result<(), DeployError>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    let worker = tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        let mut pending: Option<Bytes> = None;
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let n = match reader.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return Ok(());
                }
            };
            if n == 0 {
                break;
            }
            buf.truncate(n);
            hasher.update(&buf);
            if let Some(chunk) = pending.replace(Bytes::from(buf)) {
                let len = chunk.len() as u64;
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return Ok(()); // the upload ended; it reports why
                }
                sent.fetch_add(len, Ordering::Relaxed);
            }
        }
        let actual = hex::encode(hasher.finalize());
        if let Some(expected) = expected {
            if actual != expected {
                let _ = tx.blocking_send(Err(std::io::Error::other(format!(
                    "{member}: SHA-256 mismatch"
                ))));
                return Err(DeployError::DigestMismatch {
                    member,
                    expected,
                    actual,
                });
            }
        }
        if let Some(chunk) = pending {
            let len = chunk.len() as u64;
            if tx.blocking_send(Ok(chunk)).is_ok() {
                sent.fetch_add(len, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (body, worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESCRIPTOR: &str = r#"<Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><VirtualSystem><ProductSection><Property ovf:key="hostname" ovf:type="string"/><Property ovf:key="api_token" ovf:type="string" ovf:password="true"/></ProductSection></VirtualSystem></Envelope>"#;

    fn mapping(props: &[&str]) -> Result<Vec<(String, String)>, DeployError> {
        let descriptor = Descriptor::parse(DESCRIPTOR).unwrap();
        let props: Vec<String> = props.iter().map(|p| (*p).to_owned()).collect();
        property_mapping(&props, &descriptor)
    }

    #[test]
    fn properties_are_key_value_and_known() {
        assert_eq!(
            mapping(&["hostname=a=b", "api_token="]).unwrap(),
            [
                ("hostname".to_owned(), "a=b".to_owned()),
                ("api_token".to_owned(), String::new())
            ]
        );
        let err = mapping(&["colour=red"]).unwrap_err().to_string();
        assert!(
            err.contains("\"colour\"") && err.contains("hostname, api_token"),
            "{err}"
        );
        assert!(matches!(
            mapping(&["hostname=a", "hostname=b"]),
            Err(DeployError::PropertyRepeated { .. })
        ));
        // A malformed one is not echoed: it may be a secret typed without its key.
        let err = mapping(&["s3cr3t-token"]).unwrap_err().to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
        assert!(mapping(&["=x"]).is_err());
    }

    #[test]
    fn percent_is_bounded() {
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(5, 3), 100);
    }

    async fn collect(
        data: Vec<u8>,
        expected: Option<String>,
    ) -> (Vec<std::io::Result<Bytes>>, Result<(), DeployError>, u64) {
        use futures::StreamExt;
        let sent = Arc::new(AtomicU64::new(0));
        let (body, worker) = hashed_stream(
            std::io::Cursor::new(data),
            "m.vmdk".into(),
            expected,
            sent.clone(),
        );
        let items: Vec<_> = body.collect().await;
        (items, worker.await.unwrap(), sent.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn a_member_is_streamed_whole_when_its_digest_matches() {
        let data: Vec<u8> = (0..(CHUNK_BYTES * 2 + 10))
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let digest = hex::encode(Sha256::digest(&data));
        let (items, result, sent) = collect(data.clone(), Some(digest)).await;
        result.unwrap();
        let joined: Vec<u8> = items
            .into_iter()
            .flat_map(|i| i.unwrap().to_vec())
            .collect();
        assert!(joined == data);
        assert_eq!(sent, data.len() as u64);
    }

    #[tokio::test]
    async fn a_mismatch_withholds_the_last_chunk_and_names_the_member() {
        let data = vec![7u8; CHUNK_BYTES + 5];
        let (items, result, sent) = collect(data, Some("00".repeat(32))).await;
        let err = result.unwrap_err().to_string();
        assert!(err.contains("m.vmdk") && err.contains("corrupt"), "{err}");
        assert!(items.last().unwrap().is_err());
        assert_eq!(sent, CHUNK_BYTES as u64);
    }
}
