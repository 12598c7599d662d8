//! Operations on an engine's caller-driven sequences (what guests' `sequence` resources do);
//! a broken invariant (an engine that does not come back, a leaked sequence) is a crash.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use stllm::fuzzing::{engine_ops, ops_engine};
use stllm::{Engine, Model, ModelOptions};

static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let engine = ENGINE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-f32");
        let model = Model::load(&dir, &ModelOptions { threads: 1, ..Default::default() }).unwrap();
        ops_engine(Arc::new(model)).unwrap()
    });
    if let Err(broken) = engine_ops(engine, data) {
        panic!("engine invariant broken: {broken}");
    }
});
