//! Manifest operations: fetch (with platform resolution) and head.

use std::sync::Arc;

use bytes::Bytes;
use reqwest::Method;

use super::registry::{display_ref, fault_from_response, manifest_request};
use super::remote::{Remote, content_length};
use super::{
    Engine, Error, Fault, Source, content_type, header_digest, media_types_or_default,
    verify_digest,
};
use crate::oci::manifest::{inspect, select_platform};
use crate::oci::{Digest, MediaType, Platform, Reference, Repository};

/// A request for a manifest.
#[derive(Debug, Clone)]
pub struct ManifestRequest {
    /// The repository, as the caller named it.
    pub repository: Repository,
    /// Tag or digest.
    pub reference: Reference,
    /// Acceptable media types; empty means every OCI and Docker v2 type.
    pub accept: Vec<MediaType>,
    /// Resolve an index to this platform's manifest.
    pub platform: Option<Platform>,
    /// Ask only this upstream.
    pub upstream: Option<String>,
}

/// A verified manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The bytes exactly as the upstream sent them.
    pub bytes: Bytes,
    /// Its media type.
    pub media_type: MediaType,
    /// Its digest, computed over `bytes`.
    pub digest: Digest,
    /// Where it came from.
    pub source: Source,
}

/// What a HEAD learned about a manifest.
#[derive(Debug, Clone)]
pub struct ManifestMeta {
    /// Its media type.
    pub media_type: MediaType,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Where the answer came from.
    pub source: Source,
}

impl Engine {
    /// Fetches a manifest; with a platform, resolves an index to that
    /// platform's manifest (fetched from the upstream that served the index).
    #[tracing::instrument(skip_all, fields(repository = %req.repository, reference = %req.reference))]
    pub async fn fetch_manifest(&self, req: ManifestRequest) -> Result<Manifest, Error> {
        let accept = &media_types_or_default(&req.accept);
        let req = &req;
        let (remote, manifest) = self
            .first_success(
                &req.repository,
                req.upstream.as_deref(),
                move |remote| async move {
                    self.get_manifest(&remote, &req.repository, &req.reference, accept)
                        .await
                },
            )
            .await?;
        let Some(platform) = &req.platform else {
            return Ok(manifest);
        };
        if !manifest.media_type.is_index() {
            return Ok(manifest);
        }
        let child = select_platform(&manifest.bytes, platform)
            .map_err(|e| {
                Error::from_fault(Fault::unavailable(format!(
                    "upstream `{}` sent an unusable index for {}: {e}",
                    remote.name(),
                    display_ref(&req.repository, &req.reference)
                )))
            })?
            .ok_or_else(|| Error::PlatformNotFound {
                reference: display_ref(&req.repository, &req.reference),
                upstream: remote.name().to_owned(),
                platform: platform.clone(),
            })?;
        tracing::debug!(%child, %platform, "resolved index to platform manifest");
        let all = media_types_or_default(&[]);
        self.get_manifest(&remote, &req.repository, &Reference::Digest(child), &all)
            .await
            .map_err(Error::from_fault)
    }

    /// Tells whether a manifest exists. `Ok(None)` only when every eligible
    /// upstream answered "not found".
    #[tracing::instrument(skip_all, fields(repository = %req.repository, reference = %req.reference))]
    pub async fn head_manifest(&self, req: ManifestRequest) -> Result<Option<ManifestMeta>, Error> {
        let accept = &media_types_or_default(&req.accept);
        let req = &req;
        let found = self
            .first_success(
                &req.repository,
                req.upstream.as_deref(),
                move |remote| async move {
                    self.head_manifest_at(&remote, &req.repository, &req.reference, accept)
                        .await
                },
            )
            .await;
        match found {
            Ok((_, meta)) => Ok(Some(meta)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn get_manifest(
        &self,
        remote: &Arc<Remote>,
        repository: &Repository,
        reference: &Reference,
        accept: &[MediaType],
    ) -> Result<Manifest, Fault> {
        let request = manifest_request(remote, Method::GET, repository, reference, accept);
        let response = remote.send(&request).await?;
        if !response.status().is_success() {
            return Err(fault_from_response(remote, &request.what, response).await);
        }
        let header = header_digest(response.headers());
        let content_type = content_type(response.headers());
        let bytes = remote
            .read_body(response, self.limits.max_manifest, &request.what)
            .await?;
        let digest = verify_digest(
            remote,
            &request.what,
            &bytes,
            reference.digest(),
            header.as_ref(),
        )?;
        let media_type = inspect(&bytes, &content_type).map_err(|e| {
            Fault::unavailable(format!(
                "upstream `{}` sent an unusable {}: {e}",
                remote.name(),
                request.what
            ))
        })?;
        Ok(Manifest {
            bytes,
            media_type,
            digest,
            source: Source::fetched(remote),
        })
    }

    async fn head_manifest_at(
        &self,
        remote: &Arc<Remote>,
        repository: &Repository,
        reference: &Reference,
        accept: &[MediaType],
    ) -> Result<ManifestMeta, Fault> {
        let request = manifest_request(remote, Method::HEAD, repository, reference, accept);
        let response = remote.send(&request).await?;
        if !response.status().is_success() {
            return Err(fault_from_response(remote, &request.what, response).await);
        }
        let headers = response.headers();
        let digest = header_digest(headers);
        let size = content_length(headers);
        let media_type = MediaType::parse(&content_type(headers)).ok();
        if let (Some(expected), Some(digest)) = (reference.digest(), &digest) {
            if expected != digest {
                return Err(Fault::integrity(format!(
                    "upstream `{}` answered HEAD for {} with Docker-Content-Digest {digest}",
                    remote.name(),
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
                source: Source::fetched(remote),
            }),
            // The upstream did not say enough: fetch and measure instead.
            _ => {
                drop(response);
                let manifest = self
                    .get_manifest(remote, repository, reference, accept)
                    .await?;
                Ok(ManifestMeta {
                    size: manifest.bytes.len() as u64,
                    media_type: manifest.media_type,
                    digest: manifest.digest,
                    source: manifest.source,
                })
            }
        }
    }
}
