//! Embedding stllm's `engine` interface in your own wasmtime host, next to WASI, and running the
//! default policy component against a model folder.
//!
//! `cargo run --release --example embed_policy -- tests/fixtures/llama-f32 "Hello world"`

use std::sync::Arc;

use stllm::runtime::bindings::policy::exports::stllm::inference::policy::{GenerateRequest, Prompt, Sampling};
use stllm::runtime::bindings::policy::PolicyComponent;
use stllm::runtime::{EngineHost, EngineView, ModelHandle, DEFAULT_POLICY};
use wasmtime::component::{Component, Linker, Resource, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Your store data: WASI, a resource table, and the model the guest serves.
struct MyState {
    wasi: WasiCtx,
    table: ResourceTable,
    model: Arc<ModelHandle>,
}

impl WasiView for MyState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl EngineView for MyState {
    fn engine_host(&mut self) -> EngineHost<'_> {
        EngineHost {
            table: &mut self.table,
            handle: &self.model,
            last_return: None,
            plugin: None,
            plugin_error: None,
            opened: None,
        }
    }
}

fn main() -> wasmtime::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "tests/fixtures/llama-f32".into()));
    let prompt = args.next().unwrap_or_else(|| "Hello world".into());

    let model = Arc::new(stllm::Model::load(&dir, &stllm::ModelOptions::default())?);
    let handle = Arc::new(ModelHandle::from_dir(&dir, Some(model))?);

    let engine = Engine::new(&Config::new())?;
    let mut linker: Linker<MyState> = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    stllm::runtime::add_to_linker(&mut linker)?;
    let component = Component::new(&engine, DEFAULT_POLICY)?;

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let state =
            MyState { wasi: WasiCtx::builder().inherit_stderr().build(), table: ResourceTable::new(), model: handle };
        let mut store = Store::new(&engine, state);
        let policy = PolicyComponent::instantiate_async(&mut store, &component, &linker).await?;
        let sink = store.data_mut().table.push(stllm::runtime::SinkRes {
            on_text: Box::new(|c: stllm::runtime::Chunk<'_>| {
                print!("{}", c.text);
                true
            }),
            cancel: Default::default(),
        })?;
        let req = GenerateRequest {
            prompt: Prompt::Text(prompt),
            tools_json: None,
            max_tokens: 16,
            stop: vec![],
            ignore_eos: false,
            sampling: Sampling::default(), // greedy
            adapters: None,
            logprobs: None,
            parse_tool_calls: false,
        };
        let rep = sink.rep();
        let out = policy.stllm_inference_policy().call_generate(&mut store, &req, Resource::new_borrow(rep)).await?;
        println!();
        match out {
            Ok(r) => eprintln!("{} tokens, finish {:?}", r.tokens.len(), r.finish),
            Err(e) => eprintln!("guest error: {e:?}"),
        }
        Ok::<(), wasmtime::Error>(())
    })
}
