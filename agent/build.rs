//! Builds the eBPF object (`dataplane-ebpf`, bin `dataplane`) for the bpfel target with the
//! toolchain pinned in `dataplane-ebpf/rust-toolchain.toml` and bpf-linker, into `OUT_DIR`, where
//! `loader` embeds it; and generates the SPIFFE Workload API server and client from
//! `proto/workload.proto` (protox, no protoc).
//!
//! Before building, it checks that the pinned nightly's LLVM major is the one bpf-linker is built
//! against (`toolchain`): otherwise the link would fail deep in the build with LLVM's
//! `Invalid record`.
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
    let workspace_root = std::path::Path::new(&root_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace above {root_dir}"))?;
    let pin_file = workspace_root.join(toolchain::PIN_FILE);
    println!("cargo:rerun-if-changed={}", pin_file.display());
    let pin = toolchain::Pin::read(workspace_root)?;
    // aya-build skips the eBPF build when AYA_BUILD_SKIP is set; so does the check.
    if std::env::var_os("AYA_BUILD_SKIP").is_none() {
        toolchain::check_llvm(&pin)?;
    }
    // aya-build relays every line the inner cargo prints on stderr as a build-script warning;
    // its progress lines ("Compiling core …") are not warnings. Real compiler diagnostics still
    // come through.
    // SAFETY: the build script is single-threaded here: nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: "dataplane-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&pin.channel),
    )
}
