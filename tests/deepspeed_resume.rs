//! Resuming DeepSpeed ZeRO checkpoints in zerokit (issue 14, item 5).
//!
//! tests/fixtures/deepspeed/<case>/ are real DeepSpeed checkpoints (tools/gen_deepspeed_fixtures.py)
//! with DeepSpeed's own consolidation of their fp32 weights (reference.safetensors, from
//! zero_to_fp32) and of their Adam moments (reference_moments.safetensors, from its universal
//! checkpoint conversion). Every fixture is re-partitioned for zerokit layouts of several world
//! sizes, and the partitions, put back together, must equal DeepSpeed's values bit for bit.

use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};
use zerokit::interop::deepspeed_resume::DeepSpeedResume;
use zerokit::model::gpt2::GptConfig;
use zerokit::optim::AdamWConfig;
use zerokit::scaler::ScalerConfig;
use zerokit::zero::layout::FlatLayout;
use zerokit::zero::EngineConfig;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepspeed")
}

/// The fixtures' model (tools/gen_deepspeed_fixtures.py's tiny_gpt2), with wrong position and
/// vocabulary sizes that `model_config` must replace by the checkpoint's.
fn base() -> GptConfig {
    GptConfig { n_layer: 2, n_head: 3, n_embd: 9, block_size: 1024, vocab_size: 50257 }
}

fn engine(kind: Kind) -> EngineConfig {
    EngineConfig {
        stage: 2,
        grad_accum: 1,
        grad_clip: 1.0,
        activation_checkpointing: false,
        kind,
        device: Device::Cpu,
        adamw: AdamWConfig::default(),
        scaler: ScalerConfig::default(),
    }
}

/// name -> fp32 values of a safetensors file.
fn read_f32(path: &Path) -> (HashMap<String, Vec<f32>>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(n, v)| (n, v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect();
    (t, meta.metadata().clone().unwrap_or_default())
}

fn values(t: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

/// Every partition of `layout` loaded from `ds`, put back together: name -> [master, exp_avg,
/// exp_avg_sq], checking on the way that padding holds zeros.
fn reassemble(ds: &DeepSpeedResume, layout: &FlatLayout, kind: Kind) -> (HashMap<String, [Vec<f32>; 3]>, u64) {
    let mut full: HashMap<String, [Vec<f32>; 3]> =
        layout.params.iter().map(|p| (p.name.clone(), [0, 1, 2].map(|_| vec![f32::NAN; p.numel]))).collect();
    let mut step = None;
    for part in 0..layout.parts {
        let st = ds.load_partition(layout, part, &engine(kind), &mut || {}).unwrap();
        let parts = [values(&st.master), values(&st.exp_avg), values(&st.exp_avg_sq)];
        let mut covered = vec![false; layout.partition];
        for p in layout.pieces(part) {
            let name = &layout.params[p.param].name;
            for (k, v) in parts.iter().enumerate() {
                full.get_mut(name).unwrap()[k][p.param_offset..p.param_offset + p.len]
                    .copy_from_slice(&v[p.partition_offset..p.partition_offset + p.len]);
            }
            covered[p.partition_offset..p.partition_offset + p.len].iter_mut().for_each(|c| *c = true);
        }
        for v in &parts {
            assert!(v.iter().zip(&covered).all(|(x, c)| *c || *x == 0.0), "padding is not zero");
        }
        assert!(step.is_none_or(|s| s == st.optimizer_step));
        step = Some(st.optimizer_step);
    }
    (full, step.unwrap())
}

/// A layout of the model's parameters over `parts` partitions, with buckets unlike DeepSpeed's
/// groups (three, by position in the list), so partitions cut parameters at other places.
fn layout(cfg: &GptConfig, parts: usize) -> FlatLayout {
    let params: Vec<(String, Vec<usize>, usize)> = cfg
        .param_specs()
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), s.shape.iter().map(|&d| d as usize).collect(), i % 3))
        .collect();
    FlatLayout::new(&params, parts).unwrap()
}

#[test]
fn every_fixture_resumes_with_deepspeeds_weights_and_moments_bit_for_bit() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("reference_moments.safetensors").exists())
        .collect();
    cases.sort();
    let names: Vec<String> = cases.iter().map(|c| c.file_name().unwrap().to_string_lossy().into_owned()).collect();
    // Every stage in both dtypes.
    for want in ["s1_fp16", "s1_bf16", "s2_fp16", "s2_bf16", "s3_fp16", "s3_bf16"] {
        assert!(names.iter().any(|n| n.starts_with(want)), "no {want} fixture among {names:?}");
    }
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let fp16 = name.contains("fp16");
        let mut ds = DeepSpeedResume::open(&case.join("global_step3")).unwrap();
        let cfg = ds.model_config(base()).unwrap();
        assert_eq!((cfg.block_size, cfg.vocab_size), (12, 37), "{name}: positions and vocabulary from wpe, wte");
        ds.check(&cfg.param_specs()).unwrap();
        assert_eq!(ds.step(), 3, "{name}");

        let (weights, _) = read_f32(&case.join("reference.safetensors"));
        let (moments, meta) = read_f32(&case.join("reference_moments.safetensors"));
        let frozen = !moments.contains_key("transformer.wpe.weight/exp_avg");
        for parts in [1, 2, 3] {
            let kind = if fp16 { Kind::Half } else { Kind::BFloat16 };
            let (full, step) = reassemble(&ds, &layout(&cfg, parts), kind);
            assert_eq!(step.to_string(), meta["step"], "{name}: Adam's step");
            for (param, [master, avg, sq]) in &full {
                let what = format!("{name}, {parts} partition(s): {param}");
                assert_eq!(master, &weights[param], "{what}: master weights differ from zero_to_fp32's");
                if frozen && param == "transformer.wpe.weight" {
                    assert!(
                        avg.iter().chain(sq).all(|&x| x == 0.0),
                        "{what}: a frozen parameter starts with zero moments"
                    );
                    continue;
                }
                assert_eq!(avg, &moments[&format!("{param}/exp_avg")], "{what}: exp_avg");
                assert_eq!(sq, &moments[&format!("{param}/exp_avg_sq")], "{what}: exp_avg_sq");
            }
        }
        // The fp16 fixtures' dynamic loss scale (2^4 initially, no overflow in 3 steps) carries
        // into an fp16 run; bf16 checkpoints have none, and a bf16 run takes none.
        let l = layout(&cfg, 1);
        let scaler = ds.load_partition(&l, 0, &engine(Kind::Half), &mut || {}).unwrap().scaler;
        if fp16 {
            let s = scaler.expect("fp16 scaler state");
            assert_eq!((s.cur_scale, s.cur_iter, s.last_overflow_iter, s.cur_hysteresis), (16.0, 3, -1, 2), "{name}");
        } else {
            assert!(scaler.is_none(), "{name}");
        }
        assert!(ds.load_partition(&l, 0, &engine(Kind::BFloat16), &mut || {}).unwrap().scaler.is_none());
        // What does not carry over is said: the data position always, the buffers and frozen
        // parameters of these fixtures.
        let notes = ds.not_carried_over(&engine(Kind::BFloat16), 1e-2).join("\n");
        assert!(notes.contains("data position") && notes.contains("zk_float_buffer, zk_int_buffer"), "{notes}");
        assert_eq!(notes.contains("frozen parameters: transformer.wpe.weight"), frozen, "{notes}");
        assert!(notes.contains("AdamW settings"), "the fixtures' betas differ from zerokit's default: {notes}");
    }
}

#[test]
fn a_model_that_differs_from_the_checkpoints_is_refused_naming_file_and_tensor() {
    let dir = fixtures().join("s3_bf16_w2/global_step3");
    let file = "zero_pp_rank_0_mp_rank_00_model_states.pt";
    let refused = |cfg: GptConfig| {
        let mut ds = DeepSpeedResume::open(&dir).unwrap();
        let cfg = ds.model_config(cfg).unwrap();
        ds.check(&cfg.param_specs()).unwrap_err().to_string()
    };
    let e = refused(GptConfig { n_layer: 1, ..base() });
    assert!(e.contains(file) && e.contains("tensor transformer.h.1.") && e.contains("not a parameter"), "{e}");
    let e = refused(GptConfig { n_layer: 3, ..base() });
    assert!(e.contains(file) && e.contains("no tensor for this run's parameter transformer.h.2."), "{e}");
    let e = refused(GptConfig { n_embd: 12, n_head: 3, ..base() });
    assert!(
        e.contains(file)
            && e.contains("tensor transformer.wte.weight has shape [37, 9], this run's model has [37, 12]"),
        "{e}"
    );
}

#[test]
fn damaged_moments_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("s1_fp16_w2/global_step3");
    let dir = tmp.path().join("global_step3");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    // Flip a byte of the exp_avg_sq of rank 1's second group, read only when resuming.
    let f = dir.join("zero_pp_rank_1_mp_rank_00_optim_states.pt");
    let tf = zerokit::formats::torch_zip::TorchFile::open(&f).unwrap();
    let osd = tf.root().get("optimizer_state_dict").unwrap();
    let state = osd.get("base_optimizer_state").unwrap().get("state").unwrap();
    let t = state.dict_items().unwrap()[1].1.get("exp_avg_sq").unwrap().as_tensor().unwrap().clone();
    let (start, _) = tf.tensor_span(&t).unwrap();
    drop(tf);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[start as usize] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
    // zero-to-fp32 reads no moments and still converts.
    let src = zerokit::convert::open_source(&dir, None).unwrap();
    src.prepare().unwrap();
    let mut ds = DeepSpeedResume::open(&dir).unwrap();
    let cfg = ds.model_config(base()).unwrap();
    ds.check(&cfg.param_specs()).unwrap();
    let Err(e) = ds.load_partition(&layout(&cfg, 1), 0, &engine(Kind::Half), &mut || {}) else {
        panic!("a damaged moment was read")
    };
    let e = e.to_string();
    assert!(e.contains("zero_pp_rank_1_mp_rank_00_optim_states.pt") && e.contains("CRC-32"), "{e}");
}
