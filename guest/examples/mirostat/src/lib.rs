//! A sampler plug-in for stllm: Mirostat 2.0 (Basu et al., 2020), which steers the surprise
//! (-log2 p) of sampled tokens towards a target `tau` by adapting a truncation threshold `mu`.
//!
//! Build: `cargo rustc --release --target wasm32-wasip2 --crate-type cdylib -p stllm-sampler-mirostat`
//! (the host's build script does this); run: `stllm run --model DIR --prompt "..." --sampler mirostat.wasm`.
//! Settings come from the environment-free defaults below; the instance keeps `mu` across the
//! tokens of one request (the host makes a fresh instance per request).

use std::cell::Cell;

wit_bindgen::generate!({
    world: "sampler-component",
    path: "../../../wit",
});

use exports::stllm::inference::sampler::Guest;
use stllm::inference::types::Candidate;

const TAU: f32 = 5.0;
const ETA: f32 = 0.1;

thread_local! {
    static MU: Cell<f32> = const { Cell::new(2.0 * TAU) };
    static RNG: Cell<u64> = const { Cell::new(0x5eed) };
}

fn next_f32() -> f32 {
    RNG.with(|r| {
        let mut z = r.get().wrapping_add(0x9e3779b97f4a7c15);
        r.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    })
}

struct Mirostat;

impl Guest for Mirostat {
    fn sample(candidates: Vec<Candidate>, _history: Vec<u32>) -> u32 {
        if candidates.is_empty() {
            return 0;
        }
        let max = candidates.iter().map(|c| c.logit).fold(f32::NEG_INFINITY, f32::max);
        let mut p: Vec<(u32, f32)> = candidates.iter().map(|c| (c.id, (c.logit - max).exp())).collect();
        let z: f32 = p.iter().map(|x| x.1).sum();
        p.iter_mut().for_each(|x| x.1 /= z);
        p.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mu = MU.with(Cell::get);
        // Keep tokens whose surprise is below mu (always at least the most likely one).
        let keep = p.iter().take_while(|x| -x.1.log2() <= mu).count().max(1);
        p.truncate(keep);
        let z: f32 = p.iter().map(|x| x.1).sum();
        let r = next_f32() * z;
        let mut acc = 0.0;
        let mut chosen = p[p.len() - 1];
        for x in &p {
            acc += x.1;
            if r < acc {
                chosen = *x;
                break;
            }
        }
        let surprise = -(chosen.1 / z).log2();
        MU.with(|m| m.set(mu - ETA * (surprise - TAU)));
        chosen.0
    }
}

export!(Mirostat);
