//! Builds the eBPF object (`dataplane-ebpf`, bin `dataplane`) for the bpfel target with the nightly
//! toolchain and bpf-linker, into `OUT_DIR`, where `loader` embeds it; and generates the SPIFFE
//! Workload API server and client from `proto/workload.proto` (protox, no protoc).
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto/workload.proto");
    let fds =
        protox::compile(["proto/workload.proto"], ["proto"]).context("compile workload.proto")?;
    tonic_prost_build::configure()
        .compile_fds(fds)
        .context("generate the Workload API")?;

    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "dataplane-ebpf")
        .ok_or_else(|| anyhow!("dataplane-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [Package {
            name: "dataplane-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
