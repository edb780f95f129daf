//! The gRPC service adapter. Each RPC runs in a span of its own (`method`,
//! `request_id` and the request's fields, `upstream` once chosen), answers
//! with its request id in the metadata (`request_id`), passes admission
//! (concurrency limit, shutdown), converts its request to a checked engine
//! request (INVALID_ARGUMENT naming the field on failure), makes one engine
//! call bounded by the caller's deadline, and converts the answer back. A
//! FetchBlob stream is also bounded by the idle rule (`idle`): a caller that
//! reads nothing for `stream_idle_timeout` gets DEADLINE_EXCEEDED. No rules
//! live here.

/// The span and request id of one RPC. `caller` is recorded once the
/// caller is identified, `upstream` once the engine chose one, `trace_id`
/// at once (`trace`: the span is a child of the caller's `traceparent`).
macro_rules! rpc_span {
    ($request:expr, $method:literal $(, $($field:tt)+)?) => {{
        let id = RequestId::of($request.metadata());
        let span = tracing::info_span!(
            "rpc",
            method = $method,
            request_id = %id.as_str(),
            trace_id = field::Empty,
            $($($field)+,)?
            caller = field::Empty,
            upstream = field::Empty
        );
        $crate::grpc::trace::adopt(&span, $request.metadata());
        (span, id)
    }};
}

mod admin;
mod caller;
mod convert;
mod deadline;
mod health;

mod metrics;
mod request_id;
mod status;
mod trace;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, field};

pub use crate::admission::Admission;
pub use admin::AdminApi;
pub use health::health_reporter;
pub use metrics::MetricsLayer;

use crate::access::Access;
use crate::config::Config;
use crate::idle;
use crate::pb;
use crate::pb::upstream_service_server::{UpstreamService, UpstreamServiceServer};
use crate::upstream::{BlobRequest, Engine, Error, ManifestRequest, TagsRequest};
use caller::Scoped;
use convert::{HeadBlob, InvalidField};
use request_id::RequestId;

/// The interceptor that stamps calls with their arrival time.
pub type Stamp = fn(Request<()>) -> Result<Request<()>, Status>;

/// Stream type of FetchBlob.
pub type FetchBlobStream =
    Pin<Box<dyn Stream<Item = Result<pb::FetchBlobResponse, Status>> + Send>>;

/// The time bounds of calls.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The deadline of a call that sends no `grpc-timeout`.
    pub default_deadline: Duration,
    /// How long a FetchBlob stream may go unread before it is ended.
    pub stream_idle_timeout: Duration,
}

impl From<&Config> for Limits {
    fn from(config: &Config) -> Self {
        Self {
            default_deadline: config.default_deadline,
            stream_idle_timeout: config.stream_idle_timeout,
        }
    }
}

/// The `oci.upstream.v1.UpstreamService` implementation.
#[derive(Debug, Clone)]
pub struct UpstreamApi {
    engine: Arc<Engine>,
    admission: Arc<Admission>,
    access: Arc<Access>,
    limits: Limits,
}

impl UpstreamApi {
    /// The service over `engine`, admitting RPCs through `admission` and
    /// callers by `access`, bounded by `limits`.
    pub fn new(
        engine: Arc<Engine>,
        admission: Arc<Admission>,
        access: Arc<Access>,
        limits: Limits,
    ) -> Self {
        Self {
            engine,
            admission,
            access,
            limits,
        }
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

impl UpstreamApi {
    /// One unary RPC: admission, the checked request `Q`, the engine call
    /// `work` within the caller's deadline, and its answer, all in `span`.
    async fn unary<P, Q, T, F, Fut>(
        &self,
        (span, id): (Span, RequestId),
        request: Request<P>,
        work: F,
    ) -> Result<Response<T>, Status>
    where
        Q: TryFrom<P, Error = InvalidField> + Scoped,
        F: FnOnce(Arc<Engine>, Q) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let answer = async move {
            let _permit = self.admission.admit()?;
            let caller = caller::identify(&self.access, &request)?;
            let limit = deadline::of(&request, self.limits.default_deadline);
            let req = Q::try_from(request.into_inner())?;
            caller.may_read(req.repository())?;
            let engine = self.engine.clone();
            let answer = deadline::within(limit, async { Ok(work(engine, req).await?) }).await?;
            Ok(Response::new(answer))
        }
        .instrument(span)
        .await;
        id.stamp(answer)
    }
}

#[tonic::async_trait]
impl UpstreamService for UpstreamApi {
    async fn fetch_manifest(
        &self,
        request: Request<pb::FetchManifestRequest>,
    ) -> Result<Response<pb::FetchManifestResponse>, Status> {
        let r = request.get_ref();
        let span = rpc_span!(request, "FetchManifest", repository = %r.repository, reference = %r.reference);
        self.unary(span, request, |engine, req: ManifestRequest| async move {
            engine.fetch_manifest(req).await.map(Into::into)
        })
        .await
    }

    async fn head_manifest(
        &self,
        request: Request<pb::HeadManifestRequest>,
    ) -> Result<Response<pb::HeadManifestResponse>, Status> {
        let r = request.get_ref();
        let span = rpc_span!(request, "HeadManifest", repository = %r.repository, reference = %r.reference);
        self.unary(span, request, |engine, req: ManifestRequest| async move {
            engine.head_manifest(req).await.map(Into::into)
        })
        .await
    }

    type FetchBlobStream = FetchBlobStream;

    async fn fetch_blob(
        &self,
        request: Request<pb::FetchBlobRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let r = request.get_ref();
        let (span, id) =
            rpc_span!(request, "FetchBlob", repository = %r.repository, digest = %r.digest);
        let stream_span = span.clone();
        let answer = async move {
            let permit = self.admission.admit()?;
            let caller = caller::identify(&self.access, &request)?;
            let limit = deadline::of(&request, self.limits.default_deadline);
            let req = BlobRequest::try_from(request.into_inner())?;
            caller.may_read(&req.repository)?;
            let offset = req.range.offset;
            let blob =
                deadline::within(limit, async { Ok(self.engine.fetch_blob(req).await?) }).await?;
            let first = pb::FetchBlobResponse {
                info: Some(blob.info.into()),
                offset: i64::try_from(offset).unwrap_or(i64::MAX),
                ..Default::default()
            };
            let messages = stream::once(async { Ok(first) }).chain(blob.chunks.map(|item| {
                item.map(|chunk| convert::blob_data(chunk.offset, chunk.data))
                    .map_err(Status::from)
            }));
            // The permit is released when the stream ends, its caller
            // leaves, or the caller has read nothing for the idle timeout.
            let stream: FetchBlobStream = Box::pin(idle::bounded(
                messages,
                self.limits.stream_idle_timeout,
                permit,
                stream_span,
                |idle| {
                    Status::deadline_exceeded(format!(
                        "the caller read nothing for {} (stream_idle_timeout); the stream was ended",
                        humantime::format_duration(idle)
                    ))
                },
            ));
            Ok(Response::new(stream))
        }
        .instrument(span)
        .await;
        id.stamp(answer)
    }

    async fn head_blob(
        &self,
        request: Request<pb::HeadBlobRequest>,
    ) -> Result<Response<pb::HeadBlobResponse>, Status> {
        let r = request.get_ref();
        let span = rpc_span!(request, "HeadBlob", repository = %r.repository, digest = %r.digest);
        self.unary(span, request, |engine, req: HeadBlob| async move {
            engine
                .head_blob(&req.repository, &req.digest, &req.route)
                .await
                .map(Into::into)
        })
        .await
    }

    async fn fetch_tags(
        &self,
        request: Request<pb::FetchTagsRequest>,
    ) -> Result<Response<pb::FetchTagsResponse>, Status> {
        let r = request.get_ref();
        let span = rpc_span!(request, "FetchTags", repository = %r.repository);
        let name = r.repository.clone();
        self.unary(span, request, |engine, req: TagsRequest| async move {
            let page = engine.fetch_tags(req).await?;
            Ok(convert::tags_response(name, page))
        })
        .await
    }
}
