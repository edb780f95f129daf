//! The OCI distribution API as an upstream speaks it: URLs for manifests,
//! blobs and tag lists, the `Accept` header, the `Link` header, and the
//! registry error envelope turned into a typed [`Fault`].

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use url::Url;

use super::client::{Request, Upstream};
use super::error::{Fault, FaultKind};
use super::http::read_prefix;
use super::resilience::retry_after;
use crate::metrics::Operation;
use crate::oci::{Digest, MediaType, ParseError, Reference, Repository};

/// Most bytes of an error body read for a message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// The pull scope for a repository on `upstream`.
pub fn pull_scope(upstream: &Upstream, repository: &Repository) -> String {
    format!("repository:{}:pull", upstream.repository_name(repository))
}

fn endpoint(upstream: &Upstream, repository: &Repository, tail: &str) -> Url {
    let mut url = upstream.base().clone();
    let path = format!(
        "{}/v2/{}/{tail}",
        url.path().trim_end_matches('/'),
        upstream.repository_name(repository)
    );
    url.set_path(&path);
    url
}

/// `GET|HEAD /v2/NAME/manifests/REFERENCE`.
pub fn manifest_request(
    upstream: &Upstream,
    method: reqwest::Method,
    repository: &Repository,
    reference: &Reference,
    accept: &[MediaType],
) -> Request {
    Request {
        method,
        url: endpoint(upstream, repository, &format!("manifests/{reference}")),
        accept: Some(accept_header(accept)),
        range: None,
        scope: pull_scope(upstream, repository),
        what: format!("manifest `{}`", display_ref(repository, reference)),
        operation: Operation::Manifest,
    }
}

/// `GET|HEAD /v2/NAME/blobs/DIGEST`.
pub fn blob_request(
    upstream: &Upstream,
    method: reqwest::Method,
    repository: &Repository,
    digest: &Digest,
) -> Request {
    Request {
        method,
        url: endpoint(upstream, repository, &format!("blobs/{digest}")),
        accept: None,
        range: None,
        scope: pull_scope(upstream, repository),
        what: format!("blob `{repository}@{digest}`"),
        operation: Operation::Blob,
    }
}

/// `GET /v2/NAME/tags/list`, or the page at `url` (from a `Link` header).
pub fn tags_request(upstream: &Upstream, repository: &Repository, url: Option<Url>) -> Request {
    Request {
        method: reqwest::Method::GET,
        url: url.unwrap_or_else(|| endpoint(upstream, repository, "tags/list")),
        accept: Some(HeaderValue::from_static("application/json")),
        range: None,
        scope: pull_scope(upstream, repository),
        what: format!("tags of `{repository}`"),
        operation: Operation::Tags,
    }
}

/// `repo:tag` or `repo@digest`, for messages.
pub fn display_ref(repository: &Repository, reference: &Reference) -> String {
    match reference {
        Reference::Tag(tag) => format!("{repository}:{tag}"),
        Reference::Digest(digest) => format!("{repository}@{digest}"),
    }
}

/// The `Accept` header for manifest requests: the caller's types, or every
/// OCI and Docker v2 type when none are given.
fn accept_header(accept: &[MediaType]) -> HeaderValue {
    let text = if accept.is_empty() {
        MediaType::DEFAULT_ACCEPT.join(", ")
    } else {
        accept
            .iter()
            .map(MediaType::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    // MediaType admits only header-safe characters.
    HeaderValue::from_str(&text).expect("media types are valid header values")
}

/// The `rel="next"` target of a `Link` header, resolved against `current`.
/// Only links on the same scheme, host and port are followed.
pub fn next_link(headers: &HeaderMap, current: &Url) -> Result<Option<Url>, String> {
    for value in headers.get_all(reqwest::header::LINK) {
        let Ok(value) = value.to_str() else { continue };
        for link in value.split(',') {
            let Some((target, params)) = link.trim().split_once(';') else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p == "rel=\"next\"" || p == "rel=next"
            });
            if !is_next {
                continue;
            }
            let target = target.trim().trim_start_matches('<').trim_end_matches('>');
            let next = current
                .join(target)
                .map_err(|e| format!("unusable Link {target:?}: {e}"))?;
            if next.origin() != current.origin() {
                return Err(format!(
                    "Link points to another origin ({}); not followed",
                    next.origin().ascii_serialization()
                ));
            }
            return Ok(Some(next));
        }
    }
    Ok(None)
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    errors: Vec<RegistryError>,
}

#[derive(Deserialize)]
struct RegistryError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Turns a non-2xx answer into a [`Fault`]: 404 or a `*_UNKNOWN` code is
/// "not found", 401/403 refused credentials, 429 a rate limit (with
/// `Retry-After`), anything else an upstream that could not answer.
pub async fn fault_from_response(
    upstream: &Upstream,
    what: &str,
    response: reqwest::Response,
) -> Fault {
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let body = read_prefix(response, ERROR_BODY_LIMIT).await;
    let errors = serde_json::from_slice::<Envelope>(&body)
        .map(|e| e.errors)
        .unwrap_or_default();
    let detail = errors
        .first()
        .map(|e| {
            let message: String = e.message.chars().take(200).collect();
            format!(" ({}: {})", e.code, message)
        })
        .unwrap_or_default();
    let unknown = errors.iter().any(|e| e.code.ends_with("_UNKNOWN"));
    let kind = match status {
        StatusCode::NOT_FOUND => FaultKind::NotFound,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => FaultKind::Denied,
        StatusCode::TOO_MANY_REQUESTS => FaultKind::RateLimited,
        s if s.is_client_error() && unknown => FaultKind::NotFound,
        _ => FaultKind::Unavailable,
    };
    Fault::new(
        kind,
        format!(
            "upstream `{}` answered {} for {what}{detail}",
            upstream.name(),
            status.as_u16()
        ),
    )
    .with_retry_after(retry_after)
}

/// The caller's acceptable media types, or every OCI and Docker v2 type.
pub(crate) fn media_types_or_default(accept: &[MediaType]) -> Vec<MediaType> {
    if accept.is_empty() {
        MediaType::DEFAULT_ACCEPT
            .iter()
            .map(|m| MediaType::known(m))
            .collect()
    } else {
        accept.to_vec()
    }
}

/// The `Docker-Content-Digest` header: `Ok(None)` when absent, an error
/// (saying why, with the value shortened and escaped) when it is not a
/// valid digest. What an invalid one means depends on the request: see
/// [`header_digest_for`].
pub(crate) fn header_digest(headers: &HeaderMap) -> Result<Option<Digest>, ParseError> {
    let Some(value) = headers.get("Docker-Content-Digest") else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    Digest::parse(text.trim()).map(Some)
}

/// The `Docker-Content-Digest` of an answer for `reference`. An invalid one
/// is an upstream fault when a digest was asked for (the upstream does not
/// speak the protocol; the next one is tried), and ignored (logged at debug)
/// for a tag, whose digest is computed from the bytes anyway.
pub(crate) fn header_digest_for(
    upstream: &Upstream,
    what: &str,
    reference: &Reference,
    headers: &HeaderMap,
) -> Result<Option<Digest>, Fault> {
    match header_digest(headers) {
        Ok(digest) => Ok(digest),
        Err(e) if reference.digest().is_some() => Err(Fault::unavailable(format!(
            "upstream `{}` answered for {what} with an invalid Docker-Content-Digest: {e}",
            upstream.name()
        ))),
        Err(e) => {
            tracing::debug!(upstream = upstream.name(), %what, error = %e, "ignoring an invalid Docker-Content-Digest");
            Ok(None)
        }
    }
}

/// The `Content-Type` without parameters, lowercased.
pub(crate) fn content_type(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(value: &str) -> Result<Option<Url>, String> {
        let mut headers = HeaderMap::new();
        headers.insert(reqwest::header::LINK, HeaderValue::from_str(value).unwrap());
        next_link(
            &headers,
            &Url::parse("https://r.example/v2/a/tags/list").unwrap(),
        )
    }

    #[test]
    fn docker_content_digest_header() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let headers = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                "Docker-Content-Digest",
                HeaderValue::from_bytes(value).unwrap(),
            );
            headers
        };
        assert_eq!(header_digest(&HeaderMap::new()), Ok(None));
        assert_eq!(
            header_digest(&headers(format!(" {digest} ").as_bytes()))
                .unwrap()
                .map(|d| d.to_string()),
            Some(digest)
        );
        for bad in [&b"sha256:abc"[..], b"md5:0000", b"", b"sha256:\xff\xfe"] {
            assert!(header_digest(&headers(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn link_headers() {
        assert_eq!(
            link(r#"</v2/a/tags/list?n=2&last=b>; rel="next""#)
                .unwrap()
                .unwrap()
                .as_str(),
            "https://r.example/v2/a/tags/list?n=2&last=b"
        );
        assert_eq!(
            link(r#"<https://r.example/v2/a/tags/list?last=c>; rel=next"#)
                .unwrap()
                .unwrap()
                .as_str(),
            "https://r.example/v2/a/tags/list?last=c"
        );
        assert!(link(r#"</x>; rel="prev""#).unwrap().is_none());
        assert!(link(r#"<https://evil.example/v2/a/tags/list>; rel="next""#).is_err());
        assert!(link(r#"<http://r.example/v2/a/tags/list>; rel="next""#).is_err());
        assert!(link(r#"<https://r.example:8443/x>; rel="next""#).is_err());
    }
}
