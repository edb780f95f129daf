//! The one error type for rejected input in [`crate::oci`].

use std::fmt;

/// Why a string is not a valid OCI value. The offending value is kept in a
/// shortened, escaped form, safe to show to a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (got {value})")]
pub struct ParseError {
    reason: &'static str,
    value: Shown,
}

impl ParseError {
    /// A rejection of `value` for `reason`.
    pub(crate) fn new(reason: &'static str, value: &str) -> Self {
        Self {
            reason,
            value: Shown::of(value),
        }
    }

    /// The rule the value broke.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// A caller-supplied value, escaped and cut to a readable length.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shown(String);

impl Shown {
    const MAX_CHARS: usize = 80;

    fn of(value: &str) -> Self {
        let mut shown: String = value.chars().take(Self::MAX_CHARS).collect();
        if value.chars().count() > Self::MAX_CHARS {
            shown.push_str("...");
        }
        Self(shown)
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
