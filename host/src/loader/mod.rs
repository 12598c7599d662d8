//! Loading HuggingFace model folders: `config.json` (+ `generation_config.json`), and
//! `model.safetensors` or a sharded `model.safetensors.index.json` with its shards.
//!
//! Everything is validated before use and every failure is a typed [`LoadError`] naming the file
//! and, where there is one, the tensor. Weights are declared by the architecture through
//! [`WeightBuilder`] (name + expected shape), checked against the files, then copied into one
//! backend buffer, keeping their dtype (F32, F16, BF16).

pub mod mxfp4;
pub mod safetensors;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::ggml::{Backend, Buffer, Context, DType, GgmlError, Tensor};
use crate::placement::Placement;
use safetensors::{SafetensorsFile, StDtype, TensorEntry};

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: no model.safetensors or model.safetensors.index.json in the model directory", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{}: corrupt safetensors file: {msg}", file.display())]
    Corrupt { file: PathBuf, msg: String },
    #[error("{}: truncated{}: {msg}", file.display(), tensor.as_ref().map(|t| format!(" at tensor {t}")).unwrap_or_default())]
    Truncated { file: PathBuf, tensor: Option<String>, msg: String },
    #[error("{}: tensor {name} is listed in the index but not found in shard {shard}", index.display())]
    IndexMismatch { index: PathBuf, name: String, shard: String },
    #[error("tensor {name} appears in both {} and {}", a.display(), b.display())]
    Duplicate { name: String, a: PathBuf, b: PathBuf },
    #[error("missing tensor {name} (the {arch} architecture needs it; not in {})", dir.display())]
    MissingTensor { name: String, arch: String, dir: PathBuf },
    #[error("unexpected tensor {name} in {} (unused by the {arch} architecture: wrong architecture or config?)", file.display())]
    UnexpectedTensor { name: String, arch: String, file: PathBuf },
    #[error("{}: tensor {name} has shape {got:?}, expected {expected:?}", file.display())]
    ShapeMismatch { name: String, file: PathBuf, expected: Vec<usize>, got: Vec<usize> },
    #[error("{}: tensor {name} has dtype {dtype}, supported: F32, F16, BF16", file.display())]
    UnsupportedDtype { name: String, file: PathBuf, dtype: String },
    #[error("{}: unknown architecture {name:?} (supported: {supported})", file.display())]
    UnknownArchitecture { name: String, file: PathBuf, supported: String },
    #[error("{}: {field}: {msg}", file.display())]
    InvalidConfig { file: PathBuf, field: String, msg: String },
    #[error(transparent)]
    Ggml(#[from] GgmlError),
}

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> LoadError {
        LoadError::Io { path: path.to_path_buf(), source }
    }
}

/// Read a JSON file. Python's `json` writes `Infinity`, `-Infinity` and `NaN` as bare words
/// (published configs have them, e.g. `time_step_limit`); outside strings they read as strings
/// of the same name, the way transformers 5 spells them (`{"__float__": "Infinity"}` stays as is).
pub fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = crate::files::read_string_capped(path, crate::files::MAX_JSON).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_str(&text)
        .or_else(|e| serde_json::from_str(&quote_python_floats(&text)).map_err(|_| e))
        .map_err(|source| LoadError::Json { path: path.to_path_buf(), source })
}

/// `Infinity`, `-Infinity` and `NaN` outside JSON strings, quoted.
fn quote_python_floats(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(ch) = rest.chars().next() {
        if in_str {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_str = false;
            }
            rest = &rest[ch.len_utf8()..];
            continue;
        }
        if ch == '"' {
            in_str = true;
        }
        if let Some(word) = ["-Infinity", "Infinity", "NaN"].iter().find(|w| rest.starts_with(**w)) {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

/// A model folder: its configs and its (validated) safetensors files.
#[derive(Debug)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: serde_json::Value,
    pub generation_config: Option<serde_json::Value>,
    pub files: Vec<SafetensorsFile>,
    /// tensor name -> index into `files`
    pub tensors: BTreeMap<String, usize>,
}

impl ModelDir {
    pub fn open(dir: &Path) -> Result<ModelDir, LoadError> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        if !config.is_object() {
            return Err(LoadError::InvalidConfig {
                file: config_path,
                field: "config.json".into(),
                msg: "must be a JSON object".into(),
            });
        }
        let gen_path = dir.join("generation_config.json");
        let generation_config = if gen_path.exists() { Some(read_json(&gen_path)?) } else { None };

        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut files: Vec<SafetensorsFile> = Vec::new();
        let mut tensors: BTreeMap<String, usize> = BTreeMap::new();
        if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| LoadError::InvalidConfig {
                file: index_path.clone(),
                field: "weight_map".into(),
                msg: "missing or not an object".into(),
            })?;
            let mut shards: Vec<String> = Vec::new();
            for (name, shard) in map {
                let shard = shard.as_str().ok_or_else(|| LoadError::InvalidConfig {
                    file: index_path.clone(),
                    field: format!("weight_map.{name}"),
                    msg: "must be a file name".into(),
                })?;
                if shard.contains('/') || shard.contains("..") {
                    return Err(LoadError::InvalidConfig {
                        file: index_path.clone(),
                        field: format!("weight_map.{name}"),
                        msg: format!("shard name {shard:?} must be a plain file name"),
                    });
                }
                if !shards.iter().any(|s| s == shard) {
                    shards.push(shard.to_string());
                }
            }
            shards.sort();
            for shard in &shards {
                files.push(SafetensorsFile::open(&dir.join(shard))?);
            }
            for (name, shard) in map {
                let i = shards.iter().position(|s| s == shard.as_str().unwrap_or_default()).unwrap_or(0);
                if !files[i].tensors.contains_key(name) {
                    return Err(LoadError::IndexMismatch {
                        index: index_path.clone(),
                        name: name.clone(),
                        shard: shard.as_str().unwrap_or_default().to_string(),
                    });
                }
            }
        } else if single.exists() {
            files.push(SafetensorsFile::open(&single)?);
        } else {
            return Err(LoadError::NoWeights { dir: dir.to_path_buf() });
        }
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors.keys() {
                if let Some(&j) = tensors.get(name) {
                    return Err(LoadError::Duplicate {
                        name: name.clone(),
                        a: files[j].path.clone(),
                        b: f.path.clone(),
                    });
                }
                tensors.insert(name.clone(), i);
            }
        }
        Ok(ModelDir { dir: dir.to_path_buf(), config_path, config, generation_config, files, tensors })
    }

    pub fn entry(&self, name: &str) -> Option<(&SafetensorsFile, &TensorEntry)> {
        let f = &self.files[*self.tensors.get(name)?];
        Some((f, f.tensors.get(name)?))
    }

    /// The dtype most of the weight bytes have (the model's "dtype").
    pub fn main_dtype(&self) -> StDtype {
        let mut by: BTreeMap<&'static str, (u64, StDtype)> = BTreeMap::new();
        for f in &self.files {
            for e in f.tensors.values() {
                by.entry(e.dtype.name()).or_insert((0, e.dtype)).0 += e.len;
            }
        }
        by.values().max_by_key(|(n, _)| *n).map(|(_, d)| *d).unwrap_or(StDtype::F32)
    }
}

/// The ggml type of a safetensors element type we load (`None`: unsupported).
fn stored_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        StDtype::Other(_) => None,
    }
}

/// Widen little-endian F16/BF16 bytes to F32.
pub(crate) fn to_f32(dtype: StDtype, bytes: &[u8]) -> Vec<f32> {
    let halves = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    match dtype {
        StDtype::BF16 => halves.map(|h| f32::from_bits((h as u32) << 16)).collect(),
        StDtype::F16 => halves.map(|h| half::f16::from_bits(h).to_f32()).collect(),
        _ => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    }
}

/// Declares the weights an architecture needs, checks them against the files and loads them.
pub(crate) struct WeightBuilder<'a> {
    dir: &'a ModelDir,
    arch: String,
    ctx: Context,
    used: BTreeSet<String>,
    /// (tensor, source name) to fill from the files
    /// What fills each tensor from the files
    from_file: Vec<Source>,
    /// (tensor, data) computed at load time (e.g. rope frequency factors)
    derived: Vec<(Tensor, Vec<f32>)>,
    /// Quantize the large matrices to this type at load (`set_quantize`)
    quantize: Option<DType>,
    /// Matrices quantized, and kept as stored because their rows do not fit the blocks
    quantized: usize,
    not_quantized: usize,
}

/// A piece of a tensor read from the files: bytes `src` of the file tensor `name` (all of it when
/// `None`) go to byte `dst` of `tensor`. Several sources fill a stacked tensor; one file tensor
/// can fill parts of several (a fused `gate_up_proj` split in two). Sources of one file tensor are
/// consecutive, so it is read once.
struct Source {
    tensor: Tensor,
    name: String,
    dst: usize,
    src: Option<(usize, usize)>,
    /// Rearranged on the way (see [`Map`]); the whole file tensor is the source
    map: Option<Map>,
}

/// How a source's values are rearranged on the way into their tensor.
#[derive(Debug, Clone)]
enum Map {
    Transposed(Transposed),
    /// MXFP4 blocks (this source's file tensor, `[n, rows, groups, 16]` U8) with their E8M0
    /// scales (the file tensor `scales`, `[n, rows, groups]` U8) repacked into ggml's
    /// `block_mxfp4`, keeping every `step`-th row from `offset`
    Mxfp4 {
        scales: String,
        n: usize,
        rows: usize,
        groups: usize,
        step: usize,
        offset: usize,
    },
}

/// A stack of matrices stored the other way round (x·W, `[n, rows_in, cols_out]`, as gpt-oss's
/// experts are), each transposed to `[cols_out / step][rows_in]` keeping every `step`-th output
/// column from `offset` (de-interleaving fused projections whose columns alternate).
#[derive(Debug, Clone, Copy)]
struct Transposed {
    n: usize,
    rows: usize,
    cols: usize,
    step: usize,
    offset: usize,
}

impl Transposed {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let Transposed { n, rows, cols, step, offset } = *self;
        let out_cols = cols / step;
        let mut out = Vec::with_capacity(n * out_cols * rows);
        for e in 0..n {
            let m = &x[e * rows * cols..(e + 1) * rows * cols];
            for j in 0..out_cols {
                out.extend((0..rows).map(|i| m[i * cols + j * step + offset]));
            }
        }
        out
    }
}

/// Loaded weights: the tensor metadata and the backend buffer with their data.
pub struct Weights {
    /// One buffer per backend that holds any weight
    _buffers: Vec<Buffer>,
    /// Bytes of weights on each backend (indexed like the model's backends)
    pub per_backend: Vec<usize>,
    /// Elements of the weights read from the files
    pub n_params: u64,
    /// The matrices read whole from one file tensor (projections), by checkpoint name, with the
    /// backend index holding them: what a LoRA adapter can attach to
    pub(crate) matrices: std::collections::HashMap<String, (Tensor, usize)>,
    // Owns the tensor headers; dropped after the buffer.
    _ctx: crate::ggml::Headers,
}

impl<'a> WeightBuilder<'a> {
    pub fn new(dir: &'a ModelDir, arch: &str) -> Result<Self, LoadError> {
        // Headers: one per file tensor, and at most as many again for what the architectures make
        // of them (a BF16 projection kept as F16, a reshaped vector, the parts of a fused expert
        // projection, stacks) and for derived tensors; each header is a few hundred bytes. The
        // builder asks with `try_new_tensor`, so a count beyond this is an error, not an abort.
        let ctx = Context::new(dir.tensors.len().saturating_mul(4).saturating_add(256), 0)?;
        Ok(WeightBuilder {
            dir,
            arch: arch.to_string(),
            ctx,
            used: BTreeSet::new(),
            from_file: Vec::new(),
            derived: Vec::new(),
            quantize: None,
            quantized: 0,
            not_quantized: 0,
        })
    }

    /// Quantize the large matrices (projections, experts, an untied head; not embeddings, routers,
    /// norms or conv kernels) to `dtype` as they load. A k-quant whose 256-element blocks do not
    /// fit a matrix's rows falls back to Q4_0 there (as llama.cpp falls back to a legacy type);
    /// rows that fit no block stay as stored.
    pub fn set_quantize(&mut self, dtype: Option<DType>) {
        self.quantize = dtype;
    }

    /// The type a matrix `name` with rows of `ne0` elements is stored in.
    fn target_dtype(&mut self, name: &str, stored: DType, ne0: usize) -> DType {
        let Some(q) = self.quantize else { return stored };
        let skip = name.contains("embed_tokens")
            || name.contains(".embeddings.")
            || name.ends_with(".gate.weight")
            || name.contains("conv1d");
        if skip {
            return stored;
        }
        let fits = |d: DType| ne0.is_multiple_of(d.block_size());
        let t = if fits(q) {
            q
        } else if q == DType::Q4_K && fits(DType::Q4_0) {
            DType::Q4_0
        } else {
            self.not_quantized += 1;
            return stored;
        };
        self.quantized += 1;
        t
    }

    fn missing(&self, name: &str) -> LoadError {
        LoadError::MissingTensor { name: name.to_string(), arch: self.arch.clone(), dir: self.dir.dir.clone() }
    }

    /// The files' entry for `name` with its element type, checked against `shape`; `None` when
    /// the files lack it.
    fn checked(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<(&'a SafetensorsFile, &'a TensorEntry, DType)>, LoadError> {
        let dir: &'a ModelDir = self.dir;
        let Some((file, entry)) = dir.entry(name) else {
            return Ok(None);
        };
        let dtype = stored_dtype(entry.dtype).ok_or_else(|| LoadError::UnsupportedDtype {
            name: name.to_string(),
            file: file.path.clone(),
            dtype: entry.dtype.name().to_string(),
        })?;
        if entry.shape != shape {
            return Err(LoadError::ShapeMismatch {
                name: name.to_string(),
                file: file.path.clone(),
                expected: shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        Ok(Some((file, entry, dtype)))
    }

    /// A required weight with the given shape (PyTorch order).
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        self.get_opt(name, shape)?.ok_or_else(|| self.missing(name))
    }

    /// An optional weight: `None` if the files do not have it, an error if they have it wrong.
    pub fn get_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>, LoadError> {
        let Some((_, _, dtype)) = self.checked(name, shape)? else {
            return Ok(None);
        };
        // Vectors (norm weights, biases) are kept in F32, as ggml's elementwise ops want F32
        // operands on every backend; they are a negligible share of the bytes.
        let dtype = if shape.len() == 1 { DType::F32 } else { self.target_dtype(name, dtype, shape[shape.len() - 1]) };
        let ne: Vec<i64> = shape.iter().rev().map(|&d| d as i64).collect();
        let t = self.ctx.try_new_tensor(dtype, &ne, name)?;
        self.used.insert(name.to_string());
        self.from_file.push(Source { tensor: t, name: name.to_string(), dst: 0, src: None, map: None });
        Ok(Some(t))
    }

    /// One 3-D tensor stacking the 2-D weights `names` (each of PyTorch shape `shape`, all of one
    /// dtype) along a new outer dimension: ggml shape `[shape[1], shape[0], names.len()]`, e.g. a
    /// MoE layer's experts for `mul_mat_id`. Every name is required.
    pub fn get_stacked(&mut self, names: &[String], shape: [usize; 2]) -> Result<Tensor, LoadError> {
        let mut dtype: Option<DType> = None;
        for name in names {
            let (file, _, d) = self.checked(name, &shape)?.ok_or_else(|| self.missing(name))?;
            if let Some(first) = dtype.filter(|&x| x != d) {
                return Err(LoadError::UnsupportedDtype {
                    name: name.clone(),
                    file: file.path.clone(),
                    dtype: format!("{} (the other tensors stacked with it are {})", d.name(), first.name()),
                });
            }
            dtype = Some(d);
        }
        let dtype = dtype.unwrap_or(DType::F32);
        let dtype = self.target_dtype(names.first().map_or("", |n| n.as_str()), dtype, shape[1]);
        let ne = [shape[1] as i64, shape[0] as i64, names.len().max(1) as i64];
        let t =
            self.ctx.try_new_tensor(dtype, &ne, &format!("{}#stacked", names.first().map_or("", |n| n.as_str())))?;
        let per = dtype.row_size(ne[0]) * shape[0];
        for (i, name) in names.iter().enumerate() {
            self.used.insert(name.clone());
            self.from_file.push(Source { tensor: t, name: name.clone(), dst: i * per, src: None, map: None });
        }
        Ok(t)
    }

    /// Split a 3-D file tensor `name` of PyTorch shape `[n, rows, cols]` (stacked experts with
    /// fused projections, e.g. `experts.gate_up_proj`) by rows into one tensor per `parts`
    /// entry `(first_row, n_rows)`, each of ggml shape `[cols, n_rows, n]`. `None` when the files
    /// lack `name`.
    pub fn get_split_rows(
        &mut self,
        name: &str,
        shape: [usize; 3],
        parts: &[(usize, usize)],
    ) -> Result<Option<Vec<Tensor>>, LoadError> {
        let Some(whole) = self.get_opt(name, &shape)? else {
            return Ok(None);
        };
        // `get_opt` declared the whole tensor; keep its checks, replace it by the parts.
        let src = self.from_file.pop().expect("just declared");
        // The parts take the whole's type (quantized or not); the file's rows are the source.
        let dtype = whole.dtype().unwrap_or(DType::F32);
        let (_, file_entry) = self.dir.entry(name).expect("declared above");
        let stored = stored_dtype(file_entry.dtype).expect("checked by get_opt");
        let src_row = stored.row_size(shape[2] as i64);
        let row = dtype.row_size(shape[2] as i64);
        let [n, rows, cols] = shape;
        let mut out = Vec::with_capacity(parts.len());
        for (k, &(first, len)) in parts.iter().enumerate() {
            let t = self.ctx.try_new_tensor(dtype, &[cols as i64, len as i64, n as i64], &format!("{name}#{k}"))?;
            for e in 0..n {
                self.from_file.push(Source {
                    tensor: t,
                    name: src.name.clone(),
                    dst: e * len * row,
                    src: Some(((e * rows + first) * src_row, len * src_row)),
                    map: None,
                });
            }
            out.push(t);
        }
        Ok(Some(out))
    }

    /// A stack of matrices stored in x·W orientation, file shape `[n, rows_in, cols_out]`, as
    /// `mul_mat_id` wants them: one tensor per `(offset, step)` of `parts`, of ggml shape
    /// `[rows_in, cols_out / step, n]`, holding output columns `offset, offset + step, ...` (gpt-oss's
    /// `gate_up_proj`, whose even columns are the gate and odd ones the up projection: parts
    /// `[(0, 2), (1, 2)]`; its `down_proj`: `[(0, 1)]`). The values are rearranged at load (in F32,
    /// then stored in the file's type, or quantized with `--quantize`). Required.
    pub fn get_transposed(
        &mut self,
        name: &str,
        shape: [usize; 3],
        parts: &[(usize, usize)],
    ) -> Result<Vec<Tensor>, LoadError> {
        let [n, rows, cols] = shape;
        let (_, _, stored) = self.checked(name, &shape)?.ok_or_else(|| self.missing(name))?;
        let mut out = Vec::with_capacity(parts.len());
        for (k, &(offset, step)) in parts.iter().enumerate() {
            self.check_part(name, "columns", cols, offset, step)?;
            // BF16 experts are kept as F16 (same size, 3 more mantissa bits), as
            // `get_f16_for_bf16` does: ggml's CPU kernels round the activations to the weights'
            // type, and BF16's 8 bits cost gpt-oss's clamped experts accuracy.
            let dtype = match self.target_dtype(name, stored, rows) {
                DType::BF16 => DType::F16,
                d => d,
            };
            let t = self.ctx.try_new_tensor(
                dtype,
                &[rows as i64, (cols / step) as i64, n as i64],
                &format!("{name}#{k}"),
            )?;
            self.from_file.push(Source {
                tensor: t,
                name: name.to_string(),
                dst: 0,
                src: None,
                map: Some(Map::Transposed(Transposed { n, rows, cols, step, offset })),
            });
            out.push(t);
        }
        self.used.insert(name.to_string());
        Ok(out)
    }

    /// Whether every `step`-th of `n` (rows or columns) from `offset` is a whole part.
    fn check_part(&self, name: &str, what: &str, n: usize, offset: usize, step: usize) -> Result<(), LoadError> {
        if step == 0 || offset >= step || !n.is_multiple_of(step) {
            return Err(LoadError::InvalidConfig {
                file: self.dir.config_path.clone(),
                field: name.to_string(),
                msg: format!("{n} {what} cannot be taken every {step} from {offset}"),
            });
        }
        Ok(())
    }

    /// Stacked matrices published in MXFP4 as the Hub stores them (gpt-oss's experts): `blocks`
    /// U8 `[n, rows, groups, 16]` and `scales` U8 `[n, rows, groups]` (rows are output rows;
    /// each holds `groups` blocks of 32 input values). One MXFP4 tensor of ggml shape
    /// `[groups * 32, rows / step, n]` per `(offset, step)` of `parts`, holding rows `offset,
    /// offset + step, ...`, loaded as stored (repacked, not dequantized; see [`mxfp4`]). Required.
    pub fn get_mxfp4(
        &mut self,
        blocks: &str,
        scales: &str,
        shape: [usize; 3],
        parts: &[(usize, usize)],
    ) -> Result<Vec<Tensor>, LoadError> {
        let [n, rows, groups] = shape;
        for (name, want) in [(blocks, vec![n, rows, groups, 16]), (scales, vec![n, rows, groups])] {
            let (file, entry) = self.dir.entry(name).ok_or_else(|| self.missing(name))?;
            if entry.dtype.name() != "U8" {
                return Err(LoadError::UnsupportedDtype {
                    name: name.to_string(),
                    file: file.path.clone(),
                    dtype: format!("{} (MXFP4 blocks and scales are U8)", entry.dtype.name()),
                });
            }
            if entry.shape != want {
                return Err(LoadError::ShapeMismatch {
                    name: name.to_string(),
                    file: file.path.clone(),
                    expected: want,
                    got: entry.shape.clone(),
                });
            }
        }
        let mut out = Vec::with_capacity(parts.len());
        for (k, &(offset, step)) in parts.iter().enumerate() {
            self.check_part(blocks, "rows", rows, offset, step)?;
            let ne = [(groups * 32) as i64, (rows / step) as i64, n as i64];
            let t = self.ctx.try_new_tensor(DType::MXFP4, &ne, &format!("{blocks}#{k}"))?;
            self.from_file.push(Source {
                tensor: t,
                name: blocks.to_string(),
                dst: 0,
                src: None,
                map: Some(Map::Mxfp4 { scales: scales.to_string(), n, rows, groups, step, offset }),
            });
            out.push(t);
        }
        self.used.insert(blocks.to_string());
        self.used.insert(scales.to_string());
        Ok(out)
    }

    /// A required weight of file shape `shape` (PyTorch order) as an F32 tensor of ggml shape `ne`
    /// (same element count): small parameters an op wants in another layout (a conv kernel
    /// `[ch, 1, k]` as `[k, ch]`, a per-head vector as `[1, n_head]`).
    pub fn get_reshaped(&mut self, name: &str, shape: &[usize], ne: &[i64]) -> Result<Tensor, LoadError> {
        self.get(name, shape)?;
        debug_assert_eq!(shape.iter().product::<usize>() as i64, ne.iter().product::<i64>());
        let src = self.from_file.pop().expect("just declared");
        let r = self.ctx.try_new_tensor(DType::F32, ne, name)?;
        self.from_file.push(Source { tensor: r, name: src.name, dst: 0, src: None, map: None });
        Ok(r)
    }

    /// A required matrix stored as F16 when the files have it in BF16 (same size, 3 more mantissa
    /// bits): for projections whose activations ggml's CPU kernels would otherwise round to BF16
    /// where that costs accuracy (Mamba's in/out projections feed an exponential recurrence).
    pub fn get_f16_for_bf16(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let t = self.get(name, shape)?;
        if t.dtype() != Some(DType::BF16) {
            // Quantized at load, or not BF16 in the files.
            return Ok(t);
        }
        let src = self.from_file.pop().expect("just declared");
        let ne: Vec<i64> = shape.iter().rev().map(|&d| d as i64).collect();
        let r = self.ctx.try_new_tensor(DType::F16, &ne, name)?;
        self.from_file.push(Source { tensor: r, name: src.name, dst: 0, src: None, map: None });
        Ok(r)
    }

    /// The values of a (small) weight, read now, as F32; it counts as used.
    pub fn read_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let (file, entry, _) = self.checked(name, shape)?.ok_or_else(|| self.missing(name))?;
        let mut buf = Vec::new();
        file.read(name, entry, &mut buf)?;
        self.used.insert(name.to_string());
        Ok(to_f32(entry.dtype, &buf))
    }

    /// Whether the files have a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.dir.entry(name).is_some()
    }

    /// Mark a tensor of the files as known but unused (e.g. a tied `lm_head.weight`).
    pub fn ignore(&mut self, name: &str) {
        if self.has(name) {
            self.used.insert(name.to_string());
        }
    }

    /// An F32 tensor computed at load time (ggml shape order).
    pub fn derived(&mut self, name: &str, ne: &[i64], data: Vec<f32>) -> Result<Tensor, LoadError> {
        let t = self.ctx.try_new_tensor(DType::F32, ne, name)?;
        self.derived.push((t, data));
        Ok(t)
    }

    /// Check that every tensor of the files was used, allocate the weights on the backends
    /// `placement` assigns them to, and copy the data (with a progress bar when stderr is a
    /// terminal).
    pub fn finish(self, backends: &[&Backend], placement: &Placement) -> Result<Weights, LoadError> {
        for (name, &fi) in &self.dir.tensors {
            // HF checkpoints of older versions carry these non-persistent buffers.
            if name.ends_with("rotary_emb.inv_freq") || name.ends_with(".masked_bias") {
                continue;
            }
            if !self.used.contains(name) {
                return Err(LoadError::UnexpectedTensor {
                    name: name.clone(),
                    arch: self.arch.clone(),
                    file: self.dir.files[fi].path.clone(),
                });
            }
        }
        // A tied embedding is the output head too: it goes where the head goes.
        let tied = !self.from_file.iter().any(|s| s.name.ends_with("lm_head.weight"));
        // Each tensor once (a stacked one has an entry per source, the first at offset 0).
        let all = self
            .from_file
            .iter()
            .filter(|s| s.dst == 0)
            .map(|s| (s.tensor, s.name.as_str()))
            .chain(self.derived.iter().map(|(t, _)| (*t, "")));
        // Tensors filled by exactly one whole file tensor (not stacked, not split).
        let mut sources: std::collections::HashMap<usize, (usize, bool)> = std::collections::HashMap::new();
        for s in &self.from_file {
            let e = sources.entry(s.tensor.addr()).or_insert((0, true));
            e.0 += 1;
            e.1 &= s.src.is_none();
        }
        let mut matrices = std::collections::HashMap::new();
        let mut groups: Vec<Vec<Tensor>> = vec![Vec::new(); backends.len()];
        for (t, name) in all {
            let whole = !name.is_empty() && sources.get(&t.addr()) == Some(&(1, true));
            let name = if name.is_empty() { t.name() } else { name.to_string() };
            let b = placement.of_tensor(&name, tied).min(backends.len() - 1);
            if whole && t.ne()[2] == 1 && t.ne()[3] == 1 && t.ne()[1] > 1 {
                matrices.insert(name, (t, b));
            }
            groups[b].push(t);
        }
        let mut buffers = Vec::new();
        let mut per_backend = vec![0; backends.len()];
        for (b, tensors) in groups.iter().enumerate() {
            if tensors.is_empty() {
                continue;
            }
            let what = format!("the model weights ({} tensors)", tensors.len());
            let buffer = Buffer::alloc_tensors_on(backends[b], tensors, &what)?;
            buffer.mark_weights();
            per_backend[b] = buffer.size();
            buffers.push(buffer);
        }
        let total: u64 = self.from_file.iter().filter(|s| s.dst == 0).map(|s| s.tensor.nbytes() as u64).sum();
        let bar = if crate::progress::bars() && total > 64 << 20 {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "loading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Some(b)
        } else {
            None
        };
        let mut scratch = Vec::new();
        let mut scale_buf = Vec::new();
        let mut read: Option<&str> = None;
        for s in &self.from_file {
            let (file, entry) = self.dir.entry(&s.name).expect("declared from the same index");
            if read != Some(s.name.as_str()) {
                file.read(&s.name, entry, &mut scratch)?;
                read = Some(s.name.as_str());
                if let Some(b) = &bar {
                    b.inc(entry.len);
                }
            }
            let bytes = match s.src {
                Some((start, len)) => &scratch[start..start + len],
                None => &scratch[..],
            };
            if let Some(Map::Transposed(map)) = &s.map {
                let values = map.apply(&to_f32(entry.dtype, bytes));
                let dtype = s.tensor.dtype().unwrap_or(DType::F32);
                let data = crate::ggml::convert_from_f32(dtype, &values, s.tensor.ne()[0] as usize)?;
                s.tensor.write_bytes(&data, 0)?;
            } else if let Some(Map::Mxfp4 { scales, n, rows, groups, step, offset }) = &s.map {
                let (sfile, sentry) = self.dir.entry(scales).expect("checked by get_mxfp4");
                sfile.read(scales, sentry, &mut scale_buf)?;
                let (n, rows, groups, step, offset) = (*n, *rows, *groups, *step, *offset);
                let mut data = Vec::with_capacity(n * (rows / step) * groups * mxfp4::GGML_BLOCK_BYTES);
                for e in 0..n {
                    for r in (offset..rows).step_by(step) {
                        let row = e * rows + r;
                        let codes = &bytes[row * groups * 16..(row + 1) * groups * 16];
                        let exps = &scale_buf[row * groups..(row + 1) * groups];
                        data.extend(mxfp4::hub_to_ggml(codes, exps).expect("lengths from the checked shapes"));
                    }
                }
                s.tensor.write_bytes(&data, 0)?;
            } else if s.tensor.dtype() == Some(DType::F32) && entry.dtype != StDtype::F32 {
                // Widened vectors are never stacked or split (those keep the files' dtype).
                debug_assert_eq!(s.dst, 0);
                s.tensor.write_f32(&to_f32(entry.dtype, bytes))?;
            } else if let Some(q) = s.tensor.dtype().filter(|d| d.is_quantized()) {
                let data = crate::ggml::convert_from_f32(q, &to_f32(entry.dtype, bytes), s.tensor.ne()[0] as usize)?;
                s.tensor.write_bytes(&data, s.dst)?;
            } else if s.tensor.dtype() == Some(DType::F16) && entry.dtype == StDtype::BF16 {
                let h: Vec<half::f16> = to_f32(entry.dtype, bytes).into_iter().map(half::f16::from_f32).collect();
                s.tensor.write_f16(&h)?;
            } else {
                s.tensor.write_bytes(bytes, s.dst)?;
            }
        }
        for (t, data) in &self.derived {
            t.write_f32(data)?;
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        tracing::info!(?per_backend, tensors = self.from_file.len(), "weights loaded");
        if let Some(q) = self.quantize {
            tracing::info!(
                dtype = q.name(),
                quantized = self.quantized,
                kept = self.not_quantized,
                "quantized at load"
            );
        }
        let n_params = self.from_file.iter().filter(|s| s.dst == 0).map(|s| s.tensor.nelements() as u64).sum();
        Ok(Weights { _buffers: buffers, per_backend, n_params, matrices, _ctx: self.ctx.into_headers() })
    }
}

#[cfg(test)]
mod tests {
    use super::quote_python_floats;

    #[test]
    fn python_float_words_are_quoted_outside_strings() {
        let text = r#"{"limit": [0.0, Infinity], "n": -Infinity, "x": NaN, "s": "Infinity \"NaN\"", "ok": 1}"#;
        let v: serde_json::Value = serde_json::from_str(&quote_python_floats(text)).unwrap();
        assert_eq!(v["limit"][1], "Infinity");
        assert_eq!(v["n"], "-Infinity");
        assert_eq!(v["x"], "NaN");
        assert_eq!(v["s"], "Infinity \"NaN\"");
        assert_eq!(v["ok"], 1);
    }
}
