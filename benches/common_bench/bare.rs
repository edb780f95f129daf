//! The transport baseline: a minimal tonic server implementing the same
//! `oci.upstream.v1.UpstreamService` whose FetchBlob streams a blob held in
//! memory as slices of one `Bytes` (no copies on our side), with the server
//! settings the service asks for in `src/app.rs` (HTTP/2 keepalive, no
//! message size cap, TCP_NODELAY). TCP_NODELAY is set on each accepted socket
//! through tonic's `TcpIncoming`: `Server::tcp_nodelay` is ignored by
//! `serve_with_incoming*`. Its figure is the ceiling the transport allows: no
//! upstream, no disk, no hashing.
//!
//! It runs on its own tokio runtime and threads (as many workers as the
//! service would have), so the benchmark's client runtime does not run the
//! server's tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use oci_upstream::pb;
use oci_upstream::pb::upstream_service_server::{UpstreamService, UpstreamServiceServer};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The running baseline server; stops when dropped.
pub struct BareServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareServer {
    /// Serves `blobs` (digest → bytes) on `127.0.0.1:0`, `chunk` bytes of
    /// data per message.
    pub fn start(blobs: HashMap<String, Bytes>, chunk: usize) -> BareServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .thread_name("bare-grpc")
                .enable_all()
                .build()
                .expect("a runtime for the bare server");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind the bare server");
                addr_tx
                    .send(listener.local_addr().expect("bare server address"))
                    .expect("report the bare server address");
                let service = Bare {
                    blobs: Arc::new(blobs),
                    chunk,
                };
                tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(Duration::from_secs(30)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                    .add_service(
                        UpstreamServiceServer::new(service)
                            .max_encoding_message_size(usize::MAX)
                            .max_decoding_message_size(64 * 1024),
                    )
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        async {
                            let _ = stop_rx.await;
                        },
                    )
                    .await
                    .expect("the bare server runs");
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the bare server starts");
        BareServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The baseline service: FetchBlob only.
struct Bare {
    blobs: Arc<HashMap<String, Bytes>>,
    chunk: usize,
}

type BlobStream = Pin<Box<dyn Stream<Item = Result<pb::FetchBlobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl UpstreamService for Bare {
    async fn fetch_manifest(
        &self,
        _: Request<pb::FetchManifestRequest>,
    ) -> Result<Response<pb::FetchManifestResponse>, Status> {
        Err(Status::unimplemented(
            "the bare baseline serves FetchBlob only",
        ))
    }

    async fn head_manifest(
        &self,
        _: Request<pb::HeadManifestRequest>,
    ) -> Result<Response<pb::HeadManifestResponse>, Status> {
        Err(Status::unimplemented(
            "the bare baseline serves FetchBlob only",
        ))
    }

    type FetchBlobStream = BlobStream;

    async fn fetch_blob(
        &self,
        request: Request<pb::FetchBlobRequest>,
    ) -> Result<Response<BlobStream>, Status> {
        let request = request.into_inner();
        let data = self
            .blobs
            .get(&request.digest)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no blob {}", request.digest)))?;
        let first = pb::FetchBlobResponse {
            info: Some(pb::BlobInfo {
                digest: request.digest,
                size: data.len() as i64,
                source: Some(pb::Source {
                    upstream: "bare".into(),
                    cache_hit: true,
                }),
            }),
            ..Default::default()
        };
        let chunk = self.chunk;
        let len = data.len();
        let messages = (0..len.div_ceil(chunk)).map(move |i| {
            let start = i * chunk;
            Ok(pb::FetchBlobResponse {
                info: None,
                data: data.slice(start..len.min(start + chunk)),
                offset: start as i64,
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(
            std::iter::once(Ok(first)).chain(messages),
        ))))
    }

    async fn head_blob(
        &self,
        _: Request<pb::HeadBlobRequest>,
    ) -> Result<Response<pb::HeadBlobResponse>, Status> {
        Err(Status::unimplemented(
            "the bare baseline serves FetchBlob only",
        ))
    }

    async fn fetch_tags(
        &self,
        _: Request<pb::FetchTagsRequest>,
    ) -> Result<Response<pb::FetchTagsResponse>, Status> {
        Err(Status::unimplemented(
            "the bare baseline serves FetchBlob only",
        ))
    }
}
