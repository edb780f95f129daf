//! Upstream credentials and `WWW-Authenticate` challenges: where a password
//! or token comes from, a [`Secret`] type that cannot be printed, and the
//! challenge parser that drives the token flow.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use crate::config::AuthConfig;

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
    fn from_config(file: &Option<PathBuf>, env: &Option<String>) -> Self {
        match (file, env) {
            (Some(path), _) => SecretSource::File(path.clone()),
            (None, Some(var)) => SecretSource::Env(var.clone()),
            // Config validation requires one of the two.
            (None, None) => SecretSource::Env(String::new()),
        }
    }

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
            AuthConfig::Basic {
                username,
                password_file,
                password_env,
            } => Credentials::Basic {
                username: username.clone(),
                password: SecretSource::from_config(password_file, password_env),
            },
            AuthConfig::Bearer {
                token_file,
                token_env,
            } => Credentials::Bearer(SecretSource::from_config(token_file, token_env)),
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

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lowercased (`bearer`, `basic`).
    pub scheme: String,
    /// Parameters with lowercased names.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// A parameter's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses every challenge in a `WWW-Authenticate` value: several challenges
/// in one header, quoted values containing commas and escapes, any case of
/// scheme and parameter names. Unparseable pieces are skipped.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut p = Cursor {
        s: header.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip(|b| b == b',' || b.is_ascii_whitespace());
        if p.done() {
            break;
        }
        let Some(scheme) = p.token() else {
            p.i += 1;
            continue;
        };
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        loop {
            p.skip(|b| b.is_ascii_whitespace());
            let start = p.i;
            let Some(name) = p.token() else { break };
            p.skip(|b| b.is_ascii_whitespace());
            if !p.eat(b'=') {
                // A token68 or the next challenge's scheme.
                p.i = start;
                break;
            }
            p.skip(|b| b.is_ascii_whitespace());
            let value = if p.peek() == Some(b'"') {
                p.quoted()
            } else {
                p.token().unwrap_or_default()
            };
            challenge.params.push((name.to_ascii_lowercase(), value));
            p.skip(|b| b.is_ascii_whitespace());
            if !p.eat(b',') {
                break;
            }
        }
        if challenge.params.is_empty() {
            // Skip a token68 (e.g. `Negotiate abc==`) so it is not read as a scheme.
            p.skip(|b| b != b',');
        }
        out.push(challenge);
    }
    out
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn skip(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
    }
    fn token(&mut self) -> Option<String> {
        let start = self.i;
        self.skip(|b| !(b.is_ascii_whitespace() || matches!(b, b',' | b'=' | b'"')));
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn quoted(&mut self) -> String {
        self.i += 1; // opening quote
        let mut out = Vec::new();
        while let Some(b) = self.peek() {
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(next) = self.peek() {
                        out.push(next);
                        self.i += 1;
                    }
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_distribution_bearer_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/nginx:pull"));
    }

    #[test]
    fn several_challenges_quoted_commas_and_case() {
        let c = parse_challenges(
            r#"Basic realm="Registry, with comma", BEARER Realm="https://t/x",Scope="repository:a:pull,push", error="invalid_token""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry, with comma"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("https://t/x"));
        assert_eq!(c[1].param("scope"), Some("repository:a:pull,push"));
        assert_eq!(c[1].param("error"), Some("invalid_token"));
    }

    #[test]
    fn missing_scope_unquoted_values_escapes_and_token68() {
        let c = parse_challenges(r#"Bearer realm=https://t/token, service=reg"#);
        assert_eq!(c[0].param("realm"), Some("https://t/token"));
        assert_eq!(c[0].param("service"), Some("reg"));
        assert_eq!(c[0].param("scope"), None);
        let c = parse_challenges(r#"Basic realm="a \"b\"""#);
        assert_eq!(c[0].param("realm"), Some(r#"a "b""#));
        let c = parse_challenges("Negotiate abc==, Basic realm=x");
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].scheme, "basic");
        assert!(parse_challenges("").is_empty());
        assert!(parse_challenges(" , ").is_empty());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        let b = BasicAuth {
            username: "u".into(),
            password: s,
        };
        assert!(!format!("{b:?}").contains("hunter2"));
    }

    #[test]
    fn secret_files_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "pa ss\n\n").unwrap();
        let read = SecretSource::File(path).read().unwrap();
        assert_eq!(read.expose(), "pa ss\n");
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
