//! RPC helpers shared by tests: each call is bounded by [`RPC_BOUND`], so a
//! hung service fails the test instead of hanging CI (a bound, not a timing
//! assertion).

use std::future::Future;
use std::time::Duration;

use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use oci_upstream::pb::{
    FetchBlobRequest, FetchBlobResponse, FetchManifestRequest, FetchManifestResponse,
    FetchTagsRequest, FetchTagsResponse, HeadBlobRequest, HeadBlobResponse, HeadManifestRequest,
    HeadManifestResponse,
};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// A client of the service.
pub type Client = UpstreamServiceClient<Channel>;

/// Upper bound on one RPC (a whole blob stream included).
pub const RPC_BOUND: Duration = Duration::from_secs(180);

/// Awaits `fut`, failing the test if it takes longer than [`RPC_BOUND`].
pub async fn bounded<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(RPC_BOUND, fut)
        .await
        .expect("the service answered within the RPC bound")
}

/// Awaits a unary `call` within [`RPC_BOUND`] and returns its message, for
/// requests the helpers below do not build (platform, paging, `upstream`,
/// `accept`, bad input).
pub async fn unary<T>(
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    bounded(call).await.map(tonic::Response::into_inner)
}

/// A FetchManifest request for `repository` at `reference`; other fields
/// default.
pub fn manifest_request(repository: &str, reference: &str) -> FetchManifestRequest {
    FetchManifestRequest {
        repository: repository.into(),
        reference: reference.into(),
        ..Default::default()
    }
}

/// A HeadManifest request for `repository` at `reference`; other fields
/// default.
pub fn head_manifest_request(repository: &str, reference: &str) -> HeadManifestRequest {
    HeadManifestRequest {
        repository: repository.into(),
        reference: reference.into(),
        ..Default::default()
    }
}

/// A FetchBlob request for the whole blob `digest` in `repository`; other
/// fields default.
pub fn blob_request(repository: &str, digest: &str) -> FetchBlobRequest {
    FetchBlobRequest {
        repository: repository.into(),
        digest: digest.into(),
        ..Default::default()
    }
}

/// A HeadBlob request for `digest` in `repository`; other fields default.
pub fn head_blob_request(repository: &str, digest: &str) -> HeadBlobRequest {
    HeadBlobRequest {
        repository: repository.into(),
        digest: digest.into(),
        ..Default::default()
    }
}

/// A FetchTags request for all tags of `repository` (no `n`, no `last`).
pub fn tags_request(repository: &str) -> FetchTagsRequest {
    FetchTagsRequest {
        repository: repository.into(),
        ..Default::default()
    }
}

/// FetchManifest of `repository` at `reference`.
pub async fn fetch_manifest(
    client: &mut Client,
    repository: &str,
    reference: &str,
) -> Result<FetchManifestResponse, Status> {
    unary(client.fetch_manifest(manifest_request(repository, reference))).await
}

/// HeadManifest of `repository` at `reference`.
pub async fn head_manifest(
    client: &mut Client,
    repository: &str,
    reference: &str,
) -> Result<HeadManifestResponse, Status> {
    unary(client.head_manifest(head_manifest_request(repository, reference))).await
}

/// HeadBlob of `digest` in `repository`.
pub async fn head_blob(
    client: &mut Client,
    repository: &str,
    digest: &str,
) -> Result<HeadBlobResponse, Status> {
    unary(client.head_blob(head_blob_request(repository, digest))).await
}

/// FetchTags of all tags of `repository`.
pub async fn fetch_tags(
    client: &mut Client,
    repository: &str,
) -> Result<FetchTagsResponse, Status> {
    unary(client.fetch_tags(tags_request(repository))).await
}

/// Expects a failed call and returns its status; an OK answer fails the
/// test, showing the response.
pub fn expect_err<T: std::fmt::Debug>(result: Result<tonic::Response<T>, Status>) -> Status {
    match result {
        Ok(response) => panic!("expected an error, got OK: {:?}", response.into_inner()),
        Err(status) => status,
    }
}

/// Awaits a FetchBlob `call` and reads its stream to the end, handing each
/// message to `each`; the error is the status the call or the stream ended
/// with. Not bounded here: callers bound it (by [`RPC_BOUND`], a hang guard
/// or a deadline).
pub async fn read_blob_stream(
    call: impl Future<Output = Result<tonic::Response<Streaming<FetchBlobResponse>>, Status>>,
    mut each: impl FnMut(FetchBlobResponse),
) -> Result<(), Status> {
    let mut stream = call.await?.into_inner();
    while let Some(msg) = stream.message().await? {
        each(msg);
    }
    Ok(())
}

/// FetchBlob of the whole blob `digest` in `repository`, read to the end of
/// the stream (the whole read within [`RPC_BOUND`]): the blob's bytes, or the
/// status the call or the stream ended with.
pub async fn fetch_blob_bytes(
    client: &mut Client,
    repository: &str,
    digest: &str,
) -> Result<Vec<u8>, Status> {
    let mut data = Vec::new();
    bounded(read_blob_stream(
        client.fetch_blob(blob_request(repository, digest)),
        |msg| data.extend_from_slice(&msg.data),
    ))
    .await?;
    Ok(data)
}
