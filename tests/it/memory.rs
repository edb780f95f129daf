//! Memory bound of blob streaming: a blob bigger than 64 MiB goes through the
//! spawned service intact (sha256 checked on arrival) while the service's
//! peak resident set stays under 64 MiB, so streams do not buffer whole blobs.

use crate::common;

use std::time::Duration;

use common::Service;
use common::registry::{Registry, upstream_toml};
use oci_upstream::pb::FetchBlobRequest;
use sha2::{Digest as _, Sha256};

/// Blob size: over 64 MiB and not a multiple of the message size.
const BLOB_SIZE: u64 = 65 * 1024 * 1024 + 4097;
/// The service's peak RSS must stay below this.
const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;
/// Upper bound on the whole transfer so a hung service fails the test.
const TRANSFER_BOUND: Duration = Duration::from_secs(300);

#[tokio::test]
async fn big_blob_streams_with_bounded_memory() {
    let registry = Registry::start();
    let blob = registry.push_big_blob("big/blob", 0xB10B, BLOB_SIZE).await;
    let service = Service::start(&upstream_toml("primary", &registry.url(), "priority = 10"));
    let mut client = service.client().await;

    let (info, received, digest, largest) = tokio::time::timeout(TRANSFER_BOUND, async {
        let mut stream = client
            .fetch_blob(FetchBlobRequest {
                repository: "big/blob".into(),
                digest: blob.digest.clone(),
                ..Default::default()
            })
            .await
            .expect("FetchBlob of the big blob")
            .into_inner();
        let mut info = None;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut largest = 0usize;
        while let Some(msg) = stream.message().await.expect("FetchBlob stream") {
            if info.is_none() {
                info = msg.info;
            }
            if !msg.data.is_empty() {
                assert_eq!(msg.offset as u64, received, "offset of each message");
            }
            largest = largest.max(msg.data.len());
            received += msg.data.len() as u64;
            hasher.update(&msg.data);
        }
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        (info, received, digest, largest)
    })
    .await
    .expect("the big blob arrived within the transfer bound");

    let info = info.expect("the first message carries info");
    assert_eq!(info.size as u64, BLOB_SIZE, "info.size");
    assert_eq!(info.digest, blob.digest, "info.digest");
    assert_eq!(received, BLOB_SIZE, "bytes received");
    assert_eq!(digest, blob.digest, "sha256 of the received bytes");
    assert!(
        largest <= 1 << 20,
        "a message carried {largest} bytes, more than 1 MiB"
    );

    let peak = service.peak_rss_kib();
    eprintln!("service peak RSS: {peak} KiB");
    assert!(
        peak < PEAK_RSS_LIMIT_KIB,
        "service peak RSS {peak} KiB after streaming a {BLOB_SIZE}-byte blob; limit {PEAK_RSS_LIMIT_KIB} KiB"
    );
}
