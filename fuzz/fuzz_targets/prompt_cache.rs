//! A prompt-cache file loaded into an engine of the llama-f32 fixture.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use stllm::fuzzing::{prompt_cache, Folder};
use stllm::{Engine, EngineOptions, Model, ModelOptions};

static SETUP: OnceLock<(Arc<Engine>, Folder)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (engine, folder) = SETUP.get_or_init(|| {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let model =
            Model::load(&fixtures.join("llama-f32"), &ModelOptions { threads: 1, ..Default::default() }).unwrap();
        let engine = Engine::new(Arc::new(model), EngineOptions { n_cells: 512, ..Default::default() }).unwrap();
        (Arc::new(engine), Folder::copy_of(&fixtures.join("lora/llama-a")).unwrap())
    });
    let _ = prompt_cache(engine, folder, data);
});
