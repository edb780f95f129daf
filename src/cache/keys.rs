//! Typed cache keys. Each names what it identifies by its parts, so equality
//! and hashing follow the parts, never a message's wording. `Display` gives
//! the text form: for [`TagKey`] it is persisted (the tag entry's file name
//! is derived from it), so it must stay as it is.

use std::fmt;

use crate::oci::{Digest, MediaType, Reference, Repository, Tag};

/// A tag entry: what was asked, of which upstreams, with which acceptable
/// types (the answer may depend on each of them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TagKey {
    repository: Repository,
    tag: Tag,
    upstream: Option<String>,
    accept: Vec<MediaType>,
}

impl TagKey {
    /// The key of `repository:tag` asked of `upstream` (or of every
    /// candidate) accepting `accept`.
    pub(crate) fn new(
        repository: &Repository,
        tag: &Tag,
        upstream: Option<&str>,
        accept: &[MediaType],
    ) -> Self {
        Self {
            repository: repository.clone(),
            tag: tag.clone(),
            upstream: upstream.map(str::to_owned),
            accept: accept.to_vec(),
        }
    }
}

impl fmt::Display for TagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} upstream={} accept=",
            self.repository,
            self.tag,
            self.upstream.as_deref().unwrap_or("*")
        )?;
        for (i, media_type) in self.accept.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(media_type.as_str())?;
        }
        Ok(())
    }
}

/// What one caller fetches while concurrent callers for the same thing wait.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LockKey {
    /// A blob download, by digest.
    Blob(Digest),
    /// A manifest, by digest.
    Manifest(Digest),
    /// A tag resolution (and its background refresh).
    Tag(TagKey),
}

/// What an upstream answered "not found" for, as a caller asked it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum NegativeKey {
    /// A manifest by tag or digest.
    Manifest(Repository, Reference),
    /// A blob.
    Blob(Repository, Digest),
    /// A repository's tag list.
    Tags(Repository),
}

impl fmt::Display for NegativeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NegativeKey::Manifest(repository, Reference::Tag(tag)) => {
                write!(f, "manifest `{repository}:{tag}`")
            }
            NegativeKey::Manifest(repository, Reference::Digest(digest)) => {
                write!(f, "manifest `{repository}@{digest}`")
            }
            NegativeKey::Blob(repository, digest) => write!(f, "blob `{repository}@{digest}`"),
            NegativeKey::Tags(repository) => write!(f, "tags of `{repository}`"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_keys_keep_their_persisted_text() {
        let repository = Repository::parse("library/nginx").unwrap();
        let tag = Tag::parse("1.27").unwrap();
        let accept = [
            MediaType::known(MediaType::OCI_INDEX),
            MediaType::known(MediaType::OCI_MANIFEST),
        ];
        assert_eq!(
            TagKey::new(&repository, &tag, None, &accept).to_string(),
            "library/nginx:1.27 upstream=* accept=application/vnd.oci.image.index.v1+json,application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            TagKey::new(&repository, &tag, Some("hub"), &[]).to_string(),
            "library/nginx:1.27 upstream=hub accept="
        );
    }

    #[test]
    fn negative_keys_name_what_was_asked() {
        let repository = Repository::parse("a/b").unwrap();
        let digest = crate::oci::Algorithm::Sha256.digest(b"x");
        let tag = Reference::parse("v1").unwrap();
        assert_eq!(
            NegativeKey::Manifest(repository.clone(), tag).to_string(),
            "manifest `a/b:v1`"
        );
        assert_eq!(
            NegativeKey::Blob(repository.clone(), digest.clone()).to_string(),
            format!("blob `a/b@{digest}`")
        );
        assert_eq!(NegativeKey::Tags(repository).to_string(), "tags of `a/b`");
    }
}
