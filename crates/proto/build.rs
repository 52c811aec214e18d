//! Compiles `proto/kiln/v1/*.proto` into Rust, plus a descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "kiln/v1/image.proto",
        "kiln/v1/worker.proto",
        "kiln/v1/scheduler.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("kiln_descriptor.bin"))
        .compile_protos(&files.map(|f| root.join(f)), &[root])?;
    Ok(())
}
