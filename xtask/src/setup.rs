//! `cargo xtask setup`: installs what building and running wsgiscope needs. Every step checks first,
//! so a second run only prints what it skipped.
use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::{cargo, output_text, run_checked};

/// Debian's rustc-web 1.96 ships a prebuilt `core` for bpfel-unknown-none (agent/build.rs uses it);
/// llvm-22-dev is what bpf-linker links against.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "python3-venv",
    "curl",
    // The servers the integration tests run.
    "uwsgi-core",
    "uwsgi-plugin-python3",
    "nginx-light",
    "apache2",
    "libapache2-mod-wsgi-py3",
    // The real Prometheus server the end-to-end scrape test runs (tests/tests/prometheus.rs).
    "prometheus",
    // The downstream services tests/apps/downstream.py calls (tests/tests/services.rs); each test
    // runs its own instances on free ports, never the system services these packages set up.
    "postgresql-15",
    "mariadb-server",
    "redis-server",
    // A real terminal for `wsgiscope top` (tests/tests/top.rs).
    "tmux",
    // capsh and unshare: the agent with narrowed privileges (tests/tests/memory.rs).
    "libcap2-bin",
    "util-linux",
    // The browser tests/tests/page.rs drives through the live page (tests/browser/page.mjs).
    "chromium",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const GUNICORN_VERSION: &str = "27.0.1";
/// Validates deploy/*.yaml against the Kubernetes schemas it bundles: no cluster, no network.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const UWSGI_PIP_VERSION: &str = "2.0.31";
/// The client libraries of tests/apps/downstream.py, as pip names them: psycopg 3 with its C
/// build (what `psycopg[binary]` installs), PyMySQL, redis-py and requests; and gevent, for
/// gunicorn's event-loop worker.
const DOWNSTREAM_LIBS: &[(&str, &str)] = &[
    ("psycopg", "3.2.13"),
    ("psycopg-binary", "3.2.13"),
    ("PyMySQL", "1.2.4"),
    ("redis", "8.1.0"),
    ("requests", "2.34.2"),
    ("gevent", "24.11.1"),
];
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn run(root: &Path) -> Result<()> {
    tracefs()?;
    apt(APT_PACKAGES)?;
    bpf_linker(root)?;
    // gunicorn on the pyenv Python on PATH (shared libpython) and on Debian's static python3.11.
    venv(&root.join(".venv"), "python3")?;
    venv(&root.join(".venv-debian"), "/usr/bin/python3.11")?;
    // The downstream app runs on both Pythons, like the test app.
    pip_libs(&root.join(".venv"), DOWNSTREAM_LIBS)?;
    pip_libs(&root.join(".venv-debian"), DOWNSTREAM_LIBS)?;
    // kubernetes-validate (and the PyYAML it pulls in), for tests/tests/deploy.rs.
    pip_tool(&root.join(".venv"), "kubernetes-validate", KUBERNETES_VALIDATE_VERSION, "kubernetes-validate")?;
    // uWSGI built by pip against the pyenv Python: a libpython without USDT notes (tests/tests/gc.rs).
    pip_tool(&root.join(".venv"), "uwsgi", UWSGI_PIP_VERSION, "uwsgi")?;
    npm_ci(&root.join("tests/browser"))?;
    Ok(())
}

/// The browser driver's node packages (playwright-core, pinned by package-lock.json), installed
/// again when npm's own record of node_modules is missing or older than the lock file.
fn npm_ci(dir: &Path) -> Result<()> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let installed = modified(&dir.join("node_modules/.package-lock.json"));
    let locked = modified(&dir.join("package-lock.json"));
    if installed.is_some() && installed >= locked {
        println!("setup: node packages already in {}", dir.display());
        return Ok(());
    }
    run_checked(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(dir))?;
    println!("setup: installed node packages in {}", dir.display());
    Ok(())
}

/// Tracepoint attachment goes through tracefs, which a fresh host may not have mounted.
fn tracefs() -> Result<()> {
    if Command::new("mountpoint")
        .args(["-q", TRACEFS])
        .status()
        .is_ok_and(|s| s.success())
    {
        println!("setup: tracefs already mounted at {TRACEFS}");
        return Ok(());
    }
    run_checked(Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]))?;
    println!("setup: mounted tracefs at {TRACEFS}");
    Ok(())
}

/// Installs the Debian packages of `packages` that are missing.
pub fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!(
            "setup: apt packages already installed ({})",
            packages.join(" ")
        );
        return Ok(());
    }
    run_checked(Command::new("apt-get").arg("update"))?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    println!("setup: installed apt packages {}", missing.join(" "));
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    output_text(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn bpf_linker(root: &Path) -> Result<()> {
    let in_cargo_home =
        std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/bpf-linker"));
    let candidates = std::iter::once("bpf-linker".into()).chain(in_cargo_home);
    for bin in candidates {
        if output_text(Command::new(&bin).arg("--version"))
            .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
        {
            println!(
                "setup: bpf-linker {BPF_LINKER_VERSION} already installed ({})",
                bin.display()
            );
            return Ok(());
        }
    }
    // LLVM_PREFIX is what bpf-linker's build reads; without it, it finds an older LLVM and fails to link.
    run_checked(
        cargo(root)
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .arg("install")
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
    )?;
    println!("setup: installed bpf-linker {BPF_LINKER_VERSION}");
    Ok(())
}

/// A venv made by `python` with the gunicorn that the tests and the demo run.
fn venv(venv: &Path, python: &str) -> Result<()> {
    let gunicorn = venv.join("bin/gunicorn");
    if output_text(Command::new(&gunicorn).arg("--version"))
        .is_some_and(|v| v.contains(GUNICORN_VERSION))
    {
        println!(
            "setup: gunicorn {GUNICORN_VERSION} already in {}",
            venv.display()
        );
        return Ok(());
    }
    if !venv.join("bin/python").exists() {
        run_checked(Command::new(python).args(["-m", "venv"]).arg(venv))?;
    }
    run_checked(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("gunicorn=={GUNICORN_VERSION}")),
    )?;
    if !output_text(Command::new(&gunicorn).arg("--version"))
        .is_some_and(|v| v.contains(GUNICORN_VERSION))
    {
        bail!(
            "{} does not report version {GUNICORN_VERSION} after installing it",
            gunicorn.display()
        );
    }
    println!(
        "setup: installed gunicorn {GUNICORN_VERSION} in {}",
        venv.display()
    );
    Ok(())
}

/// A pip package with a command in `venv` (`bin --version` reports `version`): installed
/// once, checked after.
fn pip_tool(venv: &Path, package: &str, version: &str, bin: &str) -> Result<()> {
    let bin = venv.join("bin").join(bin);
    let installed = || output_text(Command::new(&bin).arg("--version")).is_some_and(|v| v.trim() == version);
    if installed() {
        println!("setup: {package} {version} already in {}", venv.display());
        return Ok(());
    }
    run_checked(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("{package}=={version}")),
    )?;
    if !installed() {
        bail!("{} does not report version {version} after installing it", bin.display());
    }
    println!("setup: installed {package} {version} in {}", venv.display());
    Ok(())
}

/// Libraries (pip name, version) in `venv`: the missing ones installed in one pip run, checked after.
fn pip_libs(venv: &Path, libs: &[(&str, &str)]) -> Result<()> {
    let missing = || -> Vec<String> {
        // `pip list --format=freeze` prints `Name==version` per installed distribution.
        let installed = output_text(
            Command::new(venv.join("bin/python"))
                .args(["-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"]),
        )
        .unwrap_or_default()
        .to_lowercase();
        libs.iter()
            .map(|(name, version)| format!("{name}=={version}"))
            .filter(|spec| !installed.lines().any(|l| l.trim() == spec.to_lowercase()))
            .collect()
    };
    let wanted = missing();
    if wanted.is_empty() {
        println!("setup: Python client libraries already in {}", venv.display());
        return Ok(());
    }
    run_checked(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(&wanted),
    )?;
    let still = missing();
    if !still.is_empty() {
        bail!("{} still lacks {} after installing it", venv.display(), still.join(" "));
    }
    println!("setup: installed {} in {}", wanted.join(" "), venv.display());
    Ok(())
}
