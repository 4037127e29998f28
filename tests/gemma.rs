//! Gemma 2 and Gemma 3 against transformers: logits and loss on fixtures from
//! tools/gen_gemma_fixtures.py (Gemma 2 with attention and final soft-capping; Gemma 3 with
//! QK-norm, per-layer-type rope and a sharded directory; both with GQA and a sliding window
//! shorter than the sequence), bf16 against transformers' bf16 and the fp32 reference, the split
//! forward/backward the ZeRO engine runs (the soft-capped head's hand-written backward included)
//! against plain autograd, the engine on several ranks at every stage, saving and loading
//! Hugging Face directories, config.json refusals, `ckpt estimate` on the presets, and the round
//! trip a user makes: a transformers directory through `train` (init_from), zero-to-fp32 and back
//! into transformers.

mod common;

use common::decoder::{
    assert_bf16_within, assert_logits_match, assert_ranks_match_one_rank, assert_split_gradients_match, round_trip,
    Case,
};
use common::engine::{SEQ, VOCAB};
use common::tiny;
use common::tool;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use zerokit::interop::hf::HfError;
use zerokit::interop::hf_gemma::{self, load_gemma, save_gemma};
use zerokit::interop::hf_model;
use zerokit::model::{Gemma, GemmaConfig, GemmaVersion, LayerType, Model};

const CASES: [&str; 2] = ["gemma2_softcap", "gemma3_qk_norm"];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma").join(case)
}

fn load(case: &str, kind: Kind) -> (Gemma, GemmaConfig) {
    load_gemma(&case_dir(case).join("model"), Device::Cpu, kind).unwrap()
}

#[test]
fn configs_read_as_transformers_wrote_them() {
    use LayerType::{Full, Sliding};
    let (_, a) = load("gemma2_softcap", Kind::Float);
    assert_eq!(a.model_type, GemmaVersion::Gemma2);
    assert_eq!((a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.query_pre_attn_scalar), (4, 2, 16, 24));
    assert_eq!((a.attn_logit_softcapping, a.final_logit_softcapping), (Some(8.0), Some(5.0)));
    assert_eq!((a.sliding_window, a.layer_types.as_slice()), (8, [Sliding, Full, Sliding].as_slice()));
    assert!(a.tie_word_embeddings && a.pad_token_id.is_none());
    let (_, b) = load("gemma3_qk_norm", Kind::Float);
    assert_eq!(b.model_type, GemmaVersion::Gemma3);
    assert_eq!(b.layer_types, [Sliding, Sliding, Full, Sliding]);
    assert_eq!((b.rope_theta, b.rope_local_base_freq, b.rope_scaling_factor), (1e6, 10000.0, Some(4.0)));
    assert_eq!((b.attn_logit_softcapping, b.final_logit_softcapping), (None, None));
}

#[test]
fn logits_and_loss_match_transformers_fp32() {
    // Both cases' local layers have a window of 8 in a 32-token batch; the 7-token prefix is
    // shorter than it (no mask at all).
    for case in CASES {
        assert_logits_match(&Case::new("gemma", case), &load(case, Kind::Float).0);
    }
}

#[test]
fn bf16_matches_transformers_bf16_and_tracks_the_fp32_reference() {
    for case in CASES {
        // Against transformers in bf16: the same operations in the same kinds (the norms in fp32,
        // sqrt(hidden) rounded to bf16 before it scales the embedding, soft-caps, scores and rope
        // in bf16, the softmax in fp32), so the logits agree to bf16's rounding of the final
        // values. Measured: 0 (bit-identical on CPU). The bound, one bf16 ulp at the logits'
        // largest magnitude (2^-7 relative), leaves room for another kernel's order of summation.
        // Against the fp32 reference: bf16's 8-bit mantissa through three or four layers of four
        // norms, attention and GeGLU (measured 1.84e-2 for Gemma 2, 1.49e-2 for Gemma 3). The
        // bound, 5e-2, leaves a factor of 2.7; a wrong kind costs far more, or far less precision.
        assert_bf16_within(&Case::new("gemma", case), &load(case, Kind::BFloat16).0, 1.0 / 128.0, 5e-2);
    }
}

#[test]
fn split_forward_and_blockwise_backward_give_the_plain_gradients() {
    // The plain backward goes through autograd's tanh; the split one through the head's
    // hand-written soft-cap derivative (Gemma 2).
    for case in CASES {
        assert_split_gradients_match(&Case::new("gemma", case), &load(case, Kind::Float).0);
    }
}

/// A small Gemma for the engine: vocab and sequence of the shared harness, a window of 3 (shorter
/// than the harness's 8 tokens); Gemma 2 with both soft-caps, or Gemma 3 with QK-norm and two
/// rope bases.
fn small(version: GemmaVersion) -> GemmaConfig {
    let gemma2 = version == GemmaVersion::Gemma2;
    GemmaConfig {
        model_type: version,
        vocab_size: VOCAB as usize,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        max_position_embeddings: SEQ as usize,
        rms_norm_eps: 1e-6,
        rope_theta: if gemma2 { 10000.0 } else { 1e6 },
        rope_local_base_freq: 10000.0,
        rope_scaling_factor: (!gemma2).then_some(2.0),
        query_pre_attn_scalar: 8,
        sliding_window: 3,
        layer_types: LayerType::pattern(2, 2),
        attn_logit_softcapping: gemma2.then_some(2.0),
        final_logit_softcapping: gemma2.then_some(3.0),
        tie_word_embeddings: true,
        attention_bias: false,
        initializer_range: 0.2,
        pad_token_id: None,
    }
}

#[test]
fn n_ranks_at_stages_0_to_3_match_one_rank_with_and_without_recomputation() {
    for version in [GemmaVersion::Gemma2, GemmaVersion::Gemma3] {
        let cfg = small(version);
        let runs = [(0u8, 2usize, false), (1, 3, false), (2, 2, false), (2, 2, true), (3, 2, true), (3, 3, false)];
        assert_ranks_match_one_rank(
            &format!("{version:?}"),
            || Gemma::new(&cfg, Device::Cpu, Kind::Float, 7).unwrap(),
            &runs,
        );
    }
}

#[test]
fn saved_directories_load_back_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let (model, cfg) = load(case, Kind::Float);
        let dir = tmp.path().join(case);
        save_gemma(&model, &dir, false).unwrap();
        let (back, back_cfg) = load_gemma(&dir, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(back_cfg, cfg, "{case}");
        for ((n, a), (m, b)) in model.named_parameters().iter().zip(back.named_parameters()) {
            assert_eq!(n, &m);
            assert!(a.equal(&b), "{case}: {n} changed");
        }
        let stored = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
        assert!(!stored.iter().any(|(n, _)| n == "lm_head.weight"), "{case}: a tied head is stored once");
    }
}

/// A change to a config.json.
type Edit = dyn Fn(&mut serde_json::Value);

#[test]
fn configs_that_change_the_arithmetic_are_refused_by_file_and_key() {
    let cases: [(&str, &str, Box<Edit>); 7] = [
        ("gemma2_softcap", "hidden_activation", Box::new(|v| v["hidden_activation"] = "gelu".into())),
        (
            "gemma2_softcap",
            "rope_parameters.rope_type",
            Box::new(|v| v["rope_parameters"]["rope_type"] = "linear".into()),
        ),
        ("gemma2_softcap", "layer_types", Box::new(|v| v["layer_types"][0] = "chunked_attention".into())),
        ("gemma2_softcap", "sliding_window", Box::new(|v| v["sliding_window"] = serde_json::Value::Null)),
        (
            "gemma3_qk_norm",
            "rope_parameters.sliding_attention.rope_type",
            Box::new(|v| v["rope_parameters"]["sliding_attention"]["rope_type"] = "yarn".into()),
        ),
        ("gemma3_qk_norm", "use_bidirectional_attention", Box::new(|v| v["use_bidirectional_attention"] = true.into())),
        ("gemma3_qk_norm", "layer_types", Box::new(|v| drop(v["layer_types"].as_array_mut().unwrap().pop()))),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, (case, key, edit)) in cases.into_iter().enumerate() {
        let text = std::fs::read_to_string(case_dir(case).join("model/config.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut v);
        let dir = tmp.path().join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), serde_json::to_string(&v).unwrap()).unwrap();
        // Through the dispatch by model_type, as `train` and the tools read a directory.
        let err = hf_model::read_config(&dir).unwrap_err();
        assert!(matches!(err, HfError::Config { .. }), "{err}");
        let err = err.to_string();
        assert!(err.contains(&dir.join("config.json").display().to_string()), "{key}: the error names the file: {err}");
        assert!(err.contains(key), "the error names {key}: {err}");
    }
}

#[test]
fn older_configs_read_like_transformers_5s() {
    // Gemma 3 before rope_parameters: rope_theta, rope_local_base_freq, rope_scaling and
    // sliding_window_pattern instead of layer_types.
    let text = std::fs::read_to_string(case_dir("gemma3_qk_norm").join("model/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("rope_parameters");
    o.remove("layer_types");
    o.insert("rope_theta".into(), 1e6.into());
    o.insert("rope_local_base_freq".into(), 10000.0.into());
    o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": 4.0}));
    assert_eq!(hf_gemma::parse_config(&v).unwrap(), load("gemma3_qk_norm", Kind::Float).1);
}

#[test]
fn ckpt_estimate_knows_the_gemma_presets() {
    for (name, what) in [("gemma-3-27b", "Gemma (gemma3_text), 62 layers"), ("gemma-2-2b", "Gemma (gemma2), 26 layers")]
    {
        let (ok, text) = tool(env!("CARGO_BIN_EXE_ckpt"), &["estimate", "--model", name]);
        assert!(ok && text.contains(what), "ckpt estimate --model {name}: {text}");
    }
}

#[test]
fn a_transformers_gemma_directory_round_trips_through_train_and_zero_to_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny::dataset(&data);
    tch::manual_seed(0);
    // 16 tokens, as the training sequences: longer than the fixtures' window of 8.
    let tokens = Tensor::randint_low(0, tiny::VOCAB as i64, [3, 16], (Kind::Int64, Device::Cpu));
    // Gemma 2 (soft-capped) from one file, Gemma 3 (QK-norm) from seven shards with an index.
    for case in CASES {
        let keys = "max_iters = 4\neval_interval = 4\nzero_stage = 2\nbatch_size = 2";
        round_trip(&case_dir(case).join("model"), &tmp.path().join(case), &data, keys, &tokens, &[]);
    }
}

#[test]
fn a_gemma_preset_trains_and_its_checkpoints_go_through_the_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny::dataset(&data);
    let keys = "model = \"gemma-tiny\"\nmax_iters = 30\nbatch_size = 6\neval_interval = 10\nzero_stage = 2";
    let run = tiny::train(&tmp.path().join("run"), &data, 2, keys, &[]);
    assert!(run.ok, "train: {}", run.stderr);
    let (first, last) = (run.losses[0].1, run.losses.last().unwrap().1);
    assert!(last < first - 0.5, "gemma-tiny did not learn: loss {first} -> {last}");
    assert!(run.stderr.contains("Gemma (gemma3_text), 4 layers (2 local with window 64)"), "{}", run.stderr);
    let manifest = common::manifest(&run.out.join("final"));
    assert_eq!(manifest["model_config"]["family"], "gemma", "{}", manifest["model_config"]);
    let root = run.out.to_str().unwrap();
    let (ok, text) = tool(env!("CARGO_BIN_EXE_ckpt"), &["verify", root]);
    assert!(ok, "ckpt verify: {text}");
    let (ok, text) = tool(env!("CARGO_BIN_EXE_ckpt"), &["inspect", root]);
    assert!(ok && text.contains("family gemma"), "ckpt inspect: {text}");
    let (ok, text) = tool(env!("CARGO_BIN_EXE_ckpt"), &["estimate", "--model", root]);
    assert!(ok && text.contains("Gemma (gemma3_text), 4 layers") && text.contains("sequence 16"), "{text}");
    // "!" is GPT-2's token 0, inside the run's 96-token vocabulary.
    let args = ["sample", root, "--prompt", "!", "--tokens", "8", "--device", "cpu"];
    let (ok, text) = tool(env!("CARGO_BIN_EXE_train"), &args);
    assert!(ok, "train sample: {text}");
}
