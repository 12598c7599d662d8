//! LoRA adapters as `peft` saves them (`adapter_config.json` + `adapter_model.safetensors`),
//! applied **unmerged**: a projection computes `W x + Σ_a w_a · s_a · B_a (A_a x)` over the
//! adapters active for the row's sequence, so several adapters stay loaded, each sequence picks
//! none, one or a weighted list, and sequences with different adapters share one step (each
//! adapter's low-rank product runs over the whole step; a per-token weight row, zero for tokens
//! of other sequences, selects it).
//!
//! An adapter is immutable once loaded; the [`LoraRegistry`] maps names to the current version.
//! Replacing or reloading a name installs a new version, and requests keep the `Arc` of the
//! version they started with, so in-flight sequences finish on it. The registry also notices
//! when an adapter's files change on disk ([`LoraRegistry::get`] compares their stamps).
//!
//! What is read: `r`, `lora_alpha`, `use_rslora` (scale `alpha/√r` instead of `alpha/r`),
//! `rank_pattern` / `alpha_pattern` (per-module overrides, matched as PEFT does on the module
//! name's suffix), `fan_in_fan_out` (PEFT resets it for `nn.Linear` bases, which all supported
//! architectures have; ignored with a warning), tensors `base_model.model.<module>.lora_{A,B}.weight`.
//! `modules_to_save` naming linear modules (e.g. `lm_head`): the adapter's copy of the whole
//! matrix replaces the base's for the sequences using the adapter (computed as
//! `y + w·(W' x − W x)`, so other sequences in the step keep the base).
//! Refused with a clear error: DoRA, trained biases, embedding adapters, `modules_to_save`
//! naming an embedding or a module that is not one matrix, and modules stllm does not hold as one
//! matrix (experts stacked at load, fused projections split at load).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::ggml::{Buffer, Context, DType, GgmlError, Tensor};
use crate::loader::safetensors::SafetensorsFile;
use crate::loader::{read_json, to_f32, LoadError};
use crate::model::Model;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Ggml(#[from] GgmlError),
    #[error("{}: {msg}", dir.display())]
    Invalid { dir: PathBuf, msg: String },
    #[error("{}: {msg} (not supported)", dir.display())]
    Unsupported { dir: PathBuf, msg: String },
    #[error(
        "{}: module {module} has no matrix {} in the model (the model's projections: {examples}{})",
        dir.display(), tried.join(" or "), if *stacked { "; experts and fused projections are stacked or split at load, so adapters cannot target them" } else { "" }
    )]
    UnknownModule { dir: PathBuf, module: String, tried: Vec<String>, examples: String, stacked: bool },
    #[error("{}: {module}: lora_A is {a:?} and lora_B {b:?}, the base matrix is [{out}, {inp}] (in PyTorch order)", dir.display())]
    Shape { dir: PathBuf, module: String, a: Vec<usize>, b: Vec<usize>, out: usize, inp: usize },
    #[error("no LoRA adapter named {0:?} is loaded")]
    NotLoaded(String),
}

/// Distinct adapters one step computes at most (graphs are sized for it; the engine's scheduler
/// leaves sequences that would exceed it for a later step).
pub const MAX_STEP_ADAPTERS: usize = 8;

/// One adapted projection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LoraPair {
    /// Low rank: `A` ggml `[in, r]`, `B` ggml `[r, out]` with the scale folded in
    LowRank { a: Tensor, b: Tensor },
    /// `modules_to_save`: the whole replacement matrix, shaped as the base
    Full(Tensor),
}

/// A loaded adapter version. Its tensors live on the backends of the matrices they adapt.
pub struct LoraAdapter {
    name: String,
    dir: PathBuf,
    /// Unique over the process: what a step graph is keyed by
    id: u64,
    /// [`Model::uid`] of the model whose matrices it adapts (it finds them by address)
    model: u64,
    stamp: Vec<Stamp>,
    /// By the adapted matrix's tensor address, with the backend index holding it
    pairs: HashMap<usize, (LoraPair, usize)>,
    rank: usize,
    bytes: usize,
    // The tensor data, then the headers; the model whose matrices they adapt outlives neither
    // concern (they are only used in graphs together with it).
    _buffers: Vec<Buffer>,
    _ctx: crate::ggml::Headers,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("id", &self.id)
            .field("modules", &self.pairs.len())
            .field("rank", &self.rank)
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// What identifies a version of an adapter file on disk: path, modification time, size and (on
/// Unix) inode, so a new version renamed into place is noticed even within the file system's
/// timestamp granularity.
type Stamp = (PathBuf, Option<SystemTime>, u64, u64);

fn stamp(dir: &Path) -> Vec<Stamp> {
    FILES
        .iter()
        .map(|f| {
            let p = dir.join(f);
            let m = std::fs::metadata(&p).ok();
            #[cfg(unix)]
            let ino = m.as_ref().map_or(0, std::os::unix::fs::MetadataExt::ino);
            #[cfg(not(unix))]
            let ino = 0;
            (p, m.as_ref().and_then(|m| m.modified().ok()), m.map_or(0, |m| m.len()), ino)
        })
        .collect()
}

/// PEFT's pattern match: the key equals the module name or is a dotted suffix of it.
fn pattern<'a>(
    map: Option<&'a serde_json::Map<String, serde_json::Value>>,
    module: &str,
) -> Option<&'a serde_json::Value> {
    map?.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| v)
}

impl LoraAdapter {
    /// Read a PEFT adapter folder and place its matrices beside the model's.
    pub fn load(model: &Model, name: &str, dir: &Path) -> Result<LoraAdapter, LoraError> {
        let invalid = |msg: String| LoraError::Invalid { dir: dir.to_path_buf(), msg };
        let unsupported = |msg: String| LoraError::Unsupported { dir: dir.to_path_buf(), msg };
        let stamp = stamp(dir);
        let cfg_path = dir.join(FILES[0]);
        let cfg = read_json(&cfg_path)?;
        let cfg = cfg.as_object().ok_or_else(|| invalid(format!("{} is not a JSON object", FILES[0])))?;
        let get = |k: &str| cfg.get(k).filter(|v| !v.is_null());
        if let Some(t) = get("peft_type").and_then(|v| v.as_str()) {
            if !t.eq_ignore_ascii_case("lora") {
                return Err(unsupported(format!("peft_type {t:?}: only LORA adapters load")));
            }
        }
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(unsupported("use_dora: DoRA adapters".into()));
        }
        if let Some(b) = get("bias").and_then(|v| v.as_str()).filter(|b| *b != "none") {
            return Err(unsupported(format!("bias {b:?}: trained biases")));
        }
        if get("lora_bias").and_then(|v| v.as_bool()) == Some(true) {
            return Err(unsupported("lora_bias: a bias on lora_B".into()));
        }
        let to_save: Vec<String> = get("modules_to_save")
            .and_then(|v| v.as_array())
            .map(|m| m.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if let Some(e) = to_save.iter().find(|m| m.contains("embed") || m.contains("wte")) {
            return Err(unsupported(format!("modules_to_save {e:?}: replacing an embedding")));
        }
        if get("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
            tracing::warn!(dir = %dir.display(), "fan_in_fan_out is for Conv1D bases; the model's projections are Linear (as PEFT does, ignored)");
        }
        let num = |v: Option<&serde_json::Value>, what: &str| -> Result<Option<f64>, LoraError> {
            match v {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| invalid(format!("{what} must be a number, got {v}"))),
            }
        };
        let r_default = num(get("r"), "r")?.ok_or_else(|| invalid("adapter_config.json has no r".into()))?;
        let alpha_default = num(get("lora_alpha"), "lora_alpha")?.unwrap_or(8.0);
        let rslora = get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        let rank_pattern = get("rank_pattern").and_then(|v| v.as_object());
        let alpha_pattern = get("alpha_pattern").and_then(|v| v.as_object());

        let st = SafetensorsFile::open(&dir.join(FILES[1]))?;
        // module -> (A entry name, B entry name)
        let mut modules: HashMap<String, [Option<String>; 2]> = HashMap::new();
        // module -> entry name of its replacement (modules_to_save)
        let mut saved: Vec<(String, String)> = Vec::new();
        for key in st.tensors.keys() {
            let k = key.strip_prefix("base_model.model.").unwrap_or(key);
            let k = k.replace(".modules_to_save.default.", ".");
            if let Some(m) = k
                .strip_suffix(".weight")
                .filter(|m| to_save.iter().any(|s| *m == s.as_str() || m.ends_with(&format!(".{s}"))))
            {
                saved.push((m.to_string(), key.clone()));
                continue;
            }
            let (module, which) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if let Some(m) = k.strip_suffix(".lora_A.default.weight") {
                (m, 0)
            } else if let Some(m) = k.strip_suffix(".lora_B.default.weight") {
                (m, 1)
            } else if k.contains("lora_embedding") {
                return Err(unsupported(format!("{key}: adapters on embeddings")));
            } else if k.contains("lora_magnitude") {
                return Err(unsupported(format!("{key}: DoRA magnitudes")));
            } else {
                return Err(unsupported(format!("tensor {key}: only lora_A / lora_B matrices load")));
            };
            modules.entry(module.to_string()).or_default()[which] = Some(key.clone());
        }
        if modules.is_empty() && saved.is_empty() {
            return Err(invalid(format!("{} holds no lora_A / lora_B tensors", FILES[1])));
        }
        let ctx = Context::new(2 * modules.len() + saved.len() + 8, 0)?;
        let n_backends = model.backends.len();
        let mut groups: Vec<Vec<Tensor>> = vec![Vec::new(); n_backends];
        let mut pairs = HashMap::new();
        let mut data: Vec<(Tensor, Vec<f32>)> = Vec::new();
        let mut data_full: Vec<(Tensor, Vec<f32>)> = Vec::new();
        let mut rank = 0;
        let mut buf = Vec::new();
        let mut names: Vec<&String> = modules.keys().collect();
        names.sort();
        for module in names {
            let [Some(a_name), Some(b_name)] = &modules[module] else {
                return Err(invalid(format!("module {module} has only one of lora_A / lora_B")));
            };
            let tried = base_names(module);
            let Some(&(w, backend)) = tried.iter().find_map(|n| model.weights.matrices.get(n)) else {
                let mut ex: Vec<&String> = model.weights.matrices.keys().filter(|k| k.contains("layers.0.")).collect();
                ex.sort();
                let examples = ex.iter().take(8).map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
                let stacked = module.contains("experts") || module.contains("gate_up");
                return Err(LoraError::UnknownModule {
                    dir: dir.to_path_buf(),
                    module: module.clone(),
                    tried,
                    examples,
                    stacked,
                });
            };
            let (inp, out) = (w.ne()[0] as usize, w.ne()[1] as usize);
            let (ae, be) = (&st.tensors[a_name], &st.tensors[b_name]);
            let r = ae.shape.first().copied().unwrap_or(0);
            if ae.shape != [r, inp] || be.shape != [out, r] || r == 0 {
                return Err(LoraError::Shape {
                    dir: dir.to_path_buf(),
                    module: module.clone(),
                    a: ae.shape.clone(),
                    b: be.shape.clone(),
                    out,
                    inp,
                });
            }
            let r_cfg = num(pattern(rank_pattern, module), "rank_pattern")?.unwrap_or(r_default);
            if r_cfg as usize != r {
                tracing::warn!(module, r, r_cfg, "lora_A's rank differs from the config's; the tensor's is used");
            }
            let alpha = num(pattern(alpha_pattern, module), "alpha_pattern")?.unwrap_or(alpha_default);
            let scale = if rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 } as f32;
            if !scale.is_finite() {
                return Err(invalid(format!(
                    "lora_alpha {alpha} with rank {r} gives the scale {scale} for {module}: not a finite number"
                )));
            }
            let read = |name: &str, buf: &mut Vec<u8>| -> Result<Vec<f32>, LoraError> {
                let e = &st.tensors[name];
                match e.dtype {
                    crate::loader::safetensors::StDtype::Other(d) => {
                        return Err(invalid(format!("tensor {name} has dtype {d}, supported: F32, F16, BF16")))
                    }
                    _ => st.read(name, e, buf)?,
                }
                Ok(to_f32(e.dtype, buf))
            };
            let a_data = read(a_name, &mut buf)?;
            let b_data: Vec<f32> = read(b_name, &mut buf)?.into_iter().map(|x| x * scale).collect();
            let a = ctx.new_tensor(DType::F32, &[inp as i64, r as i64], &format!("lora_a.{module}"));
            let b = ctx.new_tensor(DType::F32, &[r as i64, out as i64], &format!("lora_b.{module}"));
            groups[backend].extend([a, b]);
            data.push((a, a_data));
            data.push((b, b_data));
            pairs.insert(w.addr(), (LoraPair::LowRank { a, b }, backend));
            rank = rank.max(r);
        }
        for (module, key) in &saved {
            let tried = base_names(module);
            let Some(&(w, backend)) = tried.iter().find_map(|n| model.weights.matrices.get(n)) else {
                return Err(unsupported(format!(
                    "modules_to_save {module:?}: the model holds no single matrix {} (embeddings, tied heads, \
                     stacked or fused weights cannot be replaced)",
                    tried.join(" or ")
                )));
            };
            let (inp, out) = (w.ne()[0] as usize, w.ne()[1] as usize);
            let e = &st.tensors[key];
            if e.shape != [out, inp] {
                return Err(invalid(format!("{key} has shape {:?}, the base matrix is [{out}, {inp}]", e.shape)));
            }
            if pairs.contains_key(&w.addr()) {
                return Err(invalid(format!("{module} is both adapted (lora_A/B) and saved whole")));
            }
            let data = match e.dtype {
                crate::loader::safetensors::StDtype::Other(d) => {
                    return Err(invalid(format!("tensor {key} has dtype {d}, supported: F32, F16, BF16")))
                }
                _ => {
                    st.read(key, e, &mut buf)?;
                    to_f32(e.dtype, &buf)
                }
            };
            let t = ctx.new_tensor(DType::F32, &[inp as i64, out as i64], &format!("lora_full.{module}"));
            groups[backend].push(t);
            data_full.push((t, data));
            pairs.insert(w.addr(), (LoraPair::Full(t), backend));
        }
        let mut buffers = Vec::new();
        let mut bytes = 0;
        for (b, tensors) in groups.iter().enumerate() {
            if tensors.is_empty() {
                continue;
            }
            let what = format!("LoRA adapter {name} ({} tensors)", tensors.len());
            let buffer = Buffer::alloc_tensors_on(&model.backends[b], tensors, &what)?;
            bytes += buffer.size();
            buffers.push(buffer);
        }
        for (t, d) in data.iter().chain(&data_full) {
            t.write_f32(d)?;
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        tracing::info!(name, dir = %dir.display(), modules = pairs.len(), rank, bytes, id, "LoRA adapter loaded");
        Ok(LoraAdapter {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            id,
            model: model.uid(),
            stamp,
            pairs,
            rank,
            bytes,
            _buffers: buffers,
            _ctx: ctx.into_headers(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// [`Model::uid`] of the model it was loaded for.
    pub fn model_uid(&self) -> u64 {
        self.model
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This version's identity (a reload gets a new one).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Matrices adapted
    pub fn modules(&self) -> usize {
        self.pairs.len()
    }

    /// The largest rank
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Backend bytes of its matrices
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn pair(&self, w: Tensor) -> Option<LoraPair> {
        self.pairs.get(&w.addr()).map(|p| p.0)
    }

    /// Whether the files on disk differ from those this version was read from.
    pub fn changed_on_disk(&self) -> bool {
        stamp(&self.dir) != self.stamp
    }
}

/// Checkpoint names a PEFT module path may refer to: `<module>.weight`, and for models whose
/// checkpoints name the trunk `backbone` (NemotronH) while transformers' modules call it `model`,
/// that spelling too.
fn base_names(module: &str) -> Vec<String> {
    let mut v = vec![format!("{module}.weight")];
    if let Some(rest) = module.strip_prefix("model.") {
        v.push(format!("backbone.{rest}.weight"));
    }
    if let Some(rest) = module.strip_prefix("backbone.") {
        v.push(format!("model.{rest}.weight"));
    }
    v
}

/// A sequence's adapters: each with its weight (1.0 = as trained).
pub type AdapterList = Vec<(Arc<LoraAdapter>, f32)>;

/// The adapters loaded for one model, by name; shared by everything serving the model.
#[derive(Default)]
pub struct LoraRegistry {
    adapters: Mutex<HashMap<String, Arc<LoraAdapter>>>,
}

impl std::fmt::Debug for LoraRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.list()).finish()
    }
}

impl LoraRegistry {
    /// Load (or replace) the adapter `name` from `dir`. A replaced version stays alive for the
    /// sequences using it.
    pub fn load(&self, model: &Model, name: &str, dir: &Path) -> Result<Arc<LoraAdapter>, LoraError> {
        let a = Arc::new(LoraAdapter::load(model, name, dir)?);
        self.lock().insert(name.to_string(), a.clone());
        Ok(a)
    }

    /// Read `name`'s folder again (explicitly), installing the new version.
    pub fn reload(&self, model: &Model, name: &str) -> Result<Arc<LoraAdapter>, LoraError> {
        let dir = self.lock().get(name).map(|a| a.dir.clone()).ok_or_else(|| LoraError::NotLoaded(name.into()))?;
        self.load(model, name, &dir)
    }

    /// Forget `name` (sequences using it keep their version); whether it was loaded.
    pub fn unload(&self, name: &str) -> bool {
        self.lock().remove(name).is_some()
    }

    /// The current version of `name`; when its files changed on disk since it was read, it is
    /// read again first (hot reload). A reload that fails keeps the loaded version and logs why.
    pub fn get(&self, model: &Model, name: &str) -> Result<Arc<LoraAdapter>, LoraError> {
        let cur = self.lock().get(name).cloned().ok_or_else(|| LoraError::NotLoaded(name.into()))?;
        if !cur.changed_on_disk() {
            return Ok(cur);
        }
        match LoraAdapter::load(model, name, &cur.dir) {
            Ok(new) => {
                let new = Arc::new(new);
                let mut map = self.lock();
                // Another caller may have reloaded meanwhile: keep the newest.
                match map.get(name) {
                    Some(a) if a.id > new.id => Ok(a.clone()),
                    _ => {
                        map.insert(name.to_string(), new.clone());
                        tracing::info!(name, id = new.id, "LoRA adapter reloaded (files changed)");
                        Ok(new)
                    }
                }
            }
            Err(e) => {
                tracing::warn!(name, error = %e, "LoRA adapter files changed but do not load; keeping the loaded version");
                Ok(cur)
            }
        }
    }

    /// Backend bytes of the current versions.
    pub fn bytes(&self) -> usize {
        self.lock().values().map(|a| a.bytes).sum()
    }

    /// Loaded adapters: (name, folder, version id, modules, rank).
    pub fn list(&self) -> Vec<(String, PathBuf, u64, usize, usize)> {
        let mut v: Vec<_> =
            self.lock().values().map(|a| (a.name.clone(), a.dir.clone(), a.id, a.pairs.len(), a.rank)).collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LoraAdapter>>> {
        self.adapters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An adapter active in a step being built: its per-token weight rows (`F32 [1, n_tokens]`,
/// input; and the same gathered to the output rows, for layers that run on those only).
#[derive(Clone, Copy)]
pub(crate) struct ActiveLora<'a> {
    pub adapter: &'a LoraAdapter,
    pub w_tokens: Tensor,
    pub w_out: Tensor,
}

/// The low-rank matrices of a set of adapters stacked by slot, per adapted matrix: `A` as
/// `[in, R, n + 1]` and `B` as `[R, out, n + 1]` (ranks padded with zeros to the set's largest,
/// slot `n` all zeros). With it a projection computes every token's adapters in two
/// `mul_mat_id` (punica's BGMV: each token gathers its own slots), whatever the number of
/// adapters in the step, instead of four nodes per adapter. Built when a step's set of adapters
/// changes (a copy of their matrices) and kept while it stays.
pub struct LoraStack {
    ids: Vec<u64>,
    rank: usize,
    stacks: HashMap<usize, (Tensor, Tensor)>,
    bytes: usize,
    _buffers: Vec<Buffer>,
    _ctx: crate::ggml::Headers,
}

impl LoraStack {
    /// Stack `adapters` (slot `i` = `adapters[i]`).
    pub fn build(model: &Model, adapters: &[Arc<LoraAdapter>]) -> Result<LoraStack, LoraError> {
        let n = adapters.len();
        // On a GPU the rank is padded to 32: ggml-cuda's mat-mul-by-id kernel wants row counts in
        // blocks of 32, and otherwise falls back to a path that synchronises the stream (no
        // CUDA-graph replay). The CPU takes any rank.
        let pad = if model.on_device() { 32 } else { 1 };
        let rank = adapters.iter().map(|a| a.rank).max().unwrap_or(0).max(1).next_multiple_of(pad);
        // Every low-rank module of any adapter: (in, out, backend), by matrix address.
        let mut modules: Vec<(usize, i64, i64, usize)> = Vec::new();
        for a in adapters {
            for (&addr, &(p, backend)) in &a.pairs {
                if let LoraPair::LowRank { a, b } = p {
                    if !modules.iter().any(|m| m.0 == addr) {
                        modules.push((addr, a.ne()[0], b.ne()[1], backend));
                    }
                }
            }
        }
        modules.sort_unstable();
        let ctx = Context::new(2 * modules.len() + 8, 0)?;
        let mut groups: Vec<Vec<Tensor>> = vec![Vec::new(); model.backends.len()];
        let mut stacks = HashMap::new();
        let (r, slots) = (rank as i64, n as i64 + 1);
        for &(addr, inp, out, backend) in &modules {
            let sa = ctx.new_tensor(DType::F32, &[inp, r, slots], "lora_stack_a");
            let sb = ctx.new_tensor(DType::F32, &[r, out, slots], "lora_stack_b");
            groups[backend].extend([sa, sb]);
            stacks.insert(addr, (sa, sb));
        }
        let mut buffers = Vec::new();
        let mut bytes = 0;
        for (b, tensors) in groups.iter().enumerate() {
            if !tensors.is_empty() {
                let what = format!("LoRA stack of {n} adapters ({} tensors)", tensors.len());
                let buffer = Buffer::alloc_tensors_on(&model.backends[b], tensors, &what)?;
                bytes += buffer.size();
                buffers.push(buffer);
            }
        }
        for &(addr, inp, out, _) in &modules {
            let (inp, out) = (inp as usize, out as usize);
            let (sa, sb) = stacks[&addr];
            let mut da = vec![0f32; inp * rank * (n + 1)];
            let mut db = vec![0f32; rank * out * (n + 1)];
            for (slot, ad) in adapters.iter().enumerate() {
                let Some(&(LoraPair::LowRank { a, b }, _)) = ad.pairs.get(&addr) else { continue };
                let ra = a.ne()[1] as usize;
                // A [in, ra] -> slot rows 0..ra of [in, R]
                let va = a.read_f32()?;
                da[slot * inp * rank..][..inp * ra].copy_from_slice(&va);
                // B [ra, out] -> columns 0..ra of each of the `out` rows of [R, out]
                let vb = b.read_f32()?;
                for o in 0..out {
                    db[(slot * out + o) * rank..][..ra].copy_from_slice(&vb[o * ra..][..ra]);
                }
            }
            sa.write_f32(&da)?;
            sb.write_f32(&db)?;
        }
        tracing::debug!(adapters = n, rank, modules = modules.len(), bytes, "LoRA stack built");
        Ok(LoraStack {
            ids: adapters.iter().map(|a| a.id).collect(),
            rank,
            stacks,
            bytes,
            _buffers: buffers,
            _ctx: ctx.into_headers(),
        })
    }

    /// The adapter versions stacked, in slot order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
}

/// A stack in a step being built: per token, `per_token` (slot, weight) pairs as inputs
/// (`ids` I32 `[per_token, n_tokens]`, `w` F32 `[per_token, n_tokens]`) and the same gathered
/// to the output rows.
#[derive(Clone, Copy)]
pub(crate) struct StackInputs<'a> {
    pub stack: &'a LoraStack,
    pub per_token: usize,
    pub ids: Tensor,
    pub w: Tensor,
    pub ids_out: Tensor,
    pub w_out: Tensor,
}

/// `y = w x` plus each active adapter's `B (A x)` weighted per token (see the module docs);
/// with a stack, the low-rank updates of all adapters in two `mul_mat_id`.
pub(crate) fn apply(
    ctx: &Context,
    active: &[ActiveLora],
    stack: Option<&StackInputs>,
    n_tokens: usize,
    w: Tensor,
    x: Tensor,
    y: Tensor,
) -> Tensor {
    let base = y;
    let mut y = y;
    let ne = x.ne();
    let rows = ne[1] * ne[2] * ne[3];
    let x2 = if ne[2] * ne[3] > 1 || !x.is_contiguous() { ctx.reshape_2d(ctx.cont(x), ne[0], rows) } else { x };
    let stacked = stack.and_then(|s| s.stack.stacks.get(&w.addr()).map(|&ab| (s, ab)));
    if let Some((s, (sa, sb))) = stacked {
        let l = s.per_token as i64;
        let (ids, wt) = if rows as usize == n_tokens { (s.ids, s.w) } else { (s.ids_out, s.w_out) };
        let ax = ctx.mul_mat_id(sa, ctx.reshape_3d(x2, ne[0], 1, rows), ids); // [R, l, rows]
        let ax = ctx.mul(ax, ctx.reshape_3d(wt, 1, l, rows));
        let bax = ctx.mul_mat_id(sb, ax, ids); // [out, l, rows]
        let out = bax.ne()[0];
        let mut d = ctx.view_2d(bax, out, rows, bax.nb()[2], 0);
        for j in 1..l as usize {
            d = ctx.add(d, ctx.view_2d(bax, out, rows, bax.nb()[2], j * bax.nb()[1]));
        }
        let yn = y.ne();
        let d = if yn[2] * yn[3] > 1 { ctx.reshape_4d(ctx.cont(d), yn[0], yn[1], yn[2], yn[3]) } else { d };
        y = ctx.add(y, d);
    }
    for act in active {
        let Some(p) = act.adapter.pair(w) else { continue };
        if stacked.is_some() && matches!(p, LoraPair::LowRank { .. }) {
            continue; // computed with the stack
        }
        let wt = if rows as usize == n_tokens { act.w_tokens } else { act.w_out };
        debug_assert_eq!(wt.ne()[1], rows, "a projection over neither all tokens nor the output rows");
        let d = match p {
            LoraPair::LowRank { a, b } => ctx.mul_mat(b, ctx.mul_mat(a, x2)),
            LoraPair::Full(w2) => {
                let yn = base.ne();
                let base2 = if yn[2] * yn[3] > 1 { ctx.reshape_2d(ctx.cont(base), yn[0], rows) } else { base };
                ctx.sub(ctx.mul_mat(w2, x2), base2)
            }
        };
        let d = ctx.mul(d, wt);
        let yn = y.ne();
        let d = if yn[2] * yn[3] > 1 { ctx.reshape_4d(d, yn[0], yn[1], yn[2], yn[3]) } else { d };
        y = ctx.add(y, d);
    }
    y
}
