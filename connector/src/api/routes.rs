//! The router: one list of routes ([`routes`]) that both the router and the OpenAPI test
//! read, the operation handler, `/healthz` and `/metrics`, and JSON answers where axum
//! would answer in text (unknown path, wrong method, body rejected).

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};

use super::auth::{ApiToken, require_token};
use super::errors::{self, ApiError};
use super::metrics::{self, MetricsSnapshot};
use super::requests::{Operation, parse_request};
use super::service::{Service, on_store};
use crate::scheduler::Scheduler;

/// What a route is, for the router and for the OpenAPI test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// `GET` or `POST`.
    pub method: &'static str,
    pub path: String,
    /// Whether it needs the bearer token.
    pub authenticated: bool,
    /// The operation answered there, for `/v1` routes.
    pub operation: Option<Operation>,
}

/// Not behind the token: a load balancer's or monitor's probe has none, and the figures
/// say nothing a job list would not (counts and bytes, no names).
pub const HEALTHZ_PATH: &str = "/healthz";
/// See [`HEALTHZ_PATH`]; Prometheus scrapes without credentials by default.
pub const METRICS_PATH: &str = "/metrics";

/// Every route the API answers.
pub fn routes() -> Vec<RouteSpec> {
    let mut routes: Vec<RouteSpec> = Operation::ALL
        .iter()
        .map(|op| RouteSpec {
            method: "POST",
            path: op.path(),
            authenticated: true,
            operation: Some(*op),
        })
        .collect();
    for path in [HEALTHZ_PATH, METRICS_PATH] {
        routes.push(RouteSpec {
            method: "GET",
            path: path.to_owned(),
            authenticated: false,
            operation: None,
        });
    }
    routes
}

/// The scheduler as the handlers see it: woken after a change. Behind a lock because
/// `rehost serve` takes it back at shutdown to wait for it.
pub type SchedulerSlot = Arc<Mutex<Option<Scheduler>>>;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub scheduler: SchedulerSlot,
}

impl AppState {
    fn wake_scheduler(&self) {
        match self.scheduler.lock() {
            Ok(slot) => {
                if let Some(scheduler) = slot.as_ref() {
                    scheduler.wake();
                }
            }
            Err(_) => tracing::error!("the scheduler's slot is poisoned; it was not woken"),
        }
    }
}

/// The API's router.
pub fn router(state: AppState, token: ApiToken) -> Router {
    let token = Arc::new(token);
    let mut api: Router<AppState> = Router::new();
    let mut open: Router<AppState> = Router::new();
    for route in routes() {
        let method_router: MethodRouter<AppState> = match (route.operation, route.path.as_str()) {
            (Some(op), _) => post(
                move |state: State<AppState>,
                      headers: HeaderMap,
                      body: Result<Bytes, BytesRejection>| {
                    operation(state, op, headers, body)
                },
            ),
            (None, HEALTHZ_PATH) => get(healthz),
            (None, _) => get(metrics_text),
        };
        let method_router = method_router.fallback(method_not_allowed);
        if route.authenticated {
            api = api.route(&route.path, method_router);
        } else {
            open = open.route(&route.path, method_router);
        }
    }
    let api = api.route_layer(axum::middleware::from_fn_with_state(token, require_token));
    api.merge(open).fallback(unknown_path).with_state(state)
}

async fn operation(
    State(state): State<AppState>,
    operation: Operation,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match answer(&state, operation, &headers, body).await {
        Ok(json) => (StatusCode::OK, axum::Json(json)).into_response(),
        Err(err) => {
            tracing::info!(
                operation = operation.name(),
                code = err.code,
                message = err.message,
                "request refused"
            );
            err.into_response()
        }
    }
}

async fn answer(
    state: &AppState,
    operation: Operation,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<serde_json::Value, ApiError> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            errors::REQUEST_TOO_LARGE
        } else {
            errors::INVALID_PARAMETER
        };
        ApiError::new(status, code, rejection.body_text())
    })?;
    check_content_type(headers, &body)?;
    let request = parse_request(operation, &body)?;
    let wakes = request.wakes_scheduler();
    let answer = state.service.execute(request).await?;
    if wakes {
        state.wake_scheduler();
    }
    tracing::info!(operation = operation.name(), "request answered");
    Ok(answer)
}

/// A body must be declared JSON; an empty one needs no type (`curl -X POST` sends none).
pub fn check_content_type(headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        errors::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "the body must be JSON with `Content-Type: application/json` (got {:?})",
            if content_type.is_empty() {
                "none"
            } else {
                content_type
            }
        ),
    ))
}

async fn healthz(State(state): State<AppState>) -> Response {
    match on_store(state.service.store(), |s| Ok(s.schema_version()?)).await {
        Ok(_) => (StatusCode::OK, axum::Json(serde_json::json!({"status": "ok"}))).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "unavailable", "message": "the store does not answer"})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match on_store(state.service.store(), |s| Ok(MetricsSnapshot::collect(s)?)).await {
        Ok(snapshot) => (
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            metrics::render(&snapshot),
        )
            .into_response(),
        Err(err) => err.into_response(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        errors::METHOD_NOT_ALLOWED,
        "this path takes another method: POST for /v1 operations, GET for /healthz and /metrics",
    )
}

async fn unknown_path(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        errors::UNKNOWN_OPERATION,
        format!(
            "no operation at {}; the operations are POST /v1/{{{}}}",
            uri.path(),
            Operation::ALL.map(Operation::name).join("|")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bodies_must_be_declared_json() {
        let mut headers = HeaderMap::new();
        assert!(check_content_type(&headers, b"").is_ok());
        let err = check_content_type(&headers, b"{}").unwrap_err();
        assert_eq!(err.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert!(check_content_type(&headers, b"{}").is_err());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(check_content_type(&headers, b"{}").is_ok());
    }

    #[test]
    fn every_operation_has_one_authenticated_route() {
        let routes = routes();
        for op in Operation::ALL {
            let found: Vec<_> = routes.iter().filter(|r| r.operation == Some(op)).collect();
            assert_eq!(found.len(), 1, "{op:?}");
            assert!(found[0].authenticated && found[0].method == "POST");
        }
        assert!(
            routes
                .iter()
                .filter(|r| !r.authenticated)
                .all(|r| r.method == "GET")
        );
    }
}
