//! One upstream registry as the engine sees it ([`Upstream`]): its HTTP
//! clients, settings and circuit breaker, the cap on requests open to it,
//! and [`Upstream::send`], which retries what is worth retrying. The
//! authentication flow is in [`super::auth`] and [`super::token`]; the OCI
//! URLs and headers in [`super::distribution`].

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, HeaderValue};
use reqwest::{Method, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use url::Url;

use super::auth::{Authorization, Credentials};
use super::egress::{Guard, redirect_allowed, refused_address, same_origin};
use super::error::Fault;
use super::http::{ReadError, describe, read_limited};
use super::realm::realm_allowed;
use super::resilience::{Circuit, backoff, retry_after};
use super::setup::{ClientError, read_ca_file};
use super::token::TokenCache;
use crate::config::UpstreamConfig;
use crate::glob::Rules;
use crate::metrics::{Metrics, Operation};
use crate::oci::Repository;

/// Redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// The statuses followed as redirects (`Location` names the next URL).
const REDIRECTS: [StatusCode; 5] = [
    StatusCode::MOVED_PERMANENTLY,
    StatusCode::FOUND,
    StatusCode::SEE_OTHER,
    StatusCode::TEMPORARY_REDIRECT,
    StatusCode::PERMANENT_REDIRECT,
];

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
    /// What it is for, in the metrics.
    pub operation: Operation,
}

/// One configured upstream registry.
#[derive(Debug)]
pub struct Upstream {
    pub(super) name: String,
    pub(super) base: Url,
    pub(super) priority: i64,
    pub(super) enabled: bool,
    pub(super) rules: Rules,
    pub(super) library_prefix: bool,
    pub(super) timeout: Duration,
    pub(super) retries: u32,
    pub(super) retry_max_delay: Duration,
    pub(super) min_rate: u64,
    pub(super) hedge_after: Duration,
    pub(super) circuit: Circuit,
    /// Permits for requests in flight (see [`ConnectionPermit`]).
    pub(super) connections: Arc<Semaphore>,
    pub(super) max_connections: usize,
    pub(super) realm_hosts: Vec<String>,
    /// Registry hosts it answers for on the mirror's `?ns=`, lowercase.
    namespaces: Vec<String>,
    /// Where requests may connect; the DNS resolver of both clients.
    pub(super) guard: Guard,
    /// For registry requests; follows no redirect by itself (see
    /// [`Upstream::execute`]).
    pub(super) http: reqwest::Client,
    /// For token requests: follows only redirects that the realm policy allows.
    pub(super) token_http: reqwest::Client,
    pub(super) credentials: Credentials,
    /// The configured auth `type`, for operators.
    pub(super) auth_type: &'static str,
    pub(super) tokens: TokenCache,
    /// Set once the upstream asked for Basic auth, so later requests send it
    /// up front instead of collecting a 401 each time.
    pub(super) basic_first: AtomicBool,
    /// Requests are counted here.
    pub(super) metrics: Arc<Metrics>,
}

impl Upstream {
    /// Builds the upstream at `position` in the config file, counting its
    /// requests into `metrics`.
    pub fn new(
        config: &UpstreamConfig,
        position: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ClientError> {
        let realm_hosts: Vec<String> = config
            .realm_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let extra_roots = match &config.ca_file {
            Some(path) => read_ca_file(path).map_err(|source| ClientError::CaFile {
                name: config.name.clone(),
                path: path.clone(),
                source,
            })?,
            None => Vec::new(),
        };
        let guard = Guard::new(&config.url, config.proxy.as_ref());
        let client = |redirect| {
            let builder = extra_roots.iter().cloned().fold(
                reqwest::Client::builder(),
                reqwest::ClientBuilder::add_root_certificate,
            );
            let builder = builder
                .connect_timeout(config.connect_timeout)
                .read_timeout(config.timeout)
                .redirect(redirect)
                .dns_resolver(Arc::new(guard.clone()))
                .user_agent(concat!("oci-upstream/", env!("CARGO_PKG_VERSION")))
                .pool_idle_timeout(Duration::from_secs(90));
            let builder = match &config.proxy {
                Some(proxy) => {
                    builder.proxy(reqwest::Proxy::all(proxy.as_str()).map_err(|source| {
                        ClientError::Proxy {
                            name: config.name.clone(),
                            source,
                        }
                    })?)
                }
                None => builder.no_proxy(),
            };
            builder.build().map_err(|source| ClientError::Client {
                name: config.name.clone(),
                source,
            })
        };
        let http = client(reqwest::redirect::Policy::none())?;
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
        Ok(Self {
            name: config.name.clone(),
            base: config.url.clone(),
            priority: config.priority.unwrap_or(position as i64),
            enabled: config.enabled,
            rules: Rules::new(config.repositories.clone(), config.exclude.clone()),
            library_prefix: config.library_prefix(),
            timeout: config.timeout,
            retries: config.retries,
            retry_max_delay: config.retry_max_delay,
            min_rate: config.min_rate.0,
            hedge_after: config.hedge_after,
            circuit: Circuit::new(config.circuit_failures, config.circuit_cooldown),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            max_connections: config.max_connections,
            realm_hosts,
            namespaces: config.namespaces(),
            guard,
            http,
            token_http,
            credentials: Credentials::from_config(&config.auth),
            auth_type: config.auth.kind(),
            tokens: TokenCache::default(),
            basic_first: AtomicBool::new(false),
            metrics,
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

    /// Which repositories this upstream serves.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Whether it answers for the registry `host` (lowercase
    /// `host[:port]`) on the mirror's `?ns=`.
    pub fn answers_for(&self, host: &str) -> bool {
        self.namespaces.iter().any(|n| n == host)
    }

    /// The repository's name on this upstream (`nginx` → `library/nginx` on
    /// Docker Hub; only single-component names are prefixed).
    pub fn repository_name(&self, repository: &Repository) -> String {
        if self.library_prefix && repository.is_single_component() {
            format!("library/{repository}")
        } else {
            repository.as_str().to_owned()
        }
    }

    /// The configured auth `type` (`anonymous`, `basic`, ...).
    pub fn auth_type(&self) -> &'static str {
        self.auth_type
    }

    /// The upstream's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// Slowest acceptable body rate, bytes per second.
    pub fn min_rate(&self) -> u64 {
        self.min_rate
    }

    /// How long to wait for this upstream's answer before asking the next
    /// candidate too.
    pub fn hedge_after(&self) -> Duration {
        self.hedge_after
    }

    /// The upstream's circuit breaker.
    pub fn circuit(&self) -> &Circuit {
        &self.circuit
    }

    /// Sends `req` (see [`Upstream::send_once`]), retrying connection failures
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

    /// Sends `req` once with `auth`, following redirects by
    /// [`redirect_allowed`]: `Authorization` goes only to the request's own
    /// origin (scheme, host and port), and never again once a hop left it.
    /// The whole chain gets the upstream's `timeout` to response headers.
    pub(super) async fn execute(
        &self,
        req: &Request,
        auth: Option<&Authorization>,
    ) -> Result<reqwest::Response, Fault> {
        let follow = async {
            let mut url = req.url.clone();
            let mut auth = auth;
            for _ in 0..=MAX_REDIRECTS {
                let sent = self.request_to(req, &url, auth).send().await;
                let response = sent.map_err(|e| self.send_fault(&req.what, &req.url, &url, e))?;
                let Some(next) = redirect_target(&response, &url) else {
                    return Ok(response);
                };
                redirect_allowed(&url, &next, self.guard.upstream_is_internal()).map_err(
                    |why| {
                        Fault::unavailable(format!(
                            "upstream `{}` redirected the request for {} to {}, which is refused: {why}",
                            self.name,
                            req.what,
                            next.origin().ascii_serialization()
                        ))
                    },
                )?;
                if !same_origin(&next, &req.url) {
                    auth = None;
                }
                url = next;
            }
            Err(Fault::unavailable(format!(
                "upstream `{}` redirected the request for {} more than {MAX_REDIRECTS} times",
                self.name, req.what
            )))
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, follow)
            .await
            .unwrap_or_else(|_| Err(self.timeout_fault(&req.what)));
        self.count(req.operation, answer.as_ref().ok(), started);
        answer
    }

    /// Counts a request (with its redirects) that got `answer` after the
    /// time since `started`.
    pub(super) fn count(
        &self,
        operation: Operation,
        answer: Option<&reqwest::Response>,
        started: Instant,
    ) {
        self.metrics.registry_request(
            &self.name,
            operation,
            answer.map(|r| r.status().as_u16()),
            started.elapsed().as_secs_f64(),
        );
    }

    /// One request of [`Upstream::execute`]'s chain, to `url`.
    fn request_to(
        &self,
        req: &Request,
        url: &Url,
        auth: Option<&Authorization>,
    ) -> reqwest::RequestBuilder {
        let mut builder = self
            .http
            .request(req.method.clone(), url.clone())
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
        builder
    }

    /// Awaits response headers within the upstream's timeout.
    pub(super) async fn timed(
        &self,
        what: &str,
        send: impl Future<Output = reqwest::Result<reqwest::Response>>,
    ) -> Result<reqwest::Response, Fault> {
        match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.send_fault(what, &self.base, &self.base, e)),
            Err(_) => Err(self.timeout_fault(what)),
        }
    }

    /// The fault of a request to `url` (a hop of a request for `first`)
    /// that got no answer. A redirect target's URL is not shown: it may
    /// carry a signature.
    fn send_fault(&self, what: &str, first: &Url, url: &Url, e: reqwest::Error) -> Fault {
        if let Some(refused) = refused_address(&e) {
            return Fault::unavailable(format!(
                "upstream `{}`: the request for {what} was refused: {refused}",
                self.name
            ));
        }
        if e.is_redirect() {
            return Fault::unavailable(format!(
                "upstream `{}` redirected the request for {what} where it may not go: {}",
                self.name,
                describe(&e)
            ));
        }
        let timeout = e.is_timeout();
        let detail = if same_origin(url, first) {
            describe(&e)
        } else {
            format!(
                "{} (redirected to {})",
                describe(&e.without_url()),
                url.origin().ascii_serialization()
            )
        };
        let fault = Fault::unavailable(format!(
            "upstream `{}` could not be reached for {what}: {detail}",
            self.name
        ));
        // Refused or reset before an answer: worth another try. A timeout
        // already spent its time.
        if timeout { fault } else { fault.retryable() }
    }

    fn timeout_fault(&self, what: &str) -> Fault {
        Fault::unavailable(format!(
            "upstream `{}` did not answer for {what} within {:?}",
            self.name, self.timeout
        ))
    }

    pub(super) fn read_fault(&self, what: &str, e: ReadError) -> Fault {
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

/// The next URL of a redirect answer, resolved against `current`; `None`
/// for other answers and for a redirect without a usable `Location` (which
/// is then the answer).
fn redirect_target(response: &reqwest::Response, current: &Url) -> Option<Url> {
    if !REDIRECTS.contains(&response.status()) {
        return None;
    }
    let location = response.headers().get(reqwest::header::LOCATION)?;
    current.join(location.to_str().ok()?).ok()
}

/// 429 and the 5xx answers that mean "try again".
fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}
#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// An upstream at `url` (Docker Hub's settings otherwise).
    pub(crate) fn build(url: &str, realm_hosts: &[&str]) -> Upstream {
        let mut config = UpstreamConfig::docker_hub();
        config.url = Url::parse(url).unwrap();
        config.realm_hosts = realm_hosts.iter().map(|s| s.to_string()).collect();
        Upstream::new(&config, 0, Arc::default()).unwrap()
    }

    #[test]
    fn library_prefix_only_for_single_component_names() {
        let hub = build("https://registry-1.docker.io", &[]);
        let name = |s| hub.repository_name(&Repository::parse(s).unwrap());
        assert_eq!(name("nginx"), "library/nginx");
        assert_eq!(name("bitnami/redis"), "bitnami/redis");
        let other = build("https://ghcr.io", &[]);
        assert_eq!(
            other.repository_name(&Repository::parse("nginx").unwrap()),
            "nginx"
        );
    }
}
