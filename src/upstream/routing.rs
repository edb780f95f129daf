//! Routing: which upstreams may serve a repository, in which order.

use std::sync::Arc;

use super::client::Upstream;
use super::error::Error;
use crate::cache::Holder;
use crate::oci::Repository;

/// Which upstreams a request may go to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Route {
    /// Every upstream whose rules admit the repository, by priority.
    #[default]
    Any,
    /// Only the upstream of this name (gRPC's `upstream` field).
    Upstream(String),
    /// Only the upstreams answering for this registry host (the mirror's
    /// `?ns=`, lowercase `host[:port]`), by priority.
    Namespace(String),
}

impl Route {
    /// What tells this route's tag entries apart from another's (upstream
    /// names never contain `=`).
    pub(crate) fn key(&self) -> Option<String> {
        match self {
            Self::Any => None,
            Self::Upstream(name) => Some(name.clone()),
            Self::Namespace(host) => Some(format!("ns={host}")),
        }
    }
}

/// The configured upstreams, sorted by priority (ties keep file order).
#[derive(Debug)]
pub struct Router {
    upstreams: Vec<Arc<Upstream>>,
}

impl Router {
    /// Sorts `upstreams` (given in file order) by priority.
    pub fn new(mut upstreams: Vec<Upstream>) -> Self {
        // A stable sort keeps file order among equal priorities.
        upstreams.sort_by_key(Upstream::priority);
        Self {
            upstreams: upstreams.into_iter().map(Arc::new).collect(),
        }
    }

    /// Every upstream, by priority.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// The upstreams to try for `repository` on `route`, in order. For one
    /// upstream by name: an unknown name is an error, and so is one whose
    /// rules (or `enabled = false`) exclude the repository. For a namespace
    /// that no upstream answers for: [`Error::UnknownNamespace`].
    pub fn candidates(
        &self,
        repository: &Repository,
        route: &Route,
    ) -> Result<Vec<Arc<Upstream>>, Error> {
        let namespace = match route {
            Route::Any => None,
            Route::Upstream(name) => return self.only(repository, name),
            Route::Namespace(host) => {
                if !self.upstreams.iter().any(|u| u.answers_for(host)) {
                    return Err(Error::UnknownNamespace(host.clone()));
                }
                Some(host)
            }
        };
        let candidates: Vec<_> = self
            .upstreams
            .iter()
            .filter(|r| r.enabled() && r.rules().admits(repository))
            .filter(|r| namespace.is_none_or(|host| r.answers_for(host)))
            .cloned()
            .collect();
        if candidates.is_empty() {
            return Err(Error::NoRoute(repository.to_string()));
        }
        Ok(candidates)
    }

    fn only(&self, repository: &Repository, name: &str) -> Result<Vec<Arc<Upstream>>, Error> {
        let upstream = self
            .upstreams
            .iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| Error::UnknownUpstream(name.to_owned()))?;
        if !upstream.enabled() || !upstream.rules().admits(repository) {
            return Err(Error::NotRouted {
                upstream: name.to_owned(),
                repository: repository.to_string(),
            });
        }
        Ok(vec![upstream.clone()])
    }
}

/// The cache's record that `upstream` holds content for `repository`.
pub(crate) fn holder_for(upstream: &Upstream, repository: &Repository) -> Holder {
    Holder {
        upstream: upstream.name().to_owned(),
        repository: upstream.repository_name(repository),
    }
}

/// The first candidate known to hold content for `repository`, given the
/// cache's holders of that content.
pub(crate) fn known_holder<'a>(
    candidates: &'a [Arc<Upstream>],
    repository: &Repository,
    holders: &[Holder],
) -> Option<&'a Arc<Upstream>> {
    candidates
        .iter()
        .find(|c| holders.contains(&holder_for(c, repository)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(toml: &str) -> Router {
        let config = Config::parse(toml).unwrap();
        config.validate().unwrap();
        Router::new(
            config
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| Upstream::new(u, i, Default::default()).unwrap())
                .collect(),
        )
    }

    fn names(r: &Router, repo: &str, only: Option<&str>) -> Result<Vec<String>, String> {
        let route = only.map_or(Route::Any, |name| Route::Upstream(name.to_owned()));
        r.candidates(&Repository::parse(repo).unwrap(), &route)
            .map(|c| c.iter().map(|r| r.name().to_owned()).collect())
            .map_err(|e| e.to_string())
    }

    const THREE: &str = r#"
        [[upstreams]]
        name = "a"
        url = "http://a"
        priority = 1
        exclude = ["private/**"]
        [[upstreams]]
        name = "b"
        url = "http://b"
        priority = 0
        repositories = ["team/*"]
        [[upstreams]]
        name = "c"
        url = "http://c"
        [[upstreams]]
        name = "off"
        url = "http://off"
        enabled = false
    "#;

    #[test]
    fn priority_then_file_order_and_rules() {
        let r = router(THREE);
        assert_eq!(names(&r, "team/app", None).unwrap(), ["b", "a", "c"]);
        assert_eq!(names(&r, "team/app/x", None).unwrap(), ["a", "c"]);
        assert_eq!(names(&r, "private/x", None).unwrap(), ["c"]);
    }

    #[test]
    fn ties_keep_file_order() {
        let r = router(
            "[[upstreams]]\nname = \"x\"\nurl = \"http://x\"\npriority = 5\n[[upstreams]]\nname = \"y\"\nurl = \"http://y\"\npriority = 5\n[[upstreams]]\nname = \"z\"\nurl = \"http://z\"",
        );
        assert_eq!(names(&r, "a", None).unwrap(), ["z", "x", "y"]);
    }

    #[test]
    fn named_upstream() {
        let r = router(THREE);
        assert_eq!(names(&r, "team/app", Some("c")).unwrap(), ["c"]);
        assert!(
            names(&r, "x", Some("nope"))
                .unwrap_err()
                .contains("unknown upstream `nope`")
        );
        assert!(
            names(&r, "private/x", Some("a"))
                .unwrap_err()
                .contains("does not serve")
        );
        assert!(
            names(&r, "x", Some("off"))
                .unwrap_err()
                .contains("does not serve")
        );
    }

    #[test]
    fn no_route() {
        let r =
            router("[[upstreams]]\nname = \"a\"\nurl = \"http://a\"\nrepositories = [\"x/**\"]");
        assert!(names(&r, "y", None).unwrap_err().contains("admit"));
    }
}
