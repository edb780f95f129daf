//! Conversions between protobuf messages and engine types. Requests are
//! checked here: a bad field becomes an [`InvalidField`] naming it.

use super::caller::Scoped;
use crate::oci::{
    Digest, MediaType, ParseError, Platform, PlatformField, Reference, Repository, Tag,
};
use crate::pb;
use crate::upstream::{
    BlobInfo, BlobMeta, BlobRange, BlobRequest, CacheStats, CircuitPhase, Manifest, ManifestMeta,
    ManifestRequest, Route, Source, TagPage, TagsRequest, UpstreamStatus,
};

/// A request field that failed validation.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    field: String,
    message: String,
}

impl InvalidField {
    fn new(field: impl Into<String>, message: impl ToString) -> Self {
        Self {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

fn parsed<T>(field: &str, result: Result<T, ParseError>) -> Result<T, InvalidField> {
    result.map_err(|e| InvalidField::new(field, e))
}

fn repository(value: &str) -> Result<Repository, InvalidField> {
    parsed("repository", Repository::parse(value))
}

/// The `upstream` field: empty for any.
fn route(upstream: String) -> Route {
    if upstream.is_empty() {
        Route::Any
    } else {
        Route::Upstream(upstream)
    }
}

fn accept(values: &[String]) -> Result<Vec<MediaType>, InvalidField> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parsed(&format!("accept[{i}]"), MediaType::parse(v)))
        .collect()
}

fn non_negative(field: &str, value: i64) -> Result<u64, InvalidField> {
    u64::try_from(value)
        .map_err(|_| InvalidField::new(field, format!("must not be negative (got {value})")))
}

fn platform(p: Option<pb::Platform>) -> Result<Option<Platform>, InvalidField> {
    let Some(p) = p else { return Ok(None) };
    Platform::new(&p.os, &p.architecture, &p.variant)
        .map(Some)
        .map_err(|(field, e)| {
            let name = match field {
                PlatformField::Os => "platform.os",
                PlatformField::Architecture => "platform.architecture",
                PlatformField::Variant => "platform.variant",
            };
            InvalidField::new(name, e)
        })
}

impl TryFrom<pb::FetchManifestRequest> for ManifestRequest {
    type Error = InvalidField;

    fn try_from(r: pb::FetchManifestRequest) -> Result<Self, Self::Error> {
        Ok(Self {
            repository: repository(&r.repository)?,
            reference: parsed("reference", Reference::parse(&r.reference))?,
            accept: accept(&r.accept)?,
            platform: platform(r.platform)?,
            route: route(r.upstream),
        })
    }
}

impl TryFrom<pb::HeadManifestRequest> for ManifestRequest {
    type Error = InvalidField;

    fn try_from(r: pb::HeadManifestRequest) -> Result<Self, Self::Error> {
        Ok(Self {
            repository: repository(&r.repository)?,
            reference: parsed("reference", Reference::parse(&r.reference))?,
            accept: accept(&r.accept)?,
            platform: None,
            route: route(r.upstream),
        })
    }
}

impl TryFrom<pb::FetchBlobRequest> for BlobRequest {
    type Error = InvalidField;

    fn try_from(r: pb::FetchBlobRequest) -> Result<Self, Self::Error> {
        let length = non_negative("length", r.length)?;
        Ok(Self {
            repository: repository(&r.repository)?,
            digest: parsed("digest", Digest::parse(&r.digest))?,
            range: BlobRange {
                offset: non_negative("offset", r.offset)?,
                length: (length > 0).then_some(length),
            },
            route: route(r.upstream),
        })
    }
}

/// A checked HeadBlob request.
pub struct HeadBlob {
    /// The repository.
    pub repository: Repository,
    /// The blob's digest.
    pub digest: Digest,
    /// Which upstreams to ask.
    pub route: Route,
}

impl TryFrom<pb::HeadBlobRequest> for HeadBlob {
    type Error = InvalidField;

    fn try_from(r: pb::HeadBlobRequest) -> Result<Self, Self::Error> {
        Ok(Self {
            repository: repository(&r.repository)?,
            digest: parsed("digest", Digest::parse(&r.digest))?,
            route: route(r.upstream),
        })
    }
}

impl TryFrom<pb::FetchTagsRequest> for TagsRequest {
    type Error = InvalidField;

    fn try_from(r: pb::FetchTagsRequest) -> Result<Self, Self::Error> {
        let n = usize::try_from(r.n)
            .map_err(|_| InvalidField::new("n", format!("must not be negative (got {})", r.n)))?;
        let last = if r.last.is_empty() {
            None
        } else {
            Some(parsed("last", Tag::parse(&r.last))?)
        };
        Ok(Self {
            repository: repository(&r.repository)?,
            n: (n > 0).then_some(n),
            last,
            route: route(r.upstream),
        })
    }
}

/// Sizes travel as `int64`; no blob comes near `i64::MAX` bytes.
fn int64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl From<Source> for pb::Source {
    fn from(s: Source) -> Self {
        Self {
            upstream: s.upstream,
            cache_hit: s.cache_hit,
        }
    }
}

impl From<Manifest> for pb::FetchManifestResponse {
    fn from(m: Manifest) -> Self {
        Self {
            size: int64(m.bytes.len() as u64),
            manifest: m.bytes,
            media_type: m.media_type.to_string(),
            digest: m.digest.to_string(),
            source: Some(m.source.into()),
        }
    }
}

impl From<Option<ManifestMeta>> for pb::HeadManifestResponse {
    fn from(meta: Option<ManifestMeta>) -> Self {
        match meta {
            None => Self::default(),
            Some(m) => Self {
                exists: true,
                media_type: m.media_type.to_string(),
                digest: m.digest.to_string(),
                size: int64(m.size),
                source: Some(m.source.into()),
            },
        }
    }
}

impl From<Option<BlobMeta>> for pb::HeadBlobResponse {
    fn from(meta: Option<BlobMeta>) -> Self {
        match meta {
            None => Self::default(),
            Some(m) => Self {
                exists: true,
                digest: m.digest.to_string(),
                size: int64(m.size),
                source: Some(m.source.into()),
            },
        }
    }
}

impl From<BlobInfo> for pb::BlobInfo {
    fn from(i: BlobInfo) -> Self {
        Self {
            digest: i.digest.to_string(),
            size: int64(i.size),
            source: Some(i.source.into()),
        }
    }
}

/// The FetchTags response; `name` echoes the repository as the caller wrote it.
pub fn tags_response(name: String, page: TagPage) -> pb::FetchTagsResponse {
    pb::FetchTagsResponse {
        name,
        tags: page.tags,
        next_last: page.next_last.unwrap_or_default(),
        source: Some(page.source.into()),
    }
}

/// A chunk of blob data as a stream message.
pub fn blob_data(offset: u64, data: bytes::Bytes) -> pb::FetchBlobResponse {
    pb::FetchBlobResponse {
        info: None,
        data,
        offset: int64(offset),
    }
}

impl From<CircuitPhase> for pb::CircuitState {
    fn from(phase: CircuitPhase) -> Self {
        match phase {
            CircuitPhase::Closed => Self::Closed,
            CircuitPhase::HalfOpen => Self::HalfOpen,
            CircuitPhase::Open => Self::Open,
        }
    }
}

impl From<UpstreamStatus> for pb::UpstreamStatus {
    fn from(u: UpstreamStatus) -> Self {
        let c = u.circuit;
        let (last_error, last_error_time) = match c.last_failure {
            Some((why, when)) => (why, Some(prost_types::Timestamp::from(when))),
            None => (String::new(), None),
        };
        Self {
            name: u.name,
            url: u.url,
            priority: u.priority,
            enabled: u.enabled,
            repositories: u.repositories,
            exclude: u.exclude,
            auth_type: u.auth_type.to_owned(),
            circuit: pb::CircuitState::from(c.phase) as i32,
            consecutive_failures: int64(c.consecutive_failures),
            last_error,
            last_error_time,
            requests: int64(c.requests),
            failures: int64(c.failures),
        }
    }
}

impl From<CacheStats> for pb::GetCacheStatsResponse {
    fn from(s: CacheStats) -> Self {
        Self {
            objects: int64(s.objects),
            bytes: int64(s.bytes),
            max_bytes: int64(s.max_bytes),
            tags: int64(s.tags),
            downloads_in_flight: int64(s.downloads_in_flight),
            hits: int64(s.hits),
            misses: int64(s.misses),
        }
    }
}

impl Scoped for ManifestRequest {
    fn repository(&self) -> &Repository {
        &self.repository
    }
}

impl Scoped for BlobRequest {
    fn repository(&self) -> &Repository {
        &self.repository
    }
}

impl Scoped for HeadBlob {
    fn repository(&self) -> &Repository {
        &self.repository
    }
}

impl Scoped for TagsRequest {
    fn repository(&self) -> &Repository {
        &self.repository
    }
}

/// The digest of an EvictObject request.
pub fn evict_digest(r: &pb::EvictObjectRequest) -> Result<Digest, InvalidField> {
    parsed("digest", Digest::parse(&r.digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let bad = |r: pb::FetchBlobRequest| BlobRequest::try_from(r).unwrap_err().to_string();
        let ok = pb::FetchBlobRequest {
            repository: "a/b".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            ..Default::default()
        };
        assert!(BlobRequest::try_from(ok.clone()).is_ok());
        assert!(
            bad(pb::FetchBlobRequest {
                repository: "A".into(),
                ..ok.clone()
            })
            .starts_with("repository:")
        );
        assert!(
            bad(pb::FetchBlobRequest {
                digest: "md5:00".into(),
                ..ok.clone()
            })
            .starts_with("digest:")
        );
        assert!(
            bad(pb::FetchBlobRequest {
                offset: -1,
                ..ok.clone()
            })
            .starts_with("offset:")
        );
        assert!(bad(pb::FetchBlobRequest { length: -1, ..ok }).starts_with("length:"));

        let m = pb::FetchManifestRequest {
            repository: "a".into(),
            reference: "v1".into(),
            accept: vec!["a/b\r\nx: y".into()],
            ..Default::default()
        };
        assert!(
            ManifestRequest::try_from(m)
                .unwrap_err()
                .to_string()
                .starts_with("accept[0]:")
        );
        let m = pb::FetchManifestRequest {
            repository: "a".into(),
            reference: "v1".into(),
            platform: Some(pb::Platform {
                os: "linux".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            ManifestRequest::try_from(m)
                .unwrap_err()
                .to_string()
                .starts_with("platform.architecture:")
        );
        let t = pb::FetchTagsRequest {
            repository: "a".into(),
            n: -1,
            ..Default::default()
        };
        assert!(
            TagsRequest::try_from(t)
                .unwrap_err()
                .to_string()
                .starts_with("n:")
        );
        let t = pb::FetchTagsRequest {
            repository: "a".into(),
            last: "a/b".into(),
            ..Default::default()
        };
        assert!(
            TagsRequest::try_from(t)
                .unwrap_err()
                .to_string()
                .starts_with("last:")
        );
    }
}
