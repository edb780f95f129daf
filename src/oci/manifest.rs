//! Manifest inspection: decide what a manifest is (image, index, schema 1),
//! reject ambiguous or self-contradicting ones, and pick an index entry for a
//! platform. The bytes themselves are never rewritten: callers get exactly
//! what the upstream sent.

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{Digest, MediaType, Platform};

/// Why manifest bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not a JSON object of the expected shape.
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    /// Has both `manifests` and `layers`/`config`.
    #[error("manifest is both an index (has `manifests`) and an image (has `layers` or `config`)")]
    Ambiguous,
    /// The body's `mediaType` disagrees with the response's `Content-Type`.
    #[error("manifest `mediaType` {body} contradicts Content-Type {header}")]
    Contradiction {
        /// The `mediaType` field.
        body: String,
        /// The `Content-Type` header.
        header: String,
    },
    /// The declared type says index but the body is an image, or the reverse.
    #[error("manifest declared as {declared} but its content is {actual}")]
    WrongShape {
        /// The declared media type.
        declared: String,
        /// What the body looks like.
        actual: &'static str,
    },
    /// Nothing tells what kind of manifest this is.
    #[error("cannot tell the manifest's media type (no mediaType, Content-Type or known shape)")]
    Unknown,
    /// An index entry has an invalid digest.
    #[error("index entry has an invalid digest: {0}")]
    BadEntry(String),
}

#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<IgnoredAny>,
    layers: Option<IgnoredAny>,
    config: Option<IgnoredAny>,
    #[serde(rename = "fsLayers")]
    fs_layers: Option<IgnoredAny>,
}

/// Content types that say nothing about which manifest a body is.
fn is_generic(content_type: &str) -> bool {
    matches!(
        content_type,
        "" | "application/json" | "text/plain" | "application/octet-stream"
    )
}

/// Works out the media type of manifest `bytes` served with `content_type`
/// (already stripped of parameters), refusing manifests that are both an
/// index and an image, or whose `mediaType` contradicts the `Content-Type`.
pub fn inspect(bytes: &[u8], content_type: &str) -> Result<MediaType, ManifestError> {
    let shape: Shape =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
    let is_index = shape.manifests.is_some();
    let is_image = shape.layers.is_some() || shape.config.is_some();
    if is_index && is_image {
        return Err(ManifestError::Ambiguous);
    }
    let header = content_type.to_ascii_lowercase();
    let body = shape.media_type.map(|m| m.to_ascii_lowercase());
    if let Some(body) = &body {
        if !is_generic(&header) && *body != header {
            return Err(ManifestError::Contradiction {
                body: body.clone(),
                header,
            });
        }
    }
    let declared = body.or_else(|| (!is_generic(&header)).then_some(header));
    let media_type = match declared {
        Some(declared) => MediaType::parse(&declared).map_err(|_| ManifestError::Unknown)?,
        None if is_index => MediaType::known(MediaType::OCI_INDEX),
        None if is_image => MediaType::known(MediaType::OCI_MANIFEST),
        None if shape.fs_layers.is_some() => MediaType::known(MediaType::DOCKER_SCHEMA1_SIGNED),
        None => return Err(ManifestError::Unknown),
    };
    if media_type.is_index() && is_image {
        return Err(ManifestError::WrongShape {
            declared: media_type.to_string(),
            actual: "an image manifest",
        });
    }
    if media_type.is_image() && is_index {
        return Err(ManifestError::WrongShape {
            declared: media_type.to_string(),
            actual: "an index",
        });
    }
    Ok(media_type)
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    digest: String,
    platform: Option<EntryPlatform>,
}

#[derive(Deserialize)]
struct EntryPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

/// The digest of the first entry of index `bytes` that serves `platform`, or
/// `None` when no entry does.
pub fn select_platform(bytes: &[u8], platform: &Platform) -> Result<Option<Digest>, ManifestError> {
    let index: Index =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
    let Some(entry) = index.manifests.into_iter().find(|e| {
        e.platform
            .as_ref()
            .is_some_and(|p| platform.matches(&p.os, &p.architecture, p.variant.as_deref()))
    }) else {
        return Ok(None);
    };
    Digest::parse(&entry.digest)
        .map(Some)
        .map_err(|e| ManifestError::BadEntry(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
    const INDEX: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
        {"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","platform":{"os":"linux","architecture":"amd64"}},
        {"digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","platform":{"os":"linux","architecture":"arm64"}},
        {"digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","platform":{"os":"linux","architecture":"arm","variant":"v7"}}]}"#;

    #[test]
    fn media_type_from_body_header_or_shape() {
        let bare_index = r#"{"schemaVersion":2,"manifests":[]}"#;
        let schema1 = r#"{"schemaVersion":1,"fsLayers":[]}"#;
        for (body, content_type, expected) in [
            (IMAGE, "", MediaType::OCI_MANIFEST),
            (IMAGE, MediaType::OCI_MANIFEST, MediaType::OCI_MANIFEST),
            (bare_index, "application/json", MediaType::OCI_INDEX),
            (
                bare_index,
                MediaType::DOCKER_MANIFEST_LIST,
                MediaType::DOCKER_MANIFEST_LIST,
            ),
            (
                schema1,
                MediaType::DOCKER_SCHEMA1_SIGNED,
                MediaType::DOCKER_SCHEMA1_SIGNED,
            ),
        ] {
            let found = inspect(body.as_bytes(), content_type).unwrap();
            assert_eq!(found.as_str(), expected, "{content_type:?}: {body}");
        }
    }

    #[test]
    fn refuses_ambiguous_and_contradicting_manifests() {
        let both = r#"{"schemaVersion":2,"manifests":[],"layers":[]}"#;
        assert_eq!(inspect(both.as_bytes(), ""), Err(ManifestError::Ambiguous));
        assert!(matches!(
            inspect(INDEX.as_bytes(), MediaType::OCI_MANIFEST),
            Err(ManifestError::Contradiction { .. })
        ));
        let index_typed_image = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","layers":[]}"#;
        assert!(matches!(
            inspect(index_typed_image.as_bytes(), ""),
            Err(ManifestError::WrongShape { .. })
        ));
        assert!(matches!(
            inspect(b"not json", ""),
            Err(ManifestError::Json(_))
        ));
        assert_eq!(inspect(b"{}", ""), Err(ManifestError::Unknown));
    }

    #[test]
    fn selects_platforms() {
        let pick = |os, arch, variant| {
            select_platform(INDEX.as_bytes(), &Platform::new(os, arch, variant).unwrap())
                .unwrap()
                .map(|d| d.as_str()[7..8].to_owned())
        };
        assert_eq!(pick("linux", "amd64", "").as_deref(), Some("1"));
        assert_eq!(pick("linux", "arm64", "").as_deref(), Some("2"));
        assert_eq!(pick("linux", "arm64", "v8").as_deref(), Some("2"));
        assert_eq!(pick("linux", "arm", "v7").as_deref(), Some("3"));
        assert_eq!(pick("linux", "arm", "v6"), None);
        assert_eq!(pick("windows", "amd64", ""), None);
    }
}
