//! `train`'s configuration (lib/config.rs) against DeepSpeed 0.19.8 and nanoGPT, fixtures from
//! tools/gen_config_fixtures.py: batch resolution (DeepSpeedConfig), the DeepSpeed JSON mapping
//! (DeepSpeedConfig and the optimizer DeepSpeed's engine builds), learning-rate schedules (the
//! scheduler DeepSpeed's engine builds from the same JSON; nanoGPT's get_lr for TOML), refusals,
//! TOML loading, `--set` overrides and the `to_toml` round trip.
//!
//! Step index convention. zerokit: `cfg.lr_schedule().lr(k)` is the rate of optimizer step k,
//! k = 0 for the first step (nanoGPT's `get_lr(iter_num)`). DeepSpeed: the scheduler's
//! constructor sets the first step's rate (last_batch_iteration = -1) and the engine calls
//! `scheduler.step()` after every applied step, so step k runs at the rate left in the
//! optimizer's param_groups after the k-th `scheduler.step()`; the fixture's `lrs[k]` is that.

use serde_json::Value;
use std::path::{Path, PathBuf};
use zerokit::config::{from_deepspeed_json, ConfigError, TrainConfig};
use zerokit::optim::{Decay, LrSchedule, WarmupType};

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn f64_bits(v: &Value) -> f64 {
    f64::from_bits(v.as_u64().expect("IEEE-754 bits"))
}

/// A scratch directory with files written into it.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Self {
        Scratch(tempfile::tempdir().unwrap())
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn load_ds(json: &Value, overrides: &[String]) -> Result<TrainConfig, ConfigError> {
    let s = Scratch::new();
    let p = s.file("ds_config.json", &serde_json::to_string_pretty(json).unwrap());
    TrainConfig::load(None, Some(&p), overrides)
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-12 * want.abs()
}

const BATCH_KEYS: [&str; 3] = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"];

#[test]
fn batch_resolution_matches_deepspeed() {
    let doc = fixture("batch.json");
    let cases = doc["cases"].as_array().unwrap();
    let (mut resolved, mut refused) = (0, 0);
    for case in cases {
        let world = case["world"].as_u64().unwrap() as usize;
        let what = format!("{} on {world} rank(s)", case["config"]);
        let got = load_ds(&case["config"], &[]).and_then(|mut cfg| cfg.resolve_batch(world).map(|_| cfg));
        match (&case.get("resolved"), got) {
            (Some(want), Ok(cfg)) => {
                let want: Vec<usize> = want.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
                let global = cfg.batch_size * cfg.gradient_accumulation_steps * world;
                assert_eq!(vec![global, cfg.batch_size, cfg.gradient_accumulation_steps], want, "{what}");
                // A given train_batch_size is kept; 0 means "not given" (the product above).
                assert!(cfg.train_batch_size == 0 || cfg.train_batch_size == global, "{what}");
                resolved += 1;
            }
            (Some(_), Err(e)) => panic!("{what}: DeepSpeed resolves it, zerokit refuses: {e}"),
            (None, Ok(cfg)) => panic!(
                "{what}: DeepSpeed raises ({}), zerokit resolves batch_size {} x accumulation {}",
                case["error"], cfg.batch_size, cfg.gradient_accumulation_steps
            ),
            (None, Err(e)) => {
                // A clear refusal names the DeepSpeed key(s) at fault.
                let msg = e.to_string();
                assert!(BATCH_KEYS.iter().any(|k| msg.contains(k)), "{what}: {msg}");
                refused += 1;
            }
        }
    }
    assert!(resolved >= 50 && refused >= 50, "{resolved} resolved, {refused} refused");
}

#[test]
fn toml_batch_resolution() {
    let s = Scratch::new();
    let p = s.file("b.toml", "train_batch_size = 32\nbatch_size = 0\ngradient_accumulation_steps = 2\n");
    let mut cfg = TrainConfig::load(Some(&p), None, &[]).unwrap();
    cfg.resolve_batch(4).unwrap();
    assert_eq!((cfg.batch_size, cfg.gradient_accumulation_steps, cfg.train_batch_size), (4, 2, 32));
    let mut cfg =
        TrainConfig::load(Some(&p), None, &["batch_size=8".into(), "gradient_accumulation_steps=0".into()]).unwrap();
    cfg.resolve_batch(2).unwrap();
    assert_eq!((cfg.batch_size, cfg.gradient_accumulation_steps), (8, 2));
    // A global batch alone: the defaults (batch_size 12, accumulation 1) give way, as under
    // DeepSpeed, which derives what is left out (accumulation 1, the micro-batch from the world).
    let p = s.file("c.toml", "train_batch_size = 32\n");
    let mut cfg = TrainConfig::load(Some(&p), None, &[]).unwrap();
    cfg.resolve_batch(2).unwrap();
    assert_eq!((cfg.batch_size, cfg.gradient_accumulation_steps, cfg.train_batch_size), (16, 1, 32));
    // Without train_batch_size nothing is derived: the global batch is the product.
    let mut cfg = TrainConfig::load(None, None, &[]).unwrap();
    cfg.resolve_batch(3).unwrap();
    assert_eq!((cfg.batch_size, cfg.gradient_accumulation_steps, cfg.train_batch_size), (12, 1, 36));
}

#[test]
fn deepspeed_schedules_match_deepspeed_scheduler() {
    let doc = fixture("schedules.json");
    let mut checked = 0;
    let mut kinds = std::collections::BTreeSet::new();
    for case in doc["deepspeed_schedules"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        // Without an "optimizer" block, DeepSpeed trains the client's optimizer: zerokit's
        // learning_rate plays that part.
        let overrides: Vec<String> =
            case.get("client_lr").map(|b| format!("learning_rate={:e}", f64_bits(b))).into_iter().collect();
        let cfg = load_ds(&case["config"], &overrides).unwrap_or_else(|e| panic!("{name}: {e}"));
        let sched = cfg.lr_schedule();
        kinds.insert(match (&sched, sched_warmup(&sched)) {
            (LrSchedule::WarmupLR { .. }, w) => format!("WarmupLR/{w:?}"),
            (LrSchedule::WarmupDecayLR { .. }, w) => format!("WarmupDecayLR/{w:?}"),
            (LrSchedule::WarmupCosineLR { .. }, w) => format!("WarmupCosineLR/{w:?}"),
            (LrSchedule::NanoGpt { .. }, _) => panic!("{name}: the scheduler block was not used"),
        });
        for (k, want) in case["lrs"].as_array().unwrap().iter().map(f64_bits).enumerate() {
            let got = sched.lr(k as u64);
            assert!(close(got, want), "{name}: step {k}: zerokit {got:e}, DeepSpeed {want:e} ({sched:?})");
            checked += 1;
        }
    }
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    assert!(checked > 5000, "{checked}");
}

fn sched_warmup(s: &LrSchedule) -> Option<WarmupType> {
    match *s {
        LrSchedule::WarmupLR { warmup_type, .. }
        | LrSchedule::WarmupDecayLR { warmup_type, .. }
        | LrSchedule::WarmupCosineLR { warmup_type, .. } => Some(warmup_type),
        LrSchedule::NanoGpt { .. } => None,
    }
}

#[test]
fn step_index_convention() {
    // DeepSpeed's WarmupLR runs the first two steps at warmup_min_lr (the constructor's rate,
    // then gamma = 0 at last_batch_iteration 0 for linear warm-up); zerokit's lr(0), lr(1).
    let json = serde_json::json!({"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {
        "warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3, "warmup_num_steps": 10, "warmup_type": "linear"}}});
    let s = load_ds(&json, &[]).unwrap().lr_schedule();
    assert_eq!((s.lr(0), s.lr(1)), (1e-5, 1e-5));
    assert!(close(s.lr(2), 1e-5 + (1e-3 - 1e-5) * 0.1));
    assert_eq!(s.lr(11), 1e-3);
    // nanoGPT: get_lr(0) is already (0+1)/(warmup_iters+1) of the peak.
    let cfg = TrainConfig::load(None, None, &["warmup_iters=9".into(), "learning_rate=1e-3".into()]).unwrap();
    assert!(close(cfg.lr_schedule().lr(0), 1e-4));
}

#[test]
fn nanogpt_schedule_matches_get_lr() {
    let doc = fixture("schedules.json");
    let s = Scratch::new();
    let mut checked = 0;
    for case in doc["nanogpt"].as_array().unwrap() {
        let text = case["toml"].as_str().unwrap();
        let cfg = TrainConfig::load(Some(&s.file("lr.toml", text)), None, &[]).unwrap();
        let sched = cfg.lr_schedule();
        assert!(matches!(sched, LrSchedule::NanoGpt { .. }), "{text}");
        for (it, want) in case["its"].as_array().unwrap().iter().zip(case["lrs"].as_array().unwrap()) {
            let (it, want) = (it.as_u64().unwrap(), f64_bits(want));
            let got = sched.lr(it);
            assert!(close(got, want), "{text}: iter {it}: zerokit {got:e}, nanoGPT {want:e}");
            checked += 1;
        }
    }
    assert!(checked > 2500, "{checked}");
}

#[test]
fn deepspeed_config_maps_like_deepspeed() {
    let doc = fixture("mapping.json");
    let defaults = TrainConfig::default();
    for case in doc["mapped"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let world = case["world"].as_u64().unwrap() as usize;
        let mut cfg = load_ds(&case["config"], &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        cfg.resolve_batch(world).unwrap_or_else(|e| panic!("{name}: {e}"));
        let batch: Vec<usize> =
            case["batch"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(
            batch,
            [cfg.batch_size * cfg.gradient_accumulation_steps * world, cfg.batch_size, cfg.gradient_accumulation_steps],
            "{name}"
        );
        assert_eq!(cfg.zero_stage as u64, case["zero_stage"].as_u64().unwrap(), "{name}");
        assert_eq!(cfg.grad_clip, case["gradient_clipping"].as_f64().unwrap(), "{name}: gradient_clipping");
        if let Some(n) = case["steps_per_print"].as_u64() {
            assert_eq!(cfg.log_interval, n, "{name}: steps_per_print");
        }
        let fp16 = &case["fp16"];
        let bf16 = case["bf16"].as_bool().unwrap();
        let dtype = if fp16["enabled"].as_bool().unwrap() {
            "fp16"
        } else if bf16 {
            "bf16"
        } else {
            "fp32"
        };
        assert_eq!(cfg.dtype, dtype, "{name}");
        assert_eq!(cfg.loss_scale, fp16["loss_scale"].as_f64().unwrap(), "{name}");
        assert_eq!(cfg.initial_scale_power as u64, fp16["initial_scale_power"].as_u64().unwrap(), "{name}");
        assert_eq!(cfg.loss_scale_window, fp16["loss_scale_window"].as_u64().unwrap(), "{name}");
        assert_eq!(cfg.hysteresis as u64, fp16["hysteresis"].as_u64().unwrap(), "{name}");
        assert_eq!(cfg.consecutive_hysteresis, fp16["consecutive_hysteresis"].as_bool().unwrap(), "{name}");
        assert_eq!(cfg.min_loss_scale, fp16["min_loss_scale"].as_f64().unwrap(), "{name}");
        let got_opt = (cfg.learning_rate, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay);
        match case.get("optimizer") {
            Some(o) => {
                assert!(o["adamw"].as_bool().unwrap(), "{name}: the fixture's optimizer is not AdamW");
                let b = o["betas"].as_array().unwrap();
                let want = (
                    o["lr"].as_f64().unwrap(),
                    b[0].as_f64().unwrap(),
                    b[1].as_f64().unwrap(),
                    o["eps"].as_f64().unwrap(),
                    o["weight_decay"].as_f64().unwrap(),
                );
                assert_eq!(
                    got_opt, want,
                    "{name}: AdamW (lr, beta1, beta2, eps, weight_decay) vs DeepSpeed's {}",
                    o["class"]
                );
            }
            // No "optimizer" block: the client's (zerokit's TOML/defaults) hyper-parameters.
            None => assert_eq!(
                got_opt,
                (defaults.learning_rate, defaults.beta1, defaults.beta2, defaults.eps, defaults.weight_decay),
                "{name}"
            ),
        }
    }
    // The full config's scheduler block, with everything else.
    let full = &doc["mapped"][0];
    assert_eq!(full["name"], "full_fp16_stage2");
    let cfg = load_ds(&full["config"], &[]).unwrap();
    assert_eq!(
        cfg.lr_schedule,
        Some(LrSchedule::WarmupDecayLR {
            total_num_steps: 1000,
            warmup_min_lr: 0.0,
            warmup_max_lr: 3e-4,
            warmup_num_steps: 50,
            warmup_type: WarmupType::Linear
        })
    );
}

/// The error message of loading `json` (as text) from a file; the message must name the file.
fn refusal(json: &str) -> String {
    let s = Scratch::new();
    let p = s.file("ds.json", json);
    let msg = match TrainConfig::load(None, Some(&p), &[]) {
        Ok(cfg) => panic!("accepted {json}: {cfg:?}"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(&p.display().to_string()), "the message does not name the file: {msg}");
    msg
}

#[test]
fn deepspeed_refusals_match_deepspeed() {
    let doc = fixture("mapping.json");
    for case in doc["refused"].as_array().unwrap() {
        let msg = refusal(&case["config"].to_string());
        assert!(msg.contains("fp16") && msg.contains("bf16"), "{}: {msg}", case["name"]);
    }
    // bf16 under its older name "bfloat16", which DeepSpeed reads too.
    let msg = refusal(r#"{"train_batch_size": 8, "fp16": {"enabled": true}, "bfloat16": {"enabled": true}}"#);
    assert!(msg.contains("both true"), "{msg}");
    let cfg = load_ds(&serde_json::json!({"train_batch_size": 8, "bfloat16": {"enabled": true}}), &[]).unwrap();
    assert_eq!(cfg.dtype, "bf16");
}

#[test]
fn unhonoured_keys_are_named() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "buffer_count": 4}}}"#,
            &["zero_optimization.offload_optimizer.buffer_count"],
        ),
        (
            r#"{"train_batch_size": 8, "activation_checkpointing": {"partition_activations": true}}"#,
            &["activation_checkpointing.partition_activations"],
        ),
        // Misspellings, everywhere, all reported at once.
        (
            r#"{"train_batch_size": 8, "gradient_clipings": 1.0, "fp16": {"enabled": true, "loss_scale_windw": 100},
                "optimizer": {"type": "AdamW", "parms": {"lr": 1e-3}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}}"#,
            &["gradient_clipings", "fp16.loss_scale_windw", "optimizer.parms", "scheduler.params.warmup_num_step"],
        ),
        (
            r#"{"train_batch_size": 8, "bf16": {"enabled": true, "immediate_grad_update": true}}"#,
            &["bf16.immediate_grad_update"],
        ),
        (
            r#"{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"amsgrad": true}}}"#,
            &["optimizer.params.amsgrad"],
        ),
        (
            r#"{"train_batch_size": 8, "prescale_gradients": true, "communication_data_type": "fp32"}"#,
            &["prescale_gradients", "communication_data_type"],
        ),
        (
            r#"{"train_batch_size": 8, "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "last_batch_iteration": 5}}}"#,
            &["scheduler.params.last_batch_iteration"],
        ),
        // WarmupCosineLR takes its rate from the optimizer; DeepSpeed has no "lr" parameter.
        (
            r#"{"train_batch_size": 8, "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "lr": 1e-3}}}"#,
            &["scheduler.params.lr"],
        ),
    ];
    for (json, keys) in cases {
        let msg = refusal(json);
        assert!(msg.contains("does not honour"), "{msg}");
        for k in *keys {
            assert!(msg.contains(k), "{json}: the message does not name {k}: {msg}");
        }
    }
}

/// DeepSpeed's stage-3 and offload keys land on zerokit's: devices "cpu" and "none",
/// pin_memory (false unless set, as in DeepSpeed), and the prefetch and persistence sizes.
#[test]
fn stage_3_and_offload_keys_map() {
    let ds = serde_json::json!({
        "train_batch_size": 8,
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "pin_memory": true},
            "offload_param": {"device": "cpu", "pin_memory": true},
            "stage3_prefetch_bucket_size": 1234,
            "stage3_param_persistence_threshold": 56,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": true
        }
    });
    let c = load_ds(&ds, &[]).unwrap();
    assert_eq!((c.zero_stage, c.offload_optimizer, c.offload_param, c.pin_memory), (3, true, true, true));
    assert_eq!((c.stage3_prefetch_bucket_size, c.stage3_param_persistence_threshold), (1234, 56));
    let ds = serde_json::json!({
        "train_batch_size": 8,
        "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "none"}}
    });
    let c = load_ds(&ds, &[]).unwrap();
    assert_eq!((c.zero_stage, c.offload_optimizer, c.offload_param, c.pin_memory), (1, true, false, false));
    // The TOML names, with zerokit's defaults (pinned).
    let c = TrainConfig::load(None, None, &["zero_stage=3".into(), "offload_param=true".into()]).unwrap();
    assert_eq!((c.zero_stage, c.offload_optimizer, c.offload_param, c.pin_memory), (3, false, true, true));
}

#[test]
fn unsupported_values_are_refused_by_name() {
    let cases: &[(&str, &[&str])] = &[
        (r#"{"train_batch_size": 8, "zero_optimization": {"stage": 5}}"#, &["zero_optimization.stage = 5"]),
        (
            r#"{"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}"#,
            &["zero_stage = 2", "parameter offload needs ZeRO stage 3"],
        ),
        (
            r#"{"train_batch_size": 8, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}"#,
            &["zero_stage = 0", "optimizer offload needs ZeRO stage 1, 2 or 3"],
        ),
        (r#"{"train_batch_size": 8, "optimizer": {"type": "Lamb"}}"#, &["optimizer.type", "Lamb"]),
        (
            r#"{"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"adam_w_mode": false}}}"#,
            &["adam_w_mode"],
        ),
        (
            r#"{"train_batch_size": 8, "scheduler": {"type": "OneCycle", "params": {}}}"#,
            &["scheduler.type", "OneCycle"],
        ),
        (r#"{"train_batch_size": 8, "scheduler": {"type": "WarmupDecayLR", "params": {}}}"#, &["total_num_steps"]),
        (
            r#"{"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}}"#,
            &["warmup_num_steps"],
        ),
        (
            r#"{"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}}"#,
            &["scheduler.params.warmup_type"],
        ),
        (r#"{"train_batch_size": 8, "fp16": {"enabled": "auto"}}"#, &["fp16.enabled"]),
        (r#"{"train_batch_size": "auto"}"#, &["train_batch_size"]),
        (r#"{"train_batch_size": 8, "gradient_clipping": -1}"#, &["gradient_clipping"]),
        (r#"{"gradient_accumulation_steps": 4}"#, &["train_batch_size", "train_micro_batch_size_per_gpu"]),
        (r#"[1, 2]"#, &["expected a JSON object"]),
    ];
    for (json, words) in cases {
        let s = Scratch::new();
        let p = s.file("ds.json", json);
        let msg = match TrainConfig::load(None, Some(&p), &[]) {
            Ok(cfg) => panic!("accepted {json}: {cfg:?}"),
            Err(e) => e.to_string(),
        };
        for w in *words {
            assert!(msg.contains(w), "{json}: the message does not say {w:?}: {msg}");
        }
    }
}

/// The whole message for cases where the rules interact: which error comes first, which keys
/// are named, and in what order.
#[test]
fn deepspeed_errors_name_the_first_wrong_value_or_every_unhonoured_key() {
    let cases: &[(&str, &str)] = &[
        // A null is a value given, not a key left out.
        (r#"{"train_batch_size": 8, "fp16": {"loss_scale": null}}"#, "fp16.loss_scale = null: expected a number"),
        // The optimizer's type is checked before its params (HF Trainer configs hold "auto").
        (
            r#"{"train_batch_size": 8, "optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}"#,
            r#"optimizer.type "Lamb": zerokit implements AdamW (DeepSpeed's "AdamW" or "Adam")"#,
        ),
        // A parameter the scheduler type does not take is named, not checked.
        (
            r#"{"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {"total_num_steps": -1}}}"#,
            "keys zerokit does not honour: scheduler.params.total_num_steps",
        ),
        // A wrong value wins over unknown keys; the first in the order of the keys.
        (
            r#"{"zz": 1, "gradient_clipping": -1, "fp16": {"hysteresis": 2.5}}"#,
            "fp16.hysteresis = 2.5: expected a non-negative integer",
        ),
        (
            r#"{"train_batch_size": 8, "zz": 1, "fp16": {"b": 1, "a": 2}, "activation_checkpointing": {"x": 1},
                "optimizer": {"type": "AdamW", "params": {"amsgrad": true}, "foo": 1}}"#,
            "keys zerokit does not honour: activation_checkpointing.x, fp16.a, fp16.b, optimizer.foo, \
             optimizer.params.amsgrad, zz",
        ),
        (r#"{"train_batch_size": 8, "bf16": true}"#, "bf16: expected an object"),
        (
            r#"{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": 3}}"#,
            "optimizer.params: expected an object",
        ),
        (
            r#"{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"betas": [0.9, "x"]}}}"#,
            r#"optimizer.params.betas = "x": expected a number"#,
        ),
        (
            r#"{"train_batch_size": 8, "zero_optimization": {"stage": 4.0}}"#,
            "zero_optimization.stage = 4: zerokit implements stages 0, 1, 2 and 3",
        ),
        (
            r#"{"train_batch_size": 8, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}"#,
            r#"zero_optimization.offload_param.device = "nvme": zerokit offloads to host memory only ("cpu")"#,
        ),
        (
            r#"{"train_batch_size": 8, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": true},
                "offload_param": {"device": "cpu"}}}"#,
            "zero_optimization.offload_optimizer.pin_memory and offload_param.pin_memory differ: zerokit pins both or neither",
        ),
        (
            r#"{"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5,
                "nvme_path": "/x"}, "sub_group_size": 1e9}}"#,
            "keys zerokit does not honour: zero_optimization.offload_optimizer.nvme_path, \
             zero_optimization.offload_optimizer.ratio, zero_optimization.sub_group_size",
        ),
        (
            r#"{"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 8.0}}}"#,
            "scheduler.params.warmup_num_steps = 8.0: expected a non-negative integer",
        ),
    ];
    for (json, want) in cases {
        let got = from_deepspeed_json(Path::new("ds.json"), json).map(|t| t.to_string()).map_err(|e| e.to_string());
        assert_eq!(got, Err(format!("ds.json: {want}")), "{json}");
    }
}

#[test]
fn bad_json_names_file_and_line() {
    // Trailing commas and comments are Hjson, which DeepSpeed reads (see
    // deepspeed_configs_parse_as_deepspeed_parses_them); a bracket that does not close is not.
    let msg = refusal("{\n  \"train_batch_size\": 8,\n  \"fp16\": {\"enabled\": true]\n}\n");
    assert!(msg.contains("line 3"), "{msg}");
    let msg = refusal("{\"train_batch_size\": 8");
    assert!(msg.contains("line 1"), "{msg}");
    // from_deepspeed_json alone names the path it is given.
    let e = from_deepspeed_json(Path::new("conf/ds.json"), "{\"a\" 1}").unwrap_err().to_string();
    assert!(e.starts_with("conf/ds.json:") && e.contains("line 1 column"), "{e}");
}

fn shakespeare() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/shakespeare.toml")
}

#[test]
fn shakespeare_toml_loads() {
    let mut cfg = TrainConfig::load(Some(&shakespeare()), None, &[]).unwrap();
    cfg.validate().unwrap();
    cfg.resolve_batch(1).unwrap();
    assert_eq!((cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size), (4, 4, 128, 64));
    assert_eq!((cfg.batch_size, cfg.gradient_accumulation_steps, cfg.max_iters), (8, 1, 300));
    assert_eq!(cfg.dataset, PathBuf::from("data/shakespeare"));
    assert_eq!(cfg.sample_prompt, "\n");
    assert_eq!(
        cfg.lr_schedule(),
        LrSchedule::NanoGpt { warmup_iters: 30, lr_decay_iters: 300, max_lr: 2e-3, min_lr: 2e-4, decay: Decay::Cosine }
    );
    // Keys the file leaves out keep their defaults.
    assert_eq!(cfg.seed, TrainConfig::default().seed);
}

#[test]
fn overrides_win_and_are_typed() {
    let s = Scratch::new();
    let ds = s.file(
        "ds.json",
        r#"{"train_batch_size": 16, "gradient_clipping": 0.5, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}"#,
    );
    let set: Vec<String> = [
        "max_iters=42",
        "learning_rate=3e-4",
        "min_lr = 1",
        "grad_clip=2.5",
        "decay_lr=false",
        "always_save_checkpoint=true",
        "out_dir=2024",
        "init_from=out/gpt2-hf",
        "sample_prompt=\"To be, or not\"",
        "device=cuda:1",
        "dtype=bf16",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let cfg = TrainConfig::load(Some(&shakespeare()), Some(&ds), &set).unwrap();
    assert_eq!(cfg.max_iters, 42);
    assert_eq!(cfg.learning_rate, 3e-4); // over the DeepSpeed optimizer's 1e-3 and the TOML's 2e-3
    assert_eq!(cfg.min_lr, 1.0);
    assert_eq!(cfg.grad_clip, 2.5); // over gradient_clipping
    assert!(!cfg.decay_lr && cfg.always_save_checkpoint);
    assert_eq!(cfg.out_dir, PathBuf::from("2024"));
    assert_eq!(cfg.init_from, "out/gpt2-hf");
    assert_eq!(cfg.sample_prompt, "To be, or not");
    assert_eq!((cfg.device.as_str(), cfg.dtype.as_str()), ("cuda:1", "bf16"));
    assert_eq!(cfg.lr_schedule().lr(5), 3e-4);
    // Later overrides win over earlier ones.
    let cfg = TrainConfig::load(None, None, &["seed=1".into(), "seed=2".into()]).unwrap();
    assert_eq!(cfg.seed, 2);
    // A WarmupCosineLR follows --set learning_rate, as DeepSpeed's follows the optimizer's rate.
    let ds = s.file(
        "cos.json",
        r#"{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}}}"#,
    );
    let cfg = TrainConfig::load(None, Some(&ds), &["learning_rate=5e-4".into()]).unwrap();
    assert!(matches!(cfg.lr_schedule, Some(LrSchedule::WarmupCosineLR { lr, .. }) if lr == 5e-4));
}

#[test]
fn bad_overrides_name_the_key() {
    let cases: &[(&str, &[&str])] = &[
        ("max_iters=1e3", &["max_iters", "integer"]),
        ("max_iters=-5", &["max_iters", "non-negative"]),
        ("decay_lr=yes", &["decay_lr", "true or false"]),
        ("learning_rate=fast", &["learning_rate", "number"]),
        ("lerning_rate=1e-3", &["lerning_rate", "unknown key", "did you mean `learning_rate`?", "valid keys: "]),
        ("max_iters", &["max_iters", "KEY=VALUE"]),
    ];
    for (o, words) in cases {
        let msg = TrainConfig::load(Some(&shakespeare()), None, &[o.to_string()]).unwrap_err().to_string();
        assert!(msg.starts_with(&format!("--set {o}")), "{msg}");
        for w in *words {
            assert!(msg.contains(w), "--set {o}: the message does not say {w:?}: {msg}");
        }
    }
}

#[test]
fn toml_errors_name_file_and_key() {
    let s = Scratch::new();
    let cases: &[(&str, &[&str])] = &[
        ("n_layers = 4\n", &["n_layers", "unknown key", "did you mean `n_layer`?", "max_iters, "]),
        ("zzzzzz = 4\n", &["unknown key `zzzzzz`; valid keys: "]),
        ("max_iters = \"300\"\n", &["max_iters", "integer"]),
        ("decay_lr = 1\n", &["decay_lr", "true or false"]),
        ("dataset = 3\n", &["dataset", "string"]),
        ("learning_rate = [1]\n", &["learning_rate", "number"]),
        ("max_iters = 300\nmax_iters = 400\n", &["max_iters", "line 2"]),
        ("[lr_schedule]\ntype = \"WarmupLR\"\nwarmup_num_step = 10\n", &["warmup_num_step"]),
        ("[lr_schedule]\ntype = \"Linear\"\n", &["Linear"]),
        ("dtype = \"fp8\"\n", &["dtype", "fp8"]),
    ];
    for (text, words) in cases {
        let p = s.file("bad.toml", text);
        let msg = TrainConfig::load(Some(&p), None, &[]).unwrap_err().to_string();
        // Errors found after merging (validate) name the key; all others also name the file.
        if !text.starts_with("dtype") {
            assert!(msg.contains(&p.display().to_string()), "{text}: {msg}");
        }
        for w in *words {
            assert!(msg.contains(w), "{text:?}: the message does not say {w:?}: {msg}");
        }
    }
}

fn round_trip(cfg: &TrainConfig) {
    let s = Scratch::new();
    let text = cfg.to_toml();
    let back =
        TrainConfig::load(Some(&s.file("resolved.toml", &text)), None, &[]).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(&back, cfg, "{text}");
}

#[test]
fn to_toml_round_trips() {
    round_trip(&TrainConfig::default());
    let mut cfg = TrainConfig::load(Some(&shakespeare()), None, &[]).unwrap();
    round_trip(&cfg);
    cfg.resolve_batch(1).unwrap();
    round_trip(&cfg);
    let odd: Vec<String> = [
        "learning_rate=0.30000000000000004",
        "min_lr=1e-300",
        "eps=5e-324",
        "sample_prompt=\"a \\\"quoted\\\"\\tline\\n\"",
        "seed=9223372036854775807",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    round_trip(&TrainConfig::load(None, None, &odd).unwrap());
    // Every DeepSpeed schedule, filled with DeepSpeed's defaults.
    let doc = fixture("schedules.json");
    for case in doc["deepspeed_schedules"].as_array().unwrap() {
        let overrides: Vec<String> =
            case.get("client_lr").map(|b| format!("learning_rate={:e}", f64_bits(b))).into_iter().collect();
        let mut cfg = load_ds(&case["config"], &overrides).unwrap();
        round_trip(&cfg);
        cfg.resolve_batch(2).unwrap();
        round_trip(&cfg);
    }
    let doc = fixture("mapping.json");
    for case in doc["mapped"].as_array().unwrap() {
        round_trip(&load_ds(&case["config"], &[]).unwrap());
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration files as users keep them (lib/config/files.rs), against the tools users run on
// them: DeepSpeed's own loader, PyYAML and nanoGPT's exec (tools/gen_config_file_fixtures.py).

fn files_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/files")
}

fn cfg_value(cfg: &TrainConfig, key: &str) -> toml::Value {
    match toml::Value::try_from(cfg).unwrap() {
        toml::Value::Table(t) => t.get(key).cloned().unwrap_or_else(|| panic!("no key {key}")),
        _ => unreachable!(),
    }
}

/// JSON equality with numbers compared by value: Python's hjson reads `1.0` and `5e8` as ints.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_json(p, q)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn deepspeed_configs_parse_as_deepspeed_parses_them() {
    let expected = fixture("files/expected.json");
    let cases = expected["deepspeed"].as_object().unwrap();
    assert!(cases.len() >= 4);
    for (name, want) in cases {
        let path = files_dir().join(name);
        let got = zerokit::config::files::deepspeed(&path);
        match want.get("ok") {
            Some(ok) => assert!(same_json(&got.unwrap(), ok), "{name}: DeepSpeed reads {ok}"),
            None => {
                let e = got.unwrap_err().to_string();
                assert!(want["error"].as_str().unwrap().contains("Duplicate keys"), "{name}: {want}");
                assert!(
                    e.contains(&path.display().to_string()) && e.contains("duplicate key \"zero_optimization\""),
                    "{e}"
                );
            }
        }
    }
    // The guide's commented ds_config trains: the same configuration as its plain-JSON twin.
    let commented = TrainConfig::load(None, Some(&files_dir().join("ds_config_zero2.json")), &[]).unwrap();
    let s = Scratch::new();
    let plain = s.file("plain.json", &expected["deepspeed"]["ds_config_zero2.json"]["ok"].to_string());
    assert_eq!(commented, TrainConfig::load(None, Some(&plain), &[]).unwrap());
    assert_eq!((commented.zero_stage, commented.dtype.as_str()), (2, "fp16"));
}

#[test]
fn yaml_configs_read_like_toml_with_a_nested_deepspeed_block() {
    let expected = fixture("files/expected.json");
    let yaml = files_dir().join("config.yaml");
    let file = zerokit::config::files::read(&yaml).unwrap();
    assert_eq!(file.deepspeed.unwrap().1, expected["yaml"]["config.yaml"]["deepspeed"]);
    let from_yaml = TrainConfig::load(Some(&yaml), None, &[]).unwrap();
    let from_toml =
        TrainConfig::load(Some(&files_dir().join("config.toml")), Some(&files_dir().join("ds_of_yaml.json")), &[])
            .unwrap();
    assert_eq!(from_yaml, from_toml);
    for (key, want) in expected["yaml"]["config.yaml"].as_object().unwrap() {
        if key != "deepspeed" {
            let got = serde_json::to_value(cfg_value(&from_yaml, key)).unwrap();
            assert!(got == *want || got.as_f64() == want.as_f64() && want.is_number(), "{key}: {got} vs PyYAML {want}");
        }
    }
    // The same keys and the same errors as TOML, naming the file.
    let s = Scratch::new();
    for (text, words) in [
        ("n_layers: 4\n", &["n_layers", "did you mean `n_layer`?"][..]),
        ("max_iters: \"300\"\n", &["max_iters", "integer"]),
        ("decay_lr: 1\n", &["decay_lr", "true or false"]),
        ("- a\n- b\n", &["mapping"]),
        ("max_iters: [1\n", &["invalid YAML"]),
    ] {
        let p = s.file("bad.yaml", text);
        let e = TrainConfig::load(Some(&p), None, &[]).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{text:?}: {e}");
        for w in words {
            assert!(e.contains(w), "{text:?}: {e}");
        }
    }
    let p = s.file("two.yaml", "deepspeed:\n  zero_optimization:\n    stage: 1\n");
    let e = TrainConfig::load(Some(&p), Some(&files_dir().join("ds_of_yaml.json")), &[]).unwrap_err().to_string();
    assert!(e.contains("a second DeepSpeed config"), "{e}");
}

#[test]
fn nanogpt_python_configs_read_as_nanogpt_reads_them() {
    let expected = fixture("files/expected.json");
    for (name, globals) in expected["nanogpt"].as_object().unwrap() {
        let cfg = TrainConfig::load(Some(&files_dir().join(name)), None, &[]).unwrap();
        for (key, want) in globals.as_object().unwrap() {
            if key.starts_with("wandb")
                || ["compile", "dtype", "dataset", "deepspeed_config", "dropout", "bias"].contains(&key.as_str())
            {
                continue;
            }
            // What the DeepSpeed config sets (batch, optimizer, clipping) wins, as under DeepSpeed.
            let ds_keys =
                ["gradient_accumulation_steps", "batch_size", "learning_rate", "beta1", "beta2", "weight_decay"];
            if name == "train_shakespeare_ds.py" && ds_keys.contains(&key.as_str()) {
                continue;
            }
            let got = serde_json::to_value(cfg_value(&cfg, key)).unwrap();
            assert!(got == *want || got.as_f64() == want.as_f64() && want.is_number(), "{name} {key}: {got} vs {want}");
        }
    }
    let cfg = TrainConfig::load(Some(&files_dir().join("train_shakespeare_ds.py")), None, &[]).unwrap();
    // nanoGPT's dataset name is a folder under data/; its dtype names are torch's; the DeepSpeed
    // config it names (beside it) sets the stage and, with fp16 enabled, the precision.
    assert_eq!(cfg.dataset, Path::new("data/shakespeare"));
    assert_eq!((cfg.zero_stage, cfg.dtype.as_str(), cfg.batch_size), (2, "fp16", 8));
    let s = Scratch::new();
    let py = s.file("bf.py", "dtype = 'bfloat16'\n");
    assert_eq!(TrainConfig::load(Some(&py), None, &[]).unwrap().dtype, "bf16");
    for (text, words) in [
        ("dropout = 0.2\n", &["line 1", "dropout", "without dropout"][..]),
        ("import os\n", &["line 1", "not a `key = value` line"]),
        ("n_layer = 4\nbatch_size = os.environ['B']\n", &["line 2", "batch_size", "does not run Python"]),
        ("n_layers = 4\n", &["unknown key `n_layers`"]),
        ("max_iters = '300'\n", &["max_iters", "integer"]),
    ] {
        let p = s.file("bad.py", text);
        let e = TrainConfig::load(Some(&p), None, &[]).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{text:?}: {e}");
        for w in words {
            assert!(e.contains(w), "{text:?}: {e}");
        }
    }
}

#[test]
fn a_global_batch_derives_the_factor_left_out() {
    let s = Scratch::new();
    // TOML with the global and micro batches only: accumulation is derived, as DeepSpeed does.
    let p = s.file("tb.toml", "train_batch_size = 32\nbatch_size = 4\n");
    let mut cfg = TrainConfig::load(Some(&p), None, &[]).unwrap();
    cfg.resolve_batch(2).unwrap();
    assert_eq!((cfg.train_batch_size, cfg.batch_size, cfg.gradient_accumulation_steps), (32, 4, 4));
    // All three given and at odds: the message says how to derive one.
    let p = s.file("tb3.toml", "train_batch_size = 32\nbatch_size = 4\ngradient_accumulation_steps = 1\n");
    let e = TrainConfig::load(Some(&p), None, &[]).unwrap().resolve_batch(2).unwrap_err().to_string();
    assert!(e.contains("set it to 0, to derive it"), "{e}");
    // Without a global batch, the one in effect is what the configuration prints and saves.
    let mut cfg =
        TrainConfig::load(None, None, &["batch_size=3".into(), "gradient_accumulation_steps=2".into()]).unwrap();
    cfg.resolve_batch(4).unwrap();
    assert_eq!(cfg.train_batch_size, 24);
    assert!(cfg.to_toml().contains("train_batch_size = 24"), "{}", cfg.to_toml());
}

#[test]
fn the_deepspeed_launchers_local_rank_argument_is_accepted() {
    use clap::Parser;
    for args in [&["train", "--local_rank=3", "c.toml"][..], &["train", "c.toml", "--local-rank", "3"]] {
        let cli = zerokit::train::TrainCli::try_parse_from(args).unwrap();
        assert_eq!(cli.fit.config.as_deref(), Some(Path::new("c.toml")), "{args:?}");
    }
}

/// The engine's settings come from the configuration: the optimizer's keys, and the loss
/// scaler's keys by name (training never raises at the minimum scale).
#[test]
fn the_engine_settings_are_the_configuration_s() {
    let cfg = zerokit::config::TrainConfig::load(
        None,
        None,
        &[
            "learning_rate=1e-3".into(),
            "beta2=0.99".into(),
            "zero_stage=2".into(),
            "initial_scale_power=12".into(),
            "hysteresis=3".into(),
            "min_loss_scale=0.5".into(),
            "consecutive_hysteresis=true".into(),
            "loss_scale_window=200".into(),
        ],
    )
    .unwrap();
    let e = cfg.engine(tch::Device::Cpu, tch::Kind::Half);
    assert_eq!((e.stage, e.adamw.lr, e.adamw.betas), (2, 1e-3, (0.9, 0.99)));
    let s = e.scaler;
    assert_eq!(
        (s.loss_scale, s.initial_scale_power, s.hysteresis, s.min_loss_scale, s.consecutive_hysteresis),
        (0.0, 12, 3, 0.5, true)
    );
    assert_eq!((s.loss_scale_window, s.raise_error_at_min_scale), (200, false));
}

/// DeepSpeed's "tensorboard" monitor section sets tensorboard_dir (output_path/job_name, with
/// DeepSpeed's default job name); disabled, it sets nothing; its unknown keys are named.
#[test]
fn deepspeed_tensorboard_section_sets_the_event_directory() {
    let dir = |json: &str| {
        from_deepspeed_json(Path::new("ds.json"), json).map(|t| t.get("tensorboard_dir").map(|v| v.to_string()))
    };
    let on =
        r#"{"train_batch_size": 8, "tensorboard": {"enabled": true, "output_path": "runs/tb", "job_name": "gpt2"}}"#;
    assert_eq!(dir(on).unwrap().as_deref(), Some(r#""runs/tb/gpt2""#));
    let default_name = r#"{"train_batch_size": 8, "tensorboard": {"enabled": true, "output_path": "tb/"}}"#;
    assert_eq!(dir(default_name).unwrap().as_deref(), Some(r#""tb/DeepSpeedJobName""#));
    let off = r#"{"train_batch_size": 8, "tensorboard": {"enabled": false, "output_path": "x"}}"#;
    assert_eq!(dir(off).unwrap(), None);
    let odd = r#"{"train_batch_size": 8, "tensorboard": {"enabled": true, "flush_secs": 5}}"#;
    let e = dir(odd).unwrap_err().to_string();
    assert!(e.contains("keys zerokit does not honour: tensorboard.flush_secs"), "{e}");
}

/// A preset is the model it names unless `vocab_size` is set: gemma-2-2b trains with Gemma 2's
/// 256000 rows (2,614,341,888 parameters, as transformers counts them), not GPT-2's 50304, which
/// only custom and GPT-2 models take by default (nanoGPT's padded vocabulary).
#[test]
fn presets_keep_their_own_vocabulary_unless_vocab_size_is_set() {
    use zerokit::train::model_config;
    let cfg = |model: &str, vocab: usize| TrainConfig { model: model.into(), vocab_size: vocab, ..Default::default() };
    for (model, want) in [
        ("custom", 50304),
        ("gpt2", 50304),
        ("llama-3.2-1b", 128256),
        ("mistral-7b", 32000),
        ("qwen2.5-0.5b", 151936),
        ("gemma-2-2b", 256000),
        ("gemma-3-27b", 262208),
        ("llama-tiny", 50304),
    ] {
        assert_eq!(model_config(&cfg(model, 0)).unwrap().vocab_size(), want, "{model}");
        assert_eq!(model_config(&cfg(model, 1000)).unwrap().vocab_size(), 1000, "{model} with vocab_size 1000");
    }
    assert_eq!(model_config(&cfg("gemma-2-2b", 0)).unwrap().num_params(), 2_614_341_888);
}
