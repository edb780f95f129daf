//! oci-upstream: a gRPC gateway that fetches OCI content (manifests, blobs,
//! tag lists) from upstream container registries on behalf of internal
//! services, verifying every byte against its digest.
//!
//! # Layout
//! - [`config`]: the TOML configuration, parsed into typed values.
//! - [`oci`]: validated domain types (repository, reference, digest, media
//!   types, platform) and manifest inspection.
//! - [`upstream`]: the engine. Routing, authentication and the OCI
//!   operations against upstream registries; knows nothing of gRPC.
//! - [`cache`]: the content-addressable disk store, tag entries, negative
//!   entries and the shared state of downloads in flight.
//! - [`grpc`]: the tonic service adapter; converts requests and maps errors.
//! - [`pb`]: generated protobuf code.
//! - [`app`]: wiring and serving; [`telemetry`]: logging.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::await_holding_lock)]

pub mod app;
pub(crate) mod cache;
pub mod config;
pub(crate) mod glob;
pub(crate) mod grpc;
pub(crate) mod oci;
pub mod pb;
pub(crate) mod secret;
pub mod telemetry;
pub(crate) mod upstream;
