//! The HTTP API (CONTRACT §6): JSON under `/api/v1`, bearer tokens with roles, errors as
//! `{"error": {"code", "message"}}`.

pub mod api;
pub mod planner;

use crate::config::{Role, TokenConfig};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::fmt;

/// An error the API reports to its caller.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Structured fields added to the error object next to `code` and `message`
    /// (e.g. `available` on `insufficient_stock`).
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), fields: serde_json::Map::new() }
    }
    /// Adds a structured field to the error object (`code` and `message` stay as they are).
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        if key != "code" && key != "message" {
            self.fields.insert(key.to_string(), value.into());
        }
        self
    }
    pub fn bad_request(code: &'static str, m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, m)
    }
    pub fn unprocessable(code: &'static str, m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    pub fn conflict(code: &'static str, m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let mut error = self.fields.clone();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        HttpResponse::build(self.status).json(json!({ "error": error }))
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        tracing::error!(error = %e, "database error in request");
        ApiError::unavailable("the database is not available; try again")
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Checks bearer tokens against the configured ones.
pub struct Auth {
    tokens: Vec<(String, Role, [u8; 32])>,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Auth {
    pub fn new(tokens: &[TokenConfig]) -> Self {
        let tokens = tokens
            .iter()
            .filter_map(|t| {
                let d = match (&t.token, &t.token_sha256) {
                    (Some(tok), _) => Some(digest(tok)),
                    (None, Some(h)) => hex32(h),
                    _ => None,
                }?;
                Some((t.name.clone(), t.role, d))
            })
            .collect();
        Self { tokens }
    }

    pub fn open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The caller, if allowed at least `min`.
    pub fn check(&self, req: &HttpRequest, min: Role) -> Result<Caller, ApiError> {
        if self.open() {
            return Ok(Caller { name: "local".into(), role: Role::Admin });
        }
        let header = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        let token = header.strip_prefix("Bearer ").map(str::trim).unwrap_or("");
        if token.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing `Authorization: Bearer <token>`",
            ));
        }
        let d = digest(token);
        // Compare digests without early exit.
        let found =
            self.tokens.iter().find(|(_, _, t)| t.iter().zip(d.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0);
        match found {
            None => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token")),
            Some((name, role, _)) if *role >= min => Ok(Caller { name: name.clone(), role: *role }),
            Some((name, role, _)) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("`{name}` is {} but this needs {}", role.as_str(), min.as_str()),
            )),
        }
    }
}

/// Parses a JSON body. Handlers take the raw bytes and call this after the caller is
/// authorised, so that a bad body never hides a 401 or 403.
pub fn json_body<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, ApiError> {
    // A NUL can only arrive escaped; no identifier or text of ours may hold one (and
    // PostgreSQL refuses it in text).
    if b.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        return Err(ApiError::bad_request("invalid_body", "request body: NUL characters are not accepted"));
    }
    serde_json::from_slice(b).map_err(|e| {
        let code = if e.is_data() { "invalid_body" } else { "invalid_json" };
        ApiError::bad_request(code, format!("request body: {e}"))
    })
}

/// Parses the query string (after authorisation, like [`json_body`]).
pub fn query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    actix_web::web::Query::<T>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))
}

/// Whether a request's path or query carries an encoded NUL or other control character,
/// which no route accepts (checked before routing, so no handler sees one).
pub fn has_control_chars(uri: &actix_web::http::Uri) -> bool {
    let text = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    let b = text.as_bytes();
    b.windows(3).any(|w| w[0] == b'%' && (w[1] == b'0' || w[1] == b'1') && w[2].is_ascii_hexdigit())
        || b.windows(3).any(|w| w.eq_ignore_ascii_case(b"%7f"))
}

pub use crate::time::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_tokens() {
        let auth = Auth::new(&[
            TokenConfig {
                name: "v".into(),
                role: Role::Viewer,
                token: Some("viewer-token".into()),
                token_sha256: None,
            },
            TokenConfig {
                name: "p".into(),
                role: Role::Planner,
                token: None,
                token_sha256: Some("ab41ea9d8cbd0e1a4bb0e7a5a8b3cd2c33a1b7e0f8e4f2d56f0ae0f3f1f1d6a1".into()),
            },
        ]);
        let req = |tok: &str| {
            actix_web::test::TestRequest::default()
                .insert_header(("authorization", format!("Bearer {tok}")))
                .to_http_request()
        };
        assert_eq!(auth.check(&req("viewer-token"), Role::Viewer).map(|c| c.name).ok(), Some("v".to_string()));
        assert_eq!(
            auth.check(&req("viewer-token"), Role::Planner).map_err(|e| e.status).err(),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            auth.check(&req("nope-nope"), Role::Viewer).map_err(|e| e.status).err(),
            Some(StatusCode::UNAUTHORIZED)
        );
        let hashed = Auth::new(&[TokenConfig {
            name: "h".into(),
            role: Role::Admin,
            token: None,
            token_sha256: Some(sha_hex("s3cret-token")),
        }]);
        assert!(hashed.check(&req("s3cret-token"), Role::Admin).is_ok());
    }

    fn sha_hex(s: &str) -> String {
        digest(s).iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn error_body_carries_structured_fields() {
        let e = ApiError::conflict("insufficient_stock", "short").with("available", 7).with("code", "ignored");
        let body = actix_web::body::to_bytes(e.error_response().into_body());
        let body = futures_util::FutureExt::now_or_never(body).and_then(Result::ok).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(v, json!({"error": {"code": "insufficient_stock", "message": "short", "available": 7}}));
        assert_eq!(e.status_code(), StatusCode::CONFLICT);
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(1_795_600_800_123), "2026-11-25T10:00:00.123Z");
    }
}
