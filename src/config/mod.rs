//! The service configuration: one TOML file parsed into typed values (sizes,
//! durations, URLs) before anything binds. Every field has a default; unknown
//! keys are errors; a bad value fails with a message naming the field.

mod cache_dir;
mod callers;
mod s3;
mod tls;
mod upstream;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer};
use url::Url;

pub use cache_dir::CacheDir;
pub(crate) use cache_dir::dir_is_usable;
pub use callers::{CallerConfig, CallerCredential};
pub use s3::{CacheBackend, S3Config};
pub use tls::TlsConfig;
pub use upstream::{AuthConfig, Rate, UpstreamConfig};

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
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
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
    /// Prometheus `/metrics` listen address; `""` (`None`) turns it off.
    #[serde(deserialize_with = "optional_address")]
    pub metrics_listen: Option<SocketAddr>,
    /// A plaintext port serving only `grpc.health.v1` (for probes that
    /// cannot do TLS); `""` (`None`, the default) for none.
    #[serde(deserialize_with = "optional_address")]
    pub health_listen: Option<SocketAddr>,
    /// The OCI HTTP mirror (the pull side of the distribution API); `""`
    /// (`None`, the default) for none.
    #[serde(deserialize_with = "optional_address")]
    pub mirror_listen: Option<SocketAddr>,
    /// How long in-flight streams may drain after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Deadline of a call that carries no `grpc-timeout`.
    #[serde(with = "humantime_serde")]
    pub default_deadline: Duration,
    /// Concurrent RPCs beyond which new ones are refused.
    pub max_concurrent_rpcs: usize,
    /// A FetchBlob stream whose caller reads nothing this long is ended.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Concurrent streams one HTTP/2 connection may hold.
    pub max_streams_per_connection: u32,
    /// Largest manifest the service reads from an upstream.
    pub max_manifest_size: ByteSize,
    /// Most tags the service reads for one repository.
    pub max_tags: usize,
    /// Log format: `text` or `json`.
    pub log_format: LogFormat,
    /// OTLP/gRPC collector that spans are exported to (`""` in the file:
    /// none, no export).
    #[serde(deserialize_with = "otlp_endpoint")]
    pub otlp_endpoint: Option<Url>,
    /// The cache.
    pub cache: CacheConfig,
    /// TLS on the gRPC port; absent, gRPC is served in plaintext.
    pub tls: Option<TlsConfig>,
    /// Upstream registries, tried by priority.
    pub upstreams: Vec<UpstreamConfig>,
    /// Who may call the service; none means every caller may read
    /// everything (AdminService included).
    pub callers: Vec<CallerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            metrics_listen: Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
            health_listen: None,
            mirror_listen: None,
            shutdown_grace: Duration::from_secs(20),
            default_deadline: Duration::from_secs(60),
            max_concurrent_rpcs: 1024,
            stream_idle_timeout: Duration::from_secs(60),
            max_streams_per_connection: 256,
            max_manifest_size: ByteSize::mib(4),
            max_tags: 100_000,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            cache: CacheConfig::default(),
            tls: None,
            upstreams: vec![UpstreamConfig::docker_hub()],
            callers: Vec::new(),
        }
    }
}

/// A listen address, or `""` for none.
fn optional_address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "{e} (got {text:?}; an address such as \"0.0.0.0:9090\", or \"\" for none)"
        ))
    })
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

/// `otlp_endpoint`: `""` is none; anything else an `http` or `https` URL
/// with a host, no credentials and no path (gRPC has none: `/v1/traces` is
/// the OTLP/HTTP form, which this exporter does not speak).
fn otlp_endpoint<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Url>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        return Ok(None);
    }
    let url = Url::parse(&text)
        .map_err(|e| serde::de::Error::custom(format!("not a URL ({e}): {text:?}")))?;
    if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
        return Err(serde::de::Error::custom(format!(
            "must be an http or https URL such as \"http://otel-collector:4317\" (got {text:?})"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(serde::de::Error::custom(
            "credentials in the URL are not sent; give them as headers in OTEL_EXPORTER_OTLP_HEADERS",
        ));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(serde::de::Error::custom(format!(
            "an OTLP/gRPC endpoint is scheme, host and port only, no path (got {text:?})"
        )));
    }
    Ok(Some(url))
}

/// Cache settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Where objects live besides the disk store: nowhere else (`disk`), or
    /// in a bucket shared by every replica (`s3`, with `[cache.s3]`).
    pub backend: CacheBackend,
    /// The shared bucket; set only with `backend = "s3"` (see
    /// [`CacheConfig::shared`]).
    pub s3: Option<S3Config>,
    /// Directory of the disk store (with `s3`: the hot tier in front).
    pub dir: CacheDir,
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
    /// Rate of the background re-hash of stored objects; zero turns it off.
    pub scrub_rate: Rate,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            backend: CacheBackend::Disk,
            s3: None,
            dir: CacheDir::default(),
            max_size: ByteSize::gib(20),
            tag_ttl: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(24 * 3600),
            negative_ttl: Duration::from_secs(30),
            scrub_rate: Rate(16 * 1024 * 1024),
        }
    }
}

impl CacheConfig {
    /// The shared bucket behind the disk store, when `backend = "s3"` (a
    /// validated config has the table then, and only then).
    pub fn shared(&self) -> Option<&S3Config> {
        match self.backend {
            CacheBackend::S3 => self.s3.as_ref(),
            CacheBackend::Disk => None,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match (self.backend, &self.s3) {
            (CacheBackend::S3, Some(s3)) => s3.validate(|f| format!("cache.s3.{f}")),
            (CacheBackend::S3, None) => Err(ConfigError::invalid(
                "cache.s3",
                "backend = \"s3\" needs a [cache.s3] table with at least `bucket`",
            )),
            (CacheBackend::Disk, Some(_)) => Err(ConfigError::invalid(
                "cache.backend",
                "[cache.s3] is set but backend is \"disk\": set backend = \"s3\" to use it, or remove the table",
            )),
            (CacheBackend::Disk, None) => Ok(()),
        }
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
            config.cache.dir = CacheDir::configured(PathBuf::from(dir));
        }
        config.cache.dir = config.cache.dir.resolve(&env, dir_is_usable);
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
        if self.default_deadline.is_zero() {
            return Err(ConfigError::invalid(
                "default_deadline",
                "must be more than 0",
            ));
        }
        if self.stream_idle_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "stream_idle_timeout",
                "must be more than 0",
            ));
        }
        if self.max_streams_per_connection == 0 {
            return Err(ConfigError::invalid(
                "max_streams_per_connection",
                "must be at least 1",
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
        self.cache.validate()?;
        let mut callers = HashSet::new();
        let verifies_clients = self
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some());
        for (i, caller) in self.callers.iter().enumerate() {
            if !callers.insert(caller.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("callers[{i}].name"),
                    format!("duplicate caller name {:?}", caller.name),
                ));
            }
            if matches!(caller.credential, CallerCredential::CertificateSan(_)) && !verifies_clients
            {
                return Err(ConfigError::invalid(
                    format!("callers[{i}].certificate_san"),
                    "needs tls.client_ca_file: client certificates are verified only with mTLS",
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            up.validate(|f| format!("upstreams[{i}].{f}"))?;
            if !names.insert(up.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("upstreams[{i}].name"),
                    format!("duplicate upstream name {:?}", up.name),
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
        assert_eq!(c.cache.dir.as_ref(), Path::new("/tmp/c"));
    }

    fn error_of(text: &str) -> String {
        match Config::parse(text).and_then(|c| c.validate().map(|_| c)) {
            Ok(_) => panic!("config should be rejected:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn hardening_keys_have_their_defaults_and_zero_turns_scrubbing_off() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.stream_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_streams_per_connection, 256);
        assert_eq!(c.cache.scrub_rate, Rate(16 * 1024 * 1024));
        assert_eq!(c.upstreams[0].hedge_after, Duration::from_secs(2));
        let off = Config::parse("[cache]\nscrub_rate = \"0\"").unwrap();
        assert_eq!(off.cache.scrub_rate, Rate(0));
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
        assert!(error_of("[cache]\nscrub_rate = \"1\"").contains("cache.scrub_rate"));
        assert!(error_of("stream_idle_timeout = \"0s\"").contains("stream_idle_timeout"));
        assert!(error_of("upstreams = []").contains("upstreams"));
    }

    #[test]
    fn listeners_are_addresses_or_empty_for_none() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
        assert_eq!(c.health_listen, None);
        let c = Config::parse("metrics_listen = \"\"\nhealth_listen = \"127.0.0.1:8081\"").unwrap();
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.health_listen, Some("127.0.0.1:8081".parse().unwrap()));
        assert!(error_of("metrics_listen = \"nine\"").contains("metrics_listen"));
    }

    #[test]
    fn callers_take_one_credential_and_globs() {
        let c = Config::parse(
            "[[callers]]\nname = \"ci\"\ntoken_file = \"/t\"\nrepositories = [\"team-a/**\"]\nadmin = true\n\
             [[callers]]\nname = \"builder\"\ncertificate_san = \"spiffe://c/ns/ci/sa/b\"\n\
             [tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\nclient_ca_file = \"/ca\"",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.callers.len(), 2);
        assert!(c.callers[0].admin && !c.callers[1].admin);
        assert_eq!(c.callers[0].repositories[0].to_string(), "team-a/**");
        assert_eq!(c.callers[1].repositories[0].to_string(), "**");
        assert!(matches!(
            c.callers[1].credential,
            CallerCredential::CertificateSan(ref san) if san == "spiffe://c/ns/ci/sa/b"
        ));
        let caller = |body: &str| format!("[[callers]]\nname = \"a\"\n{body}");
        let none = error_of(&caller(""));
        assert!(none.starts_with("callers[0]: "), "{none}");
        assert!(none.contains("token_file or token_env"), "{none}");
        assert!(
            error_of(&caller("token_env = \"T\"\ncertificate_san = \"x\"")).contains("not both")
        );
        assert!(error_of(&caller("token_env = \"T\"\nrole = 1")).contains("role"));
        assert!(
            error_of(&caller("token_env = \"T\"\nrepositories = [\"a/**b\"]"))
                .contains("callers[0].repositories[0]")
        );
        let twice = format!(
            "{}\n{}",
            caller("token_env = \"T\""),
            caller("token_env = \"U\"")
        );
        assert!(error_of(&twice).contains("callers[1].name"));
        let without_mtls = error_of(&caller("certificate_san = \"spiffe://x\""));
        assert!(
            without_mtls.contains("callers[0].certificate_san"),
            "{without_mtls}"
        );
    }

    #[test]
    fn otlp_endpoint_is_off_unless_an_http_url_is_given() {
        assert_eq!(Config::parse("").unwrap().otlp_endpoint, None);
        assert_eq!(
            Config::parse("otlp_endpoint = \"\"").unwrap().otlp_endpoint,
            None
        );
        for url in ["http://otel-collector:4317", "https://collector.example"] {
            let c = Config::parse(&format!("otlp_endpoint = {url:?}")).unwrap();
            assert_eq!(c.otlp_endpoint.unwrap().as_str().trim_end_matches('/'), url);
        }
        for bad in [
            "otel-collector:4317",
            "ftp://collector",
            "4317",
            "http://",
            "http://collector:4318/v1/traces",
            "http://user:secret@collector:4317",
        ] {
            let e = error_of(&format!("otlp_endpoint = {bad:?}"));
            assert!(e.starts_with("otlp_endpoint: "), "{bad}: {e}");
        }
        assert!(error_of("otlp_endpoint = 4317").starts_with("otlp_endpoint: "));
    }

    /// The commented block of `config.example.toml` starting at `first`,
    /// uncommented.
    pub(super) fn commented_example(first: &str) -> String {
        let example =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
                .unwrap();
        example
            .lines()
            .skip_while(|l| *l != first)
            .take_while(|l| l.starts_with("# "))
            .map(|l| format!("{}\n", &l[2..]))
            .collect()
    }

    #[test]
    fn the_commented_callers_example_is_valid_once_uncommented() {
        let text = format!(
            "{}{}",
            commented_example("# [[callers]]"),
            commented_example("# [tls]")
        );
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.callers.len(), 2, "{text}");
        assert_eq!(c.callers[0].name, "ci");
        assert!(matches!(
            c.callers[0].credential,
            CallerCredential::Token(_)
        ));
        assert!(matches!(
            c.callers[1].credential,
            CallerCredential::CertificateSan(_)
        ));
    }

    #[test]
    fn namespaces_default_to_the_url_host_and_docker_io_for_docker_hub() {
        let c = Config::load(None, no_env).unwrap();
        assert_eq!(
            c.upstreams[0].namespaces(),
            ["registry-1.docker.io", "docker.io"]
        );
        let c = Config::parse(
            "[[upstreams]]\nname = \"a\"\nurl = \"http://127.0.0.1:5000\"\n\
             [[upstreams]]\nname = \"b\"\nurl = \"https://ghcr.io\"\nnamespaces = [\"GHCR.io\", \"mirror.example:443\"]",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.upstreams[0].namespaces(), ["127.0.0.1:5000"]);
        assert_eq!(
            c.upstreams[1].namespaces(),
            ["ghcr.io", "mirror.example:443"]
        );
        let bad = Config::parse(
            "[[upstreams]]\nname = \"a\"\nurl = \"https://a\"\nnamespaces = [\"https://a\"]",
        )
        .unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("upstreams[0].namespaces[0]")
        );
        assert_eq!(
            Config::load(None, no_env).unwrap().mirror_listen,
            None,
            "off by default"
        );
    }

    #[test]
    fn library_prefix_defaults_to_docker_hub_hosts_only() {
        let c = Config::parse("[[upstreams]]\nname = \"a\"\nurl = \"https://ghcr.io\"").unwrap();
        assert!(!c.upstreams[0].library_prefix());
        let c = Config::parse("[[upstreams]]\nname = \"a\"\nurl = \"https://docker.io\"").unwrap();
        assert!(c.upstreams[0].library_prefix());
    }
}
