//! Llama against transformers: logits and loss on fixtures from tools/gen_llama_fixtures.py (GQA
//! with Llama 3's rope scaling and a tied head; an untied head with attention biases and an
//! explicit head_dim; Mistral with a sliding window on every layer; Qwen2 with q/k/v biases and
//! a window on the layers from max_window_layers on), bf16 against the fp32 reference, the split forward/backward the ZeRO
//! engine runs against plain autograd, the engine itself on several ranks, saving and loading
//! Hugging Face directories, and config.json refusals.

mod common;

use common::decoder::{
    assert_bf16_within, assert_logits_match, assert_ranks_match_one_rank, assert_split_gradients_match, Case,
};
use common::engine::{SEQ, VOCAB};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use zerokit::interop::hf::HfError;
use zerokit::interop::hf_llama::{self, load_llama, save_llama};
use zerokit::model::{Llama, LlamaConfig, LlamaVariant, Model, RopeScaling};

const CASES: [&str; 4] = ["gqa_llama3_tied", "untied_bias", "mistral_window", "qwen2_window"];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama").join(case)
}

fn load(case: &str, kind: Kind) -> (Llama, LlamaConfig) {
    load_llama(&case_dir(case).join("model"), Device::Cpu, kind).unwrap()
}

#[test]
fn configs_read_as_transformers_wrote_them() {
    let (_, a) = load("gqa_llama3_tied", Kind::Float);
    assert_eq!((a.num_attention_heads, a.num_key_value_heads, a.head_dim), (4, 2, 16));
    assert!(a.tie_word_embeddings && !a.attention_bias);
    let scaling =
        RopeScaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 16 };
    assert_eq!(a.rope_scaling, Some(scaling));
    let (_, b) = load("untied_bias", Kind::Float);
    assert_eq!((b.num_attention_heads, b.num_key_value_heads, b.head_dim, b.hidden_size), (4, 2, 24, 64));
    assert!(!b.tie_word_embeddings && b.attention_bias && !b.mlp_bias);
    assert_eq!((b.rope_theta, b.rope_scaling), (50000.0, None));
    assert_eq!((b.model_type, b.sliding_window, b.windows()), (LlamaVariant::Llama, None, vec![None, None]));

    let (m, c) = load("mistral_window", Kind::Float);
    assert_eq!((c.model_type, c.head_dim, c.num_key_value_heads), (LlamaVariant::Mistral, 24, 2));
    assert_eq!((c.sliding_window, c.windows()), (Some(8), vec![Some(8), Some(8)]));
    assert!(!c.tie_word_embeddings && !c.attention_bias && c.layer_types.is_none());
    assert!(!m.named_parameters().iter().any(|(n, _)| n.ends_with(".bias")));
    let (q, d) = load("qwen2_window", Kind::Float);
    assert_eq!((d.model_type, d.max_window_layers), (LlamaVariant::Qwen2, Some(1)));
    assert_eq!(d.windows(), vec![None, Some(8), Some(8)]);
    assert!(d.tie_word_embeddings && d.attention_bias && !d.mlp_bias);
    // Qwen2's biases: q, k and v, not o.
    let biases: Vec<String> =
        q.named_parameters().into_iter().map(|(n, _)| n).filter(|n| n.ends_with(".bias")).collect();
    assert_eq!(biases.len(), 9, "{biases:?}");
    assert!(!biases.iter().any(|n| n.contains("o_proj")), "{biases:?}");
}

/// A fixture's config.json, parsed, with `edit` applied.
fn edited(case: &str, edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>)) -> Result<LlamaConfig, String> {
    let text = std::fs::read_to_string(case_dir(case).join("model/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(v.as_object_mut().unwrap());
    hf_llama::parse_config(&v)
}

#[test]
fn mistral_and_qwen2_keys_take_transformers_defaults() {
    use serde_json::Value;
    // MistralConfig: sliding_window absent is 4096, null is none; num_key_value_heads absent is 8.
    let c = edited("mistral_window", |o| drop(o.remove("sliding_window"))).unwrap();
    assert_eq!(c.windows(), vec![Some(4096); 2]);
    let c = edited("mistral_window", |o| drop(o.insert("sliding_window".into(), Value::Null))).unwrap();
    assert_eq!(c.windows(), vec![None; 2]);
    let c = edited("mistral_window", |o| drop(o.remove("num_key_value_heads"))).unwrap();
    assert_eq!(c.num_key_value_heads, 8);
    // No head_dim: hidden_size / heads.
    let c = edited("mistral_window", |o| drop(o.remove("head_dim"))).unwrap();
    assert_eq!(c.head_dim, 16);
    // Qwen2Config: without layer_types, the window on the layers from max_window_layers on (28 by
    // default), and on none unless use_sliding_window.
    let c = edited("qwen2_window", |o| drop(o.remove("layer_types"))).unwrap();
    assert_eq!(c.windows(), vec![None, Some(8), Some(8)]);
    let c = edited("qwen2_window", |o| {
        o.remove("layer_types");
        o.insert("max_window_layers".into(), 2.into());
    })
    .unwrap();
    assert_eq!(c.windows(), vec![None, None, Some(8)]);
    let c = edited("qwen2_window", |o| {
        o.remove("layer_types");
        o.remove("max_window_layers");
    })
    .unwrap();
    assert_eq!(c.windows(), vec![None; 3]);
    for drop_types in [false, true] {
        let c = edited("qwen2_window", |o| {
            if drop_types {
                o.remove("layer_types");
            }
            o.insert("use_sliding_window".into(), false.into());
        })
        .unwrap();
        assert_eq!((c.sliding_window, c.windows()), (None, vec![None; 3]), "layer_types dropped: {drop_types}");
    }
    // Biases are the class's, whatever config.json says.
    let c = edited("qwen2_window", |o| drop(o.insert("attention_bias".into(), false.into()))).unwrap();
    assert!(c.attention_bias);
}

#[test]
fn mistral_and_qwen2_configs_are_written_back_as_their_class() {
    for (case, class) in [("mistral_window", "MistralForCausalLM"), ("qwen2_window", "Qwen2ForCausalLM")] {
        let (_, cfg) = load(case, Kind::Float);
        let v: serde_json::Value = serde_json::from_str(&hf_llama::config_json(&cfg, Kind::Float)).unwrap();
        assert_eq!(v["architectures"], serde_json::json!([class]), "{case}");
        assert_eq!(hf_llama::parse_config(&v).unwrap(), cfg, "{case}");
        // Neither class has these keys: their biases are fixed.
        assert!(v.get("attention_bias").is_none() && v.get("mlp_bias").is_none(), "{v}");
    }
}

#[test]
fn logits_and_loss_match_transformers_fp32() {
    for case in CASES {
        assert_logits_match(&Case::new("llama", case), &load(case, Kind::Float).0);
    }
}

#[test]
fn bf16_matches_transformers_bf16_and_tracks_the_fp32_reference() {
    for case in CASES {
        // Against transformers in bf16: the same operations in the same kinds (the norm in fp32,
        // rope tables cast to bf16), so the logits agree to bf16's rounding of the final values.
        // Measured: 0 (bit-identical on CPU). The bound, one bf16 ulp at the logits' largest
        // magnitude (2^-7 relative), leaves room for another kernel's order of summation only.
        // Against the fp32 reference: bf16 keeps 8 bits of mantissa (2^-9 = 2e-3 relative per
        // rounding); through two layers of projections, attention and SwiGLU the errors add up to
        // about 1e-2 of the logits' largest value (measured 9.4e-3 and 1.25e-2 for Llama, 1.71e-2
        // for Mistral, 1.98e-2 for Qwen2's three layers). The bound, 4e-2, leaves a factor of 2 or
        // more; a wrong kind somewhere costs far more, or far less precision.
        assert_bf16_within(&Case::new("llama", case), &load(case, Kind::BFloat16).0, 1.0 / 128.0, 4e-2);
    }
}

#[test]
fn split_forward_and_blockwise_backward_give_the_plain_gradients() {
    for case in CASES {
        assert_split_gradients_match(&Case::new("llama", case), &load(case, Kind::Float).0);
    }
}

/// A small Llama for the engine: vocab and sequence of the shared harness; tied with Llama 3's
/// rope scaling, or untied with attention and MLP biases.
fn small(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: VOCAB as usize,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        max_position_embeddings: SEQ as usize,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: tied.then_some(RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 4,
        }),
        tie_word_embeddings: tied,
        attention_bias: !tied,
        mlp_bias: !tied,
        initializer_range: 0.2,
        pad_token_id: None,
        model_type: LlamaVariant::Llama,
        sliding_window: None,
        layer_types: None,
        max_window_layers: None,
    }
}

/// A small Qwen2 for the engine: q/k/v biases without o_proj's, a window of 3 (shorter than the
/// harness's sequence) on the second layer only, tied.
fn small_qwen2() -> LlamaConfig {
    use zerokit::model::LayerType;
    LlamaConfig {
        rope_scaling: None,
        attention_bias: true,
        mlp_bias: false,
        model_type: LlamaVariant::Qwen2,
        sliding_window: Some(3),
        layer_types: Some(vec![LayerType::Full, LayerType::Sliding]),
        max_window_layers: Some(1),
        ..small(true)
    }
}

#[test]
fn n_ranks_at_stages_1_to_3_match_one_rank_with_and_without_recomputation() {
    for (name, cfg) in [("tied", small(true)), ("untied", small(false)), ("qwen2", small_qwen2())] {
        // The last runs recompute each block in backward (activation checkpointing).
        let runs = [
            (1u8, 2usize, false),
            (1, 3, false),
            (2, 2, false),
            (2, 3, false),
            (2, 2, true),
            (3, 2, true),
            (3, 3, false),
        ];
        assert_ranks_match_one_rank(name, || Llama::new(&cfg, Device::Cpu, Kind::Float, 7).unwrap(), &runs);
    }
}

#[test]
fn saved_directories_load_back_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let (model, cfg) = load(case, Kind::Float);
        let dir = tmp.path().join(case);
        save_llama(&model, &dir, false).unwrap();
        let (back, back_cfg) = load_llama(&dir, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(back_cfg, cfg, "{case}");
        for ((n, a), (m, b)) in model.named_parameters().iter().zip(back.named_parameters()) {
            assert_eq!(n, &m);
            assert!(a.equal(&b), "{case}: {n} changed");
        }
        // A tied head is stored once, as the embedding, as transformers stores it.
        let stored = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
        let has_head = stored.iter().any(|(n, _)| n == "lm_head.weight");
        assert_eq!(has_head, !cfg.tie_word_embeddings, "{case}");
    }
}

/// Writes the gqa case's config.json with `edit` applied into `dir`; returns the file and the
/// error reading it gives.
fn refusal(dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> (PathBuf, String) {
    let text = std::fs::read_to_string(case_dir("gqa_llama3_tied").join("model/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string(&v).unwrap()).unwrap();
    let err = hf_llama::read_config(dir).unwrap_err();
    assert!(matches!(err, HfError::Config { .. }), "{err}");
    (dir.join("config.json"), err.to_string())
}

/// A change to a config.json.
type Edit = dyn Fn(&mut serde_json::Value);

#[test]
fn configs_that_change_the_arithmetic_are_refused_by_file_and_key() {
    let cases: [(&str, Box<Edit>); 7] = [
        ("rope_parameters.rope_type", Box::new(|v| v["rope_parameters"]["rope_type"] = "yarn".into())),
        (
            "rope_scaling.rope_type",
            Box::new(|v| {
                let o = v.as_object_mut().unwrap();
                o.remove("rope_parameters");
                o.insert("rope_theta".into(), 10000.0.into());
                o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "dynamic", "factor": 2.0}));
            }),
        ),
        ("hidden_act", Box::new(|v| v["hidden_act"] = "gelu".into())),
        ("sliding_window", Box::new(|v| v["sliding_window"] = 4096.into())),
        ("use_sliding_window", Box::new(|v| v["use_sliding_window"] = true.into())),
        (
            "rope_parameters.factor",
            Box::new(|v| v["rope_parameters"].as_object_mut().unwrap().remove("factor").map(drop).unwrap()),
        ),
        ("num_key_value_heads", Box::new(|v| v["num_key_value_heads"] = 3.into())),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, (key, edit)) in cases.into_iter().enumerate() {
        let (file, err) = refusal(&tmp.path().join(i.to_string()), edit);
        assert!(err.contains(&file.display().to_string()), "{key}: the error names the file: {err}");
        assert!(err.contains(key), "the error names {key}: {err}");
    }
}

#[test]
fn mistral_and_qwen2_configs_that_transformers_would_not_build_are_refused() {
    let cases: [(&str, &str, Box<Edit>); 4] = [
        (
            "mistral_window",
            "layer_types",
            Box::new(|v| v["layer_types"] = serde_json::json!(["full_attention", "full_attention"])),
        ),
        ("qwen2_window", "layer_types", Box::new(|v| drop(v["layer_types"].as_array_mut().unwrap().pop()))),
        ("qwen2_window", "layer_types", Box::new(|v| v["layer_types"][1] = "chunked_attention".into())),
        ("qwen2_window", "sliding_window", Box::new(|v| v["sliding_window"] = 0.into())),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, (case, key, edit)) in cases.into_iter().enumerate() {
        let text = std::fs::read_to_string(case_dir(case).join("model/config.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut v);
        let dir = tmp.path().join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), serde_json::to_string(&v).unwrap()).unwrap();
        let err = zerokit::interop::hf_model::read_config(&dir).unwrap_err().to_string();
        assert!(err.contains(&dir.join("config.json").display().to_string()), "{case} {key}: {err}");
        assert!(err.contains(key), "{case}: the error names {key}: {err}");
    }
}

#[test]
fn older_rope_scaling_configs_read_like_rope_parameters() {
    let text = std::fs::read_to_string(case_dir("gqa_llama3_tied").join("model/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let o = v.as_object_mut().unwrap();
    let mut rope = o.remove("rope_parameters").unwrap();
    let theta = rope.as_object_mut().unwrap().remove("rope_theta").unwrap();
    o.insert("rope_theta".into(), theta);
    o.insert("rope_scaling".into(), rope);
    let old = hf_llama::parse_config(&v).unwrap();
    assert_eq!(old, load("gqa_llama3_tied", Kind::Float).1);
}
