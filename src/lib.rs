//! oci-upstream: a gRPC gateway that fetches OCI content (manifests, blobs,
//! tag lists) from upstream container registries on behalf of internal
//! services, verifying every byte against its digest.
//!
//! # Layout
//! - [`config`]: the TOML configuration, parsed into typed values (globs
//!   and secret sources included) before anything binds.
//! - `oci`: validated domain types (repository, reference, digest, media
//!   types, platform) and manifest inspection.
//! - `upstream`: the engine. Routing, failover, the HTTP client of each
//!   upstream (authentication, realm policy, retries, circuit breaker) and
//!   the OCI operations (manifests, blobs, tags); knows nothing of gRPC.
//! - `cache`: the cache API the engine uses: the content-addressable disk
//!   store, downloads in flight, tag entries, "not found" entries and
//!   per-key locks, with typed keys.
//! - `grpc`: the tonic service adapter: a span per RPC, request conversion,
//!   the one error → status mapping.
//! - [`pb`]: generated protobuf code and the descriptor set.
//! - [`app`]: wiring and serving; [`shutdown`]: signals; [`telemetry`]:
//!   logging and span export (OTLP).
//! - `tls`: TLS on the gRPC port (certificate reload, client certificates
//!   for mTLS, the identities a client certificate names).
//! - `glob`, `secret`: repository globs and secrets that cannot be printed.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::await_holding_lock)]

pub(crate) mod access;
pub(crate) mod admission;
pub mod app;
pub(crate) mod cache;
pub(crate) mod circuit;
pub mod config;
pub(crate) mod glob;
pub(crate) mod grpc;
pub(crate) mod idle;
pub mod metrics;
pub(crate) mod mirror;
pub(crate) mod oci;
pub mod pb;
pub(crate) mod secret;
pub mod shutdown;
pub mod telemetry;
pub(crate) mod tls;
pub(crate) mod upstream;
