//! Bearer-token authentication of every `/v1` route.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::errors::ApiError;

/// The token clients must send, kept as its SHA-256: comparing digests of equal length in
/// constant time tells an attacker neither the token's length nor how many leading
/// characters they guessed right.
#[derive(Clone)]
pub struct ApiToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiToken {
    // Written by hand: not even the digest is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

impl ApiToken {
    /// The token `token`.
    pub fn new(token: &str) -> ApiToken {
        ApiToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether `candidate` is the token.
    pub fn matches(&self, candidate: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        self.digest.ct_eq(&digest).into()
    }

    /// Whether the request's `Authorization: Bearer …` carries the token; the error says
    /// what is wrong without echoing what was sent.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "missing `Authorization: Bearer <token>` header",
            ));
        };
        let value = value.to_str().unwrap_or_default();
        let Some((scheme, token)) = value.split_once(' ') else {
            return Err(ApiError::unauthorized(
                "the Authorization header must be `Bearer <token>`",
            ));
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::unauthorized(
                "the Authorization header must be `Bearer <token>`",
            ));
        }
        if !self.matches(token.trim()) {
            return Err(ApiError::unauthorized("wrong bearer token"));
        }
        Ok(())
    }
}

/// Middleware: answers 401 unless the request carries the token.
pub async fn require_token(
    State(token): State<Arc<ApiToken>>,
    request: Request,
    next: Next,
) -> Response {
    match token.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(err) => {
            tracing::info!(
                path = request.uri().path(),
                reason = err.message,
                "refused an unauthenticated request"
            );
            err.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let token = ApiToken::new(TOKEN);
        assert!(
            token
                .check(&headers(Some(&format!("Bearer {TOKEN}"))))
                .is_ok()
        );
        assert!(
            token
                .check(&headers(Some(&format!("bearer {TOKEN}"))))
                .is_ok()
        );
        for wrong in [
            None,
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer 0123456789abcdef0123456789abcdeX"),
            Some("Bearer 0123456789abcdef0123456789abcdef0"),
            Some("Basic dXNlcjpwYXNz"),
            Some(TOKEN),
        ] {
            let err = token.check(&headers(wrong)).unwrap_err();
            assert_eq!(err.code, super::super::errors::UNAUTHORIZED, "{wrong:?}");
            assert!(!err.message.contains(TOKEN), "{err}");
        }
    }

    #[test]
    fn the_token_is_never_printed() {
        assert!(!format!("{:?}", ApiToken::new(TOKEN)).contains("0123"));
    }
}
