//! Turning SDK errors into [`Error::Aws`] with a kind, and retrying the kinds worth
//! retrying (throttling, 5xx, network) with capped exponential backoff and full jitter.
//!
//! Used by S3 reads and staging and by snapshot verification. The SDK retries too (its
//! standard mode: 3 attempts); this outer loop rides out longer bursts, such as S3's
//! `SlowDown`, that outlast the SDK's budget, and logs each retry.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use rehost_core::ErrorKind;

use crate::error::{Error, Result};

/// How long to keep retrying.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    /// Attempts before giving up.
    pub max_attempts: u32,
    /// The first wait's ceiling.
    pub base_delay: Duration,
    /// The largest wait.
    pub max_delay: Duration,
}

/// 10 attempts, waits doubling from 100 ms (about one S3/EBS round trip, so a lone 500
/// costs little) to 10 s (AWS asks throttled clients to back off for seconds): at most
/// ~33 s of waiting in all, half that on average with full jitter. Long enough to ride out
/// a throttling burst, short enough that a real outage fails within a minute.
pub(crate) const DEFAULT_BACKOFF: Backoff = Backoff {
    max_attempts: 10,
    base_delay: Duration::from_millis(100),
    max_delay: Duration::from_secs(10),
};

/// Runs `attempt` until it succeeds, fails with an error not worth retrying, or the
/// [`DEFAULT_BACKOFF`] attempts are spent. `what` names the call in logs.
pub(crate) async fn retry<T, F, Fut>(what: &str, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    retry_with(&DEFAULT_BACKOFF, what, attempt).await
}

/// [`retry`] with another policy.
pub(crate) async fn retry_with<T, F, Fut>(policy: &Backoff, what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) if tries < policy.max_attempts && is_retryable(err.kind()) => {
                let delay = policy.delay(tries);
                tracing::warn!(call = what, attempt = tries, delay_ms = delay.as_millis(), error = %err, "retrying");
                tokio::time::sleep(delay).await;
                tries += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Whether an error of this kind may go away by itself.
pub(crate) fn is_retryable(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Transient | ErrorKind::Throttled)
}

impl Backoff {
    /// Full jitter (AWS's recommendation): a uniform wait in `[0, min(cap, base × 2^n)]`,
    /// so many clients throttled together do not retry together.
    fn delay(&self, tries: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(1 << tries.saturating_sub(1).min(16))
            .min(self.max_delay);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(random_u64() % ceiling_ms.saturating_add(1))
    }
}

/// A random number from the standard library's per-process random hash keys: enough for
/// jitter, without a random-number crate.
fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// Converts an SDK error of `operation` into [`Error::Aws`]; `context` (an S3 URL, a
/// snapshot id and block) is put in front of AWS's message so the error says where.
pub(crate) fn aws_error<E>(
    operation: &'static str,
    context: &str,
    err: &SdkError<E, HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    let network = matches!(
        err,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    );
    let detail = match err.message() {
        Some(message) => message.to_owned(),
        None => DisplayErrorContext(err).to_string(),
    };
    let kind = classify(code.as_deref(), status, network);
    Error::Aws {
        operation,
        code,
        message: format!("{context}: {detail}"),
        kind,
    }
}

/// How to treat an AWS error, from its code, else its HTTP status. Pure, so every rule is
/// unit-tested.
pub(crate) fn classify(code: Option<&str>, status: Option<u16>, network: bool) -> ErrorKind {
    const THROTTLING: &[&str] = &[
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "ProvisionedThroughputExceededException",
    ];
    const TRANSIENT: &[&str] = &[
        "InternalError",
        "InternalServerException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "IDPCommunicationError",
    ];
    const DENIED: &[&str] = &[
        "AccessDenied",
        "AccessDeniedException",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "AuthFailure",
    ];
    const NOT_FOUND: &[&str] = &[
        "NoSuchBucket",
        "NoSuchKey",
        "NoSuchUpload",
        "NotFound",
        "ResourceNotFoundException",
    ];
    match code {
        Some(c) if THROTTLING.contains(&c) => return ErrorKind::Throttled,
        Some(c) if TRANSIENT.contains(&c) => return ErrorKind::Transient,
        Some(c) if DENIED.contains(&c) => return ErrorKind::PermissionDenied,
        Some(c) if NOT_FOUND.contains(&c) => return ErrorKind::NotFound,
        _ => {}
    }
    match status {
        Some(429 | 503) => ErrorKind::Throttled,
        Some(500..=599) => ErrorKind::Transient,
        Some(401 | 403) => ErrorKind::PermissionDenied,
        Some(404) => ErrorKind::NotFound,
        Some(_) => ErrorKind::InvalidInput,
        None if network => ErrorKind::Transient,
        None => ErrorKind::InvalidInput,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn classification_follows_codes_then_status() {
        assert_eq!(
            classify(Some("SlowDown"), Some(503), false),
            ErrorKind::Throttled
        );
        assert_eq!(
            classify(Some("RequestThrottledException"), Some(400), false),
            ErrorKind::Throttled
        );
        assert_eq!(
            classify(Some("InternalError"), Some(500), false),
            ErrorKind::Transient
        );
        assert_eq!(
            classify(Some("AccessDenied"), Some(403), false),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            classify(Some("NoSuchBucket"), Some(404), false),
            ErrorKind::NotFound
        );
        assert_eq!(
            classify(Some("ValidationException"), Some(400), false),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            classify(Some("PreconditionFailed"), Some(412), false),
            ErrorKind::InvalidInput
        );
        assert_eq!(classify(None, Some(502), false), ErrorKind::Transient);
        assert_eq!(classify(None, Some(404), false), ErrorKind::NotFound);
        assert_eq!(classify(None, None, true), ErrorKind::Transient);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        for tries in 1..40 {
            assert!(DEFAULT_BACKOFF.delay(tries) <= DEFAULT_BACKOFF.max_delay);
        }
        let waits: std::collections::HashSet<_> =
            (0..20).map(|_| DEFAULT_BACKOFF.delay(8)).collect();
        assert!(waits.len() > 1, "no jitter: {waits:?}");
    }

    fn failure(kind: ErrorKind) -> Error {
        Error::Aws {
            operation: "Op",
            code: None,
            message: "m".into(),
            kind,
        }
    }

    const FAST: Backoff = Backoff {
        max_attempts: 5,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
    };

    #[tokio::test]
    async fn retries_transient_errors_and_stops_on_others() {
        let calls = AtomicU32::new(0);
        let value = retry_with(&FAST, "op", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(failure(ErrorKind::Throttled))
            } else {
                Ok(7)
            }
        })
        .await
        .unwrap();
        assert_eq!((value, calls.load(Ordering::SeqCst)), (7, 4));

        calls.store(0, Ordering::SeqCst);
        let err = retry_with(&FAST, "op", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(failure(ErrorKind::PermissionDenied))
        })
        .await
        .unwrap_err();
        assert_eq!(
            (err.kind(), calls.load(Ordering::SeqCst)),
            (ErrorKind::PermissionDenied, 1)
        );

        calls.store(0, Ordering::SeqCst);
        retry_with(&FAST, "op", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(failure(ErrorKind::Transient))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), FAST.max_attempts);
    }
}
