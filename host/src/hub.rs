//! Model names the Hugging Face way: `--model ORG/NAME` resolves in the local Hugging Face cache
//! exactly as `huggingface_hub` lays it out, without any network access:
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub)
//!   models--ORG--NAME/
//!     refs/main                 (a commit hash)
//!     snapshots/<hash>/...      (files, usually symlinks into ../../blobs/)
//!     blobs/<sha>
//! ```
//!
//! A revision is a branch or tag (looked up in `refs/`) or a commit hash (a snapshot folder).

use std::path::{Path, PathBuf};

/// Why a model name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{name}: not a folder, and not in the Hugging Face cache (looked in {looked}).\n\
         Download it first, e.g. `hf download {name}` (or `huggingface-cli download {name}`), or pass a folder"
    )]
    NotCached { name: String, looked: String },
    #[error("{name}: the Hugging Face cache has {dir} but no revision {revision:?} in it (refs: {refs}); download that revision or pass --revision")]
    NoRevision { name: String, dir: String, revision: String, refs: String },
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// The Hugging Face hub cache folder, from the environment as `huggingface_hub` reads it.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return Some(d);
    }
    if let Some(h) = env("HF_HOME") {
        return Some(h.join("hub"));
    }
    let cache = env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache")))?;
    Some(cache.join("huggingface").join("hub"))
}

/// Whether `s` has the shape of a repo id: `ORG/NAME` with the characters the Hub allows.
pub fn is_repo_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

/// A `--model` value: an existing folder as it is, a repo id (`ORG/NAME` that is not a folder)
/// looked up in the cache, anything else as the path it is (the loader names what is missing).
pub fn resolve(spec: &str, revision: Option<&str>) -> Result<PathBuf, HubError> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if !is_repo_id(spec) {
        // A path (absolute, or not of the ORG/NAME shape): the loader says what is missing.
        return Ok(p.to_path_buf());
    }
    match cache_dir() {
        Some(cache) => resolve_in(&cache, spec, revision),
        None => Err(HubError::NotCached {
            name: spec.into(),
            looked: "nowhere: neither HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME nor HOME is set".into(),
        }),
    }
}

/// [`resolve`] against a given cache folder.
pub fn resolve_in(cache: &Path, repo: &str, revision: Option<&str>) -> Result<PathBuf, HubError> {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !dir.is_dir() {
        return Err(HubError::NotCached { name: repo.into(), looked: dir.display().to_string() });
    }
    let rev = revision.unwrap_or("main");
    let io = |path: &Path, source| HubError::Io { path: path.display().to_string(), source };
    // A branch or tag name in refs/ (names may contain '/': refs/pr/1).
    let refs = dir.join("refs");
    let ref_file = refs.join(rev);
    let commit = if ref_file.is_file() {
        let s = crate::files::read_string_capped(&ref_file, 4096).map_err(|e| io(&ref_file, e))?;
        Some(s.trim().to_string())
    } else {
        None
    };
    let snapshots = dir.join("snapshots");
    let hash = commit.unwrap_or_else(|| rev.to_string());
    let valid = !hash.is_empty() && hash.chars().all(|c| c.is_ascii_hexdigit());
    let snap = snapshots.join(&hash);
    if valid && snap.is_dir() {
        return Ok(snap);
    }
    let mut names: Vec<String> = std::fs::read_dir(&refs)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    Err(HubError::NoRevision {
        name: repo.into(),
        dir: dir.display().to_string(),
        revision: rev.into(),
        refs: if names.is_empty() { "none".into() } else { names.join(", ") },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("Qwen/Qwen3-0.6B"));
        assert!(is_repo_id("meta-llama/Llama-3.1-8B-Instruct"));
        assert!(!is_repo_id("Qwen"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("org/.."));
    }

    #[test]
    fn resolves_refs_and_hashes() {
        let t = std::env::temp_dir().join(format!("stllm-hub-test-{}", std::process::id()));
        let repo = t.join("models--org--name");
        let hash = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("snapshots").join(hash)).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{hash}\n")).unwrap();
        assert_eq!(resolve_in(&t, "org/name", None).unwrap(), repo.join("snapshots").join(hash));
        assert_eq!(resolve_in(&t, "org/name", Some(hash)).unwrap(), repo.join("snapshots").join(hash));
        let e = resolve_in(&t, "org/name", Some("v2")).unwrap_err().to_string();
        assert!(e.contains("v2") && e.contains("main"), "{e}");
        let e = resolve_in(&t, "org/other", None).unwrap_err().to_string();
        assert!(e.contains("hf download org/other") && e.contains("models--org--other"), "{e}");
        let _ = std::fs::remove_dir_all(&t);
    }
}
