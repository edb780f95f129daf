//! Repository names, as the OCI distribution spec's grammar allows them.

use std::fmt;

use super::ParseError;

/// Longest repository name the distribution spec allows.
const MAX_LEN: usize = 255;

/// A repository name such as `library/nginx`: lowercase alphanumeric path
/// components joined by `/`, each component's runs joined by `.`, `_`, `__`
/// or runs of `-`. Nothing that could change an upstream URL (`..`, `%`, `?`,
/// `#`, whitespace, control characters) can be part of one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

impl Repository {
    /// Parses and validates a repository name.
    pub fn parse(name: &str) -> Result<Self, ParseError> {
        if name.is_empty() {
            return Err(ParseError::new("repository name is empty", name));
        }
        if name.len() > MAX_LEN {
            return Err(ParseError::new(
                "repository name is longer than 255 characters",
                name,
            ));
        }
        for component in name.split('/') {
            check_component(component).map_err(|reason| ParseError::new(reason, name))?;
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when the name has a single path component (`nginx`, not
    /// `bitnami/redis`).
    pub fn is_single_component(&self) -> bool {
        !self.0.contains('/')
    }
}

/// Checks one path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn check_component(component: &str) -> Result<(), &'static str> {
    const RULE: &str = "repository name components must be lowercase letters and digits, \
         separated by '/', and joined within a component only by '.', '_', '__' or '-'";
    if component.is_empty() {
        return Err("repository name has an empty path component");
    }
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(RULE);
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or one or more '-'.
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return Err(RULE),
        }
        if i == start || i >= bytes.len() || !alnum(bytes[i]) {
            return Err(RULE);
        }
    }
    Ok(())
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_grammar() {
        for ok in [
            "nginx",
            "library/nginx",
            "a/b/c",
            "my-app",
            "my--app",
            "a.b",
            "a_b",
            "a__b",
            "0",
            "ghcr.io/org/app",
        ] {
            assert!(Repository::parse(ok).is_ok(), "{ok} should parse");
        }
    }

    #[test]
    fn rejects_what_breaks_the_grammar_or_the_url() {
        let long = "a".repeat(256);
        for bad in [
            "",
            "Nginx",
            "a//b",
            "/a",
            "a/",
            "..",
            "a/../b",
            "a%2Fb",
            "a?b",
            "a#b",
            "a b",
            "a\nb",
            "a\u{0}b",
            "a___b",
            "a-",
            "-a",
            "a.-b",
            "a..b",
            "é",
            long.as_str(),
        ] {
            assert!(
                Repository::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn longest_name_is_accepted() {
        let name = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        assert_eq!(name.len(), 255);
        assert!(Repository::parse(&name).is_ok());
    }
}
