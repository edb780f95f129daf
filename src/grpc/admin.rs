//! The `oci.upstream.v1.AdminService` adapter: operators' calls (the
//! upstreams and their circuits, the cache's state, evicting an object),
//! each in an RPC span with its request id, like the UpstreamService calls.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, field};

use super::request_id::RequestId;
use super::{caller, convert};
use crate::access::Access;
use crate::pb;
use crate::pb::admin_service_server::{AdminService, AdminServiceServer};
use crate::upstream::Engine;

/// The `oci.upstream.v1.AdminService` implementation.
#[derive(Debug, Clone)]
pub struct AdminApi {
    engine: Arc<Engine>,
    access: Arc<Access>,
}

impl AdminApi {
    /// The service over `engine`, for callers that `access` lets
    /// administer.
    pub fn new(engine: Arc<Engine>, access: Arc<Access>) -> Self {
        Self { engine, access }
    }

    /// Refuses callers that may not administer.
    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        Ok(caller::identify(&self.access, request)?.may_administer()?)
    }

    /// The tonic server for this service, with requests of at most
    /// `request_limit` bytes.
    pub fn into_server(self, request_limit: usize) -> AdminServiceServer<Self> {
        AdminServiceServer::new(self).max_decoding_message_size(request_limit)
    }
}

/// Runs `answer` in `span` and stamps its result with `id`.
async fn traced<T>(
    (span, id): (Span, RequestId),
    answer: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    let answer = answer.instrument(span).await.map(Response::new);
    id.stamp(answer)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_upstreams(
        &self,
        request: Request<pb::ListUpstreamsRequest>,
    ) -> Result<Response<pb::ListUpstreamsResponse>, Status> {
        let span = rpc_span!(request, "ListUpstreams");
        traced(span, async {
            self.admit(&request)?;
            Ok(pb::ListUpstreamsResponse {
                upstreams: self
                    .engine
                    .upstreams()
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            })
        })
        .await
    }

    async fn get_cache_stats(
        &self,
        request: Request<pb::GetCacheStatsRequest>,
    ) -> Result<Response<pb::GetCacheStatsResponse>, Status> {
        let span = rpc_span!(request, "GetCacheStats");
        traced(span, async {
            self.admit(&request)?;
            Ok(self.engine.cache_stats().into())
        })
        .await
    }

    async fn evict_object(
        &self,
        request: Request<pb::EvictObjectRequest>,
    ) -> Result<Response<pb::EvictObjectResponse>, Status> {
        let span = rpc_span!(request, "EvictObject", digest = %request.get_ref().digest);
        traced(span, async {
            self.admit(&request)?;
            let digest = convert::evict_digest(request.get_ref())?;
            let found = self.engine.evict(&digest).await?;
            Ok(pb::EvictObjectResponse { found })
        })
        .await
    }
}
