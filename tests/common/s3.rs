//! A real S3-compatible server on 127.0.0.1: `moto_server` (PyPI
//! `moto[server]`), started on an ephemeral port with one bucket, killed
//! on drop (its objects live in its memory). Its listing helpers read the
//! bucket with plain S3 requests (moto does not check signatures), so a test
//! sees what a replica would: keys, sizes and ETags (a multipart upload's
//! ETag ends in `-<parts>`).
//!
//! ```ignore
//! let s3 = S3::start("oci-cache").await;
//! let config = ServiceConfig::with(upstream).shared_cache(&s3.table("a/"));
//! let service = Spawned::start_with_env(&config.toml(), &S3::ENV);
//! let objects = s3.objects("a/").await;
//! ```

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long moto may take to say where it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One object in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Its key.
    pub key: String,
    /// Its size.
    pub size: u64,
    /// Its ETag, quotes removed.
    pub etag: String,
}

/// A running `moto_server`, with `bucket` created.
pub struct S3 {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The bucket the tests use.
    pub bucket: String,
    log: Arc<Mutex<String>>,
    http: reqwest::Client,
}

impl S3 {
    /// The credentials the service gets (moto accepts any).
    pub const ENV: [(&'static str, &'static str); 2] = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];

    /// Starts moto on 127.0.0.1 and creates `bucket`.
    pub async fn start(bucket: &str) -> S3 {
        let binary = super::require_binary(
            "moto_server",
            &[],
            "python3 -m pip install 'moto[server]' (scripts/test does)",
        );
        let mut child = Command::new(binary)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn moto_server");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (tx, log) = (tx.clone(), log.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    log.lock().expect("log lock").push_str(&format!("{line}\n"));
                    let _ = tx.send(line);
                }
            });
        }
        let addr = loop {
            match rx.recv_timeout(READY_TIMEOUT) {
                Ok(line) => {
                    if let Some(at) = line.split("Running on http://").nth(1) {
                        break at.trim().parse::<SocketAddr>().expect("moto's address");
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "moto_server did not say where it listens within {READY_TIMEOUT:?}; log:\n{}",
                        log.lock().expect("log lock")
                    );
                }
            }
        };
        let s3 = S3 {
            child: Some(child),
            addr,
            bucket: bucket.to_owned(),
            log,
            http: reqwest::Client::builder()
                .default_headers(
                    [(
                        reqwest::header::AUTHORIZATION,
                        // moto does not check signatures, but serves a
                        // private object only to a signed-looking request.
                        reqwest::header::HeaderValue::from_static(
                            "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0",
                        ),
                    )]
                    .into_iter()
                    .collect(),
                )
                .build()
                .expect("HTTP client"),
        };
        let created = s3
            .http
            .put(format!("{}/{bucket}", s3.endpoint()))
            .send()
            .await
            .expect("create the bucket");
        assert!(
            created.status().is_success(),
            "create bucket: {}",
            created.status()
        );
        s3
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `[cache.s3]` table for this bucket under `prefix`.
    pub fn table(&self, prefix: &str) -> String {
        format!(
            "[cache.s3]\nbucket = \"{}\"\nprefix = \"{prefix}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nallow_http = true\n",
            self.bucket,
            self.endpoint()
        )
    }

    /// Every object under `prefix`, in key order.
    pub async fn objects(&self, prefix: &str) -> Vec<StoredObject> {
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type", "2".to_owned()), ("prefix", prefix.to_owned())];
            if let Some(t) = &token {
                query.push(("continuation-token", t.clone()));
            }
            let body = self
                .http
                .get(format!("{}/{}", self.endpoint(), self.bucket))
                .query(&query)
                .send()
                .await
                .expect("list the bucket")
                .text()
                .await
                .expect("listing body");
            for contents in body.split("<Contents>").skip(1) {
                let field = |name: &str| {
                    contents
                        .split(&format!("<{name}>"))
                        .nth(1)
                        .and_then(|rest| rest.split(&format!("</{name}>")).next())
                        .unwrap_or_default()
                        .to_owned()
                };
                objects.push(StoredObject {
                    key: field("Key"),
                    size: field("Size").parse().expect("object size"),
                    etag: field("ETag")
                        .replace("&#34;", "")
                        .replace("&quot;", "")
                        .replace('"', ""),
                });
            }
            token = body
                .split("<NextContinuationToken>")
                .nth(1)
                .and_then(|rest| rest.split("</NextContinuationToken>").next())
                .map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        objects
    }

    /// A GET of the object under `key` (streamed by whoever sends it).
    pub fn get_request(&self, key: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}/{}/{key}", self.endpoint(), self.bucket))
    }

    /// The bytes under `key`.
    pub async fn get(&self, key: &str) -> Vec<u8> {
        let response = self.get_request(key).send().await.expect("get an object");
        assert!(
            response.status().is_success(),
            "GET {key}: {}",
            response.status()
        );
        response.bytes().await.expect("object body").to_vec()
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub async fn open_uploads(&self) -> usize {
        let body = self
            .http
            .get(format!("{}/{}?uploads", self.endpoint(), self.bucket))
            .send()
            .await
            .expect("list multipart uploads")
            .text()
            .await
            .expect("uploads body");
        body.matches("<Upload>").count()
    }

    /// Kills the server (the bucket is gone with it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the server logged.
    pub fn logs(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
    }
}
