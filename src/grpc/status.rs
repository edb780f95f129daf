//! The one mapping from errors to `tonic::Status`. Exhaustive on purpose: a
//! new error variant does not compile until it has a code. The same match
//! picks the log level: caller mistakes at debug, upstream failures at warn.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::convert::InvalidField;
use crate::upstream::Error;

impl From<InvalidField> for Status {
    fn from(e: InvalidField) -> Self {
        tracing::debug!(error = %e, "invalid request");
        Status::invalid_argument(e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        let code = match &e {
            Error::UnknownUpstream(_) => Code::InvalidArgument,
            Error::NoRoute(_)
            | Error::NotRouted { .. }
            | Error::NotFound(_)
            | Error::PlatformNotFound { .. } => Code::NotFound,
            Error::OutOfRange { .. } => Code::OutOfRange,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::RateLimited { retry_after, .. } => {
                tracing::warn!(error = %message, "upstream rate limit");
                return match retry_after {
                    Some(delay) => Status::with_error_details(
                        Code::ResourceExhausted,
                        message,
                        ErrorDetails::with_retry_info(Some(*delay)),
                    ),
                    None => Status::resource_exhausted(message),
                };
            }
            Error::Unavailable(_) | Error::Cache(_) => Code::Unavailable,
            Error::DataLoss(_) => Code::DataLoss,
        };
        match code {
            Code::Unavailable | Code::DataLoss | Code::PermissionDenied => {
                tracing::warn!(error = %message, ?code, "request failed");
            }
            _ => tracing::debug!(error = %message, ?code, "request refused"),
        }
        Status::new(code, message)
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
