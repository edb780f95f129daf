//! The caller's deadline, from the `grpc-timeout` header, bounding the
//! engine's work for an RPC. The deadline counts from the moment the call's
//! headers arrived (stamped by an interceptor, before the request body is
//! read), and fires a little before tonic's own grpc-timeout timer, which
//! would otherwise end the call with CANCELLED instead of DEADLINE_EXCEEDED.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

/// How much earlier than the caller's deadline the service gives up, so its
/// DEADLINE_EXCEEDED wins the race with tonic's timer.
const MARGIN: Duration = Duration::from_millis(10);

/// When a call's headers arrived.
#[derive(Debug, Clone, Copy)]
struct Arrival(Instant);

/// Interceptor: stamps the call with its arrival time.
#[allow(clippy::result_large_err)] // the interceptor signature is tonic's
pub fn stamp(mut request: Request<()>) -> Result<Request<()>, Status> {
    request.extensions_mut().insert(Arrival(Instant::now()));
    Ok(request)
}

/// The instant by which the service must answer `request`: the caller's
/// deadline, or `default` after its arrival when it set none.
pub fn of<T>(request: &Request<T>, default: Duration) -> Instant {
    let arrived = request
        .extensions()
        .get::<Arrival>()
        .map_or_else(Instant::now, |a| a.0);
    match timeout(request.metadata()) {
        Some(limit) => arrived + limit.saturating_sub(MARGIN),
        None => arrived + default,
    }
}

/// The caller's timeout, if it sent one (`grpc-timeout`: up to 8 digits and
/// a unit H, M, S, m, u or n).
pub fn timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs `work` until `deadline`: DEADLINE_EXCEEDED when it passes (the work
/// is dropped, which stops its upstream requests).
pub async fn within<T>(
    deadline: Instant,
    work: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout_at(deadline, work)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "the call's deadline passed before the upstreams answered",
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> Option<Duration> {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", v.parse().unwrap());
        timeout(&m)
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse("S"), None);
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("123456789S"), None);
        assert_eq!(timeout(&MetadataMap::new()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_exceeded() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, Status>(())
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        let err = within(deadline, slow).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(within(deadline, async { Ok::<_, Status>(1) }).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_counts_from_arrival() {
        let mut request = stamp(Request::new(())).unwrap();
        request
            .metadata_mut()
            .insert("grpc-timeout", "1S".parse().unwrap());
        tokio::time::advance(Duration::from_millis(400)).await;
        let default = Duration::from_secs(60);
        let left = of(&request, default) - Instant::now();
        assert_eq!(left, Duration::from_millis(600) - MARGIN);
        // No grpc-timeout: the default deadline, also from arrival.
        let bare = stamp(Request::new(())).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(of(&bare, default) - Instant::now(), Duration::from_secs(59));
    }
}
