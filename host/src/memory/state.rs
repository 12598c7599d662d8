//! Prompt-cache files: a sequence's tokens and its KV cells, saved once and loaded instead of
//! recomputing a long prompt (a system prompt, a RAG context). The header names the model (a
//! fingerprint of its config and weights) and the cache type; a file made for another model or
//! cache type, a truncated file or a foreign file is rejected with an error that says which.
//!
//! Format: `STLLMKV2`, u64 LE header length, a JSON header (with the FNV-1a 64 checksum of the
//! payload: a damaged payload is refused, not loaded), then the cell bytes of
//! [`super::kv::KvCache::read_cells`] of the sequence's cells in position order (per layer: K rows, then V
//! rows), so a file loads into whichever cells are free, and for a hybrid model the sequence's
//! recurrent state after them ([`super::recurrent::RecurrentCache::read_slot`]: per Mamba layer
//! its conv row, then its SSM row; `recurrent_bytes` in the header, checked against the model's). Files are written under a unique
//! temporary name in the same folder (never over another file) and renamed when complete.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::ggml::GgmlError;

const MAGIC: &[u8; 8] = b"STLLMKV2";
/// The first format (no checksum), refused with a hint.
const MAGIC_V1: &[u8; 8] = b"STLLMKV1";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StateHeader {
    /// Fingerprint of the model (config + weights metadata).
    pub model: String,
    pub architecture: String,
    pub kv_type: String,
    pub tokens: Vec<u32>,
    /// Bytes of the sequence's recurrent state after its cells (hybrid models; 0 otherwise)
    #[serde(default)]
    pub recurrent_bytes: u64,
    pub data_bytes: u64,
    /// FNV-1a 64 of the cell bytes (filled in by [`save`])
    #[serde(default)]
    pub checksum: u64,
}

/// FNV-1a, 64 bits.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a stllm prompt-cache file ({msg})", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("{}: the prompt cache was made for {field} {file}, this session has {session}", path.display())]
    Mismatch { path: PathBuf, field: &'static str, file: String, session: String },
    #[error("{}: the prompt cache holds {n} positions, the session only {n_ctx}", path.display())]
    TooLong { path: PathBuf, n: usize, n_ctx: usize },
    #[error(transparent)]
    Ggml(#[from] GgmlError),
}

/// Write a file: `header` (its `data_bytes` is filled in) and `data`, the sequence's cells.
pub fn save(path: &Path, header: &StateHeader, data: &[u8]) -> Result<(), StateError> {
    let io = |source| StateError::Io { path: path.to_path_buf(), source };
    let mut h = header.clone();
    h.data_bytes = data.len() as u64;
    h.checksum = fnv1a(data);
    let json = serde_json::to_vec(&h).expect("plain header serializes");
    // Write to a temporary name of our own in the same folder (created exclusively: never over
    // another file) and rename, so a crash never leaves a half-written cache.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "cache".into());
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(".{base}.{}.{stamp}.partial", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io)?;
    let written = (|| {
        f.write_all(MAGIC)?;
        f.write_all(&(json.len() as u64).to_le_bytes())?;
        f.write_all(&json)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// Read a file's header and data and check them against `expect` (model, cache type and
/// recurrent state size), the cache's geometry (`cell_bytes` per cell, see
/// [`super::kv::KvCache::cell_bytes`]) and the `max_cells` it may take. Returns the tokens and
/// the payload: the cell bytes, then `expect.recurrent_bytes` of recurrent state.
pub fn load(
    path: &Path,
    expect: &StateHeader,
    cell_bytes: usize,
    max_cells: usize,
) -> Result<(Vec<u32>, Vec<u8>), StateError> {
    let io = |source| StateError::Io { path: path.to_path_buf(), source };
    let format = |msg: String| StateError::Format { path: path.to_path_buf(), msg };
    let mut f = crate::files::open_regular(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic).map_err(|_| format("too short".into()))?;
    if &magic == MAGIC_V1 {
        return Err(format("made by an older stllm (format 1, without a checksum): save it again".into()));
    }
    if &magic != MAGIC {
        return Err(format("bad magic".into()));
    }
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| format("truncated header".into()))?;
    let n = u64::from_le_bytes(n);
    // Checked against the file before anything is allocated for it.
    if n > (1 << 30) || n > file_len.saturating_sub(16) {
        return Err(format(format!("header length {n} does not fit the file's {file_len} bytes (truncated header)")));
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json).map_err(|_| format("truncated header".into()))?;
    let h: StateHeader = serde_json::from_slice(&json).map_err(|e| format(format!("bad header: {e}")))?;
    for (field, file, session) in [
        ("architecture", &h.architecture, &expect.architecture),
        ("model", &h.model, &expect.model),
        ("KV cache type", &h.kv_type, &expect.kv_type),
    ] {
        if file != session {
            return Err(StateError::Mismatch {
                path: path.to_path_buf(),
                field,
                file: file.clone(),
                session: session.clone(),
            });
        }
    }
    if h.recurrent_bytes != expect.recurrent_bytes {
        return Err(StateError::Mismatch {
            path: path.to_path_buf(),
            field: "bytes of recurrent state per sequence",
            file: h.recurrent_bytes.to_string(),
            session: expect.recurrent_bytes.to_string(),
        });
    }
    let cells = h.tokens.len();
    if cells > max_cells {
        return Err(StateError::TooLong { path: path.to_path_buf(), n: cells, n_ctx: max_cells });
    }
    let want = (cells as u64).saturating_mul(cell_bytes as u64).saturating_add(h.recurrent_bytes);
    if h.data_bytes != want {
        return Err(format(format!(
            "{} bytes of payload for {cells} positions, expected {want} ({} of recurrent state)",
            h.data_bytes, h.recurrent_bytes
        )));
    }
    let mut data = Vec::with_capacity(want as usize);
    f.take(want).read_to_end(&mut data).map_err(io)?;
    if data.len() as u64 != want {
        return Err(format(format!("truncated: {} of {want} bytes of payload", data.len())));
    }
    if fnv1a(&data) != h.checksum {
        return Err(format("the cell bytes do not match the header's checksum (a damaged file)".into()));
    }
    Ok((h.tokens, data))
}
