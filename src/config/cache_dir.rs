//! `cache.dir`: as configured, or the default. The default is the system
//! directory `/var/cache/oci-upstream` when it can be created and written
//! (a container, a service account with the right to it), else the user's
//! cache directory, so a first run as a normal user starts.

use std::ops::Deref;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The system cache directory, the default.
const SYSTEM_DIR: &str = "/var/cache/oci-upstream";

/// The disk store's directory and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDir {
    path: PathBuf,
    origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// Set in the file or by `OCI_UPSTREAM_CACHE_DIR`.
    Configured,
    /// Not set: the system directory.
    Default,
    /// Not set, and the system directory could not be used.
    Fallback,
}

impl Default for CacheDir {
    fn default() -> Self {
        Self {
            path: PathBuf::from(SYSTEM_DIR),
            origin: Origin::Default,
        }
    }
}

impl<'de> Deserialize<'de> for CacheDir {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PathBuf::deserialize(d).map(Self::configured)
    }
}

impl Deref for CacheDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for CacheDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl CacheDir {
    /// A directory set by the operator.
    pub fn configured(path: PathBuf) -> Self {
        Self {
            path,
            origin: Origin::Configured,
        }
    }

    /// The directory to use: a configured one as it is; the default when
    /// `usable` accepts it, else `$XDG_CACHE_HOME/oci-upstream` or
    /// `~/.cache/oci-upstream` (read through `env`).
    pub(crate) fn resolve(
        self,
        env: impl Fn(&str) -> Option<String>,
        usable: impl Fn(&Path) -> bool,
    ) -> Self {
        if self.origin != Origin::Default || usable(&self.path) {
            return self;
        }
        let absolute = |v: String| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
        let user = env("XDG_CACHE_HOME").and_then(absolute).or_else(|| {
            env("HOME")
                .and_then(absolute)
                .map(|home| home.join(".cache"))
        });
        match user {
            Some(base) => Self {
                path: base.join("oci-upstream"),
                origin: Origin::Fallback,
            },
            None => self,
        }
    }

    /// Why this directory was chosen, for the start-up log.
    pub fn describe(&self) -> String {
        match self.origin {
            Origin::Configured => "configured".to_owned(),
            Origin::Default => "the default".to_owned(),
            Origin::Fallback => {
                format!("cache.dir is not set and {SYSTEM_DIR} cannot be created or written")
            }
        }
    }
}

/// True when `dir` exists or can be created, and a file can be written in
/// it.
pub(crate) fn dir_is_usable(dir: &Path) -> bool {
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let written = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_default_falls_back_to_the_users_cache_when_unusable() {
        let refuse = |_: &Path| false;
        let accept = |_: &Path| true;
        let home = [("HOME", "/home/u")];
        let xdg = [("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x/cache")];
        let resolved = |vars, usable: &dyn Fn(&Path) -> bool| {
            CacheDir::default().resolve(env(vars), usable).path
        };
        assert_eq!(resolved(&home, &accept), Path::new(SYSTEM_DIR));
        assert_eq!(
            resolved(&home, &refuse),
            Path::new("/home/u/.cache/oci-upstream")
        );
        assert_eq!(resolved(&xdg, &refuse), Path::new("/x/cache/oci-upstream"));
        // A relative XDG_CACHE_HOME is ignored, as the XDG spec says.
        let relative = [("HOME", "/home/u"), ("XDG_CACHE_HOME", "cache")];
        assert_eq!(
            resolved(&relative, &refuse),
            Path::new("/home/u/.cache/oci-upstream")
        );
        // Nowhere to go: the default stays, and opening it will say why.
        assert_eq!(resolved(&[], &refuse), Path::new(SYSTEM_DIR));
        let fallback = CacheDir::default().resolve(env(&home), refuse);
        assert!(fallback.describe().contains("cannot be created or written"));
    }

    #[test]
    fn a_configured_dir_is_used_as_it_is() {
        let dir = CacheDir::configured(PathBuf::from("/srv/cache"));
        let resolved = dir.clone().resolve(env(&[("HOME", "/h")]), |_| false);
        assert_eq!(resolved, dir);
    }

    #[test]
    fn usable_means_created_and_writable() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(dir_is_usable(&tmp.path().join("a/b")));
        assert!(tmp.path().join("a/b").is_dir());
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(!dir_is_usable(&file.join("sub")), "a file is in the way");
    }
}
