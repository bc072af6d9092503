//! The committed OpenAPI document (`connector/openapi.json`) against the code: the same
//! routes as the router, and the real serde types' JSON fitting its schemas, so the
//! document cannot drift from what the API does.
//!
//! The check is a small hand-written one over the subset of JSON Schema the document
//! uses (type, required, properties, additionalProperties, items, enum, $ref, date-time).

use serde_json::{Value, json};

use super::errors::ApiError;
use super::requests::*;
use super::responses::{self, samples, *};
use super::routes::routes;
use crate::jobs::model::{JobId, LicenseType, RunId, ServerId, Timestamp};

const DOCUMENT: &str = include_str!("../../openapi.json");

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let found = &doc["components"]["schemas"][name];
    assert!(found.is_object(), "no schema {name}");
    found
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unsupported $ref {reference}"));
            resolve(doc, self::schema(doc, name))
        }
        None => schema,
    }
}

/// Checks `value` against `schema`; with `exhaustive`, every property the schema
/// declares must also be present (samples with every optional field set prove that the
/// document lists no field the type lacks).
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, exhaustive: bool) -> Vec<String> {
    let schema = resolve(doc, schema);
    let mut problems = Vec::new();
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    let kind = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let fits = match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "boolean" => value.is_boolean(),
        other => {
            problems.push(format!(
                "{at}: schema type {other:?} unsupported by this check"
            ));
            return problems;
        }
    };
    if !fits {
        problems.push(format!("{at}: {value} is not a {kind}"));
        return problems;
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time")
        && let Some(text) = value.as_str()
        && Timestamp::parse(text).is_err()
    {
        problems.push(format!("{at}: {text:?} is not a date-time"));
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_i64),
        value.as_i64(),
    ) && n < min
    {
        problems.push(format!("{at}: {n} < minimum {min}"));
    }
    if let (Some(max), Some(n)) = (
        schema.get("maximum").and_then(Value::as_i64),
        value.as_i64(),
    ) && n > max
    {
        problems.push(format!("{at}: {n} > maximum {max}"));
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            problems.extend(check(
                doc,
                &schema["items"],
                item,
                &format!("{at}[{i}]"),
                exhaustive,
            ));
        }
    }
    if let Some(object) = value.as_object() {
        let empty = serde_json::Map::new();
        let properties = schema["properties"].as_object().unwrap_or(&empty);
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                problems.push(format!("{at}: required {name} is missing"));
            }
        }
        for (name, field) in object {
            match properties.get(name) {
                Some(field_schema) => {
                    problems.extend(check(
                        doc,
                        field_schema,
                        field,
                        &format!("{at}.{name}"),
                        exhaustive,
                    ));
                }
                None => problems.push(format!("{at}: {name} is not in the document")),
            }
        }
        if exhaustive {
            for name in properties.keys() {
                if !object.contains_key(name) {
                    problems.push(format!(
                        "{at}: the document's {name} is not in the full sample"
                    ));
                }
            }
        }
    }
    problems
}

fn assert_fits(doc: &Value, schema_name: &str, value: &Value, exhaustive: bool) {
    let problems = check(
        doc,
        &json!({"$ref": format!("#/components/schemas/{schema_name}")}),
        value,
        schema_name,
        exhaustive,
    );
    assert!(
        problems.is_empty(),
        "{schema_name}:\n{}\n{value:#}",
        problems.join("\n")
    );
}

#[test]
fn the_document_lists_exactly_the_routers_routes() {
    let doc = document();
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.0")),
        Some(true)
    );
    let mut in_document: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(|method| (method.to_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut in_router: Vec<(String, String)> = routes()
        .into_iter()
        .map(|r| (r.method.to_owned(), r.path))
        .collect();
    in_document.sort();
    in_router.sort();
    assert_eq!(in_document, in_router);
    // And the token is required exactly where the router requires it.
    for route in routes() {
        let operation = &doc["paths"][&route.path][route.method.to_lowercase()];
        let open = operation.get("security") == Some(&json!([]));
        assert_eq!(open, !route.authenticated, "{}", route.path);
    }
}

#[test]
fn each_operation_names_its_request_and_response_schemas() {
    let doc = document();
    for op in Operation::ALL {
        let post = &doc["paths"][op.path()]["post"];
        let request = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(
            request,
            format!("#/components/schemas/{}Request", op.name())
        );
        for status in ["200", "400", "401", "415", "500"] {
            assert!(
                post["responses"][status].is_object(),
                "{} {status}",
                op.name()
            );
        }
    }
}

/// One request of each operation with every optional field set.
fn full_requests() -> Vec<ApiRequest> {
    let job = JobId("sms-job-0123456789abcdef0".into());
    let time = Timestamp(1_796_000_000);
    vec![
        ApiRequest::GetConnectors(GetConnectorsRequest {
            next_token: Some("0".into()),
            max_results: Some(10),
        }),
        ApiRequest::ImportServerCatalog(ImportServerCatalogRequest {}),
        ApiRequest::GetServers(GetServersRequest {
            next_token: Some("50".into()),
            max_results: Some(50),
        }),
        ApiRequest::CreateReplicationJob(CreateReplicationJobRequest {
            server_id: "s-0123456789abcdef0".into(),
            seed_replication_time: time,
            frequency: Some(12),
            run_once: false,
            license_type: Some(LicenseType::Byol),
            number_of_recent_amis_to_keep: Some(3),
            encrypted: true,
            kms_key_id: Some("alias/rehost".into()),
            description: Some("web".into()),
        }),
        ApiRequest::GetReplicationJobs(GetReplicationJobsRequest {
            replication_job_id: Some(job.clone()),
            next_token: Some("0".into()),
            max_results: Some(1),
        }),
        ApiRequest::UpdateReplicationJob(UpdateReplicationJobRequest {
            replication_job_id: job.clone(),
            next_replication_run_start_time: Some(time),
            frequency: Some(24),
            license_type: Some(LicenseType::Aws),
            number_of_recent_amis_to_keep: Some(0),
            encrypted: Some(true),
            kms_key_id: Some("alias/rehost".into()),
            description: Some("db".into()),
        }),
        ApiRequest::DeleteReplicationJob(DeleteReplicationJobRequest {
            replication_job_id: job.clone(),
            keep_amis: true,
        }),
        ApiRequest::StartOnDemandReplicationRun(StartOnDemandReplicationRunRequest {
            replication_job_id: job.clone(),
            description: Some("before the upgrade".into()),
        }),
        ApiRequest::GetReplicationRuns(GetReplicationRunsRequest {
            replication_job_id: job.clone(),
            next_token: Some("0".into()),
            max_results: Some(5),
        }),
        ApiRequest::ResumeReplicationJob(ResumeReplicationJobRequest {
            replication_job_id: job,
        }),
    ]
}

#[test]
fn full_requests_fit_their_schemas() {
    let doc = document();
    let mut seen = std::collections::HashSet::new();
    for request in full_requests() {
        let op = request.operation();
        seen.insert(op);
        let body = request.body().unwrap();
        assert_fits(&doc, &format!("{}Request", op.name()), &body, true);
        // What the document calls a valid body, the parser takes.
        parse_request(op, &serde_json::to_vec(&body).unwrap()).unwrap();
    }
    assert_eq!(seen.len(), Operation::ALL.len(), "a sample per operation");
}

#[test]
fn fields_the_document_requires_are_exactly_those_the_parser_requires() {
    let doc = document();
    for request in full_requests() {
        let op = request.operation();
        let name = format!("{}Request", op.name());
        let required: Vec<&str> = schema(&doc, &name)["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let full = request.body().unwrap();
        for field in full.as_object().unwrap().keys() {
            let mut body = full.clone();
            body.as_object_mut().unwrap().remove(field);
            let parsed = parse_request(op, &serde_json::to_vec(&body).unwrap());
            if required.contains(&field.as_str()) {
                let err = parsed.unwrap_err();
                assert_eq!(
                    err.code,
                    super::errors::MISSING_PARAMETER,
                    "{name}.{field}: {err}"
                );
                assert!(
                    err.message.contains(field.as_str()),
                    "{name}.{field}: {err}"
                );
            } else {
                parsed.unwrap_or_else(|e| panic!("{name} without optional {field}: {e}"));
            }
        }
    }
}

#[test]
fn responses_fit_their_schemas() {
    let doc = document();
    let job = samples::job();
    let run = samples::run();
    let server = crate::store::Server {
        server_id: ServerId("s-0123456789abcdef0".into()),
        source: "vc1".into(),
        info: rehost_core::VmInfo {
            id: rehost_core::VmId::from("4207d0a4-0000-0000-0000-000000000001"),
            name: "web01".into(),
            path: "/DC0/vm/web01".into(),
            source_ref: "vm-42".into(),
            power_state: rehost_core::PowerState::PoweredOn,
            guest_os: "Ubuntu Linux (64-bit)".into(),
            cpus: 2,
            memory_mib: 4096,
            firmware: rehost_core::Firmware::Efi,
            change_tracking: true,
            disks: vec![],
        },
        unsupported: vec![],
        catalogued_at: "2026-11-30T00:00:00Z".into(),
    };
    let replication_job = replication_job(&job, Some(&server), std::slice::from_ref(&run));
    let replication_run = replication_run(&run, &job);
    let manager = VmManager {
        vm_manager_name: "vc1".into(),
        vm_manager_type: VM_MANAGER_TYPE.into(),
        vm_manager_id: "vc1".into(),
    };
    let samples: Vec<(&str, Value)> = vec![
        (
            "GetConnectorsResponse",
            serde_json::to_value(GetConnectorsResponse {
                connector_list: vec![Connector {
                    connector_id: "c-0123456789abcdef0".into(),
                    version: "0.1.0".into(),
                    status: "HEALTHY".into(),
                    capability_list: vec![VM_MANAGER_TYPE.into()],
                    vm_manager_name: Some("vc1".into()),
                    vm_manager_type: Some(VM_MANAGER_TYPE.into()),
                    vm_manager_id: Some("vc1".into()),
                    vm_manager_list: vec![manager],
                    ip_address: Some("127.0.0.1".into()),
                    associated_on: Timestamp(1_796_000_000),
                }],
                next_token: Some("1".into()),
            })
            .unwrap(),
        ),
        (
            "GetServersResponse",
            serde_json::to_value(GetServersResponse {
                server_catalog_status: "AVAILABLE".into(),
                server_list: vec![responses::server(&server, Some(&job))],
                next_token: Some("50".into()),
            })
            .unwrap(),
        ),
        (
            "CreateReplicationJobResponse",
            serde_json::to_value(CreateReplicationJobResponse {
                replication_job_id: job.id.clone(),
            })
            .unwrap(),
        ),
        (
            "StartOnDemandReplicationRunResponse",
            serde_json::to_value(StartOnDemandReplicationRunResponse {
                replication_run_id: RunId("sms-run-0123456789abcdef0".into()),
            })
            .unwrap(),
        ),
        (
            "GetReplicationJobsResponse",
            serde_json::to_value(GetReplicationJobsResponse {
                replication_job_list: vec![replication_job.clone()],
                next_token: Some("50".into()),
            })
            .unwrap(),
        ),
        (
            "GetReplicationRunsResponse",
            serde_json::to_value(GetReplicationRunsResponse {
                replication_job: replication_job.clone(),
                replication_run_list: vec![replication_run],
                next_token: Some("50".into()),
            })
            .unwrap(),
        ),
        (
            "EmptyResponse",
            serde_json::to_value(EmptyResponse {}).unwrap(),
        ),
        (
            "Error",
            serde_json::to_value(ApiError::invalid_parameter("frequency: must be 1–24")).unwrap(),
        ),
    ];
    for (name, value) in &samples {
        assert_fits(&doc, name, value, true);
    }
    // A job with nothing optional set still fits (required fields are really there).
    let mut bare = samples::job();
    bare.frequency_hours = None;
    bare.run_once = true;
    bare.kms_key_id = None;
    bare.description = None;
    bare.status_message = None;
    bare.latest_ami_id = None;
    bare.next_replication_run_start_time = None;
    let bare = serde_json::to_value(responses::replication_job(&bare, None, &[])).unwrap();
    assert_fits(&doc, "ReplicationJob", &bare, false);
}

#[test]
fn the_checker_catches_what_it_should() {
    let doc = document();
    let mut body = serde_json::to_value(CreateReplicationJobResponse {
        replication_job_id: JobId("sms-job-1".into()),
    })
    .unwrap();
    assert!(
        check(
            &doc,
            schema(&doc, "CreateReplicationJobResponse"),
            &body,
            "r",
            false
        )
        .is_empty()
    );
    body["extra"] = json!(1);
    assert!(
        !check(
            &doc,
            schema(&doc, "CreateReplicationJobResponse"),
            &body,
            "r",
            false
        )
        .is_empty()
    );
    let wrong_type = json!({"replicationJobId": 7});
    assert!(
        !check(
            &doc,
            schema(&doc, "CreateReplicationJobResponse"),
            &wrong_type,
            "r",
            false
        )
        .is_empty()
    );
    let missing = json!({});
    assert!(
        !check(
            &doc,
            schema(&doc, "CreateReplicationJobResponse"),
            &missing,
            "r",
            false
        )
        .is_empty()
    );
    let bad_enum = json!({"replicationRunId": "sms-run-1", "state": "RUNNING"});
    assert!(!check(&doc, schema(&doc, "ReplicationRun"), &bad_enum, "r", false).is_empty());
}
