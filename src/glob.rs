//! Repository globs, and [`Rules`] (include globs minus exclude globs), for
//! upstream routing and caller access. Globs are written here rather than taken from a
//! glob crate because the semantics are part of the contract and differ from
//! file-system globs: `*` matches within one path segment, and `**` matches
//! one or more whole segments (never zero), so `test/**` matches `test/a` and
//! `test/a/b` but not `test`.

use crate::oci::Repository;

/// One segment of a glob.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: one or more whole segments.
    Any,
    /// A segment pattern where `*` matches any run of characters and `?` one.
    Pattern(String),
}

/// A compiled repository glob. Deserializes from its pattern text, so a
/// config holding one has already been checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Glob {
    pattern: String,
    segments: Vec<Segment>,
}

impl TryFrom<String> for Glob {
    type Error = String;

    fn try_from(pattern: String) -> Result<Self, String> {
        Self::parse(&pattern)
    }
}

impl std::fmt::Display for Glob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.pattern)
    }
}

impl Glob {
    /// Compiles a glob such as `library/*` or `team/**`.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("glob is empty".to_owned());
        }
        let segments = pattern
            .split('/')
            .map(|s| match s {
                "" => Err(format!("glob {pattern:?} has an empty path segment")),
                "**" => Ok(Segment::Any),
                s if s.contains("**") => Err(format!(
                    "glob {pattern:?}: `**` must be a whole path segment"
                )),
                s => Ok(Segment::Pattern(s.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            pattern: pattern.to_owned(),
            segments,
        })
    }

    /// True when `name` (a repository name) matches.
    pub fn matches(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('/').collect();
        match_segments(&self.segments, &parts)
    }
}

fn match_segments(glob: &[Segment], parts: &[&str]) -> bool {
    match glob.split_first() {
        None => parts.is_empty(),
        Some((Segment::Any, rest)) => (1..=parts.len()).any(|n| match_segments(rest, &parts[n..])),
        Some((Segment::Pattern(p), rest)) => match parts.split_first() {
            Some((part, more)) => {
                match_segment(p.as_bytes(), part.as_bytes()) && match_segments(rest, more)
            }
            None => false,
        },
    }
}

/// Wildcard match of one segment: `*` any run, `?` one character.
fn match_segment(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|n| match_segment(rest, &text[n..])),
        Some((b'?', rest)) => !text.is_empty() && match_segment(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && match_segment(rest, &text[1..]),
    }
}

/// Which repositories a set of rules admits: those matching an `include`
/// glob and no `exclude` glob (an upstream's routing, a caller's access).
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    include: Vec<Glob>,
    exclude: Vec<Glob>,
}

impl Rules {
    /// Rules admitting what matches an `include` glob and no `exclude` glob.
    pub(crate) fn new(include: Vec<Glob>, exclude: Vec<Glob>) -> Self {
        Self { include, exclude }
    }

    /// The include globs.
    pub(crate) fn include(&self) -> &[Glob] {
        &self.include
    }

    /// The exclude globs.
    pub(crate) fn exclude(&self) -> &[Glob] {
        &self.exclude
    }

    /// True when the rules admit `repository`.
    pub(crate) fn admits(&self, repository: &Repository) -> bool {
        let name = repository.as_str();
        self.include.iter().any(|g| g.matches(name))
            && !self.exclude.iter().any(|g| g.matches(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(glob: &str, name: &str) -> bool {
        Glob::parse(glob).unwrap().matches(name)
    }

    #[test]
    fn star_is_one_segment_double_star_one_or_more() {
        assert!(m("**", "a"));
        assert!(m("**", "a/b/c"));
        assert!(m("test/**", "test/a"));
        assert!(m("test/**", "test/a/b"));
        assert!(!m("test/**", "test"));
        assert!(!m("test/**", "testing/a"));
        assert!(m("test/*", "test/a"));
        assert!(!m("test/*", "test/a/b"));
        assert!(m("*", "nginx"));
        assert!(!m("*", "library/nginx"));
        assert!(m("team-*/app", "team-a/app"));
        assert!(!m("team-*/app", "team-a/x/app"));
        assert!(m("a/**/z", "a/b/z"));
        assert!(m("a/**/z", "a/b/c/z"));
        assert!(!m("a/**/z", "a/z"));
        assert!(m("ap?", "app"));
        assert!(m("library/nginx", "library/nginx"));
        assert!(!m("library/nginx", "library/nginx2"));
    }

    #[test]
    fn rejects_malformed_globs() {
        for bad in ["", "a//b", "/a", "a/", "a/**b", "x**"] {
            assert!(Glob::parse(bad).is_err(), "{bad:?}");
        }
    }
}
