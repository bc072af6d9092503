//! Retries of AWS calls, for every service the importer uses: which failures are worth another attempt (throttling, 5xx,
//! timeouts, dropped connections, and for block reads/writes the "snapshot does not exist"
//! EBS answers for a short while after StartSnapshot), with exponential backoff and full
//! jitter; everything else (access denied, validation and checksum rejections) fails at once.
//!
//! The SDK's own retries are switched off on the clients this module drives (see
//! [`without_sdk_retries_ebs`]): its standard mode would multiply our attempts (3 × ours) and,
//! under the sustained throttling 64 concurrent writers meet, its shared retry-token bucket
//! runs dry and turns throttling into hard "retry quota exceeded" failures. One layer, ours,
//! logs every retry and knows the EBS-specific not-found case.

use std::future::Future;
use std::hash::BuildHasher;
use std::time::Duration;

use aws_sdk_ebs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use rehost_core::ErrorKind;

use crate::error::{Error, Result};

/// Attempts per call. With [`BASE_DELAY`] 200 ms doubling up to [`MAX_DELAY`] 20 s, the
/// nine waits between ten attempts are at most 0.2+0.4+…+12.8+20+20 ≈ 65 s (full jitter
/// makes the expected total half that): long enough to ride out a throttling burst or a
/// regional blip, short enough that a dead endpoint is reported within about a minute.
pub const MAX_ATTEMPTS: u32 = 10;
/// First backoff ceiling; EBS throttling clears in well under a second when load drops.
pub const BASE_DELAY: Duration = Duration::from_millis(200);
/// Largest single wait: beyond 20 s a retry no longer helps a throttled account more than
/// it delays the import.
pub const MAX_DELAY: Duration = Duration::from_secs(20);
/// Attempts for the transient "snapshot does not exist" after StartSnapshot: it clears in
/// a few seconds on real EBS; 6 attempts wait at most 0.2+0.4+0.8+1.6+3.2 ≈ 6 s, so a
/// snapshot that truly does not exist is reported quickly.
pub const NOT_FOUND_MAX_ATTEMPTS: u32 = 6;
/// Per-attempt timeout on the clients we configure: a 512 KiB PutSnapshotBlock takes well
/// under a second in a region; 60 s only trips on a stalled connection, which is retried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// How hard to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub max_attempts: u32,
    /// First backoff ceiling.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: MAX_ATTEMPTS,
            base_delay: BASE_DELAY,
            max_delay: MAX_DELAY,
        }
    }
}

impl RetryPolicy {
    /// The backoff ceiling before attempt `attempt + 1` (`attempt` ≥ 1): base × 2^(attempt-1),
    /// capped. The wait is drawn uniformly in `[0, ceiling]` ("full jitter", which spreads
    /// concurrent writers best after a shared throttle).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        // A fresh RandomState is randomly keyed: enough randomness for jitter, no dependency.
        let random = std::collections::hash_map::RandomState::new().hash_one(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 { 0 } else { random % nanos })
    }
}

/// Whether a call may be retried after "not found" (only block reads and writes right
/// after StartSnapshot, where EBS is eventually consistent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFound {
    /// "Not found" is final.
    Fail,
    /// "Not found" may be the new snapshot not visible yet.
    Retry,
}

/// Runs `call` until it succeeds, fails with an error not worth retrying, or runs out of
/// attempts; each retry is logged with the operation, attempt and error code.
pub async fn with_retry<T, F, Fut>(
    policy: &RetryPolicy,
    not_found: NotFound,
    mut call: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1u32;
    loop {
        let err = match call().await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let limit = match err.kind() {
            ErrorKind::Throttled | ErrorKind::Transient if matches!(err, Error::Aws { .. }) => {
                policy.max_attempts
            }
            ErrorKind::NotFound if not_found == NotFound::Retry => {
                policy.max_attempts.min(NOT_FOUND_MAX_ATTEMPTS)
            }
            _ => return Err(err),
        };
        if attempt >= limit {
            return Err(err);
        }
        let delay = policy.delay(attempt);
        if let Error::Aws {
            operation, code, ..
        } = &err
        {
            tracing::warn!(operation, attempt, code = code.as_deref().unwrap_or("-"), delay_ms = delay.as_millis(), error = %err, "retrying");
        }
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// [`with_retry`] with the default policy, for calls where "not found" is final (S3
/// reads and uploads, snapshot reads for verification).
pub async fn retry<T, F, Fut>(call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    with_retry(&RetryPolicy::default(), NotFound::Fail, call).await
}

/// Whether an error of this kind may go away by itself.
pub fn is_retryable(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Throttled | ErrorKind::Transient)
}

/// Classifies an SDK error of `operation`; `context` (snapshot id, block index) is put in
/// front of the message so the user sees which call failed.
pub fn classify<E>(operation: &'static str, context: &str, err: &SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    let kind = match err {
        SdkError::ConstructionFailure(_) => ErrorKind::InvalidInput,
        SdkError::TimeoutError(_) => ErrorKind::Transient,
        SdkError::DispatchFailure(failure) => {
            let text = DisplayErrorContext(err).to_string();
            if failure.is_user() {
                ErrorKind::InvalidInput
            } else if failure.is_other() && text.contains("credentials") {
                // Identity resolution fails here (no credentials found): retrying won't help.
                ErrorKind::PermissionDenied
            } else {
                ErrorKind::Transient
            }
        }
        SdkError::ResponseError(_) | SdkError::ServiceError(_) => kind_of(code.as_deref(), status),
        _ => ErrorKind::Transient,
    };
    let detail = match (err.message(), status) {
        (Some(message), _) => message.to_owned(),
        // An answer we could not parse (e.g. an XML error where JSON was expected): its
        // status says enough, the raw response would only bury it.
        (None, Some(status)) => match kind {
            ErrorKind::PermissionDenied => {
                format!(
                    "HTTP {status}: access denied (check the credentials, region and IAM permissions)"
                )
            }
            _ => format!("HTTP {status}"),
        },
        (None, None) => DisplayErrorContext(err).to_string(),
    };
    let message = if context.is_empty() {
        detail
    } else {
        format!("{context}: {detail}")
    };
    Error::Aws {
        operation,
        code,
        message,
        kind,
    }
}

/// The kind of an AWS error response, from its code (first) and HTTP status.
pub fn kind_of(code: Option<&str>, status: Option<u16>) -> ErrorKind {
    match code.unwrap_or("") {
        "ThrottlingException"
        | "RequestThrottledException"
        | "SlowDown"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "ConcurrentLimitExceededException"
        | "Throttling"
        | "ProvisionedThroughputExceededException" => ErrorKind::Throttled,
        "InternalError"
        | "InternalServerException"
        | "InternalFailure"
        | "InternalServerError"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "RequestTimeout"
        | "RequestTimeoutException" => ErrorKind::Transient,
        "AccessDenied"
        | "AccessDeniedException"
        | "UnauthorizedOperation"
        | "AuthFailure"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "UnrecognizedClientException"
        | "ExpiredToken"
        | "ExpiredTokenException"
        | "InvalidAccessKeyId"
        | "MissingAuthenticationToken" => ErrorKind::PermissionDenied,
        "ResourceNotFoundException" | "NoSuchKey" | "NoSuchBucket" | "NotFound" => {
            ErrorKind::NotFound
        }
        // EC2 names missing things `<Kind>.NotFound` (InvalidSnapshot.NotFound, InvalidAMIID.NotFound).
        c if c.ends_with(".NotFound") => ErrorKind::NotFound,
        "Blocked" | "OptInRequired" => ErrorKind::PermissionDenied,
        // Same client token, different request: a bug or a reused journal, never transient
        // (EBS answers it with a 503, hence before the status rules).
        "ConflictException" | "IdempotentParameterMismatch" => ErrorKind::InvalidInput,
        _ => match status {
            Some(429) => ErrorKind::Throttled,
            Some(401 | 403) => ErrorKind::PermissionDenied,
            Some(404) => ErrorKind::NotFound,
            Some(s) if s >= 500 => ErrorKind::Transient,
            Some(_) => ErrorKind::InvalidInput,
            // An error without a response is a network problem.
            None => ErrorKind::Transient,
        },
    }
}

fn timeouts(current: Option<&TimeoutConfig>) -> TimeoutConfig {
    let mut builder = current
        .cloned()
        .unwrap_or_else(TimeoutConfig::disabled)
        .to_builder();
    builder.set_operation_attempt_timeout(Some(ATTEMPT_TIMEOUT));
    builder.build()
}

/// The EBS client with the SDK's retries off and a per-attempt timeout (see the module doc).
pub fn without_sdk_retries_ebs(client: &aws_sdk_ebs::Client) -> aws_sdk_ebs::Client {
    let conf = client.config();
    let timeouts = timeouts(conf.timeout_config());
    aws_sdk_ebs::Client::from_conf(
        conf.to_builder()
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .build(),
    )
}

/// The EC2 client with the SDK's retries off and a per-attempt timeout.
pub fn without_sdk_retries_ec2(client: &aws_sdk_ec2::Client) -> aws_sdk_ec2::Client {
    let conf = client.config();
    let timeouts = timeouts(conf.timeout_config());
    aws_sdk_ec2::Client::from_conf(
        conf.to_builder()
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .build(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn codes_are_classified_before_statuses() {
        assert_eq!(
            kind_of(Some("ThrottlingException"), Some(400)),
            ErrorKind::Throttled
        );
        assert_eq!(
            kind_of(Some("RequestThrottledException"), Some(400)),
            ErrorKind::Throttled
        );
        assert_eq!(kind_of(Some("SlowDown"), Some(503)), ErrorKind::Throttled);
        assert_eq!(
            kind_of(Some("ConflictException"), Some(503)),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            kind_of(Some("AccessDeniedException"), Some(403)),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            kind_of(Some("ValidationException"), Some(400)),
            ErrorKind::InvalidInput
        );
        assert_eq!(kind_of(None, Some(429)), ErrorKind::Throttled);
        assert_eq!(kind_of(None, Some(502)), ErrorKind::Transient);
        assert_eq!(kind_of(Some("Weird"), Some(409)), ErrorKind::InvalidInput);
        assert_eq!(
            kind_of(Some("ResourceNotFoundException"), Some(404)),
            ErrorKind::NotFound
        );
        // EC2 and S3 spellings, as the AMI and staging code meet them.
        assert_eq!(
            kind_of(Some("InvalidSnapshot.NotFound"), Some(400)),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind_of(Some("InvalidAMIID.NotFound"), Some(400)),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind_of(Some("RequestLimitExceeded"), Some(503)),
            ErrorKind::Throttled
        );
        assert_eq!(
            kind_of(Some("NoSuchBucket"), Some(404)),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind_of(Some("UnauthorizedOperation"), Some(403)),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            kind_of(Some("InvalidParameterValue"), Some(400)),
            ErrorKind::InvalidInput
        );
        assert!(is_retryable(kind_of(Some("InternalError"), Some(500))));
        assert!(!is_retryable(kind_of(Some("AccessDenied"), Some(403))));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(1), Duration::from_millis(200));
        assert_eq!(p.ceiling(4), Duration::from_millis(1600));
        assert_eq!(p.ceiling(9), MAX_DELAY);
        assert_eq!(p.ceiling(40), MAX_DELAY);
        let worst: Duration = (1..MAX_ATTEMPTS).map(|a| p.ceiling(a)).sum();
        assert!(worst < Duration::from_secs(70), "{worst:?}");
        assert!((0..100).all(|_| p.delay(3) <= p.ceiling(3)));
    }

    fn aws(kind: ErrorKind) -> Error {
        Error::Aws {
            operation: "PutSnapshotBlock",
            code: Some("X".into()),
            message: "m".into(),
            kind,
        }
    }

    async fn attempts(kind: ErrorKind, not_found: NotFound) -> u32 {
        let calls = AtomicU32::new(0);
        let fast = RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        };
        let result: Result<()> = with_retry(&fast, not_found, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(aws(kind)) }
        })
        .await;
        assert!(result.is_err());
        calls.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn only_transient_failures_are_retried() {
        assert_eq!(attempts(ErrorKind::Throttled, NotFound::Fail).await, 4);
        assert_eq!(attempts(ErrorKind::Transient, NotFound::Fail).await, 4);
        assert_eq!(
            attempts(ErrorKind::PermissionDenied, NotFound::Retry).await,
            1
        );
        assert_eq!(attempts(ErrorKind::InvalidInput, NotFound::Retry).await, 1);
        assert_eq!(attempts(ErrorKind::NotFound, NotFound::Fail).await, 1);
        assert_eq!(attempts(ErrorKind::NotFound, NotFound::Retry).await, 4);
    }

    #[tokio::test]
    async fn a_retried_call_returns_its_success() {
        let calls = AtomicU32::new(0);
        let fast = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        };
        let value = with_retry(&fast, NotFound::Fail, || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(aws(ErrorKind::Throttled))
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(value, 2);
    }
}
