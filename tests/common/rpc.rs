//! Unary RPC helpers shared by tests: each call is bounded by
//! [`RPC_BOUND`], so a hung service fails the test instead of hanging CI
//! (a bound, not a timing assertion).

use std::future::Future;
use std::time::Duration;

use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use oci_upstream::pb::{
    FetchManifestRequest, FetchManifestResponse, HeadBlobRequest, HeadBlobResponse,
    HeadManifestRequest, HeadManifestResponse,
};
use tonic::Status;
use tonic::transport::Channel;

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

/// FetchManifest of `repository` at `reference`.
pub async fn fetch_manifest(
    client: &mut Client,
    repository: &str,
    reference: &str,
) -> Result<FetchManifestResponse, Status> {
    bounded(client.fetch_manifest(FetchManifestRequest {
        repository: repository.into(),
        reference: reference.into(),
        ..Default::default()
    }))
    .await
    .map(tonic::Response::into_inner)
}

/// HeadManifest of `repository` at `reference`.
pub async fn head_manifest(
    client: &mut Client,
    repository: &str,
    reference: &str,
) -> Result<HeadManifestResponse, Status> {
    bounded(client.head_manifest(HeadManifestRequest {
        repository: repository.into(),
        reference: reference.into(),
        ..Default::default()
    }))
    .await
    .map(tonic::Response::into_inner)
}

/// HeadBlob of `digest` in `repository`.
pub async fn head_blob(
    client: &mut Client,
    repository: &str,
    digest: &str,
) -> Result<HeadBlobResponse, Status> {
    bounded(client.head_blob(HeadBlobRequest {
        repository: repository.into(),
        digest: digest.into(),
        ..Default::default()
    }))
    .await
    .map(tonic::Response::into_inner)
}
