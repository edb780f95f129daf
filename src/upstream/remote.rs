//! One upstream registry as the engine sees it: its HTTP client, routing
//! rules, credentials and token cache, and [`Remote::send`], which runs the
//! authentication flow (challenge, token, one retry). Protocol-neutral: the
//! OCI URLs and headers are built in [`super::registry`].

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{
    ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, HeaderMap, HeaderValue, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use super::auth::{BasicAuth, Challenge, Credentials, Resolved, Secret, parse_challenges};
use super::error::{Fault, FaultKind};
use super::glob::Glob;
use super::resilience::{Circuit, backoff, retry_after};
use super::token_cache::TokenCache;
use crate::config::UpstreamConfig;
use crate::oci::Repository;

/// Most bytes read from a token endpoint's answer.
const TOKEN_BODY_LIMIT: usize = 64 * 1024;
/// Token lifetime when the token endpoint does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// A request to an upstream, before authentication.
#[derive(Debug, Clone)]
pub struct Request {
    /// GET or HEAD.
    pub method: Method,
    /// Absolute URL on the upstream.
    pub url: Url,
    /// The `Accept` header, if any.
    pub accept: Option<HeaderValue>,
    /// Ask for the bytes from this offset on (`Range: bytes=N-`).
    pub range: Option<u64>,
    /// Token scope, e.g. `repository:library/nginx:pull`.
    pub scope: String,
    /// What is asked for, for messages: "manifest `library/nginx:1.27`".
    pub what: String,
}

/// The `Authorization` a request carries.
#[derive(Debug, Clone)]
enum Authorization {
    Bearer(Secret),
    Basic(BasicAuth),
}

impl Authorization {
    fn header(&self) -> HeaderValue {
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

/// One configured upstream registry.
#[derive(Debug)]
pub struct Remote {
    name: String,
    base: Url,
    priority: i64,
    enabled: bool,
    include: Vec<Glob>,
    exclude: Vec<Glob>,
    library_prefix: bool,
    timeout: Duration,
    retries: u32,
    retry_max_delay: Duration,
    min_rate: u64,
    circuit: Circuit,
    /// Permits for requests in flight (see [`ConnectionPermit`]).
    connections: Arc<Semaphore>,
    max_connections: usize,
    realm_hosts: Vec<String>,
    http: reqwest::Client,
    /// For token requests: follows only redirects that the realm policy allows.
    token_http: reqwest::Client,
    credentials: Credentials,
    tokens: TokenCache,
    /// Set once the upstream asked for Basic auth, so later requests send it
    /// up front instead of collecting a 401 each time.
    basic_first: AtomicBool,
}

/// How long a token answer stays usable from `now`: `expires_in` seconds
/// (default 60) counted from `issued_at` when the answer has one (RFC 3339,
/// UTC). An `issued_at` in the future, or one older than the whole lifetime,
/// says more about the two clocks than about the token and is ignored (the
/// lifetime then counts from now; a token the registry refuses is dropped
/// and fetched again anyway).
fn token_lifetime(
    expires_in: Option<u64>,
    issued_at: Option<&str>,
    now: std::time::SystemTime,
) -> Duration {
    let lifetime = expires_in
        .filter(|&s| s > 0)
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    let age = issued_at
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|issued| now.duration_since(issued).ok())
        .filter(|&age| age < lifetime);
    lifetime - age.unwrap_or_default()
}

/// The certificates of a PEM bundle; an unreadable file, or one with no
/// certificate in it, is an error (a typo must not silently trust nothing).
fn read_ca_file(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in the file".to_owned());
    }
    Ok(certs)
}

impl Remote {
    /// Builds the upstream at `position` in the config file.
    pub fn new(config: &UpstreamConfig, position: usize) -> Result<Self, String> {
        let realm_hosts: Vec<String> = config
            .realm_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let extra_roots = match &config.ca_file {
            Some(path) => read_ca_file(path).map_err(|e| {
                format!(
                    "upstream `{}`: ca_file {}: {e}",
                    config.name,
                    path.display()
                )
            })?,
            None => Vec::new(),
        };
        let client = |redirect| {
            let builder = extra_roots.iter().cloned().fold(
                reqwest::Client::builder(),
                reqwest::ClientBuilder::add_root_certificate,
            );
            let builder = builder
                .connect_timeout(config.connect_timeout)
                .read_timeout(config.timeout)
                .redirect(redirect)
                .user_agent(concat!("oci-upstream/", env!("CARGO_PKG_VERSION")))
                .pool_idle_timeout(Duration::from_secs(90));
            let builder = match &config.proxy {
                Some(proxy) => builder.proxy(
                    reqwest::Proxy::all(proxy.as_str())
                        .map_err(|e| format!("upstream `{}`: invalid proxy: {e}", config.name))?,
                ),
                None => builder.no_proxy(),
            };
            builder
                .build()
                .map_err(|e| format!("upstream `{}`: cannot build HTTP client: {e}", config.name))
        };
        let http = client(reqwest::redirect::Policy::limited(MAX_REDIRECTS))?;
        let (base, hosts) = (config.url.clone(), realm_hosts.clone());
        let token_http = client(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects from the token endpoint")
            } else if let Err(why) = realm_allowed(&base, &hosts, attempt.url()) {
                attempt.error(format!(
                    "token endpoint redirected to a refused realm: {why}"
                ))
            } else {
                attempt.follow()
            }
        }))?;
        let glob = |g: &String| Glob::parse(g);
        Ok(Self {
            name: config.name.clone(),
            base: config.url.clone(),
            priority: config.priority.unwrap_or(position as i64),
            enabled: config.enabled,
            include: config
                .repositories
                .iter()
                .map(glob)
                .collect::<Result<_, _>>()?,
            exclude: config.exclude.iter().map(glob).collect::<Result<_, _>>()?,
            library_prefix: config.library_prefix(),
            timeout: config.timeout,
            retries: config.retries,
            retry_max_delay: config.retry_max_delay,
            min_rate: config.min_rate.0,
            circuit: Circuit::new(config.circuit_failures, config.circuit_cooldown),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            max_connections: config.max_connections,
            realm_hosts,
            http,
            token_http,
            credentials: Credentials::from_config(&config.auth),
            tokens: TokenCache::default(),
            basic_first: AtomicBool::new(false),
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Routing priority (lower first).
    pub fn priority(&self) -> i64 {
        self.priority
    }

    /// Whether the upstream is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// True when the routing rules admit `repository`.
    pub fn admits(&self, repository: &Repository) -> bool {
        let name = repository.as_str();
        self.include.iter().any(|g| g.matches(name))
            && !self.exclude.iter().any(|g| g.matches(name))
    }

    /// The repository's name on this upstream (`nginx` → `library/nginx` on
    /// Docker Hub; only single-component names are prefixed).
    pub fn remote_name(&self, repository: &Repository) -> String {
        if self.library_prefix && repository.is_single_component() {
            format!("library/{repository}")
        } else {
            repository.as_str().to_owned()
        }
    }

    /// The upstream's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// Slowest acceptable body rate, bytes per second.
    pub fn min_rate(&self) -> u64 {
        self.min_rate
    }

    /// The upstream's circuit breaker.
    pub fn circuit(&self) -> &Circuit {
        &self.circuit
    }

    /// Sends `req` (see [`Remote::send_once`]), retrying connection failures
    /// and 429/502/503/504 answers up to `retries` times with backoff. The
    /// last answer is returned as it is; classifying it is the caller's job.
    pub async fn send(&self, req: &Request) -> Result<reqwest::Response, Fault> {
        let permit = tokio::time::timeout(self.timeout, self.connections.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                Fault::unavailable(format!(
                    "upstream `{}` had all {} of its connections busy for {:?} (max_connections) when asked for {}",
                    self.name, self.max_connections, self.timeout, req.what
                ))
            })?;
        let permit = ConnectionPermit(Arc::new(permit));
        let mut attempt = 0;
        loop {
            let mut result = self.send_once(req).await;
            if let Ok(response) = &mut result {
                // Held until the response (and its body) is dropped.
                response.extensions_mut().insert(permit.clone());
            }
            let retry = match &result {
                Ok(response) if is_retryable_status(response.status()) => {
                    Some(retry_after(response.headers()))
                }
                Err(fault) if fault.is_retryable() => Some(None),
                _ => None,
            };
            match retry {
                Some(asked) if attempt < self.retries => {
                    let delay = backoff(attempt, asked, self.retry_max_delay);
                    tracing::debug!(upstream = %self.name, what = %req.what, attempt, ?delay, "retrying");
                    drop(result);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                _ => return result,
            }
        }
    }

    /// Sends `req` once, authenticating as the upstream asks: a cached or
    /// static token up front, then on a 401 the challenge's flow (Bearer
    /// token or Basic credentials) and one retry. The answer may still be a
    /// 401/403 (credentials refused).
    async fn send_once(&self, req: &Request) -> Result<reqwest::Response, Fault> {
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

    async fn upfront_auth(&self, scope: &str) -> Result<Option<Authorization>, Fault> {
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

    fn basic(&self) -> Result<Option<BasicAuth>, Fault> {
        Ok(self.resolved()?.basic)
    }

    /// The credentials for this upstream's host, read now.
    fn resolved(&self) -> Result<Resolved, Fault> {
        let host = match self.base.port() {
            Some(port) => format!("{}:{port}", self.base.host_str().unwrap_or_default()),
            None => self.base.host_str().unwrap_or_default().to_owned(),
        };
        self.credentials
            .resolve(&host)
            .map_err(|e| Fault::new(FaultKind::Denied, format!("upstream `{}`: {e}", self.name)))
    }

    async fn execute(
        &self,
        req: &Request,
        auth: Option<&Authorization>,
    ) -> Result<reqwest::Response, Fault> {
        let mut builder = self
            .http
            .request(req.method.clone(), req.url.clone())
            .header("Docker-Distribution-API-Version", "registry/2.0")
            .header(ACCEPT_ENCODING, "identity");
        if let Some(accept) = &req.accept {
            builder = builder.header(ACCEPT, accept.clone());
        }
        if let Some(offset) = req.range {
            builder = builder.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        if let Some(auth) = auth {
            builder = builder.header(AUTHORIZATION, auth.header());
        }
        self.timed(&req.what, builder.send()).await
    }

    /// Awaits response headers within the upstream's timeout.
    async fn timed(
        &self,
        what: &str,
        send: impl Future<Output = reqwest::Result<reqwest::Response>>,
    ) -> Result<reqwest::Response, Fault> {
        match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) if e.is_redirect() => Err(Fault::unavailable(format!(
                "upstream `{}` redirected the request for {what} where it may not go: {}",
                self.name,
                describe(&e)
            ))),
            Ok(Err(e)) => {
                let fault = Fault::unavailable(format!(
                    "upstream `{}` could not be reached for {what}: {}",
                    self.name,
                    describe(&e)
                ));
                // Refused or reset before an answer: worth another try. A
                // timeout already spent its time.
                Err(if e.is_timeout() {
                    fault
                } else {
                    fault.retryable()
                })
            }
            Err(_) => Err(Fault::unavailable(format!(
                "upstream `{}` did not answer for {what} within {:?}",
                self.name, self.timeout
            ))),
        }
    }

    /// A token for `scope` from the cache or from the challenge's realm.
    async fn token(&self, challenge: &Challenge, scope: &str) -> Result<Secret, Fault> {
        let realm = challenge.param("realm").unwrap_or_default();
        let realm = Url::parse(realm).map_err(|_| {
            Fault::unavailable(format!(
                "upstream `{}` sent an unusable token realm {realm:?}",
                self.name
            ))
        })?;
        self.check_realm(&realm).await?;
        let scope = if scope.is_empty() {
            challenge.param("scope").unwrap_or_default()
        } else {
            scope
        };
        let service = challenge.param("service");
        self.tokens
            .get_or_fetch(scope, || self.fetch_token(realm, service, scope))
            .await
    }

    async fn fetch_token(
        &self,
        mut realm: Url,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(Secret, Duration), Fault> {
        let what = format!("a token for `{scope}`");
        let credentials = self.resolved()?;
        let builder = if let Some(refresh) = &credentials.refresh_token {
            // OAuth2 form, as for a Docker config's `identitytoken`.
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", refresh.expose())
                .append_pair("client_id", "oci-upstream");
            if let Some(service) = service {
                form.append_pair("service", service);
            }
            if !scope.is_empty() {
                form.append_pair("scope", scope);
            }
            self.token_http
                .post(realm)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(form.finish())
        } else {
            {
                let mut query = realm.query_pairs_mut();
                if let Some(service) = service {
                    query.append_pair("service", service);
                }
                if !scope.is_empty() {
                    query.append_pair("scope", scope);
                }
            }
            let builder = self.token_http.get(realm);
            match credentials.basic {
                Some(basic) => builder.header(AUTHORIZATION, Authorization::Basic(basic).header()),
                None => builder,
            }
        };
        let builder = builder.header(ACCEPT_ENCODING, "identity");
        let response = self.timed(&what, builder.send()).await?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Fault::new(
                FaultKind::Denied,
                format!(
                    "token endpoint of upstream `{}` refused {what} (HTTP {})",
                    self.name,
                    status.as_u16()
                ),
            ));
        }
        if !status.is_success() {
            return Err(Fault::unavailable(format!(
                "token endpoint of upstream `{}` answered HTTP {} for {what}",
                self.name,
                status.as_u16()
            )));
        }
        let body = read_limited(response, TOKEN_BODY_LIMIT)
            .await
            .map_err(|e| self.read_fault(&what, e))?;
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
            issued_at: Option<String>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            Fault::unavailable(format!(
                "token endpoint of upstream `{}` sent an answer that is not a token",
                self.name
            ))
        })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Fault::unavailable(format!(
                    "token endpoint of upstream `{}` sent no token",
                    self.name
                ))
            })?;
        let lifetime = token_lifetime(
            parsed.expires_in,
            parsed.issued_at.as_deref(),
            std::time::SystemTime::now(),
        );
        Ok((Secret::new(token), lifetime))
    }

    /// A realm must pass [`realm_allowed`], and when the upstream is not
    /// itself on an internal address, the realm's host must not resolve to one.
    async fn check_realm(&self, realm: &Url) -> Result<(), Fault> {
        let refuse = |why: &str| {
            Fault::unavailable(format!(
                "upstream `{}` sent token realm `{}`, which is refused: {why}",
                self.name,
                realm.origin().ascii_serialization()
            ))
        };
        realm_allowed(&self.base, &self.realm_hosts, realm).map_err(refuse)?;
        let base_host = self.base.host_str().unwrap_or_default();
        if is_internal(base_host) || is_internal_resolved(base_host).await {
            return Ok(());
        }
        let host = realm.host_str().unwrap_or_default();
        if is_internal_resolved(host).await {
            return Err(refuse(
                "its host resolves to a loopback, private or link-local address",
            ));
        }
        Ok(())
    }

    fn read_fault(&self, what: &str, e: ReadError) -> Fault {
        match e {
            ReadError::TooLarge(limit) => Fault::unavailable(format!(
                "upstream `{}` sent more than {limit} bytes for {what}",
                self.name
            )),
            ReadError::Transport(e) => Fault::unavailable(format!(
                "upstream `{}` broke off while sending {what}: {}",
                self.name,
                describe(&e)
            )),
        }
    }

    /// Reads a whole response body of at most `limit` bytes.
    pub async fn read_body(
        &self,
        response: reqwest::Response,
        limit: usize,
        what: &str,
    ) -> Result<Bytes, Fault> {
        read_limited(response, limit)
            .await
            .map_err(|e| self.read_fault(what, e))
    }
}

/// A slot of an upstream's `max_connections`, travelling in the extensions
/// of the response it was taken for, so it is held as long as the response
/// (and its body, e.g. a blob download) is.
#[derive(Debug, Clone)]
struct ConnectionPermit(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// 429 and the 5xx answers that mean "try again".
fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// Why a bounded body read failed.
#[derive(Debug)]
pub enum ReadError {
    /// The body is longer than the limit.
    TooLarge(usize),
    /// The connection failed.
    Transport(reqwest::Error),
}

/// Reads a body, refusing one longer than `limit` (by `Content-Length` before
/// reading, or as soon as the bytes read pass it).
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, ReadError> {
    if content_length(response.headers()).is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge(limit));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Reads at most `limit` bytes of a body and drops the rest (for error
/// bodies, which only feed a message).
pub async fn read_prefix(mut response: reqwest::Response, limit: usize) -> Bytes {
    let mut body = BytesMut::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            _ => break,
        }
    }
    body.freeze()
}

/// The `Content-Length` header, parsed.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(reqwest::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// An error and its sources, on one line.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s = s.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = std::error::Error::source(source.expect("loop condition holds"));
    }
    text
}

/// The realm policy that needs no DNS: https unless the upstream itself is
/// http; the upstream's host, its registrable domain, or a `realm_hosts`
/// entry; never an internal address literal unless the upstream is internal.
fn realm_allowed(base: &Url, realm_hosts: &[String], realm: &Url) -> Result<(), &'static str> {
    match realm.scheme() {
        "https" => {}
        "http" if base.scheme() == "http" => {}
        _ => {
            return Err(
                "credentials go only over https (or http when the upstream itself is http)",
            );
        }
    }
    let (Some(realm_host), Some(base_host)) = (realm.host_str(), base.host_str()) else {
        return Err("it has no host");
    };
    let realm_host = realm_host.to_ascii_lowercase();
    let base_host = base_host.to_ascii_lowercase();
    if is_internal(&realm_host) && !is_internal(&base_host) {
        return Err("it is a loopback, private or link-local address");
    }
    let allowed = realm_host == base_host
        || realm_hosts.contains(&realm_host)
        || registrable_domain(&realm_host)
            .is_some_and(|d| Some(d) == registrable_domain(&base_host));
    if allowed {
        Ok(())
    } else {
        Err("its host is not the upstream's host, domain, or in `realm_hosts`")
    }
}

/// True when `host` (a DNS name) resolves to any internal address. Names that
/// do not resolve are not internal (the request will fail on its own).
async fn is_internal_resolved(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
        return is_internal(host);
    }
    match tokio::net::lookup_host((host, 0)).await {
        Ok(addrs) => addrs.into_iter().any(|a| is_internal(&a.ip().to_string())),
        Err(_) => false,
    }
}

/// True for loopback, private, link-local and unspecified IP literals, and
/// `localhost`.
fn is_internal(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            ip.is_loopback() || ip.is_private() || ip.is_link_local() || ip.is_unspecified()
        }
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        Err(_) => false,
    }
}

/// The registrable domain of a DNS name by the Public Suffix List: one
/// label more than its public suffix (`auth.docker.io` → `docker.io`,
/// `registry.example.co.uk` → `example.co.uk`); none for IP literals, for
/// single-label names and for public suffixes themselves.
fn registrable_domain(host: &str) -> Option<&str> {
    if host.parse::<IpAddr>().is_ok() || host.starts_with('[') || !host.contains('.') {
        return None;
    }
    psl::domain_str(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(url: &str, realm_hosts: &[&str]) -> Remote {
        let mut config = UpstreamConfig::docker_hub();
        config.url = Url::parse(url).unwrap();
        config.realm_hosts = realm_hosts.iter().map(|s| s.to_string()).collect();
        Remote::new(&config, 0).unwrap()
    }

    fn build_with_ca_file(contents: Option<&str>) -> Result<Remote, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        if let Some(contents) = contents {
            std::fs::write(&path, contents).unwrap();
        }
        let mut config = UpstreamConfig::docker_hub();
        config.ca_file = Some(path);
        Remote::new(&config, 0)
    }

    #[test]
    fn token_lifetime_counts_from_issued_at_unless_the_clocks_disagree() {
        let now = humantime::parse_rfc3339("2026-11-29T10:00:00Z").unwrap();
        let secs = Duration::from_secs;
        for (expires_in, issued_at, want) in [
            (None, None, secs(60)),
            (Some(0), None, secs(60)),
            (Some(300), None, secs(300)),
            (Some(300), Some("2026-11-29T09:58:00Z"), secs(180)),
            (
                Some(300),
                Some("2026-11-29T09:59:59.500Z"),
                Duration::from_millis(299_500),
            ),
            // In the future, or older than the lifetime: clock skew, ignored.
            (Some(300), Some("2026-11-29T10:01:00Z"), secs(300)),
            (Some(300), Some("2026-11-29T09:50:00Z"), secs(300)),
            // Not RFC 3339 in UTC: ignored.
            (Some(300), Some("yesterday"), secs(300)),
        ] {
            assert_eq!(
                token_lifetime(expires_in, issued_at, now),
                want,
                "{expires_in:?} {issued_at:?}"
            );
        }
    }

    #[test]
    fn ca_file_that_is_missing_or_holds_no_certificate_is_refused() {
        for (contents, why) in [
            (None, "No such file"),
            (Some(""), "no PEM certificate"),
            (Some("not a certificate\n"), "no PEM certificate"),
        ] {
            let err = build_with_ca_file(contents).map(drop).expect_err("refused");
            assert!(err.contains("ca_file") && err.contains(why), "{err}");
        }
        let garbled = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = build_with_ca_file(Some(garbled))
            .map(drop)
            .expect_err("refused");
        assert!(err.contains("upstream `hub`"), "{err}");
    }

    fn allowed(upstream: &str, realm: &str) -> bool {
        let remote = remote(upstream, &["auth.example.net"]);
        realm_allowed(
            &remote.base,
            &remote.realm_hosts,
            &Url::parse(realm).unwrap(),
        )
        .is_ok()
    }

    #[tokio::test]
    async fn realms_resolving_to_internal_addresses_are_refused() {
        let hub = remote("https://registry.example.com", &["localhost"]);
        let realm = Url::parse("https://localhost/token").unwrap();
        assert!(hub.check_realm(&realm).await.is_err());
        let local = remote("http://localhost:5000", &[]);
        let realm = Url::parse("http://localhost:5001/token").unwrap();
        assert!(local.check_realm(&realm).await.is_ok());
    }

    #[test]
    fn realm_policy() {
        assert!(allowed(
            "https://registry-1.docker.io",
            "https://auth.docker.io/token"
        ));
        assert!(allowed("https://ghcr.io", "https://ghcr.io/token"));
        assert!(allowed(
            "https://r.example.com",
            "https://auth.example.net/token"
        ));
        assert!(!allowed("https://ghcr.io", "https://evil.example/token"));
        assert!(
            !allowed(
                "https://registry.example.co.uk",
                "https://auth.attacker.co.uk/token"
            ),
            "co.uk is a public suffix, not a shared domain"
        );
        assert!(allowed(
            "https://registry.example.co.uk",
            "https://auth.example.co.uk/token"
        ));
        assert!(
            !allowed("https://ghcr.io", "http://ghcr.io/token"),
            "https downgrade"
        );
        assert!(!allowed("https://ghcr.io", "https://169.254.169.254/token"));
        assert!(!allowed("https://ghcr.io", "https://127.0.0.1/token"));
        assert!(!allowed("https://ghcr.io", "https://localhost/token"));
        assert!(allowed(
            "http://127.0.0.1:5000",
            "http://127.0.0.1:5001/token"
        ));
        assert!(!allowed("http://127.0.0.1:5000", "http://10.0.0.1/token"));
    }

    #[test]
    fn library_prefix_only_for_single_component_names() {
        let hub = remote("https://registry-1.docker.io", &[]);
        let name = |s| hub.remote_name(&Repository::parse(s).unwrap());
        assert_eq!(name("nginx"), "library/nginx");
        assert_eq!(name("bitnami/redis"), "bitnami/redis");
        let other = remote("https://ghcr.io", &[]);
        assert_eq!(
            other.remote_name(&Repository::parse("nginx").unwrap()),
            "nginx"
        );
    }

    #[test]
    fn registrable_domains() {
        for (host, domain) in [
            ("auth.docker.io", Some("docker.io")),
            ("docker.io", Some("docker.io")),
            ("registry.example.co.uk", Some("example.co.uk")),
            ("co.uk", None),
            ("registry.corp.internal", Some("corp.internal")),
            ("localhost", None),
            ("10.1.2.3", None),
        ] {
            assert_eq!(registrable_domain(host), domain, "{host}");
        }
    }
}
