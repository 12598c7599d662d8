//! Builds the guest components (guest/: the default policy, the example sampler, the chaos
//! policy used by the sandbox tests) for wasm32-wasip2 and leaves them in OUT_DIR, where
//! `host/src/runtime/` embeds them. One `cargo build` at the root builds everything.
//!
//! It also fingerprints the ggml sources the `-sys` crate compiles (the headers that fix the ABI
//! between `libggml-base` and backend modules) so that a module built elsewhere from other sources
//! is refused at load time (see `ggml::load_backend` and `scripts/gpu/ggml_abi.py`).
//!
//! The guests are their own cargo workspace with their own target directory (inside OUT_DIR), so
//! their dependencies never unify with the host's and the outer build's flags do not leak in.

use std::path::{Path, PathBuf};
use std::process::Command;

const COMPONENTS: &[(&str, &str)] = &[
    ("stllm-policy", "stllm_policy.wasm"),
    ("stllm-sampler-mirostat", "stllm_sampler_mirostat.wasm"),
    ("stllm-policy-chaos", "stllm_policy_chaos.wasm"),
];

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=wit");
    println!("cargo:rerun-if-changed=guest");
    println!("cargo:rerun-if-env-changed=STLLM_GUEST_CARGO");
    // The built-in demo model (models/demo, made by scripts/demo/train_demo.py) is embedded in
    // the binary when the checkout has it.
    println!("cargo::rustc-check-cfg=cfg(stllm_demo)");
    println!("cargo:rerun-if-changed=models/demo");
    if DEMO_FILES.iter().all(|f| root.join("models/demo").join(f).is_file()) {
        println!("cargo:rustc-cfg=stllm_demo");
    }
    let guest = root.join("guest");
    let target_dir = out.join("guest-target");
    let cargo =
        std::env::var("STLLM_GUEST_CARGO").or_else(|_| std::env::var("CARGO")).unwrap_or_else(|_| "cargo".into());
    let abi = ggml_abi_fingerprint().unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=STLLM_GGML_ABI={abi}");
    for (package, file) in COMPONENTS {
        build_component(&cargo, &guest, &target_dir, package);
        let built = target_dir.join("wasm32-wasip2/release").join(file);
        std::fs::copy(&built, out.join(file)).unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
    }
}

fn build_component(cargo: &str, guest: &Path, target_dir: &Path, package: &str) {
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guest)
        .args(["rustc", "--release", "--locked", "--lib", "--crate-type", "cdylib", "--target", "wasm32-wasip2", "-p"])
        .arg(package)
        .arg("--target-dir")
        .arg(target_dir);
    // The outer build's settings are for the host target; keep them out of the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_PKG_NAME",
    ] {
        cmd.env_remove(var);
    }
    if std::env::var_os("STLLM_GUEST_CARGO").is_some() {
        // A cargo given for the guests (e.g. a stable one with the wasm32-wasip2 target, while
        // the outer build runs on a nightly without it: `cargo +nightly fuzz`) uses its own
        // toolchain's compiler (the rustc beside it), not the outer build's.
        cmd.env_remove("RUSTUP_TOOLCHAIN");
        match Path::new(cargo).parent().map(|d| d.join("rustc")).filter(|r| r.is_file()) {
            Some(rustc) => cmd.env("RUSTC", rustc),
            None => cmd.env_remove("RUSTC"),
        };
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("running {cargo} to build the guest component {package}: {e}"));
    if !status.success() {
        panic!(
            "building the guest component {package} for wasm32-wasip2 failed (is the target installed? \
             `rustup target add wasm32-wasip2`)"
        );
    }
}

/// The files of the demo model that the binary embeds (keep equal to `cli::demo`).
const DEMO_FILES: &[&str] =
    &["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"];

/// The ggml headers that define what a backend module and `libggml-base` share. Keep this list
/// equal to the one in scripts/gpu/ggml_abi.py.
const ABI_FILES: &[&str] = &[
    "include/ggml.h",
    "include/ggml-alloc.h",
    "include/ggml-backend.h",
    "include/ggml-cpu.h",
    "src/ggml-backend-impl.h",
    "src/ggml-impl.h",
    "src/ggml-common.h",
];

/// FNV-1a (64-bit) over the ABI files of the vendored ggml, each preceded by its path; `None`
/// when the `-sys` crate's sources are not found where cargo unpacks registry crates.
fn ggml_abi_fingerprint() -> Option<String> {
    let lock =
        std::fs::read_to_string(Path::new(&std::env::var("CARGO_MANIFEST_DIR").ok()?).join("Cargo.lock")).ok()?;
    let mut lines = lock.lines();
    lines.find(|l| *l == "name = \"llama-cpp-sys-2\"")?;
    let version = lines.next()?.strip_prefix("version = \"")?.strip_suffix('"')?.to_string();
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok()?;
    let crate_dir = format!("llama-cpp-sys-2-{version}");
    let ggml = std::fs::read_dir(home.join("registry/src"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(&crate_dir).join("llama.cpp/ggml"))
        .find(|p| p.is_dir())?;
    let mut h: u64 = 0xcbf29ce484222325;
    for f in ABI_FILES {
        let path = ggml.join(f);
        println!("cargo:rerun-if-changed={}", path.display());
        let data = std::fs::read(&path).ok()?;
        for b in f.as_bytes().iter().chain(&data) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    Some(format!("{h:016x}"))
}
