//! Operating the service: every RPC carries a request id (the caller's
//! `x-request-id`, or one generated), returned in the response metadata on
//! answers and errors alike, and present in the RPC's JSON log lines.

use crate::common;

use common::config::{ServiceConfig, Upstream};
use common::content::{OCI_MANIFEST, image_manifest};
use common::fake::FakeRegistry;
use common::rpc::{blob_request, manifest_request};
use common::{InProcess, Spawned};
use tonic::Code;

const REPO: &str = "team/app";

fn with_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("an ASCII id"));
    request
}

fn id_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_and_errors_carry_the_request_id() {
    let fake = FakeRegistry::start().await;
    fake.put_manifest(REPO, Some("v1"), OCI_MANIFEST, &image_manifest("ids", 1));
    let blob = fake.put_blob(REPO, b"blob bytes");
    let service =
        InProcess::start(&ServiceConfig::with(Upstream::new("a", &fake.url())).toml()).await;
    let mut client = service.client().await;

    let ok = client
        .fetch_manifest(with_id(manifest_request(REPO, "v1"), "caller-id-42"))
        .await
        .expect("FetchManifest");
    assert_eq!(id_of(ok.metadata()).as_deref(), Some("caller-id-42"));

    let invalid = client
        .fetch_manifest(with_id(manifest_request("Not/Valid", "v1"), "bad-input-7"))
        .await
        .expect_err("an invalid repository");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(
        id_of(invalid.metadata()).as_deref(),
        Some("bad-input-7"),
        "on errors too"
    );

    let missing = client
        .fetch_manifest(with_id(manifest_request(REPO, "nope"), "not-found-9"))
        .await
        .expect_err("no such tag");
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(id_of(missing.metadata()).as_deref(), Some("not-found-9"));

    let stream = client
        .fetch_blob(with_id(blob_request(REPO, &blob), "stream-3"))
        .await
        .expect("FetchBlob");
    assert_eq!(id_of(stream.metadata()).as_deref(), Some("stream-3"));

    // None sent, or one that is not 1-128 printable characters: generated.
    let generated = client
        .fetch_manifest(manifest_request(REPO, "v1"))
        .await
        .expect("FetchManifest");
    let id = id_of(generated.metadata()).expect("a generated id");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let too_long = "x".repeat(129);
    let replaced = client
        .fetch_manifest(with_id(manifest_request(REPO, "v1"), &too_long))
        .await
        .expect("FetchManifest");
    let id = id_of(replaced.metadata()).expect("an id");
    assert_ne!(id, too_long);
    assert_eq!(id.len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_of_an_rpc_carry_its_request_id() {
    let fake = FakeRegistry::start().await;
    let config = ServiceConfig::with(Upstream::new("a", &fake.url()))
        .top("log_format = \"json\"")
        .toml();
    let service = Spawned::start(&config);
    let mut client = service.client().await;
    let status = client
        .fetch_manifest(with_id(
            manifest_request(REPO, "nope"),
            "find-me-in-the-log",
        ))
        .await
        .expect_err("no such tag");
    assert_eq!(status.code(), Code::NotFound);
    // The log is read from the process's stderr by a thread: the RPC's
    // lines may arrive a moment after its answer.
    let _ = common::eventually(|| service.logs().contains("find-me-in-the-log")).await;
    let logs = service.logs();
    let mut lines_with_id = 0;
    for line in logs.lines().filter(|l| l.trim_start().starts_with('{')) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value.get("timestamp").is_some() && value.get("level").is_some(),
            "{line}"
        );
        let spans = value
            .get("spans")
            .and_then(|s| s.as_array())
            .cloned()
            .unwrap_or_default();
        if spans
            .iter()
            .any(|s| s.get("request_id").and_then(|v| v.as_str()) == Some("find-me-in-the-log"))
        {
            lines_with_id += 1;
            let rpc = spans
                .iter()
                .find(|s| s.get("name").and_then(|v| v.as_str()) == Some("rpc"));
            let rpc = rpc.expect("the rpc span");
            assert_eq!(
                rpc.get("method").and_then(|v| v.as_str()),
                Some("FetchManifest")
            );
            assert_eq!(rpc.get("repository").and_then(|v| v.as_str()), Some(REPO));
        }
    }
    assert!(
        lines_with_id >= 1,
        "no log line of the RPC carries its request id:\n{logs}"
    );
}
