//! The one mapping from errors to the distribution API's error responses:
//! the status Distribution uses and the OCI error body
//! (`{"errors":[{"code","message","detail"}]}`), as `grpc/status.rs` is for
//! gRPC. Exhaustive on purpose: a new engine error does not compile until
//! it has a status.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::access::Denied;
use crate::admission::Refused;
use crate::upstream::{Error, Internal};

/// The challenge a 401 carries: static bearer tokens, no token service.
pub(super) const CHALLENGE: &str = r#"Bearer realm="oci-upstream",service="oci-upstream""#;

/// What a request asked for, which names its "unknown" code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Asked {
    /// A manifest: `MANIFEST_UNKNOWN`.
    Manifest,
    /// A blob: `BLOB_UNKNOWN`.
    Blob,
    /// A repository's tags: `NAME_UNKNOWN`.
    Tags,
}

/// An error response of the mirror.
#[derive(Debug)]
pub(super) struct MirrorError {
    status: StatusCode,
    /// The OCI error code of the JSON body; `None`: a plain-text body (the
    /// spec's table has no code for it, and a JSON body must use one).
    code: Option<&'static str>,
    message: String,
    retry_after: Option<Duration>,
    /// `bytes */SIZE` of an unsatisfiable range.
    content_range: Option<u64>,
    /// The `Allow` header of a 405: the methods the resource serves.
    allow: &'static str,
}

impl MirrorError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: Some(code),
            message: message.into(),
            retry_after: None,
            content_range: None,
            allow: "GET, HEAD",
        }
    }

    /// A 4xx the spec's code table has no code for: a plain-text body.
    pub(super) fn plain(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code: None,
            ..Self::new(status, "", message)
        }
    }

    /// 400 `NAME_INVALID`.
    pub(super) fn name_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", message)
    }

    /// 400 `DIGEST_INVALID`.
    pub(super) fn digest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", message)
    }

    /// 404 with `asked`'s unknown code.
    pub(super) fn unknown(asked: Asked, message: impl Into<String>) -> Self {
        let code = match asked {
            Asked::Manifest => "MANIFEST_UNKNOWN",
            Asked::Blob => "BLOB_UNKNOWN",
            Asked::Tags => "NAME_UNKNOWN",
        };
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 405 `UNSUPPORTED`: this mirror pulls only; `allow` names what the
    /// resource does serve (`""` for none, as for upload sessions).
    pub(super) fn unsupported(message: impl Into<String>, allow: &'static str) -> Self {
        Self {
            allow,
            ..Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
        }
    }

    /// 404 for a path that is no endpoint of the API.
    pub(super) fn no_endpoint() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "not an endpoint of the distribution API's pull side",
        )
    }

    /// 416 for a range that does not overlap a blob of `size` bytes (or
    /// ends before it starts), with `Content-Range: bytes */SIZE`.
    pub(super) fn range_unsatisfiable(size: u64) -> Self {
        Self {
            content_range: Some(size),
            ..Self::plain(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the range is not within the blob's {size} bytes"),
            )
        }
    }

    /// The engine's error for a request that asked for `asked`.
    pub(super) fn from_engine(e: Error, asked: Asked) -> Self {
        let message = e.to_string();
        let detail = crate::telemetry::describe(&e);
        let error = match e {
            Error::UnknownUpstream(_)
            | Error::NoRoute(_)
            | Error::NotRouted { .. }
            | Error::UnknownNamespace(_) => {
                Self::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", message)
            }
            Error::NotFound(_) | Error::PlatformNotFound { .. } => Self::unknown(asked, message),
            Error::OutOfRange { size, .. } => Self::range_unsatisfiable(size),
            Error::PermissionDenied(_) => Self::new(StatusCode::FORBIDDEN, "DENIED", message),
            Error::RateLimited { retry_after, .. } => Self {
                retry_after,
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", message)
            },
            Error::Unavailable(_)
            | Error::DataLoss(_)
            | Error::Internal(
                Internal::ShuttingDown | Internal::Cache(_) | Internal::LostDownload,
            ) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message),
        };
        // The final failure of a request, logged once with its whole chain.
        if error.status.is_server_error() || error.status == StatusCode::TOO_MANY_REQUESTS {
            tracing::warn!(error = %detail, status = error.status.as_u16(), "mirror request failed");
        } else {
            tracing::debug!(error = %detail, status = error.status.as_u16(), "mirror request refused");
        }
        error
    }
}

impl From<Refused> for MirrorError {
    fn from(e: Refused) -> Self {
        match e {
            Refused::Draining => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                e.to_string(),
            ),
            Refused::Overloaded(_) => Self {
                retry_after: Some(Duration::from_secs(1)),
                ..Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    e.to_string(),
                )
            },
        }
    }
}

impl From<Denied> for MirrorError {
    fn from(e: Denied) -> Self {
        tracing::info!(error = %e, "mirror caller refused");
        if e.is_authentication() {
            Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", e.to_string())
        } else {
            Self::new(StatusCode::FORBIDDEN, "DENIED", e.to_string())
        }
    }
}

impl IntoResponse for MirrorError {
    fn into_response(self) -> Response {
        let mut response = match self.code {
            Some(code) => {
                let body = serde_json::json!({
                    "errors": [{ "code": code, "message": self.message, "detail": {} }]
                });
                (
                    self.status,
                    [(header::CONTENT_TYPE, "application/json")],
                    body.to_string(),
                )
                    .into_response()
            }
            None => (
                self.status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{}\n", self.message),
            )
                .into_response(),
        };
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(CHALLENGE),
            );
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, HeaderValue::from_static(self.allow));
        }
        if let Some(delay) = self.retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(delay.as_secs().max(1)),
            );
        }
        if let Some(size) = self.content_range {
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                headers.insert(header::CONTENT_RANGE, value);
            }
        }
        response
    }
}
