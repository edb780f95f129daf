//! Authentication policy end to end: Docker config credentials rotated while
//! the service runs (real registry, htpasswd), the `WWW-Authenticate` parser's
//! corner cases, the token-realm policy (which realms the service may call:
//! a refused realm gets no request at all and the call fails), redirects from
//! a token endpoint, and that a blob redirect to another host carries no
//! `Authorization`. Fakes are small in-process axum servers on 127.0.0.1 that
//! record what they receive; hosts that are not local (`registry.example.com`,
//! `169.254.169.254`, `10.0.0.1`) are reached through the upstream's `proxy`,
//! a recording fake that answers for every host, so "no request" is observable.

use crate::common;

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::config::{ServiceConfig, Upstream};
use common::content::{
    Descriptor, OCI_CONFIG, OCI_MANIFEST, manifest_json, random_blob, sha256_digest,
};
use common::distribution::Distribution;
use common::recording::{RecordingServer, Seen, redirect, reply, unauthorized, with_header};
use common::rpc::{fetch_blob_bytes, fetch_manifest};
use common::tls::TestCa;
use common::{InProcess, Spawned};
use oci_upstream::pb::FetchManifestResponse;
use tonic::{Code, Status};

const REPO: &str = "team/app";
/// The token the fake registries accept.
const GOOD_TOKEN: &str = "tok-good-5b0e";
/// A public-looking upstream host, reached through the recording proxy.
const PUBLIC_REGISTRY: &str = "registry.example.com";

fn token_reply() -> Response {
    let body = serde_json::json!({"token": GOOD_TOKEN, "expires_in": 300}).to_string();
    let mut resp = with_header(reply(200), header::CONTENT_TYPE, "application/json");
    *resp.body_mut() = Body::from(body);
    resp
}

/// `team/app:v1`: a manifest and one blob, served by the fake registries.
#[derive(Clone)]
struct Content {
    manifest: Bytes,
    manifest_digest: String,
    blob: Bytes,
    blob_digest: String,
}

fn content() -> Content {
    let blob = random_blob(0xA0, 5000);
    let blob_digest = sha256_digest(&blob);
    let manifest = manifest_json(OCI_MANIFEST, &Descriptor::of(OCI_CONFIG, &blob), &[]);
    Content {
        manifest_digest: sha256_digest(&manifest),
        manifest,
        blob,
        blob_digest,
    }
}

impl Content {
    /// The answer for a registry path, once authorized.
    fn serve(&self, path: &str) -> Response {
        if path == format!("/v2/{REPO}/manifests/v1")
            || path == format!("/v2/{REPO}/manifests/{}", self.manifest_digest)
        {
            let mut resp = with_header(reply(200), header::CONTENT_TYPE, OCI_MANIFEST);
            resp = with_header(
                resp,
                "docker-content-digest".parse().expect("name"),
                &self.manifest_digest,
            );
            *resp.body_mut() = Body::from(self.manifest.clone());
            resp
        } else if path == format!("/v2/{REPO}/blobs/{}", self.blob_digest) {
            self.blob_body()
        } else if path == "/v2/" {
            reply(200)
        } else {
            let body = r#"{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}"#;
            let mut resp = with_header(reply(404), header::CONTENT_TYPE, "application/json");
            *resp.body_mut() = Body::from(body);
            resp
        }
    }

    fn blob_body(&self) -> Response {
        let mut resp = with_header(reply(200), header::CONTENT_TYPE, "application/octet-stream");
        resp = with_header(
            resp,
            "docker-content-digest".parse().expect("name"),
            &self.blob_digest,
        );
        *resp.body_mut() = Body::from(self.blob.clone());
        resp
    }
}

/// The one upstream `reg` at `url`, without retries.
fn upstream(url: &str) -> Upstream {
    Upstream::new("reg", url).retries(0)
}

/// The config with `upstream` as the only upstream.
fn config(upstream: Upstream) -> String {
    ServiceConfig::with(upstream).toml()
}

// ---------------------------------------------------------------------------
// Docker config credentials, rotated while the service runs.

/// Writes a Kubernetes-style Secret volume: `DIR/.dockerconfigjson` ->
/// `..data/.dockerconfigjson`, `..data` -> `..VERSION`; a rotation writes a
/// new version and swaps `..data` atomically, as the kubelet does.
fn write_secret_volume(dir: &std::path::Path, version: u32, registry: &str, auth: &str) {
    let versioned = dir.join(format!("..v{version}"));
    std::fs::create_dir(&versioned).expect("create the secret version dir");
    let config = serde_json::json!({"auths": {registry: {"auth": auth}}});
    std::fs::write(versioned.join(".dockerconfigjson"), config.to_string())
        .expect("write .dockerconfigjson");
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).expect("symlink ..data_tmp");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    let link = dir.join(".dockerconfigjson");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/.dockerconfigjson", &link)
            .expect("symlink .dockerconfigjson");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_config_credentials_are_picked_up_after_rotation_without_restart() {
    let (user, old, new) = ("ci-bot", "old-Pa55-1d9", "new-Pa55-7c2");
    let mut registry = Distribution::start_htpasswd(user, old);
    let v1 = registry.push_image(REPO, "v1").await;
    let v2 = registry.push_image(REPO, "v2").await;
    registry.push_image(REPO, "v3").await;

    let secret = tempfile::tempdir().expect("temp dir for the secret volume");
    let encode = |password: &str| BASE64.encode(format!("{user}:{password}"));
    write_secret_volume(secret.path(), 1, &registry.host(), &encode(old));
    // A process: its log is checked for the passwords below.
    let service = Spawned::start(&config(
        upstream(&registry.url()).auth_docker_config(&secret.path().join(".dockerconfigjson")),
    ));
    let mut client = service.client().await;
    let resp = fetch_manifest(&mut client, REPO, "v1")
        .await
        .expect("FetchManifest with the original credentials");
    assert_eq!(resp.digest, v1.manifest.digest);
    assert_eq!(
        fetch_blob_bytes(&mut client, REPO, &v1.layers[0].digest)
            .await
            .expect("FetchBlob"),
        v1.layers[0].data.as_ref()
    );

    // The registry now only accepts the new password (same port, same storage).
    registry.restart_htpasswd(user, new);
    let status = fetch_manifest(&mut client, REPO, "v3")
        .await
        .expect_err("the old password must no longer work");
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "old password after the registry rotated: {}",
        status.message()
    );

    // Rotate the mounted secret; the service must pick it up by itself.
    write_secret_volume(secret.path(), 2, &registry.host(), &encode(new));
    let deadline = Instant::now() + Duration::from_secs(5);
    let resp = loop {
        match fetch_manifest(&mut client, REPO, "v2").await {
            Ok(resp) => break resp,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!(
                "5 s after the secret rotated, FetchManifest still fails: {:?}: {}",
                s.code(),
                s.message()
            ),
        }
    };
    assert_eq!(resp.digest, v2.manifest.digest);
    assert_eq!(
        fetch_blob_bytes(&mut client, REPO, &v2.layers[0].digest)
            .await
            .expect("FetchBlob after rotation"),
        v2.layers[0].data.as_ref()
    );
    let logs = service.logs();
    assert!(
        !logs.contains(old) && !logs.contains(new),
        "the service logged a password"
    );
}

// ---------------------------------------------------------------------------
// Challenge parsing, end to end.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_challenge_among_several_lowercase_and_without_scope_is_followed() {
    let content = content();
    // Each case: the WWW-Authenticate header lines; `{realm}` is replaced.
    let cases: [&[&str]; 3] = [
        // Several challenges in one header, a comma inside a quoted value,
        // a lower-case scheme, no scope.
        &[r#"Basic realm="x, y", bearer realm="{realm}",service="s""#],
        // Separate header lines, upper-case scheme and parameter names.
        &[
            r#"Basic realm="registry""#,
            r#"BEARER Realm="{realm}", Service="s""#,
        ],
        // Bearer first, an unknown scheme after it, spaces around `=`.
        &[r#"Bearer realm = "{realm}" , service = "s", Negotiate"#],
    ];
    for challenges in cases {
        let c = content.clone();
        let what = format!("challenge {challenges:?}");
        let challenges: Vec<String> = challenges.iter().map(|s| s.to_string()).collect();
        let fake = RecordingServer::start(move |seen| {
            if seen.path == "/token" {
                return token_reply();
            }
            if seen.authorization.as_deref() == Some(&format!("Bearer {GOOD_TOKEN}")) {
                return c.serve(&seen.path);
            }
            let realm = format!("http://{}/token", seen.host);
            let lines: Vec<String> = challenges
                .iter()
                .map(|l| l.replace("{realm}", &realm))
                .collect();
            unauthorized(&lines.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await;
        let service = InProcess::start(&config(upstream(&fake.url()))).await;
        let mut client = service.client().await;

        let resp = fetch_manifest(&mut client, REPO, "v1")
            .await
            .unwrap_or_else(|s| panic!("{what}: FetchManifest: {:?}: {}", s.code(), s.message()));
        assert_eq!(resp.manifest, content.manifest, "{what}");
        let data = fetch_blob_bytes(&mut client, REPO, &content.blob_digest)
            .await
            .unwrap_or_else(|s| panic!("{what}: FetchBlob: {:?}: {}", s.code(), s.message()));
        assert_eq!(data, content.blob.as_ref(), "{what}");

        let tokens: Vec<Seen> = fake
            .seen()
            .into_iter()
            .filter(|s| s.path == "/token")
            .collect();
        assert!(!tokens.is_empty(), "{what}: no token request");
        for t in &tokens {
            assert_eq!(t.param("service").as_deref(), Some("s"), "{what}: {t:?}");
            assert_eq!(
                t.param("scope"),
                Some(format!("repository:{REPO}:pull")),
                "{what}: the scope the challenge omitted must be the repository's: {t:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Realm policy.

/// A registry: serves [`content`] to requests bearing [`GOOD_TOKEN`] and
/// answers every other one with a Bearer challenge naming `realm`.
fn bearer_registry(realm: String) -> impl Fn(&Seen) -> Response + Send + Sync + 'static {
    let content = content();
    move |seen| {
        if seen.authorization.as_deref() == Some(&format!("Bearer {GOOD_TOKEN}")) {
            return content.serve(&seen.path);
        }
        unauthorized(&[&format!(r#"Bearer realm="{realm}",service="reg""#)])
    }
}

/// A registry answering for `registry_host` through the recording proxy (or
/// directly): 401 with a Bearer challenge naming `realm` until it sees
/// [`GOOD_TOKEN`]; every other host it is asked for acts as a token endpoint
/// that hands out [`GOOD_TOKEN`] to anyone, so a service ignoring the realm
/// policy would succeed.
fn registry_or_token(
    registry_host: String,
    realm: String,
) -> impl Fn(&Seen) -> Response + Send + Sync + 'static {
    let registry = bearer_registry(realm);
    move |seen| {
        if seen.host != registry_host {
            return token_reply();
        }
        registry(seen)
    }
}

/// Runs FetchManifest through a recording proxy for an upstream at
/// `upstream_host` (`None`: the proxy's own `127.0.0.1:PORT`) whose
/// challenge names `realm`. Returns the proxy and the result.
async fn through_proxy(
    upstream_host: Option<&str>,
    realm: &str,
    extra: &str,
) -> (RecordingServer, Result<FetchManifestResponse, Status>) {
    let proxy = RecordingServer::start(|_| reply(500)).await;
    let host = upstream_host.map_or_else(|| proxy.addr.to_string(), str::to_string);
    proxy.set(registry_or_token(host.clone(), realm.to_string()));
    let mut up = upstream(&format!("http://{host}")).line(&format!("proxy = \"{}\"", proxy.url()));
    if !extra.is_empty() {
        up = up.line(extra);
    }
    let service = InProcess::start(&config(up)).await;
    let mut client = service.client().await;
    let result = fetch_manifest(&mut client, REPO, "v1").await;
    (proxy, result)
}

/// Asserts the call failed and the proxy saw no request for `refused`.
fn assert_refused(
    proxy: &RecordingServer,
    result: Result<FetchManifestResponse, Status>,
    refused: &str,
    what: &str,
) -> Status {
    let reached = proxy.seen_for(refused);
    let status = match result {
        Ok(_) => panic!(
            "{what}: the fetch succeeded, so the realm `{refused}` was used; requests: {:?}",
            proxy.seen()
        ),
        Err(status) => status,
    };
    assert!(
        reached.is_empty(),
        "{what}: the refused realm host `{refused}` received requests: {reached:?}"
    );
    assert!(
        !proxy.seen().is_empty(),
        "{what}: the upstream itself was never asked; nothing was tested"
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realm_on_the_same_host_at_another_port_is_used() {
    let content = content();
    let token = RecordingServer::start(|_| token_reply()).await;
    let realm = format!("{}/token", token.url());
    let registry = RecordingServer::start(bearer_registry(realm)).await;
    let service = InProcess::start(&config(upstream(&registry.url()))).await;
    let mut client = service.client().await;
    let resp = fetch_manifest(&mut client, REPO, "v1")
        .await
        .expect("a realm on the upstream's own host (another port) is allowed");
    assert_eq!(resp.manifest, content.manifest);
    assert_eq!(token.seen().len(), 1, "{:?}", token.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realm_on_the_upstreams_registrable_domain_is_used() {
    // The positive control for the proxy-based cases below.
    let (proxy, result) =
        through_proxy(Some(PUBLIC_REGISTRY), "http://auth.example.com/token", "").await;
    let resp = result.unwrap_or_else(|s| {
        panic!(
            "realm auth.example.com for registry.example.com: {:?}: {}; proxy saw {:?}",
            s.code(),
            s.message(),
            proxy.seen()
        )
    });
    assert_eq!(resp.manifest, content().manifest);
    assert_eq!(proxy.seen_for("auth.example.com").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realm_on_another_registrable_domain_is_refused() {
    let (proxy, result) =
        through_proxy(Some(PUBLIC_REGISTRY), "http://auth.example.net/token", "").await;
    let status = assert_refused(&proxy, result, "auth.example.net", "another domain");
    assert!(
        status.message().contains("auth.example.net"),
        "the error should name the refused realm: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_local_metadata_realm_is_refused() {
    let realm = "http://169.254.169.254/latest/api/token";
    for (upstream, what) in [
        (Some(PUBLIC_REGISTRY), "public upstream"),
        (None, "loopback upstream"),
    ] {
        let (proxy, result) = through_proxy(upstream, realm, "").await;
        let status = assert_refused(&proxy, result, "169.254.169.254", what);
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "{what}: {}",
            status.message()
        );
        assert!(
            status.message().contains("169.254.169.254"),
            "{what}: the error should name the refused realm: {}",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_realm_for_a_public_upstream_is_refused() {
    // A real listener on the realm's address: it must not even be connected to.
    let target = RecordingServer::start(|_| token_reply()).await;
    let realm = format!("{}/token", target.url());
    let (proxy, result) = through_proxy(Some(PUBLIC_REGISTRY), &realm, "").await;
    assert_refused(&proxy, result, &target.addr.to_string(), "loopback realm");
    assert_eq!(
        target.connections(),
        0,
        "the loopback realm was connected to"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_realm_on_another_host_for_a_loopback_upstream_is_refused() {
    let (proxy, result) = through_proxy(None, "http://10.0.0.1/token", "").await;
    let status = assert_refused(&proxy, result, "10.0.0.1", "10.0.0.1 realm");
    assert!(
        status.message().contains("10.0.0.1"),
        "the error should name the refused realm: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_redirect_to_another_domain_is_refused() {
    let proxy = RecordingServer::start(|_| reply(500)).await;
    let registry = registry_or_token(
        PUBLIC_REGISTRY.to_string(),
        "http://auth.example.com/token".to_string(),
    );
    proxy.set(move |seen| {
        if seen.host == "auth.example.com" {
            redirect(&format!(
                "http://collector.example.net/token?{}",
                seen.query
            ))
        } else {
            registry(seen)
        }
    });
    let secrets = tempfile::tempdir().expect("temp dir for the password");
    let password = secrets.path().join("password");
    std::fs::write(&password, "redirect-Pa55").expect("write the password file");
    let service = InProcess::start(&config(
        upstream(&format!("http://{PUBLIC_REGISTRY}"))
            .line(&format!("proxy = \"{}\"", proxy.url()))
            .auth_basic_file("u", &password),
    ))
    .await;
    let mut client = service.client().await;
    let result = fetch_manifest(&mut client, REPO, "v1").await;
    assert!(
        !proxy.seen_for("auth.example.com").is_empty(),
        "the allowed realm was never asked: {:?}",
        proxy.seen()
    );
    assert_refused(&proxy, result, "collector.example.net", "token redirect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_redirect_from_127_0_0_1_to_localhost_is_refused() {
    // The policy compares hosts as written: for an upstream on 127.0.0.1, a
    // realm on `localhost` is another host, even though both are loopback.
    let target = RecordingServer::start(|_| token_reply()).await;
    let location = format!("http://localhost:{}/token", target.addr.port());
    let token = RecordingServer::start(move |_| redirect(&location)).await;
    let realm = format!("{}/token", token.url());
    let registry = RecordingServer::start(bearer_registry(realm)).await;
    let service = InProcess::start(&config(upstream(&registry.url()))).await;
    let mut client = service.client().await;
    let result = fetch_manifest(&mut client, REPO, "v1").await;
    assert!(!token.seen().is_empty(), "the realm itself was never asked");
    assert_eq!(
        target.connections(),
        0,
        "the redirect to localhost was followed; result: {result:?}"
    );
    assert!(result.is_err(), "the fetch succeeded through the redirect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realm_on_localhost_for_a_127_0_0_1_upstream_is_refused() {
    // What the service does with `localhost` vs `127.0.0.1` as a realm
    // directly (the same check the redirect test relies on).
    let target = RecordingServer::start(|_| token_reply()).await;
    let realm = format!("http://localhost:{}/token", target.addr.port());
    let registry = RecordingServer::start(bearer_registry(realm)).await;
    let service = InProcess::start(&config(upstream(&registry.url()))).await;
    let mut client = service.client().await;
    let result = fetch_manifest(&mut client, REPO, "v1").await;
    assert_eq!(
        target.connections(),
        0,
        "the localhost realm was used: {result:?}"
    );
    assert!(result.is_err());
}

// ---------------------------------------------------------------------------
// An https upstream (trusted through `ca_file`) and the scheme of its realm.

/// A registry that answers `/token` itself, serves [`content`] for
/// [`GOOD_TOKEN`], and otherwise challenges with `realm`.
fn tokens_and_content(realm: String) -> impl Fn(&Seen) -> Response + Send + Sync + 'static {
    let registry = bearer_registry(realm);
    move |seen| {
        if seen.path == "/token" {
            return token_reply();
        }
        registry(seen)
    }
}

fn ca_file_line(ca: &TestCa) -> String {
    format!("ca_file = \"{}\"", ca.ca_file().display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_trusted_through_ca_file_and_its_https_realm_is_used() {
    // The positive control for the plain-http realm case below.
    let ca = TestCa::new();
    let registry = RecordingServer::start_tls(&ca, |_| reply(500)).await;
    registry.set(tokens_and_content(format!("{}/token", registry.url())));

    let untrusting = InProcess::start(&config(upstream(&registry.url()))).await;
    let status = fetch_manifest(&mut untrusting.client().await, REPO, "v1")
        .await
        .expect_err("a certificate from an unknown authority must not be trusted");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        registry.seen().is_empty(),
        "a request got through an untrusted TLS connection: {:?}",
        registry.seen()
    );

    let service =
        InProcess::start(&config(upstream(&registry.url()).line(&ca_file_line(&ca)))).await;
    let resp = fetch_manifest(&mut service.client().await, REPO, "v1")
        .await
        .expect("the upstream's certificate is trusted through ca_file");
    assert_eq!(resp.manifest, content().manifest);
    let token_requests = registry
        .seen()
        .iter()
        .filter(|s| s.path == "/token")
        .count();
    assert_eq!(token_requests, 1, "{:?}", registry.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_realm_for_an_https_upstream_is_refused() {
    // Same host (127.0.0.1) and both loopback: only the scheme is wrong.
    let ca = TestCa::new();
    let target = RecordingServer::start(|_| token_reply()).await;
    let realm = format!("{}/token", target.url());
    let registry = RecordingServer::start_tls(&ca, tokens_and_content(realm.clone())).await;
    let service =
        InProcess::start(&config(upstream(&registry.url()).line(&ca_file_line(&ca)))).await;
    let result = fetch_manifest(&mut service.client().await, REPO, "v1").await;
    let status = assert_refused(&registry, result, &target.addr.to_string(), "http realm");
    assert_eq!(
        target.connections(),
        0,
        "the plain-http realm was connected to"
    );
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&target.url()) && status.message().contains("https"),
        "the error should name the realm and why: {}",
        status.message()
    );
}

// ---------------------------------------------------------------------------
// Redirects of content.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirect_to_another_host_carries_no_authorization() {
    let content = content();
    let (user, password) = ("reader", "blob-Pa55-e4");
    let expected = format!("Basic {}", BASE64.encode(format!("{user}:{password}")));
    let c = content.clone();
    let cdn = RecordingServer::start(move |seen| {
        if seen.path == format!("/cdn/{}", c.blob_digest) {
            c.blob_body()
        } else {
            reply(404)
        }
    })
    .await;
    let cdn_location = format!(
        "http://localhost:{}/cdn/{}",
        cdn.addr.port(),
        content.blob_digest
    );
    let c = content.clone();
    let auth = expected.clone();
    let registry = RecordingServer::start(move |seen| {
        if seen.authorization.as_deref() != Some(auth.as_str()) {
            return unauthorized(&[r#"Basic realm="registry""#]);
        }
        if seen.path == format!("/v2/{REPO}/blobs/{}", c.blob_digest) {
            redirect(&cdn_location)
        } else {
            c.serve(&seen.path)
        }
    })
    .await;
    let secrets = tempfile::tempdir().expect("temp dir for the password");
    let file = secrets.path().join("password");
    std::fs::write(&file, password).expect("write the password file");
    let service = InProcess::start(&config(
        upstream(&registry.url()).auth_basic_file(user, &file),
    ))
    .await;
    let mut client = service.client().await;

    let data = fetch_blob_bytes(&mut client, REPO, &content.blob_digest)
        .await
        .unwrap_or_else(|s| panic!("FetchBlob via a redirect: {:?}: {}", s.code(), s.message()));
    assert_eq!(data, content.blob.as_ref(), "blob bytes after the redirect");

    let blob_path = format!("/v2/{REPO}/blobs/{}", content.blob_digest);
    assert!(
        registry.seen().iter().any(|s| s.method == "GET"
            && s.path == blob_path
            && s.authorization.as_deref() == Some(expected.as_str())),
        "the registry never got the credentialed blob request: {:?}",
        registry.seen()
    );
    let cdn_seen = cdn.seen();
    assert!(!cdn_seen.is_empty(), "the redirect target was never asked");
    for s in &cdn_seen {
        assert_eq!(
            s.authorization, None,
            "Authorization went to the redirect target: {s:?}"
        );
    }
}
