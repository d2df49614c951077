//! Builds the kernel programs (ebpf/) with the eBPF toolchain and embeds them in the agent.
//! Toolchain: Debian's rustc-web at /usr (prebuilt `core` for bpfel) + bpf-linker; see README.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../common/src");
    let ebpf = aya_build::Package {
        name: "wsgiscope-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom("/usr"))
}
