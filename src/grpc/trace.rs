//! W3C trace context of an RPC: the caller's `traceparent` (and
//! `tracestate`) metadata, read by OpenTelemetry's `TraceContextPropagator`,
//! becomes the parent of the RPC's span, and the span's `trace_id` field
//! says which trace the call belongs to. A missing or invalid
//! `traceparent` is no error: the RPC then starts a trace of its own (only
//! when spans are exported; otherwise it has no trace id).

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataMap};
use tracing::{Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Request metadata as a propagator's carrier (ASCII entries only: trace
/// context has no binary form).
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let values: Vec<&str> = self
            .0
            .get_all(key)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then_some(values)
    }
}

/// The caller's trace context in `metadata`; an empty context when there is
/// none or it is invalid.
fn callers_context(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Makes the caller's trace context in `metadata` the parent of `span` (a
/// span that has not been entered yet, with an empty `trace_id`) and records
/// the span's trace id: the caller's, else the one the span was given when
/// spans are exported, else none.
pub fn adopt(span: &Span, metadata: &MetadataMap) {
    let parent = callers_context(metadata);
    let callers = parent.span().span_context().trace_id();
    let trace_id = if callers == TraceId::INVALID {
        span.context().span().span_context().trace_id()
    } else {
        // Without span export there is no OpenTelemetry layer to hold the
        // parent: the trace id is still logged.
        let _ = span.set_parent(parent);
        callers
    };
    if trace_id != TraceId::INVALID {
        span.record("trace_id", field::display(trace_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags};

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn metadata(entries: &[(&'static str, &str)]) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        for (key, value) in entries {
            metadata.append(*key, value.parse().expect("ASCII test value"));
        }
        metadata
    }

    #[test]
    fn the_extractor_reads_ascii_metadata() {
        let mut md = metadata(&[
            ("traceparent", "x"),
            ("tracestate", "a=1"),
            ("tracestate", "b=2"),
        ]);
        md.insert_bin(
            "trace-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\0"),
        );
        let extractor = MetadataExtractor(&md);
        assert_eq!(extractor.get("traceparent"), Some("x"));
        assert_eq!(
            extractor.get("TraceParent"),
            Some("x"),
            "keys are case-blind"
        );
        assert_eq!(extractor.get("missing"), None);
        assert_eq!(extractor.get_all("tracestate"), Some(vec!["a=1", "b=2"]));
        assert_eq!(extractor.get_all("missing"), None);
        let mut keys = extractor.keys();
        keys.sort_unstable();
        assert_eq!(keys, ["traceparent", "tracestate"]);
    }

    #[test]
    fn a_valid_traceparent_is_the_callers_context() {
        let md = metadata(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "vendor=opaque"),
        ]);
        let cx = callers_context(&md);
        let parent = cx.span().span_context().clone();
        assert!(parent.is_valid() && parent.is_remote());
        assert_eq!(parent.trace_id().to_string(), TRACE);
        assert_eq!(parent.span_id(), SpanId::from_hex(PARENT).unwrap());
        assert_eq!(parent.trace_flags(), TraceFlags::SAMPLED);
        assert_eq!(parent.trace_state().get("vendor"), Some("opaque"));
    }

    #[test]
    fn invalid_or_missing_traceparents_are_no_context() {
        let zero_trace = format!("00-{}-{PARENT}-01", "0".repeat(32));
        let zero_span = format!("00-{TRACE}-{}-01", "0".repeat(16));
        let upper = format!("00-{}-{PARENT}-01", TRACE.to_uppercase());
        let version_ff = format!("ff-{TRACE}-{PARENT}-01");
        for value in [
            zero_trace.as_str(),
            &zero_span,
            &upper,
            &version_ff,
            "garbage",
            "",
        ] {
            let cx = callers_context(&metadata(&[("traceparent", value)]));
            assert!(!cx.span().span_context().is_valid(), "{value:?}");
        }
        let none = callers_context(&MetadataMap::new());
        assert!(!none.span().span_context().is_valid());
    }
}
