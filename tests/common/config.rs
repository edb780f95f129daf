//! The one builder of service configs (TOML) for tests and benchmarks.
//!
//! ```ignore
//! let toml = ServiceConfig::new()
//!     .top("max_concurrent_rpcs = 2")
//!     .cache("negative_ttl = \"0s\"")
//!     .upstream(Upstream::new("a", &fake.url()).priority(10).retries(1).timeout(Duration::from_secs(1)))
//!     .upstream(Upstream::new("b", &registry.url()).line("exclude = [\"secret/**\"]").auth_basic_file("u", &path))
//!     .toml();
//! ```

use std::path::Path;
use std::time::Duration;

/// A whole service config: top-level lines, the `[tls]` table if set,
/// `[cache]` lines, then the `[[upstreams]]` in the order added.
#[derive(Clone, Debug, Default)]
pub struct ServiceConfig {
    top: Vec<String>,
    tls: Option<String>,
    cache: Vec<String>,
    /// The `[cache.s3]` table, after the `[cache]` lines.
    cache_s3: Option<String>,
    upstreams: Vec<Upstream>,
}

impl ServiceConfig {
    /// An empty config (which the service refuses until an upstream is added).
    pub fn new() -> ServiceConfig {
        ServiceConfig::default()
    }

    /// A config with this one upstream.
    pub fn with(upstream: Upstream) -> ServiceConfig {
        ServiceConfig::new().upstream(upstream)
    }

    /// A top-level `key = value` line (e.g. `shutdown_grace = "20s"`).
    pub fn top(mut self, line: &str) -> ServiceConfig {
        self.top.push(line.to_string());
        self
    }

    /// A `key = value` line of the `[cache]` table (e.g. `tag_ttl = "1s"`).
    pub fn cache(mut self, line: &str) -> ServiceConfig {
        self.cache.push(line.to_string());
        self
    }

    /// The shared cache tier: `backend = "s3"` and this `[cache.s3]` table
    /// (e.g. [`super::s3::S3::table`]).
    pub fn shared_cache(mut self, table: &str) -> ServiceConfig {
        self.cache.push("backend = \"s3\"".to_owned());
        self.cache_s3 = Some(table.to_owned());
        self
    }

    /// A `[tls]` table: TLS on the gRPC port with this certificate and key,
    /// and client certificates signed by `client_ca` required if given.
    pub fn tls(mut self, cert: &Path, key: &Path, client_ca: Option<&Path>) -> ServiceConfig {
        let mut table = format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        );
        if let Some(ca) = client_ca {
            table.push_str(&format!("client_ca_file = \"{}\"\n", ca.display()));
        }
        self.tls = Some(table);
        self
    }

    /// Adds an upstream after those already added.
    pub fn upstream(mut self, upstream: Upstream) -> ServiceConfig {
        self.upstreams.push(upstream);
        self
    }

    /// The TOML text. The background scrubber is off unless the test sets
    /// `scrub_rate`: in a debug build its hashing takes a real share of the
    /// two cores the suite runs on, and only the scrubber's own tests need it.
    pub fn toml(&self) -> String {
        let mut text = String::new();
        for line in &self.top {
            text.push_str(line);
            text.push('\n');
        }
        if let Some(tls) = &self.tls {
            text.push('\n');
            text.push_str(tls);
        }
        text.push_str("\n[cache]\n");
        if !self
            .cache
            .iter()
            .any(|l| l.trim_start().starts_with("scrub_rate"))
        {
            text.push_str("scrub_rate = \"0\"\n");
        }
        for line in &self.cache {
            text.push_str(line);
            text.push('\n');
        }
        if let Some(table) = &self.cache_s3 {
            text.push('\n');
            text.push_str(table);
        }
        for upstream in &self.upstreams {
            text.push('\n');
            text.push_str(&upstream.toml());
        }
        text
    }
}

/// One `[[upstreams]]` entry. Keys left unset take the service's defaults
/// (see the README); [`Upstream::request_bound`] uses the same defaults.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// `name`.
    pub name: String,
    /// `url`.
    pub url: String,
    priority: Option<u32>,
    connect_timeout: Option<Duration>,
    timeout: Option<Duration>,
    retries: Option<u32>,
    retry_max_delay: Option<Duration>,
    circuit: Option<(u32, Duration)>,
    max_connections: Option<usize>,
    lines: Vec<String>,
    auth: Option<String>,
}

impl Upstream {
    /// `name` at `url`, everything else the service's default.
    pub fn new(name: &str, url: &str) -> Upstream {
        Upstream {
            name: name.to_string(),
            url: url.to_string(),
            priority: None,
            connect_timeout: None,
            timeout: None,
            retries: None,
            retry_max_delay: None,
            circuit: None,
            max_connections: None,
            lines: Vec::new(),
            auth: None,
        }
    }

    /// `priority`.
    pub fn priority(mut self, priority: u32) -> Upstream {
        self.priority = Some(priority);
        self
    }

    /// `connect_timeout`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Upstream {
        self.connect_timeout = Some(timeout);
        self
    }

    /// `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Upstream {
        self.timeout = Some(timeout);
        self
    }

    /// `retries`.
    pub fn retries(mut self, retries: u32) -> Upstream {
        self.retries = Some(retries);
        self
    }

    /// `retry_max_delay`.
    pub fn retry_max_delay(mut self, delay: Duration) -> Upstream {
        self.retry_max_delay = Some(delay);
        self
    }

    /// `circuit_failures` and `circuit_cooldown`.
    pub fn circuit(mut self, failures: u32, cooldown: Duration) -> Upstream {
        self.circuit = Some((failures, cooldown));
        self
    }

    /// `max_connections`.
    pub fn max_connections(mut self, limit: usize) -> Upstream {
        self.max_connections = Some(limit);
        self
    }

    /// Any other `key = value` line, verbatim (`repositories`, `exclude`,
    /// `proxy`, `ca_file`, `min_rate`...).
    pub fn line(mut self, line: &str) -> Upstream {
        self.lines.push(line.to_string());
        self
    }

    /// `[upstreams.auth]` of type `basic` with the password in `file`.
    pub fn auth_basic_file(self, username: &str, file: &Path) -> Upstream {
        self.auth(&format!(
            "type = \"basic\"\nusername = \"{username}\"\npassword_file = \"{}\"",
            file.display()
        ))
    }

    /// `[upstreams.auth]` of type `basic` with the password in the
    /// environment variable `var`.
    pub fn auth_basic_env(self, username: &str, var: &str) -> Upstream {
        self.auth(&format!(
            "type = \"basic\"\nusername = \"{username}\"\npassword_env = \"{var}\""
        ))
    }

    /// `[upstreams.auth]` of type `docker-config` reading `file`.
    pub fn auth_docker_config(self, file: &Path) -> Upstream {
        self.auth(&format!(
            "type = \"docker-config\"\nfile = \"{}\"",
            file.display()
        ))
    }

    /// The body of `[upstreams.auth]`, verbatim.
    pub fn auth(mut self, body: &str) -> Upstream {
        self.auth = Some(body.to_string());
        self
    }

    /// The effective `timeout`.
    pub fn timeout_value(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(30))
    }

    /// The effective `retries`.
    pub fn retries_value(&self) -> u32 {
        self.retries.unwrap_or(3)
    }

    /// The effective `retry_max_delay`.
    pub fn retry_max_delay_value(&self) -> Duration {
        self.retry_max_delay.unwrap_or(Duration::from_secs(10))
    }

    /// Longest one request to this upstream may take with its retries:
    /// every attempt may spend the connect timeout and the header timeout,
    /// every retry the backoff cap.
    pub fn request_bound(&self) -> Duration {
        let connect = self.connect_timeout.unwrap_or(Duration::from_secs(5));
        let retries = self.retries_value();
        (connect + self.timeout_value()) * (retries + 1) + self.retry_max_delay_value() * retries
    }

    /// This entry as TOML.
    pub fn toml(&self) -> String {
        let ms = |d: Duration| format!("\"{}ms\"", d.as_millis());
        let mut text = format!(
            "[[upstreams]]\nname = \"{}\"\nurl = \"{}\"\n",
            self.name, self.url
        );
        let mut key = |k: &str, v: String| text.push_str(&format!("{k} = {v}\n"));
        if let Some(p) = self.priority {
            key("priority", p.to_string());
        }
        if let Some(d) = self.connect_timeout {
            key("connect_timeout", ms(d));
        }
        if let Some(d) = self.timeout {
            key("timeout", ms(d));
        }
        if let Some(n) = self.retries {
            key("retries", n.to_string());
        }
        if let Some(d) = self.retry_max_delay {
            key("retry_max_delay", ms(d));
        }
        if let Some((failures, cooldown)) = self.circuit {
            key("circuit_failures", failures.to_string());
            key("circuit_cooldown", ms(cooldown));
        }
        if let Some(n) = self.max_connections {
            key("max_connections", n.to_string());
        }
        for line in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        if let Some(auth) = &self.auth {
            text.push_str("[upstreams.auth]\n");
            text.push_str(auth);
            text.push('\n');
        }
        text
    }
}
