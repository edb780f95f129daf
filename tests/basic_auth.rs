//! Integration tests for `type = "basic"` upstream credentials against a real
//! Distribution registry behind htpasswd auth: the right password (from a
//! file or an environment variable) fetches manifests, blobs and tags; a
//! wrong or missing password is PERMISSION_DENIED, never NOT_FOUND.

mod common;

use std::future::Future;
use std::time::Duration;

use common::Service;
use common::registry::{Image, Registry, upstream_toml};
use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use oci_upstream::pb::{
    FetchBlobRequest, FetchManifestRequest, FetchTagsRequest, HeadBlobRequest, HeadManifestRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

const USER: &str = "alice";
const PASSWORD: &str = "s3cr3t-Pa55";

/// Upper bound on one RPC so a hung service fails instead of hanging CI.
const RPC_BOUND: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(RPC_BOUND, fut)
        .await
        .expect("the service answered within the RPC bound")
}

/// An auth-protected registry holding `team/app:v1`.
async fn protected_registry() -> (Registry, Image) {
    let registry = Registry::start_with_basic_auth(USER, PASSWORD);
    let image = registry.push_image("team/app", "v1").await;
    (registry, image)
}

/// The upstream block for `registry` with `auth` lines (may be empty).
fn config(registry: &Registry, auth: &str) -> String {
    upstream_toml(
        "private",
        &registry.url(),
        &format!("priority = 10\n{auth}"),
    )
}

/// Writes `content` to a password file in `dir` and returns its path.
fn password_file(dir: &tempfile::TempDir, content: &str) -> String {
    let path = dir.path().join("password");
    std::fs::write(&path, content).expect("write password file");
    path.display().to_string()
}

/// Fetches manifest, blob and tags of `image` and checks the content.
async fn fetch_everything(client: &mut UpstreamServiceClient<Channel>, image: &Image) {
    let resp = bounded(client.fetch_manifest(FetchManifestRequest {
        repository: "team/app".into(),
        reference: "v1".into(),
        ..Default::default()
    }))
    .await
    .expect("FetchManifest with basic credentials")
    .into_inner();
    assert_eq!(resp.manifest, image.manifest.bytes);
    assert_eq!(resp.digest, image.manifest.digest);
    assert_eq!(resp.source.map(|s| s.upstream).as_deref(), Some("private"));

    let layer = &image.layers[0];
    let mut stream = bounded(client.fetch_blob(FetchBlobRequest {
        repository: "team/app".into(),
        digest: layer.digest.clone(),
        ..Default::default()
    }))
    .await
    .expect("FetchBlob with basic credentials")
    .into_inner();
    let mut data = Vec::new();
    while let Some(msg) = bounded(stream.message())
        .await
        .expect("FetchBlob stream with basic credentials")
    {
        data.extend_from_slice(&msg.data);
    }
    assert_eq!(data, layer.data.as_ref(), "blob bytes");

    let resp = bounded(client.head_blob(HeadBlobRequest {
        repository: "team/app".into(),
        digest: layer.digest.clone(),
        ..Default::default()
    }))
    .await
    .expect("HeadBlob with basic credentials")
    .into_inner();
    assert!(resp.exists);

    let resp = bounded(client.fetch_tags(FetchTagsRequest {
        repository: "team/app".into(),
        ..Default::default()
    }))
    .await
    .expect("FetchTags with basic credentials")
    .into_inner();
    assert_eq!(resp.tags, ["v1"]);
}

/// Asserts that every RPC against `team/app` is PERMISSION_DENIED, and that
/// no message leaks `secret`.
async fn expect_denied(client: &mut UpstreamServiceClient<Channel>, image: &Image, secret: &str) {
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

    let result = bounded(client.fetch_manifest(FetchManifestRequest {
        repository: "team/app".into(),
        reference: "v1".into(),
        ..Default::default()
    }))
    .await;
    check("FetchManifest", result.map(drop));

    let result = bounded(client.head_manifest(HeadManifestRequest {
        repository: "team/app".into(),
        reference: "v1".into(),
        ..Default::default()
    }))
    .await;
    check("HeadManifest (not exists=false)", result.map(drop));

    let result = bounded(async {
        let mut stream = client
            .fetch_blob(FetchBlobRequest {
                repository: "team/app".into(),
                digest: image.layers[0].digest.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    })
    .await;
    check("FetchBlob", result);

    let result = bounded(client.head_blob(HeadBlobRequest {
        repository: "team/app".into(),
        digest: image.layers[0].digest.clone(),
        ..Default::default()
    }))
    .await;
    check("HeadBlob (not exists=false)", result.map(drop));

    let result = bounded(client.fetch_tags(FetchTagsRequest {
        repository: "team/app".into(),
        ..Default::default()
    }))
    .await;
    check("FetchTags", result.map(drop));

    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn basic_credentials_from_password_file() {
    let (registry, image) = protected_registry().await;
    let secrets = tempfile::tempdir().expect("temp dir for the password file");
    // One trailing newline is trimmed, as Kubernetes secrets often have one.
    let file = password_file(&secrets, &format!("{PASSWORD}\n"));
    let service = Service::start(&config(
        &registry,
        &format!(
            "[upstreams.auth]\ntype = \"basic\"\nusername = \"{USER}\"\npassword_file = \"{file}\""
        ),
    ));
    let mut client = service.client().await;
    fetch_everything(&mut client, &image).await;
    assert!(
        !service.logs().contains(PASSWORD),
        "the service logged the password"
    );
}

#[tokio::test]
async fn basic_credentials_from_password_env() {
    let (registry, image) = protected_registry().await;
    let service = Service::start_with_env(
        &config(
            &registry,
            &format!(
                "[upstreams.auth]\ntype = \"basic\"\nusername = \"{USER}\"\npassword_env = \"TEST_REGISTRY_PASSWORD\""
            ),
        ),
        &[("TEST_REGISTRY_PASSWORD", PASSWORD)],
    );
    let mut client = service.client().await;
    fetch_everything(&mut client, &image).await;
}

#[tokio::test]
async fn wrong_password_is_permission_denied() {
    let (registry, image) = protected_registry().await;
    let secrets = tempfile::tempdir().expect("temp dir for the password file");
    let wrong = "wrong-Pa55word";
    let file = password_file(&secrets, wrong);
    let service = Service::start(&config(
        &registry,
        &format!(
            "[upstreams.auth]\ntype = \"basic\"\nusername = \"{USER}\"\npassword_file = \"{file}\""
        ),
    ));
    let mut client = service.client().await;
    expect_denied(&mut client, &image, wrong).await;
    assert!(
        !service.logs().contains(wrong),
        "the service logged the password"
    );
}

#[tokio::test]
async fn no_credentials_is_permission_denied() {
    let (registry, image) = protected_registry().await;
    let service = Service::start(&config(&registry, ""));
    let mut client = service.client().await;
    expect_denied(&mut client, &image, "").await;
}
