//! Prometheus metrics of the server (`GET /metrics`), through the `prometheus` crate: request
//! counts by endpoint and status, token counters, time-to-first-token and inter-token latency
//! histograms, and gauges read from each model's engine at scrape time.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::ServedModel;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub generated_tokens: IntCounterVec,
    pub ttft: HistogramVec,
    pub itl: HistogramVec,
    pub queue: IntGauge,
    running: IntGaugeVec,
    kv_used: IntGaugeVec,
    kv_cached: IntGaugeVec,
    kv_cells: IntGaugeVec,
    prefix_hits: IntGaugeVec,
    memory: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let hist = |name: &str, help: &str, buckets: Vec<f64>| -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["model"])?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let queue = IntGauge::new("stllm_queue_length", "Requests waiting for a free slot")?;
        registry.register(Box::new(queue.clone()))?;
        Ok(Metrics {
            requests: counter("stllm_requests_total", "HTTP requests by endpoint and status", &["endpoint", "status"])?,
            prompt_tokens: counter("stllm_prompt_tokens_total", "Prompt tokens of finished requests", &["model"])?,
            generated_tokens: counter("stllm_generated_tokens_total", "Generated tokens", &["model"])?,
            ttft: hist(
                "stllm_time_to_first_token_seconds",
                "Time from a request's arrival to its first generated text",
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            )?,
            itl: hist(
                "stllm_inter_token_latency_seconds",
                "Time between two streamed pieces of a request, per token",
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
            )?,
            queue,
            running: gauge("stllm_running_sequences", "Sequences open in the engine (running requests)", &["model"])?,
            kv_used: gauge("stllm_kv_cells_used", "KV cells holding a sequence (running or cached)", &["model"])?,
            kv_cached: gauge("stllm_kv_cells_cached", "KV cells held only by cached prefixes", &["model"])?,
            kv_cells: gauge("stllm_kv_cells", "KV cells in the cache", &["model"])?,
            prefix_hits: gauge("stllm_prefix_cache_hits_total", "Prompts that reused a cached prefix", &["model"])?,
            memory: gauge("stllm_device_memory_bytes", "Memory by kind (weights, kv, compute)", &["model", "kind"])?,
            registry,
        })
    }

    /// The text exposition, with the engines' gauges read now.
    pub fn render(&self, models: &[ServedModel]) -> String {
        for m in models {
            let name = m.name.as_str();
            match m.engine_stats() {
                Some(st) => {
                    self.running.with_label_values(&[name]).set((st.sequences + st.active) as i64);
                    self.kv_used.with_label_values(&[name]).set(st.kv_cells_used as i64);
                    self.kv_cached.with_label_values(&[name]).set(st.kv_cells_cached as i64);
                    self.kv_cells.with_label_values(&[name]).set(st.kv_cells as i64);
                    self.prefix_hits.with_label_values(&[name]).set(st.prefix_hits as i64);
                    let mem = &st.memory;
                    self.memory.with_label_values(&[name, "weights"]).set(mem.weights as i64);
                    self.memory.with_label_values(&[name, "kv"]).set(mem.kv as i64);
                    self.memory.with_label_values(&[name, "compute"]).set(mem.compute as i64);
                }
                None => {
                    // The engine starts with the first request.
                    self.running.with_label_values(&[name]).set(0);
                    self.kv_used.with_label_values(&[name]).set(0);
                    self.kv_cached.with_label_values(&[name]).set(0);
                }
            }
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
