//! `grpc.health.v1.Health` as the health checking protocol specifies it,
//! over the `tonic_health::pb` types (tonic-health's own server ends a
//! Watch of an unknown service with NOT_FOUND instead).
//!
//! - `Check`: the service's status; NOT_FOUND for a service never set.
//! - `Watch`: the current status at once (SERVICE_UNKNOWN for a service
//!   never set, and the call stays open), then every change: a service that
//!   becomes known later is reported with its status.
//! - At shutdown, [`HealthReporter::close`] ends the Watch calls (after
//!   their last status) with UNAVAILABLE, so they do not hold connections
//!   open past the drain.
//!
//! All statuses live in one `watch` channel: a change is rare, and a Watch
//! of a made-up name costs its stream only, never an entry in a map.

use std::collections::HashMap;
use std::pin::Pin;

use futures::{Stream, stream};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Every service's status, and whether the server is closing.
#[derive(Debug, Clone, Default)]
struct Statuses {
    services: HashMap<String, ServingStatus>,
    closed: bool,
}

impl Statuses {
    /// What the wire says about `service`.
    fn wire(&self, service: &str) -> WireStatus {
        self.services
            .get(service)
            .map_or(WireStatus::ServiceUnknown, |s| WireStatus::from(*s))
    }
}

/// A reporter and the linked `grpc.health.v1.Health` server, as
/// `tonic_health::server::health_reporter` makes them: the overall service
/// `""` starts SERVING.
pub fn health_reporter() -> (HealthReporter, HealthServer<HealthService>) {
    let (reporter, service) = pair();
    (reporter, HealthServer::new(service))
}

fn pair() -> (HealthReporter, HealthService) {
    let mut statuses = Statuses::default();
    statuses
        .services
        .insert(String::new(), ServingStatus::Serving);
    let (tx, rx) = watch::channel(statuses);
    (
        HealthReporter { statuses: tx },
        HealthService { statuses: rx },
    )
}

/// Sets the statuses the linked [`HealthService`] serves.
#[derive(Debug)]
pub struct HealthReporter {
    statuses: watch::Sender<Statuses>,
}

impl HealthReporter {
    /// Sets the status of `service` (`""`: the server as a whole); Watch
    /// calls of it see the change.
    pub fn set_service_status(&self, service: &str, status: ServingStatus) {
        self.statuses.send_if_modified(|all| {
            all.services.insert(service.to_owned(), status) != Some(status)
        });
    }

    /// Ends every Watch call, now and to come, after its current status:
    /// the server is stopping.
    pub fn close(&self) {
        self.statuses
            .send_if_modified(|all| !std::mem::replace(&mut all.closed, true));
    }
}

/// The `grpc.health.v1.Health` implementation.
#[derive(Debug)]
pub struct HealthService {
    statuses: watch::Receiver<Statuses>,
}

/// Stream type of Watch.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

fn response(status: WireStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

/// Where one Watch call is.
struct Watching {
    statuses: watch::Receiver<Statuses>,
    service: String,
    /// The status last sent.
    sent: Option<WireStatus>,
}

impl Watching {
    /// The next message, or `None` once the call is over.
    async fn next(mut self) -> Option<(Result<HealthCheckResponse, Status>, Option<Self>)> {
        loop {
            let (now, closed) = {
                let all = self.statuses.borrow_and_update();
                (all.wire(&self.service), all.closed)
            };
            if self.sent != Some(now) {
                self.sent = Some(now);
                return Some((Ok(response(now)), Some(self)));
            }
            // The reporter gone is the server gone: closing too.
            if closed || self.statuses.changed().await.is_err() {
                let status = Status::unavailable("the server is shutting down");
                return Some((Err(status), None));
            }
        }
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        match self.statuses.borrow().services.get(service) {
            Some(status) => Ok(Response::new(response(WireStatus::from(*status)))),
            None => Err(Status::not_found(format!(
                "unknown service `{service}` (known: \"\" and oci.upstream.v1.UpstreamService)"
            ))),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let watching = Watching {
            statuses: self.statuses.clone(),
            service: request.into_inner().service,
            sent: None,
        };
        let messages = stream::unfold(Some(watching), |state| async move { state?.next().await });
        Ok(Response::new(Box::pin(messages)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tonic::Code;

    fn ask(service: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest {
            service: service.to_owned(),
        })
    }

    async fn next(stream: &mut WatchStream) -> Result<WireStatus, Status> {
        let message = stream.next().await.expect("the watch is open")?;
        Ok(WireStatus::try_from(message.status).expect("a known status"))
    }

    #[tokio::test]
    async fn check_knows_only_what_was_set() {
        let (reporter, service) = pair();
        let all = service.check(ask("")).await.unwrap().into_inner();
        assert_eq!(all.status, WireStatus::Serving as i32);
        let unknown = service.check(ask("no.such.Service")).await.unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);
        reporter.set_service_status("a.B", ServingStatus::NotServing);
        let b = service.check(ask("a.B")).await.unwrap().into_inner();
        assert_eq!(b.status, WireStatus::NotServing as i32);
    }

    #[tokio::test]
    async fn watch_of_an_unknown_service_stays_open_and_reports_it_later() {
        let (reporter, service) = pair();
        let mut watch = service.watch(ask("a.B")).await.unwrap().into_inner();
        assert_eq!(next(&mut watch).await.unwrap(), WireStatus::ServiceUnknown);
        // An unrelated change sends nothing.
        reporter.set_service_status("", ServingStatus::NotServing);
        reporter.set_service_status("a.B", ServingStatus::Serving);
        assert_eq!(next(&mut watch).await.unwrap(), WireStatus::Serving);
        reporter.set_service_status("a.B", ServingStatus::Serving);
        reporter.set_service_status("a.B", ServingStatus::NotServing);
        assert_eq!(next(&mut watch).await.unwrap(), WireStatus::NotServing);
        reporter.close();
        assert_eq!(
            next(&mut watch).await.unwrap_err().code(),
            Code::Unavailable
        );
        assert!(watch.next().await.is_none());
        // A Watch after closing gets the status, then the end.
        let mut late = service.watch(ask("")).await.unwrap().into_inner();
        assert_eq!(next(&mut late).await.unwrap(), WireStatus::NotServing);
        assert_eq!(next(&mut late).await.unwrap_err().code(), Code::Unavailable);
    }
}
