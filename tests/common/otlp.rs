//! A small OTLP/gRPC trace collector: a tonic server on `127.0.0.1:0`
//! implementing `opentelemetry.proto.collector.trace.v1.TraceService/Export`
//! (the generated code of the `opentelemetry-proto` crate) that records
//! every span it receives with its resource. It stops when dropped.
//!
//! ```ignore
//! let collector = Collector::start().await;
//! // ... a service with `otlp_endpoint = collector.url()` handles an RPC ...
//! let rpc = collector.wait_for(|s| s.name == "rpc" && s.attribute("request_id") == Some("r-1")).await;
//! assert_eq!(rpc.parent_span_id_hex(), "00f067aa0ba902b7");
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

/// How long [`Collector::wait_for`] waits for a span.
pub const SPAN_BOUND: Duration = Duration::from_secs(10);

/// One received span and the resource it was sent under.
#[derive(Clone, Debug)]
pub struct Received {
    /// The span as sent.
    pub span: Span,
    /// The attributes of its resource.
    pub resource: Vec<KeyValue>,
}

impl Received {
    /// The span's name.
    pub fn name(&self) -> &str {
        &self.span.name
    }

    /// The span's trace id in hex.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span's id in hex.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id in hex; empty for a root span.
    pub fn parent_span_id_hex(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// The span's string attribute `key`.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        string_value(&self.span.attributes, key)
    }

    /// The resource's string attribute `key`.
    pub fn resource_attribute(&self, key: &str) -> Option<&str> {
        string_value(&self.resource, key)
    }
}

fn string_value<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The service: appends what it receives to the shared list.
#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Recorder {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push(Received {
                        span,
                        resource: resource.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The running collector.
pub struct Collector {
    /// The bound address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
    recorder: Recorder,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port on loopback");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let recorder = Recorder::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(recorder.clone()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            });
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        Collector {
            addr,
            recorder,
            stop: Some(stop),
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, for `otlp_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.recorder.spans.lock().expect("collector lock").clone()
    }

    /// The first received span for which `matches` holds, waiting up to
    /// [`SPAN_BOUND`] for it; `None` if none came.
    pub async fn wait_for(&self, mut matches: impl FnMut(&Received) -> bool) -> Option<Received> {
        let mut found = None;
        super::eventually_within(SPAN_BOUND, || {
            found = self.spans().into_iter().find(|s| matches(s));
            found.is_some()
        })
        .await;
        found
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}
