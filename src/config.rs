//! The service configuration: one TOML file parsed into typed values (sizes,
//! durations, URLs) before anything binds. Every field has a default; unknown
//! keys are errors; a bad value fails with a message naming the field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use url::Url;

use crate::glob::Glob;
use crate::secret::SecretSource;

/// Environment variable naming the config file when `--config` is absent.
pub const CONFIG_ENV: &str = "OCI_UPSTREAM_CONFIG";
/// Environment variable overriding `listen`.
pub const LISTEN_ENV: &str = "OCI_UPSTREAM_LISTEN";
/// Environment variable overriding `cache.dir`.
pub const CACHE_DIR_ENV: &str = "OCI_UPSTREAM_CACHE_DIR";

/// A configuration problem, naming the field (`upstreams[1].url`) or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{0}")]
    Syntax(String),
    /// A value is well-formed but not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// Path of the field, e.g. `upstreams[0].auth.password_file`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address.
    pub metrics_listen: SocketAddr,
    /// How long in-flight streams may drain after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Concurrent RPCs beyond which new ones are refused.
    pub max_concurrent_rpcs: usize,
    /// Largest manifest the service reads from an upstream.
    pub max_manifest_size: ByteSize,
    /// Most tags the service reads for one repository.
    pub max_tags: usize,
    /// Log format: `text` or `json`.
    pub log_format: LogFormat,
    /// The cache.
    pub cache: CacheConfig,
    /// Upstream registries, tried by priority.
    pub upstreams: Vec<UpstreamConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            shutdown_grace: Duration::from_secs(25),
            max_concurrent_rpcs: 1024,
            max_manifest_size: ByteSize::mib(4),
            max_tags: 100_000,
            log_format: LogFormat::Text,
            cache: CacheConfig::default(),
            upstreams: vec![UpstreamConfig::docker_hub()],
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for Kubernetes log collectors).
    Json,
}

/// Cache settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Directory of the disk store.
    pub dir: PathBuf,
    /// Size bound of the disk store.
    pub max_size: ByteSize,
    /// How long a tag → digest entry is fresh.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// How long a stale tag may be served when every upstream fails.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// How long a "not found" is remembered.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/cache/oci-upstream"),
            max_size: ByteSize::gib(20),
            tag_ttl: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(24 * 3600),
            negative_ttl: Duration::from_secs(30),
        }
    }
}

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
    /// Most requests (hence connections) open to this upstream at once; a
    /// blob download holds one for its whole body.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Extra hosts allowed as token realms.
    #[serde(default)]
    pub realm_hosts: Vec<String>,
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
fn all_repositories() -> Vec<Glob> {
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
            max_connections: default_max_connections(),
            realm_hosts: Vec::new(),
            proxy: None,
            ca_file: None,
            auth: AuthConfig::Anonymous,
        }
    }

    /// Whether `library_prefix` applies: as configured, else true for Docker
    /// Hub hosts.
    pub fn library_prefix(&self) -> bool {
        self.library_prefix.unwrap_or_else(|| {
            matches!(
                self.url.host_str(),
                Some("docker.io" | "registry-1.docker.io" | "index.docker.io")
            )
        })
    }
}

/// A byte rate such as `64KiB/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
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
fn secret_source(
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

impl Config {
    /// Loads the file at `path` (or the defaults when `None`), applies the
    /// environment overrides read through `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(&text)?
            }
            None => Self::default(),
        };
        if let Some(listen) = env(LISTEN_ENV) {
            config.listen = listen
                .parse()
                .map_err(|e| ConfigError::invalid(LISTEN_ENV, format!("{e} (got {listen:?})")))?;
        }
        if let Some(dir) = env(CACHE_DIR_ENV) {
            config.cache.dir = PathBuf::from(dir);
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no environment, no validation beyond types). An
    /// error names the field's path (`upstreams[0].repositories[1]`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let inner = inner.trim_end();
            ConfigError::Syntax(if path == "." {
                inner.to_owned()
            } else {
                format!("{path}: {inner}")
            })
        })
    }

    /// Checks what types alone cannot: unique names, URL schemes, globs,
    /// credential sources.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(ConfigError::invalid(
                "upstreams",
                "at least one upstream is required",
            ));
        }
        if self.max_concurrent_rpcs == 0 {
            return Err(ConfigError::invalid(
                "max_concurrent_rpcs",
                "must be at least 1",
            ));
        }
        if self.max_manifest_size.as_u64() == 0 {
            return Err(ConfigError::invalid(
                "max_manifest_size",
                "must be more than 0",
            ));
        }
        let mut names = HashSet::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            let field = |f: &str| format!("upstreams[{i}].{f}");
            if up.name.is_empty()
                || !up
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return Err(ConfigError::invalid(
                    field("name"),
                    format!(
                        "must be letters, digits, '-', '_' or '.' (got {:?})",
                        up.name
                    ),
                ));
            }
            if !names.insert(up.name.as_str()) {
                return Err(ConfigError::invalid(
                    field("name"),
                    format!("duplicate upstream name {:?}", up.name),
                ));
            }
            if !matches!(up.url.scheme(), "http" | "https") || up.url.host_str().is_none() {
                return Err(ConfigError::invalid(
                    field("url"),
                    format!("must be an http or https URL with a host (got {})", up.url),
                ));
            }
            if up.url.query().is_some() || up.url.fragment().is_some() {
                return Err(ConfigError::invalid(
                    field("url"),
                    "must not have a query or fragment",
                ));
            }
            if !up.url.username().is_empty() || up.url.password().is_some() {
                return Err(ConfigError::invalid(
                    field("url"),
                    "must not carry credentials; use [upstreams.auth]",
                ));
            }
            if let Some(proxy) = &up.proxy {
                if !matches!(proxy.scheme(), "http" | "https") {
                    return Err(ConfigError::invalid(
                        field("proxy"),
                        "must be an http or https URL",
                    ));
                }
            }
            for (key, d) in [
                ("connect_timeout", up.connect_timeout),
                ("timeout", up.timeout),
            ] {
                if d.is_zero() {
                    return Err(ConfigError::invalid(field(key), "must be more than 0"));
                }
            }
            if up.max_connections == 0 {
                return Err(ConfigError::invalid(
                    field("max_connections"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn no_file_means_docker_hub() {
        let c = Config::load(None, no_env).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:50051");
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].url.as_str(), "https://registry-1.docker.io/");
        assert!(c.upstreams[0].library_prefix());
    }

    #[test]
    fn parses_the_documented_example() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
                .unwrap();
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.cache.max_size, ByteSize::gib(20));
        assert_eq!(c.upstreams[0].min_rate, Rate(64 * 1024));
        assert_eq!(c.upstreams[0].timeout, Duration::from_secs(30));
    }

    #[test]
    fn env_overrides_listen_and_cache_dir() {
        let env = |k: &str| match k {
            LISTEN_ENV => Some("127.0.0.1:0".to_owned()),
            CACHE_DIR_ENV => Some("/tmp/c".to_owned()),
            _ => None,
        };
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:0");
        assert_eq!(c.cache.dir, PathBuf::from("/tmp/c"));
    }

    fn error_of(text: &str) -> String {
        match Config::parse(text).and_then(|c| c.validate().map(|_| c)) {
            Ok(_) => panic!("config should be rejected:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert!(error_of("lisen = \"x\"").contains("lisen"));
        assert!(error_of("[cache]\ntag_ttl = \"soon\"").contains("tag_ttl"));
        let up = |extra: &str| format!("[[upstreams]]\nname = \"a\"\nurl = \"http://r\"\n{extra}");
        assert!(error_of(&up("colour = 1")).contains("colour"));
        assert!(
            error_of("[[upstreams]]\nname = \"a\"\nurl = \"ftp://r\"").contains("upstreams[0].url")
        );
        assert!(error_of(&format!("{}\n{}", up(""), up(""))).contains("upstreams[1].name"));
        assert!(
            error_of(&up("repositories = [\"a/**b\"]")).contains("upstreams[0].repositories[0]")
        );
        let missing = error_of(&up("[upstreams.auth]\ntype = \"basic\"\nusername = \"u\""));
        assert!(missing.starts_with("upstreams[0].auth: "), "{missing}");
        assert!(missing.contains("one of password_file or password_env is required"));
        assert!(error_of(&up("[upstreams.auth]\ntype = \"magic\"")).contains("magic"));
        assert!(error_of(&up("min_rate = \"fast\"")).contains("min_rate"));
        assert!(error_of("upstreams = []").contains("upstreams"));
    }

    #[test]
    fn library_prefix_defaults_to_docker_hub_hosts_only() {
        let c = Config::parse("[[upstreams]]\nname = \"a\"\nurl = \"https://ghcr.io\"").unwrap();
        assert!(!c.upstreams[0].library_prefix());
        let c = Config::parse("[[upstreams]]\nname = \"a\"\nurl = \"https://docker.io\"").unwrap();
        assert!(c.upstreams[0].library_prefix());
    }
}
