//! Compiles the public contract with protox (pure Rust), so no system `protoc` is needed.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["waquota/v1/waquota.proto"], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // The descriptor set also feeds gRPC server reflection.
    std::fs::write(
        out.join("waquota_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Malformed requests are INVALID_ARGUMENT (src/grpc/codec.rs), not tonic-prost's INTERNAL.
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::Codec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
