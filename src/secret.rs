//! Secrets: a [`Secret`] type that cannot be printed, and [`SecretSource`],
//! where one is read from (a file, re-read on each use, or an environment
//! variable). Used for upstream credentials.

use std::fmt;
use std::path::PathBuf;

/// A password or token. `Debug` and `Display` print `<redacted>`; the value is
/// reachable only through [`Secret::expose`], at the point it goes on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The raw value, for an `Authorization` header or a token request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret is read from. Files are read on each use, so a rotated
/// Kubernetes Secret takes effect without a restart.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// A file; one trailing newline is trimmed.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl SecretSource {
    /// Reads the secret now. The error names the source, never the value.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            SecretSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
                Ok(Secret(trim_newline(text)))
            }
            SecretSource::Env(var) => std::env::var(var)
                .map(Secret)
                .map_err(|_| format!("environment variable {var} is not set")),
        }
    }
}

/// Trims one trailing `\n` (or `\r\n`).
fn trim_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert!(!format!("{:?}", Some(s)).contains("hunter2"));
    }

    #[test]
    fn secret_files_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "pa ss\n\n").unwrap();
        let read = SecretSource::File(path).read().unwrap();
        assert_eq!(read.expose(), "pa ss\n");
    }
}
