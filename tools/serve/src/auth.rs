//! The bearer token: with `--token-file`, every API request must carry
//! `Authorization: Bearer <token>`; the page itself holds no data and is served to anyone.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::ApiError;

pub async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(expected) = &state.config.token {
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same_secret(g, expected)) {
            return Err(ApiError {
                status: axum::http::StatusCode::UNAUTHORIZED,
                message: "this server needs a bearer token: send `Authorization: Bearer <the token in the server's --token-file>`".into(),
            });
        }
    }
    Ok(next.run(request).await)
}

/// Compare two secrets in time that depends on neither: their SHA-256 digests (of fixed
/// length, whatever the token's) are compared byte by byte without stopping early.
fn same_secret(given: &str, expected: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_compare_whole() {
        assert!(super::same_secret("s3cret", "s3cret"));
        assert!(!super::same_secret("s3cret", "s3cres"));
        assert!(!super::same_secret("", "s3cret"));
        assert!(!super::same_secret("s3cret ", "s3cret"));
    }
}
