//! Caller access (`[[callers]]`) against a real Distribution registry:
//! UNAUTHENTICATED without a caller's token, PERMISSION_DENIED outside its
//! globs before anything reaches the cache or the upstream (a cached private
//! layer is not served by digest to a caller that may not read it), health
//! and reflection open, AdminService for `admin` callers only, a rotated
//! token file taking effect within 5 s, and callers named by the SAN of a
//! client certificate under mTLS.

use crate::common;

use std::time::{Duration, Instant};

use common::InProcess;
use common::config::{ServiceConfig, Upstream};
use common::distribution::Distribution;
use common::metrics::Scrape;
use common::rpc::{Client, blob_request, manifest_request};
use common::tls::TestCa;
use oci_upstream::pb::admin_service_client::AdminServiceClient;
use oci_upstream::pb::{FetchManifestRequest, GetCacheStatsRequest};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// `message` with `authorization: Bearer <token>`.
fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ASCII token"),
    );
    request
}

/// FetchManifest as `token` (none: no authorization metadata).
async fn fetch(
    client: &mut Client,
    token: Option<&str>,
    repository: &str,
    reference: &str,
) -> Result<(), tonic::Status> {
    let message: FetchManifestRequest = manifest_request(repository, reference);
    let request = match token {
        Some(token) => bearer(message, token),
        None => tonic::Request::new(message),
    };
    common::rpc::bounded(client.fetch_manifest(request))
        .await
        .map(drop)
}

/// Upstream requests the service has made so far (from its metrics).
async fn upstream_requests(service: &InProcess) -> f64 {
    let scrape = Scrape::of(service.metrics_addr.expect("metrics on")).await;
    scrape.value("oci_upstream_registry_requests_total", &[])
}

struct Setup {
    registry: Distribution,
    service: InProcess,
    tokens: tempfile::TempDir,
}

/// A registry with `team-a/x:v1` and `private/x:v1`, and a service with
/// three callers: `a` (team-a/** only), `ops` (everything, admin) and
/// `reader` (everything but private/**).
async fn setup() -> Setup {
    let registry = Distribution::start();
    registry.push_image("team-a/x", "v1").await;
    registry.push_image("private/x", "v1").await;
    let tokens = tempfile::tempdir().expect("temp dir");
    let file = |name: &str, token: &str| {
        let path = tokens.path().join(name);
        std::fs::write(&path, format!("{token}\n")).expect("write a token");
        path.display().to_string()
    };
    let callers = format!(
        "[[callers]]\nname = \"a\"\ntoken_file = \"{}\"\nrepositories = [\"team-a/**\"]\n\n\
         [[callers]]\nname = \"ops\"\ntoken_file = \"{}\"\nadmin = true\n\n\
         [[callers]]\nname = \"reader\"\ntoken_file = \"{}\"\nexclude = [\"private/**\"]\n",
        file("a", "token-a"),
        file("ops", "token-ops"),
        file("reader", "token-reader"),
    );
    let toml = format!(
        "{}\n{callers}",
        ServiceConfig::with(Upstream::new("reg", &registry.url())).toml()
    );
    let service = InProcess::start(&toml).await;
    Setup {
        registry,
        service,
        tokens,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_need_a_known_token_and_read_only_their_repositories() {
    let s = setup().await;
    let mut client = s.service.client().await;
    for (token, why) in [(None, "no token"), (Some("token-b"), "an unknown token")] {
        let refused = fetch(&mut client, token, "team-a/x", "v1")
            .await
            .expect_err(why);
        assert_eq!(refused.code(), Code::Unauthenticated, "{why}: {refused:?}");
    }
    // A malformed request from nobody is refused for who sent it, not why.
    let nobody = fetch(&mut client, None, "Team A", "v1")
        .await
        .expect_err("no token");
    assert_eq!(nobody.code(), Code::Unauthenticated);

    fetch(&mut client, Some("token-a"), "team-a/x", "v1")
        .await
        .expect("team-a/x is a's");
    let asked = upstream_requests(&s.service).await;
    let denied = fetch(&mut client, Some("token-a"), "private/x", "v1")
        .await
        .expect_err("private/x is not a's");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("`a`"), "{}", denied.message());
    assert_eq!(
        upstream_requests(&s.service).await,
        asked,
        "a refused call reaches no upstream"
    );

    // Health and reflection answer without a token.
    let mut health = HealthClient::new(s.service.channel().await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is open");
    let listed = common::grpcurl::ok(&["-plaintext", &s.service.target(), "list"]).await;
    assert!(
        listed.contains("oci.upstream.v1.UpstreamService"),
        "{listed}"
    );
    drop(s.registry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_private_layer_is_not_served_by_digest_to_other_callers() {
    let s = setup().await;
    let layer = s.registry.push_image("private/y", "v1").await.layers[0].clone();
    let mut client = s.service.client().await;
    // ops reads it, so the layer is in the shared cache.
    let read = read_blob_as(&mut client, "token-ops", "private/y", &layer.digest).await;
    read.assert_bytes(&layer.data, "the private layer");
    let asked = upstream_requests(&s.service).await;
    for token in ["token-a", "token-reader"] {
        let mut request = bearer(blob_request("private/y", &layer.digest), token);
        request.set_timeout(Duration::from_secs(30));
        let refused = client.fetch_blob(request).await.expect_err("not theirs");
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{token}: {refused:?}"
        );
    }
    assert_eq!(upstream_requests(&s.service).await, asked);
}

async fn read_blob_as(
    client: &mut Client,
    token: &str,
    repository: &str,
    digest: &str,
) -> common::rpc::BlobRead {
    let request = bearer(blob_request(repository, digest), token);
    common::rpc::read_blob_call(client, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_callers_use_the_admin_service() {
    let s = setup().await;
    let admin = AdminServiceClient::new(s.service.channel().await);
    let call = |token: Option<&str>| {
        let mut admin = admin.clone();
        let request = match token {
            Some(t) => bearer(GetCacheStatsRequest {}, t),
            None => tonic::Request::new(GetCacheStatsRequest {}),
        };
        async move { admin.get_cache_stats(request).await }
    };
    assert_eq!(
        call(None).await.expect_err("nobody").code(),
        Code::Unauthenticated
    );
    assert_eq!(
        call(Some("token-a")).await.expect_err("not admin").code(),
        Code::PermissionDenied
    );
    call(Some("token-ops")).await.expect("ops is admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_takes_effect_within_five_seconds() {
    let s = setup().await;
    let mut client = s.service.client().await;
    fetch(&mut client, Some("token-a"), "team-a/x", "v1")
        .await
        .expect("the first token");
    // Replaced as a Secret volume would: a new file renamed over the old.
    let next = s.tokens.path().join("a.next");
    std::fs::write(&next, "token-a2\n").expect("write the new token");
    std::fs::rename(&next, s.tokens.path().join("a")).expect("rotate");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if fetch(&mut client, Some("token-a2"), "team-a/x", "v1")
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "the new token is not accepted within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = fetch(&mut client, Some("token-a"), "team-a/x", "v1")
        .await
        .expect_err("the old token is gone");
    assert_eq!(old.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_mtls_a_client_certificate_san_names_the_caller() {
    let registry = Distribution::start();
    registry.push_image("ci/app", "v1").await;
    registry.push_image("team-a/x", "v1").await;
    let ca = TestCa::new();
    let server = ca.server_cert("server");
    let builder = ca.client_cert("builder", "spiffe://cluster.local/ns/ci/sa/builder");
    let stranger = ca.client_cert("stranger", "spiffe://cluster.local/ns/ci/sa/other");
    let path = |p: std::path::PathBuf| p.display().to_string();
    let toml = format!(
        "{}\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n\n\
         [[callers]]\nname = \"builder\"\ncertificate_san = \"spiffe://cluster.local/ns/ci/sa/builder\"\n\
         repositories = [\"ci/**\"]\n",
        ServiceConfig::with(Upstream::new("reg", &registry.url())).toml(),
        path(server.cert.clone()),
        path(server.key.clone()),
        path(ca.ca_file()),
    );
    let service = InProcess::start(&toml).await;
    let channel = |who: &common::tls::Issued| {
        let identity = who.identity();
        let ca_pem = ca.ca_pem();
        let service = &service;
        async move {
            service
                .tls_channel(&ca_pem, Some(identity))
                .await
                .expect("a TLS channel")
        }
    };
    let mut client = Client::new(channel(&builder).await);
    fetch(&mut client, None, "ci/app", "v1")
        .await
        .expect("the builder's certificate names it");
    let outside = fetch(&mut client, None, "team-a/x", "v1")
        .await
        .expect_err("team-a is not the builder's");
    assert_eq!(outside.code(), Code::PermissionDenied);
    let mut other = Client::new(channel(&stranger).await);
    let unknown = fetch(&mut other, None, "ci/app", "v1")
        .await
        .expect_err("a certificate of no caller");
    assert_eq!(unknown.code(), Code::Unauthenticated);
}
