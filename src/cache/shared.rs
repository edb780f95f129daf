//! The shared tier: the content-addressable store every replica shares on
//! S3-compatible object storage (DESIGN §8), behind the disk store. Keys,
//! under the configured prefix:
//!
//! ```text
//! sha256/<hex>/data                           the bytes (a manifest's media type as Content-Type)
//! sha256/<hex>/holders/<upstream>/<repository> empty: that route is known to hold the object
//! ```
//!
//! One LIST of `sha256/<hex>/` tells whether an object is there, its size
//! and every route known to hold it. `data` is written only with bytes whose
//! digest passed: a small object create-only after verification, a large one
//! as a multipart upload that follows the download and is completed only
//! once the digest passed (aborted on any failure), so no reader ever sees a
//! partial or unverified object. Holder records are written after the data.
//!
//! The tier is an optimisation, never a dependency: every request has a
//! short time limit and retry budget, failures are counted and logged, and
//! after [`FAILURES_TO_SKIP`] in a row the bucket is skipped for
//! [`COOLDOWN`] (the shared [`Circuit`]). A skipped or failing bucket reads
//! as a miss and writes as nothing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path as Key, PathPart};
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore,
    ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::CacheError;
use super::download::{Download, Progress, State};
use super::read::Reader;
use super::store::Holder;
use super::writer::{DownloadWriter, Written};
use crate::circuit::Circuit;
use crate::config::S3Config;
use crate::metrics::Metrics;
use crate::oci::{Digest, MediaType};

/// Parts of a multipart upload (S3's minimum is 5 MiB); objects smaller
/// than one part are written in one create-only PUT.
pub(super) const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one object uploading at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Objects uploading at once; each holds at most `PART_SIZE ×
/// (PARTS_IN_FLIGHT + 1)` bytes, so uploads hold at most 48 MiB.
const UPLOADS: usize = 2;
/// Failures in a row after which the bucket is skipped ...
const FAILURES_TO_SKIP: u32 = 3;
/// ... for this long (then one request probes it).
const COOLDOWN: Duration = Duration::from_secs(30);
/// Longest wait for a lookup or the start of a read, which callers wait
/// for: past it, the bucket counts as failing and the request goes on
/// without it.
const ANSWER_LIMIT: Duration = Duration::from_secs(3);
/// How long a lookup's answer is reused (the same request asks several
/// times; another replica's new object or holder shows after this).
const LOOKUP_TTL: Duration = Duration::from_secs(5);
/// Lookups remembered, weighed by their holders.
const LOOKUP_WEIGHT: u64 = 64 * 1024;
/// Largest object [`Shared::read_small`] reads into memory.
const SMALL_MAX: u64 = PART_SIZE as u64;

/// An object in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharedObject {
    /// Its size.
    pub(crate) size: u64,
    /// Routes known to hold it.
    pub(crate) holders: Vec<Holder>,
}

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    object: Option<SharedObject>,
}

#[derive(Debug, Clone)]
struct ByHolders;

impl quick_cache::Weighter<Digest, Seen> for ByHolders {
    fn weight(&self, _: &Digest, seen: &Seen) -> u64 {
        1 + seen.object.as_ref().map_or(0, |o| o.holders.len() as u64)
    }
}

/// The shared tier.
#[derive(Debug)]
pub(crate) struct Shared {
    store: Arc<dyn ObjectStore>,
    /// The configured prefix.
    base: Key,
    circuit: Circuit,
    metrics: Arc<Metrics>,
    uploads: Arc<Semaphore>,
    seen: quick_cache::sync::Cache<Digest, Seen, ByHolders>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Shared {
    /// The bucket `config` names, through `object_store`'s S3 client with
    /// credentials from the AWS environment, web identity or instance
    /// metadata. Nothing is sent yet: an unreachable bucket is found out
    /// (and logged) by [`Shared::probe`], and does not stop the service.
    pub(crate) fn connect(config: &S3Config, metrics: Arc<Metrics>) -> Result<Self, CacheError> {
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http)
            .with_virtual_hosted_style_request(config.virtual_hosted_style)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_millis(500),
                    base: 2.0,
                },
                max_retries: 2,
                retry_timeout: Duration::from_secs(5),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(config.allow_http)
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(60))
                    .with_pool_idle_timeout(Duration::from_secs(30)),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.as_str().trim_end_matches('/'));
        }
        let store = builder
            .build()
            .map_err(|e| CacheError::shared("configure", e))?;
        let base = Key::from_iter(config.prefix_segments());
        Ok(Self::new(Arc::new(store), base, metrics))
    }

    /// The tier on `store`, under `base`.
    pub(crate) fn new(store: Arc<dyn ObjectStore>, base: Key, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            base,
            circuit: Circuit::new(FAILURES_TO_SKIP, COOLDOWN),
            metrics,
            uploads: Arc::new(Semaphore::new(UPLOADS)),
            seen: quick_cache::sync::Cache::with_weighter(4096, LOOKUP_WEIGHT, ByHolders),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    fn object_dir(&self, digest: &Digest) -> Key {
        self.base
            .clone()
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn data_key(&self, digest: &Digest) -> Key {
        self.object_dir(digest).join("data")
    }

    fn holder_key(&self, digest: &Digest, holder: &Holder) -> Key {
        let mut key = self
            .object_dir(digest)
            .join("holders")
            .join(holder.upstream.as_str());
        for part in holder.repository.split('/') {
            key = key.join(part);
        }
        key
    }

    /// Runs one request against the bucket unless it is being skipped:
    /// `None` when skipped or failed (counted under `operation` and
    /// logged). "Not found" and "already exists" are answers, not failures.
    async fn attempt<T>(
        &self,
        operation: &'static str,
        limit: Option<Duration>,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Option<object_store::Result<T>> {
        if !self.circuit.allow() {
            return None;
        }
        let outcome = match limit {
            Some(limit) => match tokio::time::timeout(limit, request).await {
                Ok(outcome) => outcome.map_err(Failure::Store),
                Err(_) => Err(Failure::Slow(limit)),
            },
            None => request.await.map_err(Failure::Store),
        };
        match outcome {
            Ok(value) => {
                self.circuit.record_success();
                Some(Ok(value))
            }
            Err(Failure::Store(
                e @ (object_store::Error::NotFound { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }),
            )) => {
                self.circuit.record_success();
                Some(Err(e))
            }
            Err(failure) => {
                self.failed(operation, &failure.to_string());
                None
            }
        }
    }

    fn failed(&self, operation: &'static str, why: &str) {
        self.metrics.backend_error("s3", operation);
        self.circuit.record_failure(why);
        tracing::warn!(
            operation,
            error = why,
            "the shared cache (S3) failed; going on without it"
        );
    }

    /// Checks in the background that the bucket answers, so a wrong
    /// endpoint or missing credentials show in the log at start.
    pub(crate) fn probe(self: &Arc<Self>) {
        let shared = self.clone();
        self.tasks.spawn(async move {
            let listing = shared.store.list_with_delimiter(Some(&shared.base));
            if let Some(Ok(_)) = shared.attempt("lookup", Some(ANSWER_LIMIT), listing).await {
                tracing::info!(prefix = %shared.base, "the shared cache (S3) answers");
            }
        });
    }

    /// The object `digest` in the bucket and the routes known to hold it;
    /// `None` when it is not there, or the bucket is skipped or failing.
    pub(crate) async fn lookup(&self, digest: &Digest) -> Option<SharedObject> {
        if let Some(seen) = self.seen.get(digest) {
            if seen.at.elapsed() < LOOKUP_TTL {
                return seen.object;
            }
        }
        let dir = self.object_dir(digest);
        let listing = self.store.list(Some(&dir)).try_collect::<Vec<_>>();
        let found = self
            .attempt("lookup", Some(ANSWER_LIMIT), listing)
            .await?
            .ok()?;
        let data = self.data_key(digest);
        let holders_dir = dir.join("holders");
        let mut object = None;
        let mut holders = Vec::new();
        for meta in found {
            if meta.location == data {
                object = Some(meta.size);
            } else if let Some(parts) = meta.location.prefix_match(&holders_dir) {
                holders.extend(holder_of(parts));
            }
        }
        let object = object.map(|size| SharedObject { size, holders });
        self.remember(digest, object.clone());
        object
    }

    fn remember(&self, digest: &Digest, object: Option<SharedObject>) {
        self.seen.insert(
            digest.clone(),
            Seen {
                at: Instant::now(),
                object,
            },
        );
    }

    /// The bytes of `digest` from byte `from` to `size`, streamed (bounded
    /// memory, a ranged GET); `None` when the bucket does not answer within
    /// [`ANSWER_LIMIT`].
    pub(crate) async fn read(
        &self,
        digest: &Digest,
        from: u64,
        size: u64,
    ) -> Option<BoxStream<'static, object_store::Result<Bytes>>> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(from..size)),
            ..GetOptions::default()
        };
        let key = self.data_key(digest);
        let got = self
            .attempt(
                "read",
                Some(ANSWER_LIMIT),
                self.store.get_opts(&key, options),
            )
            .await?
            .ok()?;
        Some(got.into_stream())
    }

    /// A small object's bytes and its Content-Type; `None` when it is not
    /// there, too large, or the bucket is skipped or failing.
    pub(crate) async fn read_small(&self, digest: &Digest) -> Option<(Option<String>, Bytes)> {
        let object = self.lookup(digest).await?;
        if object.size > SMALL_MAX {
            return None;
        }
        let key = self.data_key(digest);
        let read = async {
            let got = self.store.get(&key).await?;
            let media_type = got
                .attributes
                .get(&Attribute::ContentType)
                .map(|v| v.to_string());
            Ok((media_type, got.bytes().await?))
        };
        self.attempt("read", Some(ANSWER_LIMIT), read).await?.ok()
    }

    /// Publishes a verified small object and its holders in the background:
    /// a create-only PUT (another replica's copy of the same digest is the
    /// same bytes, so "already exists" is success), then the holder records.
    pub(crate) fn publish(
        self: &Arc<Self>,
        digest: &Digest,
        bytes: Bytes,
        media_type: Option<&MediaType>,
        holders: Vec<Holder>,
    ) {
        let (shared, digest) = (self.clone(), digest.clone());
        let mut attributes = Attributes::new();
        if let Some(media_type) = media_type {
            attributes.insert(Attribute::ContentType, media_type.to_string().into());
        }
        self.tasks.spawn(async move {
            let Ok(_permit) = shared.uploads.clone().acquire_owned().await else {
                return;
            };
            let size = bytes.len() as u64;
            if shared.put_create(&digest, bytes, attributes).await {
                shared.published(&digest, size, holders).await;
            }
        });
    }

    async fn put_create(&self, digest: &Digest, bytes: Bytes, attributes: Attributes) -> bool {
        let options = PutOptions {
            mode: PutMode::Create,
            attributes,
            ..PutOptions::default()
        };
        let key = self.data_key(digest);
        let put = self.store.put_opts(&key, PutPayload::from(bytes), options);
        match self.attempt("write", None, put).await {
            Some(Ok(_)) => true,
            Some(Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            )) => {
                tracing::debug!(%digest, "another replica stored it first");
                true
            }
            Some(Err(e)) => {
                self.failed("write", &e.to_string());
                false
            }
            None => false,
        }
    }

    /// The data of `digest` is in the bucket: writes its holder records and
    /// remembers it.
    async fn published(&self, digest: &Digest, size: u64, holders: Vec<Holder>) {
        for holder in &holders {
            self.write_holder(digest, holder).await;
        }
        self.remember(digest, Some(SharedObject { size, holders }));
    }

    async fn write_holder(&self, digest: &Digest, holder: &Holder) {
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let key = self.holder_key(digest, holder);
        let put = self.store.put_opts(&key, PutPayload::default(), options);
        if let Some(Err(e)) = self.attempt("write", None, put).await {
            if !matches!(
                e,
                object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }
            ) {
                self.failed("write", &e.to_string());
            }
        }
    }

    /// Records, in the background, that `holder` holds `digest`, when the
    /// bucket has the object (a record without data would be litter).
    pub(crate) fn add_holder(self: &Arc<Self>, digest: &Digest, holder: Holder) {
        let (shared, digest) = (self.clone(), digest.clone());
        self.tasks.spawn(async move {
            let Some(mut object) = shared.lookup(&digest).await else {
                return;
            };
            if object.holders.contains(&holder) {
                return;
            }
            shared.write_holder(&digest, &holder).await;
            object.holders.push(holder);
            shared.remember(&digest, Some(object));
        });
    }

    /// Uploads a download's bytes as they arrive, in the background,
    /// following `reader` (which does not count as a caller): the object is
    /// published once the download is verified, and nothing is left behind
    /// when it fails. Skipped when the bucket has the object already (its
    /// holder is added) or is being skipped.
    pub(crate) fn upload<E: Clone + Send + Sync + 'static>(
        self: &Arc<Self>,
        digest: &Digest,
        size: u64,
        holder: Holder,
        reader: Reader<E>,
        progress: watch::Receiver<Progress<E>>,
    ) {
        let (shared, digest) = (self.clone(), digest.clone());
        self.tasks.spawn(async move {
            if shared.lookup(&digest).await.is_some() {
                shared.add_holder(&digest, holder);
                return;
            }
            let Ok(_permit) = shared.uploads.clone().acquire_owned().await else {
                return;
            };
            if shared.follow(&digest, size, reader, progress).await {
                shared.published(&digest, size, vec![holder]).await;
                tracing::debug!(%digest, size, "stored in the shared cache");
            }
        });
    }

    /// Follows a download to its end, uploading its bytes; true when the
    /// object was published (the download was verified). A stop of the
    /// service aborts the upload.
    async fn follow<E: Clone>(
        &self,
        digest: &Digest,
        size: u64,
        mut reader: Reader<E>,
        mut progress: watch::Receiver<Progress<E>>,
    ) -> bool {
        let stop = self.stop.clone();
        if size < PART_SIZE as u64 {
            let passed = tokio::select! {
                passed = verified(&mut progress) => passed,
                () = stop.cancelled() => false,
            };
            if !passed {
                return false;
            }
            let Some(bytes) = read_all(&mut reader, size).await else {
                self.failed("write", "cannot read a downloaded object back");
                return false;
            };
            return self.put_create(digest, bytes, Attributes::new()).await;
        }
        if matches!(progress.borrow().state, State::Failed(_)) {
            return false;
        }
        let key = self.data_key(digest);
        let Some(Ok(upload)) = self
            .attempt("write", None, self.store.put_multipart(&key))
            .await
        else {
            return false;
        };
        let mut upload = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let sent = tokio::select! {
            sent = self.send_parts(&mut upload, size, &mut reader, &mut progress) => sent,
            () = stop.cancelled() => false,
        };
        if !sent {
            return self.abort(upload).await;
        }
        match self.attempt("commit", None, upload.finish()).await {
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                self.failed("commit", &e.to_string());
                false
            }
            None => false,
        }
    }

    /// Hands a download's bytes to `upload` as they arrive (at most
    /// [`PARTS_IN_FLIGHT`] parts uploading); true once every byte went and
    /// the download was verified, false when it failed or a part could not
    /// go (counted).
    async fn send_parts<E: Clone>(
        &self,
        upload: &mut WriteMultipart,
        size: u64,
        reader: &mut Reader<E>,
        progress: &mut watch::Receiver<Progress<E>>,
    ) -> bool {
        let mut sent = 0;
        loop {
            let (available, state) = {
                let p = progress.borrow_and_update();
                (p.available, p.state.clone())
            };
            if matches!(state, State::Failed(_)) {
                return false;
            }
            while sent < available {
                let len = (available - sent).min(1024 * 1024) as usize;
                let Ok(bytes) = reader.read(sent, len).await else {
                    self.failed("write", "cannot read a download back");
                    return false;
                };
                sent += bytes.len() as u64;
                upload.put(bytes);
                if let Err(e) = upload.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    self.failed("write", &e.to_string());
                    return false;
                }
            }
            if matches!(state, State::Verified) && sent == size {
                return true;
            }
            if progress.changed().await.is_err() && sent == available {
                // The download ended without a verdict.
                return false;
            }
        }
    }

    /// Aborts an upload: its parts are dropped, its key never appears.
    async fn abort(&self, upload: WriteMultipart) -> bool {
        if let Err(e) = upload.abort().await {
            self.metrics.backend_error("s3", "abort");
            tracing::warn!(error = %e, "cannot abort a multipart upload (a bucket lifecycle rule removes it)");
        }
        false
    }

    /// Deletes `digest` and its holder records from the bucket; true when
    /// its data was there.
    pub(crate) async fn evict(&self, digest: &Digest) -> bool {
        self.seen.remove(digest);
        let Some(object) = self.lookup(digest).await else {
            return false;
        };
        self.seen.remove(digest);
        let data = self.data_key(digest);
        if self
            .attempt("evict", None, self.store.delete(&data))
            .await
            .is_none()
        {
            return false;
        }
        for holder in &object.holders {
            let key = self.holder_key(digest, holder);
            self.attempt("evict", None, self.store.delete(&key)).await;
        }
        true
    }

    /// Runs `work` in the background, tracked for [`Shared::settle`];
    /// `work` gets the token that says the service is stopping.
    pub(crate) fn spawn<F: Future<Output = ()> + Send + 'static>(
        &self,
        work: impl FnOnce(CancellationToken) -> F,
    ) {
        self.tasks.spawn(work(self.stop.clone()));
    }

    /// Stops uploads under way (aborting them) and waits for the
    /// background work to end.
    pub(crate) async fn settle(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Bytes gathered from the bucket before they are handed to the writer.
const FLUSH_SIZE: usize = 256 * 1024;
/// Ranged GETs that resume a read from the bucket before giving up.
const MAX_RESUMES: u32 = 2;

/// Moves an object's bytes from the bucket (`body`, the first GET) to a
/// download's writer, resuming with ranged GETs when the connection
/// breaks; the file once every byte was written and the digest passed.
pub(super) async fn fill<E: Clone + Send + Sync + 'static>(
    shared: &Shared,
    digest: &Digest,
    download: &Download<E>,
    mut writer: DownloadWriter,
    mut body: BoxStream<'static, object_store::Result<Bytes>>,
) -> Result<Written, CacheError> {
    let size = download.size;
    let (mut received, mut resumes) = (0u64, 0);
    let (mut batch, mut batch_len) = (Vec::new(), 0u64);
    loop {
        // `None` while the body goes on; else how it ended (`Some(None)`:
        // its end, `Some(Some(e))`: a failure).
        let end = match body.next().await {
            Some(Ok(chunk)) => {
                if received + batch_len + chunk.len() as u64 > size {
                    return Err(CacheError::SharedDamaged(digest.clone()));
                }
                batch_len += chunk.len() as u64;
                batch.push(chunk);
                if batch_len < FLUSH_SIZE as u64 {
                    continue;
                }
                None
            }
            Some(Err(e)) => Some(Some(e)),
            None => Some(None),
        };
        if batch_len > 0 {
            received += batch_len;
            batch_len = 0;
            writer.write(std::mem::take(&mut batch)).await?;
        }
        match end {
            None => continue,
            Some(None) if received == size => break,
            Some(None) => shared.failed("read", "a read ended before its last byte"),
            Some(Some(e)) => shared.failed("read", &e.to_string()),
        }
        if resumes == MAX_RESUMES {
            return Err(CacheError::SharedLost);
        }
        resumes += 1;
        tracing::info!(%digest, received, size, "a read from the shared cache broke off; resuming");
        body = shared
            .read(digest, received, size)
            .await
            .ok_or(CacheError::SharedLost)?;
    }
    let (written, verifier) = writer.finish().await?;
    if verifier.finish() != *digest {
        return Err(CacheError::SharedDamaged(digest.clone()));
    }
    Ok(written)
}

/// Why a request to the bucket failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Store(object_store::Error),
    #[error("no answer within {0:?}")]
    Slow(Duration),
}

/// The holder named by the key parts after `holders/`.
fn holder_of<'a>(mut parts: impl Iterator<Item = PathPart<'a>>) -> Option<Holder> {
    let upstream = decode(parts.next()?.as_ref())?;
    let repository = parts
        .map(|p| decode(p.as_ref()))
        .collect::<Option<Vec<_>>>()?
        .join("/");
    (!repository.is_empty()).then_some(Holder {
        upstream,
        repository,
    })
}

fn decode(part: &str) -> Option<String> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// Waits for the download's verdict: true when verified.
async fn verified<E: Clone>(progress: &mut watch::Receiver<Progress<E>>) -> bool {
    loop {
        match progress.borrow_and_update().state {
            State::Verified => return true,
            State::Failed(_) => return false,
            State::Running => {}
        }
        if progress.changed().await.is_err() {
            return matches!(progress.borrow().state, State::Verified);
        }
    }
}

/// A small object's bytes, read back whole.
async fn read_all<E: Clone>(reader: &mut Reader<E>, size: u64) -> Option<Bytes> {
    let mut out = bytes::BytesMut::with_capacity(size as usize);
    while (out.len() as u64) < size {
        let chunk = reader
            .read(out.len() as u64, (size - out.len() as u64) as usize)
            .await
            .ok()?;
        out.extend_from_slice(&chunk);
    }
    Some(out.freeze())
}
