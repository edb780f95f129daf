//! Memory bound of blob streaming: a blob bigger than 64 MiB goes through the
//! spawned service intact (sha256 checked on arrival) while the service's
//! peak resident set stays under 64 MiB, so streams do not buffer whole blobs.

use crate::common;

use common::Spawned;
use common::config::{ServiceConfig, Upstream};
use common::distribution::Distribution;
use common::rpc::{BlobStream, blob_request};

/// Blob size: over 64 MiB and not a multiple of the message size.
const BLOB_SIZE: u64 = 65 * 1024 * 1024 + 4097;
/// The service's peak RSS must stay below this.
const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_blob_streams_with_bounded_memory() {
    let registry = Distribution::start();
    let blob = registry.push_big_blob("big/blob", 0xB10B, BLOB_SIZE).await;
    // A process: its peak resident set is measured.
    let service = Spawned::start(
        &ServiceConfig::with(Upstream::new("primary", &registry.url()).priority(10)).toml(),
    );
    let mut client = service.client().await;

    // The reader checks each message's offset and size (at most 1 MiB) and
    // hashes the bytes without keeping them.
    let read = BlobStream::open(&mut client, blob_request("big/blob", &blob.digest))
        .await
        .expect("FetchBlob of the big blob")
        .discard()
        .finish()
        .await;
    let (info, received, digest, largest) = (read.info, read.len, read.sha256, read.largest);
    read.end.expect("FetchBlob stream");

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
