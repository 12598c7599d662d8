//! `config.json` of a model folder (a copy of tests/fixtures/llama-f32), loaded as a model.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stllm::fuzzing::{model_file, Folder};

static FOLDER: OnceLock<Folder> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let folder = FOLDER.get_or_init(|| {
        Folder::copy_of(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-f32")).unwrap()
    });
    let _ = model_file(folder, "config.json", data);
});
