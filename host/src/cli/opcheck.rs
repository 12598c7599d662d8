//! `stllm op-check`: the op table. Every ggml op the models use, with every operand type they
//! use it with, is run on a backend and compared with a naive Rust reference computed in `f64`
//! (and, when the backend is a device, also with ggml's CPU backend).
//!
//! Each case builds a tiny graph in its own context, allocates every tensor of it in one buffer
//! of the backend under test and runs it there alone (no scheduler, so nothing silently falls
//! back to the CPU; an op the backend does not support is reported as `unsupported`). Inputs are
//! deterministic pseudo-random numbers. Non-F32 inputs are converted on the host with ggml's
//! reference conversion (`ggml::convert_from_f32`), and the reference sees exactly the values
//! that storage holds (`ggml::convert_to_f32`: rounded for F16/BF16, dequantized for
//! Q8_0/Q4_0), so a case measures the op's own error, not the input's rounding.
//!
//! Errors are normalised by the largest |reference| of the case: `max_rel = max|got - ref| /
//! max|ref|`. Tolerances (on `max_rel`), by what the kernels are allowed to do:
//! - copies (`get_rows`, `cpy`, `concat`, `cont`, `set_rows` into F16/BF16): 1e-6, i.e. exact;
//! - F32 element-wise ops (`add`, `mul`, `scale`): 1e-6; ops with `exp`/`sqrt` (`silu`,
//!   `swiglu`, `rms_norm`, `soft_max_ext`): 1e-5 (vectorised `expf` approximations);
//! - `rope_ext`: 1e-4 (ggml builds each angle in F32 as `pos * base^(-2i/d)`; positions < 256);
//! - `mul_mat`: F32 1e-4 (on a GPU 1e-3 with more than one column: ggml-cuda uses TF32 tensor
//!   cores for F32 GEMMs, 2.6e-4 measured on an H100); F16 2e-3 (the CPU rounds activations to F16); BF16 1e-2 (activations
//!   rounded to BF16, 8 significant bits); Q8_0 and Q4_0 2e-2 (activations quantized to Q8_0
//!   blocks: half a step is 1/254 of a block's largest value). Measured on the CPU: 1.3e-7,
//!   1.6e-4, 1.6e-3, 4.8e-3, 4.3e-3;
//! - `flash_attn_ext` (a peaked softmax, logits of std ~2, which amplifies the rounding of Q
//!   and K): F16 1e-2 (Q rounded to F16, V accumulated in F16 on the CPU); BF16, Q8_0 and Q4_0
//!   2e-2 (Q rounded to BF16 / quantized to Q8_0). Measured on the CPU: 3.4e-3, 3.5e-3, 7.5e-3,
//!   7.5e-3;
//! - `set_rows` into Q8_0 / Q4_0 (the reference is ggml's reference quantizer): one quantization
//!   step, 1/127 resp. 1/8 of a block's largest value (8e-3, 0.13), so a device quantizer that
//!   breaks a rounding tie the other way passes while a wrong scale or layout fails.
//!
//! The device-vs-CPU comparison uses the same tolerance. The command prints the table (or JSON
//! with `--json`) and fails when any case fails.

use anyhow::{bail, Result};

use crate::ggml::{self, Backend, Context, DType, RopeParams, Tensor, ROPE_NEOX};

use super::DeviceArgs;

/// What a case's input tensor is filled with.
enum Fill {
    /// Values converted to the tensor's type on the host.
    Floats(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    /// Left as allocated (a `cpy` destination the graph overwrites).
    Unset,
}

struct Input {
    dtype: DType,
    shape: Vec<i64>,
    fill: Fill,
}

impl Input {
    fn floats(dtype: DType, shape: &[i64], v: Vec<f32>) -> Input {
        Input { dtype, shape: shape.to_vec(), fill: Fill::Floats(v) }
    }

    /// Bytes to write into the tensor.
    fn bytes(&self) -> Result<Option<Vec<u8>>> {
        Ok(match &self.fill {
            Fill::Floats(v) => Some(ggml::convert_from_f32(self.dtype, v, self.shape[0] as usize)?),
            Fill::I32(v) => Some(v.iter().flat_map(|x| x.to_ne_bytes()).collect()),
            Fill::I64(v) => Some(v.iter().flat_map(|x| x.to_ne_bytes()).collect()),
            Fill::Unset => None,
        })
    }

    /// The values the tensor holds once written, as the reference sees them.
    fn values(&self) -> Result<Vec<f64>> {
        Ok(match &self.fill {
            Fill::Floats(_) => {
                let bytes = self.bytes()?.expect("floats have bytes");
                ggml::convert_to_f32(self.dtype, &bytes)?.into_iter().map(f64::from).collect()
            }
            Fill::I32(v) => v.iter().map(|&x| x as f64).collect(),
            Fill::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Fill::Unset => Vec::new(),
        })
    }
}

type Build = Box<dyn Fn(&Context, &[Tensor]) -> Tensor>;
type Reference = Box<dyn Fn(&[Vec<f64>]) -> Vec<f64>>;

/// One row of the table: an op with its operand types and shapes.
struct Case {
    op: &'static str,
    what: String,
    tol: f64,
    /// A looser tolerance on a GPU, where the kernel is allowed to be less exact (`None`: `tol`)
    device_tol: Option<f64>,
    inputs: Vec<Input>,
    build: Build,
    reference: Reference,
}

/// The result of one case on one backend.
enum Outcome {
    Ran(Vec<f64>),
    Unsupported(String),
}

/// Deterministic pseudo-random numbers (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * amp).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn numel(shape: &[i64]) -> usize {
    shape.iter().product::<i64>() as usize
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// `out = f(a, b)` with `b` broadcast (repeated) over `a`'s shape, as ggml's binary ops do.
fn broadcast(a: &[f64], a_shape: &[i64], b: &[f64], b_shape: &[i64], f: fn(f64, f64) -> f64) -> Vec<f64> {
    let ne = |s: &[i64], d: usize| s.get(d).copied().unwrap_or(1) as usize;
    let (a_ne, b_ne): (Vec<usize>, Vec<usize>) = (0..4).map(|d| (ne(a_shape, d), ne(b_shape, d))).unzip();
    let mut out = Vec::with_capacity(a.len());
    for i3 in 0..a_ne[3] {
        for i2 in 0..a_ne[2] {
            for i1 in 0..a_ne[1] {
                for i0 in 0..a_ne[0] {
                    let ai = ((i3 * a_ne[2] + i2) * a_ne[1] + i1) * a_ne[0] + i0;
                    let (j0, j1, j2, j3) = (i0 % b_ne[0], i1 % b_ne[1], i2 % b_ne[2], i3 % b_ne[3]);
                    out.push(f(a[ai], b[((j3 * b_ne[2] + j2) * b_ne[1] + j1) * b_ne[0] + j0]));
                }
            }
        }
    }
    out
}

/// Contiguous copy of `x` (shape `shape`) permuted like `ggml_permute(x, p)`: input dimension
/// `d` becomes output dimension `p[d]`.
fn permute(x: &[f64], shape: &[i64], p: [usize; 4]) -> Vec<f64> {
    let mut ne = [1usize; 4];
    for (d, &n) in shape.iter().enumerate() {
        ne[d] = n as usize;
    }
    let mut one = [0usize; 4];
    for d in 0..4 {
        one[p[d]] = ne[d];
    }
    let mut out = vec![0.0; x.len()];
    for i3 in 0..ne[3] {
        for i2 in 0..ne[2] {
            for i1 in 0..ne[1] {
                for i0 in 0..ne[0] {
                    let i = [i0, i1, i2, i3];
                    let mut j = [0usize; 4];
                    for d in 0..4 {
                        j[p[d]] = i[d];
                    }
                    let oi = ((j[3] * one[2] + j[2]) * one[1] + j[1]) * one[0] + j[0];
                    out[oi] = x[((i3 * ne[2] + i2) * ne[1] + i1) * ne[0] + i0];
                }
            }
        }
    }
    out
}

/// Rows of `x` ([n, rows]) through ggml's reference conversion to `dtype` and back.
fn round_trip(dtype: DType, x: &[f64], n: usize) -> Vec<f64> {
    let v: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let bytes = ggml::convert_from_f32(dtype, &v, n).expect("whole blocks");
    ggml::convert_to_f32(dtype, &bytes).expect("whole blocks").into_iter().map(f64::from).collect()
}

fn mul_mat_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (k, m) = (256i64, 96i64);
    for (wt, tol) in
        [(DType::F32, 1e-4), (DType::F16, 2e-3), (DType::BF16, 1e-2), (DType::Q8_0, 2e-2), (DType::Q4_0, 2e-2)]
    {
        for n in [1i64, 17] {
            cases.push(Case {
                op: "mul_mat",
                what: format!("w {} [{k}x{m}] · x f32 [{k}x{n}]", wt.name()),
                tol,
                // ggml-cuda runs F32 GEMMs of more than one column on TF32 tensor cores
                // (10-bit mantissa): ~5e-4 relative (measured 2.6e-4 on an H100).
                device_tol: (wt == DType::F32 && n > 1).then_some(1e-3),
                inputs: vec![
                    Input::floats(wt, &[k, m], rng.vec((k * m) as usize, 1.0)),
                    Input::floats(DType::F32, &[k, n], rng.vec((k * n) as usize, 1.0)),
                ],
                build: Box::new(|c, t| c.mul_mat(t[0], t[1])),
                reference: Box::new(move |v| {
                    let (k, m, n) = (k as usize, m as usize, n as usize);
                    let mut out = vec![0.0; m * n];
                    for t in 0..n {
                        for j in 0..m {
                            out[t * m + j] = (0..k).map(|i| v[0][j * k + i] * v[1][t * k + i]).sum();
                        }
                    }
                    out
                }),
            });
        }
    }
    // Attention without flash attention: KQ over an F16 cache, q heads sharing kv heads (GQA).
    let (hd, n_kv, h_kv, nt, h) = (64i64, 32i64, 2i64, 7i64, 4i64);
    cases.push(Case {
        op: "mul_mat",
        what: format!("k f16 [{hd}x{n_kv}x{h_kv}] · q f32 [{hd}x{nt}x{h}] (GQA broadcast)"),
        tol: 2e-3,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::F16, &[hd, n_kv, h_kv], rng.vec((hd * n_kv * h_kv) as usize, 1.0)),
            Input::floats(DType::F32, &[hd, nt, h], rng.vec((hd * nt * h) as usize, 1.0)),
        ],
        build: Box::new(|c, t| {
            let kq = c.mul_mat(t[0], t[1]);
            c.set_prec_f32(kq);
            kq
        }),
        reference: Box::new(move |v| {
            let (hd, n_kv, h_kv, nt, h) = (hd as usize, n_kv as usize, h_kv as usize, nt as usize, h as usize);
            let mut out = vec![0.0; n_kv * nt * h];
            for head in 0..h {
                let hk = head / (h / h_kv);
                for t in 0..nt {
                    for j in 0..n_kv {
                        out[(head * nt + t) * n_kv + j] =
                            (0..hd).map(|i| v[0][(hk * n_kv + j) * hd + i] * v[1][(head * nt + t) * hd + i]).sum();
                    }
                }
            }
            out
        }),
    });
}

/// The MoE block's ops: expert matmuls by id, top-k routing, weight renormalisation, sigmoid.
/// `mul_mat_id` in f64: experts `w` [k, m, n_exp], tokens `x` [k, 1, n_tok], `ids` [used, n_tok]
/// -> [m, used, n_tok].
/// `mul_mat_id` in f64: `x` [k, 1, n_tok] (one row per token, shared by its slots) or [k, used,
/// n_tok] (one row per slot).
fn mul_mat_id_f64(w: &[f64], x: &[f64], ids: &[i32], k: usize, m: usize, used: usize) -> Vec<f64> {
    let n_tok = ids.len() / used;
    let per_slot = used > 1 && x.len() == k * used * n_tok;
    let mut out = vec![0.0; m * used * n_tok];
    for t in 0..n_tok {
        for s in 0..used {
            let e = ids[t * used + s] as usize;
            let xr = if per_slot { (t * used + s) * k } else { t * k };
            let x = &x[xr..xr + k];
            for j in 0..m {
                let w = &w[(e * m + j) * k..(e * m + j + 1) * k];
                out[(t * used + s) * m + j] = w.iter().zip(x).map(|(a, b)| a * b).sum();
            }
        }
    }
    out
}

/// Wide expert matrices in row parts, as a GPU step of 129..=512 tokens runs them (see
/// graph::moe): past ggml-cuda's thresholds, so on a GPU the parts take its grouped kernel (mmf)
/// where the whole matrix would not; x shared by the slots (the up projection) or one row per
/// slot (the down projection). `large`: also Nemotron 3 Nano's expert shapes.
fn split_cases(rng: &mut Rng, cases: &mut Vec<Case>, large: bool) {
    let mut shapes = vec![(1024i64, 1088i64, 4i64, 192i64, 2i64, false), (1024, 1088, 4, 192, 2, true)];
    if large {
        shapes.push((2688, 1856, 128, 512, 6, false));
        shapes.push((1856, 2688, 128, 512, 6, true));
    }
    for (k, m, n_exp, n_tok, used, per_slot) in shapes {
        // Distinct experts per token, spread over all of them.
        let ids: Vec<i32> = (0..n_tok)
            .flat_map(|t| (0..used).map(move |s| ((t * 7 + s * (n_exp / used).max(1)) % n_exp) as i32))
            .collect();
        let x_slots = if per_slot { used } else { 1 };
        cases.push(Case {
            op: "mul_mat_id",
            what: format!(
                "experts bf16 [{k}x{m}x{n_exp}] in parts of <= 1024 rows · x f32 [{k}x{x_slots}x{n_tok}], {used} ids per token"
            ),
            tol: 1e-2,
            device_tol: None,
            inputs: vec![
                Input::floats(DType::BF16, &[k, m, n_exp], rng.vec((k * m * n_exp) as usize, 1.0)),
                Input::floats(DType::F32, &[k, x_slots, n_tok], rng.vec((k * x_slots * n_tok) as usize, 1.0)),
                Input { dtype: DType::I32, shape: vec![used, n_tok], fill: Fill::I32(ids.clone()) },
            ],
            build: Box::new(|c, t| crate::graph::moe::mul_mat_id_split_rows(c, t[0], t[1], t[2], 1024, 64)),
            reference: Box::new(move |v| mul_mat_id_f64(&v[0], &v[1], &ids, k as usize, m as usize, used as usize)),
        });
    }
}

fn moe_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (k, m, n_exp, n_tok, used) = (64i64, 32i64, 4i64, 5i64, 2i64);
    // Each token picks 2 distinct experts.
    let ids: Vec<i32> = (0..n_tok).flat_map(|t| [(t % n_exp) as i32, ((t + 1 + t / 2) % n_exp) as i32]).collect();
    for (wt, tol) in [(DType::F32, 1e-4), (DType::BF16, 1e-2), (DType::Q8_0, 2e-2)] {
        let ids = ids.clone();
        cases.push(Case {
            op: "mul_mat_id",
            what: format!("experts {} [{k}x{m}x{n_exp}] · x f32 [{k}x1x{n_tok}], {used} ids per token", wt.name()),
            tol,
            device_tol: (wt == DType::F32).then_some(1e-3),
            inputs: vec![
                Input::floats(wt, &[k, m, n_exp], rng.vec((k * m * n_exp) as usize, 1.0)),
                Input::floats(DType::F32, &[k, 1, n_tok], rng.vec((k * n_tok) as usize, 1.0)),
                Input { dtype: DType::I32, shape: vec![used, n_tok], fill: Fill::I32(ids.clone()) },
            ],
            build: Box::new(|c, t| c.mul_mat_id(t[0], t[1], t[2])),
            reference: Box::new(move |v| mul_mat_id_f64(&v[0], &v[1], &ids, k as usize, m as usize, used as usize)),
        });
    }
    // The router as graph::moe::route builds it (the sequence ggml-cuda fuses into one kernel):
    // sigmoid scores with a selection bias, renormalised and scaled (Nemotron-H, DeepSeek-V3);
    // a softmax, renormalised (Qwen3-MoE, Mixtral). The chosen experts' weights, best first.
    let (n_exp, n_tok) = (128i64, 7i64);
    for (sigmoid, k, norm, scale) in [(true, 6i64, true, 2.5f32), (false, 4, true, 1.0)] {
        let mut inputs = vec![Input::floats(DType::F32, &[n_exp, n_tok], rng.vec((n_exp * n_tok) as usize, 3.0))];
        if sigmoid {
            inputs.push(Input::floats(DType::F32, &[n_exp], rng.vec(n_exp as usize, 0.5)));
        }
        cases.push(Case {
            op: "moe_route",
            what: format!(
                "{} over f32 [{n_exp}x{n_tok}]{}, top {k}, renormalised, x{scale}",
                if sigmoid { "sigmoid" } else { "softmax" },
                if sigmoid { " + selection bias" } else { "" }
            ),
            tol: 1e-5,
            device_tol: None,
            inputs,
            build: Box::new(move |c, t| {
                let gating = sigmoid.then(|| t.get(1).copied());
                // A node after the routing, as in a model: ggml-cuda's fusion check reads the node
                // after the sequence without a bounds check (a graph ending in it crashes there).
                c.cont(crate::graph::moe::route(c, t[0], gating, None, k, norm, scale).1)
            }),
            reference: Box::new(move |v| {
                let n = n_exp as usize;
                let mut out = Vec::new();
                for (t, row) in v[0].chunks(n).enumerate() {
                    let _ = t;
                    let probs: Vec<f64> = if sigmoid {
                        row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect()
                    } else {
                        let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = row.iter().map(|&l| (l - mx).exp()).collect();
                        let z: f64 = e.iter().sum();
                        e.iter().map(|x| x / z).collect()
                    };
                    let choice: Vec<f64> =
                        if sigmoid { probs.iter().zip(&v[1]).map(|(p, b)| p + b).collect() } else { probs.clone() };
                    let mut idx: Vec<usize> = (0..n).collect();
                    idx.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]));
                    let w: Vec<f64> = idx[..k as usize].iter().map(|&i| probs[i]).collect();
                    let sum = if norm { w.iter().sum::<f64>().max(6.103515625e-5) } else { 1.0 };
                    out.extend(w.iter().map(|x| x / sum * scale as f64));
                }
                out
            }),
        });
    }
    let (ne, rows, top) = (8i64, 5i64, 3i64);
    cases.push(Case {
        op: "argsort_top_k",
        what: format!("f32 [{ne}x{rows}], top {top}, values picked with get_rows"),
        tol: 1e-6,
        device_tol: None,
        inputs: vec![Input::floats(DType::F32, &[ne, rows], rng.vec((ne * rows) as usize, 1.0))],
        build: Box::new(move |c, t| {
            let chosen = c.argsort_top_k(t[0], top as i32);
            c.get_rows(c.reshape_3d(t[0], 1, ne, rows), chosen)
        }),
        reference: Box::new(move |v| {
            v[0].chunks(ne as usize)
                .flat_map(|r| {
                    let mut r = r.to_vec();
                    r.sort_by(|a, b| b.total_cmp(a));
                    r.truncate(top as usize);
                    r
                })
                .collect()
        }),
    });
    // Greedy decoding's device-side argmax over a vocabulary-wide row (odd width: tail handling).
    let (width, n_rows) = (32_771i64, 7i64);
    cases.push(Case {
        op: "argmax",
        what: format!("f32 [{width}x{n_rows}], the largest value picked with get_rows"),
        tol: 1e-6,
        device_tol: None,
        inputs: vec![Input::floats(DType::F32, &[width, n_rows], rng.vec((width * n_rows) as usize, 4.0))],
        build: Box::new(move |c, t| {
            let best = c.reshape_2d(c.argmax(t[0]), 1, n_rows);
            c.get_rows(c.reshape_3d(t[0], 1, width, n_rows), best)
        }),
        reference: Box::new(move |v| {
            v[0].chunks(width as usize).map(|r| r.iter().copied().fold(f64::NEG_INFINITY, f64::max)).collect()
        }),
    });
    // Guests' candidates cut on the device: the k largest of a vocabulary-wide row (in no
    // order, so each row's picked values and their softmax probabilities are summed).
    let (width, n_rows, k) = (151_936i64, 5i64, 64i64);
    cases.push(Case {
        op: "top_k+soft_max",
        what: format!("f32 [{width}x{n_rows}], top {k}: sums of the picked values and of their probabilities"),
        tol: 1e-5,
        device_tol: None,
        inputs: vec![Input::floats(DType::F32, &[width, n_rows], rng.vec((width * n_rows) as usize, 8.0))],
        build: Box::new(move |c, t| {
            let ids = c.top_k(t[0], k as i32);
            let pick = |x| c.sum_rows(c.reshape_2d(c.get_rows(c.reshape_3d(x, 1, width, n_rows), ids), k, n_rows));
            let probs = c.soft_max_ext(t[0], None, 1.0);
            c.concat(pick(t[0]), pick(probs), 0)
        }),
        reference: Box::new(move |v| {
            let mut out = Vec::new();
            let (mut vals, mut probs) = (Vec::new(), Vec::new());
            for r in v[0].chunks(width as usize) {
                let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = r.iter().map(|x| (x - max).exp()).sum();
                let mut s = r.to_vec();
                s.sort_by(|a, b| b.total_cmp(a));
                s.truncate(k as usize);
                vals.push(s.iter().sum::<f64>());
                probs.push(s.iter().map(|x| (x - max).exp() / z).sum::<f64>());
            }
            for j in 0..n_rows as usize {
                out.push(vals[j]);
                out.push(probs[j]);
            }
            out
        }),
    });
    cases.push(Case {
        op: "sum_rows+div",
        what: format!("f32 [{ne}x{rows}] / its row sums"),
        tol: 1e-6,
        device_tol: None,
        inputs: vec![Input::floats(
            DType::F32,
            &[ne, rows],
            rng.vec((ne * rows) as usize, 1.0).into_iter().map(|x| x.abs() + 0.1).collect(),
        )],
        build: Box::new(|c, t| c.div(t[0], c.sum_rows(t[0]))),
        reference: Box::new(move |v| {
            v[0].chunks(ne as usize)
                .flat_map(|r| {
                    let s: f64 = r.iter().sum();
                    r.iter().map(move |x| x / s)
                })
                .collect()
        }),
    });
    cases.push(Case {
        op: "sigmoid",
        what: "f32 [64x5]".into(),
        tol: 1e-5,
        device_tol: None,
        inputs: vec![Input::floats(DType::F32, &[64, 5], rng.vec(64 * 5, 4.0))],
        build: Box::new(|c, t| c.sigmoid(t[0])),
        reference: Box::new(|v| v[0].iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect()),
    });
}

fn get_rows_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (e, rows) = (64i64, 50i64);
    let ids: Vec<i32> = vec![3, 0, 49, 17, 17, 8, 25];
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let n = ids.len();
        cases.push(Case {
            op: "get_rows",
            what: format!("table {} [{e}x{rows}], {n} i32 ids", dt.name()),
            tol: 1e-6,
            device_tol: None,
            inputs: vec![
                Input::floats(dt, &[e, rows], rng.vec((e * rows) as usize, 1.0)),
                Input { dtype: DType::I32, shape: vec![n as i64], fill: Fill::I32(ids.clone()) },
            ],
            build: Box::new(|c, t| c.get_rows(t[0], t[1])),
            reference: Box::new(move |v| {
                let e = e as usize;
                v[1].iter().flat_map(|&r| v[0][r as usize * e..(r as usize + 1) * e].to_vec()).collect()
            }),
        });
    }
}

fn elementwise_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let eps = 1e-6f32;
    cases.push(Case {
        op: "rms_norm",
        what: "f32 [256x5], eps 1e-6".into(),
        tol: 1e-5,
        device_tol: None,
        inputs: vec![Input::floats(DType::F32, &[256, 5], rng.vec(256 * 5, 2.0))],
        build: Box::new(move |c, t| c.rms_norm(t[0], eps)),
        reference: Box::new(move |v| {
            v[0].chunks(256)
                .flat_map(|r| {
                    let ms = r.iter().map(|x| x * x).sum::<f64>() / r.len() as f64;
                    let s = 1.0 / (ms + eps as f64).sqrt();
                    r.iter().map(move |x| x * s)
                })
                .collect()
        }),
    });
    let binary: [(&'static str, &[i64], &[i64]); 3] =
        [("mul", &[256, 5], &[256]), ("mul", &[64, 4, 5], &[64]), ("add", &[96, 5], &[96])];
    for (op, a, b) in binary {
        let (a, b) = (a.to_vec(), b.to_vec());
        let f: fn(f64, f64) -> f64 = if op == "mul" { |x, y| x * y } else { |x, y| x + y };
        cases.push(Case {
            op,
            what: format!("f32 {a:?} {} f32 {b:?} (broadcast)", if op == "mul" { "*" } else { "+" }),
            tol: 1e-6,
            device_tol: None,
            inputs: vec![
                Input::floats(DType::F32, &a, rng.vec(numel(&a), 1.0)),
                Input::floats(DType::F32, &b, rng.vec(numel(&b), 1.0)),
            ],
            build: Box::new(move |c, t| if op == "mul" { c.mul(t[0], t[1]) } else { c.add(t[0], t[1]) }),
            reference: Box::new(move |v| broadcast(&v[0], &a, &v[1], &b, f)),
        });
    }
    cases.push(Case {
        op: "scale",
        what: "f32 [96x5] * 0.125".into(),
        tol: 1e-6,
        device_tol: None,
        inputs: vec![Input::floats(DType::F32, &[96, 5], rng.vec(96 * 5, 1.0))],
        build: Box::new(|c, t| c.scale(t[0], 0.125)),
        reference: Box::new(|v| v[0].iter().map(|x| x * 0.125).collect()),
    });
    cases.push(Case {
        op: "silu",
        what: "f32 [256x5]".into(),
        tol: 1e-5,
        device_tol: None,
        inputs: vec![Input::floats(DType::F32, &[256, 5], rng.vec(256 * 5, 6.0))],
        build: Box::new(|c, t| c.silu(t[0])),
        reference: Box::new(|v| v[0].iter().map(|&x| silu(x)).collect()),
    });
    cases.push(Case {
        op: "swiglu_split",
        what: "silu(f32 [256x5]) * f32 [256x5]".into(),
        tol: 1e-5,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::F32, &[256, 5], rng.vec(256 * 5, 6.0)),
            Input::floats(DType::F32, &[256, 5], rng.vec(256 * 5, 2.0)),
        ],
        build: Box::new(|c, t| c.swiglu_split(t[0], t[1])),
        reference: Box::new(|v| v[0].iter().zip(&v[1]).map(|(&a, &b)| silu(a) * b).collect()),
    });
}

/// A causal-looking mask with holes (cells of other sequences): row `r` of `rows` sees cells
/// `j <= last(r)` except every 11th; -inf elsewhere.
fn mask(n_kv: usize, rows: usize, rng: &mut Rng) -> Vec<f32> {
    let mut m = Vec::with_capacity(n_kv * rows);
    for r in 0..rows {
        let last = n_kv - rows + r - rng.below(3).min(n_kv - rows + r);
        for j in 0..n_kv {
            let hidden = j > last || (j % 11 == 5 && j != last);
            m.push(if hidden { f32::NEG_INFINITY } else { 0.0 });
        }
    }
    m
}

fn soft_max_case(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (n_kv, nt, h) = (32usize, 7usize, 4usize);
    let scale = 0.125f32;
    cases.push(Case {
        op: "soft_max_ext",
        what: format!("f32 [{n_kv}x{nt}x{h}], f32 mask [{n_kv}x{nt}] with -inf, scale {scale}"),
        tol: 1e-5,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::F32, &[n_kv as i64, nt as i64, h as i64], rng.vec(n_kv * nt * h, 24.0)),
            Input::floats(DType::F32, &[n_kv as i64, nt as i64], mask(n_kv, nt, rng)),
        ],
        build: Box::new(move |c, t| c.soft_max_ext(t[0], Some(t[1]), scale)),
        reference: Box::new(move |v| {
            let mut out = Vec::with_capacity(v[0].len());
            for (row, x) in v[0].chunks(n_kv).enumerate() {
                let m = &v[1][(row % nt) * n_kv..(row % nt + 1) * n_kv];
                let s: Vec<f64> = x.iter().zip(m).map(|(x, m)| x * scale as f64 + m).collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                out.extend(e.iter().map(|e| e / sum));
            }
            out
        }),
    });
}

fn rope_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (hd, h, nt) = (64usize, 4usize, 5usize);
    let pos: Vec<i32> = vec![0, 1, 7, 100, 255];
    for (mode, n_dims, with_ff) in
        [(0, 64, false), (0, 64, true), (ROPE_NEOX, 64, false), (ROPE_NEOX, 64, true), (ROPE_NEOX, 32, false)]
    {
        let p = RopeParams {
            n_dims,
            mode,
            n_ctx_orig: 4096,
            freq_base: 10000.0,
            freq_scale: if with_ff { 1.0 } else { 0.5 },
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        let half = n_dims as usize / 2;
        let mut inputs = vec![
            Input::floats(DType::F32, &[hd as i64, h as i64, nt as i64], rng.vec(hd * h * nt, 1.0)),
            Input { dtype: DType::I32, shape: vec![nt as i64], fill: Fill::I32(pos.clone()) },
        ];
        if with_ff {
            // llama3-like divisors: 1 for high frequencies up to 8 for low ones.
            let ff = (0..half).map(|i| 1.0 + 7.0 * (i as f32 / (half - 1) as f32).powi(2)).collect();
            inputs.push(Input::floats(DType::F32, &[half as i64], ff));
        }
        cases.push(Case {
            op: "rope_ext",
            what: format!(
                "{} f32 [{hd}x{h}x{nt}], n_dims {n_dims}, freq_scale {}{}",
                if mode == ROPE_NEOX { "neox" } else { "normal" },
                p.freq_scale,
                if with_ff { ", freq_factors" } else { "" }
            ),
            tol: 1e-4,
            device_tol: None,
            inputs,
            build: Box::new(move |c, t| c.rope_ext(t[0], t[1], t.get(2).copied(), &p)),
            reference: Box::new(move |v| {
                let mut out = v[0].clone();
                let ffs = if with_ff { v[2].clone() } else { vec![1.0; half] };
                for t in 0..nt {
                    let pos = v[1][t];
                    for head in 0..h {
                        let x = &v[0][(t * h + head) * hd..(t * h + head + 1) * hd];
                        let o = &mut out[(t * h + head) * hd..(t * h + head + 1) * hd];
                        for (i, ff) in ffs.iter().enumerate() {
                            let theta =
                                pos * p.freq_scale as f64 * (p.freq_base as f64).powf(-2.0 * i as f64 / n_dims as f64)
                                    / ff;
                            let (s, c) = theta.sin_cos();
                            let (a, b) = if mode == ROPE_NEOX { (i, i + half) } else { (2 * i, 2 * i + 1) };
                            o[a] = x[a] * c - x[b] * s;
                            o[b] = x[a] * s + x[b] * c;
                        }
                    }
                }
                out
            }),
        });
    }
}

fn flash_attn_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (hd, h, h_kv, n_kv) = (64usize, 4usize, 2usize, 256usize);
    let scale = 1.0 / (hd as f32).sqrt();
    for (kt, tol) in [(DType::F16, 1e-2), (DType::BF16, 2e-2), (DType::Q8_0, 2e-2), (DType::Q4_0, 2e-2)] {
        for nq in [1usize, 7] {
            let row = (hd * h_kv) as i64;
            cases.push(Case {
                op: "flash_attn_ext",
                what: format!(
                    "q f32 [{hd}x{nq}x{h}], k/v {} cache rows [{row}x{n_kv}] ({h_kv} kv heads), f16 mask",
                    kt.name()
                ),
                tol,
                device_tol: None,
                inputs: vec![
                    Input::floats(DType::F32, &[hd as i64, nq as i64, h as i64], rng.vec(hd * nq * h, 6.0)),
                    Input::floats(kt, &[row, n_kv as i64], rng.vec(row as usize * n_kv, 1.0)),
                    Input::floats(kt, &[row, n_kv as i64], rng.vec(row as usize * n_kv, 1.0)),
                    Input::floats(DType::F16, &[n_kv as i64, nq as i64], mask(n_kv, nq, rng)),
                ],
                // K and V are viewed per head out of cache rows, as the attention block does.
                build: Box::new(move |c, t| {
                    let head_bytes = kt.row_size(hd as i64);
                    let view = |x: Tensor| c.view_3d(x, hd as i64, n_kv as i64, h_kv as i64, x.nb()[1], head_bytes, 0);
                    let o = c.flash_attn_ext(t[0], view(t[1]), view(t[2]), Some(t[3]), scale);
                    c.set_prec_f32(o);
                    o
                }),
                reference: Box::new(move |v| {
                    let cells: Vec<usize> = (0..n_kv).collect();
                    attention_f64(&v[0], &v[1], &v[2], &v[3], &cells, AttnGeom { hd, h, h_kv, nq }, scale)
                }),
            });
        }
    }
}

/// gpt-oss's ops: the clamped SwiGLU, per-expert bias rows, attention with learned sinks (softmax
/// and flash-attention paths), and experts in MXFP4 (as the Hub publishes them).
fn gpt_oss_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (alpha, limit) = (1.702f32, 7.0f32);
    cases.push(Case {
        op: "swiglu_oai",
        what: format!("f32 [256x5] gate, f32 [256x5] up, alpha {alpha}, limit {limit} (values beyond it)"),
        tol: 1e-5,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::F32, &[256, 5], rng.vec(256 * 5, 12.0)),
            Input::floats(DType::F32, &[256, 5], rng.vec(256 * 5, 12.0)),
        ],
        build: Box::new(move |c, t| c.swiglu_oai(t[0], t[1], alpha, limit)),
        reference: Box::new(move |v| {
            let (a, l) = (alpha as f64, limit as f64);
            v[0].iter()
                .zip(&v[1])
                .map(|(&g, &u)| {
                    let g = g.min(l);
                    let u = u.clamp(-l, l);
                    g / (1.0 + (-a * g).exp()) * (u + 1.0)
                })
                .collect()
        }),
    });
    let (n, used, n_tok, n_exp) = (48i64, 2i64, 5i64, 4i64);
    let ids: Vec<i32> = (0..n_tok).flat_map(|t| [(t % n_exp) as i32, ((t + 2) % n_exp) as i32]).collect();
    {
        let ids = ids.clone();
        cases.push(Case {
            op: "add_id",
            what: format!("f32 [{n}x{used}x{n_tok}] + bias rows f32 [{n}x{n_exp}] by expert id"),
            tol: 1e-6,
            device_tol: None,
            inputs: vec![
                Input::floats(DType::F32, &[n, used, n_tok], rng.vec((n * used * n_tok) as usize, 1.0)),
                Input::floats(DType::F32, &[n, n_exp], rng.vec((n * n_exp) as usize, 1.0)),
                Input { dtype: DType::I32, shape: vec![used, n_tok], fill: Fill::I32(ids.clone()) },
            ],
            build: Box::new(|c, t| c.add_id(t[0], t[1], t[2])),
            reference: Box::new(move |v| {
                let n = n as usize;
                v[0].chunks(n)
                    .enumerate()
                    .flat_map(|(slot, a)| {
                        let e = ids[slot] as usize;
                        a.iter().zip(&v[1][e * n..(e + 1) * n]).map(|(x, b)| x + b).collect::<Vec<_>>()
                    })
                    .collect()
            }),
        });
    }
    let (k, m) = (64i64, 32i64);
    cases.push(Case {
        op: "mul_mat_id",
        what: format!("experts mxfp4 [{k}x{m}x{n_exp}] · x f32 [{k}x1x{n_tok}], {used} ids per token"),
        tol: 3e-2,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::MXFP4, &[k, m, n_exp], rng.vec((k * m * n_exp) as usize, 1.0)),
            Input::floats(DType::F32, &[k, 1, n_tok], rng.vec((k * n_tok) as usize, 1.0)),
            Input { dtype: DType::I32, shape: vec![used, n_tok], fill: Fill::I32(ids.clone()) },
        ],
        build: Box::new(|c, t| c.mul_mat_id(t[0], t[1], t[2])),
        reference: Box::new(move |v| mul_mat_id_f64(&v[0], &v[1], &ids, k as usize, m as usize, used as usize)),
    });
    // Softmax with sinks: some rows' sink above all their scores, some below.
    let (n_kv, nt, h) = (32usize, 7usize, 4usize);
    let scale = 0.125f32;
    cases.push(Case {
        op: "soft_max_ext",
        what: format!("f32 [{n_kv}x{nt}x{h}], f32 mask, scale {scale}, sinks f32 [{h}]"),
        tol: 1e-5,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::F32, &[n_kv as i64, nt as i64, h as i64], rng.vec(n_kv * nt * h, 24.0)),
            Input::floats(DType::F32, &[n_kv as i64, nt as i64], mask(n_kv, nt, rng)),
            Input::floats(DType::F32, &[h as i64], vec![-2.0, 0.5, 3.0, 8.0]),
        ],
        build: Box::new(move |c, t| {
            let p = c.soft_max_ext(t[0], Some(t[1]), scale);
            c.soft_max_add_sinks(p, t[2]);
            p
        }),
        reference: Box::new(move |v| {
            let mut out = Vec::with_capacity(v[0].len());
            for (row, x) in v[0].chunks(n_kv).enumerate() {
                let m = &v[1][(row % nt) * n_kv..(row % nt + 1) * n_kv];
                let sink = v[2][row / nt];
                let s: Vec<f64> = x.iter().zip(m).map(|(x, m)| x * scale as f64 + m).collect();
                let max = s.iter().copied().fold(sink, f64::max);
                let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum::<f64>() + (sink - max).exp();
                out.extend(e.iter().map(|e| e / sum));
            }
            out
        }),
    });
    // YaRN as the models build it: HF's divisors as freq factors, ext_factor 0, cos and sin
    // scaled by the attention factor (gpt-oss-20b's).
    let (hd, h, nt) = (64usize, 4usize, 5usize);
    let pos: Vec<i32> = vec![0, 3, 129, 300, 600]; // (f32 angles: far positions lose digits)
    let p = RopeParams {
        n_dims: 64,
        mode: ROPE_NEOX,
        n_ctx_orig: 4096,
        freq_base: 150000.0,
        freq_scale: 1.0,
        ext_factor: 0.0,
        attn_factor: 1.346_573_6,
        beta_fast: 32.0,
        beta_slow: 1.0,
    };
    let ff: Vec<f32> = (0..32)
        .map(|i| {
            if i < 8 {
                1.0
            } else if i > 18 {
                32.0
            } else {
                1.0 + (i - 8) as f32 * 3.0
            }
        })
        .collect();
    cases.push(Case {
        op: "rope_ext",
        what: format!("neox f32 [{hd}x{h}x{nt}], base 150000, YaRN freq_factors, attn_factor {}", p.attn_factor),
        tol: 1e-4,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::F32, &[hd as i64, h as i64, nt as i64], rng.vec(hd * h * nt, 1.0)),
            Input { dtype: DType::I32, shape: vec![nt as i64], fill: Fill::I32(pos) },
            Input::floats(DType::F32, &[32], ff),
        ],
        build: Box::new(move |c, t| c.rope_ext(t[0], t[1], Some(t[2]), &p)),
        reference: Box::new(move |v| {
            let mut out = v[0].clone();
            for t in 0..nt {
                for head in 0..h {
                    let x = &v[0][(t * h + head) * hd..(t * h + head + 1) * hd];
                    let o = &mut out[(t * h + head) * hd..(t * h + head + 1) * hd];
                    for i in 0..32 {
                        let theta = v[1][t] * 150000f64.powf(-2.0 * i as f64 / 64.0) / v[2][i];
                        let (s, c) = theta.sin_cos();
                        let (s, c) = (s * p.attn_factor as f64, c * p.attn_factor as f64);
                        o[i] = x[i] * c - x[i + 32] * s;
                        o[i + 32] = x[i] * s + x[i + 32] * c;
                    }
                }
            }
            out
        }),
    });
    let (hd, h, h_kv, n_kv, nq) = (64usize, 4usize, 2usize, 256usize, 7usize);
    let scale = 1.0 / (hd as f32).sqrt();
    let row = (hd * h_kv) as i64;
    cases.push(Case {
        op: "flash_attn_ext",
        what: format!("q f32 [{hd}x{nq}x{h}], k/v f16 cache rows [{row}x{n_kv}], f16 mask, sinks f32 [{h}]"),
        tol: 1e-2,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::F32, &[hd as i64, nq as i64, h as i64], rng.vec(hd * nq * h, 6.0)),
            Input::floats(DType::F16, &[row, n_kv as i64], rng.vec(row as usize * n_kv, 1.0)),
            Input::floats(DType::F16, &[row, n_kv as i64], rng.vec(row as usize * n_kv, 1.0)),
            Input::floats(DType::F16, &[n_kv as i64, nq as i64], mask(n_kv, nq, rng)),
            Input::floats(DType::F32, &[h as i64], vec![-3.0, 0.0, 2.5, 9.0]),
        ],
        build: Box::new(move |c, t| {
            let head_bytes = DType::F16.row_size(hd as i64);
            let view = |x: Tensor| c.view_3d(x, hd as i64, n_kv as i64, h_kv as i64, x.nb()[1], head_bytes, 0);
            let o = c.flash_attn_ext(t[0], view(t[1]), view(t[2]), Some(t[3]), scale);
            c.flash_attn_ext_add_sinks(o, t[4]);
            c.set_prec_f32(o);
            o
        }),
        reference: Box::new(move |v| {
            let cells: Vec<usize> = (0..n_kv).collect();
            let g = AttnGeom { hd, h, h_kv, nq };
            attention_sinks_f64(&v[0], &v[1], &v[2], &v[3], &cells, g, scale, Some(&v[4]))
        }),
    });
}

/// Head geometry of an attention reference.
#[derive(Clone, Copy)]
struct AttnGeom {
    hd: usize,
    h: usize,
    h_kv: usize,
    nq: usize,
}

/// softmax(q·k·scale + mask)·v in f64 over the cache rows `cells` (in mask column order) of `k`
/// and `v` (rows of `hd * h_kv`); q is `[hd, nq, h]`, the result `[hd, h, nq]` as ggml's
/// `flash_attn_ext` returns it.
fn attention_f64(q: &[f64], k: &[f64], v: &[f64], m: &[f64], cells: &[usize], g: AttnGeom, scale: f32) -> Vec<f64> {
    attention_sinks_f64(q, k, v, m, cells, g, scale, None)
}

/// [`attention_f64`] with learned per-head sinks (gpt-oss): `exp(sink[head])` joins each row's
/// softmax denominator (unscaled, unmasked) and outputs nothing.
#[allow(clippy::too_many_arguments)]
fn attention_sinks_f64(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    m: &[f64],
    cells: &[usize],
    g: AttnGeom,
    scale: f32,
    sinks: Option<&[f64]>,
) -> Vec<f64> {
    let AttnGeom { hd, h, h_kv, nq } = g;
    let (row, n) = (hd * h_kv, cells.len());
    let mut out = vec![0.0; hd * h * nq];
    for r in 0..nq {
        for head in 0..h {
            let hk = head / (h / h_kv);
            let qv = &q[(head * nq + r) * hd..(head * nq + r + 1) * hd];
            let s: Vec<f64> = cells
                .iter()
                .enumerate()
                .map(|(j, &c)| {
                    let kj = &k[c * row + hk * hd..c * row + (hk + 1) * hd];
                    qv.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale as f64 + m[r * n + j]
                })
                .collect();
            let sink = sinks.map(|sk| sk[head]);
            let max = s.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum::<f64>() + sink.map_or(0.0, |x| (x - max).exp());
            let o = &mut out[(r * h + head) * hd..(r * h + head + 1) * hd];
            for (ej, &c) in e.iter().zip(cells) {
                let vj = &v[c * row + hk * hd..c * row + (hk + 1) * hd];
                for (oi, vi) in o.iter_mut().zip(vj) {
                    *oi += ej / sum * vi;
                }
            }
        }
    }
    out
}

/// Attention over one sequence's cells gathered out of the pool (the attention block's
/// `SegmentKv::Gathered`): `get_rows` of F16 cache rows at scattered cells, cast back to F16,
/// viewed per head, then `flash_attn_ext` under a `cells x rows` mask.
fn gathered_attn_case(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (hd, h, h_kv, n_cells, nq) = (64usize, 4usize, 2usize, 512usize, 5usize);
    let n = 256usize; // gathered cells (a multiple of 256, as the runner pads them)
    let scale = 1.0 / (hd as f32).sqrt();
    let row = (hd * h_kv) as i64;
    // Every other cell, backwards, plus a few repeats standing for padding (masked).
    let ids: Vec<i32> = (0..n).map(|j| if j < 240 { (n_cells - 1 - 2 * j) as i32 } else { 5 }).collect();
    let mut m = mask(n, nq, rng);
    for r in 0..nq {
        for j in 240..n {
            m[r * n + j] = f32::NEG_INFINITY;
        }
    }
    cases.push(Case {
        op: "flash_attn_ext",
        what: format!("over {n} of {n_cells} f16 cache rows gathered (get_rows, cast f16), q [{hd}x{nq}x{h}]"),
        tol: 1e-2,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::F32, &[hd as i64, nq as i64, h as i64], rng.vec(hd * nq * h, 6.0)),
            Input::floats(DType::F16, &[row, n_cells as i64], rng.vec(row as usize * n_cells, 1.0)),
            Input::floats(DType::F16, &[row, n_cells as i64], rng.vec(row as usize * n_cells, 1.0)),
            Input { dtype: DType::I32, shape: vec![n as i64], fill: Fill::I32(ids.clone()) },
            Input::floats(DType::F16, &[n as i64, nq as i64], m),
        ],
        build: Box::new(move |c, t| {
            let gather = |x: Tensor| {
                let g = c.cast(c.get_rows(x, t[3]), DType::F16);
                c.view_3d(g, hd as i64, n as i64, h_kv as i64, g.nb()[1], DType::F16.row_size(hd as i64), 0)
            };
            let o = c.flash_attn_ext(t[0], gather(t[1]), gather(t[2]), Some(t[4]), scale);
            c.set_prec_f32(o);
            o
        }),
        reference: Box::new(move |v| {
            let cells: Vec<usize> = v[3].iter().map(|&c| c as usize).collect();
            attention_f64(&v[0], &v[1], &v[2], &v[4], &cells, AttnGeom { hd, h, h_kv, nq }, scale)
        }),
    });
}

fn copy_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (row, cells, nt) = (128usize, 16usize, 5usize);
    let ids: Vec<i64> = vec![3, 0, 15, 7, 8];
    for (dt, tol) in [(DType::F16, 1e-6), (DType::BF16, 1e-6), (DType::Q8_0, 8e-3), (DType::Q4_0, 0.13)] {
        cases.push(Case {
            op: "set_rows",
            what: format!("f32 [{row}x{nt}] into {} [{row}x{cells}] at i64 ids", dt.name()),
            tol,
            device_tol: None,
            inputs: vec![
                Input::floats(dt, &[row as i64, cells as i64], rng.vec(row * cells, 1.0)),
                Input::floats(DType::F32, &[row as i64, nt as i64], rng.vec(row * nt, 1.0)),
                Input { dtype: DType::I64, shape: vec![nt as i64], fill: Fill::I64(ids.clone()) },
            ],
            build: Box::new(|c, t| c.set_rows(t[0], t[1], t[2])),
            reference: Box::new(move |v| {
                let mut out = v[0].clone();
                let written = round_trip(dt, &v[1], row);
                for (t, &cell) in v[2].iter().enumerate() {
                    let cell = cell as usize;
                    out[cell * row..(cell + 1) * row].copy_from_slice(&written[t * row..(t + 1) * row]);
                }
                out
            }),
        });
    }
    cases.push(Case {
        op: "cpy",
        what: "f32 [96x5] -> f16 [96x5]".into(),
        tol: 1e-6,
        device_tol: None,
        inputs: vec![
            Input::floats(DType::F32, &[96, 5], rng.vec(96 * 5, 4.0)),
            Input { dtype: DType::F16, shape: vec![96, 5], fill: Fill::Unset },
        ],
        build: Box::new(|c, t| c.cpy(t[0], t[1])),
        reference: Box::new(|v| v[0].iter().map(|&x| half::f16::from_f32(x as f32).to_f64()).collect()),
    });
    let concats: [(&[i64], &[i64], i32); 2] = [(&[64, 4, 3], &[64, 4, 2], 2), (&[32, 5], &[16, 5], 0)];
    for (a, b, dim) in concats {
        let (a, b) = (a.to_vec(), b.to_vec());
        cases.push(Case {
            op: "concat",
            what: format!("f32 {a:?} ++ f32 {b:?} along dim {dim}"),
            tol: 1e-6,
            device_tol: None,
            inputs: vec![
                Input::floats(DType::F32, &a, rng.vec(numel(&a), 1.0)),
                Input::floats(DType::F32, &b, rng.vec(numel(&b), 1.0)),
            ],
            build: Box::new(move |c, t| c.concat(t[0], t[1], dim)),
            reference: Box::new(move |v| {
                let d = dim as usize;
                let ne = |s: &[i64], i: usize| s.get(i).copied().unwrap_or(1) as usize;
                let (an, bn): (Vec<usize>, Vec<usize>) = (0..4).map(|i| (ne(&a, i), ne(&b, i))).unzip();
                let mut on = an.clone();
                on[d] += bn[d];
                let mut out = Vec::with_capacity(on.iter().product());
                for i3 in 0..on[3] {
                    for i2 in 0..on[2] {
                        for i1 in 0..on[1] {
                            for i0 in 0..on[0] {
                                let mut i = [i0, i1, i2, i3];
                                let (src, n) = if i[d] < an[d] {
                                    (&v[0], &an)
                                } else {
                                    i[d] -= an[d];
                                    (&v[1], &bn)
                                };
                                out.push(src[((i[3] * n[2] + i[2]) * n[1] + i[1]) * n[0] + i[0]]);
                            }
                        }
                    }
                }
                out
            }),
        });
    }
    let conts: [(DType, &[i64], [usize; 4]); 2] =
        [(DType::F32, &[64, 5, 4], [0, 2, 1, 3]), (DType::F16, &[64, 32, 2], [1, 0, 2, 3])];
    for (dt, shape, p) in conts {
        let shape = shape.to_vec();
        cases.push(Case {
            op: "cont",
            what: format!("permute{p:?} of {} {shape:?}", dt.name()),
            tol: 1e-6,
            device_tol: None,
            inputs: vec![Input::floats(dt, &shape, rng.vec(numel(&shape), 1.0))],
            build: Box::new(move |c, t| c.cont(c.permute(t[0], p.map(|d| d as i32)))),
            reference: Box::new(move |v| permute(&v[0], &shape, p)),
        });
    }
}

/// Every case of the table, in a fixed order with fixed inputs.
fn cases(large: bool) -> Vec<Case> {
    let mut rng = Rng(0x5711_0b5e_ed00_0001);
    let mut cases = Vec::new();
    mul_mat_cases(&mut rng, &mut cases);
    get_rows_cases(&mut rng, &mut cases);
    elementwise_cases(&mut rng, &mut cases);
    soft_max_case(&mut rng, &mut cases);
    rope_cases(&mut rng, &mut cases);
    flash_attn_cases(&mut rng, &mut cases);
    gathered_attn_case(&mut rng, &mut cases);
    copy_cases(&mut rng, &mut cases);
    moe_cases(&mut rng, &mut cases);
    split_cases(&mut rng, &mut cases, large);
    gpt_oss_cases(&mut rng, &mut cases);
    cases
}

/// Build the case's graph, run it on `backend` alone and read its result back.
fn run_case(case: &Case, backend: &Backend) -> Result<Outcome> {
    let ctx = Context::new(case.inputs.len() + 16, 16)?;
    let ts: Vec<Tensor> = case
        .inputs
        .iter()
        .enumerate()
        .map(|(i, inp)| ctx.new_tensor(inp.dtype, &inp.shape, &format!("in{i}")).set_input())
        .collect();
    let out = (case.build)(&ctx, &ts).set_output();
    let mut graph = ctx.new_graph(16);
    graph.expand(out);
    for i in 0..graph.n_nodes() as usize {
        let node = graph.node(i).expect("below the node count");
        if !backend.supports_op(node) {
            return Ok(Outcome::Unsupported(node.op_name()));
        }
    }
    let _buf = ctx.alloc_tensors(backend)?;
    for (t, inp) in ts.iter().zip(&case.inputs) {
        if let Some(bytes) = inp.bytes()? {
            t.write_bytes(&bytes, 0)?;
        }
    }
    backend.compute(&mut graph)?;
    let dtype = out.dtype().ok_or_else(|| anyhow::anyhow!("{}: result of an unexpected type", case.op))?;
    let bytes = out.read_bytes(0, out.nbytes())?;
    Ok(Outcome::Ran(ggml::convert_to_f32(dtype, &bytes)?.into_iter().map(f64::from).collect()))
}

/// `(max |got - want|, that / max |want|)`; a non-finite mismatch counts as infinite.
fn errors(got: &[f64], want: &[f64]) -> (f64, f64) {
    if got.len() != want.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let mut max_abs = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        let e = if g == w { 0.0 } else { (g - w).abs() };
        max_abs = max_abs.max(if e.is_nan() { f64::INFINITY } else { e });
    }
    let scale = want.iter().filter(|w| w.is_finite()).fold(0.0f64, |m, w| m.max(w.abs()));
    (max_abs, if scale > 0.0 { max_abs / scale } else { max_abs })
}

#[derive(serde::Serialize)]
struct Row {
    op: &'static str,
    case: String,
    tol: f64,
    /// "pass", "fail" or "unsupported" (on a device: the op would run on the CPU)
    status: &'static str,
    max_abs: Option<f64>,
    max_rel: Option<f64>,
    cpu_max_abs: Option<f64>,
    cpu_max_rel: Option<f64>,
    note: Option<String>,
}

fn check(case: &Case, backend: &Backend, cpu: Option<&Backend>) -> Result<Row> {
    let values = case.inputs.iter().map(Input::values).collect::<Result<Vec<_>>>()?;
    let want = (case.reference)(&values);
    let tol = if cpu.is_some() { case.device_tol.unwrap_or(case.tol) } else { case.tol };
    let mut row = Row {
        op: case.op,
        case: case.what.clone(),
        tol,
        status: "pass",
        max_abs: None,
        max_rel: None,
        cpu_max_abs: None,
        cpu_max_rel: None,
        note: None,
    };
    let got = match run_case(case, backend)? {
        Outcome::Ran(got) => got,
        Outcome::Unsupported(op) => {
            // The CPU must run everything; a device may leave an op to the CPU.
            row.status = if cpu.is_some() { "unsupported" } else { "fail" };
            row.note = Some(format!("{} does not support {op}", backend.name()));
            return Ok(row);
        }
    };
    let (abs, rel) = errors(&got, &want);
    (row.max_abs, row.max_rel) = (Some(abs), Some(rel));
    let mut ok = rel <= tol;
    if let Some(cpu) = cpu {
        match run_case(case, cpu)? {
            Outcome::Ran(on_cpu) => {
                let (abs, rel) = errors(&got, &on_cpu);
                (row.cpu_max_abs, row.cpu_max_rel) = (Some(abs), Some(rel));
                ok &= rel <= tol;
            }
            Outcome::Unsupported(op) => row.note = Some(format!("the CPU does not support {op}")),
        }
    }
    if !ok {
        row.status = "fail";
    }
    Ok(row)
}

fn fmt_err(e: Option<f64>) -> String {
    e.map_or_else(|| "-".into(), |e| format!("{e:.2e}"))
}

fn print_table(backend: &str, rows: &[Row], with_cpu: bool) {
    println!("op check on {backend} (reference: naive f64; rel = max abs error / max |reference|)");
    let w = rows.iter().map(|r| r.case.len()).max().unwrap_or(4);
    let cpu_head = if with_cpu { format!(" {:>9} {:>9}", "cpu abs", "cpu rel") } else { String::new() };
    println!("{:<15} {:<w$} {:>9} {:>9} {:>8}{cpu_head}  result", "op", "case", "max abs", "max rel", "tol");
    for r in rows {
        let cpu = if with_cpu {
            format!(" {:>9} {:>9}", fmt_err(r.cpu_max_abs), fmt_err(r.cpu_max_rel))
        } else {
            String::new()
        };
        let note = r.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        println!(
            "{:<15} {:<w$} {:>9} {:>9} {:>8}{cpu}  {}{note}",
            r.op,
            r.case,
            fmt_err(r.max_abs),
            fmt_err(r.max_rel),
            format!("{:e}", r.tol),
            r.status.to_uppercase()
        );
    }
}

/// `stllm op-check`: run the table on the chosen device (the CPU by default).
pub fn run(dev: &DeviceArgs, json: bool, large: bool) -> Result<()> {
    let device = dev.prepare()?.filter(|d| !d.eq_ignore_ascii_case("cpu"));
    let cpu = Backend::cpu(ggml::default_threads())?;
    let device = device.map(|d| Backend::device(&d)).transpose()?;
    let (backend, reference_cpu) = match &device {
        Some(d) => (d, Some(&cpu)),
        None => (&cpu, None),
    };
    let rows = cases(large).iter().map(|c| check(c, backend, reference_cpu)).collect::<Result<Vec<_>>>()?;
    let count = |s: &str| rows.iter().filter(|r| r.status == s).count();
    let (passed, failed, unsupported) = (count("pass"), count("fail"), count("unsupported"));
    if json {
        let out = serde_json::json!({
            "backend": backend.name(),
            "compared_with_cpu": reference_cpu.is_some(),
            "passed": passed,
            "failed": failed,
            "unsupported": unsupported,
            "cases": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&backend.name(), &rows, reference_cpu.is_some());
        println!("{passed} passed, {failed} failed, {unsupported} unsupported");
    }
    if failed > 0 {
        bail!("{failed} of {} op checks failed on {}", rows.len(), backend.name());
    }
    Ok(())
}
