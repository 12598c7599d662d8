//! Reading files a user, a model folder or a cache points at: only regular files (a FIFO named
//! `model.safetensors` would block the open forever, `/dev/zero` as `config.json` would grow
//! memory without end) and never more than a stated size.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Largest JSON file of a model folder read whole (config.json, generation_config.json, a
/// safetensors index, adapter_config.json, tokenizer_config.json, a LoRA's config).
pub const MAX_JSON: u64 = 64 << 20;
/// Largest tokenizer.json (the largest published ones are tens of MB).
pub const MAX_TOKENIZER: u64 = 512 << 20;
/// Largest WebAssembly component file.
pub const MAX_COMPONENT: u64 = 512 << 20;

fn refuse(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Open `path` for reading if it is a regular file (symbolic links are followed, as in the
/// Hugging Face cache); anything else is refused before it is opened.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a directory" } else { "not a regular file (a FIFO, socket or device)" };
        return Err(refuse(format!("{} is {what}", path.display())));
    }
    File::open(path)
}

/// The bytes of a regular file of at most `max` bytes.
pub fn read_capped(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = open_regular(path)?;
    let mut out = Vec::new();
    // One byte more than allowed tells a file over the limit (the size may change under us).
    f.take(max.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(refuse(format!("{} is larger than the limit of {} MiB", path.display(), max >> 20)));
    }
    Ok(out)
}

/// The text of a regular UTF-8 file of at most `max` bytes.
pub fn read_string_capped(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_capped(path, max)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{} is not UTF-8: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_non_regular_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(&p, b"{\"x\": 1}").unwrap();
        assert_eq!(read_string_capped(&p, 8).unwrap(), "{\"x\": 1}");
        let e = read_string_capped(&p, 7).unwrap_err().to_string();
        assert!(e.contains("larger than the limit"), "{e}");
        assert!(open_regular(dir.path()).unwrap_err().to_string().contains("a directory"));
        let e = read_capped(Path::new("/dev/zero"), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
