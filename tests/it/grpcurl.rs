//! Drives the spawned service with the real `grpcurl` (1.8, which speaks
//! reflection v1alpha): service listing and description through server
//! reflection, a FetchManifest call with a JSON request, and health checks.

use crate::common;

use std::process::Command;

use base64::Engine as _;
use common::Spawned;
use common::config::{ServiceConfig, Upstream};
use common::distribution::{Distribution, Image};

/// A registry holding `team/app:v1` and a service in front of it.
async fn setup() -> (Distribution, Spawned, Image) {
    let registry = Distribution::start();
    let image = registry.push_image("team/app", "v1").await;
    let service = Spawned::start(
        &ServiceConfig::with(Upstream::new("primary", &registry.url()).priority(10)).toml(),
    );
    (registry, service, image)
}

/// Runs `grpcurl -plaintext -max-time 30 ARGS... TARGET [METHOD]` (on a
/// blocking thread) and returns its stdout; panics with stderr on failure.
async fn grpcurl(service: &Spawned, args: &[&str], method: &[&str]) -> String {
    let mut cmd = Command::new(common::grpcurl_binary());
    cmd.args(["-plaintext", "-max-time", "30"])
        .args(args)
        .arg(service.target())
        .args(method);
    let shown = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("grpcurl thread")
        .expect("run grpcurl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{shown} failed with {}:\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_service_health_and_reflection() {
    let (_registry, service, _) = setup().await;
    let out = grpcurl(&service, &[], &["list"]).await;
    let services: Vec<&str> = out.lines().map(str::trim).collect();
    for expected in [
        "oci.upstream.v1.UpstreamService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.contains(&expected),
            "`grpcurl list` shows {expected}; got:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_every_rpc() {
    let (_registry, service, _) = setup().await;
    let out = grpcurl(
        &service,
        &[],
        &["describe", "oci.upstream.v1.UpstreamService"],
    )
    .await;
    for rpc in [
        "rpc FetchManifest",
        "rpc HeadManifest",
        "rpc FetchBlob",
        "rpc HeadBlob",
        "rpc FetchTags",
    ] {
        assert!(out.contains(rpc), "describe shows `{rpc}`; got:\n{out}");
    }
    assert!(
        out.contains("returns ( stream .oci.upstream.v1.FetchBlobResponse )"),
        "FetchBlob is server-streaming; got:\n{out}"
    );

    let out = grpcurl(
        &service,
        &[],
        &["describe", "oci.upstream.v1.FetchManifestRequest"],
    )
    .await;
    for field in ["repository", "reference", "accept", "platform", "upstream"] {
        assert!(
            out.contains(field),
            "FetchManifestRequest has `{field}`; got:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_manifest_with_json_request() {
    let (_registry, service, image) = setup().await;
    let out = grpcurl(
        &service,
        &["-d", r#"{"repository":"team/app","reference":"v1"}"#],
        &["oci.upstream.v1.UpstreamService/FetchManifest"],
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("grpcurl output is JSON ({e}): {out}"));
    assert_eq!(json["digest"], image.manifest.digest.as_str(), "{out}");
    assert_eq!(
        json["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "{out}"
    );
    // int64 is a string in proto3 JSON.
    assert_eq!(
        json["size"],
        image.manifest.bytes.len().to_string().as_str(),
        "{out}"
    );
    assert_eq!(json["source"]["upstream"], "primary", "{out}");
    let manifest = base64::engine::general_purpose::STANDARD
        .decode(
            json["manifest"]
                .as_str()
                .expect("manifest is a base64 string"),
        )
        .expect("manifest is valid base64");
    assert_eq!(manifest, image.manifest.bytes.as_ref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_overall_and_per_service() {
    let (_registry, service, _) = setup().await;
    for request in ["{}", r#"{"service":"oci.upstream.v1.UpstreamService"}"#] {
        let out = grpcurl(&service, &["-d", request], &["grpc.health.v1.Health/Check"]).await;
        let json: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("grpcurl output is JSON ({e}): {out}"));
        assert_eq!(json["status"], "SERVING", "health for {request}: {out}");
    }
}
