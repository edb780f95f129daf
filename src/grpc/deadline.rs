//! The caller's deadline, from the `grpc-timeout` header, bounding the
//! engine's work for an RPC.

use std::future::Future;
use std::time::Duration;

use tonic::Status;
use tonic::metadata::MetadataMap;

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

/// Runs `work` within the caller's timeout: DEADLINE_EXCEEDED when it passes
/// (the work is dropped, which stops its upstream requests).
pub async fn within<T>(
    limit: Option<Duration>,
    work: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match limit {
        None => work.await,
        Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "the caller's deadline ({limit:?}) passed before upstreams answered"
            )))
        }),
    }
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
        let err = within(Some(Duration::from_secs(1)), slow)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(within(None, async { Ok::<_, Status>(1) }).await.is_ok());
    }
}
