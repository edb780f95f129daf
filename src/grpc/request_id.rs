//! Request ids: every RPC carries one, the caller's `x-request-id` when it
//! is 1-128 printable ASCII characters, else one generated here. It is a
//! field of the RPC's span (so every log line of the call has it) and goes
//! back to the caller in the response metadata, on errors too (a
//! trailers-only answer carries it among the trailers).

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Response, Status};

/// The metadata key, in requests and responses.
pub const HEADER: &str = "x-request-id";
/// Longest caller-chosen id kept.
const MAX_LEN: usize = 128;

/// One RPC's request id.
#[derive(Debug, Clone)]
pub struct RequestId(AsciiMetadataValue);

impl RequestId {
    /// The caller's id from `metadata` when it is usable, else a new one.
    pub fn of(metadata: &MetadataMap) -> Self {
        metadata
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| usable(v))
            .and_then(|v| v.parse().ok())
            .map_or_else(Self::generated, Self)
    }

    fn generated() -> Self {
        let id = format!("{:032x}", fastrand::u128(..));
        Self(id.parse().expect("hex digits are a valid metadata value"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    /// `result` with the id in its metadata, whether it is an answer or an
    /// error.
    pub fn stamp<T>(&self, result: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        match result {
            Ok(mut response) => {
                response.metadata_mut().insert(HEADER, self.0.clone());
                Ok(response)
            }
            Err(mut status) => {
                status.metadata_mut().insert(HEADER, self.0.clone());
                Err(status)
            }
        }
    }
}

/// 1-128 printable ASCII characters (space to tilde).
fn usable(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len()) && id.bytes().all(|b| (b' '..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(HEADER, value.parse().unwrap());
        metadata
    }

    #[test]
    fn the_callers_id_is_kept_when_usable() {
        assert_eq!(RequestId::of(&with("abc-123")).as_str(), "abc-123");
        assert_eq!(RequestId::of(&with(&"x".repeat(128))).as_str().len(), 128);
        for unusable in ["x".repeat(129), String::new()] {
            let id = RequestId::of(&with(&unusable));
            assert_eq!(id.as_str().len(), 32, "replaced: {unusable:?}");
        }
        let generated = RequestId::of(&MetadataMap::new());
        assert!(generated.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(
            generated.as_str(),
            RequestId::of(&MetadataMap::new()).as_str()
        );
    }

    #[test]
    fn answers_and_errors_carry_it() {
        let id = RequestId::of(&with("req-7"));
        let ok = id.stamp(Ok(Response::new(()))).unwrap();
        assert_eq!(ok.metadata().get(HEADER).unwrap(), "req-7");
        let err = id.stamp::<()>(Err(Status::not_found("x"))).unwrap_err();
        assert_eq!(err.metadata().get(HEADER).unwrap(), "req-7");
    }
}
