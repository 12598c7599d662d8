//! Which device holds what: each repeating layer's weights and KV cache, the input embedding and
//! the output head, as indices into the model's backend list (devices in split order, the CPU
//! last). ggml's scheduler then runs every op where its weights are and copies activations
//! between devices at the boundaries: that is layer offload (`--gpu-layers`) and pipeline
//! parallelism over several GPUs (`--devices cuda:0,cuda:1`).
//!
//! The rules follow llama.cpp's `-ngl`, so users keep their habits: the last `gpu_layers`
//! repeating layers go to the devices (the first layers stay on the CPU); the output head goes
//! too only when `gpu_layers` exceeds the layer count (the default, "all", does). Offloaded layers
//! are split over several devices in contiguous ranges proportional to `split` (by default each
//! device's free memory).

/// Where each part of a model lives (indices into the model's backends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Backend of each repeating layer
    pub layers: Vec<usize>,
    /// Backend of the token embedding (when it is not tied to the output head)
    pub input: usize,
    /// Backend of the final norm and the output head
    pub output: usize,
    /// Number of backends (devices + the CPU); the CPU is `n_backends - 1`
    pub n_backends: usize,
}

impl Placement {
    /// Everything on one backend (a CPU-only model: `[cpu]`).
    pub fn single(n_layer: usize) -> Placement {
        Placement { layers: vec![0; n_layer], input: 0, output: 0, n_backends: 1 }
    }

    /// Plan for `n_layer` layers over `n_devices` devices (backends `0..n_devices`, the CPU is
    /// backend `n_devices`). `gpu_layers`: how many of the last layers go to the devices (`None`
    /// or anything above `n_layer`: all of them and the output head). `split`: relative share of
    /// each device (e.g. free memory); empty means equal shares.
    pub fn plan(n_layer: usize, n_devices: usize, gpu_layers: Option<usize>, split: &[f64]) -> Placement {
        let cpu = n_devices;
        if n_devices == 0 {
            return Placement::single(n_layer);
        }
        let offload = gpu_layers.unwrap_or(usize::MAX);
        let n_off = offload.min(n_layer);
        let first_off = n_layer - n_off;
        let shares: Vec<f64> = if split.len() == n_devices && split.iter().all(|s| s.is_finite() && *s >= 0.0) {
            split.to_vec()
        } else {
            vec![1.0; n_devices]
        };
        let total: f64 = shares.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        // Cumulative boundaries: device d takes offloaded layers [bound[d-1], bound[d]).
        let mut acc = 0.0;
        let bounds: Vec<usize> = shares
            .iter()
            .map(|s| {
                acc += s;
                ((acc / total) * n_off as f64).round() as usize
            })
            .collect();
        let layers = (0..n_layer)
            .map(|il| {
                if il < first_off {
                    return cpu;
                }
                let k = il - first_off;
                bounds.iter().position(|&b| k < b).unwrap_or(n_devices - 1)
            })
            .collect::<Vec<_>>();
        let output = if offload > n_layer { n_devices - 1 } else { cpu };
        let input = layers.first().copied().unwrap_or(output);
        Placement { layers, input, output, n_backends: n_devices + 1 }
    }

    /// The backend of a weight, from its checkpoint name: `…layers.N.…` is layer N's; the token
    /// embedding is the input's (the output's when `tied`: it is the head too); anything else (final
    /// norm, head, tables shared by all layers) the output's.
    pub fn of_tensor(&self, name: &str, tied: bool) -> usize {
        if let Some(il) = layer_of(name) {
            return self.layers.get(il).copied().unwrap_or(self.output);
        }
        if (name.contains("embed_tokens") || name.contains(".embeddings.")) && !tied {
            self.input
        } else {
            self.output
        }
    }

    /// Layers on each backend.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.n_backends];
        for &b in &self.layers {
            c[b] += 1;
        }
        c
    }
}

/// The layer index in a checkpoint tensor name (`model.layers.12.mlp…` → 12).
fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_layers_on_one_gpu_by_default() {
        let p = Placement::plan(4, 1, None, &[]);
        assert_eq!(p.layers, vec![0; 4]);
        assert_eq!((p.input, p.output, p.n_backends), (0, 0, 2));
    }

    #[test]
    fn partial_offload_keeps_the_first_layers_and_the_head_on_the_cpu() {
        let p = Placement::plan(6, 1, Some(4), &[]);
        assert_eq!(p.layers, vec![1, 1, 0, 0, 0, 0]);
        assert_eq!((p.input, p.output), (1, 1));
        // Exactly n_layer: every layer, but not the head (llama.cpp's -ngl).
        let p = Placement::plan(6, 1, Some(6), &[]);
        assert_eq!(p.layers, vec![0; 6]);
        assert_eq!(p.output, 1);
        // One more: the head too.
        assert_eq!(Placement::plan(6, 1, Some(7), &[]).output, 0);
        // None offloaded.
        let p = Placement::plan(3, 1, Some(0), &[]);
        assert_eq!((p.layers, p.input, p.output), (vec![1, 1, 1], 1, 1));
    }

    #[test]
    fn layers_split_over_devices_in_proportion() {
        let p = Placement::plan(8, 2, None, &[]);
        assert_eq!(p.layers, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!((p.input, p.output), (0, 1));
        let p = Placement::plan(8, 2, None, &[3.0, 1.0]);
        assert_eq!(p.layers, vec![0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(p.counts(), vec![6, 2, 0]);
        // A zero share gets nothing; a bad split falls back to equal shares.
        assert_eq!(Placement::plan(4, 2, None, &[0.0, 5.0]).layers, vec![1; 4]);
        assert_eq!(Placement::plan(4, 2, None, &[f64::NAN, 1.0]).layers, vec![0, 0, 1, 1]);
        // Partial offload over two devices.
        assert_eq!(Placement::plan(6, 2, Some(4), &[]).layers, vec![2, 2, 0, 0, 1, 1]);
    }

    #[test]
    fn tensors_follow_their_layer() {
        let p = Placement::plan(4, 2, None, &[]);
        assert_eq!(p.of_tensor("model.layers.3.mlp.up_proj.weight", false), 1);
        assert_eq!(p.of_tensor("model.layers.0.self_attn.q_proj.weight", false), 0);
        assert_eq!(p.of_tensor("backbone.layers.2.mixer.A_log", false), 1);
        assert_eq!(p.of_tensor("model.embed_tokens.weight", false), 0);
        assert_eq!(p.of_tensor("model.embed_tokens.weight", true), 1);
        assert_eq!(p.of_tensor("lm_head.weight", false), 1);
        assert_eq!(p.of_tensor("model.norm.weight", false), 1);
    }
}
