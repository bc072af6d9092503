//! Importing an OVF: OvfManager.CreateImportSpec, ResourcePool.ImportVApp and the
//! HttpNfcLease that takes the files (`govc import.ova` does the same).
//!
//! The import spec is kept as the parsed reply tree and written back verbatim
//! ([`crate::soap::write`]); the lease's URLs are matched to the spec's file items by
//! `importKey` = `deviceId` ([`match_uploads`], pure).

use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use reqwest::Url;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, COOKIE};
use tracing::debug;

use crate::client::{Client, protocol, returnval, snippet, transport};
use crate::error::{Error, Result};
use crate::nfc::{LeaseKeeper, absolute_url};
use crate::soap::model::{HttpNfcLeaseInfo, LeaseDeviceUrl};
use crate::soap::{MoRef, Node, Request, escape, write};

/// The Content-Type of a streamOptimized VMDK POSTed to an import lease (govc's, ovftool's).
pub const STREAM_VMDK_CONTENT_TYPE: &str = "application/x-vnd.vmware-streamVmdk";

/// What CreateImportSpec is asked for (`OvfCreateImportSpecParams`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ImportSpecParams {
    /// The new VM's name.
    pub entity_name: String,
    /// `(OVF network name, vSphere network)`.
    pub network_mapping: Vec<(String, MoRef)>,
    /// `(OVF property key, value)`; values may be secrets and are never logged.
    pub property_mapping: Vec<(String, String)>,
    /// `thin`, `thick`, `eagerZeroedThick`, … (empty: the server's default).
    pub disk_provisioning: String,
}

impl std::fmt::Debug for ImportSpecParams {
    /// Property values may be passwords: only their keys are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportSpecParams")
            .field("entity_name", &self.entity_name)
            .field("network_mapping", &self.network_mapping)
            .field(
                "property_keys",
                &self
                    .property_mapping
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("disk_provisioning", &self.disk_provisioning)
            .finish()
    }
}

/// A file the import takes (`OvfFileItem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileItem {
    /// Which device it becomes (`/NAME/disk:0`): a lease URL's `importKey`.
    pub device_id: String,
    /// The file's name in the OVF References (the OVA member).
    pub path: String,
    /// Its size as the descriptor gives it.
    pub size_bytes: u64,
    /// True when the file is created as is (an ISO): uploaded with PUT, not as a stream.
    pub create: bool,
}

/// CreateImportSpec's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSpec {
    /// The `importSpec`, to send back as ImportVApp's `spec`.
    pub spec: Node,
    /// The files to upload.
    pub file_items: Vec<FileItem>,
    /// Warnings (localized messages).
    pub warnings: Vec<String>,
    /// Errors: the import cannot go ahead when there is one.
    pub errors: Vec<String>,
}

/// Timing of an import lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportOptions {
    /// How often the lease is told of progress (vCenter cancels it after 5 minutes without).
    pub keepalive_interval: Duration,
    /// How long the lease may take to become ready (vCenter creates the VM and its disks).
    pub ready_timeout: Duration,
    /// How long one file's upload may take.
    pub upload_timeout: Duration,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            keepalive_interval: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(600),
            // A 100 GiB disk at 20 MiB/s takes under 1.5 h; a stalled transfer still ends
            // by the lease's own timeout once progress stops being reported.
            upload_timeout: Duration::from_secs(6 * 3600),
        }
    }
}

/// Where one file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadTarget {
    /// The OVF file (OVA member) name.
    pub path: String,
    /// The device it becomes.
    pub device_id: String,
    /// The URL, with a `*` host replaced by the vCenter's.
    pub url: Url,
    /// Bytes to send.
    pub size_bytes: u64,
    /// Whether the file is created as is (PUT) rather than streamed as a disk (POST).
    pub create: bool,
}

/// How a file is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadMethod {
    /// POST with Content-Type [`STREAM_VMDK_CONTENT_TYPE`]: a streamOptimized disk.
    StreamVmdk,
    /// PUT with `Overwrite: t`: any other file (ISO, NVRAM, a flat disk).
    Put,
}

impl UploadMethod {
    /// govc's choice: a file item the server creates as is is PUT; a disk in the
    /// streamOptimized format is POSTed as a stream; anything else is PUT.
    pub fn for_item(create: bool, stream_optimized: bool) -> UploadMethod {
        if !create && stream_optimized {
            UploadMethod::StreamVmdk
        } else {
            UploadMethod::Put
        }
    }
}

/// A ready import lease: upload each target, then [`ImportLease::complete`] or
/// [`ImportLease::abort`]; dropped without either, it is aborted in the background.
#[derive(Debug)]
pub struct ImportLease {
    keeper: LeaseKeeper,
    info: HttpNfcLeaseInfo,
    vm: MoRef,
    upload_timeout: Duration,
}

impl Client {
    /// A managed object of the service content (`ovfManager`, `authorizationManager`, …)
    /// that the connect-time model does not keep.
    pub(crate) async fn service_content_ref(&self, field: &str) -> Result<MoRef> {
        let method = "RetrieveServiceContent";
        let req = Request::new(method, &MoRef::new("ServiceInstance", "ServiceInstance"));
        let response = self.call(&req).await?;
        let content = returnval(&response, method)?;
        let node = content
            .child(field)
            .ok_or_else(|| protocol(method, format!("the service content has no {field}")))?;
        MoRef::from_node(node).map_err(|e| protocol(method, e))
    }

    /// OvfManager.CreateImportSpec of `descriptor` for `pool` and `datastore`.
    pub async fn create_import_spec(
        &self,
        descriptor: &str,
        pool: &MoRef,
        datastore: &MoRef,
        params: &ImportSpecParams,
    ) -> Result<ImportSpec> {
        let method = "CreateImportSpec";
        let manager = self.service_content_ref("ovfManager").await?;
        let mut req = Request::new(method, &manager);
        req.text("ovfDescriptor", descriptor)
            .moref("resourcePool", pool)
            .moref("datastore", datastore)
            .raw(&cisp_xml(params));
        let response = self.call(&req).await?;
        parse_import_spec(returnval(&response, method)?).map_err(|e| protocol(method, e))
    }

    /// ResourcePool.ImportVApp of `spec` into `folder` (on `host` if given); waits until
    /// the lease is ready and keeps it alive from then on.
    pub async fn import_vapp(
        &self,
        pool: &MoRef,
        spec: &Node,
        folder: &MoRef,
        host: Option<&MoRef>,
        options: ImportOptions,
    ) -> Result<ImportLease> {
        let method = "ImportVApp";
        let mut req = Request::new(method, pool);
        req.raw(&write::to_xml("spec", spec))
            .moref("folder", folder);
        if let Some(host) = host {
            req.moref("host", host);
        }
        let lease = self.call_moref(&req).await?;
        let entity = spec
            .path(&["configSpec", "name"])
            .map(|n| n.text.clone())
            .unwrap_or_else(|| lease.value.clone());
        // From here on the lease exists: an error aborts it (the keeper's drop does once it
        // is made; before that, explicitly).
        let info = match self
            .wait_for_lease(&lease, method, &entity, options.ready_timeout)
            .await
        {
            Ok(info) => info,
            Err(e) => {
                let _ = self.call(&Request::new("HttpNfcLeaseAbort", &lease)).await;
                return Err(e);
            }
        };
        let keeper = LeaseKeeper::start(self, lease, options.keepalive_interval);
        let vm = info.entity.clone().ok_or_else(|| Error::Protocol {
            method: method.into(),
            detail: "the lease's info has no entity".into(),
        })?;
        Ok(ImportLease {
            keeper,
            info,
            vm,
            upload_timeout: options.upload_timeout,
        })
    }
}

impl ImportLease {
    /// The lease's managed object.
    pub fn moref(&self) -> &MoRef {
        self.keeper.moref()
    }

    /// The VM being imported.
    pub fn vm(&self) -> &MoRef {
        &self.vm
    }

    /// Where each file item goes.
    pub fn targets(&self, items: &[FileItem]) -> Result<Vec<UploadTarget>> {
        match_uploads(self.keeper.client().url(), &self.info.device_urls, items)
    }

    /// The percentage the next keep-alive reports.
    pub fn set_progress(&self, percent: u8) {
        self.keeper.set_progress(percent);
    }

    /// Sends one file, streamed from `body` (which must yield exactly `size_bytes`).
    pub async fn upload<S>(
        &self,
        target: &UploadTarget,
        method: UploadMethod,
        body: S,
    ) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let client = self.keeper.client();
        let url = &target.url;
        let mut req = match method {
            UploadMethod::StreamVmdk => client
                .http()
                .post(url.clone())
                .header(CONTENT_TYPE, STREAM_VMDK_CONTENT_TYPE),
            UploadMethod::Put => client
                .http()
                .put(url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header("Overwrite", "t"),
        };
        if let Some(cookie) = client.cookie() {
            req = req.header(COOKIE, cookie);
        }
        let response = req
            .header(CONTENT_LENGTH, target.size_bytes)
            .timeout(self.upload_timeout)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(|e| transport(url, url.as_str(), e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(Error::Http {
                what: format!("upload of {} to {url}", target.path),
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        debug!(file = %target.path, url = %url, "uploaded");
        Ok(())
    }

    /// Ends the import: the VM is kept.
    pub async fn complete(self) -> Result<()> {
        self.keeper.complete().await
    }

    /// Ends the import as failed, telling the server why; vCenter then deletes the VM.
    pub async fn abort(self, reason: &str) -> Result<()> {
        self.keeper.abort(Some(reason)).await
    }
}

/// `<cisp>…</cisp>` in the WSDL's element order (OvfManagerCommonParams first; `locale`
/// and `deploymentOption` are required, empty meaning the server's and the OVF's default).
fn cisp_xml(params: &ImportSpecParams) -> String {
    let mut xml = format!(
        "<cisp><locale></locale><deploymentOption></deploymentOption><entityName>{}</entityName>",
        escape(&params.entity_name)
    );
    for (name, network) in &params.network_mapping {
        xml.push_str(&format!(
            "<networkMapping><name>{}</name><network type=\"{}\">{}</network></networkMapping>",
            escape(name),
            escape(&network.kind),
            escape(&network.value)
        ));
    }
    for (key, value) in &params.property_mapping {
        xml.push_str(&format!(
            "<propertyMapping><key>{}</key><value>{}</value></propertyMapping>",
            escape(key),
            escape(value)
        ));
    }
    if !params.disk_provisioning.is_empty() {
        xml.push_str(&format!(
            "<diskProvisioning>{}</diskProvisioning>",
            escape(&params.disk_provisioning)
        ));
    }
    xml.push_str("</cisp>");
    xml
}

/// Reads an `OvfCreateImportSpecResult`.
fn parse_import_spec(rv: &Node) -> std::result::Result<ImportSpec, String> {
    let message = |fault: &Node| {
        fault
            .child_text("localizedMessage")
            .filter(|m| !m.trim().is_empty())
            .map(|m| m.trim().to_owned())
            .or_else(|| fault.child("fault").and_then(|f| f.xsi_type.clone()))
            .unwrap_or_else(|| "(no message)".into())
    };
    let errors: Vec<String> = rv.children_named("error").map(message).collect();
    let warnings = rv.children_named("warning").map(message).collect();
    let spec = match rv.child("importSpec") {
        Some(spec) => spec.clone(),
        // Without errors an answer must carry the spec; with them it may not.
        None if !errors.is_empty() => Node::default(),
        None => return Err("OvfCreateImportSpecResult.importSpec missing".into()),
    };
    let file_items = rv
        .children_named("fileItem")
        .map(|f| {
            let text = |name: &str| {
                f.child_text(name)
                    .map(|t| t.trim().to_owned())
                    .ok_or_else(|| format!("OvfFileItem.{name} missing"))
            };
            let size = text("size")?;
            Ok(FileItem {
                device_id: text("deviceId")?,
                path: text("path")?,
                size_bytes: size
                    .parse()
                    .map_err(|_| format!("OvfFileItem.size is not a number: {size:?}"))?,
                create: f.child_text("create").map(str::trim) == Some("true"),
            })
        })
        .collect::<std::result::Result<_, String>>()?;
    Ok(ImportSpec {
        spec,
        file_items,
        warnings,
        errors,
    })
}

/// Pairs each file item with the lease URL whose `importKey` is its `deviceId`; a `*`
/// host becomes the vCenter's (`sdk`). Every item must have a URL.
pub fn match_uploads(
    sdk: &Url,
    device_urls: &[LeaseDeviceUrl],
    items: &[FileItem],
) -> Result<Vec<UploadTarget>> {
    items
        .iter()
        .map(|item| {
            let device = device_urls
                .iter()
                .find(|d| d.import_key.as_deref() == Some(item.device_id.as_str()))
                .ok_or_else(|| Error::Protocol {
                    method: "ImportVApp".into(),
                    detail: format!(
                        "the lease has no URL for {} ({}); its importKeys are {:?}",
                        item.path,
                        item.device_id,
                        device_urls
                            .iter()
                            .filter_map(|d| d.import_key.as_deref())
                            .collect::<Vec<_>>()
                    ),
                })?;
            Ok(UploadTarget {
                path: item.path.clone(),
                device_id: item.device_id.clone(),
                url: absolute_url(sdk, &device.url)?,
                size_bytes: item.size_bytes,
                create: item.create,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soap::{Reply, parse_reply};

    const CAPTURED: &[u8] = include_bytes!("soap/testdata/create_import_spec.vcsim.xml");

    #[test]
    fn the_captured_answer_gives_spec_and_file_items() {
        let Reply::Response(response) = parse_reply(CAPTURED).unwrap() else {
            panic!("fault")
        };
        let spec = parse_import_spec(response.child("returnval").unwrap()).unwrap();
        assert_eq!(
            spec.spec.xsi_type.as_deref(),
            Some("VirtualMachineImportSpec")
        );
        assert_eq!(
            spec.file_items,
            [FileItem {
                device_id: "/app1/disk:0".into(),
                path: "d.vmdk".into(),
                size_bytes: 12345,
                create: false,
            }]
        );
        assert!(spec.errors.is_empty() && spec.warnings.is_empty());
    }

    #[test]
    fn errors_and_warnings_are_read() {
        let doc = br#"<r xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><error><fault xsi:type="OvfUnsupportedType"/><localizedMessage>unsupported: 99</localizedMessage></error><warning><fault xsi:type="OvfUnknownEntity"/><localizedMessage></localizedMessage></warning></r>"#;
        let spec = parse_import_spec(&crate::soap::xml::parse(doc).unwrap()).unwrap();
        assert_eq!(spec.errors, ["unsupported: 99"]);
        assert_eq!(spec.warnings, ["OvfUnknownEntity"]);
    }

    #[test]
    fn cisp_is_in_wsdl_order_and_escaped() {
        let xml = cisp_xml(&ImportSpecParams {
            entity_name: "a&b".into(),
            network_mapping: vec![("VM Network".into(), MoRef::new("Network", "network-7"))],
            property_mapping: vec![("hostname".into(), "<h>".into())],
            disk_provisioning: "thin".into(),
        });
        assert_eq!(
            xml,
            "<cisp><locale></locale><deploymentOption></deploymentOption><entityName>a&amp;b</entityName>\
             <networkMapping><name>VM Network</name><network type=\"Network\">network-7</network></networkMapping>\
             <propertyMapping><key>hostname</key><value>&lt;h&gt;</value></propertyMapping>\
             <diskProvisioning>thin</diskProvisioning></cisp>"
        );
    }

    fn device(import_key: &str, url: &str) -> LeaseDeviceUrl {
        LeaseDeviceUrl {
            key: format!("/vm-9/{import_key}"),
            import_key: Some(import_key.into()),
            url: url.into(),
            disk: true,
            target_id: None,
        }
    }

    #[test]
    fn device_urls_are_matched_by_import_key_with_the_star_host_replaced() {
        let sdk = Url::parse("https://vc.example.com:8443/sdk").unwrap();
        let urls = [
            device("/app/disk:1", "https://*/nfc/52/disk-1.vmdk"),
            device("/app/disk:0", "https://esx1.example.com/nfc/52/disk-0.vmdk"),
        ];
        let item = |id: &str, path: &str| FileItem {
            device_id: id.into(),
            path: path.into(),
            size_bytes: 7,
            create: false,
        };
        let targets = match_uploads(
            &sdk,
            &urls,
            &[item("/app/disk:0", "a.vmdk"), item("/app/disk:1", "b.vmdk")],
        )
        .unwrap();
        assert_eq!(
            targets[0].url.as_str(),
            "https://esx1.example.com/nfc/52/disk-0.vmdk"
        );
        assert_eq!(targets[1].path, "b.vmdk");
        assert_eq!(
            targets[1].url.as_str(),
            "https://vc.example.com:8443/nfc/52/disk-1.vmdk"
        );
        let err = match_uploads(&sdk, &urls, &[item("/app/disk:2", "c.vmdk")]).unwrap_err();
        assert!(err.to_string().contains("c.vmdk"), "{err}");
    }

    #[test]
    fn property_values_are_not_in_debug_output() {
        let params = ImportSpecParams {
            property_mapping: vec![("api_token".into(), "hunter2hunter2".into())],
            ..ImportSpecParams::default()
        };
        let text = format!("{params:?}");
        assert!(
            text.contains("api_token") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn streamed_disks_are_posted_and_others_put() {
        assert_eq!(
            UploadMethod::for_item(false, true),
            UploadMethod::StreamVmdk
        );
        assert_eq!(UploadMethod::for_item(true, true), UploadMethod::Put);
        assert_eq!(UploadMethod::for_item(false, false), UploadMethod::Put);
    }
}
