//! `train`'s configuration: TOML with `--set` overrides, and DeepSpeed JSON configs checked
//! against DeepSpeed's own code (fixtures from tools/gen_config_fixtures.py: its batch resolution
//! and its schedulers' defaults).

use serde_json::Value;
use std::path::{Path, PathBuf};
use zerokit::config::TrainConfig;
use zerokit::optim::{LrSchedule, WarmupType};

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Loads a DeepSpeed JSON config (on the defaults) and resolves its batch for `world` ranks.
fn load_ds(dir: &Path, json: &Value, world: usize) -> Result<TrainConfig, String> {
    let p = write(dir, "ds.json", &json.to_string());
    let mut cfg = TrainConfig::load(None, Some(&p), &[]).map_err(|e| e.to_string())?;
    cfg.resolve_batch(world).map_err(|e| e.to_string())?;
    Ok(cfg)
}

#[test]
fn batch_sizes_resolve_as_deepspeed_resolves_them() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture("deepspeed_batch.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 300);
    let (mut agreed_ok, mut agreed_err) = (0, 0);
    for case in cases {
        let given: serde_json::Map<String, Value> =
            case["given"].as_object().unwrap().iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
        let world = case["world"].as_u64().unwrap() as usize;
        let ds = &case["deepspeed"];
        let ours = load_ds(tmp.path(), &Value::Object(given.clone()), world);
        match (ds.get("error"), ours) {
            (Some(_), Err(_)) => agreed_err += 1,
            (Some(e), Ok(c)) => panic!(
                "{given:?} on {world} ranks: DeepSpeed refuses ({e}), zerokit resolved micro {} x accumulation {}",
                c.batch_size, c.gradient_accumulation_steps
            ),
            (None, Err(e)) => panic!("{given:?} on {world} ranks: DeepSpeed resolves {ds}, zerokit refuses: {e}"),
            (None, Ok(c)) => {
                let got = (c.batch_size * c.gradient_accumulation_steps * world, c.batch_size, c.gradient_accumulation_steps);
                let want = (
                    ds["train_batch_size"].as_u64().unwrap() as usize,
                    ds["micro_batch"].as_u64().unwrap() as usize,
                    ds["accumulation"].as_u64().unwrap() as usize,
                );
                assert_eq!(got, want, "{given:?} on {world} ranks");
                agreed_ok += 1;
            }
        }
    }
    assert!(agreed_ok > 50 && agreed_err > 50, "{agreed_ok} resolved, {agreed_err} refused");
}

#[test]
fn inconsistent_batches_are_refused_with_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_ds(
        tmp.path(),
        &serde_json::json!({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}),
        3,
    )
    .unwrap_err();
    assert!(e.contains("train_batch_size 16 != micro-batch 2 x accumulation 2 x world 3"), "{e}");
    let e = load_ds(tmp.path(), &serde_json::json!({"gradient_accumulation_steps": 2}), 1).unwrap_err();
    assert!(e.contains("set train_batch_size or train_micro_batch_size_per_gpu"), "{e}");
}

#[test]
fn scheduler_parameters_default_as_in_deepspeed() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture("scheduler_defaults.json");
    let f = |cls: &str, k: &str| fx[cls][k].as_f64().unwrap();
    let u = |cls: &str, k: &str| fx[cls][k].as_u64().unwrap();
    let log = |cls: &str| {
        assert_eq!(fx[cls]["warmup_type"], "log");
        WarmupType::Log
    };
    let with = |sched: Value| serde_json::json!({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}, "scheduler": sched});

    let c = load_ds(tmp.path(), &with(serde_json::json!({"type": "WarmupLR"})), 1).unwrap();
    let max_default = fx["WarmupLR_max_lr_from_optimizer_lr_3e-4"].as_f64().unwrap();
    assert!(fx["WarmupLR"]["warmup_max_lr"].is_null(), "DeepSpeed's WarmupLR takes the optimizer's rate");
    assert_eq!(
        c.lr_schedule,
        Some(LrSchedule::WarmupLR {
            warmup_min_lr: f("WarmupLR", "warmup_min_lr"),
            warmup_max_lr: max_default,
            warmup_num_steps: u("WarmupLR", "warmup_num_steps"),
            warmup_type: log("WarmupLR"),
        })
    );

    let c = load_ds(tmp.path(), &with(serde_json::json!({"type": "WarmupDecayLR", "params": {"total_num_steps": 500}})), 1).unwrap();
    assert_eq!(
        c.lr_schedule,
        Some(LrSchedule::WarmupDecayLR {
            total_num_steps: 500,
            warmup_min_lr: f("WarmupDecayLR", "warmup_min_lr"),
            warmup_max_lr: f("WarmupDecayLR", "warmup_max_lr"),
            warmup_num_steps: u("WarmupDecayLR", "warmup_num_steps"),
            warmup_type: log("WarmupDecayLR"),
        })
    );

    let c = load_ds(tmp.path(), &with(serde_json::json!({"type": "WarmupCosineLR", "params": {"total_num_steps": 500}})), 1).unwrap();
    assert_eq!(
        c.lr_schedule,
        Some(LrSchedule::WarmupCosineLR {
            lr: fx["WarmupCosineLR_org_lr_from_optimizer_lr_3e-4"].as_f64().unwrap(),
            total_num_steps: 500,
            warmup_min_ratio: f("WarmupCosineLR", "warmup_min_ratio"),
            warmup_num_steps: u("WarmupCosineLR", "warmup_num_steps"),
            cos_min_ratio: f("WarmupCosineLR", "cos_min_ratio"),
            warmup_type: log("WarmupCosineLR"),
        })
    );

    // Without an optimizer block the base rate is the TOML's learning_rate.
    let toml = write(tmp.path(), "base.toml", "learning_rate = 1e-3\n");
    let ds = write(tmp.path(), "sched.json", r#"{"train_batch_size": 8, "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 9}}}"#);
    let c = TrainConfig::load(Some(&toml), Some(&ds), &[]).unwrap();
    assert!(matches!(c.lr_schedule, Some(LrSchedule::WarmupCosineLR { lr, .. }) if lr == 1e-3), "{:?}", c.lr_schedule);

    // DeepSpeed has no default for total_num_steps; a zero warm-up is refused as DeepSpeed does.
    for (sched, want) in [
        (serde_json::json!({"type": "WarmupDecayLR"}), "params.total_num_steps is required"),
        (serde_json::json!({"type": "WarmupLR", "params": {"warmup_num_steps": 0}}), "warmup_num_steps must be a positive integer"),
    ] {
        let e = load_ds(tmp.path(), &with(sched), 1).unwrap_err();
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn a_deepspeed_config_maps_onto_the_same_knobs() {
    let tmp = tempfile::tempdir().unwrap();
    let json = serde_json::json!({
        "train_batch_size": 64,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": 0.5,
        "steps_per_print": 20,
        "zero_optimization": {"stage": 2, "overlap_comm": true, "contiguous_gradients": true, "reduce_bucket_size": 5e8},
        "fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                 "hysteresis": 3, "min_loss_scale": 0.5, "consecutive_hysteresis": true},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.05}},
    });
    let c = load_ds(tmp.path(), &json, 4).unwrap();
    assert_eq!((c.batch_size, c.gradient_accumulation_steps), (8, 2));
    assert_eq!((c.grad_clip, c.log_interval, c.zero_stage), (0.5, 20, 2));
    assert_eq!(c.dtype, "fp16");
    assert_eq!((c.loss_scale, c.initial_scale_power, c.loss_scale_window, c.hysteresis, c.min_loss_scale), (0.0, 12, 500, 3, 0.5));
    assert!(c.consecutive_hysteresis);
    assert_eq!((c.learning_rate, c.beta1, c.beta2, c.eps, c.weight_decay), (2e-4, 0.8, 0.9, 1e-6, 0.05));
    let c = load_ds(tmp.path(), &serde_json::json!({"train_batch_size": 8, "bf16": {"enabled": true}}), 1).unwrap();
    assert_eq!(c.dtype, "bf16");
}

#[test]
fn deepspeed_keys_zerokit_does_not_honour_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    for (json, want) in [
        (r#"{"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}"#, "zero_optimization.offload_optimizer"),
        (r#"{"train_batch_size": 8, "activation_checkpointing": {"partition_activations": true}}"#, "activation_checkpointing"),
        (r#"{"train_batch_size": 8, "gradient_clippng": 1.0}"#, "gradient_clippng"),
        (r#"{"train_batch_size": 8, "fp16": {"enabled": true, "fp16_master_weights_and_grads": true}}"#, "fp16.fp16_master_weights_and_grads"),
        (r#"{"train_batch_size": 8, "optimizer": {"type": "Lamb"}}"#, "zerokit implements AdamW"),
        (r#"{"train_batch_size": 8, "scheduler": {"type": "OneCycle"}}"#, "zerokit implements WarmupLR, WarmupDecayLR and WarmupCosineLR"),
        (r#"{"train_batch_size": 8, "fp16": {"enabled": true}, "bf16": {"enabled": true}}"#, "fp16 and bf16 are both enabled"),
    ] {
        let p = write(tmp.path(), "bad.json", json);
        let e = TrainConfig::load(None, Some(&p), &[]).unwrap_err().to_string();
        assert!(e.starts_with(&p.display().to_string()) && e.contains(want), "{json}: {e}");
    }
    // Bad JSON: the file and the line.
    let p = write(tmp.path(), "broken.json", "{\n  \"train_batch_size\": 8,\n  \"fp16\": {\n}\n");
    let e = TrainConfig::load(None, Some(&p), &[]).unwrap_err().to_string();
    assert!(e.starts_with(&p.display().to_string()) && e.contains("line 5"), "{e}");
}

#[test]
fn toml_files_and_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/shakespeare.toml");
    let c = TrainConfig::load(Some(&shipped), None, &[]).unwrap();
    assert_eq!((c.n_layer, c.block_size, c.max_iters), (4, 64, 300));

    // --set wins over the file and is typed like TOML; bare words are strings.
    let sets: Vec<String> = ["max_iters=7", "learning_rate=1e-3", "activation_checkpointing=true", "dtype=fp16", "sample_prompt=\"ROMEO:\""]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let c = TrainConfig::load(Some(&shipped), None, &sets).unwrap();
    assert_eq!((c.max_iters, c.learning_rate, c.activation_checkpointing), (7, 1e-3, true));
    assert_eq!((c.dtype.as_str(), c.sample_prompt.as_str()), ("fp16", "ROMEO:"));

    // Errors name the key and where it came from.
    let e = TrainConfig::load(Some(&shipped), None, &["max_iters=abc".into()]).unwrap_err().to_string();
    assert!(e.starts_with("--set max_iters=abc: max_iters: invalid type"), "{e}");
    let e = TrainConfig::load(Some(&shipped), None, &["n_layr=3".into()]).unwrap_err().to_string();
    assert!(e.starts_with("--set n_layr=3: unknown key `n_layr`"), "{e}");
    let bad = write(tmp.path(), "bad.toml", "n_layer = 2\nwarmup = 10\n");
    let e = TrainConfig::load(Some(&bad), None, &[]).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: unknown key `warmup`", bad.display())), "{e}");
    let e = TrainConfig::load(Some(&shipped), None, &["max_iters".into()]).unwrap_err().to_string();
    assert!(e.contains("--set max_iters: expected KEY=VALUE"), "{e}");
    let e = TrainConfig::load(Some(&shipped), None, &["zero_stage=3".into()]).unwrap_err().to_string();
    assert!(e.contains("zero_stage = 3: zerokit implements stages 0, 1 and 2"), "{e}");

    // What `train` prints at start loads back to the same configuration.
    let c = TrainConfig::load(Some(&shipped), None, &sets).unwrap();
    let again = write(tmp.path(), "resolved.toml", &c.to_toml());
    assert_eq!(TrainConfig::load(Some(&again), None, &[]).unwrap(), c);
}
