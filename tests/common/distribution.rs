//! A real CNCF Distribution registry (`docker-registry serve`) on 127.0.0.1:
//! anonymous, behind htpasswd basic auth, or behind `auth: token` trusting a
//! [`TokenIssuer`]. Its storage lives in a temp dir that outlives restarts
//! (so [`Distribution::restart_htpasswd`] keeps what was pushed); it is
//! killed on drop. The push helpers use the OCI push API with the
//! registry's own credentials and build test images (single platform,
//! multi-platform index, a big incompressible blob streamed without being
//! held in memory).
//!
//! ```ignore
//! let registry = Distribution::start();                       // anonymous
//! let registry = Distribution::start_htpasswd("alice", "pw"); // basic auth
//! let registry = Distribution::start_token(&issuer);          // token auth
//! let image = registry.push_image("team/app", "v1").await;
//! ```
//!
//! [`Process`] serves a storage root (such a registry's, once stopped) as a
//! plain registry or as a pull-through proxy of another, with its process
//! id and access log counts, for the benchmarks.

mod process;

#[allow(unused_imports, reason = "the benchmarks use these, the tests do not")]
pub use process::{Counts, Mode, Process};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::content::{
    Descriptor, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, XorShift, config_json, index_json,
    manifest_json, pseudo_random_bytes, seed_of, sha256_digest, sha256_finish,
};
use super::token_issuer::{ISSUER, Minter, SERVICE, TokenIssuer};

/// How long a registry may take to answer `GET /v2/` after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Spawn attempts: the port from `free_port()` can be taken before the
/// registry binds it, in which case it exits and we try another.
const START_ATTEMPTS: usize = 3;

/// How the registry authenticates its clients, and how the push helpers do.
enum Guard {
    Anonymous,
    Htpasswd { user: String, password: String },
    Token(Minter),
}

/// A running `docker-registry serve CONFIG` process on 127.0.0.1, killed on
/// drop.
pub struct Distribution {
    child: Option<Child>,
    /// Where the registry listens.
    pub addr: SocketAddr,
    guard: Guard,
    /// Bearer tokens minted for pushes, per repository.
    push_tokens: Mutex<HashMap<String, String>>,
    log: Arc<Mutex<String>>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Distribution {
    /// An anonymous registry, ready (`GET /v2/` answers).
    pub fn start() -> Distribution {
        Self::start_with(Guard::Anonymous)
    }

    /// A registry that requires HTTP basic auth (`auth: htpasswd`, bcrypt
    /// file made by `htpasswd -Bbn`). The push helpers send these
    /// credentials.
    pub fn start_htpasswd(user: &str, password: &str) -> Distribution {
        Self::start_with(Guard::Htpasswd {
            user: user.into(),
            password: password.into(),
        })
    }

    /// A registry that accepts only tokens from `issuer` (realm
    /// [`TokenIssuer::realm`], service [`SERVICE`], issuer [`ISSUER`]). The
    /// push helpers mint their own tokens (not recorded by the issuer).
    pub fn start_token(issuer: &TokenIssuer) -> Distribution {
        Self::start_with(Guard::Token(issuer.minter()))
    }

    fn start_with(guard: Guard) -> Distribution {
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let log = Arc::new(Mutex::new(String::new()));
        let auth = auth_section(dir.path(), &guard);
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let addr: SocketAddr = ([127, 0, 0, 1], super::free_port()).into();
            match spawn(dir.path(), addr, &auth, &log) {
                Ok(child) => {
                    return Distribution {
                        child: Some(child),
                        addr,
                        guard,
                        push_tokens: Mutex::default(),
                        log,
                        http: reqwest::Client::new(),
                        dir,
                    };
                }
                Err(why) => last = why,
            }
        }
        panic!("docker-registry did not become ready after {START_ATTEMPTS} attempts: {last}");
    }

    /// Stops the registry and starts it again on the same port and storage
    /// with htpasswd auth for `user`/`password` only.
    pub fn restart_htpasswd(&mut self, user: &str, password: &str) {
        self.stop();
        self.guard = Guard::Htpasswd {
            user: user.into(),
            password: password.into(),
        };
        let auth = auth_section(self.dir.path(), &self.guard);
        match spawn(self.dir.path(), self.addr, &auth, &self.log) {
            Ok(child) => self.child = Some(child),
            Err(why) => panic!("docker-registry did not restart on {}: {why}", self.addr),
        }
    }

    /// Kills the registry and waits for it to exit (for "upstream down"
    /// tests). Afterwards its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Base URL, `http://127.0.0.1:PORT`, for an upstream `url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, the key of a Docker config `auths` entry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Everything the registry process has printed so far.
    pub fn logs(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// The temp dir holding the registry's config and storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `Authorization` the push helpers send for `repo`, if any.
    async fn authorization(&self, repo: &str) -> Option<String> {
        match &self.guard {
            Guard::Anonymous => None,
            Guard::Htpasswd { user, password } => Some(format!(
                "Basic {}",
                BASE64.encode(format!("{user}:{password}"))
            )),
            Guard::Token(minter) => {
                let known = self
                    .push_tokens
                    .lock()
                    .expect("push tokens lock")
                    .get(repo)
                    .cloned();
                let token = match known {
                    Some(token) => token,
                    None => {
                        let token = minter.mint("seeder", &[(repo, &["pull", "push"])]).await;
                        self.push_tokens
                            .lock()
                            .expect("push tokens lock")
                            .insert(repo.to_string(), token.clone());
                        token
                    }
                };
                Some(format!("Bearer {token}"))
            }
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        url: &str,
        repo: &str,
    ) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match self.authorization(repo).await {
            Some(value) => req.header(reqwest::header::AUTHORIZATION, value),
            None => req,
        }
    }

    /// Opens an upload session and returns its absolute `Location` URL.
    async fn start_upload(&self, repo: &str) -> url::Url {
        let resp = self
            .request(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.url()),
                repo,
            )
            .await
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .expect("POST blob upload");
        let status = resp.status();
        assert_eq!(
            status,
            reqwest::StatusCode::ACCEPTED,
            "starting a blob upload to {repo}: {}",
            resp.text().await.unwrap_or_default()
        );
        location(&self.url(), &resp)
    }

    /// Pushes `data` as a blob of `repo` (monolithic upload) and returns its
    /// digest (`sha256:...`).
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let mut upload = self.start_upload(repo).await;
        upload.query_pairs_mut().append_pair("digest", &digest);
        let resp = self
            .request(reqwest::Method::PUT, upload.as_str(), repo)
            .await
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .expect("PUT blob");
        let status = resp.status();
        assert_eq!(
            status,
            reqwest::StatusCode::CREATED,
            "pushing blob {digest} to {repo}: {}",
            resp.text().await.unwrap_or_default()
        );
        digest
    }

    /// Streams a deterministic pseudo-random blob of `size` bytes (see
    /// [`pseudo_random_bytes`]) to `repo` without holding it in memory: one
    /// streamed PATCH hashed on the way, then the closing PUT with the digest.
    pub async fn push_big_blob(&self, repo: &str, seed: u64, size: u64) -> BigBlob {
        const CHUNK: usize = 1 << 20;
        let hasher = Arc::new(Mutex::new(Sha256::new()));
        let stream = {
            let hasher = hasher.clone();
            let mut rng = XorShift::new(seed);
            let mut left = size;
            futures::stream::poll_fn(move |_| {
                if left == 0 {
                    return std::task::Poll::Ready(None);
                }
                let n = left.min(CHUNK as u64) as usize;
                let mut chunk = vec![0u8; n];
                rng.fill(&mut chunk);
                hasher.lock().expect("hasher lock").update(&chunk);
                left -= n as u64;
                std::task::Poll::Ready(Some(Ok::<_, std::io::Error>(Bytes::from(chunk))))
            })
        };
        let upload = self.start_upload(repo).await;
        let resp = self
            .request(reqwest::Method::PATCH, upload.as_str(), repo)
            .await
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .expect("PATCH big blob");
        let status = resp.status();
        assert_eq!(
            status,
            reqwest::StatusCode::ACCEPTED,
            "streaming big blob to {repo}: {}",
            resp.text().await.unwrap_or_default()
        );
        let mut upload = location(&self.url(), &resp);
        let digest = sha256_finish(hasher.lock().expect("hasher lock").clone());
        upload.query_pairs_mut().append_pair("digest", &digest);
        let resp = self
            .request(reqwest::Method::PUT, upload.as_str(), repo)
            .await
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .expect("PUT closing big blob upload");
        let status = resp.status();
        assert_eq!(
            status,
            reqwest::StatusCode::CREATED,
            "closing big blob upload to {repo}: {}",
            resp.text().await.unwrap_or_default()
        );
        BigBlob { digest, size, seed }
    }

    /// Pushes a manifest under `reference` (a tag or its digest) with
    /// `media_type` as Content-Type. Returns what was pushed.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> Manifest {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        let resp = self
            .request(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.url()),
                repo,
            )
            .await
            .header(reqwest::header::CONTENT_TYPE, media_type)
            .body(bytes.clone())
            .send()
            .await
            .expect("PUT manifest");
        let status = resp.status();
        assert_eq!(
            status,
            reqwest::StatusCode::CREATED,
            "pushing manifest {repo}:{reference}: {}",
            resp.text().await.unwrap_or_default()
        );
        Manifest {
            digest,
            media_type: media_type.to_string(),
            bytes,
        }
    }

    /// Tags an already pushed manifest with one more tag.
    pub async fn tag(&self, repo: &str, tag: &str, manifest: &Manifest) {
        self.push_manifest(repo, tag, &manifest.media_type, manifest.bytes.clone())
            .await;
    }

    /// Pushes a single-platform OCI image (config + two small layers +
    /// manifest) for linux/amd64 under `repo:tag`. The content depends on
    /// `repo` and `tag`, so different images have different digests.
    pub async fn push_image(&self, repo: &str, tag: &str) -> Image {
        let seed = seed_of(&format!("{repo}:{tag}"));
        let image = self
            .push_platform_image(repo, seed, "linux", "amd64", None)
            .await;
        self.tag(repo, tag, &image.manifest).await;
        image
    }

    /// Pushes an image for one platform by digest only (no tag).
    async fn push_platform_image(
        &self,
        repo: &str,
        seed: u64,
        os: &str,
        architecture: &str,
        variant: Option<&str>,
    ) -> Image {
        let layers = vec![
            Bytes::from(pseudo_random_bytes(seed ^ 1, 1024 + (seed % 512) as usize)),
            Bytes::from(pseudo_random_bytes(seed ^ 2, 3000)),
        ];
        let mut layer_descriptors = Vec::new();
        for layer in &layers {
            self.push_blob(repo, layer).await;
            layer_descriptors.push(Descriptor::of(OCI_LAYER, layer));
        }
        let diff_ids: Vec<String> = layer_descriptors.iter().map(|l| l.digest.clone()).collect();
        let config = config_json(os, architecture, variant, &diff_ids, &seed.to_string());
        let config_digest = self.push_blob(repo, &config).await;
        let bytes = manifest_json(
            OCI_MANIFEST,
            &Descriptor::of(OCI_CONFIG, &config),
            &layer_descriptors,
        );
        let digest = sha256_digest(&bytes);
        let manifest = self.push_manifest(repo, &digest, OCI_MANIFEST, bytes).await;
        Image {
            manifest,
            config: Blob {
                digest: config_digest,
                data: config,
            },
            layers: layers
                .into_iter()
                .map(|data| Blob {
                    digest: sha256_digest(&data),
                    data,
                })
                .collect(),
        }
    }

    /// Pushes a two-platform OCI index under `repo:tag`: linux/amd64 and
    /// linux/arm64 variant v8, each its own manifest pushed by digest first.
    pub async fn push_index(&self, repo: &str, tag: &str) -> IndexImage {
        self.push_index_inner(repo, tag, Some("v8")).await
    }

    /// As [`Distribution::push_index`], but the arm64 entry names no variant
    /// (which counts as v8 when matching platforms).
    pub async fn push_index_without_arm64_variant(&self, repo: &str, tag: &str) -> IndexImage {
        self.push_index_inner(repo, tag, None).await
    }

    async fn push_index_inner(
        &self,
        repo: &str,
        tag: &str,
        arm64_variant: Option<&str>,
    ) -> IndexImage {
        let seed = seed_of(&format!("{repo}:{tag}:index"));
        let amd64 = self
            .push_platform_image(repo, seed, "linux", "amd64", None)
            .await;
        let arm64 = self
            .push_platform_image(repo, seed.wrapping_add(7), "linux", "arm64", arm64_variant)
            .await;
        let bytes = index_json(
            OCI_INDEX,
            &[
                Descriptor::of(OCI_MANIFEST, &amd64.manifest.bytes)
                    .platform("linux", "amd64", None),
                Descriptor::of(OCI_MANIFEST, &arm64.manifest.bytes).platform(
                    "linux",
                    "arm64",
                    arm64_variant,
                ),
            ],
        );
        let index = self.push_manifest(repo, tag, OCI_INDEX, bytes).await;
        IndexImage {
            index,
            amd64,
            arm64,
        }
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A manifest as pushed.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// `sha256:` digest of `bytes`.
    pub digest: String,
    /// The Content-Type it was pushed with.
    pub media_type: String,
    /// The exact bytes pushed.
    pub bytes: Bytes,
}

/// A blob as pushed.
#[derive(Clone, Debug)]
pub struct Blob {
    /// `sha256:` digest of `data`.
    pub digest: String,
    /// The blob's bytes.
    pub data: Bytes,
}

/// A single-platform image as pushed.
#[derive(Clone, Debug)]
pub struct Image {
    /// The image manifest.
    pub manifest: Manifest,
    /// The config blob.
    pub config: Blob,
    /// The layer blobs, in manifest order.
    pub layers: Vec<Blob>,
}

impl Image {
    /// Every blob of the image: the layers, then the config.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        self.layers.iter().chain([&self.config])
    }
}

/// A multi-platform index as pushed, with its two children.
#[derive(Clone, Debug)]
pub struct IndexImage {
    /// The OCI index (tagged).
    pub index: Manifest,
    /// The linux/amd64 child.
    pub amd64: Image,
    /// The linux/arm64 child (variant v8, or none).
    pub arm64: Image,
}

/// A big blob pushed by [`Distribution::push_big_blob`]; its bytes are
/// `pseudo_random_bytes(seed, size)`, regenerate them with [`XorShift`].
#[derive(Clone, Debug)]
pub struct BigBlob {
    /// `sha256:` digest of the content.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Generator seed.
    pub seed: u64,
}

/// The absolute URL of a response's `Location` header (Distribution may send
/// it relative).
fn location(base: &str, resp: &reqwest::Response) -> url::Url {
    let loc = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .expect("upload response has a Location")
        .to_str()
        .expect("Location is ASCII");
    url::Url::parse(base)
        .and_then(|b| b.join(loc))
        .expect("Location is a URL")
}

/// Writes a bcrypt htpasswd file `DIR/htpasswd` with `htpasswd -Bbn USER
/// PASSWORD`.
pub fn write_htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    let bin = super::require_binary(
        "htpasswd",
        &["/usr/bin/htpasswd"],
        "apt-get install -y apache2-utils",
    );
    let out = Command::new(bin)
        .args(["-Bbn", user, password])
        .output()
        .expect("run htpasswd");
    assert!(
        out.status.success(),
        "htpasswd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("htpasswd");
    std::fs::write(&path, &out.stdout).expect("write htpasswd file");
    path
}

/// The `auth:` section of the registry config for `guard` (writing the
/// htpasswd file into `dir` when needed).
fn auth_section(dir: &Path, guard: &Guard) -> String {
    match guard {
        Guard::Anonymous => String::new(),
        Guard::Htpasswd { user, password } => {
            let path = write_htpasswd(dir, user, password);
            format!(
                "auth:\n  htpasswd:\n    realm: test-registry\n    path: {}\n",
                path.display()
            )
        }
        Guard::Token(minter) => format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            minter.realm(),
            minter.cert_path().display()
        ),
    }
}

/// Writes `DIR/config.yml` (filesystem storage in `DIR/data`, loopback
/// listener on `addr`, quiet logs, `auth`) and runs `docker-registry serve`
/// until `GET /v2/` answers (200, or 401 with auth).
fn spawn(
    dir: &Path,
    addr: SocketAddr,
    auth: &str,
    log: &Arc<Mutex<String>>,
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
    super::capture_output(&mut child, log);
    match wait_ready(&mut child, addr) {
        Ok(()) => Ok(child),
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{why}; log:\n{}", log.lock().expect("log lock")))
        }
    }
}

/// Polls `GET /v2/` of the `docker-registry` process `child` until it
/// answers 200 or 401 (auth enabled), the process exits, or
/// [`READY_TIMEOUT`] passes.
pub fn wait_ready(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("docker-registry exited early with {status}"));
        }
        if let Some(code) = probe(addr) {
            if code == 200 || code == 401 {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "no answer on http://{addr}/v2/ within {READY_TIMEOUT:?}"
    ))
}

/// One raw HTTP/1.1 `GET /v2/`; the status code if something answered.
fn probe(addr: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut status_line = String::new();
    BufReader::new(stream).read_line(&mut status_line).ok()?;
    status_line.split_whitespace().nth(1)?.parse().ok()
}
