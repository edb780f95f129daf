//! A Docker token issuer for integration tests: an in-process axum server on
//! `127.0.0.1:0` answering `GET /token` (Docker token spec, anonymous or with
//! Basic credentials) and `POST /token` (OAuth2 form: `refresh_token` and
//! `password` grants) with RS256 JWTs that Distribution 2.8 accepts (signed by
//! the `openssl` CLI with a throw-away self-signed key, `x5c` header). It
//! records every request it answers so tests can count them. A
//! [`Distribution`](super::distribution::Distribution) started with
//! `start_token` trusts it.
//!
//! ```ignore
//! let issuer = TokenIssuer::start(IssuerSettings::default().user("alice", "pw")).await;
//! let registry = Distribution::start_token(&issuer);
//! let image = registry.push_image("team/app", "v1").await;
//! // ... point the service at registry.url() and fetch ...
//! assert_eq!(issuer.get_requests().len(), 1);
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL};

/// The `service` (JWT audience) the registry is configured with.
pub const SERVICE: &str = "test-registry";
/// The issuer name (`iss`) the registry trusts.
pub const ISSUER: &str = "test-issuer";

/// What the issuer accepts and how it answers. Changeable while it runs with
/// [`TokenIssuer::update`].
#[derive(Clone, Debug)]
pub struct IssuerSettings {
    /// Grant `pull` to requests without credentials.
    pub anonymous_pull: bool,
    /// Valid `(username, password)` pairs; they get `pull` and `push`.
    pub users: Vec<(String, String)>,
    /// Valid OAuth2 refresh tokens and the subject each stands for.
    pub refresh_tokens: Vec<(String, String)>,
    /// `expires_in` of every answer, in seconds (also the JWT lifetime).
    pub expires_in: u64,
    /// How many seconds before now the answers' `issued_at` lies (the JWT
    /// itself is signed now, valid for `expires_in`).
    pub issued_ago: u64,
    /// An `expires_in` the answers claim instead of `expires_in` (the JWT
    /// keeps `expires_in`): a hostile or broken token endpoint.
    pub claimed_expires_in: Option<serde_json::Value>,
}

impl Default for IssuerSettings {
    /// Anonymous pull allowed, no users, tokens valid for 300 s.
    fn default() -> Self {
        Self {
            anonymous_pull: true,
            users: Vec::new(),
            refresh_tokens: Vec::new(),
            expires_in: 300,
            issued_ago: 0,
            claimed_expires_in: None,
        }
    }
}

impl IssuerSettings {
    /// Credentials required: no anonymous pull.
    pub fn private() -> Self {
        Self {
            anonymous_pull: false,
            ..Self::default()
        }
    }

    /// Adds a valid user.
    pub fn user(mut self, username: &str, password: &str) -> Self {
        self.users.push((username.into(), password.into()));
        self
    }

    /// Adds a valid refresh token standing for `subject`.
    pub fn refresh_token(mut self, token: &str, subject: &str) -> Self {
        self.refresh_tokens.push((token.into(), subject.into()));
        self
    }

    /// Sets `expires_in`.
    pub fn expires_in(mut self, seconds: u64) -> Self {
        self.expires_in = seconds;
        self
    }

    /// Answers claim `expires_in: value` (the JWT itself keeps its lifetime).
    pub fn claim_expires_in(mut self, value: serde_json::Value) -> Self {
        self.claimed_expires_in = Some(value);
        self
    }

    /// Dates `issued_at` `seconds` in the past.
    pub fn issued_ago(mut self, seconds: u64) -> Self {
        self.issued_ago = seconds;
        self
    }
}

/// One request the issuer answered.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The query (GET) or form (POST) parameters, in order, repeats kept.
    pub params: Vec<(String, String)>,
    /// The username of a Basic `Authorization` header, if one was sent.
    pub basic_user: Option<String>,
    /// The raw `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The status the issuer answered with.
    pub status: u16,
}

impl TokenRequest {
    /// The first value of parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of parameter `name`.
    pub fn params_all(&self, name: &str) -> Vec<&str> {
        self.params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

struct Inner {
    settings: Mutex<IssuerSettings>,
    requests: Mutex<Vec<TokenRequest>>,
    issued: Mutex<Vec<String>>,
    key: PathBuf,
    /// The `openssl` binary.
    openssl: PathBuf,
    /// Base64 (standard) DER of the signing certificate, for `x5c`.
    cert_der: String,
    next_id: AtomicU64,
}

/// A running token issuer; stops when dropped.
pub struct TokenIssuer {
    /// Where it listens.
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl TokenIssuer {
    /// Makes a fresh RSA key and self-signed certificate with `openssl` and
    /// serves `/token` on `127.0.0.1:0`.
    pub async fn start(settings: IssuerSettings) -> TokenIssuer {
        let openssl = super::tls::openssl_binary();
        let dir = tempfile::tempdir().expect("temp dir for the issuer's key");
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let (k, c) = (key.clone(), cert.clone());
        tokio::task::spawn_blocking(move || {
            let subject = format!("/CN={ISSUER}");
            super::tls::openssl(
                [
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                ]
                .map(std::ffi::OsStr::new)
                .into_iter()
                .chain([
                    subject.as_ref(),
                    "-keyout".as_ref(),
                    k.as_os_str(),
                    "-out".as_ref(),
                    c.as_os_str(),
                ]),
            );
        })
        .await
        .expect("openssl task");
        let pem = std::fs::read_to_string(&cert).expect("read the issuer certificate");
        // The PEM body is the base64 of the DER certificate, as x5c wants it.
        let cert_der: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .concat();
        let inner = Arc::new(Inner {
            settings: Mutex::new(settings),
            requests: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
            key,
            openssl,
            cert_der,
            next_id: AtomicU64::new(1),
        });
        let app = Router::new()
            .route("/token", get(token_get).post(token_post))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the token issuer");
        let addr = listener.local_addr().expect("issuer address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenIssuer {
            addr,
            inner,
            server,
            dir,
        }
    }

    /// The realm URL, `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The signing certificate (PEM), for the registry's `rootcertbundle`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Changes the settings for the requests that follow.
    pub fn update(&self, change: impl FnOnce(&mut IssuerSettings)) {
        change(&mut self.inner.settings.lock().expect("settings lock"));
    }

    /// Every request answered so far, GET and POST, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.inner.requests.lock().expect("requests lock").clone()
    }

    /// The `GET /token` requests answered so far.
    pub fn get_requests(&self) -> Vec<TokenRequest> {
        self.requests_with("GET")
    }

    /// The `POST /token` requests answered so far.
    pub fn post_requests(&self) -> Vec<TokenRequest> {
        self.requests_with("POST")
    }

    fn requests_with(&self, method: &str) -> Vec<TokenRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method)
            .collect()
    }

    /// Every token handed out over HTTP so far (not those from [`Self::mint`]).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.issued.lock().expect("issued lock").clone()
    }

    /// Signs a token for `subject` with `access` (repository, actions)
    /// without an HTTP request (not recorded), e.g. to push test content.
    pub async fn mint(&self, subject: &str, access: &[(&str, &[&str])]) -> String {
        self.minter().mint(subject, access).await
    }

    /// A handle that signs tokens as this issuer, for a registry's push
    /// helpers.
    pub fn minter(&self) -> Minter {
        Minter {
            inner: self.inner.clone(),
            realm: self.realm(),
            cert: self.cert_path(),
        }
    }
}

/// Signs tokens as a [`TokenIssuer`] without HTTP requests (not recorded).
#[derive(Clone)]
pub struct Minter {
    inner: Arc<Inner>,
    realm: String,
    cert: PathBuf,
}

impl Minter {
    /// A token for `subject` with `access` (repository, actions), valid for
    /// ten minutes.
    pub async fn mint(&self, subject: &str, access: &[(&str, &[&str])]) -> String {
        let access = access
            .iter()
            .map(|(name, actions)| Access {
                name: name.to_string(),
                actions: actions.iter().map(|a| a.to_string()).collect(),
            })
            .collect();
        sign_token(&self.inner, subject, SERVICE, access, 600).await
    }

    /// The issuer's realm URL.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The issuer's signing certificate (PEM).
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One granted `access` entry of a JWT.
#[derive(Clone, Debug)]
struct Access {
    name: String,
    actions: Vec<String>,
}

/// Parses `repository:NAME:a,b` scopes (several per value, space separated)
/// and keeps the actions in `allowed`.
fn granted(scopes: &[&str], allowed: &[&str]) -> Vec<Access> {
    scopes
        .iter()
        .flat_map(|s| s.split(' '))
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            (kind == "repository").then(|| Access {
                name: name.to_string(),
                actions: actions
                    .split(',')
                    .filter(|a| allowed.contains(a))
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(BASE64.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

async fn token_get(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let settings = inner.settings.lock().expect("settings lock").clone();
    let basic = basic_credentials(&headers);
    let subject = match &basic {
        Some((user, password)) => settings
            .users
            .iter()
            .any(|(u, p)| u == user && p == password)
            .then(|| (user.clone(), &["pull", "push"][..])),
        None => settings
            .anonymous_pull
            .then(|| (String::new(), &["pull"][..])),
    };
    answer(&inner, "GET", params, &headers, basic, subject, &settings).await
}

async fn token_post(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let settings = inner.settings.lock().expect("settings lock").clone();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let subject = match param("grant_type").as_deref() {
        Some("refresh_token") => param("refresh_token").and_then(|token| {
            settings
                .refresh_tokens
                .iter()
                .find(|(t, _)| *t == token)
                .map(|(_, subject)| (subject.clone(), &["pull", "push"][..]))
        }),
        Some("password") => {
            let (user, password) = (param("username"), param("password"));
            settings
                .users
                .iter()
                .any(|(u, p)| Some(u) == user.as_ref() && Some(p) == password.as_ref())
                .then(|| (user.unwrap_or_default(), &["pull", "push"][..]))
        }
        _ => None,
    };
    let basic = basic_credentials(&headers);
    answer(&inner, "POST", params, &headers, basic, subject, &settings).await
}

/// Records the request and answers with a token for `subject` (or 401).
async fn answer(
    inner: &Arc<Inner>,
    method: &str,
    params: Vec<(String, String)>,
    headers: &HeaderMap,
    basic: Option<(String, String)>,
    subject: Option<(String, &[&str])>,
    settings: &IssuerSettings,
) -> Response {
    let mut record = TokenRequest {
        method: method.to_string(),
        params,
        basic_user: basic.map(|(user, _)| user),
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        status: 401,
    };
    let Some((subject, allowed)) = subject else {
        inner.requests.lock().expect("requests lock").push(record);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"test-issuer\"")],
            axum::Json(serde_json::json!({
                "errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]
            })),
        )
            .into_response();
    };
    let scopes = record.params_all("scope");
    let access = granted(&scopes, allowed);
    let audience = record.param("service").unwrap_or_default().to_string();
    let token = sign_token(inner, &subject, &audience, access, settings.expires_in).await;
    record.status = 200;
    inner.requests.lock().expect("requests lock").push(record);
    inner
        .issued
        .lock()
        .expect("issued lock")
        .push(token.clone());
    axum::Json(serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": settings
            .claimed_expires_in
            .clone()
            .unwrap_or_else(|| settings.expires_in.into()),
        "issued_at": rfc3339(unix_now() - settings.issued_ago),
    }))
    .into_response()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// An RS256 JWT with an `x5c` header, signed by `openssl dgst`.
async fn sign_token(
    inner: &Arc<Inner>,
    subject: &str,
    audience: &str,
    access: Vec<Access>,
    lifetime: u64,
) -> String {
    let now = unix_now();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [inner.cert_der]});
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": audience,
        "exp": now + lifetime,
        "nbf": now.saturating_sub(5),
        "iat": now,
        "jti": format!("jti-{now}-{}", inner.next_id.fetch_add(1, Ordering::Relaxed)),
        "access": access
            .iter()
            .map(|a| serde_json::json!({"type": "repository", "name": a.name, "actions": a.actions}))
            .collect::<Vec<_>>(),
    });
    let signing_input = format!(
        "{}.{}",
        BASE64URL.encode(serde_json::to_vec(&header).expect("header JSON")),
        BASE64URL.encode(serde_json::to_vec(&claims).expect("claims JSON"))
    );
    let (openssl, key) = (inner.openssl.clone(), inner.key.clone());
    let input = signing_input.clone();
    let signature =
        tokio::task::spawn_blocking(move || openssl_sign(&openssl, &key, input.as_bytes()))
            .await
            .expect("signing task");
    format!("{signing_input}.{}", BASE64URL.encode(signature))
}

/// `openssl dgst -sha256 -sign KEY` over `data`: an RSASSA-PKCS1-v1_5
/// SHA-256 signature, which is what RS256 is.
fn openssl_sign(openssl: &Path, key: &Path, data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new(openssl)
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl dgst");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(data)
        .expect("write the signing input to openssl");
    let out = child.wait_with_output().expect("run openssl dgst");
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "openssl dgst failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
