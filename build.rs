//! Compiles the public .proto files with a pure-Rust compiler (protox), so
//! building needs no system `protoc`, and keeps the descriptor set (imports
//! included) for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/oci/upstream/v1/upstream.proto",
        "proto/oci/upstream/v1/admin.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("upstream_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .bytes(".oci.upstream.v1")
        .compile_fds(fds)?;
    Ok(())
}
