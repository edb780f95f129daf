//! HTTP helpers shared by the operations: bounded body reads and the
//! `Content-Length` header.

use bytes::{Bytes, BytesMut};
use reqwest::header::HeaderMap;

pub(crate) use crate::telemetry::describe;

/// Why a bounded body read failed.
#[derive(Debug)]
pub enum ReadError {
    /// The body is longer than the limit.
    TooLarge(usize),
    /// The connection failed.
    Transport(reqwest::Error),
}

/// Reads a body, refusing one longer than `limit` (by `Content-Length` before
/// reading, or as soon as the bytes read pass it).
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, ReadError> {
    if content_length(response.headers()).is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge(limit));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Reads at most `limit` bytes of a body and drops the rest (for error
/// bodies, which only feed a message).
pub async fn read_prefix(mut response: reqwest::Response, limit: usize) -> Bytes {
    let mut body = BytesMut::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            _ => break,
        }
    }
    body.freeze()
}

/// The `Content-Length` header, parsed.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(reqwest::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
