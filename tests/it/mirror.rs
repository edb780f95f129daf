//! The OCI HTTP mirror (`mirror_listen`) in front of a real Distribution
//! registry: real `skopeo` copies through it the bytes it copies from the
//! registry (a single-platform image, and one platform of an index); it
//! shares one cache with gRPC both ways; blobs answer HEAD and ranges;
//! manifests negotiate `Accept`; tags page with `Link`; every refusal has
//! its status and OCI error body; callers need their bearer token;
//! containerd's `?ns=` routes by registry host, and a real containerd
//! pulls through a `hosts.toml`; the HTTP metrics count.

use crate::common;

use std::collections::BTreeMap;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};

use common::InProcess;
use common::config::{ServiceConfig, Upstream};
use common::containerd::Containerd;
use common::content::sha256_digest;
use common::counting_proxy::CountingProxy;
use common::distribution::{Distribution, Image};
use common::metrics::Scrape;
use common::rpc::{blob_request, read_blob};
use common::skopeo::{copy_to_layout, layout_files};
use common::slow::SlowBlobServer;

/// A registry with an image, and the service with the mirror on.
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

    /// With `extra` appended to the config (e.g. `[[callers]]`).
    async fn start_with(extra: &str) -> Setup {
        let registry = Distribution::start();
        let image = registry.push_image("team/app", "v1").await;
        let toml = format!(
            "{}\n{extra}",
            ServiceConfig::with(Upstream::new("reg", &registry.url()))
                .top("mirror_listen = \"127.0.0.1:0\"")
                .toml()
        );
        let service = InProcess::start(&toml).await;
        Setup {
            registry,
            service,
            image,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client"),
        }
    }

    fn mirror(&self) -> String {
        self.service
            .mirror_addr
            .expect("the mirror is on")
            .to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.mirror())
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        self.send(reqwest::Method::GET, path, headers).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.http.request(method, self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("a mirror request")
    }

    async fn blob_requests(&self) -> f64 {
        Scrape::of(self.service.metrics_addr.expect("metrics on"))
            .await
            .value(
                "oci_upstream_registry_requests_total",
                &[("operation", "blob")],
            )
    }
}

/// A response's body as JSON.
async fn json(response: reqwest::Response) -> Result<serde_json::Value, String> {
    let bytes = response.bytes().await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&bytes)))
}

/// The OCI error code of an error response, after checking its envelope.
async fn error_code(response: reqwest::Response) -> String {
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: serde_json::Value = json(response).await.expect("an error body in JSON");
    assert_eq!(content_type.as_deref(), Some("application/json"), "{body}");
    let error = &body["errors"][0];
    assert!(error["message"].is_string(), "{body}");
    error["code"].as_str().expect("an error code").to_owned()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

/// The layout skopeo writes for `source`, or its error.
fn copied(source: &str, extra: &[&str]) -> BTreeMap<String, Vec<u8>> {
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = dir.path().join("layout");
    copy_to_layout(source, &layout, "copied", extra)
        .unwrap_or_else(|e| panic!("skopeo copy {source}: {e}"));
    layout_files(&layout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_through_the_mirror_exactly_what_it_copies_from_the_registry() {
    let s = Setup::start().await;
    let index = s.registry.push_index("team/multi", "v1").await;
    let (mirror, registry) = (s.mirror(), s.registry.host());
    for (name, extra) in [
        ("team/app:v1", &[][..]),
        (
            "team/multi:v1",
            &["--override-os", "linux", "--override-arch", "arm64"][..],
        ),
    ] {
        let direct = tokio::task::block_in_place(|| copied(&format!("{registry}/{name}"), extra));
        let through = tokio::task::block_in_place(|| copied(&format!("{mirror}/{name}"), extra));
        assert!(
            direct.len() > 3,
            "{name}: the copy has blobs: {:?}",
            direct.keys()
        );
        assert_eq!(
            through.keys().collect::<Vec<_>>(),
            direct.keys().collect::<Vec<_>>(),
            "{name}: the same files"
        );
        for (path, bytes) in &direct {
            assert!(through[path] == *bytes, "{name}: {path} differs");
        }
    }
    // The arm64 copy is that platform's manifest, not the index.
    let arm64 = format!(
        "blobs/sha256/{}",
        index.arm64.manifest.digest.trim_start_matches("sha256:")
    );
    let through = tokio::task::block_in_place(|| {
        copied(
            &format!("{mirror}/team/multi:v1"),
            &["--override-os", "linux", "--override-arch", "arm64"],
        )
    });
    assert!(through.contains_key(&arm64), "{:?}", through.keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_and_grpc_share_one_cache_both_ways() {
    let s = Setup::start().await;
    let (first, second) = (&s.image.layers[0], &s.image.config);
    // gRPC first, then the mirror: no upstream request.
    let mut client = s.service.client().await;
    read_blob(&mut client, blob_request("team/app", &first.digest))
        .await
        .assert_bytes(&first.data, "gRPC");
    let before = s.blob_requests().await;
    let response = s
        .get(&format!("/v2/team/app/blobs/{}", first.digest), &[])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap(), first.data);
    assert_eq!(s.blob_requests().await, before, "the mirror read the cache");
    // The mirror first, then gRPC.
    let response = s
        .get(&format!("/v2/team/app/blobs/{}", second.digest), &[])
        .await;
    assert_eq!(response.bytes().await.unwrap(), second.data);
    let before = s.blob_requests().await;
    let read = read_blob(&mut client, blob_request("team/app", &second.digest)).await;
    read.assert_bytes(&second.data, "gRPC after the mirror");
    assert!(read.ok().source.as_ref().unwrap().cache_hit);
    assert_eq!(s.blob_requests().await, before, "gRPC read the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_answer_head_and_ranges() {
    let s = Setup::start().await;
    let layer = &s.image.layers[0];
    let size = layer.data.len();
    let path = format!("/v2/team/app/blobs/{}", layer.digest);

    let head = s.send(reqwest::Method::HEAD, &path, &[]).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(header(head.headers(), "content-length"), size.to_string());
    assert_eq!(
        header(head.headers(), "docker-content-digest"),
        layer.digest
    );
    assert_eq!(header(head.headers(), "accept-ranges"), "bytes");

    let full = s.get(&path, &[]).await;
    assert_eq!(header(full.headers(), "content-length"), size.to_string());
    assert_eq!(
        header(full.headers(), "docker-content-digest"),
        layer.digest
    );
    let body = full.bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), layer.digest);

    for (range, start, end) in [
        ("bytes=10-19", 10, 20),
        ("bytes=100-", 100, size),
        ("bytes=-7", size - 7, size),
        (&format!("bytes=5-{}", size * 2), 5, size),
    ] {
        let response = s.get(&path, &[("range", range)]).await;
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(response.headers(), "content-range"),
            format!("bytes {start}-{}/{size}", end - 1),
            "{range}"
        );
        assert_eq!(
            header(response.headers(), "content-length"),
            (end - start).to_string()
        );
        assert_eq!(
            response.bytes().await.unwrap(),
            layer.data[start..end],
            "{range}"
        );
    }
    for range in [
        format!("bytes={size}-"),
        format!("bytes={}-", size + 10),
        "bytes=-0".to_owned(),
    ] {
        let response = s.get(&path, &[("range", &range)]).await;
        assert_eq!(
            response.status(),
            StatusCode::RANGE_NOT_SATISFIABLE,
            "{range}"
        );
        assert_eq!(
            header(response.headers(), "content-range"),
            format!("bytes */{size}")
        );
    }
    // Several ranges: the whole blob, as HTTP allows.
    let response = s.get(&path, &[("range", "bytes=0-1,4-5")]).await;
    assert_eq!(response.status(), StatusCode::OK);

    let unknown = format!("/v2/team/app/blobs/{}", sha256_digest(b"no such blob"));
    let head = s.send(reqwest::Method::HEAD, &unknown, &[]).await;
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    let response = s.get(&unknown, &[]).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "BLOB_UNKNOWN");
    let response = s.get("/v2/team/app/blobs/sha256:nothex", &[]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "DIGEST_INVALID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_negotiate_and_refuse_with_the_spec_codes() {
    let s = Setup::start().await;
    let manifest = &s.image.manifest;
    // skopeo's way: one Accept line per type.
    let accept = [
        (
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        ),
        ("accept", manifest.media_type.as_str()),
    ];
    for reference in ["v1", manifest.digest.as_str()] {
        let path = format!("/v2/team/app/manifests/{reference}");
        let response = s.get(&path, &accept).await;
        assert_eq!(response.status(), StatusCode::OK, "{reference}");
        assert_eq!(
            header(response.headers(), "content-type"),
            manifest.media_type
        );
        assert_eq!(
            header(response.headers(), "docker-content-digest"),
            manifest.digest
        );
        assert_eq!(
            header(response.headers(), "content-length"),
            manifest.bytes.len().to_string()
        );
        assert_eq!(response.bytes().await.unwrap(), manifest.bytes);
        let head = s.send(reqwest::Method::HEAD, &path, &accept).await;
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(
            header(head.headers(), "docker-content-digest"),
            manifest.digest
        );
        assert_eq!(
            header(head.headers(), "content-length"),
            manifest.bytes.len().to_string()
        );
    }
    for (path, status, code) in [
        (
            "/v2/team/app/manifests/v404",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/team/app/manifests/-bad-tag",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/team/app/manifests/sha256:0a",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/Team/App/manifests/v1",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
    ] {
        let response = s.get(path, &[]).await;
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(error_code(response).await, code, "{path}");
    }
    let head = s
        .send(reqwest::Method::HEAD, "/v2/team/app/manifests/v404", &[])
        .await;
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_page_with_link_and_n_zero_is_empty() {
    let s = Setup::start().await;
    for tag in ["v2", "v3", "v4"] {
        s.registry.tag("team/app", tag, &s.image.manifest).await;
    }
    let response = s.get("/v2/team/app/tags/list", &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("link").is_none());
    let body: serde_json::Value = json(response).await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"name": "team/app", "tags": ["v1", "v2", "v3", "v4"]})
    );

    let mut pages = Vec::new();
    let mut path = "/v2/team/app/tags/list?n=3".to_owned();
    loop {
        let response = s.get(&path, &[]).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let next = response
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned());
        let body: serde_json::Value = json(response).await.unwrap();
        pages.push(body["tags"].clone());
        let Some(link) = next else { break };
        assert!(link.ends_with("; rel=\"next\""), "{link}");
        path = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_owned();
        assert!(pages.len() < 5, "paging does not end");
    }
    assert_eq!(
        pages,
        [
            serde_json::json!(["v1", "v2", "v3"]),
            serde_json::json!(["v4"])
        ]
    );

    let response = s.get("/v2/team/app/tags/list?n=2&last=v2", &[]).await;
    let body: serde_json::Value = json(response).await.unwrap();
    assert_eq!(
        body["tags"],
        serde_json::json!(["v3", "v4"]),
        "last is exclusive"
    );
    let response = s.get("/v2/team/app/tags/list?n=0", &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("link").is_none());
    let body: serde_json::Value = json(response).await.unwrap();
    assert_eq!(body["tags"], serde_json::json!([]));
    // The spec's code table has nothing for a bad `n`: a plain-text 400.
    let response = s.get("/v2/team/app/tags/list?n=many", &[]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(header(response.headers(), "content-type").starts_with("text/plain"));
    let response = s.get("/v2/team/none/tags/list", &[]).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "NAME_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delete_and_other_paths_are_refused_with_their_status() {
    let s = Setup::start().await;
    let base = s.get("/v2/", &[]).await;
    assert_eq!(base.status(), StatusCode::OK);
    assert_eq!(
        header(base.headers(), "docker-distribution-api-version"),
        "registry/2.0"
    );
    let manifest = format!("/v2/team/app/manifests/{}", s.image.manifest.digest);
    let blob = format!("/v2/team/app/blobs/{}", s.image.config.digest);
    for (method, path) in [
        (reqwest::Method::POST, "/v2/team/app/blobs/uploads/"),
        (reqwest::Method::PUT, "/v2/team/app/manifests/v9"),
        (reqwest::Method::DELETE, manifest.as_str()),
        (reqwest::Method::DELETE, blob.as_str()),
        (reqwest::Method::PATCH, "/v2/team/app/blobs/uploads/1234"),
        (reqwest::Method::GET, "/v2/team/app/blobs/uploads/1234"),
    ] {
        let response = s.send(method.clone(), path, &[]).await;
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(error_code(response).await, "UNSUPPORTED", "{method} {path}");
    }
    let response = s.get("/v2/_catalog", &[]).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "UNSUPPORTED");
    // Nothing was pushed or deleted.
    let response = s.get(&manifest, &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_present_their_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "secret-a\n").unwrap();
    let callers = format!(
        "[[callers]]\nname = \"a\"\ntoken_file = \"{}\"\nrepositories = [\"team/**\"]\n",
        token.display()
    );
    let s = Setup::start_with(&callers).await;
    s.registry.push_image("private/app", "v1").await;
    let bearer = [("authorization", "Bearer secret-a")];
    for (headers, status) in [
        (&[][..], StatusCode::UNAUTHORIZED),
        (
            &[("authorization", "Bearer wrong")][..],
            StatusCode::UNAUTHORIZED,
        ),
        (&bearer[..], StatusCode::OK),
    ] {
        let response = s.get("/v2/", headers).await;
        assert_eq!(response.status(), status, "{headers:?}");
        if status == StatusCode::UNAUTHORIZED {
            assert!(
                header(response.headers(), "www-authenticate").starts_with("Bearer "),
                "a Bearer challenge"
            );
            assert_eq!(error_code(response).await, "UNAUTHORIZED");
        }
    }
    let response = s.get("/v2/team/app/manifests/v1", &bearer).await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = s.get("/v2/private/app/manifests/v1", &bearer).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(response).await, "DENIED");
    let response = s.get("/v2/team/app/manifests/v1", &[]).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_ns_routes_by_registry_host_and_metrics_count() {
    let s = Setup::start().await;
    let ns = s.registry.host();
    let encoded = ns.replace(':', "%3A");
    let path = format!("/v2/team/app/manifests/v1?ns={encoded}");
    let response = s.get(&path, &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(response.headers(), "oci-namespace"), ns);
    assert_eq!(response.bytes().await.unwrap(), s.image.manifest.bytes);
    let response = s
        .get("/v2/team/app/manifests/v1?ns=registry.example.com", &[])
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "NAME_UNKNOWN");

    let scrape = Scrape::of(s.service.metrics_addr.unwrap()).await;
    let count = |route: &str, code: &str| {
        scrape.value(
            "oci_upstream_http_requests_total",
            &[("route", route), ("method", "GET"), ("code", code)],
        )
    };
    assert_eq!(count("manifest", "200"), 1.0);
    assert_eq!(count("manifest", "404"), 1.0);
    assert!(
        scrape.value(
            "oci_upstream_http_request_duration_seconds_count",
            &[("route", "manifest")]
        ) >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_fetches_every_blob_through_the_mirror_never_from_the_origin() {
    // The origin containerd is told about is a counting proxy in front of
    // the registry: any request containerd sent there itself would show.
    let registry = Distribution::start();
    let image = registry.push_image("team/app", "v1").await;
    let index = registry.push_index("team/multi", "v1").await;
    let origin = CountingProxy::start(&registry.url()).await;
    let origin_host = origin.addr.to_string();
    let toml = ServiceConfig::with(
        Upstream::new("reg", &registry.url()).line(&format!("namespaces = [\"{origin_host}\"]")),
    )
    .top("mirror_listen = \"127.0.0.1:0\"")
    .toml();
    let service = InProcess::start(&toml).await;
    let mirror = service.mirror_addr.expect("the mirror is on").to_string();
    let containerd = tokio::task::block_in_place(Containerd::start);
    let hosts = containerd.hosts_dir(&origin_host, &mirror);
    for (reference, images) in [
        ("team/app:v1", vec![&image]),
        ("team/multi:v1", vec![&index.amd64, &index.arm64]),
    ] {
        let reference = format!("{origin_host}/{reference}");
        tokio::task::block_in_place(|| containerd.fetch(&reference, &hosts)).unwrap_or_else(|e| {
            panic!("ctr content fetch {reference}: {e}\n{}", containerd.logs())
        });
        let content = containerd.content();
        for image in images {
            for digest in image
                .blobs()
                .map(|b| &b.digest)
                .chain([&image.manifest.digest])
            {
                assert!(
                    content.contains(digest),
                    "{reference}: {digest} not in {content:?}"
                );
            }
        }
    }
    assert!(containerd.content().contains(&index.index.digest));
    assert_eq!(
        origin.requests(),
        Vec::<(String, String)>::new(),
        "containerd went to the origin itself"
    );
    let scrape = Scrape::of(service.metrics_addr.unwrap()).await;
    let blobs = scrape.value(
        "oci_upstream_http_requests_total",
        &[("route", "blob"), ("code", "200")],
    );
    assert!(blobs >= 8.0, "the blobs went through the mirror ({blobs})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_shares_the_concurrency_limit_with_grpc() {
    let data = bytes::Bytes::from(common::content::pseudo_random_bytes(0x11, 8 * 1024 * 1024));
    let slow = SlowBlobServer::start(
        "team/big",
        data,
        64 * 1024,
        std::time::Duration::from_millis(20),
    );
    let toml = ServiceConfig::with(Upstream::new("slow", &slow.url()))
        .top("mirror_listen = \"127.0.0.1:0\"")
        .top("max_concurrent_rpcs = 1")
        .toml();
    let service = InProcess::start(&toml).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = |path: &str| format!("http://{}{path}", service.mirror_addr.unwrap());
    // One blob streaming (its body unread) holds the one permit.
    let streaming = http
        .get(url(&format!("/v2/team/big/blobs/{}", slow.digest())))
        .send()
        .await
        .unwrap();
    assert_eq!(streaming.status(), StatusCode::OK);
    let refused = http.get(url("/v2/")).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().get("retry-after").is_some());
    assert_eq!(error_code(refused).await, "TOOMANYREQUESTS");
    let mut client = service.client().await;
    let status = client
        .head_blob(common::rpc::head_blob_request("team/big", &slow.digest()))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::ResourceExhausted,
        "gRPC shares the limit"
    );
    // The client leaves: the permit is back.
    drop(streaming);
    let base = url("/v2/");
    let answered = common::eventually_async(|| async {
        http.get(&base).send().await.unwrap().status() == StatusCode::OK
    })
    .await;
    assert!(answered, "the permit came back when the client left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_blob_body_is_cut_after_the_idle_timeout() {
    let registry = Distribution::start();
    let blob = registry
        .push_big_blob("big/blob", 0x1D1E, 64 * 1024 * 1024)
        .await;
    let toml = ServiceConfig::with(Upstream::new("reg", &registry.url()))
        .top("mirror_listen = \"127.0.0.1:0\"")
        .top("max_concurrent_rpcs = 1")
        .top("stream_idle_timeout = \"1s\"")
        .toml();
    let service = InProcess::start(&toml).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = |path: &str| format!("http://{}{path}", service.mirror_addr.unwrap());
    let unread = http
        .get(url(&format!("/v2/big/blob/blobs/{}", blob.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(unread.status(), StatusCode::OK);
    // The client keeps the response and reads nothing: once the buffers
    // are full, the idle rule releases the one permit.
    let base = url("/v2/");
    let answered = common::eventually_async(|| async {
        http.get(&base).send().await.unwrap().status() == StatusCode::OK
    })
    .await;
    assert!(answered, "the permit of an unread body came back");
    let body = unread.bytes().await;
    assert!(
        body.as_ref().map_or(true, |b| (b.len() as u64) < blob.size),
        "the body was cut short of its Content-Length"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_fails_its_digest_is_cut_short_and_never_served_whole() {
    let fake = common::fake::FakeRegistry::start().await;
    // Bytes that do not hash to the digest asked for, with a true length.
    let good = common::content::pseudo_random_bytes(0xBAD, 600 * 1024);
    let digest = sha256_digest(&good);
    let mut bad = good.clone();
    bad[599 * 1024] ^= 0xff;
    fake.on(
        &format!("/v2/team/app/blobs/{digest}"),
        common::fake::Reply::ok(bad),
    );
    let toml = ServiceConfig::with(Upstream::new("fake", &fake.url()).retries(0))
        .top("mirror_listen = \"127.0.0.1:0\"")
        .toml();
    let service = InProcess::start(&toml).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!(
        "http://{}/v2/team/app/blobs/{digest}",
        service.mirror_addr.unwrap()
    );
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(response.headers(), "content-length"),
        good.len().to_string()
    );
    match response.bytes().await {
        Ok(body) => assert!(
            body.len() < good.len(),
            "a complete-looking body of a blob that failed its digest"
        ),
        Err(e) => assert!(e.is_body() || e.is_decode(), "{e}"),
    }
    // Not kept either: the next request fails at once, nothing is served.
    let again = http.get(&url).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(again).await, "UNAVAILABLE");
}
