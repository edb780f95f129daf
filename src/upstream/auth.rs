//! Upstream credentials and how a request is authenticated: where the
//! username, password or token come from ([`Credentials`], including Docker
//! config files), and the flow of [`Upstream::send_once`]: a token or Basic
//! credentials up front when known, else the 401 challenge's flow and one
//! retry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::StatusCode;
use reqwest::header::{HeaderValue, WWW_AUTHENTICATE};
use serde::Deserialize;

use super::challenge::{Challenge, parse_challenges};
use super::client::{Request, Upstream};
use super::error::{Fault, FaultKind};
use crate::config::AuthConfig;
use crate::secret::{Secret, SecretSource};

/// An upstream's credentials.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// None.
    Anonymous,
    /// Username and password, for Basic challenges and the token flow.
    Basic {
        /// The username.
        username: String,
        /// The password's source.
        password: SecretSource,
    },
    /// A static bearer token, sent with every request.
    Bearer(SecretSource),
    /// A Docker `config.json` / `.dockerconfigjson`, looked up by host.
    DockerConfig(PathBuf),
}

/// Credentials resolved for one token or registry request.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Username and password, for Basic auth and the token GET.
    pub basic: Option<BasicAuth>,
    /// An OAuth2 refresh token (a Docker config's `identitytoken`), for the
    /// token POST form.
    pub refresh_token: Option<Secret>,
}

/// A username and password, resolved for one request.
#[derive(Debug, Clone)]
pub struct BasicAuth {
    /// The username.
    pub username: String,
    /// The password.
    pub password: Secret,
}

impl Credentials {
    /// The credentials an upstream's config describes.
    pub fn from_config(config: &AuthConfig) -> Self {
        match config {
            AuthConfig::Anonymous => Credentials::Anonymous,
            AuthConfig::Basic { username, password } => Credentials::Basic {
                username: username.clone(),
                password: password.clone(),
            },
            AuthConfig::Bearer { token } => Credentials::Bearer(token.clone()),
            AuthConfig::DockerConfig { file } => Credentials::DockerConfig(file.clone()),
        }
    }

    /// The username/password and refresh token for `host` (`host` or
    /// `host:port`), read now (files are re-read on every call).
    pub fn resolve(&self, host: &str) -> Result<Resolved, String> {
        match self {
            Credentials::Anonymous | Credentials::Bearer(_) => Ok(Resolved::default()),
            Credentials::Basic { username, password } => Ok(Resolved {
                basic: Some(BasicAuth {
                    username: username.clone(),
                    password: password.read()?,
                }),
                refresh_token: None,
            }),
            Credentials::DockerConfig(path) => docker_config_lookup(path, host),
        }
    }

    /// The static bearer token, if configured.
    pub fn bearer(&self) -> Result<Option<Secret>, String> {
        match self {
            Credentials::Bearer(source) => source.read().map(Some),
            _ => Ok(None),
        }
    }
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuthEntry>,
}

#[derive(Deserialize)]
struct DockerAuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// Finds `host`'s entry in a Docker config file. Keys may be bare hosts or
/// URLs (`https://index.docker.io/v1/`); Docker Hub's keys serve its
/// registry hosts.
fn docker_config_lookup(path: &Path, host: &str) -> Result<Resolved, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read docker config {}: {e}", path.display()))?;
    let file: DockerConfigFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "docker config {} is not valid JSON of the expected shape: {e}",
            path.display()
        )
    })?;
    let is_hub = |h: &str| {
        matches!(
            h,
            "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com"
        )
    };
    let entry = file.auths.iter().find_map(|(key, entry)| {
        let key_host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        (key_host == host || (is_hub(key_host) && is_hub(host))).then_some(entry)
    });
    let Some(entry) = entry else {
        return Ok(Resolved::default());
    };
    let refresh_token = entry
        .identitytoken
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(Secret::new);
    let basic = match (&entry.username, &entry.password, &entry.auth) {
        (Some(username), Some(password), _) => Some(BasicAuth {
            username: username.clone(),
            password: Secret::new(password.clone()),
        }),
        (_, _, Some(auth)) if !auth.trim().is_empty() => {
            let decoded = BASE64
                .decode(auth.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    format!(
                        "docker config {}: `auth` for {host} is not base64",
                        path.display()
                    )
                })?;
            let (username, password) = decoded.split_once(':').ok_or_else(|| {
                format!(
                    "docker config {}: `auth` for {host} is not user:password",
                    path.display()
                )
            })?;
            Some(BasicAuth {
                username: username.to_owned(),
                password: Secret::new(password),
            })
        }
        _ => None,
    };
    Ok(Resolved {
        basic,
        refresh_token,
    })
}

/// The `Authorization` a request carries.
#[derive(Debug, Clone)]
pub(crate) enum Authorization {
    Bearer(Secret),
    Basic(BasicAuth),
}

impl Authorization {
    pub(crate) fn header(&self) -> HeaderValue {
        use base64::Engine as _;
        let text = match self {
            Authorization::Bearer(token) => format!("Bearer {}", token.expose()),
            Authorization::Basic(b) => {
                let raw = format!("{}:{}", b.username, b.password.expose());
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                )
            }
        };
        // A secret with bytes not allowed in a header cannot be sent; an empty
        // header makes the upstream refuse, which reports as PERMISSION_DENIED.
        let mut value =
            HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}

impl Upstream {
    /// Sends `req` once, authenticating as the upstream asks: a cached or
    /// static token up front, then on a 401 the challenge's flow (Bearer
    /// token or Basic credentials) and one retry. The answer may still be a
    /// 401/403 (credentials refused).
    pub(super) async fn send_once(&self, req: &Request) -> Result<reqwest::Response, Fault> {
        let first = self.upfront_auth(&req.scope).await?;
        let response = self.execute(req, first.as_ref()).await?;
        if response.status() != StatusCode::UNAUTHORIZED
            || matches!(self.credentials, Credentials::Bearer(_))
        {
            return Ok(response);
        }
        if let Some(Authorization::Bearer(token)) = &first {
            self.tokens.invalidate(&req.scope, token).await;
        }
        let challenges: Vec<Challenge> = response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let retry = if let Some(bearer) = challenges
            .iter()
            .find(|c| c.scheme == "bearer" && c.param("realm").is_some())
        {
            Authorization::Bearer(self.token(bearer, &req.scope).await?)
        } else if challenges.iter().any(|c| c.scheme == "basic") {
            match self.basic()? {
                Some(basic) if !matches!(first, Some(Authorization::Basic(_))) => {
                    self.basic_first.store(true, Ordering::Relaxed);
                    Authorization::Basic(basic)
                }
                _ => return Ok(response),
            }
        } else {
            return Ok(response);
        };
        drop(response);
        self.execute(req, Some(&retry)).await
    }

    pub(super) async fn upfront_auth(&self, scope: &str) -> Result<Option<Authorization>, Fault> {
        let config_error =
            |e: String| Fault::new(FaultKind::Denied, format!("upstream `{}`: {e}", self.name));
        if let Some(token) = self.credentials.bearer().map_err(config_error)? {
            return Ok(Some(Authorization::Bearer(token)));
        }
        if let Some(token) = self.tokens.get(scope).await {
            return Ok(Some(Authorization::Bearer(token)));
        }
        if self.basic_first.load(Ordering::Relaxed) {
            return Ok(self.basic()?.map(Authorization::Basic));
        }
        Ok(None)
    }

    pub(super) fn basic(&self) -> Result<Option<BasicAuth>, Fault> {
        Ok(self.resolved()?.basic)
    }

    /// The credentials for this upstream's host, read now.
    pub(super) fn resolved(&self) -> Result<Resolved, Fault> {
        let host = match self.base.port() {
            Some(port) => format!("{}:{port}", self.base.host_str().unwrap_or_default()),
            None => self.base.host_str().unwrap_or_default().to_owned(),
        };
        self.credentials
            .resolve(&host)
            .map_err(|e| Fault::new(FaultKind::Denied, format!("upstream `{}`: {e}", self.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_do_not_print() {
        let b = BasicAuth {
            username: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{b:?}").contains("hunter2"));
    }

    #[test]
    fn docker_config_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"r.example:5000":{"username":"a","password":"b"}}}"#,
        )
        .unwrap();
        let creds = Credentials::DockerConfig(path);
        let hub = creds
            .resolve("registry-1.docker.io")
            .unwrap()
            .basic
            .unwrap();
        assert_eq!((hub.username.as_str(), hub.password.expose()), ("u", "p"));
        let other = creds.resolve("r.example:5000").unwrap();
        let basic = other.basic.unwrap();
        assert_eq!(
            (basic.username.as_str(), basic.password.expose()),
            ("a", "b")
        );
        assert!(other.refresh_token.is_none());
        let none = creds.resolve("ghcr.io").unwrap();
        assert!(none.basic.is_none() && none.refresh_token.is_none());
    }

    #[test]
    fn docker_config_identity_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"r.example":{"auth":"","identitytoken":"refresh-me"}}}"#,
        )
        .unwrap();
        let resolved = Credentials::DockerConfig(path)
            .resolve("r.example")
            .unwrap();
        assert!(resolved.basic.is_none());
        assert_eq!(resolved.refresh_token.unwrap().expose(), "refresh-me");
    }
}
