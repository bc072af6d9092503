//! What can go wrong with a job or run request, classified the way the API answers it:
//! each variant has one HTTP status and SMS's exception name, so a client written
//! against SMS recognises the failure.

use super::transition::{TransitionError, TransitionErrorKind};

/// A job or run operation that was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request is invalid as given (HTTP 400).
    #[error("{0}")]
    InvalidParameter(String),
    /// The job, run or server named does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The job's state does not allow the operation (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The server already has a live job (HTTP 409).
    #[error("{0}")]
    AlreadyExists(String),
    /// The job already has a PENDING or ACTIVE run (HTTP 409).
    #[error("{0}")]
    RunLimitExceeded(String),
    /// The store failed (HTTP 500).
    #[error("the store failed")]
    Store(#[from] anyhow::Error),
}

impl JobError {
    /// SMS's exception name for this error (the API's `__type`/`code`).
    pub fn code(&self) -> &'static str {
        match self {
            JobError::InvalidParameter(_) => "InvalidParameterException",
            JobError::NotFound(_) => "ReplicationJobNotFoundException",
            JobError::Conflict(_) => "OperationNotPermittedException",
            JobError::AlreadyExists(_) => "ReplicationJobAlreadyExistsException",
            JobError::RunLimitExceeded(_) => "ReplicationRunLimitExceededException",
            JobError::Store(_) => "InternalError",
        }
    }

    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            JobError::InvalidParameter(_) => 400,
            JobError::NotFound(_) => 404,
            JobError::Conflict(_) | JobError::AlreadyExists(_) | JobError::RunLimitExceeded(_) => {
                409
            }
            JobError::Store(_) => 500,
        }
    }
}

impl From<rusqlite::Error> for JobError {
    fn from(err: rusqlite::Error) -> Self {
        JobError::Store(err.into())
    }
}

impl From<serde_json::Error> for JobError {
    fn from(err: serde_json::Error) -> Self {
        JobError::Store(err.into())
    }
}

impl From<TransitionError> for JobError {
    fn from(err: TransitionError) -> Self {
        match err.kind {
            TransitionErrorKind::RunAlreadyOpen => JobError::RunLimitExceeded(err.to_string()),
            TransitionErrorKind::NotPermitted => JobError::Conflict(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_status_and_an_sms_code() {
        let cases = [
            (
                JobError::InvalidParameter("x".into()),
                400,
                "InvalidParameterException",
            ),
            (
                JobError::NotFound("x".into()),
                404,
                "ReplicationJobNotFoundException",
            ),
            (
                JobError::Conflict("x".into()),
                409,
                "OperationNotPermittedException",
            ),
            (
                JobError::AlreadyExists("x".into()),
                409,
                "ReplicationJobAlreadyExistsException",
            ),
            (
                JobError::RunLimitExceeded("x".into()),
                409,
                "ReplicationRunLimitExceededException",
            ),
            (
                JobError::Store(anyhow::anyhow!("disk full")),
                500,
                "InternalError",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.http_status(), status, "{err:?}");
            assert_eq!(err.code(), code, "{err:?}");
        }
    }
}
