//! One upstream's answer for a manifest: GET (bytes read within the size
//! cap, digest checked against the reference and `Docker-Content-Digest`,
//! media type inspected), HEAD (falling back to GET when the headers do
//! not say enough), and a HEAD that only asks for the digest (for tag
//! refreshes, which must not spend a GET when nothing changed).

use std::sync::Arc;

use bytes::Bytes;
use reqwest::Method;

use super::super::client::Upstream;
use super::super::distribution::{
    content_type, fault_from_response, header_digest_for, manifest_request,
};
use super::super::http::content_length;
use super::super::{Fault, Limits, Source};
use super::{Manifest, ManifestMeta};
use crate::oci::manifest::inspect;
use crate::oci::{Digest, MediaType, Reference, Repository};

/// Checks `bytes` against `expected`, and against a `Docker-Content-Digest`
/// the upstream sent; returns the digest computed with `expected`'s
/// algorithm (sha256 when there is none).
fn verify_digest(
    upstream: &Upstream,
    what: &str,
    bytes: &Bytes,
    expected: Option<&Digest>,
    header: Option<&Digest>,
) -> Result<Digest, Fault> {
    let algorithm = expected.map_or(crate::oci::Algorithm::Sha256, Digest::algorithm);
    let computed = algorithm.digest(bytes);
    if let Some(expected) = expected {
        if *expected != computed {
            return Err(Fault::integrity(format!(
                "upstream `{}` sent bytes for {what} that hash to {computed}",
                upstream.name()
            )));
        }
    }
    if let Some(header) = header {
        let matches = if header.algorithm() == algorithm {
            *header == computed
        } else {
            header.matches(bytes)
        };
        if !matches {
            return Err(Fault::integrity(format!(
                "upstream `{}` sent {what} with Docker-Content-Digest {header}, but its bytes hash to {computed}",
                upstream.name()
            )));
        }
    }
    Ok(computed)
}

pub(super) async fn get_manifest(
    upstream: &Arc<Upstream>,
    limits: Limits,
    repository: &Repository,
    reference: &Reference,
    accept: &[MediaType],
) -> Result<Manifest, Fault> {
    let request = manifest_request(upstream, Method::GET, repository, reference, accept);
    let response = upstream.send(&request).await?;
    if !response.status().is_success() {
        return Err(fault_from_response(upstream, &request.what, response).await);
    }
    let header = header_digest_for(upstream, &request.what, reference, response.headers())?;
    let content_type = content_type(response.headers());
    let bytes = upstream
        .read_body(response, limits.max_manifest, &request.what)
        .await?;
    let digest = verify_digest(
        upstream,
        &request.what,
        &bytes,
        reference.digest(),
        header.as_ref(),
    )?;
    let media_type = inspect(&bytes, &content_type).map_err(|e| {
        Fault::unavailable(format!(
            "upstream `{}` sent an unusable {}: {e}",
            upstream.name(),
            request.what
        ))
    })?;
    Ok(Manifest {
        bytes,
        media_type,
        digest,
        source: Source::fetched(upstream),
    })
}

pub(super) async fn head_manifest_at(
    upstream: &Arc<Upstream>,
    limits: Limits,
    repository: &Repository,
    reference: &Reference,
    accept: &[MediaType],
) -> Result<ManifestMeta, Fault> {
    let request = manifest_request(upstream, Method::HEAD, repository, reference, accept);
    let response = upstream.send(&request).await?;
    if !response.status().is_success() {
        return Err(fault_from_response(upstream, &request.what, response).await);
    }
    let headers = response.headers();
    let digest = header_digest_for(upstream, &request.what, reference, headers)?;
    let size = content_length(headers);
    let media_type = MediaType::parse(&content_type(headers)).ok();
    if let (Some(expected), Some(digest)) = (reference.digest(), &digest) {
        if expected != digest {
            return Err(Fault::integrity(format!(
                "upstream `{}` answered HEAD for {} with Docker-Content-Digest {digest}",
                upstream.name(),
                request.what
            )));
        }
    }
    let digest = digest.or_else(|| reference.digest().cloned());
    match (digest, size, media_type) {
        (Some(digest), Some(size), Some(media_type)) => Ok(ManifestMeta {
            media_type,
            digest,
            size,
            source: Source::fetched(upstream),
        }),
        // The upstream did not say enough: fetch and measure instead.
        _ => {
            drop(response);
            get_manifest(upstream, limits, repository, reference, accept)
                .await
                .map(ManifestMeta::from)
        }
    }
}

/// The digest a HEAD for `reference` reports (`Docker-Content-Digest`), or
/// `None` when the upstream did not send a usable one. Never falls back to
/// GET: registries count manifest GETs (not HEADs) against pull limits.
pub(super) async fn head_digest(
    upstream: &Arc<Upstream>,
    repository: &Repository,
    reference: &Reference,
    accept: &[MediaType],
) -> Result<Option<Digest>, Fault> {
    let request = manifest_request(upstream, Method::HEAD, repository, reference, accept);
    let response = upstream.send(&request).await?;
    if !response.status().is_success() {
        return Err(fault_from_response(upstream, &request.what, response).await);
    }
    header_digest_for(upstream, &request.what, reference, response.headers())
}
