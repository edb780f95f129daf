//! Scraping the service's `/metrics` and reading it with a real Prometheus
//! parser: the text goes through the official Python client's parser
//! (`prometheus_client.parser`), which rejects malformed exposition text,
//! and the samples it returns are what the tests compare.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

/// The parser, as a Python program: exposition text on stdin, one JSON
/// array of `[name, labels, value]` on stdout; malformed text fails.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append([s.name, s.labels, s.value])
json.dump(samples, sys.stdout)
"#;

/// One sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// One scrape, as the Prometheus parser read it.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The exposition text as served.
    pub text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// `GET http://addr/metrics`: checks the status and the content type of
    /// the text format 0.0.4, and parses the body.
    pub async fn of(addr: SocketAddr) -> Scrape {
        let response = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap_or_else(|e| panic!("GET /metrics at {addr}: {e}"));
        assert_eq!(response.status(), 200, "GET /metrics");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
            "content type of the text format 0.0.4, got {content_type:?}"
        );
        let text = response.text().await.expect("a /metrics body");
        Scrape::parse(text)
    }

    /// Parses exposition text with the Prometheus parser; panics (with the
    /// parser's complaint) when it is malformed.
    pub fn parse(text: String) -> Scrape {
        let python = super::require_binary("python3", &[], "apt-get install -y python3");
        let mut child = Command::new(python)
            .args(["-c", PARSE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes())
            .expect("write the scrape to the parser");
        let out = child.wait_with_output().expect("wait for the parser");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("No module named 'prometheus_client'"),
            "the Prometheus parser is missing: pip install prometheus-client (scripts/test installs it)"
        );
        assert!(
            out.status.success(),
            "the Prometheus parser rejected the exposition text: {stderr}\n{text}"
        );
        let raw: Vec<(String, serde_json::Map<String, serde_json::Value>, f64)> =
            serde_json::from_slice(&out.stdout).expect("the parser's JSON");
        let samples = raw
            .into_iter()
            .map(|(name, labels, value)| {
                let labels = labels
                    .into_iter()
                    .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                (name, labels, value)
            })
            .collect();
        Scrape { text, samples }
    }

    /// The value of the sample `name` whose labels include all of `labels`
    /// (summed when several match; 0 when none does).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// True when some sample is called `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// Every label value of every sample.
    pub fn label_values(&self) -> impl Iterator<Item = &str> {
        self.samples
            .iter()
            .flat_map(|(_, l, _)| l.iter().map(|(_, v)| v.as_str()))
    }
}
