//! Llama through the tools, with the real binaries on CPU ranks: `train` from a preset (resumed
//! on another world size and stage to the same losses), `ckpt verify`/`inspect`/`estimate` on
//! its checkpoints; and the round trip a user makes: a transformers-saved directory
//! (sharded with an index, from tools/gen_llama_hf_dir.py; and a single-file tied one) loaded with
//! `init_from`, trained, converted by zero-to-fp32 and loaded back into transformers with no
//! missing or unexpected keys, the same logits and the same greedy tokens as zerokit's; `train
//! eval` equal on the checkpoint and on the converted directory; `train sample` on the checkpoint.

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
