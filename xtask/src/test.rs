//! `cargo xtask test`: the whole test suite on a possibly fresh machine.
use std::path::Path;

use anyhow::Result;

use crate::{cargo, run_checked, setup};

pub fn run(root: &Path, cargo_test_args: &[String]) -> Result<()> {
    setup::run(root)?;
    // The integration tests run the agent binary at target/debug/wsgiscope, which `cargo test` does
    // not build for them (it is another package's binary).
    run_checked(cargo(root).args(["build", "-p", "wsgiscope"]))?;
    // The eBPF crate builds only for bpfel-unknown-none (agent/build.rs does that); as a host test
    // binary it fails to link. Extra args go to cargo test as given: a test-name filter, or
    // `-- --nocapture`.
    run_checked(
        cargo(root)
            .args(["test", "--no-fail-fast", "--workspace", "--exclude", "wsgiscope-ebpf"])
            .args(cargo_test_args),
    )
}
