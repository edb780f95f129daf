//! Errors of the engine. A [`Fault`] is one upstream's failure to give a
//! usable answer; the engine tries the next candidate after one, and folds
//! all of them into the request's final [`Error`] when none succeeds.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::CacheError;
use crate::oci::{Digest, Platform};

/// What kind of failure one upstream's answer was. The order of precedence
/// when several upstreams fail is in [`Faults::into_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The upstream answered authoritatively that it does not have it.
    NotFound,
    /// The upstream refused our credentials.
    Denied,
    /// The upstream rate-limited us.
    RateLimited,
    /// The upstream could not answer (network, timeout, 5xx, unusable reply).
    Unavailable,
    /// The upstream sent content that does not match its digest.
    Integrity,
}

/// One upstream's failure, with an actionable message (never a secret).
#[derive(Debug, Clone)]
pub struct Fault {
    kind: FaultKind,
    message: String,
    retry_after: Option<Duration>,
    retryable: bool,
}

impl Fault {
    /// A fault of `kind` described by `message`.
    pub fn new(kind: FaultKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
            retryable: false,
        }
    }

    /// Marks the fault as worth retrying on the same upstream (a connection
    /// refused or reset before an answer).
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    /// True when the same request may succeed if sent again.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// True when the fault counts against the upstream's health (for its
    /// circuit breaker): it could not answer, as opposed to answering "no".
    pub fn is_upstream_failure(&self) -> bool {
        self.kind == FaultKind::Unavailable
    }

    /// The upstream could not answer.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(FaultKind::Unavailable, message)
    }

    /// The upstream sent content that fails verification.
    pub fn integrity(message: impl Into<String>) -> Self {
        Self::new(FaultKind::Integrity, message)
    }

    /// Adds the delay the upstream asked for (`Retry-After`).
    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> FaultKind {
        self.kind
    }

    /// True when the upstream said it does not have the content.
    pub fn is_not_found(&self) -> bool {
        self.kind == FaultKind::NotFound
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The faults of every upstream tried for one request, in the order tried.
#[derive(Debug, Clone, Default)]
pub struct Faults(Vec<Fault>);

impl Faults {
    /// Records one more fault.
    pub fn push(&mut self, fault: Fault) {
        self.0.push(fault);
    }

    /// The faults, in the order the upstreams were tried.
    pub fn iter(&self) -> impl Iterator<Item = &Fault> {
        self.0.iter()
    }

    /// The request's outcome when no upstream gave an answer. An upstream
    /// that could not answer makes the whole request UNAVAILABLE (another
    /// one's "not found" is not authoritative then); then rate limits, then
    /// corrupt content, then refused credentials; "not found" only when every
    /// upstream said so.
    pub fn into_error(self) -> Error {
        let any = |k| self.0.iter().any(|f| f.kind == k);
        if any(FaultKind::Unavailable) {
            Error::Unavailable(self)
        } else if any(FaultKind::RateLimited) {
            let retry_after = self.0.iter().filter_map(|f| f.retry_after).max();
            Error::RateLimited {
                faults: self,
                retry_after,
            }
        } else if any(FaultKind::Integrity) {
            Error::DataLoss(self)
        } else if any(FaultKind::Denied) {
            Error::PermissionDenied(self)
        } else {
            Error::NotFound(self)
        }
    }
}

impl From<Fault> for Faults {
    fn from(fault: Fault) -> Self {
        Self(vec![fault])
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, fault) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            fault.fmt(f)?;
        }
        Ok(())
    }
}

/// Why the engine could not answer a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request named an upstream that is not configured.
    #[error("upstream: unknown upstream `{0}` (not in the configuration)")]
    UnknownUpstream(String),
    /// No enabled upstream's rules admit the repository.
    #[error("no enabled upstream's repository rules admit `{0}`")]
    NoRoute(String),
    /// The request named a registry host (the mirror's `?ns=`) that no
    /// upstream answers for.
    #[error("no upstream answers for registry `{0}`")]
    UnknownNamespace(String),
    /// The named upstream's rules exclude the repository.
    #[error(
        "upstream `{upstream}` does not serve `{repository}` (excluded by its repository rules)"
    )]
    NotRouted {
        /// The upstream the caller named.
        upstream: String,
        /// The repository.
        repository: String,
    },
    /// Every eligible upstream answered "not found".
    #[error("{0}")]
    NotFound(Faults),
    /// The index has no manifest for the requested platform.
    #[error(
        "index `{reference}` from upstream `{upstream}` has no manifest for platform {platform}"
    )]
    PlatformNotFound {
        /// `repository:tag` or `repository@digest` of the index.
        reference: String,
        /// The upstream that served the index.
        upstream: String,
        /// The requested platform.
        platform: Platform,
    },
    /// The upstreams refused our credentials and none had the content.
    #[error("{0}")]
    PermissionDenied(Faults),
    /// An upstream rate-limited us and none could answer.
    #[error("{faults}")]
    RateLimited {
        /// What each upstream answered.
        faults: Faults,
        /// The longest delay an upstream asked for.
        retry_after: Option<Duration>,
    },
    /// No eligible upstream could answer.
    #[error("{0}")]
    Unavailable(Faults),
    /// Content did not match its digest, and no upstream had the right bytes.
    #[error("{0}")]
    DataLoss(Faults),
    /// The service itself failed (not an upstream, not the caller).
    #[error(transparent)]
    Internal(#[from] Internal),
    /// The requested offset is past the end of the blob.
    #[error("offset {offset} is past the end of blob `{digest}` ({size} bytes)")]
    OutOfRange {
        /// The blob.
        digest: Digest,
        /// The requested offset.
        offset: u64,
        /// The blob's size.
        size: u64,
    },
}

impl Error {
    /// The final error for a single upstream's fault.
    pub(crate) fn from_fault(fault: Fault) -> Self {
        Faults::from(fault).into_error()
    }
}

/// A failure inside the service. Its text is short and safe for callers
/// (no local paths); its source chain, for the log, says what happened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Internal {
    /// The cache could not read or write (disk full, I/O error).
    #[error("the service's cache failed; try again")]
    Cache(#[source] Arc<CacheError>),
    /// A download being read ended without a result (a bug).
    #[error("a download ended without a result")]
    LostDownload,
    /// The service stopped the work on its way out.
    #[error("the service is shutting down")]
    ShuttingDown,
}

impl From<CacheError> for Error {
    fn from(e: CacheError) -> Self {
        Error::Internal(Internal::Cache(Arc::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(kinds: &[FaultKind]) -> Faults {
        let mut f = Faults::default();
        for &k in kinds {
            f.push(Fault::new(k, format!("{k:?}")));
        }
        f
    }

    #[test]
    fn precedence_when_all_upstreams_fail() {
        use FaultKind::*;
        assert!(matches!(
            faults(&[NotFound, NotFound]).into_error(),
            Error::NotFound(_)
        ));
        assert!(matches!(
            faults(&[NotFound, Unavailable]).into_error(),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            faults(&[Integrity, NotFound]).into_error(),
            Error::DataLoss(_)
        ));
        assert!(matches!(
            faults(&[Denied, NotFound]).into_error(),
            Error::PermissionDenied(_)
        ));
        assert!(matches!(
            faults(&[RateLimited, Denied]).into_error(),
            Error::RateLimited { .. }
        ));
        assert!(matches!(
            faults(&[Integrity, Unavailable]).into_error(),
            Error::Unavailable(_)
        ));
    }

    #[test]
    fn message_lists_every_upstream() {
        let text = faults(&[FaultKind::NotFound, FaultKind::Denied]).to_string();
        assert_eq!(text, "NotFound; Denied");
    }
}
