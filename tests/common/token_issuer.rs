//! A Docker token issuer for integration tests, and a real Distribution
//! registry that trusts it: [`TokenIssuer`] is an in-process axum server on
//! `127.0.0.1:0` answering `GET /token` (Docker token spec, anonymous or with
//! Basic credentials) and `POST /token` (OAuth2 form: `refresh_token` and
//! `password` grants) with RS256 JWTs that Distribution 2.8 accepts (signed by
//! the `openssl` CLI with a throw-away self-signed key, `x5c` header). It
//! records every request it answers so tests can count them.
//! [`AuthRegistry`] runs `docker-registry serve` with `auth: token` for such
//! an issuer, or with `auth: htpasswd`, on storage that survives a restart on
//! the same port, and pushes small test images with its own credentials.
//!
//! ```ignore
//! let issuer = TokenIssuer::start(IssuerSettings::default().user("alice", "pw")).await;
//! let registry = AuthRegistry::start_token(&issuer).await;
//! let image = registry.push_image("team/app", "v1").await;
//! // ... point the service at registry.url() and fetch ...
//! assert_eq!(issuer.get_requests().len(), 1);
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL};
use sha2::{Digest as _, Sha256};

/// The `service` (JWT audience) the registry is configured with.
pub const SERVICE: &str = "test-registry";
/// The issuer name (`iss`) the registry trusts.
pub const ISSUER: &str = "test-issuer";

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How long a spawned registry may take to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

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
        let access = access
            .iter()
            .map(|(name, actions)| Access {
                name: name.to_string(),
                actions: actions.iter().map(|a| a.to_string()).collect(),
            })
            .collect();
        sign_token(&self.inner, subject, SERVICE, access, 600).await
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
        "expires_in": settings.expires_in,
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

/// How an [`AuthRegistry`] authenticates, and how its push helpers do.
enum Guard {
    Token(Arc<Inner>),
    Htpasswd { user: String, password: String },
}

/// A `docker-registry serve` process with `auth: token` or `auth: htpasswd`,
/// killed on drop. Storage and config live in a temp dir that outlives
/// restarts, so content pushed once survives [`AuthRegistry::restart_htpasswd`].
pub struct AuthRegistry {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    guard: Guard,
    log: Arc<Mutex<String>>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl AuthRegistry {
    /// A registry that accepts only tokens from `issuer` (realm
    /// [`TokenIssuer::realm`], service [`SERVICE`], issuer [`ISSUER`]).
    pub async fn start_token(issuer: &TokenIssuer) -> AuthRegistry {
        let auth = format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            issuer.realm(),
            issuer.cert_path().display()
        );
        Self::start(Guard::Token(issuer.inner.clone()), auth).await
    }

    /// A registry behind htpasswd basic auth (bcrypt, `htpasswd -Bbn`).
    pub async fn start_htpasswd(user: &str, password: &str) -> AuthRegistry {
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let auth = htpasswd_auth(dir.path(), user, password);
        let guard = Guard::Htpasswd {
            user: user.into(),
            password: password.into(),
        };
        Self::start_in(dir, guard, auth).await
    }

    async fn start(guard: Guard, auth: String) -> AuthRegistry {
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        Self::start_in(dir, guard, auth).await
    }

    async fn start_in(dir: tempfile::TempDir, guard: Guard, auth: String) -> AuthRegistry {
        let log = Arc::new(Mutex::new(String::new()));
        let http = reqwest::Client::new();
        let mut last = String::new();
        // The port from free_port() can be taken before the registry binds it.
        for _ in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], super::free_port()).into();
            match spawn_registry(dir.path(), addr, &auth, &log, &http).await {
                Ok(child) => {
                    return AuthRegistry {
                        child: Some(child),
                        addr,
                        guard,
                        log,
                        http,
                        dir,
                    };
                }
                Err(why) => last = why,
            }
        }
        panic!("docker-registry did not start: {last}");
    }

    /// Stops the registry and starts it again on the same port and storage
    /// with htpasswd auth for `user`/`password` only.
    pub async fn restart_htpasswd(&mut self, user: &str, password: &str) {
        self.stop();
        let auth = htpasswd_auth(self.dir.path(), user, password);
        self.guard = Guard::Htpasswd {
            user: user.into(),
            password: password.into(),
        };
        match spawn_registry(self.dir.path(), self.addr, &auth, &self.log, &self.http).await {
            Ok(child) => self.child = Some(child),
            Err(why) => panic!("docker-registry did not restart on {}: {why}", self.addr),
        }
    }

    /// Kills the registry (its port then refuses connections).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, the key of a Docker config `auths` entry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// What the registry printed so far.
    pub fn logs(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    async fn authorization(&self, repo: &str) -> String {
        match &self.guard {
            Guard::Token(inner) => {
                let token = sign_token(
                    inner,
                    "seeder",
                    SERVICE,
                    vec![Access {
                        name: repo.into(),
                        actions: vec!["pull".into(), "push".into()],
                    }],
                    600,
                )
                .await;
                format!("Bearer {token}")
            }
            Guard::Htpasswd { user, password } => {
                format!("Basic {}", BASE64.encode(format!("{user}:{password}")))
            }
        }
    }

    /// Pushes `data` as a blob of `repo` (monolithic upload).
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let auth = self.authorization(repo).await;
        let digest = sha256_digest(data);
        let resp = self
            .http
            .post(format!("{}/v2/{repo}/blobs/uploads/", self.url()))
            .header(header::AUTHORIZATION, &auth)
            .header(header::CONTENT_LENGTH, "0")
            .send()
            .await
            .expect("POST blob upload");
        assert_eq!(
            resp.status(),
            reqwest::StatusCode::ACCEPTED,
            "start blob upload"
        );
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .expect("upload Location");
        let mut upload = url::Url::parse(&self.url())
            .and_then(|base| base.join(location))
            .expect("upload Location is a URL");
        upload.query_pairs_mut().append_pair("digest", &digest);
        let resp = self
            .http
            .put(upload)
            .header(header::AUTHORIZATION, &auth)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .expect("PUT blob");
        assert_eq!(resp.status(), reqwest::StatusCode::CREATED, "push blob");
        digest
    }

    /// Pushes a small OCI image (config + one layer, content derived from
    /// `repo:tag`) and tags it `tag`.
    pub async fn push_image(&self, repo: &str, tag: &str) -> PushedImage {
        let seed = Sha256::digest(format!("{repo}:{tag}").as_bytes());
        let layer: Vec<u8> = (0..2048)
            .map(|i| seed[i % 32] ^ (i as u8).wrapping_mul(31))
            .collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"test.image": format!("{repo}:{tag}")}},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&layer)]},
        }))
        .expect("config JSON");
        let layer_digest = self.push_blob(repo, &layer).await;
        let config_digest = self.push_blob(repo, &config).await;
        let manifest = serde_json::to_vec_pretty(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": layer.len()}],
        }))
        .expect("manifest JSON");
        let resp = self
            .http
            .put(format!("{}/v2/{repo}/manifests/{tag}", self.url()))
            .header(header::AUTHORIZATION, self.authorization(repo).await)
            .header(header::CONTENT_TYPE, OCI_MANIFEST)
            .body(manifest.clone())
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(resp.status(), reqwest::StatusCode::CREATED, "push manifest");
        PushedImage {
            digest: sha256_digest(&manifest),
            manifest: Bytes::from(manifest),
            config: (config_digest, Bytes::from(config)),
            layer: (layer_digest, Bytes::from(layer)),
        }
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An image pushed by [`AuthRegistry::push_image`].
#[derive(Clone, Debug)]
pub struct PushedImage {
    /// The manifest bytes as pushed.
    pub manifest: Bytes,
    /// The manifest's digest.
    pub digest: String,
    /// The config blob: digest and bytes.
    pub config: (String, Bytes),
    /// The one layer blob: digest and bytes.
    pub layer: (String, Bytes),
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes `DIR/config.yml` for `auth` and runs `docker-registry serve` on
/// `addr` with storage in `DIR/data` until `GET /v2/` answers (200 or 401).
async fn spawn_registry(
    dir: &Path,
    addr: SocketAddr,
    auth: &str,
    log: &Arc<Mutex<String>>,
    http: &reqwest::Client,
) -> Result<Child, String> {
    let bin = super::require_binary(
        "docker-registry",
        &["/usr/bin/docker-registry"],
        "apt-get install -y docker-registry",
    );
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: integration-test-secret\n{auth}",
            root = dir.join("data").display(),
        ),
    )
    .expect("write registry config");
    let mut child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn docker-registry");
    super::registry::capture_output(&mut child, log);
    let deadline = Instant::now() + READY_TIMEOUT;
    let why = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break format!("docker-registry exited with {status}");
        }
        if Instant::now() > deadline {
            break format!("no answer on http://{addr}/v2/ within {READY_TIMEOUT:?}");
        }
        let probe = http
            .get(format!("http://{addr}/v2/"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if probe.is_ok_and(|resp| matches!(resp.status().as_u16(), 200 | 401)) {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("{why}; log:\n{}", log.lock().expect("log lock")))
}

/// Writes `DIR/htpasswd` (bcrypt, via `htpasswd -Bbn`) and returns the
/// registry's `auth:` section for it.
fn htpasswd_auth(dir: &Path, user: &str, password: &str) -> String {
    let path = super::registry::write_htpasswd(dir, user, password);
    format!(
        "auth:\n  htpasswd:\n    realm: test-registry\n    path: {}\n",
        path.display()
    )
}
