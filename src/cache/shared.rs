//! The shared tier: the content-addressable store every replica shares on
//! S3-compatible object storage (DESIGN §8), behind the disk store. Keys,
//! under the configured prefix:
//!
//! ```text
//! sha256/<hex>/data                            the bytes (a manifest's media type in x-amz-meta-oci-media-type)
//! sha256/<hex>/holders/<upstream>/<repository> empty: that route is known to hold the object
//! ```
//!
//! One LIST of `sha256/<hex>/` tells whether an object is there, its size
//! and the routes known to hold it. `data` is written only with bytes whose
//! digest passed: a small object create-only after verification, a large one
//! as a multipart upload that follows the download and is completed only
//! once the digest passed (aborted on any failure), so no reader ever sees a
//! partial or unverified object. Holder records are written after the data,
//! and only for a route whose bytes passed or an upstream confirmed.
//!
//! The tier is an optimisation, never a dependency: requests a caller waits
//! for have a short time limit, every request a short retry budget,
//! failures are counted and logged, and after [`FAILURES_TO_SKIP`] in a row
//! the bucket is skipped for [`COOLDOWN`] (the shared [`Circuit`]). A
//! skipped or failing bucket reads as a miss and writes as nothing. Work in
//! the background is bounded: [`UPLOADS`] uploads at a time and at most
//! [`QUEUED`] more waiting; past that an object is not published.

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
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
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
use crate::telemetry::describe;

/// Parts of a multipart upload (S3's minimum is 5 MiB); objects smaller
/// than one part are written in one create-only PUT.
pub(super) const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one object uploading at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Objects uploading at once; each holds at most `PART_SIZE ×
/// (PARTS_IN_FLIGHT + 1)` bytes, so uploads hold at most 48 MiB.
const UPLOADS: usize = 2;
/// Background writes (uploads, holder records) waiting for their turn, each
/// holding its download's file open; past this, they are skipped.
const QUEUED: usize = 16;
/// Failures in a row after which the bucket is skipped ...
const FAILURES_TO_SKIP: u32 = 3;
/// ... for this long (then one request probes it).
const COOLDOWN: Duration = Duration::from_secs(30);
/// Longest wait for a lookup or the start of a read, which callers wait
/// for: past it, the bucket counts as failing and the request goes on
/// without it.
const ANSWER_LIMIT: Duration = Duration::from_secs(3);
/// Longest silence of a connection to the bucket (no byte sent or
/// received) before the request fails.
const IDLE_LIMIT: Duration = Duration::from_secs(15);
/// How long a lookup's answer (or its failure, as a miss) is reused: the
/// same request asks several times; another replica's new object or holder
/// shows after this.
const LOOKUP_TTL: Duration = Duration::from_secs(5);
/// Lookups remembered, weighed by their holders.
const LOOKUP_WEIGHT: u64 = 64 * 1024;
/// Keys one lookup reads (one LIST page): `data` sorts first, so a popular
/// object's holders beyond this are not seen, and a route among them is
/// confirmed by its upstream instead.
const LISTED: usize = 1000;
/// Largest object [`Shared::read_small`] reads into memory.
const SMALL_MAX: u64 = PART_SIZE as u64;
/// The metadata key (`x-amz-meta-...`) of a manifest's media type.
const MEDIA_TYPE_KEY: &str = "oci-media-type";

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

/// How a request to the bucket went.
enum Answer<T> {
    /// It succeeded.
    Value(T),
    /// The key is not there.
    Missing,
    /// A create-only write found the key there (another replica's copy of
    /// the same verified bytes).
    Exists,
    /// It failed (counted and logged), or the bucket is being skipped.
    Failed,
}

/// Why a request to the bucket failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Store(object_store::Error),
    #[error("no answer within {0:?}")]
    Slow(Duration),
    #[error("{0}")]
    Broken(&'static str),
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
    queued: Arc<Semaphore>,
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
                // No limit on a whole request (a GET of a large layer takes
                // as long as it takes); a connection silent for IDLE_LIMIT
                // fails.
                ClientOptions::new()
                    .with_allow_http(config.allow_http)
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout_disabled()
                    .with_read_timeout(IDLE_LIMIT)
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
            queued: Arc::new(Semaphore::new(QUEUED)),
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

    /// Sends one request unless the bucket is being skipped.
    async fn attempt<T>(
        &self,
        operation: &'static str,
        limit: Option<Duration>,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Answer<T> {
        if !self.circuit.allow() {
            return Answer::Failed;
        }
        self.run(operation, limit, request).await
    }

    /// Sends one request (skipped bucket or not: the end of an upload under
    /// way), within `limit`; a failure is counted under `operation`.
    async fn run<T>(
        &self,
        operation: &'static str,
        limit: Option<Duration>,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Answer<T> {
        let outcome = match limit {
            Some(limit) => match tokio::time::timeout(limit, request).await {
                Ok(outcome) => outcome.map_err(Failure::Store),
                Err(_) => Err(Failure::Slow(limit)),
            },
            None => request.await.map_err(Failure::Store),
        };
        let answer = match outcome {
            Ok(value) => Answer::Value(value),
            Err(Failure::Store(object_store::Error::NotFound { .. })) => Answer::Missing,
            Err(Failure::Store(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            )) => Answer::Exists,
            Err(failure) => {
                self.failed(operation, &failure);
                return Answer::Failed;
            }
        };
        self.circuit.record_success();
        answer
    }

    fn failed(&self, operation: &'static str, failure: &Failure) {
        let why = describe(failure);
        self.metrics.backend_error("s3", operation);
        self.circuit.record_failure(&why);
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
            if let Answer::Value(_) = shared.attempt("lookup", Some(ANSWER_LIMIT), listing).await {
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
        let listing = self
            .store
            .list(Some(&dir))
            .take(LISTED)
            .try_collect::<Vec<_>>();
        let found = match self.attempt("lookup", Some(ANSWER_LIMIT), listing).await {
            Answer::Value(found) => found,
            Answer::Missing | Answer::Exists => Vec::new(),
            // A failure reads as a miss for a moment too, so the several
            // lookups of one request wait for the bucket once.
            Answer::Failed => {
                self.remember(digest, None);
                return None;
            }
        };
        let data = self.data_key(digest);
        let holders_dir = dir.join("holders");
        let mut size = None;
        let mut holders = Vec::new();
        for meta in found {
            if meta.location == data {
                size = Some(meta.size);
            } else if let Some(parts) = meta.location.prefix_match(&holders_dir) {
                holders.extend(holder_of(parts));
            }
        }
        let object = size.map(|size| SharedObject { size, holders });
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
    /// [`ANSWER_LIMIT`] or no longer has the object.
    pub(crate) async fn read(
        &self,
        digest: &Digest,
        from: u64,
        size: u64,
    ) -> Option<BoxStream<'static, object_store::Result<Bytes>>> {
        if from >= size {
            // Nothing to read (an empty blob): no request, which S3 would
            // refuse for an empty range anyway.
            return Some(futures::stream::empty().boxed());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(from..size)),
            ..GetOptions::default()
        };
        let key = self.data_key(digest);
        let get = self.store.get_opts(&key, options);
        match self.attempt("read", Some(ANSWER_LIMIT), get).await {
            Answer::Value(got) => Some(got.into_stream()),
            Answer::Missing | Answer::Exists => {
                // Deleted since it was looked up (an eviction elsewhere).
                self.seen.remove(digest);
                None
            }
            Answer::Failed => None,
        }
    }

    /// A manifest's bytes and media type; `None` when it is not there, is
    /// not a manifest (no media type stored with it), is too large, or the
    /// bucket is skipped or failing.
    pub(crate) async fn read_small(&self, digest: &Digest) -> Option<(String, Bytes)> {
        let object = self.lookup(digest).await?;
        if object.size > SMALL_MAX {
            return None;
        }
        let key = self.data_key(digest);
        let read = async {
            let got = self.store.get(&key).await?;
            let media_type = got
                .attributes
                .get(&Attribute::Metadata(MEDIA_TYPE_KEY.into()))
                .map(|v| v.to_string());
            Ok((media_type, got.bytes().await?))
        };
        match self.attempt("read", Some(ANSWER_LIMIT), read).await {
            Answer::Value((Some(media_type), bytes)) => Some((media_type, bytes)),
            Answer::Value((None, _)) | Answer::Failed => None,
            Answer::Missing | Answer::Exists => {
                self.seen.remove(digest);
                None
            }
        }
    }

    /// A place in the background queue, if there is one.
    fn queue_slot(&self, digest: &Digest) -> Option<OwnedSemaphorePermit> {
        let slot = self.queued.clone().try_acquire_owned().ok();
        if slot.is_none() {
            tracing::debug!(%digest, "the shared cache's queue is full; not publishing");
        }
        slot
    }

    /// Publishes a verified manifest and its holders in the background: a
    /// create-only PUT (another replica's copy of the same digest is the
    /// same bytes, so "already exists" is success), then the holder records.
    pub(crate) fn publish(
        self: &Arc<Self>,
        digest: &Digest,
        bytes: Bytes,
        media_type: &MediaType,
        holders: Vec<Holder>,
    ) {
        let Some(slot) = self.queue_slot(digest) else {
            return;
        };
        let (shared, digest) = (self.clone(), digest.clone());
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, media_type.to_string().into());
        attributes.insert(
            Attribute::Metadata(MEDIA_TYPE_KEY.into()),
            media_type.to_string().into(),
        );
        self.tasks.spawn(async move {
            let Ok(_turn) = shared.uploads.clone().acquire_owned().await else {
                return;
            };
            drop(slot);
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
            Answer::Value(_) => true,
            Answer::Exists => {
                tracing::debug!(%digest, "another replica stored it first");
                true
            }
            Answer::Missing | Answer::Failed => false,
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
        // Written, there already, or failed (counted).
        let _ = self.attempt("write", None, put).await;
    }

    /// Records that `holder` (whose upstream confirmed it, or whose bytes
    /// passed) holds `digest`, when the bucket has the object (a record
    /// without data would be litter): at once for this replica's next
    /// lookups, in the background in the bucket.
    pub(crate) fn add_holder(self: &Arc<Self>, digest: &Digest, holder: Holder) {
        if let Some(seen) = self.seen.get(digest) {
            if let Some(mut object) = seen.object.filter(|o| !o.holders.contains(&holder)) {
                object.holders.push(holder.clone());
                self.seen.insert(
                    digest.clone(),
                    Seen {
                        object: Some(object),
                        ..seen
                    },
                );
            }
        }
        let Some(slot) = self.queue_slot(digest) else {
            return;
        };
        let (shared, digest) = (self.clone(), digest.clone());
        self.tasks.spawn(async move {
            let _slot = slot;
            if shared.lookup(&digest).await.is_some() {
                shared.write_holder(&digest, &holder).await;
            }
        });
    }

    /// Uploads a download's bytes as they arrive, in the background,
    /// following `reader` (which does not count as a caller): the object is
    /// published once the download is verified, and nothing is left behind
    /// when it fails. When the bucket has the object already, only the
    /// holder is added, once the bytes passed.
    pub(crate) fn upload<E: Clone + Send + Sync + 'static>(
        self: &Arc<Self>,
        digest: &Digest,
        size: u64,
        holder: Holder,
        reader: Reader<E>,
        mut progress: watch::Receiver<Progress<E>>,
    ) {
        let Some(slot) = self.queue_slot(digest) else {
            return;
        };
        let (shared, digest) = (self.clone(), digest.clone());
        self.tasks.spawn(async move {
            if shared.lookup(&digest).await.is_some() {
                drop(slot);
                let stop = shared.stop.clone();
                let passed = tokio::select! {
                    passed = verified(&mut progress) => passed,
                    () = stop.cancelled() => false,
                };
                if passed {
                    shared.add_holder(&digest, holder);
                }
                return;
            }
            let Ok(_turn) = shared.uploads.clone().acquire_owned().await else {
                return;
            };
            drop(slot);
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
                self.failed("write", &Failure::Broken("cannot read a download back"));
                return false;
            };
            return self.put_create(digest, bytes, Attributes::new()).await;
        }
        if matches!(progress.borrow().state, State::Failed(_)) {
            return false;
        }
        let key = self.data_key(digest);
        let Answer::Value(upload) = self
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
        // Completes even while the bucket is being skipped: dropping it
        // would leave its parts behind. (It aborts itself on failure.)
        matches!(
            self.run("commit", None, upload.finish()).await,
            Answer::Value(_)
        )
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
                    self.failed("write", &Failure::Broken("cannot read a download back"));
                    return false;
                };
                sent += bytes.len() as u64;
                upload.put(bytes);
                if let Err(e) = upload.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    self.failed("write", &Failure::Store(e));
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
            tracing::warn!(error = %describe(&e), "cannot abort a multipart upload (a bucket lifecycle rule removes it)");
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
        if !matches!(
            self.attempt("evict", None, self.store.delete(&data)).await,
            Answer::Value(()) | Answer::Missing
        ) {
            return false;
        }
        for holder in &object.holders {
            let key = self.holder_key(digest, holder);
            let _ = self.attempt("evict", None, self.store.delete(&key)).await;
        }
        true
    }

    /// Deletes a damaged copy of `digest` in the background.
    pub(crate) fn evict_damaged(self: &Arc<Self>, digest: &Digest) {
        let (shared, digest) = (self.clone(), digest.clone());
        self.tasks.spawn(async move {
            shared.evict(&digest).await;
        });
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
const BUCKET_BATCH: usize = 256 * 1024;
/// Ranged GETs that resume a read from the bucket before giving up.
const MAX_RESUMES: u32 = 2;

/// Moves an object's bytes from the bucket (`body`, the first GET) to a
/// download's writer, resuming with ranged GETs when the connection
/// breaks; the file once every byte was written and the digest passed.
pub(super) async fn fill_from_bucket<E: Clone + Send + Sync + 'static>(
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
                if batch_len < BUCKET_BATCH as u64 {
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
            Some(None) => shared.failed(
                "read",
                &Failure::Broken("a read ended before its last byte"),
            ),
            Some(Some(e)) => shared.failed("read", &Failure::Store(e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_keys_round_trip_through_their_encoding() {
        let shared = Shared::new(
            Arc::new(object_store::memory::InMemory::new()),
            Key::from("p"),
            Arc::default(),
        );
        let digest = crate::oci::Algorithm::Sha256.digest(b"x");
        for (upstream, repository) in [
            ("hub", "library/nginx"),
            ("..", "a/b.c/d-e_f"),
            ("a%b", "x"),
        ] {
            let holder = Holder {
                upstream: upstream.into(),
                repository: repository.into(),
            };
            let key = shared.holder_key(&digest, &holder);
            let parts = key
                .prefix_match(&shared.object_dir(&digest).join("holders"))
                .unwrap();
            assert_eq!(holder_of(parts), Some(holder), "{key}");
        }
    }
}
