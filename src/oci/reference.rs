//! Manifest references: a tag or a digest.

use std::fmt;

use super::{Digest, ParseError};

/// A tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// Parses and validates a tag.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        const RULE: &str = "tag must match [A-Za-z0-9_][A-Za-z0-9._-]{0,127}";
        let bytes = s.as_bytes();
        let Some(&first) = bytes.first() else {
            return Err(ParseError::new("tag is empty", s));
        };
        if bytes.len() > 128 {
            return Err(ParseError::new("tag is longer than 128 characters", s));
        }
        let ok_first = first.is_ascii_alphanumeric() || first == b'_';
        let ok_rest = bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok_first || !ok_rest {
            return Err(ParseError::new(RULE, s));
        }
        Ok(Self(s.to_owned()))
    }

    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a tag (mutable) or a digest (immutable).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A tag such as `1.27`.
    Tag(Tag),
    /// A digest such as `sha256:...`.
    Digest(Digest),
}

impl Reference {
    /// Parses a tag or, when the string contains `:`, a digest.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }

    /// The reference as it appears in a URL path.
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(t) => t.as_str(),
            Reference::Digest(d) => d.as_str(),
        }
    }

    /// The digest, when the reference is one.
    pub fn digest(&self) -> Option<&Digest> {
        match self {
            Reference::Tag(_) => None,
            Reference::Digest(d) => Some(d),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        let max = "a".repeat(128);
        for ok in ["latest", "1.27", "_x", "A-b.c_d", max.as_str()] {
            assert!(Tag::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            ".x",
            "-x",
            "a/b",
            "a b",
            "a?b",
            "a#b",
            "a%2F",
            "a\n",
            long.as_str(),
        ] {
            assert!(Tag::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn references_pick_tag_or_digest() {
        assert!(matches!(Reference::parse("v1"), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
        assert!(Reference::parse("sha256:zz").is_err());
        assert!(Reference::parse("a:b").is_err());
    }
}
