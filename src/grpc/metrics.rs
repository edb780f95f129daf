//! The gRPC server metrics (`grpc_server_*`, with go-grpc-prometheus names
//! and labels) as a tower layer around every served service: a call is
//! started when it arrives and handled with its final `grpc-status` (from
//! the headers of a trailers-only answer, or from the trailers after the
//! body), with the time in between; a call whose caller left first is
//! `Canceled`. Only methods of the served descriptor sets are counted, so a
//! caller cannot mint label values by calling made-up paths.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use prometheus::{Histogram, IntCounter, IntCounterVec};
use prost::Message;
use tokio::time::Instant;
use tonic::Code;
use tower_layer::Layer;
use tower_service::Service;

use crate::metrics::GrpcFamily;

/// The go-grpc-prometheus spelling of each code (Go's `codes.Code.String()`),
/// indexed by the code's number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The series of one method, resolved once.
#[derive(Debug)]
struct MethodMetrics {
    labels: [String; 3],
    started: IntCounter,
    handling: Histogram,
    handled_family: IntCounterVec,
    handled: [OnceLock<IntCounter>; 17],
}

impl MethodMetrics {
    fn record(&self, code: Code, started: Instant) {
        self.handling.observe(started.elapsed().as_secs_f64());
        let index = (code as usize).min(CODE_NAMES.len() - 1);
        self.handled[index]
            .get_or_init(|| {
                let [kind, service, method] = &self.labels;
                self.handled_family
                    .with_label_values(&[kind, service, method, CODE_NAMES[index]])
            })
            .inc();
    }
}

/// The layer: wraps the router so every call is counted.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    methods: Arc<HashMap<String, Arc<MethodMetrics>>>,
}

impl MetricsLayer {
    /// Counts the methods of the services in `descriptor_sets` (encoded
    /// `FileDescriptorSet`s, as served by reflection) into `family`.
    pub fn new(family: &GrpcFamily, descriptor_sets: &[&[u8]]) -> Self {
        let mut methods = HashMap::new();
        for set in descriptor_sets {
            let set = prost_types::FileDescriptorSet::decode(*set)
                .expect("the served descriptor sets are built into the binary");
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    let service_name = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    for method in &service.method {
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (false, true) => "server_stream",
                            (true, false) => "client_stream",
                            (true, true) => "bidi_stream",
                        };
                        let labels = [
                            kind.to_owned(),
                            service_name.clone(),
                            method.name().to_owned(),
                        ];
                        let refs = [labels[0].as_str(), &labels[1], &labels[2]];
                        let entry = MethodMetrics {
                            started: family.started.with_label_values(&refs),
                            handling: family.handling.with_label_values(&refs),
                            handled_family: family.handled.clone(),
                            handled: std::array::from_fn(|_| OnceLock::new()),
                            labels,
                        };
                        methods.insert(
                            format!("/{service_name}/{}", method.name()),
                            Arc::new(entry),
                        );
                    }
                }
            }
        }
        Self {
            methods: Arc::new(methods),
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// A service whose calls are counted.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    methods: Arc<HashMap<String, Arc<MethodMetrics>>>,
}

impl<S, B, R> Service<http::Request<B>> for Metered<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let pending = self.methods.get(request.uri().path()).map(|method| {
            method.started.inc();
            Pending {
                method: method.clone(),
                started: Instant::now(),
                done: false,
            }
        });
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            let pending = match (pending, status_of(response.headers())) {
                // A trailers-only answer: the call is over.
                (Some(pending), Some(code)) => {
                    pending.finish(code);
                    None
                }
                (pending, _) => pending,
            };
            Ok(response.map(|inner| MeteredBody { inner, pending }))
        })
    }
}

/// A call not yet handled; dropped unfinished, it counts as `Canceled`.
#[derive(Debug)]
struct Pending {
    method: Arc<MethodMetrics>,
    started: Instant,
    done: bool,
}

impl Pending {
    fn finish(mut self, code: Code) {
        self.done = true;
        self.method.record(code, self.started);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.method.record(Code::Cancelled, self.started);
        }
    }
}

/// The `grpc-status` in `headers` (trailers, or a trailers-only answer).
fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// A response body that records its call's code when the trailers pass.
#[derive(Debug)]
pub struct MeteredBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|trailers| status_of(trailers).unwrap_or(Code::Unknown)),
            Some(Err(_)) | None => Some(Code::Unknown),
        };
        if let Some(code) = code {
            if let Some(pending) = this.pending.take() {
                pending.finish(code);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn layer(metrics: &Metrics) -> MetricsLayer {
        MetricsLayer::new(
            &metrics.grpc,
            &[
                crate::pb::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
        )
    }

    #[test]
    fn methods_come_from_the_descriptor_sets_with_their_type() {
        let metrics = Metrics::new();
        let layer = layer(&metrics);
        let kind = |path: &str| layer.methods.get(path).map(|m| m.labels[0].clone());
        assert_eq!(
            kind("/oci.upstream.v1.UpstreamService/FetchBlob").as_deref(),
            Some("server_stream")
        );
        assert_eq!(
            kind("/oci.upstream.v1.UpstreamService/FetchManifest").as_deref(),
            Some("unary")
        );
        assert_eq!(
            kind("/grpc.health.v1.Health/Watch").as_deref(),
            Some("server_stream")
        );
        assert_eq!(kind("/made.Up/Path"), None);
    }

    #[test]
    fn codes_are_spelled_as_go_grpc_prometheus_does() {
        assert_eq!(CODE_NAMES[Code::Cancelled as usize], "Canceled");
        assert_eq!(
            CODE_NAMES[Code::Unauthenticated as usize],
            "Unauthenticated"
        );
        assert_eq!(CODE_NAMES[Code::Ok as usize], "OK");
    }

    #[test]
    fn a_dropped_call_is_canceled() {
        let metrics = Metrics::new();
        let layer = layer(&metrics);
        let method = layer.methods["/grpc.health.v1.Health/Check"].clone();
        drop(Pending {
            method,
            started: Instant::now(),
            done: false,
        });
        let text = String::from_utf8(metrics.render().1).unwrap();
        assert!(
            text.contains("grpc_code=\"Canceled\",grpc_method=\"Check\",grpc_service=\"grpc.health.v1.Health\",grpc_type=\"unary\"} 1"),
            "{text}"
        );
    }
}
