//! The gRPC service adapter. Each RPC passes admission (concurrency limit,
//! shutdown), converts its request to a checked engine request
//! (INVALID_ARGUMENT naming the field on failure), makes one engine call
//! bounded by the caller's deadline, and converts the answer back. No rules
//! live here.

mod admission;
mod convert;
mod deadline;
mod status;

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt, stream};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

pub use admission::Admission;

use crate::pb;
use crate::pb::upstream_service_server::{UpstreamService, UpstreamServiceServer};
use crate::upstream::{BlobRequest, Engine, ManifestRequest, TagsRequest};
use convert::HeadBlob;

/// The interceptor that stamps calls with their arrival time.
pub type Stamp = fn(Request<()>) -> Result<Request<()>, Status>;

/// Stream type of FetchBlob.
pub type FetchBlobStream =
    Pin<Box<dyn Stream<Item = Result<pb::FetchBlobResponse, Status>> + Send>>;

/// The `oci.upstream.v1.UpstreamService` implementation.
#[derive(Debug, Clone)]
pub struct UpstreamApi {
    engine: Arc<Engine>,
    admission: Arc<Admission>,
}

impl UpstreamApi {
    /// The service over `engine`, admitting RPCs through `admission`.
    pub fn new(engine: Arc<Engine>, admission: Arc<Admission>) -> Self {
        Self { engine, admission }
    }

    /// The tonic server for this service, with requests of at most
    /// `request_limit` bytes and calls stamped with their arrival time (for
    /// deadlines).
    pub fn into_server(
        self,
        request_limit: usize,
    ) -> InterceptedService<UpstreamServiceServer<Self>, Stamp> {
        let server = UpstreamServiceServer::new(self)
            .max_decoding_message_size(request_limit)
            .max_encoding_message_size(usize::MAX);
        InterceptedService::new(server, deadline::stamp)
    }
}

#[tonic::async_trait]
impl UpstreamService for UpstreamApi {
    async fn fetch_manifest(
        &self,
        request: Request<pb::FetchManifestRequest>,
    ) -> Result<Response<pb::FetchManifestResponse>, Status> {
        let _permit = self.admission.admit()?;
        let limit = deadline::of(&request);
        let req = ManifestRequest::try_from(request.into_inner())?;
        let manifest =
            deadline::within(limit, async { Ok(self.engine.fetch_manifest(req).await?) }).await?;
        Ok(Response::new(manifest.into()))
    }

    async fn head_manifest(
        &self,
        request: Request<pb::HeadManifestRequest>,
    ) -> Result<Response<pb::HeadManifestResponse>, Status> {
        let _permit = self.admission.admit()?;
        let limit = deadline::of(&request);
        let req = ManifestRequest::try_from(request.into_inner())?;
        let meta =
            deadline::within(limit, async { Ok(self.engine.head_manifest(req).await?) }).await?;
        Ok(Response::new(meta.into()))
    }

    type FetchBlobStream = FetchBlobStream;

    async fn fetch_blob(
        &self,
        request: Request<pb::FetchBlobRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let permit = self.admission.admit()?;
        let limit = deadline::of(&request);
        let req = BlobRequest::try_from(request.into_inner())?;
        let offset = req.range.offset;
        let blob =
            deadline::within(limit, async { Ok(self.engine.fetch_blob(req).await?) }).await?;
        let first = pb::FetchBlobResponse {
            info: Some(blob.info.into()),
            offset: i64::try_from(offset).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let data = blob.chunks.map(move |item| {
            // The permit is released when the stream ends or is dropped.
            let _held = &permit;
            item.map(|chunk| convert::blob_data(chunk.offset, chunk.data))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(
            stream::once(async { Ok(first) }).chain(data),
        )))
    }

    async fn head_blob(
        &self,
        request: Request<pb::HeadBlobRequest>,
    ) -> Result<Response<pb::HeadBlobResponse>, Status> {
        let _permit = self.admission.admit()?;
        let limit = deadline::of(&request);
        let req = HeadBlob::try_from(request.into_inner())?;
        let meta = deadline::within(limit, async {
            Ok(self
                .engine
                .head_blob(&req.repository, &req.digest, req.upstream.as_deref())
                .await?)
        })
        .await?;
        Ok(Response::new(meta.into()))
    }

    async fn fetch_tags(
        &self,
        request: Request<pb::FetchTagsRequest>,
    ) -> Result<Response<pb::FetchTagsResponse>, Status> {
        let _permit = self.admission.admit()?;
        let limit = deadline::of(&request);
        let request = request.into_inner();
        let name = request.repository.clone();
        let req = TagsRequest::try_from(request)?;
        let page =
            deadline::within(limit, async { Ok(self.engine.fetch_tags(req).await?) }).await?;
        Ok(Response::new(convert::tags_response(name, page)))
    }
}
