//! lib/scaler.rs replayed against DeepSpeed's DynamicLossScaler (fixtures from
//! tools/gen_scaler_fixtures.py).

use std::path::Path;
use tch::{Device, Kind, Tensor};
use zerokit::optim::local_grad_norm_sq;
use zerokit::scaler::{LossScaler, ScalerConfig, ScalerError, StepDecision};

#[derive(serde::Deserialize)]
struct Case {
    config: serde_json::Value,
    overflow: String,
    scale: Vec<f64>,
    skipped: String,
    hysteresis: Vec<u32>,
    error_at: Option<usize>,
}

fn cases() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scaler/dynamic.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(doc["cases"].clone()).unwrap()
}

#[test]
fn replays_deepspeed_dynamic_loss_scaler_exactly() {
    let cases = cases();
    assert!(cases.len() >= 8);
    let mut steps = 0;
    for case in &cases {
        // The fixture's config is a DeepSpeed fp16 block: it deserializes as is.
        let cfg: ScalerConfig = serde_json::from_value(case.config.clone()).unwrap();
        let mut scaler = LossScaler::new(cfg.clone()).unwrap();
        assert_eq!(scaler.scale(), 2f64.powi(cfg.initial_scale_power as i32));
        for (i, o) in case.overflow.bytes().enumerate() {
            let overflow = o == b'1';
            match scaler.update(overflow) {
                Ok(decision) => {
                    assert!(case.error_at.is_none_or(|e| i < e), "{cfg:?}: step {i} should have failed");
                    let want_skip = case.skipped.as_bytes()[i] == b'1';
                    assert_eq!(decision == StepDecision::Skip, want_skip, "{cfg:?} step {i}");
                    assert_eq!(scaler.scale().to_bits(), case.scale[i].to_bits(), "{cfg:?} step {i}: scale");
                    assert_eq!(scaler.state().cur_hysteresis, case.hysteresis[i], "{cfg:?} step {i}: hysteresis");
                    assert_eq!(scaler.state().cur_iter, i as u64 + 1);
                    steps += 1;
                }
                Err(ScalerError::AtMinimum(s)) => {
                    assert_eq!(case.error_at, Some(i), "{cfg:?}: unexpected error at step {i}");
                    assert_eq!(s, cfg.min_loss_scale);
                    break;
                }
                Err(e) => panic!("{cfg:?} step {i}: {e}"),
            }
        }
    }
    assert!(steps > 10_000, "only {steps} steps replayed");
}

#[test]
fn state_round_trip_resumes_exactly() {
    let case = &cases()[1];
    let cfg: ScalerConfig = serde_json::from_value(case.config.clone()).unwrap();
    let mut a = LossScaler::new(cfg.clone()).unwrap();
    let flags: Vec<bool> = case.overflow.bytes().map(|b| b == b'1').collect();
    for &o in &flags[..700] {
        a.update(o).unwrap();
    }
    let saved = serde_json::to_string(a.state()).unwrap();
    let mut b = LossScaler::new(cfg).unwrap();
    b.load_state(serde_json::from_str(&saved).unwrap()).unwrap();
    for (i, &o) in flags.iter().enumerate().skip(700) {
        assert_eq!(a.update(o).unwrap(), b.update(o).unwrap());
        assert_eq!(b.scale(), case.scale[i]);
    }
    assert_eq!(a.state(), b.state());
}

#[test]
fn static_scale_and_disabled() {
    let cfg = ScalerConfig { loss_scale: 128.0, ..ScalerConfig::default() };
    let mut s = LossScaler::new(cfg).unwrap();
    assert_eq!(s.scale(), 128.0);
    assert_eq!(s.update(true).unwrap(), StepDecision::Skip);
    assert_eq!(s.update(false).unwrap(), StepDecision::Apply);
    for _ in 0..5000 {
        s.update(false).unwrap();
    }
    assert_eq!(s.scale(), 128.0, "a static scale never moves");
    // bf16 and fp32 training's scaler: a static scale of 1 (DeepSpeed does the same).
    let mut d = LossScaler::new(ScalerConfig { loss_scale: 1.0, ..ScalerConfig::default() }).unwrap();
    assert_eq!(d.scale(), 1.0);
    assert_eq!(d.update(true).unwrap(), StepDecision::Skip);
}

#[test]
fn rejects_bad_config_and_state() {
    let bad = |c: ScalerConfig| matches!(LossScaler::new(c), Err(ScalerError::Config(_)));
    let d = ScalerConfig::default();
    assert!(bad(ScalerConfig { loss_scale: -1.0, ..d.clone() }));
    assert!(bad(ScalerConfig { loss_scale: f64::NAN, ..d.clone() }));
    assert!(bad(ScalerConfig { loss_scale_window: 0, ..d.clone() }));
    assert!(bad(ScalerConfig { min_loss_scale: 0.0, ..d.clone() }));
    assert!(bad(ScalerConfig { hysteresis: 0, ..d.clone() }));
    // A static scale ignores the dynamic knobs, as DeepSpeed's validation does.
    assert!(LossScaler::new(ScalerConfig { loss_scale: 4.0, loss_scale_window: 0, ..d.clone() }).is_ok());

    let mut s = LossScaler::new(d).unwrap();
    let st = s.state().clone();
    let with = |f: &dyn Fn(&mut zerokit::scaler::ScalerState)| {
        let mut x = st.clone();
        f(&mut x);
        x
    };
    assert!(s.load_state(with(&|x| x.cur_scale = 0.0)).is_err());
    assert!(s.load_state(with(&|x| x.cur_hysteresis = 3)).is_err());
    assert!(s.load_state(with(&|x| x.last_overflow_iter = 5)).is_err());
    assert_eq!(s.state(), &st, "a rejected state leaves the scaler as it was");
}

#[test]
fn ignores_deepspeed_keys_it_does_not_own() {
    let cfg: ScalerConfig = serde_json::from_str(
        r#"{"enabled": true, "auto_cast": false, "loss_scale": 0, "initial_scale_power": 12, "hysteresis": 1}"#,
    )
    .unwrap();
    assert_eq!(cfg.initial_scale_power, 12);
    assert_eq!(cfg.loss_scale_window, 1000);
    assert_eq!(LossScaler::new(cfg).unwrap().scale(), 4096.0);
}

/// The engine's overflow check: the squared norm of the fp32 flat gradient (which the model's
/// gradients, in any kind, are accumulated into) is non-finite exactly when an element is, and
/// stays on the device as a 0-dim fp64 tensor until the ranks all-reduce it.
fn check_overflow_detection(dev: Device) {
    let overflows = |grad: &Tensor| {
        let flag = local_grad_norm_sq(&grad.to_kind(Kind::Float)).unwrap();
        assert_eq!((flag.kind(), flag.dim(), flag.device()), (Kind::Double, 0, dev));
        !flag.double_value(&[]).is_finite()
    };
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        let clean = Tensor::randn([10_001], (Kind::Float, dev)).to_kind(kind);
        assert!(!overflows(&clean), "{kind:?} {dev:?}");
        for bad in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
            let t = clean.copy();
            let _ = t.narrow(0, 7777, 1).fill_(bad);
            assert!(overflows(&t), "{bad} in {kind:?} on {dev:?}");
        }
        // fp16's largest finite values: the fp32 sum of their squares stays finite.
        let big = Tensor::full([4096], 65504.0, (kind, dev));
        assert!(!overflows(&big), "{kind:?} on {dev:?}");
    }
}

#[test]
fn overflow_check_finds_inf_and_nan() {
    check_overflow_detection(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn overflow_check_finds_inf_and_nan_on_cuda() {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    check_overflow_detection(Device::Cuda(0));
}
