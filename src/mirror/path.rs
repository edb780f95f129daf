//! What a mirror request asks for: its path as one of the distribution
//! API's endpoints (names and references still unparsed), its `Range`
//! header, and the `Accept` header values merged into media types.

use axum::http::HeaderMap;
use axum::http::header::{ACCEPT, RANGE};

use crate::oci::MediaType;

/// An endpoint of the distribution API, by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint<'a> {
    /// `/v2/`.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest { name: &'a str, reference: &'a str },
    /// `/v2/<name>/blobs/<digest>`.
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<name>/tags/list`.
    Tags { name: &'a str },
    /// `/v2/<name>/blobs/uploads/...`: the push side.
    Upload,
    /// Anything else.
    Unknown,
}

impl<'a> Endpoint<'a> {
    /// The endpoint `path` names. A name may hold `/`; a reference, a
    /// digest and an upload id do not, so the last segments decide.
    pub(crate) fn parse(path: &'a str) -> Self {
        let Some(rest) = path.strip_prefix("/v2") else {
            return Self::Unknown;
        };
        let rest = match rest {
            "" | "/" => return Self::Base,
            _ => match rest.strip_prefix('/') {
                Some(rest) => rest,
                None => return Self::Unknown,
            },
        };
        if rest.contains("/blobs/uploads/") || rest.ends_with("/blobs/uploads") {
            return Self::Upload;
        }
        let Some((head, last)) = rest.rsplit_once('/') else {
            return Self::Unknown;
        };
        let Some((name, kind)) = head.rsplit_once('/') else {
            return Self::Unknown;
        };
        if name.is_empty() || last.is_empty() {
            return Self::Unknown;
        }
        match (kind, last) {
            ("manifests", reference) => Self::Manifest { name, reference },
            ("blobs", digest) => Self::Blob { name, digest },
            ("tags", "list") => Self::Tags { name },
            _ => Self::Unknown,
        }
    }

    /// The `route` label of the HTTP metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Manifest { .. } => "manifest",
            Self::Blob { .. } => "blob",
            Self::Tags { .. } => "tags",
            Self::Upload | Self::Unknown => "other",
        }
    }
}

/// The media types of every `Accept` header line (clients such as skopeo
/// send one line per type), without parameters; wildcards and values that
/// are not media types are left out. Empty means "any".
pub(crate) fn accepted(headers: &HeaderMap) -> Vec<MediaType> {
    let mut types: Vec<MediaType> = Vec::new();
    for value in headers.get_all(ACCEPT) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for item in value.split(',') {
            let media_type = item.split(';').next().unwrap_or_default().trim();
            if media_type.contains('*') {
                continue;
            }
            if let Ok(parsed) = MediaType::parse(media_type) {
                if !types.contains(&parsed) {
                    types.push(parsed);
                }
            }
        }
    }
    types
}

/// A `Range` request for one span of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteRange {
    /// `bytes=FIRST-` or `bytes=FIRST-LAST` (`LAST` inclusive).
    From { first: u64, last: Option<u64> },
    /// `bytes=-N`: the last `N` bytes.
    Suffix(u64),
    /// `bytes=LAST-FIRST`, ending before it starts: never satisfiable.
    Backwards,
}

impl ByteRange {
    /// The single range of a `Range` header; `None` when there is none, or
    /// it is not one `bytes` range (several ranges, another unit, nonsense),
    /// which HTTP lets a server answer with the whole blob. A range that
    /// ends before it starts is kept, to be refused (416), as Distribution
    /// and the conformance suite do.
    pub(crate) fn of(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(RANGE)?.to_str().ok()?.trim();
        let spec = value.strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (first, last) = spec.split_once('-')?;
        let (first, last) = (first.trim(), last.trim());
        if first.is_empty() {
            return last.parse().ok().map(Self::Suffix);
        }
        let first = first.parse().ok()?;
        let last = match last {
            "" => None,
            last => Some(last.parse().ok()?),
        };
        if last.is_some_and(|last| last < first) {
            return Some(Self::Backwards);
        }
        Some(Self::From { first, last })
    }

    /// The span `[start, end)` of a blob of `size` bytes; `None` when the
    /// range is not satisfiable (it starts at or after the end, or asks for
    /// the last 0 bytes).
    pub(crate) fn span(self, size: u64) -> Option<(u64, u64)> {
        match self {
            Self::From { first, .. } if first >= size => None,
            Self::From { first, last } => Some((first, last.map_or(size, |l| (l + 1).min(size)))),
            Self::Suffix(0) | Self::Backwards => None,
            Self::Suffix(n) => Some((size.saturating_sub(n), size)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn paths_name_their_endpoint_with_names_of_several_segments() {
        use Endpoint::*;
        for (path, want) in [
            ("/v2/", Base),
            ("/v2", Base),
            (
                "/v2/library/nginx/manifests/1.27",
                Manifest {
                    name: "library/nginx",
                    reference: "1.27",
                },
            ),
            (
                "/v2/a/manifests/b/manifests/sha256:00",
                Manifest {
                    name: "a/manifests/b",
                    reference: "sha256:00",
                },
            ),
            (
                "/v2/x/blobs/sha256:ab",
                Blob {
                    name: "x",
                    digest: "sha256:ab",
                },
            ),
            ("/v2/team/app/tags/list", Tags { name: "team/app" }),
            ("/v2/team/app/blobs/uploads/", Upload),
            ("/v2/team/app/blobs/uploads/0f3c", Upload),
            ("/v2/_catalog", Unknown),
            ("/v2/manifests/x", Unknown),
            ("/v2/a/manifests/", Unknown),
            ("/v2x/a/tags/list", Unknown),
            ("/metrics", Unknown),
        ] {
            assert_eq!(Endpoint::parse(path), want, "{path}");
        }
    }

    #[test]
    fn every_accept_line_is_merged() {
        let mut headers = HeaderMap::new();
        headers.append(
            ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        headers.append(
            ACCEPT,
            HeaderValue::from_static(
                "application/vnd.docker.distribution.manifest.v2+json; q=0.9, */*",
            ),
        );
        headers.append(
            ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        let types: Vec<String> = accepted(&headers).iter().map(ToString::to_string).collect();
        assert_eq!(
            types,
            [MediaType::OCI_MANIFEST, MediaType::DOCKER_MANIFEST],
            "both types once, no wildcard"
        );
        assert!(accepted(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn ranges_are_one_bytes_span_or_ignored() {
        let of = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(RANGE, HeaderValue::from_static(v));
            ByteRange::of(&h)
        };
        assert_eq!(
            of("bytes=0-99"),
            Some(ByteRange::From {
                first: 0,
                last: Some(99)
            })
        );
        assert_eq!(
            of("bytes=100-"),
            Some(ByteRange::From {
                first: 100,
                last: None
            })
        );
        assert_eq!(of("bytes=-10"), Some(ByteRange::Suffix(10)));
        assert_eq!(of("bytes=5-2"), Some(ByteRange::Backwards));
        assert_eq!(ByteRange::Backwards.span(1000), None);
        for ignored in ["bytes=0-1,5-6", "items=0-1", "bytes=x-", "bytes="] {
            assert_eq!(of(ignored), None, "{ignored}");
        }
        let r = |first, last| ByteRange::From { first, last };
        assert_eq!(r(0, Some(99)).span(1000), Some((0, 100)));
        assert_eq!(r(990, Some(2000)).span(1000), Some((990, 1000)));
        assert_eq!(r(1000, None).span(1000), None);
        assert_eq!(ByteRange::Suffix(10).span(1000), Some((990, 1000)));
        assert_eq!(ByteRange::Suffix(5000).span(1000), Some((0, 1000)));
        assert_eq!(ByteRange::Suffix(0).span(1000), None);
    }
}
