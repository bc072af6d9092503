//! The API's error answer: `{"code": "…Exception", "message": "…"}` with the HTTP status
//! that goes with the code. Codes are SMS's exception names, so a client written for SMS
//! recognises them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::jobs::JobError;

/// SMS: a parameter has a wrong value (or the body is not valid JSON).
pub const INVALID_PARAMETER: &str = "InvalidParameterException";
/// SMS: a required parameter is missing.
pub const MISSING_PARAMETER: &str = "MissingRequiredParameterException";
/// SMS: no (or a wrong) bearer token.
pub const UNAUTHORIZED: &str = "UnauthorizedOperationException";
/// SMS: something went wrong on our side; the details are in the connector's log.
pub const INTERNAL: &str = "InternalError";
/// Not SMS's: a source (vCenter) failed while the connector worked for the request.
pub const SOURCE_UNAVAILABLE: &str = "SourceUnavailableException";
/// Not SMS's: a path that is no operation of this API.
pub const UNKNOWN_OPERATION: &str = "UnknownOperationException";
/// Not SMS's: a method the path does not take.
pub const METHOD_NOT_ALLOWED: &str = "MethodNotAllowedException";
/// Not SMS's: a body that is not `application/json`.
pub const UNSUPPORTED_MEDIA_TYPE: &str = "UnsupportedMediaTypeException";
/// Not SMS's: a body over the size limit.
pub const REQUEST_TOO_LARGE: &str = "RequestTooLargeException";

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    #[serde(skip, default = "internal_status")]
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

fn internal_status() -> StatusCode {
    StatusCode::INTERNAL_SERVER_ERROR
}

impl ApiError {
    /// An error answer with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// 400 InvalidParameterException.
    pub fn invalid_parameter(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, INVALID_PARAMETER, message)
    }

    /// 401 UnauthorizedOperationException.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED, message)
    }

    /// 500 InternalError. The cause is logged by the caller, never sent: it can name
    /// files, SQL or hosts a client has no business seeing.
    pub fn internal() -> ApiError {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            INTERNAL,
            "internal error; the connector's log has the details",
        )
    }

    /// What a JSON body that does not fit the request type means, naming the field
    /// (`frequency: invalid type: string "x", expected u32`).
    pub fn from_json(err: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
        let inner = err.inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return Self::invalid_parameter(format!("the body is not valid JSON: {inner}"));
        }
        let text = inner.to_string();
        let path = err.path().to_string();
        let message = if path == "." {
            text.clone()
        } else {
            format!("{path}: {text}")
        };
        if text.starts_with("missing field") {
            return Self::new(StatusCode::BAD_REQUEST, MISSING_PARAMETER, message);
        }
        Self::invalid_parameter(message)
    }
}

impl From<JobError> for ApiError {
    fn from(err: JobError) -> ApiError {
        let status =
            StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(
                error = format!("{err:#}"),
                "store error answering a request"
            );
            return ApiError::internal();
        }
        ApiError::new(status, err.code(), err.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    /// Anything not classified (the store, a thread) is internal: logged, not sent.
    fn from(err: anyhow::Error) -> ApiError {
        tracing::error!(
            error = format!("{err:#}"),
            "internal error answering a request"
        );
        ApiError::internal()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, axum::Json(&self)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Sample {
        server_id: String,
        frequency: Option<u32>,
    }

    fn parse(body: &str) -> ApiError {
        let de = &mut serde_json::Deserializer::from_str(body);
        serde_path_to_error::deserialize::<_, Sample>(de)
            .map(|_| ())
            .map_err(|e| ApiError::from_json(&e))
            .unwrap_err()
    }

    #[test]
    fn json_errors_name_the_field() {
        let err = parse(r#"{"serverId": "s-1", "frequency": "daily"}"#);
        assert_eq!(err.code, INVALID_PARAMETER);
        assert!(err.message.starts_with("frequency: invalid type"), "{err}");

        let err = parse(r#"{"frequency": 1}"#);
        assert_eq!(err.code, MISSING_PARAMETER);
        assert!(err.message.contains("serverId"), "{err}");

        let err = parse(r#"{"serverId": "s-1", "roleName": "x"}"#);
        assert_eq!(err.code, INVALID_PARAMETER);
        assert!(err.message.contains("unknown field `roleName`"), "{err}");

        let err = parse(r#"{"serverId": "#);
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(
            err.message.starts_with("the body is not valid JSON"),
            "{err}"
        );
    }

    #[test]
    fn job_errors_keep_their_code_and_status() {
        let err = ApiError::from(JobError::NotFound("job sms-job-1 does not exist".into()));
        assert_eq!(err.status, StatusCode::NOT_FOUND);
        assert_eq!(err.code, "ReplicationJobNotFoundException");
        assert!(err.message.contains("sms-job-1"), "{err}");

        let err = ApiError::from(JobError::Conflict("already".into()));
        assert_eq!(err.status, StatusCode::CONFLICT);
        let err = ApiError::from(JobError::InvalidParameter("frequency".into()));
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.code, INVALID_PARAMETER);
    }

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let err = ApiError::from(anyhow::anyhow!(
            "disk I/O error at /var/lib/rehost/rehost.db"
        ));
        assert_eq!(err.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!err.message.contains("/var/lib"), "{err}");
    }

    #[test]
    fn unauthorized_answers_ask_for_a_bearer_token() {
        let response = ApiError::unauthorized("no token").into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
