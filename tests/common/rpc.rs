//! RPC helpers shared by tests: request builders, unary calls bounded by
//! [`RPC_BOUND`] (so a hung service fails the test instead of hanging CI; a
//! bound, not a timing assertion), and the one FetchBlob reader,
//! [`BlobStream`], which checks the stream's framing as it reads: info on
//! the first message only, at most 1 MiB of data per message, each
//! message's `offset` the position of its first byte.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use oci_upstream::pb::upstream_service_client::UpstreamServiceClient;
use oci_upstream::pb::{
    BlobInfo, FetchBlobRequest, FetchBlobResponse, FetchManifestRequest, FetchManifestResponse,
    FetchTagsRequest, FetchTagsResponse, HeadBlobRequest, HeadBlobResponse, HeadManifestRequest,
    HeadManifestResponse,
};
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::content::sha256_finish;

/// A client of the service.
pub type Client = UpstreamServiceClient<Channel>;

/// Upper bound on one RPC (a whole blob stream included).
pub const RPC_BOUND: Duration = Duration::from_secs(180);

/// Awaits `fut`, failing the test if it takes longer than [`RPC_BOUND`].
pub async fn bounded<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(RPC_BOUND, fut)
        .await
        .expect("the service answered within the RPC bound")
}

/// Awaits a unary `call` within [`RPC_BOUND`] and returns its message, for
/// requests the helpers below do not build (platform, paging, `upstream`,
/// `accept`, bad input).
pub async fn unary<T>(
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    bounded(call).await.map(tonic::Response::into_inner)
}

/// A FetchManifest request for `repository` at `reference`; other fields
/// default.
pub fn manifest_request(repository: &str, reference: &str) -> FetchManifestRequest {
    FetchManifestRequest {
        repository: repository.into(),
        reference: reference.into(),
        ..Default::default()
    }
}

/// A HeadManifest request for `repository` at `reference`; other fields
/// default.
pub fn head_manifest_request(repository: &str, reference: &str) -> HeadManifestRequest {
    HeadManifestRequest {
        repository: repository.into(),
        reference: reference.into(),
        ..Default::default()
    }
}

/// A FetchBlob request for the whole blob `digest` in `repository`; other
/// fields default.
pub fn blob_request(repository: &str, digest: &str) -> FetchBlobRequest {
    FetchBlobRequest {
        repository: repository.into(),
        digest: digest.into(),
        ..Default::default()
    }
}

/// A HeadBlob request for `digest` in `repository`; other fields default.
pub fn head_blob_request(repository: &str, digest: &str) -> HeadBlobRequest {
    HeadBlobRequest {
        repository: repository.into(),
        digest: digest.into(),
        ..Default::default()
    }
}

/// A FetchTags request for all tags of `repository` (no `n`, no `last`).
pub fn tags_request(repository: &str) -> FetchTagsRequest {
    FetchTagsRequest {
        repository: repository.into(),
        ..Default::default()
    }
}

/// FetchManifest of `repository` at `reference`.
pub async fn fetch_manifest(
    client: &mut Client,
    repository: &str,
    reference: &str,
) -> Result<FetchManifestResponse, Status> {
    unary(client.fetch_manifest(manifest_request(repository, reference))).await
}

/// HeadManifest of `repository` at `reference`.
pub async fn head_manifest(
    client: &mut Client,
    repository: &str,
    reference: &str,
) -> Result<HeadManifestResponse, Status> {
    unary(client.head_manifest(head_manifest_request(repository, reference))).await
}

/// HeadBlob of `digest` in `repository`.
pub async fn head_blob(
    client: &mut Client,
    repository: &str,
    digest: &str,
) -> Result<HeadBlobResponse, Status> {
    unary(client.head_blob(head_blob_request(repository, digest))).await
}

/// FetchTags of all tags of `repository`.
pub async fn fetch_tags(
    client: &mut Client,
    repository: &str,
) -> Result<FetchTagsResponse, Status> {
    unary(client.fetch_tags(tags_request(repository))).await
}

/// Expects a failed call and returns its status; an OK answer fails the
/// test, showing the response.
pub fn expect_err<T: std::fmt::Debug>(result: Result<tonic::Response<T>, Status>) -> Status {
    match result {
        Ok(response) => panic!("expected an error, got OK: {:?}", response.into_inner()),
        Err(status) => status,
    }
}

/// The most `data` one FetchBlob message may carry.
pub const MAX_MESSAGE_DATA: usize = 1 << 20;

/// What a FetchBlob stream delivered: the info, the data (kept unless
/// [`BlobStream::discard`] was asked), its length and sha256, the message
/// count and largest message, and how it ended.
#[derive(Debug)]
pub struct BlobRead {
    /// The first message's info.
    pub info: Option<BlobInfo>,
    /// The data bytes, in order (empty when discarded).
    pub data: Vec<u8>,
    /// How many data bytes arrived.
    pub len: u64,
    /// `sha256:` of the data bytes (set when the read ends).
    pub sha256: String,
    /// Messages received.
    pub messages: usize,
    /// Largest `data` of one message.
    pub largest: usize,
    /// How the call or the stream ended.
    pub end: Result<(), Status>,
}

impl BlobRead {
    fn new() -> BlobRead {
        BlobRead {
            info: None,
            data: Vec::new(),
            len: 0,
            sha256: String::new(),
            messages: 0,
            largest: 0,
            end: Ok(()),
        }
    }

    /// The status the read ended with, if it failed.
    pub fn error(&self) -> Option<&Status> {
        self.end.as_ref().err()
    }

    /// The info of a read that ended OK; panics with the status otherwise.
    pub fn ok(&self) -> &BlobInfo {
        if let Err(status) = &self.end {
            panic!("FetchBlob failed: {status:?}");
        }
        self.info
            .as_ref()
            .expect("the first FetchBlob message carries info")
    }

    /// The info and the read, of a read that ended OK (panics otherwise).
    pub fn succeeded(self) -> (BlobInfo, BlobRead) {
        let info = self.ok().clone();
        (info, self)
    }

    /// Asserts the read ended OK with exactly `want` (length and sha256).
    #[track_caller]
    pub fn assert_bytes(&self, want: &[u8], what: &str) {
        assert!(self.end.is_ok(), "{what}: stream failed: {:?}", self.end);
        assert_eq!(
            self.len,
            want.len() as u64,
            "{what}: length of the streamed blob"
        );
        assert_eq!(
            self.sha256,
            super::content::sha256_digest(want),
            "{what}: digest of the streamed bytes"
        );
    }
}

/// A FetchBlob stream being read, message by message.
pub struct BlobStream {
    stream: Streaming<FetchBlobResponse>,
    start: i64,
    keep: bool,
    expected: Option<Bytes>,
    hasher: Sha256,
    read: BlobRead,
}

impl BlobStream {
    /// Calls FetchBlob (the call bounded by [`RPC_BOUND`]).
    pub async fn open(
        client: &mut Client,
        request: FetchBlobRequest,
    ) -> Result<BlobStream, Status> {
        Self::open_call(client, tonic::Request::new(request)).await
    }

    /// As [`BlobStream::open`], for a request with metadata (a deadline).
    pub async fn open_call(
        client: &mut Client,
        request: tonic::Request<FetchBlobRequest>,
    ) -> Result<BlobStream, Status> {
        let start = request.get_ref().offset;
        let stream = bounded(client.fetch_blob(request)).await?.into_inner();
        Ok(BlobStream {
            stream,
            start,
            keep: true,
            expected: None,
            hasher: Sha256::new(),
            read: BlobRead::new(),
        })
    }

    /// Counts and hashes the data without keeping it (for big blobs).
    pub fn discard(mut self) -> BlobStream {
        self.keep = false;
        self
    }

    /// Compares every data byte, as it arrives, with `expected` (the whole
    /// blob; the stream must start at offset 0): a stream read to its end
    /// with all its bytes is then byte-identical to the blob. Implies
    /// [`BlobStream::discard`] (comparing is cheap; keeping many 64 MiB
    /// streams is not).
    pub fn expect(mut self, expected: Bytes) -> BlobStream {
        self.expected = Some(expected);
        self.keep = false;
        self
    }

    /// What was read so far.
    pub fn read(&self) -> &BlobRead {
        &self.read
    }

    /// Reads one message (bounded by [`RPC_BOUND`]), checking its framing;
    /// false at the end of the stream.
    pub async fn step(&mut self) -> Result<bool, Status> {
        let Some(msg) = bounded(self.stream.message()).await? else {
            return Ok(false);
        };
        let index = self.read.messages;
        let FetchBlobResponse { info, data, offset } = msg;
        if index == 0 {
            assert!(info.is_some(), "the first FetchBlob message carries info");
            self.read.info = info;
        } else {
            assert!(
                info.is_none(),
                "message {index} carries info; only the first may"
            );
        }
        assert!(
            data.len() <= MAX_MESSAGE_DATA,
            "message {index} carries {} bytes, more than 1 MiB",
            data.len()
        );
        if !data.is_empty() {
            assert_eq!(
                offset,
                self.start + self.read.len as i64,
                "message {index}: offset is not the position of its first byte"
            );
        }
        if let Some(expected) = &self.expected {
            let at = usize::try_from(self.read.len).expect("offsets fit in usize");
            let end = at + data.len();
            assert!(
                end <= expected.len() && data[..] == expected[at..end],
                "bytes {at}..{end} of the blob differ from the upstream's"
            );
        }
        self.hasher.update(&data);
        self.read.messages += 1;
        self.read.largest = self.read.largest.max(data.len());
        self.read.len += data.len() as u64;
        if self.keep {
            self.read.data.extend_from_slice(&data);
        }
        Ok(true)
    }

    /// Reads until the first data has arrived; panics if the stream fails
    /// or ends before.
    pub async fn first_data(&mut self) {
        while self.read.len == 0 {
            let more = self.step().await.expect("FetchBlob stream");
            assert!(more, "the stream ended before any data");
        }
    }

    /// What was read so far, ending the read here (`end` stays OK).
    pub fn into_read(mut self) -> BlobRead {
        self.read.sha256 = sha256_finish(self.hasher);
        self.read
    }

    /// Reads to the end; the result holds how the stream ended.
    pub async fn finish(mut self) -> BlobRead {
        let end = loop {
            match self.step().await {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(status) => break Err(status),
            }
        };
        self.read.end = end;
        self.read.sha256 = sha256_finish(self.hasher);
        self.read
    }
}

/// FetchBlob of `request`, read to its end: the status goes into
/// [`BlobRead::end`] whether it came as the call's answer or as the stream's
/// terminating item.
pub async fn read_blob(client: &mut Client, request: FetchBlobRequest) -> BlobRead {
    read_blob_call(client, tonic::Request::new(request)).await
}

/// As [`read_blob`], counting and hashing the data without keeping it.
pub async fn read_blob_discarded(client: &mut Client, request: FetchBlobRequest) -> BlobRead {
    read_blob_inner(client, tonic::Request::new(request), false).await
}

/// As [`read_blob`], for a request with metadata.
pub async fn read_blob_call(
    client: &mut Client,
    request: tonic::Request<FetchBlobRequest>,
) -> BlobRead {
    read_blob_inner(client, request, true).await
}

async fn read_blob_inner(
    client: &mut Client,
    request: tonic::Request<FetchBlobRequest>,
    keep: bool,
) -> BlobRead {
    match BlobStream::open_call(client, request).await {
        Ok(stream) if keep => stream.finish().await,
        Ok(stream) => stream.discard().finish().await,
        Err(status) => BlobRead {
            end: Err(status),
            sha256: sha256_finish(Sha256::new()),
            ..BlobRead::new()
        },
    }
}

/// FetchBlob of the whole blob `digest` in `repository`, read to the end of
/// the stream: the blob's bytes, or the status the call or the stream ended
/// with.
pub async fn fetch_blob_bytes(
    client: &mut Client,
    repository: &str,
    digest: &str,
) -> Result<Vec<u8>, Status> {
    let read = read_blob(client, blob_request(repository, digest)).await;
    read.end.map(|()| read.data)
}
