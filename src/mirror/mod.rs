//! The OCI HTTP mirror on `mirror_listen` (DESIGN §9): the pull side of the
//! distribution API, served from the same engine and cache as gRPC, so a
//! layer one front fetched is a cache hit for the other. `GET /v2/`,
//! `GET`/`HEAD` of manifests and blobs (with `Range`), `GET` of tag lists
//! (`n`, `last`, `Link`); push, delete and anything else answer with the
//! spec's status and error body ([`error`]). containerd's `?ns=` picks the
//! upstreams that answer for that registry host. Callers present their
//! token as `Authorization: Bearer`, as on gRPC.
//!
//! A thin adapter: it parses requests ([`path`]), asks the engine, and
//! writes responses; the engine knows nothing of it.

mod error;
mod path;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::access::{Access, Identity, Presented, bearer_token};
use crate::admission::{Admission, Permit};
use crate::idle;
use crate::oci::{Digest, Reference, Repository, Tag};
use crate::upstream::{BlobRange, BlobRequest, Engine, ManifestRequest, Route, TagsRequest};
use error::{Asked, MirrorError};
use path::{ByteRange, Endpoint, accepted};

const DIGEST_HEADER: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION_HEADER: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const NAMESPACE_HEADER: HeaderName = HeaderName::from_static("oci-namespace");

/// What the mirror serves from.
#[derive(Debug, Clone)]
pub struct Mirror {
    engine: Arc<Engine>,
    access: Arc<Access>,
    admission: Arc<Admission>,
    /// `stream_idle_timeout`: a blob body its client reads nothing of for
    /// this long is cut, and what it held released.
    idle: Duration,
}

impl Mirror {
    /// The mirror of `engine`, for the callers of `access`, its requests
    /// admitted by the gate gRPC calls pass too (`max_concurrent_rpcs`
    /// counts both fronts; the drain waits for both). A blob body unread
    /// for `idle` is cut short.
    pub fn new(
        engine: Arc<Engine>,
        access: Arc<Access>,
        admission: Arc<Admission>,
        idle: Duration,
    ) -> Self {
        Self {
            engine,
            access,
            admission,
            idle,
        }
    }
}

/// Serves the mirror on `listener` until `shutdown` resolves (then requests
/// under way finish; new connections are refused).
pub async fn serve(
    listener: TcpListener,
    mirror: Mirror,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().fallback(answer).with_state(Arc::new(mirror));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// One request: answered, counted, and stamped with the API version header
/// (clients check it on `/v2/`).
async fn answer(State(mirror): State<Arc<Mirror>>, request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let (parts, _) = request.into_parts();
    let endpoint = Endpoint::parse(parts.uri.path());
    let route = endpoint.label();
    let namespace = namespace(parts.uri.query());
    let span = tracing::debug_span!("mirror", %method, path = %parts.uri.path(), ns = namespace.as_deref());
    let mut response = {
        let _entered = span.enter();
        mirror
            .respond(
                &method,
                endpoint,
                &parts.headers,
                parts.uri.query(),
                namespace.as_deref(),
            )
            .await
            .unwrap_or_else(IntoResponse::into_response)
    };
    response
        .headers_mut()
        .insert(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"));
    if let Some(ns) = namespace.and_then(|ns| HeaderValue::from_str(&ns).ok()) {
        response.headers_mut().insert(NAMESPACE_HEADER, ns);
    }
    let http = &mirror.engine.metrics().http;
    http.requests
        .with_label_values(&[route, method_label(&method), response.status().as_str()])
        .inc();
    http.duration
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The `method` label: the methods of the API, else `other` (no label
/// value comes from the request).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// containerd's `ns` query parameter: the registry host it pulls for.
fn namespace(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == "ns")
        .map(|(_, value)| value.trim().to_ascii_lowercase())
        .filter(|value| !value.is_empty())
}

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

impl Mirror {
    async fn respond(
        &self,
        method: &Method,
        endpoint: Endpoint<'_>,
        headers: &HeaderMap,
        query: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Response, MirrorError> {
        if matches!(endpoint, Endpoint::Unknown) {
            return Err(MirrorError::no_endpoint());
        }
        let permit = self.admission.admit()?;
        let caller = self.identify(headers)?;
        if matches!(endpoint, Endpoint::Upload) {
            return Err(MirrorError::unsupported(
                "this mirror serves pulls only: no uploads",
                "",
            ));
        }
        if !matches!(*method, Method::GET | Method::HEAD) {
            return Err(MirrorError::unsupported(
                "this mirror serves pulls only (GET and HEAD)",
                "GET, HEAD",
            ));
        }
        let route = match namespace {
            Some(host) => Route::Namespace(host.to_owned()),
            None => Route::Any,
        };
        let head = *method == Method::HEAD;
        match endpoint {
            Endpoint::Base => {
                Ok(([(header::CONTENT_TYPE, "application/json")], "{}").into_response())
            }
            Endpoint::Manifest { name, reference } => {
                let repository = readable(&caller, name)?;
                let reference = Reference::parse(reference).map_err(|e| {
                    if reference.contains(':') {
                        MirrorError::digest_invalid(e.to_string())
                    } else {
                        MirrorError::unknown(Asked::Manifest, e.to_string())
                    }
                })?;
                let request = ManifestRequest {
                    repository,
                    reference,
                    accept: accepted(headers),
                    platform: None,
                    route,
                };
                self.manifest(request, head).await
            }
            Endpoint::Blob { name, digest } => {
                let repository = readable(&caller, name)?;
                let digest = Digest::parse(digest)
                    .map_err(|e| MirrorError::digest_invalid(e.to_string()))?;
                if head {
                    self.head_blob(&repository, &digest, &route).await
                } else {
                    self.blob(repository, digest, route, ByteRange::of(headers), permit)
                        .await
                }
            }
            Endpoint::Tags { name } => {
                let repository = readable(&caller, name)?;
                self.tags(name, repository, query, route).await
            }
            Endpoint::Upload | Endpoint::Unknown => Err(MirrorError::no_endpoint()),
        }
    }

    /// Who sent the request; 401 with the challenge when callers are
    /// configured and it names none of them.
    fn identify(&self, headers: &HeaderMap) -> Result<Identity<'_>, MirrorError> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        Ok(self.access.identify(Presented {
            bearer,
            certificate_sans: &[],
        })?)
    }

    async fn manifest(
        &self,
        request: ManifestRequest,
        head: bool,
    ) -> Result<Response, MirrorError> {
        let reference = request.reference.to_string();
        let headers = |media_type: &str, digest: &Digest, size: u64| {
            [
                (header::CONTENT_TYPE, media_type.to_owned()),
                (DIGEST_HEADER, digest.to_string()),
                (header::CONTENT_LENGTH, size.to_string()),
                (header::ETAG, format!("\"{digest}\"")),
            ]
        };
        if head {
            let meta = self
                .engine
                .head_manifest(request)
                .await
                .map_err(|e| MirrorError::from_engine(e, Asked::Manifest))?
                .ok_or_else(|| {
                    MirrorError::unknown(
                        Asked::Manifest,
                        format!("manifest `{reference}` not found"),
                    )
                })?;
            return Ok(headers(meta.media_type.as_str(), &meta.digest, meta.size).into_response());
        }
        let manifest = self
            .engine
            .fetch_manifest(request)
            .await
            .map_err(|e| MirrorError::from_engine(e, Asked::Manifest))?;
        let size = manifest.bytes.len() as u64;
        Ok((
            headers(manifest.media_type.as_str(), &manifest.digest, size),
            manifest.bytes,
        )
            .into_response())
    }

    async fn head_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
        route: &Route,
    ) -> Result<Response, MirrorError> {
        let meta = self
            .engine
            .head_blob(repository, digest, route)
            .await
            .map_err(|e| MirrorError::from_engine(e, Asked::Blob))?
            .ok_or_else(|| {
                MirrorError::unknown(Asked::Blob, format!("blob `{digest}` not found"))
            })?;
        Ok(blob_headers(digest, meta.size, None).into_response())
    }

    /// A blob, or the span of it `range` asks for (206), streamed: the
    /// engine holds its last bytes until the digest passed, and on a
    /// mismatch the body ends short of its `Content-Length`, so the client
    /// rejects it.
    async fn blob(
        &self,
        repository: Repository,
        digest: Digest,
        route: Route,
        range: Option<ByteRange>,
        permit: Permit,
    ) -> Result<Response, MirrorError> {
        // A suffix range needs the size before the first byte (and a
        // backwards one, for its 416's Content-Range).
        let span = match range {
            Some(range @ (ByteRange::Suffix(_) | ByteRange::Backwards)) => {
                let meta = self
                    .engine
                    .head_blob(&repository, &digest, &route)
                    .await
                    .map_err(|e| MirrorError::from_engine(e, Asked::Blob))?
                    .ok_or_else(|| {
                        MirrorError::unknown(Asked::Blob, format!("blob `{digest}` not found"))
                    })?;
                Some(
                    range
                        .span(meta.size)
                        .ok_or_else(|| MirrorError::range_unsatisfiable(meta.size))?,
                )
            }
            Some(ByteRange::From { first, last }) => {
                Some((first, last.map_or(u64::MAX, |l| l.saturating_add(1))))
            }
            None => None,
        };
        let (offset, end) = span.unwrap_or((0, u64::MAX));
        let request = BlobRequest {
            repository,
            digest: digest.clone(),
            range: BlobRange {
                offset,
                length: (end != u64::MAX).then(|| end - offset),
            },
            route,
        };
        let blob = self
            .engine
            .fetch_blob(request)
            .await
            .map_err(|e| MirrorError::from_engine(e, Asked::Blob))?;
        let size = blob.info.size;
        if span.is_some() && offset >= size {
            return Err(MirrorError::range_unsatisfiable(size));
        }
        let end = end.min(size);
        let chunks = blob.chunks.map(|item| {
            item.map(|chunk| chunk.data).map_err(|e| {
                tracing::warn!(error = %crate::telemetry::describe(&e), "blob stream cut short");
                std::io::Error::other(e)
            })
        });
        // The permit is held until the body ends, its client leaves, or the
        // client has read nothing for the idle timeout.
        let body = Body::from_stream(idle::bounded(
            chunks,
            self.idle,
            permit,
            tracing::Span::current(),
            |idle| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client read nothing for {idle:?} (stream_idle_timeout)"),
                )
            },
        ));
        let partial = span.map(|_| (offset, end, size));
        let status = if partial.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        Ok((status, blob_headers(&digest, end - offset, partial), body).into_response())
    }

    async fn tags(
        &self,
        name: &str,
        repository: Repository,
        query: Option<&str>,
        route: Route,
    ) -> Result<Response, MirrorError> {
        let n = match query_value(query, "n") {
            None => None,
            Some(n) => Some(n.parse::<usize>().map_err(|_| {
                MirrorError::plain(
                    StatusCode::BAD_REQUEST,
                    format!("n must be a number of tags (got {n:?})"),
                )
            })?),
        };
        let last = query_value(query, "last")
            .filter(|l| !l.is_empty())
            .map(|l| {
                Tag::parse(&l).map_err(|e| {
                    MirrorError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string())
                })
            })
            .transpose()?;
        let json = |tags: &[String]| serde_json::json!({ "name": name, "tags": tags }).to_string();
        // `n=0` is an empty list, whatever the repository holds.
        if n == Some(0) {
            return Ok(([(header::CONTENT_TYPE, "application/json")], json(&[])).into_response());
        }
        let page = self
            .engine
            .fetch_tags(TagsRequest {
                repository,
                n,
                last,
                route: route.clone(),
            })
            .await
            .map_err(|e| MirrorError::from_engine(e, Asked::Tags))?;
        let mut response = (
            [(header::CONTENT_TYPE, "application/json")],
            json(&page.tags),
        )
            .into_response();
        if let (Some(n), Some(next)) = (n, &page.next_last) {
            let mut link = url::form_urlencoded::Serializer::new(String::new());
            link.append_pair("n", &n.to_string())
                .append_pair("last", next);
            if let Route::Namespace(ns) = &route {
                link.append_pair("ns", ns);
            }
            let value = format!("</v2/{name}/tags/list?{}>; rel=\"next\"", link.finish());
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(header::LINK, value);
            }
        }
        Ok(response)
    }
}

/// The repository `name`, when it is one and `caller` may read it.
fn readable(caller: &Identity<'_>, name: &str) -> Result<Repository, MirrorError> {
    let repository =
        Repository::parse(name).map_err(|e| MirrorError::name_invalid(e.to_string()))?;
    caller.may_read(&repository)?;
    Ok(repository)
}

/// The headers of a blob answer of `length` bytes (`partial`: the span's
/// start, end and the blob's size).
fn blob_headers(digest: &Digest, length: u64, partial: Option<(u64, u64, u64)>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut set = |name: HeaderName, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set(header::CONTENT_TYPE, "application/octet-stream".to_owned());
    set(DIGEST_HEADER, digest.to_string());
    set(header::CONTENT_LENGTH, length.to_string());
    set(header::ACCEPT_RANGES, "bytes".to_owned());
    set(header::ETAG, format!("\"{digest}\""));
    if let Some((start, end, size)) = partial {
        set(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    headers
}
