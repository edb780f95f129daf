//! Integration tests of oci-upstream against real peers on 127.0.0.1: CNCF
//! Distribution registries, a token issuer, in-process fake and faulty
//! upstreams, `grpcurl`. One module per capability, all in this one test
//! binary (one link instead of one per file); the shared harness is
//! `tests/common`, which the benchmarks include too.
//!
//! Run one module with `cargo test --test it registry::`, one test by its
//! name, e.g. `cargo test --test it fetch_blob_ranges`.

#![allow(
    clippy::disallowed_types,
    reason = "tests bound and measure wall-clock time against real peers with std::time::Instant"
)]

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod auth_policy;
mod basic_auth;
mod cache;
mod cache_faults;
mod callers;
mod conformance;
mod edge;
mod fake_upstream;
mod grpcurl;
mod hardening;
mod hostile;
mod memory;
mod metrics;
mod mirror;
mod operations;
mod registry;
mod resilience;
mod s3;
mod shutdown;
mod soak;
mod tls_server;
mod token_auth;
mod traces;
