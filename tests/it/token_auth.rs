//! Docker token authentication against a real Distribution registry with
//! `auth: token`, whose realm is a test token issuer that signs RS256 JWTs
//! (see `common::token_issuer`; the tests that read the service's log run
//! the binary, the others the service in process): anonymous and credentialed token requests,
//! wrong credentials, the token cache (one token request for many fetches,
//! a new one after expiry), the requested scope and service, the OAuth2
//! refresh-token form for a Docker config `identitytoken`, and that no
//! password or token ever reaches the service's logs.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::config::{ServiceConfig, Upstream};
use common::distribution::{Distribution, Image};
use common::rpc::{Client, fetch_blob_bytes, fetch_manifest, fetch_tags};
use common::token_issuer::{IssuerSettings, SERVICE, TokenIssuer};
use common::{InProcess, Spawned};
use tonic::Code;

const REPO: &str = "team/app";
const USER: &str = "alice";
const PASSWORD: &str = "Tr0ub4dor-and-3";

/// The service config: one upstream `reg` for `registry`, with `auth`
/// (none: anonymous).
fn config(registry: &Distribution, auth: Option<&Path>) -> String {
    let upstream = Upstream::new("reg", &registry.url());
    let upstream = match auth {
        Some(password_file) => upstream.auth_basic_file(USER, password_file),
        None => upstream,
    };
    ServiceConfig::with(upstream).toml()
}

/// Writes `password` (and a newline) to a password file in `dir`.
fn password_file(dir: &tempfile::TempDir, password: &str) -> PathBuf {
    let path = dir.path().join("password");
    std::fs::write(&path, format!("{password}\n")).expect("write the password file");
    path
}

/// Fetches `image`'s manifest (by `tag`), every blob, and checks the bytes.
async fn fetch_image(client: &mut Client, tag: &str, image: &Image) {
    let resp = fetch_manifest(client, REPO, tag)
        .await
        .unwrap_or_else(|s| panic!("FetchManifest {REPO}:{tag}: {s:?}"));
    assert_eq!(
        resp.manifest, image.manifest.bytes,
        "manifest bytes of {tag}"
    );
    assert_eq!(
        resp.digest, image.manifest.digest,
        "manifest digest of {tag}"
    );
    for blob in image.blobs() {
        let got = fetch_blob_bytes(client, REPO, &blob.digest)
            .await
            .unwrap_or_else(|s| panic!("FetchBlob {}: {s:?}", blob.digest));
        assert_eq!(got, blob.data.as_ref(), "blob {}", blob.digest);
    }
}

/// An issuer with `settings`, a registry trusting it, and `team/app:v1`.
async fn setup(settings: IssuerSettings) -> (TokenIssuer, Distribution, Image) {
    let issuer = TokenIssuer::start(settings).await;
    let registry = Distribution::start_token(&issuer);
    let image = registry.push_image(REPO, "v1").await;
    (issuer, registry, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_token_flow_fetches_manifest_blob_and_tags() {
    let (issuer, registry, image) = setup(IssuerSettings::default()).await;
    let service = InProcess::start(&config(&registry, None)).await;
    let mut client = service.client().await;

    fetch_image(&mut client, "v1", &image).await;
    assert_eq!(
        fetch_tags(&mut client, REPO).await.expect("FetchTags").tags,
        ["v1"]
    );

    let requests = issuer.get_requests();
    assert!(
        !requests.is_empty(),
        "the registry only accepts tokens, yet the issuer saw no request"
    );
    for r in &requests {
        assert_eq!(
            r.authorization, None,
            "anonymous configuration sent credentials to the issuer: {r:?}"
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_request_names_the_service_and_the_repository_pull_scope() {
    let (issuer, registry, image) = setup(IssuerSettings::default()).await;
    let service = InProcess::start(&config(&registry, None)).await;
    let mut client = service.client().await;
    fetch_image(&mut client, "v1", &image).await;

    let requests = issuer.requests();
    assert!(!requests.is_empty(), "no token request");
    for r in &requests {
        assert_eq!(r.method, "GET", "{r:?}");
        assert_eq!(r.params_all("service"), [SERVICE], "service of {r:?}");
        assert_eq!(
            r.params_all("scope"),
            [format!("repository:{REPO}:pull")],
            "scope of {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credentials_are_sent_to_an_issuer_that_requires_them() {
    let (issuer, registry, image) = setup(IssuerSettings::private().user(USER, PASSWORD)).await;
    let secrets = tempfile::tempdir().expect("temp dir for the password");
    let file = password_file(&secrets, PASSWORD);
    let service = InProcess::start(&config(&registry, Some(&file))).await;
    let mut client = service.client().await;

    fetch_image(&mut client, "v1", &image).await;
    assert_eq!(
        fetch_tags(&mut client, REPO).await.expect("FetchTags").tags,
        ["v1"]
    );

    let requests = issuer.get_requests();
    assert!(!requests.is_empty(), "no token request");
    for r in &requests {
        assert_eq!(r.basic_user.as_deref(), Some(USER), "{r:?}");
        assert_eq!(r.status, 200, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_at_the_issuer_is_permission_denied() {
    let (issuer, registry, image) = setup(IssuerSettings::private().user(USER, PASSWORD)).await;
    let secrets = tempfile::tempdir().expect("temp dir for the password");
    let wrong = "not-the-Passw0rd";
    let file = password_file(&secrets, wrong);
    // A process: its log is checked for the password.
    let service = Spawned::start(&config(&registry, Some(&file)));
    let mut client = service.client().await;

    let results = [
        (
            "FetchManifest",
            fetch_manifest(&mut client, REPO, "v1").await.map(drop),
        ),
        (
            "FetchBlob",
            fetch_blob_bytes(&mut client, REPO, &image.layers[0].digest)
                .await
                .map(drop),
        ),
        ("FetchTags", fetch_tags(&mut client, REPO).await.map(drop)),
    ];
    for (what, result) in results {
        match result {
            Err(s) if s.code() == Code::PermissionDenied => assert!(
                !s.message().contains(wrong),
                "{what}: the message leaks the password: {}",
                s.message()
            ),
            Err(s) => panic!(
                "{what}: expected PERMISSION_DENIED, got {:?}: {}",
                s.code(),
                s.message()
            ),
            Ok(()) => panic!("{what}: expected PERMISSION_DENIED, got OK"),
        }
    }
    let requests = issuer.get_requests();
    assert!(
        requests
            .iter()
            .any(|r| r.basic_user.as_deref() == Some(USER) && r.status == 401),
        "the issuer never refused alice's credentials: {requests:?}"
    );
    assert!(
        !service.logs().contains(wrong),
        "the service logged the password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_fetches_of_one_repository_use_one_token() {
    let (issuer, registry, v1) = setup(IssuerSettings::default()).await;
    let mut images = vec![("v1".to_string(), v1)];
    for tag in ["v2", "v3", "v4"] {
        images.push((tag.to_string(), registry.push_image(REPO, tag).await));
    }
    let service = InProcess::start(&config(&registry, None)).await;
    let mut client = service.client().await;

    // Distinct tags and blobs, so each fetch goes upstream (no cache hits):
    // 4 manifests + 12 blobs + 1 tag list.
    for (tag, image) in &images {
        fetch_image(&mut client, tag, image).await;
    }
    let mut listed = fetch_tags(&mut client, REPO).await.expect("FetchTags").tags;
    listed.sort();
    assert_eq!(listed, ["v1", "v2", "v3", "v4"]);

    assert_eq!(
        issuer.requests().len(),
        1,
        "17 upstream fetches of one repository (token valid 300 s) should need one token request: {:?}",
        issuer.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_fetches_share_one_token_request() {
    let (issuer, registry, v1) = setup(IssuerSettings::default()).await;
    let mut images = vec![("v1".to_string(), v1)];
    for tag in ["v2", "v3", "v4", "v5", "v6"] {
        images.push((tag.to_string(), registry.push_image(REPO, tag).await));
    }
    let service = InProcess::start(&config(&registry, None)).await;
    let client = service.client().await;

    let fetches = images.iter().map(|(tag, image)| {
        let mut client = client.clone();
        async move {
            let resp = fetch_manifest(&mut client, REPO, tag)
                .await
                .unwrap_or_else(|s| panic!("FetchManifest {tag}: {s:?}"));
            assert_eq!(resp.digest, image.manifest.digest, "{tag}");
        }
    });
    futures::future::join_all(fetches).await;

    assert_eq!(
        issuer.requests().len(),
        1,
        "6 concurrent first fetches of one repository should share one token request: {:?}",
        issuer.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_replaced_by_a_new_token_request() {
    // The registry accepts a token up to 60 s past `exp`, so only the
    // service's own expiry tracking can cause the second token request.
    let lifetime = Duration::from_secs(2);
    let (issuer, registry, v1) =
        setup(IssuerSettings::default().expires_in(lifetime.as_secs())).await;
    let v2 = registry.push_image(REPO, "v2").await;
    let service = InProcess::start(&config(&registry, None)).await;
    let mut client = service.client().await;

    fetch_image(&mut client, "v1", &v1).await;
    let before = issuer.requests().len();
    assert!(before >= 1, "no token request for the first fetch");

    // Wall-clock expiry is the behaviour under test; wait it out (bounded).
    tokio::time::sleep(lifetime + Duration::from_millis(500)).await;
    let resp = fetch_manifest(&mut client, REPO, "v2")
        .await
        .expect("FetchManifest after the token expired");
    assert_eq!(resp.digest, v2.manifest.digest);
    assert_eq!(
        issuer.requests().len(),
        before + 1,
        "a fetch after the token's expires_in should make exactly one new token request: {:?}",
        issuer.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lifetime_counts_from_issued_at() {
    // expires_in is 300 s, but the answer says the token was issued 297 s
    // ago: 3 s are left, so a fetch 4 s later needs a new token.
    let (issuer, registry, v1) = setup(IssuerSettings::default().issued_ago(297)).await;
    let v2 = registry.push_image(REPO, "v2").await;
    let service = InProcess::start(&config(&registry, None)).await;
    let mut client = service.client().await;

    fetch_image(&mut client, "v1", &v1).await;
    let before = issuer.requests().len();
    assert!(before >= 1, "no token request for the first fetch");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let resp = fetch_manifest(&mut client, REPO, "v2")
        .await
        .expect("FetchManifest after the token's issued_at + expires_in");
    assert_eq!(resp.digest, v2.manifest.digest);
    assert_eq!(
        issuer.requests().len(),
        before + 1,
        "the token should have expired 300 s after its issued_at: {:?}",
        issuer.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_token_lifetimes_are_clamped_not_fatal() {
    // 2^63 seconds, and a float too large for any clock: the service must
    // neither panic nor refuse the token; it keeps it for at most a day.
    for claimed in [
        serde_json::json!(9_223_372_036_854_775_808u64),
        serde_json::json!(1e300),
    ] {
        let (issuer, registry, image) =
            setup(IssuerSettings::default().claim_expires_in(claimed.clone())).await;
        let v2 = registry.push_image(REPO, "v2").await;
        let service = InProcess::start(&config(&registry, None)).await;
        let mut client = service.client().await;
        fetch_image(&mut client, "v1", &image).await;
        let after_first = issuer.requests().len();
        assert!(after_first >= 1, "{claimed}: no token request");
        // The token is cached (not dropped as unusable): fetching another
        // image of the same repository (same scope) asks for none.
        fetch_image(&mut client, "v2", &v2).await;
        assert_eq!(
            issuer.requests().len(),
            after_first,
            "{claimed}: the token should have been cached"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_config_identitytoken_uses_the_oauth2_refresh_token_form() {
    let refresh = "refresh-6f1c0d2a9b";
    let (issuer, registry, image) =
        setup(IssuerSettings::private().refresh_token(refresh, USER)).await;
    let secrets = tempfile::tempdir().expect("temp dir for the docker config");
    let file = secrets.path().join("config.json");
    std::fs::write(
        &file,
        serde_json::json!({"auths": {registry.host(): {"identitytoken": refresh}}}).to_string(),
    )
    .expect("write the docker config");
    // A process: its log is checked for the tokens.
    let service = Spawned::start(
        &ServiceConfig::with(Upstream::new("reg", &registry.url()).auth_docker_config(&file))
            .toml(),
    );
    let mut client = service.client().await;

    let result = fetch_manifest(&mut client, REPO, "v1").await;
    let posts = issuer.post_requests();
    let resp = result.unwrap_or_else(|s| {
        panic!(
            "FetchManifest with a refresh token: {:?}: {}; token requests seen: {:?}",
            s.code(),
            s.message(),
            issuer.requests()
        )
    });
    assert_eq!(resp.manifest, image.manifest.bytes);

    let post = posts
        .first()
        .unwrap_or_else(|| panic!("no POST /token; requests: {:?}", issuer.requests()));
    assert_eq!(post.param("grant_type"), Some("refresh_token"), "{post:?}");
    assert_eq!(post.param("refresh_token"), Some(refresh), "{post:?}");
    assert_eq!(post.param("service"), Some(SERVICE), "{post:?}");
    assert_eq!(
        post.param("scope"),
        Some(format!("repository:{REPO}:pull").as_str()),
        "{post:?}"
    );
    assert!(
        post.param("client_id").is_some_and(|c| !c.is_empty()),
        "the OAuth2 form needs a client_id: {post:?}"
    );
    let logs = service.logs();
    assert!(
        !logs.contains(refresh),
        "the service logged the refresh token"
    );
    for token in issuer.issued_tokens() {
        assert!(!logs.contains(&token), "the service logged an access token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_or_token_appears_in_the_logs() {
    let (issuer, registry, image) = setup(IssuerSettings::private().user(USER, PASSWORD)).await;
    let v2 = registry.push_image(REPO, "v2").await;
    registry.push_image("team/other", "v1").await;
    let secrets = tempfile::tempdir().expect("temp dir for the password");
    // The harness runs the service with RUST_LOG=oci_upstream=debug.
    let file = password_file(&secrets, PASSWORD);
    // A process: its log is what this test reads.
    let service = Spawned::start(&config(&registry, Some(&file)));
    let mut client = service.client().await;

    // Successful authenticated fetches (password to the issuer, tokens to the
    // registry), then the paths that log errors: a repository the registry
    // does not have, and credentials the issuer refuses.
    fetch_image(&mut client, "v1", &image).await;
    fetch_image(&mut client, "v2", &v2).await;
    fetch_tags(&mut client, REPO).await.expect("FetchTags");
    let missing = fetch_manifest(&mut client, "team/missing", "v1").await;
    assert_eq!(
        missing.map(drop).map_err(|s| s.code()),
        Err(Code::NotFound),
        "a repository the registry does not have"
    );
    issuer.update(|s| s.users = vec![(USER.into(), "rotated-elsewhere".into())]);
    let refused = fetch_manifest(&mut client, "team/other", "v1").await;
    assert_eq!(
        refused.map(drop).map_err(|s| s.code()),
        Err(Code::PermissionDenied),
        "credentials the issuer no longer accepts"
    );

    let tokens = issuer.issued_tokens();
    assert!(!tokens.is_empty(), "the issuer handed out no token");
    let logs = service.logs();
    let basic_header =
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let mut leaks = Vec::new();
    if logs.contains(PASSWORD) {
        leaks.push("the password".to_string());
    }
    if logs.contains(&basic_header) {
        leaks.push("the Basic authorization value".to_string());
    }
    for (i, token) in tokens.iter().enumerate() {
        let signature = token.rsplit('.').next().unwrap_or_default();
        if logs.contains(token.as_str()) || logs.contains(signature) {
            leaks.push(format!("token #{i}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "the service logged {}:\n{logs}",
        leaks.join(", ")
    );
    println!("service log of the run:\n{logs}");
}
