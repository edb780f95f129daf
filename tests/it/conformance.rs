//! Pull conformance of the OCI HTTP mirror (`mirror_listen`) against the OCI
//! distribution spec: one test per requirement of the pull workflow, tag
//! listing and the error codes the pull side can produce, each naming the
//! section (and endpoint id, or the RFC the spec defers to) it checks.
//!
//! The spec's own Go conformance suite cannot be built here; this suite
//! stands in for its pull-category checks (the same requests: its `Accept`
//! lines, its range cases on a 2048-byte blob, its empty blobs, its
//! `last`-only tag listing, its missing and malformed digests). Where CNCF
//! Distribution (2.8) is a fair reference, the same request goes to it too
//! and the mirror must agree; where Distribution departs from the spec (tag
//! order, `n`, `last`, a few range edge cases), the test follows the spec
//! and says so.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::InProcess;
use common::config::{ServiceConfig, Upstream};
use common::content::{
    DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LIST, DOCKER_MANIFEST, Descriptor, OCI_INDEX, OCI_MANIFEST,
    index_json, manifest_json, pseudo_random_bytes, sha256_digest,
};
use common::distribution::{Distribution, Image};
use common::fake::{FakeRegistry, Reply};

/// The repository every setup pushes its image to (tag `v1`).
const REPO: &str = "team/app";

/// The `code` values of the spec's "Error Codes" table (code-1 to code-14).
const SPEC_CODES: [&str; 14] = [
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

/// One `Accept` line per manifest type, as the conformance suite (index,
/// image) and skopeo (Docker types too) send them.
const ACCEPT: [(&str, &str); 4] = [
    ("accept", OCI_INDEX),
    ("accept", OCI_MANIFEST),
    ("accept", DOCKER_MANIFEST),
    ("accept", DOCKER_LIST),
];

/// The conformance suite's range blob size.
const RANGE_BLOB: usize = 2048;

/// A real registry holding an image, and the service mirroring it.
struct Setup {
    registry: Distribution,
    service: InProcess,
    image: Image,
    http: reqwest::Client,
}

impl Setup {
    async fn start() -> Setup {
        Self::start_with("").await
    }

    /// With `extra` appended to the service config (e.g. `[[callers]]`).
    async fn start_with(extra: &str) -> Setup {
        let registry = Distribution::start();
        let image = registry.push_image(REPO, "v1").await;
        let service = mirror_of(Upstream::new("reg", &registry.url()), extra).await;
        Setup {
            registry,
            service,
            image,
            http: http_client(),
        }
    }

    fn mirror(&self) -> SocketAddr {
        self.service.mirror_addr.expect("the mirror is on")
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send(Method::GET, path, headers).await
    }

    /// `method path` to the mirror.
    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
        let url = format!("http://{}{path}", self.mirror());
        mirror_request(&self.http, method, &url, headers).await
    }

    /// `method path` to the registry itself.
    async fn direct(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
        let url = format!("{}{path}", self.registry.url());
        request(&self.http, method, &url, headers).await
    }

    /// The same request to the mirror and to the registry.
    async fn both(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> (Answer, Answer) {
        (
            self.send(method.clone(), path, headers).await,
            self.direct(method, path, headers).await,
        )
    }

    /// Pushes more tags of the image's manifest.
    async fn tag(&self, tags: &[&str]) {
        for tag in tags {
            self.registry.tag(REPO, tag, &self.image.manifest).await;
        }
    }

    /// Pushes `data` to [`REPO`]; its blob path.
    async fn blob(&self, data: &[u8]) -> String {
        let digest = self.registry.push_blob(REPO, data).await;
        format!("/v2/{REPO}/blobs/{digest}")
    }
}

/// The service with the mirror on, upstream `upstream`, `extra` config
/// appended.
async fn mirror_of(upstream: Upstream, extra: &str) -> InProcess {
    let toml = format!(
        "{}\n{extra}",
        ServiceConfig::with(upstream)
            .top("mirror_listen = \"127.0.0.1:0\"")
            .toml()
    );
    InProcess::start(&toml).await
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// A request to the mirror, whose bodies always arrive whole.
async fn mirror_request(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let answer = request(http, method, url, headers).await;
    if let Some(e) = &answer.cut {
        panic!("{}: the body was cut: {e}", answer.what);
    }
    answer
}

async fn request(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = http.request(method.clone(), url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let what = format!("{method} {url} {headers:?}");
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = response.status();
    let headers = response.headers().clone();
    let (body, cut) = match response.bytes().await {
        Ok(body) => (body, None),
        Err(e) => (Bytes::new(), Some(e.to_string())),
    };
    Answer {
        what,
        status,
        headers,
        body,
        cut,
    }
}

/// A whole response.
struct Answer {
    /// The request, for messages.
    what: String,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// Why the body could not be read whole (Distribution's 416 announces
    /// the blob's `Content-Length` and sends a short text).
    cut: Option<String>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Header `name`, which must be there.
    fn must(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("{}: no {name} header in {:?}", self.what, self.headers))
    }

    fn expect_status(&self, status: StatusCode) -> &Self {
        assert_eq!(self.status, status, "{}: {}", self.what, self.text());
        self
    }

    /// The start of the body, for messages (blobs are not text).
    fn text(&self) -> String {
        let start = &self.body[..self.body.len().min(300)];
        match std::str::from_utf8(start) {
            Ok(text) => text.to_owned(),
            Err(_) => format!("<{} bytes>", self.body.len()),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", self.what, self.text()))
    }

    /// The code of an error answer, after checking its envelope ("Error
    /// Codes": `{"errors":[{"code","message","detail"}]}`, `code` only
    /// uppercase letters and underscores, `message` a string if present).
    fn error_code(&self) -> String {
        let content_type = self.must("content-type");
        assert!(
            content_type.starts_with("application/json"),
            "{}: an error body in JSON, got {content_type}",
            self.what
        );
        let body = self.json();
        let errors = body["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no `errors` array: {body}", self.what));
        assert!(!errors.is_empty(), "{}: empty `errors`: {body}", self.what);
        for error in errors {
            let code = error["code"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no `code`: {body}", self.what));
            assert!(
                !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{}: code {code:?} is not uppercase letters and underscores",
                self.what
            );
            assert!(
                error
                    .get("message")
                    .is_none_or(serde_json::Value::is_string),
                "{}: `message` is not a string: {body}",
                self.what
            );
        }
        errors[0]["code"].as_str().unwrap_or_default().to_owned()
    }

    /// Asserts an error answer: `status` and `code` in the envelope.
    fn expect_error(&self, status: StatusCode, code: &str) {
        self.expect_status(status);
        assert_eq!(self.error_code(), code, "{}", self.what);
    }

    /// The `Link` header's target when its relation is `next` (RFC 5988
    /// §5: `Link: <URI-Reference>; rel="next"`).
    fn next_link(&self) -> Option<String> {
        let link = self.header("link")?;
        let (target, params) = link
            .trim()
            .strip_prefix('<')
            .and_then(|rest| rest.split_once('>'))
            .unwrap_or_else(|| panic!("{}: Link {link:?} is not <URI>; params", self.what));
        let rel = params
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("rel"))
            .map(|(_, value)| value.trim().trim_matches('"'));
        assert_eq!(rel, Some("next"), "{}: Link {link:?}", self.what);
        Some(target.to_owned())
    }
}

/// A `HEAD` written by hand on a fresh connection (`Connection: close`): the
/// status, the header block as text, and every byte that followed it, which
/// must be none (RFC 9110 §9.3.2: "the server MUST NOT send content in the
/// response"). A client library would swallow such bytes.
async fn raw_head(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the mirror");
    let mut request = format!("HEAD {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write HEAD");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out))
        .await
        .expect("the mirror ends the connection after its answer")
        .expect("read the answer");
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("HEAD {path}: no header block in {out:?}"))
        + 4;
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("HEAD {path}: no status in {head}"));
    (status, head, out[end..].to_vec())
}

/// Header `name` of a raw header block (case-insensitive).
fn raw_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Asserts a hand-written HEAD of `path` answers `status` with no body.
async fn expect_bodiless_head(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    status: u16,
) -> String {
    let (got, head, rest) = raw_head(addr, path, headers).await;
    assert_eq!(got, status, "HEAD {path}: {head}");
    assert!(
        rest.is_empty(),
        "HEAD {path} sent {} bytes of body: {:?}",
        rest.len(),
        String::from_utf8_lossy(&rest)
    );
    head
}

/// A config with one caller, `a`, whose token is `secret-a` and who may read
/// `team/**` only. The temp dir holds the token file.
fn one_caller() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "secret-a\n").expect("write token file");
    let callers = format!(
        "[[callers]]\nname = \"a\"\ntoken_file = \"{}\"\nrepositories = [\"team/**\"]\n",
        token.display()
    );
    (dir, callers)
}

/// The `mediaType` field of a manifest.
fn media_type_field(bytes: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(bytes).expect("manifest JSON");
    value["mediaType"].as_str().unwrap_or_default().to_owned()
}

fn tags_of(answer: &Answer) -> Vec<String> {
    let body = answer.json();
    body["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `tags` array: {body}", answer.what))
        .iter()
        .map(|t| t.as_str().expect("tags are strings").to_owned())
        .collect()
}

/// The tags of a 200 answer to `GET /v2/REPO/tags/list?QUERY`.
async fn list_tags(s: &Setup, query: &str) -> Vec<String> {
    let answer = s.get(&format!("/v2/{REPO}/tags/list?{query}"), &[]).await;
    answer.expect_status(StatusCode::OK);
    tags_of(&answer)
}

fn sorted(tags: &[&str]) -> Vec<String> {
    let mut tags: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
    tags.sort();
    tags
}

// ---------------------------------------------------------------------------
// Determining support

/// "Determining Support", end-1 (`GET /v2/`): 200 means the registry
/// implements the spec. Also the optional `Docker-Distribution-API-Version`
/// header ("Legacy Docker support HTTP headers"), sent as Distribution does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_endpoint_answers_200() {
    let s = Setup::start().await;
    let (mirror, registry) = s.both(Method::GET, "/v2/", &[]).await;
    mirror.expect_status(StatusCode::OK);
    registry.expect_status(StatusCode::OK);
    assert_eq!(
        mirror.must("docker-distribution-api-version"),
        registry.must("docker-distribution-api-version")
    );
}

// ---------------------------------------------------------------------------
// Pulling manifests

/// "Pulling manifests", end-3 (`GET /v2/<name>/manifests/<tag-or-digest>`):
/// 200 with the manifest's exact bytes, by tag and by digest; `Content-Type`
/// the manifest's `mediaType` without parameters; `Docker-Content-Digest`
/// the digest of the body (and of the requested digest); `Content-Length`
/// its size. For an OCI image manifest, an OCI index and a Docker schema 2
/// manifest, each agreeing with the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_get_returns_the_pushed_bytes_and_headers() {
    let s = Setup::start().await;
    let index = s.registry.push_index(REPO, "multi").await;
    let docker = {
        let layers: Vec<Descriptor> = s
            .image
            .layers
            .iter()
            .map(|l| Descriptor::of(DOCKER_LAYER, &l.data))
            .collect();
        let bytes = manifest_json(
            DOCKER_MANIFEST,
            &Descriptor::of(DOCKER_CONFIG, &s.image.config.data),
            &layers,
        );
        s.registry
            .push_manifest(REPO, "docker", DOCKER_MANIFEST, bytes)
            .await
    };
    for (tag, manifest) in [
        ("v1", &s.image.manifest),
        ("multi", &index.index),
        ("docker", &docker),
    ] {
        for reference in [tag, manifest.digest.as_str()] {
            let path = format!("/v2/{REPO}/manifests/{reference}");
            let (mirror, registry) = s.both(Method::GET, &path, &ACCEPT).await;
            mirror.expect_status(StatusCode::OK);
            assert!(
                mirror.body == manifest.bytes,
                "{}: other bytes",
                mirror.what
            );
            let content_type = mirror.must("content-type");
            assert_eq!(content_type, manifest.media_type, "{}", mirror.what);
            assert_eq!(content_type, media_type_field(&mirror.body));
            assert!(!content_type.contains(';'), "no parameters: {content_type}");
            assert_eq!(mirror.must("docker-content-digest"), manifest.digest);
            assert_eq!(sha256_digest(&mirror.body), manifest.digest);
            assert_eq!(
                mirror.must("content-length"),
                manifest.bytes.len().to_string()
            );
            registry.expect_status(StatusCode::OK);
            assert!(registry.body == mirror.body, "{path}: the registry's bytes");
            for header in ["content-type", "docker-content-digest", "content-length"] {
                assert_eq!(mirror.header(header), registry.header(header), "{path}");
            }
        }
    }
}

/// "Checking if content exists in the registry", end-3 (`HEAD
/// /v2/<name>/manifests/<tag-or-digest>`): 200 with `Docker-Content-Digest`
/// and `Content-Length` of the manifest (and its `Content-Type`, as the
/// conformance suite checks), no body; by tag and by digest, agreeing with
/// the registry and with GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_head_has_digest_and_size_and_no_body() {
    let s = Setup::start().await;
    let manifest = &s.image.manifest;
    for reference in ["v1", manifest.digest.as_str()] {
        let path = format!("/v2/{REPO}/manifests/{reference}");
        let (mirror, registry) = s.both(Method::HEAD, &path, &ACCEPT).await;
        mirror.expect_status(StatusCode::OK);
        registry.expect_status(StatusCode::OK);
        assert_eq!(mirror.must("docker-content-digest"), manifest.digest);
        assert_eq!(
            mirror.must("content-length"),
            manifest.bytes.len().to_string()
        );
        assert_eq!(mirror.must("content-type"), manifest.media_type);
        for header in ["content-type", "docker-content-digest", "content-length"] {
            assert_eq!(mirror.header(header), registry.header(header), "{path}");
        }
        let head = expect_bodiless_head(s.mirror(), &path, &ACCEPT, 200).await;
        assert_eq!(
            raw_header(&head, "content-length"),
            Some(manifest.bytes.len().to_string().as_str()),
            "{head}"
        );
    }
}

/// "Pulling manifests", end-3, and "Error Codes" code-7: a manifest that is
/// not in the repository, by digest (a random one, as the conformance
/// suite's `missing-manifest/by-digest`) and by tag, is 404
/// `MANIFEST_UNKNOWN` on GET, as on the registry, and 404 without a body on
/// HEAD ("Checking if content exists in the registry").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_manifest_is_404_manifest_unknown() {
    let s = Setup::start().await;
    let digest = sha256_digest(&pseudo_random_bytes(11, 1024));
    for reference in [digest.as_str(), "missing-q3k9z"] {
        let path = format!("/v2/{REPO}/manifests/{reference}");
        let (mirror, registry) = s.both(Method::GET, &path, &ACCEPT).await;
        mirror.expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        registry.expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        expect_bodiless_head(s.mirror(), &path, &ACCEPT, 404).await;
    }
}

/// "Pulling manifests" (`<tag-or-digest>` as a tag: at most 128 characters
/// of `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`), end-3: a 128-character tag and
/// one using every allowed punctuation pull like any other; a reference in
/// no valid format (129 characters, a leading `.` or `-`) is end-3's 404,
/// never a manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_follow_the_spec_grammar() {
    let s = Setup::start().await;
    let long = format!("T{}", "x".repeat(127));
    s.tag(&[&long, "_a.B-9"]).await;
    for tag in [long.as_str(), "_a.B-9"] {
        let path = format!("/v2/{REPO}/manifests/{tag}");
        let mirror = s.get(&path, &ACCEPT).await;
        mirror.expect_status(StatusCode::OK);
        assert_eq!(
            mirror.must("docker-content-digest"),
            s.image.manifest.digest
        );
    }
    for tag in [format!("T{}", "x".repeat(128)), ".v1".into(), "-v1".into()] {
        let path = format!("/v2/{REPO}/manifests/{tag}");
        s.get(&path, &ACCEPT)
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    }
}

/// "Pulling manifests" (`<name>` MUST match
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`)
/// and "Error Codes" code-8: a name outside the expression is 400
/// `NAME_INVALID` on every pull endpoint (end-2, end-3, end-8a); names the
/// expression allows (`__`, runs of `-`, `.`, digits) are not. Distribution
/// answers such names with a plain-text 404 from its router (no code), so
/// the mirror is held to the spec's code alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_spec_expression_are_400_name_invalid() {
    let s = Setup::start().await;
    let digest = &s.image.config.digest;
    let endpoints = |name: &str| {
        [
            format!("/v2/{name}/manifests/v1"),
            format!("/v2/{name}/blobs/{digest}"),
            format!("/v2/{name}/tags/list"),
        ]
    };
    for name in [
        "Team/app",
        "team/App",
        "team//app",
        "team/app_",
        "-team/app",
        "team/a___b",
        "team/a.-b",
        "team/a..b",
        "team/a_.b",
        "team/app/",
    ] {
        for path in endpoints(name) {
            s.get(&path, &ACCEPT)
                .await
                .expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
        }
    }
    for name in [
        "team/a__b",
        "team/a---b",
        "team/a.b_c",
        "0/9",
        "a-b.c_d/e__f",
    ] {
        for path in endpoints(name) {
            let answer = s.get(&path, &ACCEPT).await;
            answer.expect_status(StatusCode::NOT_FOUND);
            assert_ne!(answer.error_code(), "NAME_INVALID", "{path}");
        }
    }
}

/// "Error Codes" code-4 (`DIGEST_INVALID`) on end-2 and end-3, and the
/// conformance suite's `invalid-digest-format/manifest-get`
/// (`sha256:baddigeststring` must be 400 or 404): digests that are not
/// `algorithm:encoded` with a known algorithm and lowercase hex of the
/// right length are 400 `DIGEST_INVALID`; on blobs the registry agrees.
/// (Distribution answers the manifest case 500, a storage-path error; the
/// mirror follows the spec.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_digests_are_400_digest_invalid() {
    let s = Setup::start().await;
    let (mirror, registry) = s
        .both(Method::GET, &format!("/v2/{REPO}/blobs/sha256:nothex"), &[])
        .await;
    mirror.expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    registry.expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    for digest in [
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}", "a".repeat(63)),
        format!("sha512:{}", "a".repeat(64)),
        "md5:d41d8cd98f00b204e9800998ecf8427e".into(),
    ] {
        s.get(&format!("/v2/{REPO}/blobs/{digest}"), &[])
            .await
            .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    }
    s.get(
        &format!("/v2/{REPO}/manifests/sha256:baddigeststring"),
        &ACCEPT,
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
}

// ---------------------------------------------------------------------------
// Pulling blobs

/// "Pulling blobs", end-2 (`GET /v2/<name>/blobs/<digest>`): 200 with the
/// blob; `Docker-Content-Digest` matching the body (and the requested
/// digest); `Content-Length` its size; the same as the registry sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_get_returns_the_blob_and_its_digest() {
    let s = Setup::start().await;
    for blob in s.image.blobs() {
        let path = format!("/v2/{REPO}/blobs/{}", blob.digest);
        let (mirror, registry) = s.both(Method::GET, &path, &[]).await;
        mirror.expect_status(StatusCode::OK);
        assert!(mirror.body == blob.data, "{}: other bytes", mirror.what);
        assert_eq!(mirror.must("docker-content-digest"), blob.digest);
        assert_eq!(sha256_digest(&mirror.body), blob.digest);
        assert_eq!(mirror.must("content-length"), blob.data.len().to_string());
        registry.expect_status(StatusCode::OK);
        assert!(registry.body == mirror.body, "{path}: the registry's bytes");
        for header in ["docker-content-digest", "content-length"] {
            assert_eq!(mirror.header(header), registry.header(header), "{path}");
        }
    }
}

/// "Checking if content exists in the registry", end-2 (`HEAD
/// /v2/<name>/blobs/<digest>`): 200 with `Docker-Content-Digest` and
/// `Content-Length` of the blob, no body; as the registry answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_head_has_digest_and_size_and_no_body() {
    let s = Setup::start().await;
    for blob in s.image.blobs() {
        let path = format!("/v2/{REPO}/blobs/{}", blob.digest);
        let (mirror, registry) = s.both(Method::HEAD, &path, &[]).await;
        mirror.expect_status(StatusCode::OK);
        registry.expect_status(StatusCode::OK);
        assert_eq!(mirror.must("docker-content-digest"), blob.digest);
        assert_eq!(mirror.must("content-length"), blob.data.len().to_string());
        for header in ["docker-content-digest", "content-length"] {
            assert_eq!(mirror.header(header), registry.header(header), "{path}");
        }
        let head = expect_bodiless_head(s.mirror(), &path, &[], 200).await;
        assert_eq!(
            raw_header(&head, "content-length"),
            Some(blob.data.len().to_string().as_str()),
            "{head}"
        );
    }
}

/// "Pulling blobs" and "Checking if content exists in the registry", end-2,
/// for the conformance suite's well-known contents: the empty blob and the
/// empty JSON object `{}`: GET 200 with the exact (possibly empty) body and
/// its digest, HEAD 200 with the size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_empty_json_blobs_are_pulled() {
    let s = Setup::start().await;
    for data in [&b""[..], &b"{}"[..]] {
        let path = s.blob(data).await;
        let digest = sha256_digest(data);
        let get = s.get(&path, &[]).await;
        get.expect_status(StatusCode::OK);
        assert_eq!(&get.body[..], data, "{}", get.what);
        assert_eq!(get.must("docker-content-digest"), digest);
        assert_eq!(get.must("content-length"), data.len().to_string());
        let head = s.send(Method::HEAD, &path, &[]).await;
        head.expect_status(StatusCode::OK);
        assert_eq!(head.must("content-length"), data.len().to_string());
        assert_eq!(head.must("docker-content-digest"), digest);
    }
}

/// "Pulling blobs", end-2, and "Error Codes" code-1: a blob not in the
/// repository (the conformance suite's `get-missing`) is 404 `BLOB_UNKNOWN`
/// on GET, as on the registry, and 404 without a body on HEAD ("Checking if
/// content exists in the registry").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_blob_is_404_blob_unknown() {
    let s = Setup::start().await;
    let path = format!(
        "/v2/{REPO}/blobs/{}",
        sha256_digest(&pseudo_random_bytes(12, 512))
    );
    let (mirror, registry) = s.both(Method::GET, &path, &[]).await;
    mirror.expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    registry.expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    expect_bodiless_head(s.mirror(), &path, &[], 404).await;
}

/// Pushes one 2048-byte blob per case (seeded by its index), so every case
/// meets a blob the mirror has not cached yet; their paths and bytes.
async fn range_blobs(s: &Setup, cases: usize) -> Vec<(String, Vec<u8>)> {
    let mut blobs = Vec::new();
    for i in 0..cases {
        let data = pseudo_random_bytes(0x5eed + i as u64, RANGE_BLOB);
        blobs.push((s.blob(&data).await, data));
    }
    blobs
}

/// "Pulling blobs", end-2 ("A registry SHOULD support the `Range` request
/// header in accordance with RFC 9110 (section 14)"): the conformance
/// suite's `range requests` on a 2048-byte blob (`500-1499`, `500-`,
/// `-500`, `2000-5000`) and two more edges (`0-0`, a suffix longer than the
/// blob): 206 (RFC 9110 §15.3.7) with the span's bytes, its
/// `Content-Length`, and `Content-Range: bytes FIRST-LAST/SIZE` (§14.4; the
/// suite also accepts `/*`), last positions past the end clamped (§14.1.2);
/// before the blob is cached (agreeing with the registry) and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_ranges_are_206_with_content_range() {
    let s = Setup::start().await;
    let size = RANGE_BLOB;
    let cases = [
        ("bytes=500-1499", 500, 1500),
        ("bytes=500-", 500, size),
        ("bytes=-500", size - 500, size),
        ("bytes=2000-5000", 2000, size),
        ("bytes=0-0", 0, 1),
        ("bytes=-5000", 0, size),
    ];
    let blobs = range_blobs(&s, cases.len()).await;
    for ((range, start, end), (path, data)) in cases.iter().zip(&blobs) {
        let check = |answer: &Answer, phase: &str| {
            answer.expect_status(StatusCode::PARTIAL_CONTENT);
            assert!(
                answer.body[..] == data[*start..*end],
                "{range} {phase}: other bytes"
            );
            assert_eq!(
                answer.must("content-length"),
                (end - start).to_string(),
                "{range} {phase}"
            );
            let content_range = answer.must("content-range");
            let span = format!("bytes {start}-{}", end - 1);
            assert!(
                content_range == format!("{span}/{size}") || content_range == format!("{span}/*"),
                "{range} {phase}: Content-Range {content_range}"
            );
        };
        let headers = [("range", *range)];
        let (mirror, registry) = s.both(Method::GET, path, &headers).await;
        check(&mirror, "cold");
        check(&registry, "registry");
        assert_eq!(mirror.must("content-range"), registry.must("content-range"));
        let whole = s.get(path, &[]).await;
        assert!(whole.body[..] == data[..], "{path}: the whole blob");
        check(&s.get(path, &headers).await, "cached");
    }
}

/// RFC 9110 §15.5.17 (416 Range Not Satisfiable) and §14.4, for end-2's
/// `Range` support ("Pulling blobs"): ranges that do not overlap a
/// 2048-byte blob (the conformance suite's `5000-10000`, a first position at
/// the size, a zero-length suffix `-0`, which §14.1.2 calls unsatisfiable)
/// are 416 with `Content-Range: bytes */2048`, before and after the blob is
/// cached. The registry agrees but for `-0`, which Go's file server answers
/// with a bogus 206 (`bytes 2048-2047/2048`); the mirror follows the RFC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_ranges_are_416_with_the_size() {
    let s = Setup::start().await;
    let cases = ["bytes=5000-10000", "bytes=2048-", "bytes=-0"];
    let blobs = range_blobs(&s, cases.len()).await;
    let unsatisfied = format!("bytes */{RANGE_BLOB}");
    for (range, (path, _)) in cases.iter().zip(&blobs) {
        let headers = [("range", *range)];
        let (mirror, registry) = s.both(Method::GET, path, &headers).await;
        mirror.expect_status(StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(mirror.must("content-range"), unsatisfied, "{range} cold");
        if *range != "bytes=-0" {
            registry.expect_status(StatusCode::RANGE_NOT_SATISFIABLE);
            assert_eq!(registry.must("content-range"), unsatisfied, "{range}");
        }
        s.get(path, &[]).await.expect_status(StatusCode::OK);
        let cached = s.get(path, &headers).await;
        cached.expect_status(StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(cached.must("content-range"), unsatisfied, "{range} cached");
    }
}

/// The conformance suite's `range requests/range 500-0` for end-2
/// ("Pulling blobs", RFC 9110 §14): a range whose last position is before
/// its first must be 416; a full 200 is counted as "range request
/// unsupported" and fails the suite. RFC 9110 §14.1.2 calls such a range
/// invalid and §14.2 lets a server ignore the field, so HTTP allows the 200;
/// but Distribution rejects it with 416, and the mirror must too to pass
/// the suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_ending_before_it_starts_is_416() {
    let s = Setup::start().await;
    let (path, _) = range_blobs(&s, 1).await.remove(0);
    let headers = [("range", "bytes=500-0")];
    let (mirror, registry) = s.both(Method::GET, &path, &headers).await;
    registry.expect_status(StatusCode::RANGE_NOT_SATISFIABLE);
    mirror.expect_status(StatusCode::RANGE_NOT_SATISFIABLE);
}

/// RFC 9110 §14.2 (Range), for end-2's `Range` support ("Pulling blobs"):
/// an origin server MUST ignore a range unit it does not understand
/// (`items=0-1`: 200, the whole blob; Distribution answers 416, the mirror
/// follows the RFC); range handling is defined for GET only, so a HEAD with
/// `Range` is the plain 200 with the whole size; several ranges may be
/// ignored (200, the whole blob) or answered `multipart/byteranges`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_the_server_ignores_give_the_whole_blob() {
    let s = Setup::start().await;
    let (path, data) = range_blobs(&s, 1).await.remove(0);
    let answer = s.get(&path, &[("range", "items=0-1")]).await;
    answer.expect_status(StatusCode::OK);
    assert!(answer.body[..] == data[..], "items=0-1: the whole blob");
    assert!(answer.header("content-range").is_none());

    let head = s.send(Method::HEAD, &path, &[("range", "bytes=0-9")]).await;
    head.expect_status(StatusCode::OK);
    assert_eq!(head.must("content-length"), RANGE_BLOB.to_string());
    assert!(head.header("content-range").is_none());

    let answer = s.get(&path, &[("range", "bytes=0-1,4-5")]).await;
    match answer.status {
        StatusCode::OK => assert!(answer.body[..] == data[..], "several ranges: whole blob"),
        StatusCode::PARTIAL_CONTENT => assert!(
            answer
                .must("content-type")
                .starts_with("multipart/byteranges"),
            "several ranges in one 206 are multipart"
        ),
        other => panic!("several ranges: {other}"),
    }
}

// ---------------------------------------------------------------------------
// Listing tags

/// "Listing Tags", end-8a (`GET /v2/<name>/tags/list`): 200 with
/// `{"name": "<name>", "tags": [...]}` listing every tag, in lexical
/// ("ASCIIbetical", Go's `sort.Strings`) order. Distribution 2.8 lists the
/// same tags unsorted, against the spec's MUST: the mirror sorts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_is_complete_and_in_lexical_order() {
    let s = Setup::start().await;
    let extra = ["b", "latest", "a10", "A", "a2", "Z_x", "1.0"];
    s.tag(&extra).await;
    let path = format!("/v2/{REPO}/tags/list");
    let (mirror, registry) = s.both(Method::GET, &path, &[]).await;
    mirror.expect_status(StatusCode::OK);
    assert!(
        mirror.must("content-type").starts_with("application/json"),
        "{}",
        mirror.what
    );
    assert_eq!(mirror.json()["name"], REPO);
    let all: Vec<&str> = extra.iter().copied().chain(["v1"]).collect();
    assert_eq!(tags_of(&mirror), sorted(&all));
    let mut theirs = tags_of(&registry);
    theirs.sort();
    assert_eq!(theirs, sorted(&all), "the registry lists the same tags");
}

/// "Listing Tags", end-8b (`?n=<int>`), with RFC 5988 §5 for `Link`: a
/// response has exactly `n` tags unless fewer remain, and when it has fewer
/// than the rest it carries `Link: <...>; rel="next"`; following the links
/// visits every tag once, in order, the last page without a `Link`; an `n`
/// at or above the count is the whole list without a `Link`. (Distribution
/// 2.8 ignores `n`; the mirror follows the spec.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_n_pages_with_a_next_link() {
    let s = Setup::start().await;
    let extra = ["b", "latest", "a10", "A", "a2", "Z_x", "1.0"];
    s.tag(&extra).await;
    let all = sorted(&extra.iter().copied().chain(["v1"]).collect::<Vec<_>>());
    let mut seen = Vec::new();
    let mut path = format!("/v2/{REPO}/tags/list?n=3");
    loop {
        let page = s.get(&path, &[]).await;
        page.expect_status(StatusCode::OK);
        let tags = tags_of(&page);
        let left = all.len() - seen.len();
        assert_eq!(
            tags.len(),
            left.min(3),
            "{path}: exactly n unless fewer remain"
        );
        seen.extend(tags);
        match page.next_link() {
            Some(next) => {
                assert!(seen.len() < all.len(), "{path}: a Link after the last tag");
                let base = url::Url::parse(&format!("http://{}{path}", s.mirror())).unwrap();
                let next = base
                    .join(&next)
                    .expect("the Link target is a URI reference");
                assert_eq!(
                    (next.host_str(), next.port(), next.path()),
                    (
                        base.host_str(),
                        base.port(),
                        format!("/v2/{REPO}/tags/list").as_str()
                    ),
                    "{path}: Link {next} is not this repository's tag list"
                );
                path = format!("{}?{}", next.path(), next.query().unwrap_or_default());
            }
            None => break,
        }
        assert!(seen.len() <= all.len(), "paging does not end");
    }
    assert_eq!(seen, all, "every tag once, in order");
    for n in [all.len(), all.len() + 5] {
        let answer = s.get(&format!("/v2/{REPO}/tags/list?n={n}"), &[]).await;
        answer.expect_status(StatusCode::OK);
        assert_eq!(tags_of(&answer), all, "n={n}");
        assert!(answer.header("link").is_none(), "n={n}: no Link");
    }
}

/// "Listing Tags", end-8b: "When `n` is zero, this endpoint MUST return an
/// empty list, and MUST NOT include a `Link` header." Distribution 2.8
/// returns every tag for `n=0`; the mirror follows the spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_n_zero_is_empty_without_link() {
    let s = Setup::start().await;
    s.tag(&["v2", "v3"]).await;
    let path = format!("/v2/{REPO}/tags/list?n=0");
    let (mirror, registry) = s.both(Method::GET, &path, &[]).await;
    mirror.expect_status(StatusCode::OK);
    assert_eq!(tags_of(&mirror), Vec::<String>::new());
    assert!(mirror.header("link").is_none(), "n=0: no Link");
    assert_eq!(tags_of(&registry).len(), 3, "Distribution ignores n=0");
}

/// "Listing Tags", end-8b (`?n=<int>&last=<tagname>`; "When using the
/// `last` query parameter, the `n` parameter is OPTIONAL"): the tags after
/// `last`, never `last` itself; `last` alone as the conformance suite sends
/// it (half the sorted list), with `n`, a `last` between two tags, and one
/// after every tag (an empty 200). (Distribution 2.8 ignores `last`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_last_starts_after_last() {
    let s = Setup::start().await;
    let extra = ["b", "latest", "a10", "A", "a2", "Z_x", "1.0"];
    s.tag(&extra).await;
    let all = sorted(&extra.iter().copied().chain(["v1"]).collect::<Vec<_>>());
    let end = all.len() / 2;
    let last = &all[end - 1];
    assert_eq!(list_tags(&s, &format!("last={last}")).await, all[end..]);
    assert_eq!(
        list_tags(&s, &format!("n=2&last={last}")).await,
        all[end..end + 2]
    );
    // "a15" is no tag: the list goes on after where it would sort.
    let after: Vec<String> = all.iter().filter(|t| t.as_str() > "a15").cloned().collect();
    assert_eq!(list_tags(&s, "last=a15").await, after);
    assert_eq!(list_tags(&s, "last=zzz").await, Vec::<String>::new());
}

/// "Listing Tags", end-8a (failure 404) and "Error Codes" code-9: the tag
/// list of a repository the upstream does not know is 404 `NAME_UNKNOWN`,
/// as on the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_of_an_unknown_repository_is_404_name_unknown() {
    let s = Setup::start().await;
    let (mirror, registry) = s.both(Method::GET, "/v2/team/none/tags/list", &[]).await;
    mirror.expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    registry.expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
}

// ---------------------------------------------------------------------------
// Authentication and authorization

/// "Error Codes" code-11 (`UNAUTHORIZED`) on end-1, end-2, end-3 and end-8a
/// (end-1's failure is 401), with RFC 9110 §15.5.2 and §11.6.1: a 401 MUST
/// carry `WWW-Authenticate` with a challenge, here the `Bearer` scheme the
/// callers' tokens use (RFC 6750 §3); HEAD too, without a body. The
/// caller's token opens the same paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_token_are_401_with_a_bearer_challenge() {
    let (_dir, callers) = one_caller();
    let s = Setup::start_with(&callers).await;
    let paths = [
        "/v2/".to_owned(),
        format!("/v2/{REPO}/manifests/v1"),
        format!("/v2/{REPO}/blobs/{}", s.image.config.digest),
        format!("/v2/{REPO}/tags/list"),
    ];
    let challenge_ok = |challenge: &str| {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        scheme.eq_ignore_ascii_case("bearer") && params.contains("realm=")
    };
    for path in &paths {
        for headers in [&[][..], &[("authorization", "Bearer wrong")][..]] {
            let answer = s.get(path, headers).await;
            answer.expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
            let challenge = answer.must("www-authenticate");
            assert!(challenge_ok(challenge), "{path}: challenge {challenge:?}");
            let head = expect_bodiless_head(s.mirror(), path, headers, 401).await;
            let challenge = raw_header(&head, "www-authenticate").unwrap_or_default();
            assert!(challenge_ok(challenge), "HEAD {path}: {head}");
        }
        s.get(path, &[("authorization", "Bearer secret-a")])
            .await
            .expect_status(StatusCode::OK);
    }
}

/// "Error Codes" code-12 (`DENIED`) on end-2, end-3 and end-8a: a caller
/// known by its token but asking for a repository outside its own is 403
/// `DENIED` (not 401: it is authenticated), on HEAD too, without a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_outside_their_repositories_are_403_denied() {
    let (_dir, callers) = one_caller();
    let s = Setup::start_with(&callers).await;
    let private = s.registry.push_image("private/app", "v1").await;
    let bearer = [("authorization", "Bearer secret-a")];
    for path in [
        "/v2/private/app/manifests/v1".to_owned(),
        format!("/v2/private/app/blobs/{}", private.config.digest),
        "/v2/private/app/tags/list".to_owned(),
    ] {
        s.get(&path, &bearer)
            .await
            .expect_error(StatusCode::FORBIDDEN, "DENIED");
        expect_bodiless_head(s.mirror(), &path, &bearer, 403).await;
    }
}

// ---------------------------------------------------------------------------
// What the pull side does not do

/// The push and delete endpoints (end-4a/4b/4c, end-5, end-6, end-7a/7b,
/// end-9, end-10, end-11, end-13, end-14), which "Requirements" leaves
/// optional beside Pull, and "Error Codes" code-13 (`UNSUPPORTED`): 405
/// (end-9/end-10 list it as their failure) with `UNSUPPORTED` and, per RFC
/// 9110 §15.5.6, an `Allow` header; nothing reaches the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_delete_are_405_unsupported_with_allow() {
    let s = Setup::start().await;
    let manifest = format!("/v2/{REPO}/manifests/{}", s.image.manifest.digest);
    let blob = format!("/v2/{REPO}/blobs/{}", s.image.config.digest);
    let digest = &s.image.config.digest;
    let upload = format!("/v2/{REPO}/blobs/uploads/0f3c1e0a");
    for (method, path) in [
        (Method::POST, format!("/v2/{REPO}/blobs/uploads/")),
        (
            Method::POST,
            format!("/v2/{REPO}/blobs/uploads/?digest={digest}"),
        ),
        (
            Method::POST,
            format!("/v2/{REPO}/blobs/uploads/?digest-algorithm=sha256"),
        ),
        (
            Method::POST,
            format!("/v2/{REPO}/blobs/uploads/?mount={digest}&from=team/other"),
        ),
        (Method::PATCH, upload.clone()),
        (Method::PUT, format!("{upload}?digest={digest}")),
        (Method::GET, upload.clone()),
        (Method::DELETE, upload.clone()),
        (Method::PUT, format!("/v2/{REPO}/manifests/v9")),
        (Method::PUT, format!("{manifest}?tag=v9")),
        (Method::DELETE, manifest.clone()),
        (Method::DELETE, blob.clone()),
    ] {
        let answer = s.send(method.clone(), &path, &[]).await;
        answer.expect_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
        answer.must("allow");
    }
    s.direct(Method::GET, &manifest, &ACCEPT)
        .await
        .expect_status(StatusCode::OK);
    s.direct(Method::GET, &blob, &[])
        .await
        .expect_status(StatusCode::OK);
    s.direct(Method::GET, &format!("/v2/{REPO}/manifests/v9"), &ACCEPT)
        .await
        .expect_status(StatusCode::NOT_FOUND);
}

/// RFC 9110 §10.2.1 (Allow) and §15.5.6, for the 405s of the endpoints the
/// mirror does not serve: `Allow` lists "the set of methods advertised as
/// supported by the target resource", so every method it names must not
/// itself be answered 405 (an upload session supports none: its `Allow`
/// should be empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_names_only_methods_the_resource_serves() {
    let s = Setup::start().await;
    for (method, path) in [
        (Method::DELETE, format!("/v2/{REPO}/manifests/v1")),
        (
            Method::DELETE,
            format!("/v2/{REPO}/blobs/{}", s.image.config.digest),
        ),
        (Method::PUT, format!("/v2/{REPO}/manifests/v9")),
        (Method::POST, format!("/v2/{REPO}/blobs/uploads/")),
        (Method::PATCH, format!("/v2/{REPO}/blobs/uploads/0f3c1e0a")),
    ] {
        let answer = s.send(method.clone(), &path, &[]).await;
        answer.expect_status(StatusCode::METHOD_NOT_ALLOWED);
        let allow = answer.must("allow").to_owned();
        for allowed in allow.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            let allowed = Method::from_bytes(allowed.as_bytes()).expect("a method");
            let again = s.send(allowed.clone(), &path, &ACCEPT).await;
            assert_ne!(
                again.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} allows {allow}, but {allowed} is 405"
            );
        }
    }
}

/// "Backwards Compatibility" / "Unavailable Referrers API" (end-12a): a
/// mirror without the referrers API answers `GET
/// /v2/<name>/referrers/<digest>` with 404, as the registry does, so a
/// client falls back to the "Referrers Tag Schema" tag
/// (`<alg>-<encoded>`), which the mirror then serves like any tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_404_and_the_fallback_tag_pulls() {
    let s = Setup::start().await;
    let subject = &s.image.manifest.digest;
    let (mirror, registry) = s
        .both(Method::GET, &format!("/v2/{REPO}/referrers/{subject}"), &[])
        .await;
    mirror.expect_status(StatusCode::NOT_FOUND);
    registry.expect_status(StatusCode::NOT_FOUND);
    let tag = subject.replace(':', "-");
    let referrers = index_json(
        OCI_INDEX,
        &[Descriptor::of(OCI_MANIFEST, &s.image.manifest.bytes)],
    );
    let pushed = s
        .registry
        .push_manifest(REPO, &tag, OCI_INDEX, referrers)
        .await;
    let answer = s.get(&format!("/v2/{REPO}/manifests/{tag}"), &ACCEPT).await;
    answer.expect_status(StatusCode::OK);
    assert!(answer.body == pushed.bytes, "the fallback index");
    assert_eq!(answer.must("content-type"), OCI_INDEX);
}

/// "Registry Proxying": a proxy that uses the `ns` query parameter to scope
/// a pull SHOULD return its value in `OCI-Namespace`; the mirror pulls
/// manifests, blobs and tags for the registry host `ns` names (and keeps
/// `ns` in the tag list's `Link`), and a host no upstream answers for is
/// 404 `NAME_UNKNOWN`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_scopes_the_pull_and_comes_back_in_oci_namespace() {
    let s = Setup::start().await;
    s.tag(&["v2"]).await;
    let ns = s.registry.host();
    let query = format!("ns={}", ns.replace(':', "%3A"));
    let paths = [
        format!("/v2/{REPO}/manifests/v1?{query}"),
        format!("/v2/{REPO}/blobs/{}?{query}", s.image.config.digest),
        format!("/v2/{REPO}/tags/list?n=1&{query}"),
    ];
    for path in &paths {
        let answer = s.get(path, &ACCEPT).await;
        answer.expect_status(StatusCode::OK);
        assert_eq!(answer.must("oci-namespace"), ns, "{path}");
    }
    let page = s.get(&paths[2], &[]).await;
    let next = page.next_link().expect("a next page");
    assert!(next.contains(&query), "the Link keeps ns: {next}");
    s.get(
        &format!("/v2/{REPO}/manifests/v1?ns=registry.example.com"),
        &ACCEPT,
    )
    .await
    .expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
}

// ---------------------------------------------------------------------------
// Faults the upstream causes

/// "Error Codes" code-14 (`TOOMANYREQUESTS`), with RFC 6585 §4 and RFC 9110
/// §10.2.3: when the upstream rate-limits the pull (429 with `Retry-After`,
/// from the fake registry, retries off), the mirror answers 429
/// `TOOMANYREQUESTS` with a `Retry-After` of delay-seconds on end-2, end-3
/// and end-8a; HEAD too, without a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rate_limits_are_429_toomanyrequests_with_retry_after() {
    let fake = FakeRegistry::start().await;
    let digest = sha256_digest(b"rate limited blob");
    let paths = [
        format!("/v2/{REPO}/manifests/v1"),
        format!("/v2/{REPO}/blobs/{digest}"),
        format!("/v2/{REPO}/tags/list"),
    ];
    for path in &paths {
        fake.on(path, Reply::status(429).header("Retry-After", "2"));
    }
    let upstream = Upstream::new("fake", &fake.url())
        .retries(0)
        .circuit(1000, Duration::from_secs(1));
    let service = mirror_of(upstream, "").await;
    let mirror = service.mirror_addr.expect("the mirror is on");
    let http = http_client();
    let delay_seconds = |value: Option<&str>| {
        value
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|v| v >= 1)
    };
    for path in &paths {
        let answer = request(
            &http,
            Method::GET,
            &format!("http://{mirror}{path}"),
            &ACCEPT,
        )
        .await;
        answer.expect_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
        assert!(
            delay_seconds(answer.header("retry-after")),
            "{path}: Retry-After {:?}",
            answer.header("retry-after")
        );
    }
    for path in &paths[..2] {
        let head = expect_bodiless_head(mirror, path, &ACCEPT, 429).await;
        assert!(delay_seconds(raw_header(&head, "retry-after")), "{head}");
    }
    assert!(fake.count(&paths[0]) >= 1, "the upstream was asked");
}

// ---------------------------------------------------------------------------
// The error envelope

/// "Error Codes": "The `code` field MUST be one of the following" (code-1 to
/// code-14) for a 4XX body in JSON; "Legacy Docker support error codes"
/// tolerates schema1-era codes such as `TAG_INVALID`. Every 4XX the pull
/// side produces without callers or upstream faults is swept (the 401, 403
/// and 429 tests check theirs): an unsatisfiable range, a bad `n`, a bad
/// `last`, an unknown manifest, a malformed digest and name, an unknown
/// repository, a delete, a path outside the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_4xx_code_is_one_of_the_specs() {
    let s = Setup::start().await;
    let (range_blob, _) = range_blobs(&s, 1).await.remove(0);
    // (method, path, Range header)
    let cases: [(Method, String, Option<&str>); 9] = [
        (Method::GET, range_blob, Some("bytes=5000-")),
        (Method::GET, format!("/v2/{REPO}/tags/list?n=many"), None),
        (Method::GET, format!("/v2/{REPO}/tags/list?last=-x"), None),
        (Method::GET, format!("/v2/{REPO}/manifests/v404"), None),
        (Method::GET, format!("/v2/{REPO}/blobs/sha256:0a"), None),
        (Method::GET, "/v2/Team/manifests/v1".into(), None),
        (Method::GET, "/v2/team/none/tags/list".into(), None),
        (Method::DELETE, format!("/v2/{REPO}/manifests/v1"), None),
        (Method::GET, "/v2/_catalog".into(), None),
    ];
    let mut outside = Vec::new();
    for (method, path, range) in cases {
        let headers: Vec<(&str, &str)> = range.map(|r| ("range", r)).into_iter().collect();
        let answer = s.send(method.clone(), &path, &headers).await;
        assert!(answer.status.is_client_error(), "{}", answer.what);
        // "A 4XX response code from the registry MAY return a body in any
        // format": only a JSON body's code is bound to the table.
        if !answer.must("content-type").starts_with("application/json") {
            assert!(!answer.body.is_empty(), "{}: some body", answer.what);
            continue;
        }
        let code = answer.error_code();
        if !SPEC_CODES.contains(&code.as_str()) && code != "TAG_INVALID" {
            outside.push(format!("{method} {path} -> {} {code}", answer.status));
        }
    }
    assert!(outside.is_empty(), "codes outside the spec: {outside:#?}");
}
