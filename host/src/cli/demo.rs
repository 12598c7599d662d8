//! The built-in demo model: a small Llama trained by `scripts/demo/train_demo.py` (see
//! `models/demo/README.md`), embedded in the binary when the checkout has it and written to the
//! cache folder on first use, so `stllm run` / `chat` / `serve` work with no `--model` and no
//! network.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

#[cfg(stllm_demo)]
macro_rules! demo_file {
    ($name:literal) => {
        ($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo/", $name)) as &[u8])
    };
}

/// The embedded files (keep equal to `DEMO_FILES` in build.rs).
#[cfg(stllm_demo)]
const FILES: &[(&str, &[u8])] = &[
    demo_file!("config.json"),
    demo_file!("model.safetensors"),
    demo_file!("tokenizer.json"),
    demo_file!("tokenizer_config.json"),
    demo_file!("generation_config.json"),
];

#[cfg(not(stllm_demo))]
const FILES: &[(&str, &[u8])] = &[];

/// Whether this binary carries the demo model.
pub fn available() -> bool {
    !FILES.is_empty()
}

/// The demo model's folder, written under the cache folder (`$XDG_CACHE_HOME/stllm` or
/// `~/.cache/stllm`, else the temporary folder) the first time; named by a hash of its contents
/// so a newer binary never reads an older copy.
pub fn dir() -> Result<PathBuf> {
    anyhow::ensure!(
        available(),
        "no --model given, and this build has no built-in demo model (models/demo was missing when it was built)"
    );
    let mut h: u64 = 0xcbf29ce484222325;
    for (name, bytes) in FILES {
        for b in name.bytes().chain(bytes.iter().copied()) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("stllm");
    let dir = base.join(format!("demo-{h:016x}"));
    if FILES.iter().all(|(n, b)| std::fs::metadata(dir.join(n)).is_ok_and(|m| m.len() == b.len() as u64)) {
        return Ok(dir);
    }
    // Written beside, then renamed into place: a concurrent first run never sees half a file.
    let tmp = base.join(format!("demo-{h:016x}.{}.tmp", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for (name, bytes) in FILES {
        std::fs::write(tmp.join(name), bytes).with_context(|| format!("writing {}", tmp.join(name).display()))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        // Another process won the race (or an incomplete copy is in the way: replace it).
        Err(_)
            if FILES.iter().all(|(n, b)| std::fs::metadata(dir.join(n)).is_ok_and(|m| m.len() == b.len() as u64)) =>
        {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(_) => {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).with_context(|| format!("moving the demo model to {}", dir.display()))?;
        }
    }
    Ok(dir)
}
