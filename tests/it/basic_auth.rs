//! Integration tests for `type = "basic"` upstream credentials against a real
//! Distribution registry behind htpasswd auth: the right password (from a
//! file or an environment variable) fetches manifests, blobs and tags; a
//! wrong or missing password is PERMISSION_DENIED, never NOT_FOUND. Tests
//! that check the log for the password, or read it from the environment,
//! run the binary; the others run the service in process.

use crate::common;

use common::config::{ServiceConfig, Upstream};
use common::distribution::{Distribution, Image};
use common::rpc::{Client, fetch_blob_bytes, fetch_manifest, fetch_tags, head_blob, head_manifest};
use common::{InProcess, Spawned};
use tonic::{Code, Status};

const USER: &str = "alice";
const PASSWORD: &str = "s3cr3t-Pa55";

/// An auth-protected registry holding `team/app:v1`.
async fn protected_registry() -> (Distribution, Image) {
    let registry = Distribution::start_htpasswd(USER, PASSWORD);
    let image = registry.push_image("team/app", "v1").await;
    (registry, image)
}

/// The upstream `private` for `registry` (credentials added by the caller).
fn upstream(registry: &Distribution) -> Upstream {
    Upstream::new("private", &registry.url()).priority(10)
}

/// Writes `content` to a password file in `dir` and returns its path.
fn password_file(dir: &tempfile::TempDir, content: &str) -> std::path::PathBuf {
    let path = dir.path().join("password");
    std::fs::write(&path, content).expect("write password file");
    path
}

/// Fetches manifest, blob and tags of `image` and checks the content.
async fn fetch_everything(client: &mut Client, image: &Image) {
    let resp = fetch_manifest(client, "team/app", "v1")
        .await
        .expect("FetchManifest with basic credentials");
    assert_eq!(resp.manifest, image.manifest.bytes);
    assert_eq!(resp.digest, image.manifest.digest);
    assert_eq!(resp.source.map(|s| s.upstream).as_deref(), Some("private"));

    let layer = &image.layers[0];
    let data = fetch_blob_bytes(client, "team/app", &layer.digest)
        .await
        .expect("FetchBlob with basic credentials");
    assert_eq!(data, layer.data.as_ref(), "blob bytes");

    let resp = head_blob(client, "team/app", &layer.digest)
        .await
        .expect("HeadBlob with basic credentials");
    assert!(resp.exists);

    let resp = fetch_tags(client, "team/app")
        .await
        .expect("FetchTags with basic credentials");
    assert_eq!(resp.tags, ["v1"]);
}

/// Asserts that every RPC against `team/app` is PERMISSION_DENIED, and that
/// no message leaks `secret`.
async fn expect_denied(client: &mut Client, image: &Image, secret: &str) {
    let mut problems = Vec::new();
    let mut check = |what: &str, result: Result<(), Status>| match result {
        Err(s) if s.code() == Code::PermissionDenied => {
            if !secret.is_empty() && s.message().contains(secret) {
                problems.push(format!(
                    "{what}: the message leaks the password: {}",
                    s.message()
                ));
            }
        }
        Err(s) => problems.push(format!(
            "{what}: expected PERMISSION_DENIED, got {:?}: {}",
            s.code(),
            s.message()
        )),
        Ok(()) => problems.push(format!("{what}: expected PERMISSION_DENIED, got OK")),
    };

    let digest = &image.layers[0].digest;
    let result = fetch_manifest(client, "team/app", "v1").await;
    check("FetchManifest", result.map(drop));
    let result = head_manifest(client, "team/app", "v1").await;
    check("HeadManifest (not exists=false)", result.map(drop));
    let result = fetch_blob_bytes(client, "team/app", digest).await;
    check("FetchBlob", result.map(drop));
    let result = head_blob(client, "team/app", digest).await;
    check("HeadBlob (not exists=false)", result.map(drop));
    let result = fetch_tags(client, "team/app").await;
    check("FetchTags", result.map(drop));

    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credentials_from_password_file() {
    let (registry, image) = protected_registry().await;
    let secrets = tempfile::tempdir().expect("temp dir for the password file");
    // One trailing newline is trimmed, as Kubernetes secrets often have one.
    let file = password_file(&secrets, &format!("{PASSWORD}\n"));
    let service = Spawned::start(
        &ServiceConfig::with(upstream(&registry).auth_basic_file(USER, &file)).toml(),
    );
    let mut client = service.client().await;
    fetch_everything(&mut client, &image).await;
    assert!(
        !service.logs().contains(PASSWORD),
        "the service logged the password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credentials_from_password_env() {
    let (registry, image) = protected_registry().await;
    let service = Spawned::start_with_env(
        &ServiceConfig::with(upstream(&registry).auth_basic_env(USER, "TEST_REGISTRY_PASSWORD"))
            .toml(),
        &[("TEST_REGISTRY_PASSWORD", PASSWORD)],
    );
    let mut client = service.client().await;
    fetch_everything(&mut client, &image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_permission_denied() {
    let (registry, image) = protected_registry().await;
    let secrets = tempfile::tempdir().expect("temp dir for the password file");
    let wrong = "wrong-Pa55word";
    let file = password_file(&secrets, wrong);
    let service = Spawned::start(
        &ServiceConfig::with(upstream(&registry).auth_basic_file(USER, &file)).toml(),
    );
    let mut client = service.client().await;
    expect_denied(&mut client, &image, wrong).await;
    assert!(
        !service.logs().contains(wrong),
        "the service logged the password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_is_permission_denied() {
    let (registry, image) = protected_registry().await;
    let service = InProcess::start(&ServiceConfig::with(upstream(&registry)).toml()).await;
    let mut client = service.client().await;
    expect_denied(&mut client, &image, "").await;
}
