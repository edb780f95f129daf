//! Generated protobuf and gRPC code for `oci.upstream.v1`, and the encoded file
//! descriptor set that server reflection serves. Nothing else in the crate
//! names generated types except the service adapter in [`crate::grpc`].

#![allow(missing_docs, clippy::doc_lazy_continuation)]

tonic::include_proto!("oci.upstream.v1");

/// The encoded `FileDescriptorSet` of `upstream.proto` and `admin.proto` (with
/// their imports), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/upstream_descriptor.bin"));

/// Fully qualified name of the service, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "oci.upstream.v1.UpstreamService";

/// Fully qualified name of the admin service.
pub const ADMIN_SERVICE_NAME: &str = "oci.upstream.v1.AdminService";
