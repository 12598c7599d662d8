//! `stllm op-check --json` on the CPU: every op × dtype case the models use passes against the
//! f64 reference, and the table covers every op the graphs are built from.

use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn op_check_passes_on_the_cpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_stllm")).args(["op-check", "--json"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}): {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    assert_eq!(v["backend"], "CPU");
    let cases = v["cases"].as_array().expect("cases");
    let failed: Vec<String> = cases
        .iter()
        .filter(|c| c["status"] != "pass")
        .map(|c| format!("{} {}: {} (rel {}, tol {})", c["op"], c["case"], c["status"], c["max_rel"], c["tol"]))
        .collect();
    assert!(failed.is_empty(), "failing op checks:\n{}", failed.join("\n"));
    assert!(out.status.success(), "stllm op-check failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(v["failed"], 0);
    assert_eq!(v["passed"].as_u64(), Some(cases.len() as u64));
    for c in cases {
        let rel = c["max_rel"].as_f64().expect("the CPU ran every case");
        assert!(rel <= c["tol"].as_f64().unwrap(), "{c}");
    }

    let ops: BTreeSet<&str> = cases.iter().map(|c| c["op"].as_str().unwrap()).collect();
    let expected = [
        "mul_mat",
        "get_rows",
        "rms_norm",
        "mul",
        "add",
        "scale",
        "silu",
        "swiglu_split",
        "soft_max_ext",
        "rope_ext",
        "flash_attn_ext",
        "set_rows",
        "cpy",
        "concat",
        "cont",
        "mul_mat_id",
        "argsort_top_k",
        "sum_rows+div",
        "sigmoid",
    ];
    for op in expected {
        assert!(ops.contains(op), "no {op} case in {ops:?}");
    }
    // Every weight / cache type of the models, where the op takes it.
    let has = |op: &str, what: &str| cases.iter().any(|c| c["op"] == op && c["case"].as_str().unwrap().contains(what));
    for t in ["w f32", "w f16", "w bf16", "w q8_0", "w q4_0"] {
        assert!(has("mul_mat", t), "mul_mat {t}");
    }
    for t in ["experts f32", "experts bf16", "experts q8_0"] {
        assert!(has("mul_mat_id", t), "mul_mat_id {t}");
    }
    for t in ["k/v f16", "k/v bf16", "k/v q8_0", "k/v q4_0"] {
        assert!(has("flash_attn_ext", t), "flash_attn_ext {t}");
    }
    for t in ["into f16", "into bf16", "into q8_0", "into q4_0"] {
        assert!(has("set_rows", t), "set_rows {t}");
    }
    for t in ["table f32", "table f16", "table bf16"] {
        assert!(has("get_rows", t), "get_rows {t}");
    }
    assert!(has("rope_ext", "neox") && has("rope_ext", "normal") && has("rope_ext", "freq_factors"));
}
