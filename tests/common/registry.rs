//! A real CNCF Distribution registry (`docker-registry`) on 127.0.0.1 for
//! integration tests, optionally behind htpasswd basic auth, with helpers
//! that push content over the OCI push API and build test images (single
//! platform, multi-platform index, a big incompressible blob).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How long a registry may take to answer `GET /v2/` after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Spawn attempts: the port from `free_port()` can be taken before the
/// registry binds it, in which case it exits and we try another.
const START_ATTEMPTS: usize = 3;

/// A running `docker-registry serve CONFIG` process on 127.0.0.1, killed on
/// drop. Its storage, config and htpasswd file live in a temp dir.
pub struct Registry {
    child: Option<Child>,
    /// Where the registry listens.
    pub addr: SocketAddr,
    credentials: Option<(String, String)>,
    log: Arc<Mutex<String>>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an anonymous registry and waits until `GET /v2/` answers.
    pub fn start() -> Registry {
        Self::start_inner(None)
    }

    /// Starts a registry that requires HTTP basic auth (`auth: htpasswd`,
    /// bcrypt file made by `htpasswd -Bbn`). The push helpers of the returned
    /// handle send these credentials.
    pub fn start_with_basic_auth(username: &str, password: &str) -> Registry {
        Self::start_inner(Some((username.to_string(), password.to_string())))
    }

    fn start_inner(credentials: Option<(String, String)>) -> Registry {
        let bin = super::require_binary(
            "docker-registry",
            &["/usr/bin/docker-registry"],
            "apt-get install -y docker-registry",
        );
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let htpasswd = credentials
            .as_ref()
            .map(|(user, password)| write_htpasswd(dir.path(), user, password));
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = super::free_port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                distribution_config(&dir.path().join("data"), addr, htpasswd.as_deref()),
            )
            .expect("write registry config");
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn docker-registry");
            let log = Arc::new(Mutex::new(String::new()));
            capture_output(&mut child, &log);
            match wait_ready(&mut child, addr) {
                Ok(()) => {
                    return Registry {
                        child: Some(child),
                        addr,
                        credentials,
                        log,
                        http: reqwest::Client::new(),
                        dir,
                    };
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = format!("{why}; log:\n{}", log.lock().expect("log lock"));
                }
            }
        }
        panic!("docker-registry did not become ready after {START_ATTEMPTS} attempts: {last_log}");
    }

    /// Base URL, `http://127.0.0.1:PORT`, for an upstream `url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the registry process has printed so far.
    pub fn logs(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// The temp dir holding the registry's config and storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the registry and waits for it to exit (for "upstream down"
    /// tests). Afterwards its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.credentials {
            Some((user, password)) => req.basic_auth(user, Some(password)),
            None => req,
        }
    }

    /// Opens an upload session and returns its absolute `Location` URL.
    async fn start_upload(&self, repo: &str) -> url::Url {
        let resp = self
            .request(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.url()),
            )
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
            .request(reqwest::Method::PUT, upload.as_str())
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
            .request(reqwest::Method::PATCH, upload.as_str())
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
        let digest = format!(
            "sha256:{}",
            hex::encode(hasher.lock().expect("hasher lock").clone().finalize())
        );
        upload.query_pairs_mut().append_pair("digest", &digest);
        let resp = self
            .request(reqwest::Method::PUT, upload.as_str())
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
            )
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
        let mut diff_ids = Vec::new();
        for layer in &layers {
            let digest = self.push_blob(repo, layer).await;
            diff_ids.push(digest.clone());
            layer_descriptors.push(serde_json::json!({
                "mediaType": OCI_LAYER,
                "digest": digest,
                "size": layer.len(),
            }));
        }
        let mut config = serde_json::json!({
            "architecture": architecture,
            "os": os,
            "config": { "Labels": { "test.seed": seed.to_string() } },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        if let Some(variant) = variant {
            config["variant"] = variant.into();
        }
        let config = Bytes::from(serde_json::to_vec(&config).expect("config json"));
        let config_digest = self.push_blob(repo, &config).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layer_descriptors,
        });
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest json");
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

    /// As [`Registry::push_index`], but the arm64 entry names no variant (which
    /// counts as v8 when matching platforms).
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
        let mut arm64_platform = serde_json::json!({ "architecture": "arm64", "os": "linux" });
        if let Some(variant) = arm64_variant {
            arm64_platform["variant"] = variant.into();
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": amd64.manifest.digest,
                    "size": amd64.manifest.bytes.len(),
                    "platform": { "architecture": "amd64", "os": "linux" },
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": arm64.manifest.digest,
                    "size": arm64.manifest.bytes.len(),
                    "platform": arm64_platform,
                },
            ],
        });
        let bytes = serde_json::to_vec_pretty(&index).expect("index json");
        let index = self.push_manifest(repo, tag, OCI_INDEX, bytes).await;
        IndexImage {
            index,
            amd64,
            arm64,
        }
    }
}

impl Drop for Registry {
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

/// A big blob pushed by [`Registry::push_big_blob`]; its bytes are
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

/// One `[[upstreams]]` block of a service config: `name`, `url`, then `extra`
/// lines verbatim (e.g. `priority = 20`, `exclude = ["secret/**"]`).
pub fn upstream_toml(name: &str, url: &str, extra: &str) -> String {
    format!("[[upstreams]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n")
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Deterministic incompressible bytes (xorshift64*), `len` of them.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    XorShift::new(seed).fill(&mut out);
    out
}

/// A tiny deterministic generator (xorshift64*): fast, reproducible, and its
/// output does not compress.
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value; zero is remapped).
    pub fn new(seed: u64) -> XorShift {
        XorShift((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `buf`; consecutive calls continue the same sequence as long as
    /// every buffer but the last has a length divisible by 8.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let word = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&word[..rest.len()]);
        }
    }
}

/// A stable seed from a string (FNV-1a).
fn seed_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
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

/// Writes a bcrypt htpasswd file with `htpasswd -Bbn USER PASSWORD`.
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

/// The Distribution 2.8 config: filesystem storage, loopback listener, quiet
/// logs, optional htpasswd auth.
fn distribution_config(root: &Path, addr: SocketAddr, htpasswd: Option<&Path>) -> String {
    let mut config = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {root}\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: integration-test-secret\n",
        root = root.display(),
    );
    if let Some(path) = htpasswd {
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: test-registry\n    path: {}\n",
            path.display()
        ));
    }
    config
}

/// Appends a child's stdout and stderr, line by line, to `log`.
pub fn capture_output(child: &mut Child, log: &Arc<Mutex<String>>) {
    let streams: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("piped stdout")),
        Box::new(child.stderr.take().expect("piped stderr")),
    ];
    for stream in streams {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let mut log = log.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
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
