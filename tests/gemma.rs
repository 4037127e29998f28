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

use common::engine::{assert_close, assert_weights_close, engine_config, ranks, train, weights, SEQ, VOCAB};
use common::tiny;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};
use zerokit::convert;
use zerokit::interop::hf::HfError;
use zerokit::interop::hf_gemma::{self, load_gemma, save_gemma};
use zerokit::interop::hf_model;
use zerokit::model::{self, Gemma, GemmaConfig, GemmaVersion, LayerType, Model};
use zerokit::zero::{Engine, EngineConfig};

const CASES: [&str; 2] = ["gemma2_softcap", "gemma3_qk_norm"];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma").join(case)
}

fn batch(case: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(case_dir(case).join("batch.safetensors")).unwrap().into_iter().collect()
}

fn expected_loss(case: &str) -> f64 {
    let text = std::fs::read_to_string(case_dir(case).join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["loss"].as_f64().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
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
    for case in CASES {
        let (model, _) = load(case, Kind::Float);
        let batch = batch(case);
        let logits = tch::no_grad(|| model.forward(&batch["tokens"]));
        let d = max_abs_diff(&logits, &batch["logits"]);
        eprintln!("{case}: fp32 max |logits - transformers| = {d:.2e}");
        assert!(d < 1e-4, "{case}: max |logits - transformers| = {d}");
        // Shorter than the window: the local layers need no mask.
        let short = tch::no_grad(|| model.forward(&batch["tokens"].narrow(1, 0, 7)));
        let d = max_abs_diff(&short, &batch["logits_prefix7"]);
        assert!(d < 1e-4, "{case}: prefix: max |logits - transformers| = {d}");
        let loss = model::loss(&logits, &batch["targets"]).double_value(&[]);
        assert!((loss - expected_loss(case)).abs() < 1e-5, "{case}: loss {loss} vs {}", expected_loss(case));
        let eval = model.eval_loss(&batch["tokens"], &batch["targets"]).double_value(&[]);
        assert!((eval - expected_loss(case)).abs() < 1e-5, "{case}: eval_loss {eval}");
    }
}

#[test]
fn bf16_matches_transformers_bf16_and_tracks_the_fp32_reference() {
    for case in CASES {
        let batch = batch(case);
        let (model, _) = load(case, Kind::BFloat16);
        assert!(model.named_parameters().iter().all(|(_, p)| p.kind() == Kind::BFloat16));
        let logits = tch::no_grad(|| model.forward(&batch["tokens"]));
        assert_eq!(logits.kind(), Kind::BFloat16);
        // Against transformers in bf16: the same operations in the same kinds (the norms in fp32,
        // sqrt(hidden) rounded to bf16 before it scales the embedding, the soft-caps and rope in
        // bf16), so the logits agree to bf16's rounding of the final values, up to the order of
        // summation of another kernel (Gemma 3's attention: libtorch's SDPA here and there, but
        // with enable_gqa here and repeated key/value heads in transformers). The bound is two
        // bf16 ulps at the logits' largest magnitude (2^-6 relative).
        let scale = batch["logits"].abs().max().double_value(&[]);
        let d = max_abs_diff(&logits, &batch["logits_bf16"]) / scale;
        eprintln!("{case}: bf16 relative max |logits - transformers bf16| = {d:.2e}");
        assert!(d <= 1.0 / 64.0, "{case}: bf16 relative max |logits - transformers bf16| = {d}");
        // Against the fp32 reference: bf16 keeps 8 bits of mantissa (2^-9 relative per rounding);
        // through three or four layers with four norms each, attention and GeGLU the errors add
        // up to a few 1e-2 of the logits' largest value. The bound, 8e-2, leaves room for that,
        // while a wrong kind somewhere costs far more, or far less precision.
        let d = max_abs_diff(&logits, &batch["logits"]) / scale;
        eprintln!("{case}: bf16 relative max |logits - fp32 reference| = {d:.2e}");
        assert!(d < 8e-2, "{case}: bf16 relative max |logits - fp32 reference| = {d}");
        let loss = model::loss(&logits, &batch["targets"]);
        assert_eq!(loss.kind(), Kind::Float);
        let l = loss.double_value(&[]);
        assert!((l - expected_loss(case)).abs() < 4e-2 * expected_loss(case), "{case}: bf16 loss {l}");
    }
}

#[test]
fn split_forward_and_blockwise_backward_give_the_plain_gradients() {
    for case in CASES {
        let (model, _) = load(case, Kind::Float);
        let batch = batch(case);
        let (idx, targets) = (&batch["tokens"], &batch["targets"]);
        let params = model.named_parameters();

        // Plain: one forward, one backward (autograd through the soft-cap's tanh).
        let plain_loss = model::loss(&model.forward(idx), targets);
        let all: Vec<&Tensor> = params.iter().map(|(_, p)| p).collect();
        let plain = Tensor::run_backward(&[&plain_loss], &all, false, false);

        // Split, as the engine runs it: the head's backward written out, soft-cap included.
        let mut split_loss = None;
        let split = common::split_gradients(&model, &params, idx, |x| {
            let head = model.head_backward(x, targets, 1.0).unwrap();
            split_loss = Some(head.loss.double_value(&[]));
            (head.params, head.input)
        });
        let l = split_loss.unwrap();
        assert!((l - plain_loss.double_value(&[])).abs() < 1e-6, "{case}: split loss {l} vs {plain_loss}");
        for ((name, _), (want, got)) in params.iter().zip(plain.iter().zip(&split)) {
            let got = got.as_ref().unwrap_or_else(|| panic!("{case}: no split gradient for {name}"));
            let d = max_abs_diff(want, got);
            let scale = want.abs().max().double_value(&[]).max(1e-6);
            assert!(d <= 1e-5 * scale, "{case}: {name}: split gradient differs by {d} (scale {scale})");
        }
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

const STEPS: std::ops::Range<u64> = 0..20;
const ENGINE_LR: f64 = 1e-2;

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

#[test]
fn n_ranks_at_stages_0_to_3_match_one_rank_with_and_without_recomputation() {
    for version in [GemmaVersion::Gemma2, GemmaVersion::Gemma3] {
        let cfg = small(version);
        let gemma = || Gemma::new(&cfg, Device::Cpu, Kind::Float, 7).unwrap();
        let reference = ranks(1, |comm| {
            let mut e = Engine::new(gemma(), engine_config(0, 1), comm).unwrap();
            (train(&mut e, 1, 0, 1, STEPS, ENGINE_LR), weights(&mut e))
        })
        .remove(0);
        let losses = &reference.0;
        let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
        assert!(last < first - 0.2, "{version:?}: the loss falls: {losses:?}");
        for (stage, world, recompute) in
            [(0u8, 2usize, false), (1, 3, false), (2, 2, false), (2, 2, true), (3, 2, true), (3, 3, false)]
        {
            let what = format!("{version:?}, stage {stage}, {world} ranks, recompute {recompute}");
            let out = ranks(world, |comm| {
                let rank = comm.rank();
                let cfg = EngineConfig { activation_checkpointing: recompute, ..engine_config(stage, 1) };
                let mut e = Engine::new(gemma(), cfg, comm).unwrap();
                (train(&mut e, world, rank, 1, STEPS, ENGINE_LR), weights(&mut e))
            });
            for (rank, (losses, w)) in out.iter().enumerate() {
                assert_close(losses, &reference.0, 1e-5, &format!("{what}, rank {rank}"));
                assert_weights_close(w, &reference.1, 2e-5, &format!("{what}, rank {rank}"));
            }
        }
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

fn tool(bin: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(bin).args(args).env("ZEROKIT_NO_CUDA", "1").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (o.status.success(), text)
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
    // 16 tokens: longer than the fixtures' window of 8, as the training sequences are.
    let tokens = Tensor::randint_low(0, tiny::VOCAB as i64, [3, 16], (Kind::Int64, Device::Cpu));
    for case in CASES {
        let source = case_dir(case).join("model");
        let dir = tmp.path().join(case);
        let keys = format!(
            "init_from = \"{}\"\nmax_iters = 4\neval_interval = 4\nzero_stage = 2\nbatch_size = 2",
            source.display()
        );
        let run = tiny::train(&dir, &data, 2, &keys, &[]);
        assert!(run.ok, "train in {}: {}", dir.display(), run.stderr);
        let out = dir.join("hf").join("model");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        convert::run(&common::convert_args(&run.out, &out)).unwrap();

        let ours = hf_model::load(&out, Device::Cpu, Kind::Float).unwrap();
        let before = hf_model::load(&source, Device::Cpu, Kind::Float).unwrap();
        let logits = tch::no_grad(|| ours.forward(&tokens));
        let moved = max_abs_diff(&logits, &tch::no_grad(|| before.forward(&tokens)));
        assert!(moved > 1e-3, "{case}: training did not change the model (max |logits delta| {moved})");
        // check_hf_roundtrip.py fails on missing, unexpected or mismatched keys.
        let theirs = common::transformers_logits(&out, &tokens);
        let d = max_abs_diff(&logits, &theirs);
        eprintln!("{case}: max |zerokit - transformers| = {d:.2e}");
        assert!(d < 1e-4, "{case}: max |zerokit - transformers| = {d}");
    }
}
