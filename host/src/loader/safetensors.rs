//! A strict reader of `.safetensors` files: the header is parsed and checked completely before any
//! tensor is used, and tensor bytes are read with positioned reads (no mmap, no unsafe), so a
//! truncated or lying file is an error naming the file and tensor, never a crash.
//!
//! Format: 8 bytes little-endian header length `n`, `n` bytes of JSON
//! (`{"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data; offsets are relative to the start of the data.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::LoadError;

/// Headers larger than this are refused (the reference implementation uses the same bound).
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    F32,
    F16,
    BF16,
    /// Any other dtype the format knows: recorded so the error can name it.
    Other(&'static str),
}

impl StDtype {
    fn parse(s: &str) -> Option<StDtype> {
        Some(match s {
            "F32" => StDtype::F32,
            "F16" => StDtype::F16,
            "BF16" => StDtype::BF16,
            "F64" => StDtype::Other("F64"),
            "I64" => StDtype::Other("I64"),
            "I32" => StDtype::Other("I32"),
            "I16" => StDtype::Other("I16"),
            "I8" => StDtype::Other("I8"),
            "U8" => StDtype::Other("U8"),
            "U16" => StDtype::Other("U16"),
            "U32" => StDtype::Other("U32"),
            "U64" => StDtype::Other("U64"),
            "BOOL" => StDtype::Other("BOOL"),
            "F8_E4M3" => StDtype::Other("F8_E4M3"),
            "F8_E5M2" => StDtype::Other("F8_E5M2"),
            "F8_E8M0" => StDtype::Other("F8_E8M0"),
            "F4" => StDtype::Other("F4"),
            _ => return None,
        })
    }

    /// Bits per element.
    fn bits(self) -> usize {
        match self {
            StDtype::F32 => 32,
            StDtype::F16 | StDtype::BF16 => 16,
            StDtype::Other(s) => match s {
                "F64" | "I64" | "U64" => 64,
                "I32" | "U32" => 32,
                "I16" | "U16" => 16,
                "F4" => 4,
                _ => 8,
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StDtype::F32 => "F32",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::Other(s) => s,
        }
    }
}

/// One tensor's entry: where its bytes are and what they are.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: StDtype,
    /// Shape in PyTorch order (slowest dimension first).
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub len: u64,
}

/// An opened, validated safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    file: File,
    pub tensors: BTreeMap<String, TensorEntry>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile, LoadError> {
        let corrupt = |msg: String| LoadError::Corrupt { file: path.to_path_buf(), msg };
        let mut file = crate::files::open_regular(path).map_err(|e| LoadError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| LoadError::io(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|_| corrupt(format!("file is {file_len} bytes, too short for a header")))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER {
            return Err(corrupt(format!("header length {n} is larger than {MAX_HEADER}")));
        }
        if 8 + n > file_len {
            return Err(LoadError::Truncated {
                file: path.to_path_buf(),
                tensor: None,
                msg: format!("header claims {n} bytes but the file has {file_len}"),
            });
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(|e| LoadError::io(path, e))?;
        let map: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| corrupt(format!("header is not a JSON object: {e}")))?;
        let data_start = 8 + n;
        let data_len = file_len - data_start;
        let mut tensors = BTreeMap::new();
        let mut spans = Vec::new();
        for (name, value) in map {
            if name == "__metadata__" {
                continue;
            }
            let raw: RawEntry =
                serde_json::from_value(value).map_err(|e| corrupt(format!("tensor {name}: bad header entry: {e}")))?;
            let dtype = StDtype::parse(&raw.dtype)
                .ok_or_else(|| corrupt(format!("tensor {name}: unknown dtype {:?}", raw.dtype)))?;
            let [begin, end] = raw.data_offsets;
            if end < begin {
                return Err(corrupt(format!("tensor {name}: data_offsets [{begin}, {end}] are reversed")));
            }
            let numel = raw
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| corrupt(format!("tensor {name}: shape {:?} overflows", raw.shape)))?;
            let want = numel
                .checked_mul(dtype.bits() as u64)
                .map(|b| b.div_ceil(8))
                .ok_or_else(|| corrupt(format!("tensor {name}: shape {:?} overflows", raw.shape)))?;
            if end - begin != want {
                return Err(corrupt(format!(
                    "tensor {name}: data_offsets [{begin}, {end}] span {} bytes but shape {:?} of {} needs {want}",
                    end - begin,
                    raw.shape,
                    dtype.name()
                )));
            }
            if end > data_len {
                return Err(LoadError::Truncated {
                    file: path.to_path_buf(),
                    tensor: Some(name),
                    msg: format!("its data ends at byte {} but the file has {file_len}", data_start + end),
                });
            }
            spans.push((begin, end, name.clone()));
            tensors.insert(name, TensorEntry { dtype, shape: raw.shape, offset: data_start + begin, len: end - begin });
        }
        // Tensors must not overlap.
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(corrupt(format!("tensors {} and {} overlap", w[0].2, w[1].2)));
            }
        }
        // Then the format's reference validation, with the `safetensors` crate's own header type:
        // what the checks above let through but the format forbids (tensors not packed from
        // offset 0, a `__metadata__` that is not a map of strings, a dtype's bits not filling
        // whole bytes) is refused with the reference's reason. The checks above stay first for
        // their messages, which name the tensor and the numbers.
        let reference: safetensors::tensor::Metadata = serde_json::from_slice(&header)
            .map_err(|e| corrupt(format!("the safetensors reference validation refuses the header: {e}")))?;
        if reference.data_len() as u64 != data_len {
            return Err(corrupt(format!(
                "the tensors end at byte {} but the file has {file_len} (the format has no trailing bytes)",
                data_start + reference.data_len() as u64
            )));
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), file, tensors })
    }

    /// Read a tensor's bytes into `buf` (resized to fit).
    pub fn read(&self, name: &str, entry: &TensorEntry, buf: &mut Vec<u8>) -> Result<(), LoadError> {
        buf.resize(entry.len as usize, 0);
        self.file.read_exact_at(buf, entry.offset).map_err(|e| LoadError::Truncated {
            file: self.path.clone(),
            tensor: Some(name.to_string()),
            msg: format!("reading {} bytes at {}: {e}", entry.len, entry.offset),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: serde_json::Value, data: usize) -> (PathBuf, Result<SafetensorsFile, LoadError>) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("stllm-st-{}-{n}.safetensors", std::process::id()));
        let h = header.to_string().into_bytes();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend(h);
        bytes.extend(vec![0u8; data]);
        std::fs::write(&path, bytes).unwrap();
        let r = SafetensorsFile::open(&path);
        (path, r)
    }

    fn refused(header: serde_json::Value, data: usize) -> String {
        let (path, r) = file(header, data);
        let _ = std::fs::remove_file(path);
        r.expect_err("refused").to_string()
    }

    #[test]
    fn headers_pass_our_checks_and_the_reference_validation() {
        use serde_json::json;
        let (path, ok) = file(
            json!({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]}}),
            16,
        );
        let f = ok.unwrap();
        assert_eq!(f.tensors["b"].offset, f.tensors["a"].offset + 8);
        drop(f);
        let _ = std::fs::remove_file(path);
        // Ours, with the tensor named.
        let e = refused(
            json!({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
            12,
        );
        assert!(e.contains("overlap"), "{e}");
        let e = refused(json!({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}), 8);
        assert!(e.contains("reversed"), "{e}");
        // What only the reference refuses: a gap (not packed), a start past 0, metadata that is
        // not strings, bytes after the last tensor.
        for (h, data) in [
            (
                json!({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                       "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}),
                12,
            ),
            (json!({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}), 8),
            (json!({"__metadata__": {"n": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), 4),
        ] {
            let e = refused(h, data);
            assert!(e.contains("reference validation"), "{e}");
        }
        let e = refused(json!({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), 9);
        assert!(e.contains("no trailing bytes"), "{e}");
    }
}
