//! Media types: the manifest types the service knows and validation of
//! caller-supplied `Accept` values.

use std::fmt;

use super::ParseError;

/// A media type such as `application/vnd.oci.image.manifest.v1+json`: a
/// `type/subtype` of RFC 6838 restricted-name characters, so it can go into
/// an HTTP header unchanged (no spaces, commas, parameters or line breaks).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MediaType(String);

impl MediaType {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &'static str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &'static str = "application/vnd.oci.image.index.v1+json";
    /// Docker image manifest, schema 2.
    pub const DOCKER_MANIFEST: &'static str =
        "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_MANIFEST_LIST: &'static str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker schema 1 manifest (only when asked for explicitly).
    pub const DOCKER_SCHEMA1: &'static str = "application/vnd.docker.distribution.manifest.v1+json";
    /// Signed Docker schema 1 manifest.
    pub const DOCKER_SCHEMA1_SIGNED: &'static str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";

    /// What the service asks for when the caller names no types.
    pub const DEFAULT_ACCEPT: [&'static str; 4] = [
        Self::OCI_MANIFEST,
        Self::OCI_INDEX,
        Self::DOCKER_MANIFEST,
        Self::DOCKER_MANIFEST_LIST,
    ];

    /// Every manifest type the service knows by name.
    pub const KNOWN: [&'static str; 6] = [
        Self::OCI_MANIFEST,
        Self::OCI_INDEX,
        Self::DOCKER_MANIFEST,
        Self::DOCKER_MANIFEST_LIST,
        Self::DOCKER_SCHEMA1,
        Self::DOCKER_SCHEMA1_SIGNED,
    ];

    /// Parses and validates a media type.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        const RULE: &str = "media type must be type/subtype of letters, digits and !#$&^_.+-";
        let Some((ty, sub)) = s.split_once('/') else {
            return Err(ParseError::new(RULE, s));
        };
        let name_ok = |part: &str| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 127
                && b[0].is_ascii_alphanumeric()
                && b.iter().all(|&c| {
                    c.is_ascii_alphanumeric()
                        || matches!(
                            c,
                            b'!' | b'#' | b'$' | b'&' | b'^' | b'_' | b'.' | b'+' | b'-'
                        )
                })
        };
        if !name_ok(ty) || !name_ok(sub) {
            return Err(ParseError::new(RULE, s));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// Builds a known-good constant; only for the constants above.
    pub(crate) fn known(s: &'static str) -> Self {
        Self(s.to_owned())
    }

    /// The media type as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for an OCI index or a Docker manifest list.
    pub fn is_index(&self) -> bool {
        self.0 == Self::OCI_INDEX || self.0 == Self::DOCKER_MANIFEST_LIST
    }

    /// True for an OCI image manifest or a Docker schema 2 manifest.
    pub fn is_image(&self) -> bool {
        self.0 == Self::OCI_MANIFEST || self.0 == Self::DOCKER_MANIFEST
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_registry_types_and_rejects_header_injection() {
        for ok in MediaType::DEFAULT_ACCEPT {
            assert_eq!(MediaType::parse(ok).unwrap().as_str(), ok);
        }
        assert!(MediaType::parse(MediaType::DOCKER_SCHEMA1_SIGNED).is_ok());
        for bad in [
            "",
            "application",
            "application/",
            "/json",
            "a/b, c/d",
            "a/b\r\nX-Evil: 1",
            "a/b; q=1",
            "a /b",
        ] {
            assert!(MediaType::parse(bad).is_err(), "{bad:?}");
        }
    }
}
