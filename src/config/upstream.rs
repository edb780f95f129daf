//! One `[[upstreams]]` entry: its typed keys and defaults, its credentials
//! (`[upstreams.auth]`, whose secret sources are checked as they are read)
//! and the checks types alone cannot make.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use url::Url;

use super::ConfigError;
use crate::glob::Glob;
use crate::secret::SecretSource;

/// One upstream registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name, shown in `Source.upstream`.
    pub name: String,
    /// Base URL, e.g. `https://registry-1.docker.io`.
    pub url: Url,
    /// Lower is tried first; default is the position in the file.
    pub priority: Option<i64>,
    /// Disabled upstreams are never asked.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Repository globs this upstream serves.
    #[serde(default = "all_repositories")]
    pub repositories: Vec<Glob>,
    /// Repository globs this upstream never serves.
    #[serde(default)]
    pub exclude: Vec<Glob>,
    /// Map single-component names to `library/NAME`; default true for Docker
    /// Hub hosts only.
    pub library_prefix: Option<bool>,
    /// TCP (and TLS) connect timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time to response headers, and the longest gap between body bytes.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Slowest acceptable body rate over 10 s.
    #[serde(default = "default_min_rate")]
    pub min_rate: Rate,
    /// Retries after the first attempt.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Cap on backoff and on `Retry-After`.
    #[serde(default = "default_retry_max_delay", with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Failed requests that open the circuit.
    #[serde(default = "default_circuit_failures")]
    pub circuit_failures: u32,
    /// How long the circuit stays open before a probe.
    #[serde(default = "default_circuit_cooldown", with = "humantime_serde")]
    pub circuit_cooldown: Duration,
    /// No answer from this upstream by then: the next candidate is asked too,
    /// and the first good answer wins.
    #[serde(default = "default_hedge_after", with = "humantime_serde")]
    pub hedge_after: Duration,
    /// Most requests (hence connections) open to this upstream at once; a
    /// blob download holds one for its whole body.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Extra hosts allowed as token realms.
    #[serde(default)]
    pub realm_hosts: Vec<String>,
    /// Registry hosts this upstream answers for when a mirror request names
    /// one (containerd's `?ns=`); default [`UpstreamConfig::namespaces`].
    pub namespaces: Option<Vec<String>>,
    /// HTTP(S) proxy for this upstream; none unless set (the environment's
    /// proxy variables are ignored).
    pub proxy: Option<Url>,
    /// PEM file of CA certificates trusted for this upstream and its token
    /// realm, in addition to the built-in roots (a registry behind an
    /// internal CA). Read once at start.
    pub ca_file: Option<PathBuf>,
    /// Credentials.
    #[serde(default)]
    pub auth: AuthConfig,
}

fn yes() -> bool {
    true
}
pub(super) fn all_repositories() -> Vec<Glob> {
    vec![Glob::parse("**").expect("`**` is a valid glob")]
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_min_rate() -> Rate {
    Rate(64 * 1024)
}
fn default_retries() -> u32 {
    3
}
fn default_retry_max_delay() -> Duration {
    Duration::from_secs(10)
}
fn default_circuit_failures() -> u32 {
    5
}
fn default_max_connections() -> usize {
    32
}
fn default_hedge_after() -> Duration {
    Duration::from_secs(2)
}
fn default_circuit_cooldown() -> Duration {
    Duration::from_secs(30)
}

impl UpstreamConfig {
    /// Docker Hub, anonymous: the upstream used when the config names none.
    pub fn docker_hub() -> Self {
        Self {
            name: "hub".to_owned(),
            url: Url::parse("https://registry-1.docker.io").expect("constant URL is valid"),
            priority: None,
            enabled: true,
            repositories: all_repositories(),
            exclude: Vec::new(),
            library_prefix: None,
            connect_timeout: default_connect_timeout(),
            timeout: default_timeout(),
            min_rate: default_min_rate(),
            retries: default_retries(),
            retry_max_delay: default_retry_max_delay(),
            circuit_failures: default_circuit_failures(),
            circuit_cooldown: default_circuit_cooldown(),
            hedge_after: default_hedge_after(),
            max_connections: default_max_connections(),
            realm_hosts: Vec::new(),
            namespaces: None,
            proxy: None,
            ca_file: None,
            auth: AuthConfig::Anonymous,
        }
    }

    /// Whether `library_prefix` applies: as configured, else true for Docker
    /// Hub hosts.
    pub fn library_prefix(&self) -> bool {
        self.library_prefix.unwrap_or_else(|| self.is_docker_hub())
    }

    fn is_docker_hub(&self) -> bool {
        matches!(
            self.url.host_str(),
            Some("docker.io" | "registry-1.docker.io" | "index.docker.io")
        )
    }

    /// The registry hosts (`host[:port]`, lowercase) this upstream answers
    /// for on the mirror's `?ns=`: as configured, else its url's
    /// `host[:port]`, plus `docker.io` for Docker Hub hosts.
    pub fn namespaces(&self) -> Vec<String> {
        if let Some(configured) = &self.namespaces {
            return configured
                .iter()
                .map(|n| n.trim().to_ascii_lowercase())
                .collect();
        }
        let host = self.url.host_str().unwrap_or_default();
        let mut namespaces = vec![match self.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }];
        if self.is_docker_hub() && host != "docker.io" {
            namespaces.push("docker.io".to_owned());
        }
        namespaces
    }
}

/// A byte rate such as `64KiB/s` (or `0`, for "none").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "0" {
            return Ok(Rate(0));
        }
        let size = s
            .trim()
            .strip_suffix("/s")
            .ok_or_else(|| format!("rate must end in /s, e.g. \"64KiB/s\" (got {s:?})"))?;
        let bytes: ByteSize = size
            .trim()
            .parse()
            .map_err(|e| format!("{e} (got {s:?})"))?;
        Ok(Rate(bytes.as_u64()))
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where an upstream's credentials come from. Each secret has exactly one
/// source (a file or an environment variable), checked as it is read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(try_from = "RawAuth")]
pub enum AuthConfig {
    /// No credentials (the token flow still runs, anonymously).
    #[default]
    Anonymous,
    /// Username and password.
    Basic {
        /// The username.
        username: String,
        /// Where the password is read (`password_file` or `password_env`).
        password: SecretSource,
    },
    /// A static bearer token (`token_file` or `token_env`).
    Bearer {
        /// Where the token is read.
        token: SecretSource,
    },
    /// Credentials from a Docker `config.json` or `.dockerconfigjson`.
    DockerConfig {
        /// The file.
        file: PathBuf,
    },
}

impl AuthConfig {
    /// The `type` key's value, as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthConfig::Anonymous => "anonymous",
            AuthConfig::Basic { .. } => "basic",
            AuthConfig::Bearer { .. } => "bearer",
            AuthConfig::DockerConfig { .. } => "docker-config",
        }
    }
}

/// `[upstreams.auth]` as written, before its sources are checked.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
enum RawAuth {
    Anonymous,
    Basic {
        username: String,
        password_file: Option<PathBuf>,
        password_env: Option<String>,
    },
    Bearer {
        token_file: Option<PathBuf>,
        token_env: Option<String>,
    },
    DockerConfig {
        file: PathBuf,
    },
}

impl TryFrom<RawAuth> for AuthConfig {
    type Error = String;

    fn try_from(raw: RawAuth) -> Result<Self, String> {
        Ok(match raw {
            RawAuth::Anonymous => AuthConfig::Anonymous,
            RawAuth::Basic {
                username,
                password_file,
                password_env,
            } => {
                if username.is_empty() || username.contains(':') {
                    return Err("username must be non-empty and must not contain ':'".to_owned());
                }
                let password = secret_source(password_file, password_env, "password")?;
                AuthConfig::Basic { username, password }
            }
            RawAuth::Bearer {
                token_file,
                token_env,
            } => AuthConfig::Bearer {
                token: secret_source(token_file, token_env, "token")?,
            },
            RawAuth::DockerConfig { file } => {
                if file.as_os_str().is_empty() {
                    return Err("file must name a file".to_owned());
                }
                AuthConfig::DockerConfig { file }
            }
        })
    }
}

/// The one source of a secret: `{what}_file` or `{what}_env`.
pub(super) fn secret_source(
    file: Option<PathBuf>,
    env: Option<String>,
    what: &str,
) -> Result<SecretSource, String> {
    match (file, env) {
        (Some(_), Some(_)) => Err(format!("set either {what}_file or {what}_env, not both")),
        (None, None) => Err(format!("one of {what}_file or {what}_env is required")),
        (None, Some(var)) if var.is_empty() => {
            Err(format!("{what}_env must name an environment variable"))
        }
        (Some(path), None) => Ok(SecretSource::File(path)),
        (None, Some(var)) => Ok(SecretSource::Env(var)),
    }
}

impl UpstreamConfig {
    /// Checks what types alone cannot; `field` names a key of this upstream
    /// (`url` -> `upstreams[1].url`).
    pub(super) fn validate(&self, field: impl Fn(&str) -> String) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(ConfigError::invalid(
                field("name"),
                format!(
                    "must be letters, digits, '-', '_' or '.' (got {:?})",
                    self.name
                ),
            ));
        }
        if !matches!(self.url.scheme(), "http" | "https") || self.url.host_str().is_none() {
            return Err(ConfigError::invalid(
                field("url"),
                format!(
                    "must be an http or https URL with a host (got {})",
                    self.url
                ),
            ));
        }
        if self.url.query().is_some() || self.url.fragment().is_some() {
            return Err(ConfigError::invalid(
                field("url"),
                "must not have a query or fragment",
            ));
        }
        if !self.url.username().is_empty() || self.url.password().is_some() {
            return Err(ConfigError::invalid(
                field("url"),
                "must not carry credentials; use [upstreams.auth]",
            ));
        }
        if let Some(proxy) = &self.proxy {
            if !matches!(proxy.scheme(), "http" | "https") {
                return Err(ConfigError::invalid(
                    field("proxy"),
                    "must be an http or https URL",
                ));
            }
        }
        for (key, d) in [
            ("connect_timeout", self.connect_timeout),
            ("timeout", self.timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(field(key), "must be more than 0"));
            }
        }
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                field("max_connections"),
                "must be at least 1",
            ));
        }
        for (i, namespace) in self.namespaces.iter().flatten().enumerate() {
            let host = namespace.trim();
            if host.is_empty()
                || host.contains("://")
                || host.contains('/')
                || host.chars().any(char::is_whitespace)
            {
                return Err(ConfigError::invalid(
                    field(&format!("namespaces[{i}]")),
                    format!(
                        "a registry host such as \"docker.io\" or \"registry.example:5000\" (got {namespace:?})"
                    ),
                ));
            }
        }
        Ok(())
    }
}
