//! Llama through the tools, with the real binaries on CPU ranks: `train` from a preset (resumed
//! on another world size and stage to the same losses), `ckpt verify`/`inspect`/`estimate` on
//! its checkpoints; and the round trip a user makes: a transformers-saved directory
//! (sharded with an index, from tools/gen_llama_hf_dir.py; and a single-file tied one) loaded with
//! `init_from`, trained, converted by zero-to-fp32 and loaded back into transformers with no
//! missing or unexpected keys, the same logits and the same greedy tokens as zerokit's; `train
//! eval` equal on the checkpoint and on the converted directory; `train sample` on the checkpoint.
//! The same round trip for Mistral and Qwen2 directories (sliding windows shorter than the
//! sequence), their class kept in the converted config.json, and zero-to-fp32's tokenizer files:
//! copied from the init_from directory and loaded by AutoTokenizer, given with `--tokenizer`, or
//! named in the log as not copied and why.

mod common;

use common::decoder::round_trip;
use common::tiny::{self, VOCAB};
use common::tool;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use zerokit::train::eval;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama").join(name)
}

/// Trains in `dir` with common::tiny's base keys and `extra`; fails the test if train fails.
fn train(dir: &Path, data: &Path, nproc: usize, extra: &str) -> tiny::Run {
    let run = tiny::train(dir, data, nproc, extra, &[]);
    assert!(run.ok, "train in {}: {}", dir.display(), run.stderr);
    run
}

#[test]
fn a_llama_preset_trains_resumes_and_its_checkpoints_go_through_the_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny::dataset(&data);
    let keys = "model = \"llama-tiny\"\neval_interval = 10\nalways_save_checkpoint = true";
    let whole = train(&tmp.path().join("whole"), &data, 1, &format!("{keys}\nmax_iters = 30\nbatch_size = 6"));
    let (first, last) = (whole.losses[0].1, whole.losses.last().unwrap().1);
    assert!(last < first - 0.5, "llama-tiny did not learn: loss {first} -> {last}");
    assert!(whole.stderr.contains("Llama, 2 layers, 4 heads (2 key/value)"), "{}", whole.stderr);

    // The same global batch: 20 steps on 2 ranks at stage 2, resumed at step 20 on 3 ranks at stage 1.
    let dir = tmp.path().join("split");
    train(&dir, &data, 2, &format!("{keys}\nmax_iters = 20\nzero_stage = 2\nbatch_size = 3"));
    let resumed = train(
        &dir,
        &data,
        3,
        &format!("{keys}\nmax_iters = 30\ninit_from = \"resume\"\nzero_stage = 1\nbatch_size = 2"),
    );
    tiny::assert_close(&resumed.losses, &whole.losses, 1e-5, "llama-tiny resumed on 3 ranks");

    let root = resumed.out;
    let manifest = common::manifest(&root.join("final"));
    assert_eq!(manifest["model_config"]["family"], "llama", "{}", manifest["model_config"]);
    let root_s = root.to_str().unwrap();
    let (ok, text) = tool(env!("CARGO_BIN_EXE_ckpt"), &["verify", root_s]);
    assert!(ok, "ckpt verify: {text}");
    let (ok, text) = tool(env!("CARGO_BIN_EXE_ckpt"), &["inspect", root_s]);
    assert!(ok && text.contains("family llama, num_hidden_layers 2"), "ckpt inspect: {text}");
    // A scratch run on a config.json takes its shape as it is (its vocabulary included).
    let file = fixture("hf_sharded/config.json");
    let run = train(&tmp.path().join("file"), &data, 1, &format!("model = \"{}\"\nmax_iters = 2", file.display()));
    assert!(run.stderr.contains("Llama, 2 layers, 4 heads (2 key/value), hidden 32, MLP 64"), "{}", run.stderr);

    let (ok, text) = tool(env!("CARGO_BIN_EXE_ckpt"), &["estimate", "--model", root_s]);
    assert!(ok && text.contains("Llama, 2 layers, 4 heads (2 key/value") && text.contains("sequence 16"), "{text}");
}

#[test]
fn a_transformers_llama_directory_round_trips_through_train_and_zero_to_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny::dataset(&data);
    tch::manual_seed(0);
    let tokens = Tensor::randint_low(0, VOCAB as i64, [3, 16], (Kind::Int64, Device::Cpu));
    let prompt = tokens.narrow(0, 0, 2).narrow(1, 0, 4).contiguous();
    let new_tokens = 10;
    // Sharded with an index and untied; one file and tied (its vocabulary, 256, exceeds the data's).
    for (name, source) in [("sharded", fixture("hf_sharded")), ("tied", fixture("gqa_llama3_tied/model"))] {
        let keys = "max_iters = 4\neval_interval = 4\nzero_stage = 1\nbatch_size = 2";
        let max_new = Tensor::from_slice(&[new_tokens as i64]);
        let inputs = [("prompt", &prompt), ("max_new_tokens", &max_new)];
        let rt = round_trip(&source, &tmp.path().join(name), &data, keys, &tokens, &inputs);
        let (ours, theirs, run, out) = (&rt.model, &rt.theirs, &rt.run, &rt.out);
        let greedy = ours.generate(&prompt, new_tokens, 0.0, None, 0).unwrap();
        assert!(
            greedy.equal(&theirs["generated"]),
            "{name}: greedy {greedy:?} vs transformers {:?}",
            theirs["generated"]
        );

        // An fp32 run: the checkpoint's own weights are the converted ones, and so is their loss.
        let on_ckpt = eval::evaluate(&eval::load_model(&run.out, "cpu").unwrap(), &data, "val", None, 4).unwrap();
        let on_hf = eval::evaluate(&eval::load_model(out, "cpu").unwrap(), &data, "val", Some(16), 4).unwrap();
        assert_eq!(on_ckpt.block_size, 16, "{name}: eval takes the run's block_size");
        assert_eq!(on_ckpt.loss, on_hf.loss, "{name}: train eval on the checkpoint and on its conversion");
        if name == "tied" {
            // Its vocabulary holds the GPT-2 ids `train sample` encodes prompts to.
            let args = ["sample", run.out.to_str().unwrap(), "--tokens", "8", "--device", "cpu"];
            let (ok, text) = tool(env!("CARGO_BIN_EXE_train"), &args);
            assert!(ok, "train sample: {text}");
        }
    }
}

/// `model`'s files and a tokenizer (tests/fixtures/tokenizer's Llama-3-style tokenizer.json, a
/// tokenizer_config.json and special_tokens_map.json), as a Hub directory holds them, in `dir`.
fn with_tokenizer(model: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let tokenizers = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/hf");
    std::fs::copy(tokenizers.join("llama3.json"), dir.join("tokenizer.json")).unwrap();
    let special = r#"{"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}"#;
    std::fs::write(dir.join("special_tokens_map.json"), special).unwrap();
    let config = r#"{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "model_max_length": 64}"#;
    std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
}

#[test]
fn mistral_and_qwen2_directories_round_trip_with_their_class_and_tokenizer() {
    use zerokit::data::HfTokenizer;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny::dataset(&data);
    tch::manual_seed(0);
    // 16 tokens, as the training sequences: longer than the fixtures' window of 8.
    let tokens = Tensor::randint_low(0, VOCAB as i64, [3, 16], (Kind::Int64, Device::Cpu));
    let source = tmp.path().join("mistral-with-tokenizer");
    with_tokenizer(&fixture("mistral_window/model"), &source);
    // Mistral (untied) from a directory with a tokenizer, 2 ranks at stage 2; Qwen2 (tied, q/k/v
    // biases) from the bare fixture, at stage 3.
    for (name, source, class, stage) in [
        ("mistral", source.clone(), "MistralForCausalLM", 2),
        ("qwen2", fixture("qwen2_window/model"), "Qwen2ForCausalLM", 3),
    ] {
        let keys = format!("max_iters = 4\neval_interval = 4\nzero_stage = {stage}\nbatch_size = 2");
        let rt = round_trip(&source, &tmp.path().join(name), &data, &keys, &tokens, &[]);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(rt.out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"], serde_json::json!([class]), "{name}");
        let copied = |f: &str| rt.out.join(f).is_file();
        if name == "mistral" {
            // Every tokenizer file of the init_from directory, byte for byte; generation_config.json
            // too (transformers saved one with the model).
            for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
                let (a, b) = (std::fs::read(source.join(f)).unwrap(), std::fs::read(rt.out.join(f)).unwrap());
                assert!(a == b, "{f} differs from the source's");
            }
            assert!(!copied("tokenizer.model"));
            // AutoTokenizer loaded the output directory; its ids are the tokenizer's own.
            let ours = HfTokenizer::open(&rt.out).unwrap();
            let mut ids = Vec::new();
            ours.encode_into(common::TOKENIZER_TEXT, &mut ids).unwrap();
            let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
            assert_eq!(Vec::<i64>::try_from(&rt.theirs["tokenizer_ids"]).unwrap(), ids);
        } else {
            assert!(!copied("tokenizer.json") && !rt.theirs.contains_key("tokenizer_ids"));
        }
    }

    // The manifest records the absolute init_from directory, and a resumed run carries it over,
    // so its conversion still finds the tokenizer.
    let mistral = tmp.path().join("mistral");
    let recorded = common::manifest(&mistral.join("out").join("final"))["init_dir"].clone();
    assert_eq!(recorded, std::fs::canonicalize(&source).unwrap().to_str().unwrap(), "manifest init_dir");
    let keys = "init_from = \"resume\"\nmax_iters = 6\neval_interval = 2\nzero_stage = 2\nbatch_size = 2";
    let resumed = tiny::train(&mistral, &data, 2, keys, &[]);
    assert!(resumed.ok, "resume: {}", resumed.stderr);
    let final_manifest = common::manifest(&resumed.out.join("final"));
    assert_eq!((final_manifest["step"].as_u64(), &final_manifest["init_dir"]), (Some(6), &recorded));
    let out = tmp.path().join("mistral-resumed-hf");
    let (ok, text) = tool(env!("CARGO_BIN_EXE_zero-to-fp32"), &[resumed.out.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(ok && text.contains("copied tokenizer.json") && text.contains("the run's init_from"), "{text}");
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(source.join("tokenizer.json")).unwrap()
    );

    // The Qwen2 run's init_from has no tokenizer, and its dataset records none: the log says which
    // files were not copied and why.
    let ckpt = tmp.path().join("qwen2").join("out");
    let zero_to_fp32 = env!("CARGO_BIN_EXE_zero-to-fp32");
    let out = tmp.path().join("qwen2-hf");
    let (ok, text) = tool(zero_to_fp32, &[ckpt.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(
        text.contains("tokenizer files not copied (tokenizer.json, tokenizer_config.json, special_tokens_map.json")
            && text.contains("holds no tokenizer.json or tokenizer.model")
            && text.contains("--tokenizer PATH"),
        "{text}"
    );
    // --tokenizer: a directory's files, or one tokenizer.json file.
    let out = tmp.path().join("qwen2-tok-dir");
    let args = [ckpt.to_str().unwrap(), out.to_str().unwrap(), "--tokenizer", source.to_str().unwrap()];
    let (ok, text) = tool(zero_to_fp32, &args);
    assert!(ok && text.contains("copied tokenizer.json, tokenizer_config.json, special_tokens_map.json"), "{text}");
    assert!(["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
        .iter()
        .all(|f| out.join(f).is_file()));
    let file = source.join("tokenizer.json");
    let out = tmp.path().join("qwen2-tok-file");
    let (ok, text) =
        tool(zero_to_fp32, &[ckpt.to_str().unwrap(), out.to_str().unwrap(), "--tokenizer", file.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(&file).unwrap());
    assert!(!out.join("tokenizer_config.json").exists());
    // Refused before anything is written: a path that is not there, a file that is no
    // tokenizer.json, a single-file output.
    let config = source.join("config.json");
    let refusals = [
        (tmp.path().join("nope"), out.with_file_name("r1"), "no such file or directory"),
        (config.clone(), out.with_file_name("r2"), "not a tokenizer.json"),
        (file.clone(), out.with_file_name("r3.safetensors"), "single .safetensors file"),
    ];
    for (tok, out, why) in refusals {
        let args = [ckpt.to_str().unwrap(), out.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()];
        let (ok, text) = tool(zero_to_fp32, &args);
        assert!(!ok && text.contains(why) && text.contains(tok.to_str().unwrap()), "{text}");
        assert!(!out.exists(), "{}", out.display());
    }
}

#[test]
fn ckpt_estimate_knows_the_mistral_and_qwen2_presets() {
    for (name, what) in [
        ("mistral-7b", "Mistral, 32 layers (32 with sliding window 4096), 32 heads (8 key/value, head_dim 128)"),
        ("qwen2.5-0.5b", "Qwen2, 24 layers, 14 heads (2 key/value, head_dim 64)"),
    ] {
        let (ok, text) = tool(env!("CARGO_BIN_EXE_ckpt"), &["estimate", "--model", name]);
        assert!(ok && text.contains(what), "ckpt estimate --model {name}: {text}");
    }
}
