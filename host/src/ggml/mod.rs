//! The ggml layer: the only module of stllm with `unsafe`.
//!
//! A thin, safe wrapper over the `ggml_*` / `ggml_backend_*` C API vendored by `llama-cpp-sys-2`
//! (ggml 0.26). We never call llama.cpp's model code, only ggml.
//!
//! Ownership model:
//! - [`Context`] owns a `no_alloc` ggml context: tensor *metadata* only. Tensor data lives in a
//!   backend [`Buffer`] (weights, KV cache) or in the scheduler's compute buffers (activations).
//! - [`Tensor`] is a `Copy` handle to a tensor of some context. It stays valid while that context
//!   lives; the owners in this crate (model weights, KV cache, one graph build) keep the context and
//!   its tensors together in one struct, so a handle never outlives its context. This whole layer
//!   is `pub(crate)`: no safe code outside the crate can hold a handle past its context.
//! - A [`Context`] is `Send` but not `Sync` (tensors are created in it through `&self`); a context
//!   that only keeps headers alive once built is a [`Headers`], which is `Sync`.
//! - [`Backend`] owns a ggml backend (the CPU one with a persistent threadpool, or a device backend),
//!   [`Sched`] owns a `ggml_backend_sched` that allocates and runs graphs over one or more backends.
//!
//! Shapes follow ggml's order: `ne[0]` is the fastest-moving dimension (the reverse of PyTorch).

mod ops;

pub use ops::{RopeParams, ROPE_NEOX};

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::Once;

use llama_cpp_sys_2 as sys;

/// Errors raised by the ggml layer.
#[derive(Debug, thiserror::Error)]
pub enum GgmlError {
    #[error("ggml could not allocate {what} ({bytes} bytes)")]
    Alloc { what: String, bytes: usize },
    #[error("ggml graph computation failed with status {0}")]
    Compute(i32),
    #[error("no ggml backend device {0:?} (available: {1}; GPU devices come from backend modules: --backend-dir)")]
    NoDevice(String, String),
    #[error("tensor {name}: {msg}")]
    Tensor { name: String, msg: String },
    #[error("backend {path}: {msg}")]
    Backend { path: String, msg: String },
    #[error("{what} does not fit: needs {} MiB, {device} has {} MiB free", need >> 20, free >> 20)]
    OutOfMemory { what: String, need: usize, free: usize, device: String },
}

/// Element types we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I64,
    Q8_0,
    Q4_0,
    /// 4-bit k-quant (super-blocks of 256 with 6-bit scales)
    #[allow(non_camel_case_types)]
    Q4_K,
    /// OCP microscaling FP4: blocks of 32 E2M1 values with one E8M0 (power-of-two) scale, as
    /// gpt-oss's experts are published
    MXFP4,
}

impl DType {
    fn raw(self) -> sys::ggml_type {
        match self {
            DType::F32 => sys::GGML_TYPE_F32,
            DType::F16 => sys::GGML_TYPE_F16,
            DType::BF16 => sys::GGML_TYPE_BF16,
            DType::I32 => sys::GGML_TYPE_I32,
            DType::I64 => sys::GGML_TYPE_I64,
            DType::Q8_0 => sys::GGML_TYPE_Q8_0,
            DType::Q4_0 => sys::GGML_TYPE_Q4_0,
            DType::Q4_K => sys::GGML_TYPE_Q4_K,
            DType::MXFP4 => sys::GGML_TYPE_MXFP4,
        }
    }

    fn from_raw(t: sys::ggml_type) -> Option<DType> {
        Some(match t {
            sys::GGML_TYPE_F32 => DType::F32,
            sys::GGML_TYPE_F16 => DType::F16,
            sys::GGML_TYPE_BF16 => DType::BF16,
            sys::GGML_TYPE_I32 => DType::I32,
            sys::GGML_TYPE_I64 => DType::I64,
            sys::GGML_TYPE_Q8_0 => DType::Q8_0,
            sys::GGML_TYPE_Q4_0 => DType::Q4_0,
            sys::GGML_TYPE_Q4_K => DType::Q4_K,
            sys::GGML_TYPE_MXFP4 => DType::MXFP4,
            _ => return None,
        })
    }

    /// The lowercase name used on the command line and in logs ("bf16", "q8_0", ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_K => "q4_k",
            DType::MXFP4 => "mxfp4",
        }
    }

    /// Block-quantized types (elements come in blocks of `block_size`).
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::MXFP4)
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        // SAFETY: pure function of its argument.
        unsafe { sys::ggml_blck_size(self.raw()) as usize }
    }

    /// Bytes taken by a row of `n` elements.
    pub fn row_size(self, n: i64) -> usize {
        // SAFETY: pure function of its arguments.
        unsafe { sys::ggml_row_size(self.raw(), n) }
    }
}

/// The version string of the linked ggml (e.g. "0.26.0").
pub fn version() -> String {
    // SAFETY: returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(sys::ggml_version()) }.to_string_lossy().into_owned()
}

/// A compute device ggml knows: the CPU, or one a loaded backend module provides.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceInfo {
    /// ggml's device name ("CPU", "CUDA0", ...)
    pub name: String,
    pub description: String,
    /// "cpu", "gpu", "igpu", "accel" or "meta"
    pub kind: &'static str,
    /// Free and total memory in bytes (what the driver reports)
    pub free: usize,
    pub total: usize,
}

/// Every device of the registered backends (the CPU, plus what loaded modules add).
pub fn devices() -> Vec<DeviceInfo> {
    init();
    // SAFETY: registry queries; indices are below the count; strings are static to the device.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let d = sys::ggml_backend_dev_get(i);
                let (mut free, mut total) = (0usize, 0usize);
                sys::ggml_backend_dev_memory(d, &mut free, &mut total);
                DeviceInfo {
                    name: CStr::from_ptr(sys::ggml_backend_dev_name(d)).to_string_lossy().into_owned(),
                    description: CStr::from_ptr(sys::ggml_backend_dev_description(d)).to_string_lossy().into_owned(),
                    kind: match sys::ggml_backend_dev_type(d) {
                        sys::GGML_BACKEND_DEVICE_TYPE_CPU => "cpu",
                        sys::GGML_BACKEND_DEVICE_TYPE_GPU => "gpu",
                        sys::GGML_BACKEND_DEVICE_TYPE_IGPU => "igpu",
                        sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => "accel",
                        _ => "meta",
                    },
                    free,
                    total,
                }
            })
            .collect()
    }
}

/// Load a backend module (e.g. `libggml-cuda.so`) and register its devices. Returns the
/// backend's name. The module must be built from the same ggml sources as this binary, and the
/// binary must link ggml as shared libraries (the `dyn-backends` feature) so both use one
/// `libggml-base`.
pub fn load_backend(path: &std::path::Path) -> Result<String, GgmlError> {
    init();
    let bad = |msg: String| GgmlError::Backend { path: path.display().to_string(), msg };
    if !path.is_file() {
        return Err(bad("no such file".into()));
    }
    check_abi_stamp(path).map_err(bad)?;
    if !cfg!(feature = "dyn-backends") {
        return Err(bad(
            "this binary links ggml statically; backend modules need a build with `--features dyn-backends`".into(),
        ));
    }
    // A module loaded twice would register its devices twice.
    static LOADED: std::sync::Mutex<Vec<(std::path::PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, name)) = loaded.iter().find(|(p, _)| *p == key) {
        return Ok(name.clone());
    }
    let c = std::ffi::CString::new(path.as_os_str().to_string_lossy().as_bytes()).map_err(|e| bad(e.to_string()))?;
    // SAFETY: a NUL-terminated path; ggml dlopens it and checks the module's API version,
    // returning null (and logging why) when it does not fit.
    let reg = unsafe { sys::ggml_backend_load(c.as_ptr()) };
    if reg.is_null() {
        return Err(bad(format!(
            "ggml refused the module (not a ggml backend, or built for another ggml version than {}; see the log)",
            version()
        )));
    }
    // SAFETY: a registered backend; its name is static.
    let name = unsafe { CStr::from_ptr(sys::ggml_backend_reg_name(reg)) }.to_string_lossy().into_owned();
    loaded.push((key, name.clone()));
    Ok(name)
}

/// Fingerprint of the ggml headers this binary was built with (see build.rs), or "unknown".
pub fn abi_fingerprint() -> &'static str {
    env!("STLLM_GGML_ABI")
}

/// File beside backend modules naming the ggml sources they were built from.
pub const ABI_STAMP: &str = "ggml-abi.txt";

/// A module must come with a stamp (`ggml-abi.txt` in its folder, written by
/// scripts/gpu/ggml_abi.py when the module is built) equal to this binary's fingerprint: ggml only
/// checks its backend API version, and a module built from other sources can crash instead of
/// failing.
fn check_abi_stamp(module: &std::path::Path) -> Result<(), String> {
    let ours = abi_fingerprint();
    if ours == "unknown" {
        tracing::warn!(module = %module.display(), "this build does not know its ggml fingerprint; module not checked");
        return Ok(());
    }
    let stamp = module.with_file_name(ABI_STAMP);
    let theirs = std::fs::read_to_string(&stamp).map_err(|_| {
        format!(
            "no {ABI_STAMP} beside it, so which ggml sources built it is unknown; build modules with \
             scripts/install-cuda.sh (it writes the stamp), or, if it was built from the ggml sources of this binary \
             (ggml {}), write {ours} into {}",
            version(),
            stamp.display()
        )
    })?;
    let theirs = theirs.trim();
    if theirs != ours {
        return Err(format!(
            "built from other ggml sources (ABI fingerprint {theirs}, this binary's {ours}, ggml {}): rebuild the \
             module from this binary's sources (scripts/install-cuda.sh --module-only)",
            version()
        ));
    }
    Ok(())
}

/// The backend module files in `dir`: `libggml-*.so` except the base library and the CPU
/// backend (built in), sorted by name.
fn backend_modules_in(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, GgmlError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| GgmlError::Backend { path: dir.display().to_string(), msg: e.to_string() })?;
    let mut paths: Vec<_> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let file = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            file.starts_with("libggml-")
                && file.ends_with(".so")
                && !["libggml-base.so", "libggml-cpu.so"].contains(&file.as_str())
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// Load every `libggml-*.so` backend module in `dir` (except the CPU, which is built in).
pub fn load_backends_from(dir: &std::path::Path) -> Result<Vec<String>, GgmlError> {
    backend_modules_in(dir)?.iter().map(|p| load_backend(p)).collect()
}

/// Like [`load_backends_from`], but a module that cannot be loaded does not stop the others:
/// returns the backends loaded and the errors of those that failed. A folder that cannot be read
/// has no modules. For picking a device when the user asked for none.
pub fn try_load_backends_from(dir: &std::path::Path) -> (Vec<String>, Vec<GgmlError>) {
    let (mut names, mut errors) = (Vec::new(), Vec::new());
    for p in backend_modules_in(dir).unwrap_or_default() {
        match load_backend(&p) {
            Ok(n) => names.push(n),
            Err(e) => errors.push(e),
        }
    }
    (names, errors)
}

static LOG_INIT: Once = Once::new();

unsafe extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated string valid for the duration of the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let msg = msg.trim_end();
    if msg.is_empty() {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "ggml", "{msg}"),
        sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "ggml", "{msg}"),
        sys::GGML_LOG_LEVEL_INFO => tracing::debug!(target: "ggml", "{msg}"),
        _ => tracing::trace!(target: "ggml", "{msg}"),
    }
}

/// Route ggml's log output into `tracing` (idempotent) and initialise the CPU backend's tables.
pub fn init() {
    LOG_INIT.call_once(|| {
        // SAFETY: the callback is a plain function valid for the whole program; no user data.
        unsafe {
            sys::ggml_log_set(Some(log_callback), std::ptr::null_mut());
            sys::ggml_cpu_init();
        }
    });
}

/// A `no_alloc` ggml context: holds tensor metadata and graphs, never tensor data.
pub struct Context {
    ptr: NonNull<sys::ggml_context>,
}

// SAFETY: a ggml context is plain memory with no thread affinity: moving its ownership to another
// thread is fine. It is not `Sync`: tensors and graphs are created in it through `&self`, so two
// threads sharing one could race; what outlives its building is kept as [`Headers`].
unsafe impl Send for Context {}

/// A context kept only to own its tensors' headers (model weights, KV cache and recurrent state,
/// LoRA adapters) once nothing more is built in it: it has no method that reaches the context,
/// so sharing it between threads cannot race, unlike a [`Context`].
pub struct Headers(#[allow(dead_code)] Context);

// SAFETY: `Headers` gives no access to its context (only its drop, which needs ownership).
unsafe impl Sync for Headers {}

impl Context {
    /// Keep this context only to own its tensors' headers (see [`Headers`]).
    pub fn into_headers(self) -> Headers {
        Headers(self)
    }
}

impl Context {
    fn size_for(n_tensors: usize, graph_size: usize) -> usize {
        // SAFETY: pure size computations.
        let mut bytes = n_tensors * unsafe { sys::ggml_tensor_overhead() };
        if graph_size > 0 {
            bytes += unsafe { sys::ggml_graph_overhead_custom(graph_size, false) };
        }
        bytes.max(1024)
    }

    /// A context with room for `n_tensors` tensor headers and one graph of `graph_size` nodes
    /// (0 for none).
    pub fn new(n_tensors: usize, graph_size: usize) -> Result<Self, GgmlError> {
        let bytes = Context::size_for(n_tensors, graph_size);
        let params = sys::ggml_init_params { mem_size: bytes, mem_buffer: std::ptr::null_mut(), no_alloc: true };
        // SAFETY: ggml_init allocates its own memory buffer; null on failure.
        let ptr = unsafe { sys::ggml_init(params) };
        NonNull::new(ptr).map(|ptr| Context { ptr }).ok_or(GgmlError::Alloc { what: "context".into(), bytes })
    }

    pub(crate) fn raw(&self) -> *mut sys::ggml_context {
        self.ptr.as_ptr()
    }

    /// A new tensor of the given ggml shape (`ne[0]` first), named.
    pub fn new_tensor(&self, dtype: DType, shape: &[i64], name: &str) -> Tensor {
        assert!(!shape.is_empty() && shape.len() <= 4, "tensor rank must be 1..=4");
        // SAFETY: the context is valid; ggml copies the shape. Aborts if the context is full,
        // which only a sizing bug of ours can cause.
        let t = unsafe { sys::ggml_new_tensor(self.raw(), dtype.raw(), shape.len() as i32, shape.as_ptr()) };
        let t = Tensor::from_raw(t);
        t.set_name(name);
        t
    }

    /// [`Context::new_tensor`] for contexts whose tensor count depends on the input (a model's
    /// weights): refuses, instead of ggml aborting, when no header fits any more.
    pub fn try_new_tensor(&self, dtype: DType, shape: &[i64], name: &str) -> Result<Tensor, GgmlError> {
        // SAFETY: reads the sizes of a live context.
        let (need, size, used) = unsafe {
            (sys::ggml_tensor_overhead(), sys::ggml_get_mem_size(self.raw()), sys::ggml_used_mem(self.raw()))
        };
        if used.saturating_add(need) > size {
            return Err(GgmlError::Alloc {
                what: format!("a tensor header for {name} (the context holds {} of them)", size / need.max(1)),
                bytes: need,
            });
        }
        Ok(self.new_tensor(dtype, shape, name))
    }

    /// Allocate one backend buffer holding every tensor of this context.
    pub fn alloc_tensors(&self, backend: &Backend) -> Result<Buffer, GgmlError> {
        // SAFETY: context and backend are valid; returns null on failure.
        let buft = unsafe { sys::ggml_backend_get_default_buffer_type(backend.raw()) };
        self.alloc_tensors_in(buft)
    }

    fn alloc_tensors_in(&self, buft: sys::ggml_backend_buffer_type_t) -> Result<Buffer, GgmlError> {
        // SAFETY: as above.
        let bytes = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft_size(self.raw(), buft) };
        let buf = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(self.raw(), buft) };
        NonNull::new(buf).map(|ptr| Buffer { ptr }).ok_or(GgmlError::Alloc { what: "backend buffer".into(), bytes })
    }

    /// A new graph with room for `size` nodes.
    pub fn new_graph(&self, size: usize) -> Graph {
        // SAFETY: the context was sized for a graph of this size by `Context::new`.
        let g = unsafe { sys::ggml_new_graph_custom(self.raw(), size, false) };
        Graph { ptr: NonNull::new(g).expect("ggml_new_graph_custom returned null") }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we own the context.
        unsafe { sys::ggml_free(self.raw()) }
    }
}

/// A handle to a tensor of a [`Context`]. See the module docs for the lifetime rule.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tensor {
    ptr: NonNull<sys::ggml_tensor>,
}

// SAFETY: the handle is a pointer into a context whose owner keeps it alive; reading metadata is
// thread-safe, and data is only touched through the backend API by the compute thread.
unsafe impl Send for Tensor {}
unsafe impl Sync for Tensor {}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?} {:?} {:?})", self.name(), self.dtype(), self.shape())
    }
}

impl Tensor {
    fn from_raw(ptr: *mut sys::ggml_tensor) -> Tensor {
        Tensor { ptr: NonNull::new(ptr).expect("ggml returned a null tensor") }
    }

    fn raw(self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }

    fn inner(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor is alive (module invariant); we only read plain fields.
        unsafe { self.ptr.as_ref() }
    }

    /// The tensor header's address: an identity for the tensor while its context lives.
    pub fn addr(&self) -> usize {
        self.raw() as usize
    }

    pub fn ne(&self) -> [i64; 4] {
        self.inner().ne
    }

    /// Whether the data is laid out without gaps (a reshape needs it).
    pub fn is_contiguous(&self) -> bool {
        // SAFETY: reads a live tensor header.
        unsafe { sys::ggml_is_contiguous(self.raw()) }
    }

    pub fn nb(&self) -> [usize; 4] {
        self.inner().nb
    }

    /// The shape with trailing 1s removed (ggml order).
    pub fn shape(&self) -> Vec<i64> {
        let ne = self.ne();
        let mut n = 4;
        while n > 1 && ne[n - 1] == 1 {
            n -= 1;
        }
        ne[..n].to_vec()
    }

    pub fn dtype(&self) -> Option<DType> {
        DType::from_raw(self.inner().type_)
    }

    pub fn nelements(&self) -> i64 {
        self.ne().iter().product()
    }

    pub fn nbytes(&self) -> usize {
        // SAFETY: the tensor is alive.
        unsafe { sys::ggml_nbytes(self.raw()) }
    }

    pub fn name(&self) -> String {
        // SAFETY: `name` is a NUL-terminated fixed array inside the tensor.
        unsafe { CStr::from_ptr(self.inner().name.as_ptr()) }.to_string_lossy().into_owned()
    }

    pub fn set_name(self, name: &str) -> Tensor {
        let c = CString::new(name.replace('\0', "")).expect("no NUL left");
        // SAFETY: ggml copies (and truncates) the name.
        unsafe { sys::ggml_set_name(self.raw(), c.as_ptr()) };
        self
    }

    /// Mark as a graph input (allocated before anything else, never overwritten).
    pub fn set_input(self) -> Tensor {
        // SAFETY: sets a flag.
        unsafe { sys::ggml_set_input(self.raw()) };
        self
    }

    /// Mark as a graph output (kept until the graph is done).
    pub fn set_output(self) -> Tensor {
        // SAFETY: sets a flag.
        unsafe { sys::ggml_set_output(self.raw()) };
        self
    }

    /// Whether the tensor has backend memory (a graph input the graph never reads has none).
    pub fn has_memory(&self) -> bool {
        !self.inner().buffer.is_null() || !self.inner().data.is_null()
    }

    /// Whether the tensor lives in a device's memory (a GPU buffer), not host memory; false
    /// for a tensor without memory yet.
    pub fn on_device(&self) -> bool {
        let buf = self.inner().buffer;
        // SAFETY: a non-null buffer of a live tensor is a live ggml buffer.
        !buf.is_null() && !unsafe { sys::ggml_backend_buffer_is_host(buf) }
    }

    fn check_bytes(&self, bytes: usize, offset: usize) -> Result<(), GgmlError> {
        let total = self.nbytes();
        if !self.has_memory() {
            return Err(GgmlError::Tensor { name: self.name(), msg: "tensor has no memory".into() });
        }
        if offset.checked_add(bytes).is_none_or(|end| end > total) {
            return Err(GgmlError::Tensor {
                name: self.name(),
                msg: format!("write of {bytes} bytes at {offset} exceeds its {total} bytes"),
            });
        }
        Ok(())
    }

    /// Copy raw bytes into the tensor's backend memory at a byte offset.
    pub fn write_bytes(&self, data: &[u8], offset: usize) -> Result<(), GgmlError> {
        self.check_bytes(data.len(), offset)?;
        // SAFETY: bounds checked above; the tensor has backend memory.
        unsafe { sys::ggml_backend_tensor_set(self.raw(), data.as_ptr().cast(), offset, data.len()) };
        Ok(())
    }

    pub fn write_i32(&self, data: &[i32]) -> Result<(), GgmlError> {
        self.expect_dtype(DType::I32)?;
        self.write_bytes(as_bytes(data), 0)
    }

    pub fn write_i64(&self, data: &[i64]) -> Result<(), GgmlError> {
        self.expect_dtype(DType::I64)?;
        self.write_bytes(as_bytes(data), 0)
    }

    pub fn write_f32(&self, data: &[f32]) -> Result<(), GgmlError> {
        self.expect_dtype(DType::F32)?;
        self.write_bytes(as_bytes(data), 0)
    }

    pub fn write_f16(&self, data: &[half::f16]) -> Result<(), GgmlError> {
        self.expect_dtype(DType::F16)?;
        self.write_bytes(as_bytes(data), 0)
    }

    fn expect_dtype(&self, d: DType) -> Result<(), GgmlError> {
        if self.dtype() != Some(d) {
            return Err(GgmlError::Tensor {
                name: self.name(),
                msg: format!("expected {d:?}, found {:?}", self.dtype()),
            });
        }
        Ok(())
    }

    /// Read `len` raw bytes at byte `offset` of the tensor's memory.
    pub fn read_bytes(&self, offset: usize, len: usize) -> Result<Vec<u8>, GgmlError> {
        self.check_bytes(len, offset)?;
        let mut out = vec![0u8; len];
        // SAFETY: bounds checked; `out` has exactly `len` bytes.
        unsafe { sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr().cast(), offset, len) };
        Ok(out)
    }

    /// Read an F32 tensor (contiguous) back from its backend.
    pub fn read_f32(&self) -> Result<Vec<f32>, GgmlError> {
        self.expect_dtype(DType::F32)?;
        let n = self.nelements() as usize;
        let mut out = vec![0f32; n];
        self.check_bytes(n * 4, 0)?;
        // SAFETY: `out` has exactly nbytes of room (contiguous F32).
        unsafe { sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr().cast(), 0, n * 4) };
        Ok(out)
    }

    /// Read `n` elements of an F32 tensor (contiguous) from element `start` on.
    pub fn read_f32_at(&self, start: usize, n: usize) -> Result<Vec<f32>, GgmlError> {
        self.expect_dtype(DType::F32)?;
        let mut out = vec![0f32; n];
        self.check_bytes(n * 4, start * 4)?;
        // SAFETY: bounds checked; `out` has exactly `n * 4` bytes of room.
        unsafe { sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr().cast(), start * 4, n * 4) };
        Ok(out)
    }

    /// Read an I32 tensor (contiguous) back from its backend.
    pub fn read_i32(&self) -> Result<Vec<i32>, GgmlError> {
        self.expect_dtype(DType::I32)?;
        let n = self.nelements() as usize;
        let mut out = vec![0i32; n];
        self.check_bytes(n * 4, 0)?;
        // SAFETY: `out` has exactly nbytes of room (contiguous I32).
        unsafe { sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr().cast(), 0, n * 4) };
        Ok(out)
    }

    /// Copy another tensor's data (same shape and type) into this one, across backends if needed.
    pub fn copy_from(&self, src: Tensor) -> Result<(), GgmlError> {
        if src.ne() != self.ne() || src.dtype() != self.dtype() || !src.has_memory() || !self.has_memory() {
            return Err(GgmlError::Tensor { name: self.name(), msg: format!("cannot copy from {src:?}") });
        }
        // SAFETY: both tensors are allocated with identical layouts.
        unsafe { sys::ggml_backend_tensor_copy(src.raw(), self.raw()) };
        Ok(())
    }

    /// Fill the whole tensor's memory with zero bytes.
    pub fn zero(&self) -> Result<(), GgmlError> {
        let n = self.nbytes();
        self.check_bytes(n, 0)?;
        // SAFETY: the tensor has backend memory of nbytes.
        unsafe { sys::ggml_backend_tensor_memset(self.raw(), 0, 0, n) };
        Ok(())
    }
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data numeric slices reinterpreted as bytes (no padding in these types).
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

/// A backend buffer holding tensor data (weights, KV cache).
pub struct Buffer {
    ptr: NonNull<sys::ggml_backend_buffer>,
}

// SAFETY: backend buffers are usable from any thread; we serialize access through owners.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    pub fn size(&self) -> usize {
        // SAFETY: the buffer is alive.
        unsafe { sys::ggml_backend_buffer_get_size(self.ptr.as_ptr()) }
    }

    /// Tell the scheduler this buffer holds weights (so ops run where the weights are).
    pub fn mark_weights(&self) {
        // SAFETY: sets a usage flag.
        unsafe { sys::ggml_backend_buffer_set_usage(self.ptr.as_ptr(), sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS) }
    }

    pub fn clear(&self) {
        // SAFETY: fills the buffer with zero bytes.
        unsafe { sys::ggml_backend_buffer_clear(self.ptr.as_ptr(), 0) }
    }
}

impl Buffer {
    /// One buffer on `backend` holding `tensors` (headers of any no-alloc context), each at its
    /// aligned offset; fails with [`GgmlError::OutOfMemory`] before allocating when it cannot fit.
    /// This is how one context's tensors are spread over several devices.
    pub fn alloc_tensors_on(backend: &Backend, tensors: &[Tensor], what: &str) -> Result<Buffer, GgmlError> {
        // SAFETY: a live backend; size queries are pure; the buffer is checked for null; each
        // tensor is a live header without data, placed inside the buffer by the tallocr.
        unsafe {
            let buft = sys::ggml_backend_get_default_buffer_type(backend.raw());
            let align = sys::ggml_backend_buft_get_alignment(buft).max(1);
            let size: usize = tensors
                .iter()
                .map(|t| sys::ggml_backend_buft_get_alloc_size(buft, t.raw()).next_multiple_of(align))
                .sum();
            backend.check_fits(what, size)?;
            let buf = sys::ggml_backend_buft_alloc_buffer(buft, size.max(align));
            let ptr = NonNull::new(buf).ok_or(GgmlError::Alloc { what: what.to_string(), bytes: size })?;
            let buffer = Buffer { ptr };
            let mut talloc = sys::ggml_tallocr_new(buf);
            for t in tensors {
                if sys::ggml_tallocr_alloc(&mut talloc, t.raw()) != sys::GGML_STATUS_SUCCESS {
                    return Err(GgmlError::Alloc { what: format!("{what}: {}", t.name()), bytes: t.nbytes() });
                }
            }
            Ok(buffer)
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: we own the buffer.
        unsafe { sys::ggml_backend_buffer_free(self.ptr.as_ptr()) }
    }
}

/// A computation graph built in a [`Context`].
pub struct Graph {
    ptr: NonNull<sys::ggml_cgraph>,
}

// SAFETY: a graph is plain memory inside its context (which is Send); it is built and computed by
// one thread at a time (`&mut self` to change it).
unsafe impl Send for Graph {}

impl Graph {
    pub fn expand(&mut self, t: Tensor) {
        // SAFETY: graph and tensor belong to live contexts.
        unsafe { sys::ggml_build_forward_expand(self.ptr.as_ptr(), t.raw()) }
    }

    pub fn n_nodes(&self) -> i32 {
        // SAFETY: the graph is alive.
        unsafe { sys::ggml_graph_n_nodes(self.ptr.as_ptr()) }
    }
}

/// A ggml backend: the CPU (with a persistent threadpool) or a device.
pub struct Backend {
    ptr: NonNull<sys::ggml_backend>,
    threadpool: Option<NonNull<sys::ggml_threadpool>>,
    n_threads: usize,
}

// SAFETY: a backend is used by one thread at a time (the engine's compute thread).
unsafe impl Send for Backend {}
unsafe impl Sync for Backend {}

impl Backend {
    /// The CPU backend running on `n_threads` threads of a persistent threadpool.
    pub fn cpu(n_threads: usize) -> Result<Backend, GgmlError> {
        init();
        let n_threads = n_threads.max(1);
        // SAFETY: plain constructors; null on failure.
        let be = unsafe { sys::ggml_backend_cpu_init() };
        let ptr = NonNull::new(be).ok_or(GgmlError::Alloc { what: "cpu backend".into(), bytes: 0 })?;
        let mut params = unsafe { sys::ggml_threadpool_params_default(n_threads as i32) };
        let tp = unsafe { sys::ggml_threadpool_new(&mut params) };
        let threadpool = NonNull::new(tp);
        // SAFETY: backend is a CPU backend; the threadpool outlives it (freed after it in Drop).
        unsafe {
            sys::ggml_backend_cpu_set_n_threads(ptr.as_ptr(), n_threads as i32);
            if let Some(tp) = threadpool {
                sys::ggml_backend_cpu_set_threadpool(ptr.as_ptr(), tp.as_ptr());
            }
        }
        Ok(Backend { ptr, threadpool, n_threads })
    }

    /// A backend on a registered device by ggml name ("CUDA0") or as `cuda[:N]` / `gpu[:N]`
    /// (the N-th device of that kind).
    pub fn device(spec: &str) -> Result<Backend, GgmlError> {
        init();
        let all = devices();
        let (kind, idx) = match spec.split_once(':') {
            Some((k, n)) => (k.to_ascii_lowercase(), n.parse::<usize>().ok()),
            None => (spec.to_ascii_lowercase(), None),
        };
        let by_prefix = |d: &&DeviceInfo| match kind.as_str() {
            "gpu" => d.kind == "gpu",
            k => d.name.to_ascii_lowercase().starts_with(k),
        };
        let found = all
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(spec))
            .or_else(|| all.iter().filter(by_prefix).nth(idx.unwrap_or(0)));
        let Some(dev) = found else {
            let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
            return Err(GgmlError::NoDevice(spec.to_string(), names.join(", ")));
        };
        let c = std::ffi::CString::new(dev.name.clone()).expect("device names have no NUL");
        // SAFETY: the device exists (found above); init returns null on failure.
        let be = unsafe { sys::ggml_backend_dev_init(sys::ggml_backend_dev_by_name(c.as_ptr()), std::ptr::null()) };
        let ptr = NonNull::new(be)
            .ok_or_else(|| GgmlError::Backend { path: dev.name.clone(), msg: "the device failed to start".into() })?;
        Ok(Backend { ptr, threadpool: None, n_threads: 0 })
    }

    /// Free and total bytes of the backend's device (the CPU reports system memory).
    pub fn memory(&self) -> (usize, usize) {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: a live backend; its device outlives it.
        unsafe {
            let dev = sys::ggml_backend_get_device(self.raw());
            if !dev.is_null() {
                sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
            }
        }
        (free, total)
    }

    /// Fail with [`GgmlError::OutOfMemory`] when `need` bytes exceed the device's free memory.
    pub fn check_fits(&self, what: &str, need: usize) -> Result<(), GgmlError> {
        let (free, total) = self.memory();
        if total > 0 && need > free {
            return Err(GgmlError::OutOfMemory { what: what.to_string(), need, free, device: self.name() });
        }
        Ok(())
    }

    /// Whether this is the CPU backend.
    pub fn is_cpu(&self) -> bool {
        self.threadpool.is_some() || self.name().eq_ignore_ascii_case("cpu")
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    pub(crate) fn raw(&self) -> *mut sys::ggml_backend {
        self.ptr.as_ptr()
    }

    pub fn name(&self) -> String {
        // SAFETY: returns a static string owned by the backend.
        unsafe { CStr::from_ptr(sys::ggml_backend_name(self.raw())) }.to_string_lossy().into_owned()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: we own both; the backend goes first as it uses the threadpool.
        unsafe {
            sys::ggml_backend_free(self.raw());
            if let Some(tp) = self.threadpool {
                sys::ggml_threadpool_free(tp.as_ptr());
            }
        }
    }
}

/// Number of CPU cores available to this process.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A `ggml_backend_sched`: allocates graph activations and runs graphs over the given backends
/// (the last one must be the CPU).
pub struct Sched {
    ptr: NonNull<sys::ggml_backend_sched>,
}

// SAFETY: used by one thread at a time (the engine's compute thread, or behind a Mutex).
unsafe impl Send for Sched {}

impl Sched {
    pub fn new(backends: &[&Backend], graph_size: usize) -> Result<Sched, GgmlError> {
        let mut raw: Vec<*mut sys::ggml_backend> = backends.iter().map(|b| b.raw()).collect();
        // The CPU's compute buffer holds the graph inputs (ggml puts user inputs on the last
        // backend) and copies between backends: with a device present it is the device's pinned
        // host memory, as llama.cpp does, or every step's inputs (a step's attention mask is
        // megabytes) cross to the device from pageable memory, many times slower.
        let device = backends.iter().find(|b| !b.is_cpu());
        // SAFETY: live backends; the buffer types are static objects of their backends.
        let mut bufts: Vec<sys::ggml_backend_buffer_type_t> = backends
            .iter()
            .map(|b| unsafe {
                let default = sys::ggml_backend_get_default_buffer_type(b.raw());
                match device {
                    Some(d) if b.is_cpu() => {
                        let host = sys::ggml_backend_dev_host_buffer_type(sys::ggml_backend_get_device(d.raw()));
                        if host.is_null() {
                            default
                        } else {
                            host
                        }
                    }
                    _ => default,
                }
            })
            .collect();
        // SAFETY: the backends outlive the scheduler (the owner keeps both; see Model); `bufts`
        // has one entry per backend.
        let p = unsafe {
            sys::ggml_backend_sched_new(raw.as_mut_ptr(), bufts.as_mut_ptr(), raw.len() as i32, graph_size, false, true)
        };
        NonNull::new(p).map(|ptr| Sched { ptr }).ok_or(GgmlError::Alloc { what: "scheduler".into(), bytes: 0 })
    }

    /// Allocate the graph's tensors (inputs included) in the compute buffers.
    pub fn alloc(&mut self, g: &Graph) -> Result<(), GgmlError> {
        // SAFETY: graph and scheduler are alive.
        let ok = unsafe { sys::ggml_backend_sched_alloc_graph(self.ptr.as_ptr(), g.ptr.as_ptr()) };
        if ok {
            Ok(())
        } else {
            Err(GgmlError::Alloc { what: "compute graph".into(), bytes: 0 })
        }
    }

    pub fn compute(&mut self, g: &Graph) -> Result<(), GgmlError> {
        // SAFETY: graph allocated by `alloc` on this scheduler.
        let st = unsafe { sys::ggml_backend_sched_graph_compute(self.ptr.as_ptr(), g.ptr.as_ptr()) };
        if st == sys::GGML_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(GgmlError::Compute(st))
        }
    }

    /// [`Sched::compute`] one node at a time, timing each (a profile: every node waits for the
    /// device, so the nodes' times add up to more than a normal run's by one synchronisation
    /// each). Nodes computed together with a view or reshape report them at zero cost.
    pub fn compute_profiled(&mut self, g: &Graph) -> Result<Vec<NodeTime>, GgmlError> {
        struct Prof {
            last: std::time::Instant,
            out: Vec<NodeTime>,
        }
        extern "C" fn on_node(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
            if ask {
                return true;
            }
            // SAFETY: `user` is the `Prof` below, alive and not otherwise borrowed during the
            // compute call that invokes this callback on this thread; `t` is a live node.
            let (p, t) = unsafe { (&mut *(user as *mut Prof), Tensor::from_raw(t)) };
            let now = std::time::Instant::now();
            let src0 = t.src(0).map(|s| s.ne());
            p.out.push(NodeTime { op: t.op_name(), src0, elapsed: now - p.last });
            p.last = now;
            true
        }
        let mut prof = Prof { last: std::time::Instant::now(), out: Vec::with_capacity(g.n_nodes().max(0) as usize) };
        // SAFETY: the callback and its data stay valid for the compute call; it is removed again
        // before `prof` goes out of scope.
        let st = unsafe {
            sys::ggml_backend_sched_set_eval_callback(
                self.ptr.as_ptr(),
                Some(on_node),
                (&mut prof as *mut Prof).cast::<c_void>(),
            );
            let st = sys::ggml_backend_sched_graph_compute(self.ptr.as_ptr(), g.ptr.as_ptr());
            sys::ggml_backend_sched_set_eval_callback(self.ptr.as_ptr(), None, std::ptr::null_mut());
            st
        };
        if st == sys::GGML_STATUS_SUCCESS {
            Ok(prof.out)
        } else {
            Err(GgmlError::Compute(st))
        }
    }

    /// Forget the previous graph's allocation (call before building the next graph).
    pub fn reset(&mut self) {
        // SAFETY: the scheduler is alive.
        unsafe { sys::ggml_backend_sched_reset(self.ptr.as_ptr()) }
    }

    /// Pieces the last graph was split into across backends (1: it ran on one backend).
    pub fn n_splits(&self) -> usize {
        // SAFETY: the scheduler is alive.
        unsafe { sys::ggml_backend_sched_get_n_splits(self.ptr.as_ptr()) as usize }
    }

    /// Bytes of compute buffer currently reserved on a backend.
    pub fn buffer_size(&self, backend: &Backend) -> usize {
        // SAFETY: both alive.
        unsafe { sys::ggml_backend_sched_get_buffer_size(self.ptr.as_ptr(), backend.raw()) }
    }
}

/// One node's time in [`Sched::compute_profiled`].
#[derive(Debug, Clone)]
pub struct NodeTime {
    /// ggml's op name ("MUL_MAT", "FLASH_ATTN_EXT", ...)
    pub op: String,
    /// The first operand's shape
    pub src0: Option<[i64; 4]>,
    pub elapsed: std::time::Duration,
}

impl Drop for Sched {
    fn drop(&mut self) {
        // SAFETY: we own the scheduler.
        unsafe { sys::ggml_backend_sched_free(self.ptr.as_ptr()) }
    }
}

/// Convert `src` (rows of `n_per_row` values) into `dtype`'s storage bytes with ggml's reference
/// conversion (`ggml_quantize_chunk`: plain copy for F32, rounding for F16/BF16, block
/// quantization for Q8_0/Q4_0), as a tensor of that type holds them.
pub fn convert_from_f32(dtype: DType, src: &[f32], n_per_row: usize) -> Result<Vec<u8>, GgmlError> {
    let bad = |msg: String| GgmlError::Tensor { name: format!("{} conversion", dtype.name()), msg };
    if matches!(dtype, DType::I32 | DType::I64) {
        return Err(bad("not a floating-point type".into()));
    }
    if n_per_row == 0 || !n_per_row.is_multiple_of(dtype.block_size()) || !src.len().is_multiple_of(n_per_row) {
        return Err(bad(format!(
            "{} values in rows of {n_per_row} do not fit blocks of {}",
            src.len(),
            dtype.block_size()
        )));
    }
    // SAFETY: a pure query of the type.
    if unsafe { sys::ggml_quantize_requires_imatrix(dtype.raw()) } {
        return Err(bad("needs an importance matrix".into()));
    }
    let nrows = src.len() / n_per_row;
    let mut out = vec![0u8; dtype.row_size(n_per_row as i64) * nrows];
    // SAFETY: `src` holds `nrows * n_per_row` floats and `out` exactly the bytes of that many
    // rows of `dtype`; the row length is a multiple of the block size (checked above), so ggml's
    // asserts hold.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            dtype.raw(),
            src.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            nrows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    debug_assert_eq!(written, out.len());
    Ok(out)
}

/// The values held by `bytes` of `dtype` storage (the inverse of [`convert_from_f32`], via
/// ggml's `to_float` of the type: dequantization for Q8_0/Q4_0).
pub fn convert_to_f32(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>, GgmlError> {
    let bad = |msg: String| GgmlError::Tensor { name: format!("{} conversion", dtype.name()), msg };
    let (blck, block_bytes) = (dtype.block_size(), dtype.row_size(dtype.block_size() as i64));
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(bad(format!("{} bytes are not whole blocks of {block_bytes}", bytes.len())));
    }
    let n = bytes.len() / block_bytes * blck;
    match dtype {
        DType::F32 => {
            return Ok(bytes.chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect());
        }
        DType::I32 | DType::I64 => return Err(bad("not a floating-point type".into())),
        _ => {}
    }
    // SAFETY: ggml's static table of type traits; the pointer is valid for the program.
    let to_float = unsafe { (*sys::ggml_get_type_traits(dtype.raw())).to_float }
        .ok_or_else(|| bad("ggml has no to_float for this type".into()))?;
    let mut out = vec![0f32; n];
    // SAFETY: `bytes` holds exactly `n / blck` whole blocks and `out` has room for `n` floats.
    unsafe { to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
    Ok(out)
}

impl Graph {
    /// The `i`-th node (op result) of the graph, in execution order; `None` past the end.
    pub fn node(&self, i: usize) -> Option<Tensor> {
        if i >= self.n_nodes().max(0) as usize {
            return None;
        }
        // SAFETY: the index is below the node count of a live graph.
        Some(Tensor::from_raw(unsafe { sys::ggml_graph_node(self.ptr.as_ptr(), i as i32) }))
    }
}

impl Tensor {
    /// The `i`-th operand of the op that computes this tensor.
    pub fn src(&self, i: usize) -> Option<Tensor> {
        // `src` is a fixed array of (possibly null) pointers.
        let p = *self.inner().src.get(i)?;
        (!p.is_null()).then(|| Tensor::from_raw(p))
    }

    /// ggml's name of the op that computes this tensor ("MUL_MAT", "NONE" for a leaf, ...).
    pub fn op_name(&self) -> String {
        // SAFETY: returns a static NUL-terminated string for a live tensor.
        unsafe { CStr::from_ptr(sys::ggml_op_desc(self.raw())) }.to_string_lossy().into_owned()
    }
}

impl Backend {
    /// Whether this backend can compute the op of `t` with its operands' types and layouts.
    pub fn supports_op(&self, t: Tensor) -> bool {
        // SAFETY: a live backend and a live tensor; a pure query.
        unsafe { sys::ggml_backend_supports_op(self.raw(), t.raw()) }
    }

    /// Run a whole graph on this backend alone (no scheduler). Every tensor of the graph must
    /// already have memory this backend can use (e.g. from [`Context::alloc_tensors`] on it),
    /// and every node must pass [`Backend::supports_op`]; ggml aborts otherwise.
    pub fn compute(&self, g: &mut Graph) -> Result<(), GgmlError> {
        for i in 0..g.n_nodes().max(0) as usize {
            let t = g.node(i).expect("index below the node count");
            let srcs = t.inner().src.iter().filter(|s| !s.is_null()).map(|&s| Tensor::from_raw(s));
            for u in std::iter::once(t).chain(srcs) {
                if !self.can_use_memory_of(u) {
                    return Err(GgmlError::Tensor {
                        name: u.name(),
                        msg: format!("has no memory {} can use", self.name()),
                    });
                }
            }
            if !self.supports_op(t) {
                return Err(GgmlError::Tensor {
                    name: t.name(),
                    msg: format!("{} does not support {}", self.name(), t.op_name()),
                });
            }
        }
        // SAFETY: every node and operand has memory this backend can use, and every node is
        // supported by it (checked above).
        let st = unsafe { sys::ggml_backend_graph_compute(self.raw(), g.ptr.as_ptr()) };
        if st == sys::GGML_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(GgmlError::Compute(st))
        }
    }

    /// Whether `t` has memory in a buffer whose type this backend can compute on.
    fn can_use_memory_of(&self, t: Tensor) -> bool {
        let buf = t.inner().buffer;
        if buf.is_null() {
            return false;
        }
        // SAFETY: a live backend and the live buffer of a live tensor; pure queries.
        unsafe { sys::ggml_backend_supports_buft(self.raw(), sys::ggml_backend_buffer_get_type(buf)) }
    }
}
