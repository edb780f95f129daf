//! The one mapping from errors to `tonic::Status`. Exhaustive on purpose: a
//! new error variant does not compile until it has a code. The same match
//! picks the log level: caller mistakes at debug, upstream failures at
//! warn, the service's own at error.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::convert::InvalidField;
use crate::access::Denied;
use crate::admission::Refused;
use crate::upstream::Error;

impl From<Denied> for Status {
    fn from(e: Denied) -> Self {
        tracing::info!(error = %e, "caller refused");
        if e.is_authentication() {
            Status::unauthenticated(e.to_string())
        } else {
            Status::permission_denied(e.to_string())
        }
    }
}

impl From<Refused> for Status {
    fn from(e: Refused) -> Self {
        match e {
            Refused::Draining => Status::unavailable(e.to_string()),
            Refused::Overloaded(_) => Status::resource_exhausted(e.to_string()),
        }
    }
}

impl From<InvalidField> for Status {
    fn from(e: InvalidField) -> Self {
        tracing::debug!(error = %e, "invalid request");
        Status::invalid_argument(e.to_string())
    }
}

/// How loudly a request's final failure is logged.
#[derive(Clone, Copy)]
enum Level {
    /// The caller's mistake or an authoritative "no": expected.
    Debug,
    /// The service shutting down.
    Info,
    /// The upstreams failed us.
    Warn,
    /// The service itself failed.
    Error,
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        use crate::upstream::Internal;
        let message = e.to_string();
        let (code, level) = match &e {
            Error::UnknownUpstream(_) => (Code::InvalidArgument, Level::Debug),
            Error::NoRoute(_)
            | Error::UnknownNamespace(_)
            | Error::NotRouted { .. }
            | Error::NotFound(_)
            | Error::PlatformNotFound { .. } => (Code::NotFound, Level::Debug),
            Error::OutOfRange { .. } => (Code::OutOfRange, Level::Debug),
            Error::PermissionDenied(_) => (Code::PermissionDenied, Level::Warn),
            Error::RateLimited { .. } => (Code::ResourceExhausted, Level::Warn),
            Error::Unavailable(_) => (Code::Unavailable, Level::Warn),
            Error::DataLoss(_) => (Code::DataLoss, Level::Warn),
            Error::Internal(Internal::ShuttingDown) => (Code::Unavailable, Level::Info),
            Error::Internal(Internal::Cache(_) | Internal::LostDownload) => {
                (Code::Unavailable, Level::Error)
            }
        };
        // The final failure of a request, logged once. The log gets the
        // whole source chain (local paths included); the caller a short
        // safe message.
        let detail = crate::telemetry::describe(&e);
        match level {
            Level::Debug => tracing::debug!(error = %detail, ?code, "request refused"),
            Level::Info => tracing::info!(error = %detail, ?code, "request failed"),
            Level::Warn => tracing::warn!(error = %detail, ?code, "request failed"),
            Level::Error => tracing::error!(error = %detail, ?code, "request failed"),
        }
        match &e {
            Error::RateLimited {
                retry_after: Some(delay),
                ..
            } => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_retry_info(Some(*delay)),
            ),
            _ => Status::new(code, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Fault, FaultKind, Faults};
    use std::time::Duration;

    #[test]
    fn rate_limits_carry_retry_info() {
        let faults = Faults::from(Fault::new(FaultKind::RateLimited, "slow down"));
        let status = Status::from(Error::RateLimited {
            faults,
            retry_after: Some(Duration::from_secs(3)),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn codes() {
        let one = |k| Faults::into_error(Faults::from(Fault::new(k, "x")));
        assert_eq!(
            Status::from(one(FaultKind::NotFound)).code(),
            Code::NotFound
        );
        assert_eq!(
            Status::from(one(FaultKind::Denied)).code(),
            Code::PermissionDenied
        );
        assert_eq!(
            Status::from(one(FaultKind::Unavailable)).code(),
            Code::Unavailable
        );
        assert_eq!(
            Status::from(one(FaultKind::Integrity)).code(),
            Code::DataLoss
        );
        assert_eq!(
            Status::from(Error::UnknownUpstream("x".into())).code(),
            Code::InvalidArgument
        );
    }
}
