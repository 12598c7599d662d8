//! `adapter_config.json` of a PEFT folder (a copy of tests/fixtures/lora/llama-a), loaded for
//! the llama-f32 fixture.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stllm::fuzzing::{adapter_config, Folder};
use stllm::{Model, ModelOptions};

static SETUP: OnceLock<(Model, Folder)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (model, folder) = SETUP.get_or_init(|| {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let model =
            Model::load(&fixtures.join("llama-f32"), &ModelOptions { threads: 1, ..Default::default() }).unwrap();
        (model, Folder::copy_of(&fixtures.join("lora/llama-a")).unwrap())
    });
    let _ = adapter_config(model, folder, data);
});
