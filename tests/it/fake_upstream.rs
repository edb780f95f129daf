//! Fault injection: each test scripts one or more in-process fake registries
//! (wrong bytes, lying headers, 5xx, redirects, auth challenges, hostile
//! tag-list links, oversized bodies) and checks the gRPC answers and what the
//! fakes received. The service runs in process, except where the test is
//! about its process environment.

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::config::{ServiceConfig, Upstream};
use common::content::{
    self, DOCKER_LIST, DOCKER_MANIFEST, Descriptor, OCI_INDEX, OCI_MANIFEST, index_json,
    pseudo_random_bytes, sha256_digest,
};
use common::fake::{FakeRegistry, Recorded, Reply};
use common::rpc::{
    BlobRead, Client, RPC_BOUND, blob_request, expect_err, head_manifest_request, manifest_request,
    read_blob_call, tags_request,
};
use common::{InProcess, Spawned};
use oci_upstream::pb::{FetchBlobRequest, FetchManifestRequest, Platform};
use serde_json::json;
use tonic::Code;

const REPO: &str = "team/app";
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Content and config

/// An OCI image manifest derived from `seed`.
fn image_manifest(seed: &str) -> Bytes {
    content::image_manifest(seed, 1)
}

/// A realistic image manifest of `media_type` (OCI or Docker v2).
fn image_manifest_of(media_type: &str, seed: &str) -> Bytes {
    content::image_manifest_of(media_type, seed, 1)
}

/// An OCI index over `children` (manifest bytes, architecture), all linux.
fn image_index(children: &[(&Bytes, &str)]) -> Bytes {
    let manifests: Vec<Descriptor> = children
        .iter()
        .map(|(body, arch)| Descriptor::of(OCI_MANIFEST, body).platform("linux", arch, None))
        .collect();
    index_json(OCI_INDEX, &manifests)
}

/// The upstream `name` for `fake` at `priority`.
fn upstream(name: &str, fake: &FakeRegistry, priority: u32) -> Upstream {
    Upstream::new(name, &fake.url()).priority(priority)
}

/// Few, quick retries, so that tests with failing upstreams stay fast.
fn quick(upstream: Upstream) -> Upstream {
    upstream
        .retries(1)
        .retry_max_delay(Duration::from_millis(50))
}

/// A config of `upstreams`, in order.
fn config(upstreams: impl IntoIterator<Item = Upstream>) -> ServiceConfig {
    upstreams
        .into_iter()
        .fold(ServiceConfig::new(), ServiceConfig::upstream)
}

// ---------------------------------------------------------------------------
// gRPC helpers

fn deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(RPC_BOUND);
    request
}

/// FetchBlob of `request` (with the deadline) to the end of its stream.
async fn fetch_blob(client: &mut Client, request: FetchBlobRequest) -> BlobRead {
    read_blob_call(client, deadline(request)).await
}

/// The media types listed by a request's `Accept` headers, parameters dropped.
fn accepted_types(request: &Recorded) -> Vec<String> {
    request
        .headers_all("accept")
        .iter()
        .flat_map(|value| value.split(','))
        .map(|item| item.split(';').next().unwrap_or("").trim().to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

fn manifest_path(reference: &str) -> String {
    format!("/v2/{REPO}/manifests/{reference}")
}

// ---------------------------------------------------------------------------
// Integrity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_by_digest_with_wrong_bytes_is_data_loss_when_alone() {
    let a = FakeRegistry::start().await;
    let good = image_manifest("good");
    let digest = sha256_digest(&good);
    a.on(
        &manifest_path(&digest),
        Reply::ok(image_manifest("evil"))
            .header("Content-Type", OCI_MANIFEST)
            .header("Docker-Content-Digest", &digest),
    );
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;

    for attempt in 1..=2 {
        let status = expect_err(
            client
                .fetch_manifest(deadline(manifest_request(REPO, &digest)))
                .await,
        );
        assert_eq!(
            status.code(),
            Code::DataLoss,
            "attempt {attempt}: {status:?}"
        );
    }
    assert!(
        a.count(&manifest_path(&digest)) >= 1,
        "upstream a was asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_by_digest_with_wrong_bytes_is_taken_from_the_next_upstream() {
    let a = FakeRegistry::start().await;
    let b = FakeRegistry::start().await;
    let good = image_manifest("good");
    let digest = b.put_manifest(REPO, None, OCI_MANIFEST, &good);
    a.on(
        &manifest_path(&digest),
        Reply::ok(image_manifest("evil"))
            .header("Content-Type", OCI_MANIFEST)
            .header("Docker-Content-Digest", &digest),
    );
    let config = config([upstream("a", &a, 10), upstream("b", &b, 20)]).toml();
    let service = InProcess::start(&config).await;
    let mut client = service.client().await;

    let response = client
        .fetch_manifest(deadline(manifest_request(REPO, &digest)))
        .await
        .expect("b serves the right bytes")
        .into_inner();
    assert_eq!(response.manifest, good);
    assert_eq!(response.digest, digest);
    assert_eq!(response.size, good.len() as i64);
    assert_eq!(response.source.expect("source is set").upstream, "b");
    assert!(
        a.count(&manifest_path(&digest)) >= 1,
        "a (priority 10) was asked first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_content_digest_disagreeing_with_the_bytes_is_data_loss_when_alone() {
    let a = FakeRegistry::start().await;
    let body = image_manifest("tagged");
    a.on(
        &manifest_path("v1"),
        Reply::ok(body)
            .header("Content-Type", OCI_MANIFEST)
            .header("Docker-Content-Digest", &sha256_digest(b"something else")),
    );
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;

    let status = expect_err(
        client
            .fetch_manifest(deadline(manifest_request(REPO, "v1")))
            .await,
    );
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_content_digest_disagreeing_with_the_bytes_moves_on_to_the_next_upstream() {
    let a = FakeRegistry::start().await;
    let b = FakeRegistry::start().await;
    let body = image_manifest("tagged");
    let digest = b.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &body);
    a.on(
        &manifest_path("v1"),
        Reply::ok(body.clone())
            .header("Content-Type", OCI_MANIFEST)
            .header("Docker-Content-Digest", &sha256_digest(b"something else")),
    );
    let config = config([upstream("a", &a, 10), upstream("b", &b, 20)]).toml();
    let service = InProcess::start(&config).await;
    let mut client = service.client().await;

    let response = client
        .fetch_manifest(deadline(manifest_request(REPO, "v1")))
        .await
        .expect("b serves consistent bytes")
        .into_inner();
    assert_eq!(response.manifest, body);
    assert_eq!(response.digest, digest);
    assert_eq!(response.source.expect("source is set").upstream, "b");
    assert!(
        a.count(&manifest_path("v1")) >= 1,
        "a (priority 10) was asked first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_with_wrong_bytes_ends_with_data_loss_before_the_last_bytes() {
    let a = FakeRegistry::start().await;
    let size = 5 * MIB / 2;
    let good = pseudo_random_bytes(1, size);
    let digest = sha256_digest(&good);
    let mut bad = good.clone();
    bad[size / 2] ^= 0xff;
    a.on(
        &format!("/v2/{REPO}/blobs/{digest}"),
        Reply::ok(bad)
            .header("Content-Type", "application/octet-stream")
            .header("Docker-Content-Digest", &digest),
    );
    // Control: another blob of the same size, intact.
    let intact = pseudo_random_bytes(2, size);
    let intact_digest = a.put_blob(REPO, &intact);
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;

    for attempt in 1..=2 {
        let outcome = fetch_blob(&mut client, blob_request(REPO, &digest)).await;
        let status = outcome
            .error()
            .unwrap_or_else(|| panic!("attempt {attempt}: the stream must not end OK"));
        assert_eq!(
            status.code(),
            Code::DataLoss,
            "attempt {attempt}: {status:?}"
        );
        assert!(
            outcome.data.len() < size,
            "attempt {attempt}: the final data must be held back: received {} of {size} bytes",
            outcome.data.len()
        );
    }

    let control = fetch_blob(&mut client, blob_request(REPO, &intact_digest)).await;
    assert!(
        control.end.is_ok(),
        "intact blob streams OK: {:?}",
        control.end
    );
    assert!(control.data == intact, "intact blob arrives whole");
    assert!(
        control.messages > 2,
        "several messages, got {}",
        control.messages
    );
    assert!(
        control.largest <= MIB,
        "at most 1 MiB per message, got {}",
        control.largest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_child_with_wrong_bytes_is_data_loss() {
    let a = FakeRegistry::start().await;
    let amd = image_manifest("amd64 child");
    let arm = image_manifest("arm64 child");
    let amd_digest = sha256_digest(&amd);
    let arm_digest = a.put_manifest(REPO, None, OCI_MANIFEST, &arm);
    a.put_manifest(
        REPO,
        Some("multi"),
        OCI_INDEX,
        &image_index(&[(&amd, "amd64"), (&arm, "arm64")]),
    );
    a.on(
        &manifest_path(&amd_digest),
        Reply::ok(image_manifest("evil"))
            .header("Content-Type", OCI_MANIFEST)
            .header("Docker-Content-Digest", &amd_digest),
    );
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;
    let for_platform = |architecture: &str| FetchManifestRequest {
        platform: Some(Platform {
            os: "linux".to_string(),
            architecture: architecture.to_string(),
            variant: String::new(),
        }),
        ..manifest_request(REPO, "multi")
    };

    let control = client
        .fetch_manifest(deadline(for_platform("arm64")))
        .await
        .expect("the arm64 child is intact")
        .into_inner();
    assert_eq!(control.digest, arm_digest);
    assert_eq!(control.manifest, arm);

    let status = expect_err(client.fetch_manifest(deadline(for_platform("amd64"))).await);
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
}

// ---------------------------------------------------------------------------
// Failover and the error model

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_move_on_to_the_next_upstream() {
    let a = FakeRegistry::start().await;
    let b = FakeRegistry::start().await;
    let v500 = image_manifest("five hundred");
    let v503 = image_manifest("five oh three");
    b.put_manifest(REPO, Some("v500"), OCI_MANIFEST, &v500);
    b.put_manifest(REPO, Some("v503"), OCI_MANIFEST, &v503);
    a.on(&manifest_path("v500"), Reply::status(500));
    a.on(&manifest_path("v503"), Reply::status(503));
    let config = config([quick(upstream("a", &a, 10)), upstream("b", &b, 20)]).toml();
    let service = InProcess::start(&config).await;
    let mut client = service.client().await;

    for (tag, body) in [("v500", &v500), ("v503", &v503)] {
        let response = client
            .fetch_manifest(deadline(manifest_request(REPO, tag)))
            .await
            .unwrap_or_else(|s| panic!("{tag}: b serves it, got {s:?}"))
            .into_inner();
        assert_eq!(&response.manifest, body, "{tag}");
        assert_eq!(
            response.source.expect("source is set").upstream,
            "b",
            "{tag}"
        );
        assert!(
            a.count(&manifest_path(tag)) >= 1,
            "{tag}: a was asked first"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_from_the_only_upstream_are_unavailable() {
    let a = FakeRegistry::start().await;
    a.on(&manifest_path("v500"), Reply::status(500));
    a.on(&manifest_path("v503"), Reply::status(503));
    let service = InProcess::start(&config([quick(upstream("a", &a, 10))]).toml()).await;
    let mut client = service.client().await;

    for tag in ["v500", "v503"] {
        let status = expect_err(
            client
                .fetch_manifest(deadline(manifest_request(REPO, tag)))
                .await,
        );
        assert_eq!(status.code(), Code::Unavailable, "{tag}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_on_the_same_upstream() {
    let a = FakeRegistry::start().await;
    let body = image_manifest("flaky");
    let digest = sha256_digest(&body);
    a.on_seq(
        &manifest_path("v1"),
        [
            Reply::status(503),
            Reply::ok(body.clone())
                .header("Content-Type", OCI_MANIFEST)
                .header("Docker-Content-Digest", &digest),
        ],
    );
    let service = InProcess::start(
        &config([upstream("a", &a, 10)
            .retries(2)
            .retry_max_delay(Duration::from_millis(50))])
        .toml(),
    )
    .await;
    let mut client = service.client().await;

    let response = client
        .fetch_manifest(deadline(manifest_request(REPO, "v1")))
        .await
        .expect("the retry succeeds")
        .into_inner();
    assert_eq!(response.manifest, body);
    assert_eq!(response.source.expect("source is set").upstream, "a");
    assert!(
        a.count(&manifest_path("v1")) >= 2,
        "a was asked again after its 503"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unavailable_and_one_not_found_is_unavailable() {
    for (first, second) in [(503, 404), (404, 503)] {
        let a = FakeRegistry::start().await;
        let b = FakeRegistry::start().await;
        for (fake, status) in [(&a, first), (&b, second)] {
            let reply = if status == 404 {
                Reply::not_found("MANIFEST_UNKNOWN")
            } else {
                Reply::status(status)
            };
            fake.on(&manifest_path("v1"), reply.clone());
            fake.on(&manifest_path("v2"), reply);
        }
        let config = config([quick(upstream("a", &a, 10)), quick(upstream("b", &b, 20))]).toml();
        let service = InProcess::start(&config).await;
        let mut client = service.client().await;

        let status = expect_err(
            client
                .fetch_manifest(deadline(manifest_request(REPO, "v1")))
                .await,
        );
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "a={first} b={second} fetch: {status:?}"
        );
        let status = expect_err(
            client
                .head_manifest(deadline(head_manifest_request(REPO, "v2")))
                .await,
        );
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "a={first} b={second} head: {status:?}"
        );
        assert!(a.count(&manifest_path("v1")) >= 1 && b.count(&manifest_path("v1")) >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_not_found_is_not_found_and_head_says_it_does_not_exist() {
    let a = FakeRegistry::start().await;
    let b = FakeRegistry::start().await;
    for fake in [&a, &b] {
        fake.on(&manifest_path("v1"), Reply::not_found("MANIFEST_UNKNOWN"));
        fake.on(&manifest_path("v2"), Reply::not_found("MANIFEST_UNKNOWN"));
    }
    let config = config([upstream("a", &a, 10), upstream("b", &b, 20)]).toml();
    let service = InProcess::start(&config).await;
    let mut client = service.client().await;

    let status = expect_err(
        client
            .fetch_manifest(deadline(manifest_request(REPO, "v1")))
            .await,
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(a.count(&manifest_path("v1")) >= 1 && b.count(&manifest_path("v1")) >= 1);

    let head = client
        .head_manifest(deadline(head_manifest_request(REPO, "v2")))
        .await
        .expect("HeadManifest answers OK when nothing has it")
        .into_inner();
    assert!(!head.exists, "{head:?}");
    assert!(head.digest.is_empty(), "{head:?}");
    assert!(
        b.count(&manifest_path("v2")) >= 1,
        "every upstream was asked"
    );
}

// ---------------------------------------------------------------------------
// Redirects and authentication

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_blob_arrives_without_credentials_sent_to_the_other_host() {
    let registry = FakeRegistry::start().await;
    let cdn = FakeRegistry::start().await;
    let blob = pseudo_random_bytes(7, 3 * MIB / 2);
    let digest = sha256_digest(&blob);
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("svc:s3cret")
    );
    registry.require_authorization(
        &expected,
        Reply::not_found("UNAUTHORIZED")
            .with_status(401)
            .header("WWW-Authenticate", "Basic realm=\"x\""),
    );
    let cdn_path = format!("/cdn/{}", digest.replace(':', "/"));
    registry.on(
        &format!("/v2/{REPO}/blobs/{digest}"),
        Reply::redirect(307, &format!("{}{cdn_path}?sig=abc", cdn.url())),
    );
    cdn.on(
        &cdn_path,
        Reply::ok(blob.clone()).header("Content-Type", "application/octet-stream"),
    );
    let secrets = tempfile::tempdir().expect("temp dir for the password");
    let password_file = secrets.path().join("password");
    std::fs::write(&password_file, "s3cret\n").expect("write password file");
    let service = InProcess::start(
        &config([upstream("a", &registry, 10).auth_basic_file("svc", &password_file)]).toml(),
    )
    .await;
    let mut client = service.client().await;

    let outcome = fetch_blob(&mut client, blob_request(REPO, &digest)).await;
    assert!(outcome.end.is_ok(), "blob fetch failed: {:?}", outcome.end);
    assert_eq!(outcome.data.len(), blob.len());
    assert!(outcome.data == blob, "the blob arrives intact");
    assert_eq!(
        outcome.info.expect("first message has info").size,
        blob.len() as i64
    );

    let blob_requests = registry.requests_to(&format!("/v2/{REPO}/blobs/{digest}"));
    assert!(
        blob_requests
            .iter()
            .any(|r| r.header("authorization") == Some(&expected)),
        "the registry got the basic credentials: {blob_requests:?}"
    );
    let cdn_requests = cdn.requests();
    assert!(!cdn_requests.is_empty(), "the redirect was followed");
    for request in &cdn_requests {
        assert_eq!(
            request.header("authorization"),
            None,
            "credentials leaked to the redirect target: {request:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_challenge_fetches_one_token_for_the_scope() {
    let registry = FakeRegistry::start().await;
    let tokens = FakeRegistry::start().await;
    let challenge = format!(
        "Bearer realm=\"{}/token\",service=\"fake\",scope=\"repository:{REPO}:pull\"",
        tokens.url()
    );
    registry.require_authorization(
        "Bearer T",
        Reply::not_found("UNAUTHORIZED")
            .with_status(401)
            .header("WWW-Authenticate", &challenge),
    );
    tokens.on(
        "/token",
        Reply::json(&json!({"token": "T", "expires_in": 300})),
    );
    let v1 = image_manifest("one");
    let v2 = image_manifest("two");
    registry.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &v1);
    registry.put_manifest(REPO, Some("v2"), OCI_MANIFEST, &v2);
    let blob = pseudo_random_bytes(3, 4096);
    let blob_digest = registry.put_blob(REPO, &blob);
    let service = InProcess::start(&config([upstream("a", &registry, 10)]).toml()).await;
    let mut client = service.client().await;

    for (tag, body) in [("v1", &v1), ("v2", &v2)] {
        let response = client
            .fetch_manifest(deadline(manifest_request(REPO, tag)))
            .await
            .unwrap_or_else(|s| panic!("{tag}: {s:?}"))
            .into_inner();
        assert_eq!(&response.manifest, body, "{tag}");
    }
    let outcome = fetch_blob(&mut client, blob_request(REPO, &blob_digest)).await;
    assert!(outcome.end.is_ok(), "blob fetch failed: {:?}", outcome.end);
    assert!(outcome.data == blob, "the blob arrives intact");

    let token_requests = tokens.requests_to("/token");
    assert_eq!(
        token_requests.len(),
        1,
        "one token for the scope: {token_requests:?}"
    );
    let token_request = &token_requests[0];
    assert_eq!(token_request.query("service").as_deref(), Some("fake"));
    assert!(
        token_request
            .query_all("scope")
            .iter()
            .any(|s| s == &format!("repository:{REPO}:pull")),
        "scope in {}",
        token_request.uri
    );
    for path in [
        manifest_path("v2"),
        format!("/v2/{REPO}/blobs/{blob_digest}"),
    ] {
        assert!(
            registry
                .requests_to(&path)
                .iter()
                .any(|r| r.header("authorization") == Some("Bearer T")),
            "{path} was fetched with the token"
        );
    }
}

// ---------------------------------------------------------------------------
// What the service sends

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_requests_carry_accept_and_protocol_headers() {
    let a = FakeRegistry::start().await;
    a.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &image_manifest("one"));
    let docker = image_manifest_of(DOCKER_MANIFEST, "docker");
    a.put_manifest(REPO, Some("v2"), DOCKER_MANIFEST, &docker);
    let blob = pseudo_random_bytes(9, 1000);
    let blob_digest = a.put_blob(REPO, &blob);
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;

    client
        .fetch_manifest(deadline(manifest_request(REPO, "v1")))
        .await
        .expect("manifest v1 is served");
    let requests = a.requests_to(&manifest_path("v1"));
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(
            request.header("docker-distribution-api-version"),
            Some("registry/2.0"),
            "{request:?}"
        );
        assert_eq!(
            request.header("accept-encoding"),
            Some("identity"),
            "{request:?}"
        );
        let accepted = accepted_types(request);
        for media_type in [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST] {
            assert!(
                accepted.iter().any(|t| t == media_type),
                "Accept lacks {media_type}: {accepted:?}"
            );
        }
    }

    let response = client
        .fetch_manifest(deadline(FetchManifestRequest {
            accept: vec![DOCKER_MANIFEST.to_string()],
            ..manifest_request(REPO, "v2")
        }))
        .await
        .expect("manifest v2 is served")
        .into_inner();
    assert_eq!(response.manifest, docker);
    let requests = a.requests_to(&manifest_path("v2"));
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(
            accepted_types(request),
            vec![DOCKER_MANIFEST.to_string()],
            "{request:?}"
        );
    }

    let outcome = fetch_blob(&mut client, blob_request(REPO, &blob_digest)).await;
    assert!(outcome.end.is_ok(), "blob fetch failed: {:?}", outcome.end);
    for request in a.requests_to(&format!("/v2/{REPO}/blobs/{blob_digest}")) {
        assert_eq!(
            request.header("accept-encoding"),
            Some("identity"),
            "{request:?}"
        );
        assert_eq!(
            request.header("docker-distribution-api-version"),
            Some("registry/2.0"),
            "{request:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_environment_variables_are_ignored() {
    let a = FakeRegistry::start().await;
    let proxy = FakeRegistry::start().await;
    let body = image_manifest("direct");
    a.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &body);
    let proxy_url = proxy.url();
    let mut env: Vec<(&str, &str)> = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .into_iter()
    .map(|k| (k, proxy_url.as_str()))
    .collect();
    env.extend([("NO_PROXY", ""), ("no_proxy", "")]);
    // A process: the proxy variables are in its environment.
    let service = Spawned::start_with_env(&config([upstream("a", &a, 10)]).toml(), &env);
    let mut client = service.client().await;

    let response = client
        .fetch_manifest(deadline(manifest_request(REPO, "v1")))
        .await
        .expect("fetched directly")
        .into_inner();
    assert_eq!(response.manifest, body);
    assert!(
        a.count(&manifest_path("v1")) >= 1,
        "the upstream was reached directly"
    );
    assert!(
        proxy.requests().is_empty(),
        "the proxy was used: {:?}",
        proxy.requests()
    );
}

// ---------------------------------------------------------------------------
// Defensive handling of hostile or broken upstreams

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_over_the_size_cap_is_refused() {
    let a = FakeRegistry::start().await;
    let small = image_manifest("small");
    assert!(small.len() < 1024, "control manifest fits the cap");
    a.put_manifest(REPO, Some("small"), OCI_MANIFEST, &small);
    let mut big: serde_json::Value =
        serde_json::from_slice(&image_manifest("big")).expect("valid JSON");
    big["annotations"] = json!({"padding": "x".repeat(4096)});
    let big = Bytes::from(serde_json::to_vec(&big).expect("JSON serializes"));
    let big_digest = sha256_digest(&big);
    a.put_manifest(REPO, Some("big"), OCI_MANIFEST, &big);
    // The same bytes without a Content-Length, so only counting can catch them.
    a.on(
        &manifest_path("big-chunked"),
        Reply::status(200)
            .header("Content-Type", OCI_MANIFEST)
            .header("Docker-Content-Digest", &big_digest)
            .chunks(big.chunks(512).map(Bytes::copy_from_slice).collect()),
    );
    let config = config([upstream("a", &a, 10)])
        .top("max_manifest_size = \"1KiB\"")
        .toml();
    let service = InProcess::start(&config).await;
    let mut client = service.client().await;

    let control = client
        .fetch_manifest(deadline(manifest_request(REPO, "small")))
        .await
        .expect("a manifest under the cap is served")
        .into_inner();
    assert_eq!(control.manifest, small);
    for tag in ["big", "big-chunked"] {
        let status = expect_err(
            client
                .fetch_manifest(deadline(manifest_request(REPO, tag)))
                .await,
        );
        assert_ne!(status.code(), Code::Ok, "{tag}");
        assert!(
            !status.message().contains("padding"),
            "{tag}: no manifest bytes leak: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_with_both_manifests_and_layers_is_refused() {
    let a = FakeRegistry::start().await;
    a.put_manifest(REPO, Some("plain"), OCI_MANIFEST, &image_manifest("plain"));
    let child = image_manifest("child");
    let mut confused: serde_json::Value =
        serde_json::from_slice(&image_manifest("confused")).expect("valid JSON");
    confused["manifests"] = json!([{
        "mediaType": OCI_MANIFEST,
        "digest": sha256_digest(&child),
        "size": child.len(),
        "platform": {"os": "linux", "architecture": "amd64"},
    }]);
    let confused = serde_json::to_vec(&confused).expect("JSON serializes");
    a.put_manifest(REPO, Some("confused"), OCI_MANIFEST, &confused);
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;

    client
        .fetch_manifest(deadline(manifest_request(REPO, "plain")))
        .await
        .expect("control: a plain manifest is served");
    let status = expect_err(
        client
            .fetch_manifest(deadline(manifest_request(REPO, "confused")))
            .await,
    );
    assert_ne!(status.code(), Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_body_served_as_an_image_manifest_is_refused() {
    let a = FakeRegistry::start().await;
    let child = image_manifest("child");
    a.put_manifest(REPO, None, OCI_MANIFEST, &child);
    let index = image_index(&[(&child, "amd64")]);
    a.put_manifest(REPO, Some("honest"), OCI_INDEX, &index);
    let digest = sha256_digest(&index);
    a.on(
        &manifest_path("mislabelled"),
        Reply::ok(index.clone())
            .header("Content-Type", OCI_MANIFEST)
            .header("Docker-Content-Digest", &digest),
    );
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;

    let control = client
        .fetch_manifest(deadline(manifest_request(REPO, "honest")))
        .await
        .expect("control: the index with its own media type is served")
        .into_inner();
    assert_eq!(control.media_type, OCI_INDEX);
    let status = expect_err(
        client
            .fetch_manifest(deadline(manifest_request(REPO, "mislabelled")))
            .await,
    );
    assert_ne!(status.code(), Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_link_to_another_host_is_not_followed() {
    let a = FakeRegistry::start().await;
    let elsewhere = FakeRegistry::start().await;
    elsewhere.on(
        &format!("/v2/{REPO}/tags/list"),
        Reply::json(&json!({"name": REPO, "tags": ["c", "d"]})),
    );
    a.on(
        &format!("/v2/{REPO}/tags/list"),
        Reply::json(&json!({"name": REPO, "tags": ["a", "b"]})).header(
            "Link",
            &format!(
                "<{}/v2/{REPO}/tags/list?n=2&last=b>; rel=\"next\"",
                elsewhere.url()
            ),
        ),
    );
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;

    let result = client.fetch_tags(deadline(tags_request(REPO))).await;
    assert!(
        a.count(&format!("/v2/{REPO}/tags/list")) >= 1,
        "a was asked"
    );
    assert!(
        elsewhere.requests().is_empty(),
        "the foreign Link was followed: {:?}",
        elsewhere.requests()
    );
    if let Ok(response) = result {
        let tags = response.into_inner().tags;
        assert!(
            tags.iter().all(|t| t == "a" || t == "b"),
            "only the first page's tags: {tags:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_pages_on_the_same_host_are_followed_and_sorted() {
    let a = FakeRegistry::start().await;
    let path = format!("/v2/{REPO}/tags/list");
    a.on(
        &path,
        Reply::json(&json!({"name": REPO, "tags": ["b", "a"]}))
            .header("Link", &format!("<{path}?n=2&last=b>; rel=\"next\"")),
    );
    a.on(
        &format!("{path}?last=b"),
        Reply::json(&json!({"name": REPO, "tags": ["d", "c"]})),
    );
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;

    let response = client
        .fetch_tags(deadline(tags_request(REPO)))
        .await
        .expect("tags are listed")
        .into_inner();
    assert_eq!(response.name, REPO);
    assert_eq!(response.tags, ["a", "b", "c", "d"]);
    assert_eq!(response.next_last, "");
    assert_eq!(response.source.expect("source is set").upstream, "a");
    assert!(
        a.requests_to(&path)
            .iter()
            .any(|r| r.query("last").as_deref() == Some("b")),
        "the second page was requested"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_error_body_on_a_404_is_not_read_to_the_end() {
    let a = FakeRegistry::start().await;
    let present = image_manifest("present");
    a.put_manifest(REPO, Some("present"), OCI_MANIFEST, &present);
    // 64 MiB of error body, streamed without a Content-Length.
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut chunks = vec![Bytes::from_static(
        br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":""#,
    )];
    chunks.extend(std::iter::repeat_n(chunk, 1024));
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    a.on(
        &manifest_path("missing"),
        Reply::status(404)
            .header("Content-Type", "application/json")
            .chunks(chunks),
    );
    let service = InProcess::start(&config([upstream("a", &a, 10)]).toml()).await;
    let mut client = service.client().await;

    let status = expect_err(
        client
            .fetch_manifest(deadline(manifest_request(REPO, "missing")))
            .await,
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().len() < 64 * 1024,
        "the error message is bounded"
    );
    let streamed = a.streamed_bytes();
    assert!(
        streamed < total,
        "the whole {total}-byte error body was read ({streamed} bytes)"
    );
    // Still healthy afterwards.
    let response = client
        .fetch_manifest(deadline(manifest_request(REPO, "present")))
        .await
        .expect("the service still serves")
        .into_inner();
    assert_eq!(response.manifest, present);
}
