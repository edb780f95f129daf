//! Hostile answers from upstreams: content redirects aimed where requests
//! may not go (an https → http downgrade, internal addresses for an upstream
//! that is not internal) or that would carry `Authorization` to another
//! origin; tag lists that never end, loop, or carry tags that break the
//! grammar; `Docker-Content-Digest` headers that are not digests; and the
//! background refresh of a stale tag, which must not spend a manifest GET
//! when a HEAD says nothing changed.
//!
//! Every test upstream listens on 127.0.0.1 and so is itself internal, for
//! which internal redirect targets are fine. The test of a public upstream
//! reaches `registry.example.com` through the upstream's `proxy`, a
//! recording fake that answers for every host, so a request for a refused
//! target would be seen there.

use crate::common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::Response;
use bytes::Bytes;
use common::InProcess;
use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest, random_blob, sha256_digest};
use common::fake::{FakeRegistry, Reply};
use common::recording::{RecordingServer, redirect, reply, with_header};
use common::rpc::{
    Client, blob_request, expect_err, fetch_manifest, fetch_tags, head_manifest_request, read_blob,
    unary,
};
use common::tls::TestCa;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::either::Either;
use tonic::Code;

const REPO: &str = "team/app";
/// A public-looking upstream host, reached through the recording proxy.
const PUBLIC_REGISTRY: &str = "registry.example.com";
/// The static token the bearer-auth upstreams send.
const TOKEN: &str = "static-tok-3c1d";

/// One retry, short backoff: refused answers fail fast.
fn quick(upstream: Upstream) -> Upstream {
    upstream
        .retries(1)
        .retry_max_delay(Duration::from_millis(50))
}

/// `upstream` sending `Authorization: Bearer TOKEN` with every request; the
/// token file lives in `dir`.
fn with_static_token(upstream: Upstream, dir: &tempfile::TempDir) -> Upstream {
    let file = dir.path().join("token");
    std::fs::write(&file, TOKEN).expect("write the token file");
    upstream.auth(&format!(
        "type = \"bearer\"\ntoken_file = \"{}\"",
        file.display()
    ))
}

fn ca_file_line(ca: &TestCa) -> String {
    format!("ca_file = \"{}\"", ca.ca_file().display())
}

fn blob_path(digest: &str) -> String {
    format!("/v2/{REPO}/blobs/{digest}")
}

fn blob_body(blob: &Bytes) -> Response {
    let mut resp = with_header(reply(200), header::CONTENT_TYPE, "application/octet-stream");
    *resp.body_mut() = Body::from(blob.clone());
    resp
}

// ---------------------------------------------------------------------------
// Content redirects

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirect_from_https_to_http_is_refused_and_the_http_target_gets_nothing() {
    let ca = TestCa::new();
    let blob = random_blob(0x61, 4096);
    let digest = sha256_digest(&blob);
    let cdn = FakeRegistry::start().await;
    cdn.on(&format!("/cdn/{digest}"), Reply::ok(blob.clone()));
    let location = format!("{}/cdn/{digest}", cdn.url());
    let path = blob_path(&digest);
    let registry = RecordingServer::start_tls(&ca, move |seen| {
        if seen.path == path {
            redirect(&location)
        } else {
            reply(404)
        }
    })
    .await;
    let upstream = quick(Upstream::new("a", &registry.url())).line(&ca_file_line(&ca));
    let service = InProcess::start(&ServiceConfig::with(upstream).toml()).await;
    let mut client = service.client().await;

    let read = read_blob(&mut client, blob_request(REPO, &digest)).await;
    let status = read
        .end
        .expect_err("a blob reached through an https -> http redirect");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("upstream `a`") && status.message().contains("downgrade"),
        "the message names the upstream and the downgrade: {}",
        status.message()
    );
    assert!(
        registry.seen().iter().any(|s| s.path == blob_path(&digest)),
        "the registry was asked for the blob: {:?}",
        registry.seen()
    );
    assert!(
        cdn.requests().is_empty(),
        "the plain-http redirect target was asked: {:?}",
        cdn.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_upstream_redirects_to_internal_addresses_are_refused() {
    // Would-be targets: a port on 127.0.0.1 (by address and as
    // `localhost`), the cloud metadata address, a private address written
    // as IPv4-mapped IPv6, and a CGNAT address (Alibaba Cloud's metadata).
    // Through the proxy, a followed redirect shows up as a proxy request
    // for the target's host.
    let port = common::free_port();
    let targets = [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
        "http://169.254.169.254".to_string(),
        "http://[::ffff:10.0.0.1]".to_string(),
        "http://100.100.100.200".to_string(),
    ];
    let blobs: Vec<(String, Bytes, String)> = targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            let blob = random_blob(0x70 + i as u64, 2048);
            let digest = sha256_digest(&blob);
            let location = format!("{target}/cdn/{digest}");
            (digest, blob, location)
        })
        .collect();
    let script = blobs.clone();
    // The proxy answers for every host: the registry's redirects, and the
    // blob itself for whoever asks for /cdn/ (as an internal service would).
    let proxy = RecordingServer::start(move |seen| {
        for (digest, blob, location) in &script {
            if seen.host == PUBLIC_REGISTRY && seen.path == blob_path(digest) {
                return redirect(location);
            }
            if seen.path == format!("/cdn/{digest}") {
                return blob_body(blob);
            }
        }
        reply(404)
    })
    .await;
    let upstream = quick(Upstream::new(
        "public",
        &format!("http://{PUBLIC_REGISTRY}"),
    ))
    .line(&format!("proxy = \"{}\"", proxy.url()));
    let service = InProcess::start(&ServiceConfig::with(upstream).toml()).await;
    let mut client = service.client().await;

    for (digest, _, location) in &blobs {
        let read = read_blob(&mut client, blob_request(REPO, digest)).await;
        let status = read
            .end
            .expect_err(&format!("the blob was fetched through {location}"));
        assert_eq!(status.code(), Code::Unavailable, "{location}: {status:?}");
        assert!(
            status.message().contains("upstream `public`")
                && status.message().contains("internal address"),
            "{location}: the message says why: {}",
            status.message()
        );
    }
    let elsewhere: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.host != PUBLIC_REGISTRY)
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests went to refused redirect targets: {elsewhere:?}"
    );
    assert!(
        proxy.seen_for(PUBLIC_REGISTRY).len() >= blobs.len(),
        "the upstream itself was asked for every blob: {:?}",
        proxy.seen()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirect_to_another_port_carries_no_authorization() {
    let registry = FakeRegistry::start().await;
    let cdn = FakeRegistry::start().await;
    let blob = random_blob(0x62, 4096);
    let digest = sha256_digest(&blob);
    registry.on(
        &blob_path(&digest),
        Reply::redirect(307, &format!("{}/cdn/{digest}", cdn.url())),
    );
    cdn.on(&format!("/cdn/{digest}"), Reply::ok(blob.clone()));
    let secrets = tempfile::tempdir().expect("temp dir for the token");
    let upstream = with_static_token(Upstream::new("a", &registry.url()), &secrets);
    let service = InProcess::start(&ServiceConfig::with(upstream).toml()).await;
    let mut client = service.client().await;

    let read = read_blob(&mut client, blob_request(REPO, &digest)).await;
    read.assert_bytes(&blob, "the redirected blob");
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        registry
            .requests_to(&blob_path(&digest))
            .iter()
            .all(|r| r.header("authorization") == Some(bearer.as_str())),
        "the registry got the token"
    );
    let cdn_requests = cdn.requests_to(&format!("/cdn/{digest}"));
    assert!(!cdn_requests.is_empty(), "the redirect was followed");
    for r in &cdn_requests {
        assert_eq!(
            r.header("authorization"),
            None,
            "Authorization went to another port: {r:?}"
        );
    }
}

/// What [`DualProtocol`]'s server received: path and `Authorization`.
type Received = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The answer for a path.
type Routes = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// A listener that speaks plain HTTP and TLS on one port, by the first byte
/// of each connection (0x16 starts a TLS handshake), so a redirect can change
/// the scheme alone, keeping host and port.
struct DualProtocol {
    tcp: TcpListener,
    tls: TlsAcceptor,
}

impl DualProtocol {
    /// Binds `127.0.0.1:0` with `ca`'s server certificate for 127.0.0.1
    /// (the files [`TestCa`] writes beside its `ca_file`).
    async fn bind(ca: &TestCa) -> DualProtocol {
        let ca_pem = ca.ca_file();
        let chain = CertificateDer::pem_file_iter(ca_pem.with_file_name("server.pem"))
            .expect("open TestCa's server certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("parse the server certificate");
        let key = PrivateKeyDer::from_pem_file(ca_pem.with_file_name("server.key"))
            .expect("parse TestCa's server key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate and key match");
        DualProtocol {
            tcp: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            tls: TlsAcceptor::from(Arc::new(config)),
        }
    }
}

impl axum::serve::Listener for DualProtocol {
    type Io = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            let mut first = [0u8; 1];
            if !matches!(tcp.peek(&mut first).await, Ok(1)) {
                continue;
            }
            if first[0] != 0x16 {
                return (Either::Left(tcp), addr);
            }
            if let Ok(tls) = self.tls.accept(tcp).await {
                return (Either::Right(tls), addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn record_dual(
    State((received, routes)): State<(Received, Routes)>,
    req: Request,
) -> Response {
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    received
        .lock()
        .expect("received lock")
        .push((path.clone(), auth));
    routes(&path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirect_that_changes_only_the_scheme_carries_no_authorization() {
    let ca = TestCa::new();
    let listener = DualProtocol::bind(&ca).await;
    let addr = listener.tcp.local_addr().expect("bound address");
    let blob = random_blob(0x63, 4096);
    let digest = sha256_digest(&blob);
    let (path, cdn_path) = (blob_path(&digest), format!("/cdn/{digest}"));
    let location = format!("https://{addr}{cdn_path}");
    let routes: Routes = {
        let (path, cdn_path, blob) = (path.clone(), cdn_path.clone(), blob.clone());
        Arc::new(move |p: &str| {
            if p == path {
                redirect(&location)
            } else if p == cdn_path {
                blob_body(&blob)
            } else {
                reply(404)
            }
        })
    };
    let received = Received::default();
    let app = Router::new()
        .fallback(record_dual)
        .with_state((received.clone(), routes));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let secrets = tempfile::tempdir().expect("temp dir for the token");
    let upstream = with_static_token(Upstream::new("a", &format!("http://{addr}")), &secrets)
        .line(&ca_file_line(&ca));
    let service = InProcess::start(&ServiceConfig::with(upstream).toml()).await;
    let mut client = service.client().await;

    let read = read_blob(&mut client, blob_request(REPO, &digest)).await;
    read.assert_bytes(&blob, "the blob behind an http -> https redirect");
    let received = received.lock().expect("received lock").clone();
    server.abort();
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        received
            .iter()
            .any(|(p, auth)| *p == path && auth.as_deref() == Some(bearer.as_str())),
        "the registry got the token over http: {received:?}"
    );
    let over_https: Vec<_> = received.iter().filter(|(p, _)| *p == cdn_path).collect();
    assert!(!over_https.is_empty(), "the https redirect was followed");
    assert!(
        over_https.iter().all(|(_, auth)| auth.is_none()),
        "Authorization went to another origin (same host and port, other scheme): {over_https:?}"
    );
}

// ---------------------------------------------------------------------------
// Tag lists

fn tags_path() -> String {
    format!("/v2/{REPO}/tags/list")
}

/// A service with `max_tags = 1000` (so the tag-list byte cap is
/// 1000 × 256 B + 64 KiB) and `fake` as upstream `a`.
async fn tags_service(fake: &FakeRegistry) -> InProcess {
    let config = ServiceConfig::with(quick(Upstream::new("a", &fake.url()))).top("max_tags = 1000");
    InProcess::start(&config.toml()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_tag_pages_end_at_the_byte_cap() {
    const PAGES: usize = 100;
    let fake = FakeRegistry::start().await;
    let padding = " ".repeat(40 * 1024);
    // Every page is a new URL with one tag and 40 KiB of whitespace: no
    // count cap and no loop detection stops it, only the byte cap.
    let pages = (0..PAGES).map(|i| {
        let body = format!("{{\"name\":\"{REPO}\",{padding}\"tags\":[\"t{i}\"]}}");
        Reply::ok(body)
            .header("Content-Type", "application/json")
            .header(
                "Link",
                &format!("<{}?page={}>; rel=\"next\"", tags_path(), i + 1),
            )
    });
    fake.on_seq(&tags_path(), pages);
    let service = tags_service(&fake).await;
    let mut client = service.client().await;

    let status = fetch_tags(&mut client, REPO)
        .await
        .expect_err("an endless tag list ends in an error");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let message = status.message();
    assert!(
        message.contains("upstream `a`")
            && message.contains("bytes")
            && message.contains("max_tags"),
        "the message names the upstream and the cap: {message}"
    );
    let asked = fake.count(&tags_path());
    assert!(
        (2..PAGES).contains(&asked),
        "the cap ended the paging after {asked} pages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_that_break_the_grammar_are_an_upstream_fault() {
    let huge = "a".repeat(200);
    for bad in [huge.as_str(), "-leading-dash", "no/slash", ""] {
        let fake = FakeRegistry::start().await;
        fake.on(
            &tags_path(),
            Reply::json(&serde_json::json!({"name": REPO, "tags": ["ok", bad]})),
        );
        let service = tags_service(&fake).await;
        let mut client = service.client().await;

        let status = fetch_tags(&mut client, REPO)
            .await
            .expect_err("a list with an invalid tag is refused");
        assert_eq!(status.code(), Code::Unavailable, "{bad:?}: {status:?}");
        let message = status.message();
        assert!(
            message.contains("upstream `a`") && message.contains("invalid tag"),
            "{bad:?}: the message names the upstream and the fault: {message}"
        );
        assert!(
            message.len() < 400 && !message.contains(&huge[..100]),
            "{bad:?}: the message is cut to a safe length ({} bytes): {message}",
            message.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_back_to_a_page_already_read_ends_the_listing() {
    let fake = FakeRegistry::start().await;
    let path = tags_path();
    fake.on(
        &path,
        Reply::json(&serde_json::json!({"name": REPO, "tags": ["b", "a"]}))
            .header("Link", &format!("<{path}?last=b>; rel=\"next\"")),
    );
    // The second page links to itself.
    fake.on(
        &format!("{path}?last=b"),
        Reply::json(&serde_json::json!({"name": REPO, "tags": ["d", "c"]}))
            .header("Link", &format!("<{path}?last=b>; rel=\"next\"")),
    );
    let service = tags_service(&fake).await;
    let mut client = service.client().await;

    let tags = fetch_tags(&mut client, REPO)
        .await
        .expect("a looping Link ends the listing with the tags seen")
        .tags;
    assert_eq!(tags, ["a", "b", "c", "d"]);
    assert_eq!(fake.count(&path), 2, "each page was read once");
}

// ---------------------------------------------------------------------------
// Docker-Content-Digest that is not a digest

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_docker_content_digest_fails_a_digest_request_and_is_ignored_for_a_tag() {
    let manifest = image_manifest("hostile-digest-header", 1);
    let digest = sha256_digest(&manifest);
    let lying = FakeRegistry::start().await;
    let honest = FakeRegistry::start().await;
    let answer = Reply::ok(manifest.clone())
        .header("Content-Type", OCI_MANIFEST)
        .header("Docker-Content-Digest", "sha256:not-a-digest");
    for reference in ["v1", digest.as_str()] {
        lying.on(&format!("/v2/{REPO}/manifests/{reference}"), answer.clone());
    }
    honest.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &manifest);

    // Alone: a digest request is UNAVAILABLE (fetch and head), a tag works.
    let alone =
        InProcess::start(&ServiceConfig::with(quick(Upstream::new("lying", &lying.url()))).toml())
            .await;
    let mut client = alone.client().await;
    let status = fetch_manifest(&mut client, REPO, &digest)
        .await
        .expect_err("an invalid Docker-Content-Digest for a digest request");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("upstream `lying`")
            && status.message().contains("Docker-Content-Digest"),
        "{}",
        status.message()
    );
    let status = expect_err(
        client
            .head_manifest(head_manifest_request(REPO, &digest))
            .await,
    );
    assert_eq!(status.code(), Code::Unavailable, "HEAD: {status:?}");
    let by_tag = fetch_manifest(&mut client, REPO, "v1")
        .await
        .expect("the header is ignored for a tag");
    assert_eq!(
        by_tag.digest, digest,
        "the digest is computed from the bytes"
    );

    // With another upstream: the digest request moves on to it.
    let both = InProcess::start(
        &ServiceConfig::new()
            .upstream(quick(Upstream::new("lying", &lying.url())).priority(1))
            .upstream(quick(Upstream::new("honest", &honest.url())).priority(2))
            .toml(),
    )
    .await;
    let mut client = both.client().await;
    let fetched = fetch_manifest(&mut client, REPO, &digest)
        .await
        .expect("the next upstream serves the manifest");
    assert_eq!(fetched.manifest, manifest);
    assert_eq!(
        fetched.source.expect("source").upstream,
        "honest",
        "the upstream with the invalid header was passed over"
    );
}

// ---------------------------------------------------------------------------
// Background refresh of a stale tag

/// The requests `fake` received for the manifest `reference`, by method.
fn manifest_requests(fake: &FakeRegistry, reference: &str, method: &str) -> usize {
    fake.requests_to(&format!("/v2/{REPO}/manifests/{reference}"))
        .iter()
        .filter(|r| r.method == method)
        .count()
}

/// Fetches `REPO:tag` (answered from the stale entry, which starts a
/// background refresh) until `done` holds; false if it never does within
/// [`common::POLL_BOUND`].
async fn fetch_until(client: &mut Client, tag: &str, mut done: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + common::POLL_BOUND;
    while tokio::time::Instant::now() < until {
        fetch_manifest(client, REPO, tag)
            .await
            .expect("a stale tag is served");
        if eventually_briefly(&mut done).await {
            return true;
        }
    }
    false
}

/// Polls `done` for a moment (a refresh runs in the background).
async fn eventually_briefly(done: &mut impl FnMut() -> bool) -> bool {
    common::eventually_within(Duration::from_millis(200), done).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tag_refresh_asks_with_head_and_gets_only_when_the_digest_changed() {
    let fake = FakeRegistry::start().await;
    let first = image_manifest("refresh-first", 1);
    let first_digest = fake.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &first);
    let config = ServiceConfig::with(quick(Upstream::new("a", &fake.url())))
        .cache("tag_ttl = \"1ms\"")
        .toml();
    let service = InProcess::start(&config).await;
    let mut client = service.client().await;

    let fetched = fetch_manifest(&mut client, REPO, "v1").await.expect("v1");
    assert_eq!(fetched.digest, first_digest);
    assert_eq!(
        manifest_requests(&fake, "v1", "GET"),
        1,
        "the first fetch GETs"
    );

    for refreshes in 1..=3 {
        let seen = fetch_until(&mut client, "v1", || {
            manifest_requests(&fake, "v1", "HEAD") >= refreshes
        })
        .await;
        assert!(seen, "stale refresh {refreshes} asked with HEAD");
    }
    assert_eq!(
        manifest_requests(&fake, "v1", "GET"),
        1,
        "refreshes of an unchanged tag spent no GET ({} HEADs)",
        manifest_requests(&fake, "v1", "HEAD")
    );

    // The tag moves: the next refresh's HEAD sees a new digest and GETs.
    let second = image_manifest("refresh-second", 1);
    let second_digest = fake.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &second);
    let moved = fetch_until(&mut client, "v1", || {
        manifest_requests(&fake, "v1", "GET") >= 2
    })
    .await;
    assert!(moved, "the changed digest was fetched with GET");
    assert!(
        eventually_refetched(&mut client, &second_digest).await,
        "the tag resolves to its new digest"
    );
}

/// True once FetchManifest of `REPO:v1` answers `digest`.
async fn eventually_refetched(client: &mut Client, digest: &str) -> bool {
    for _ in 0..100 {
        let got = unary(client.fetch_manifest(common::rpc::manifest_request(REPO, "v1")))
            .await
            .expect("v1");
        if got.digest == digest {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
