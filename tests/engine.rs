//! The ZeRO engine in process: ranks as threads over the CPU backend, no binaries. N ranks at
//! every stage match one rank on the same global batch; `state()` / `load_state()` through a
//! checkpoint move a run between world sizes and stages without changing what it computes; and
//! the engine, which knows no model, trains a small model that is not GPT-2, its gradient norm
//! equal to plain autograd's over the whole batch.

mod common;

use common::engine::*;
use std::path::Path;
use tch::{Device, Kind, TchError, Tensor};
use zerokit::checkpoint::saver::{SaveMode, Saver};
use zerokit::checkpoint::{self, ModelFiles, SaveInfo};
use zerokit::model::{Gpt, GptConfig, HeadGrads, Model};
use zerokit::zero::{Engine, EngineConfig};

fn gpt() -> Gpt {
    let cfg = GptConfig { n_layer: 2, n_head: 2, n_embd: 16, block_size: SEQ as usize, vocab_size: VOCAB as usize };
    Gpt::new(&cfg, Device::Cpu, Kind::Float, 7).unwrap()
}

#[test]
fn n_ranks_match_one_rank_at_every_stage_with_accumulation() {
    let reference = ranks(1, |comm| {
        let mut e = Engine::new(gpt(), engine_config(0, 1), comm).unwrap();
        (train(&mut e, 1, 0, 1, 0..6, LR), weights(&mut e))
    })
    .remove(0);
    assert!(reference.0[5] < reference.0[0], "the loss falls: {:?}", reference.0);
    for stage in 0..=3u8 {
        for (world, accum) in [(2, 1), (3, 1), (2, 3)] {
            let what = format!("stage {stage}, {world} ranks, {accum} micro-steps");
            let out = ranks(world, |comm| {
                let rank = comm.rank();
                let mut e = Engine::new(gpt(), engine_config(stage, accum), comm).unwrap();
                (train(&mut e, world, rank, accum, 0..6, LR), weights(&mut e))
            });
            for (rank, (losses, w)) in out.iter().enumerate() {
                assert_close(losses, &reference.0, 1e-5, &format!("{what}, rank {rank}"));
                assert_weights_close(w, &reference.1, 2e-5, &format!("{what}, rank {rank}"));
            }
        }
    }
}

/// Saves every rank's state through a checkpoint, as `train` does.
fn save<M: Model>(e: &mut Engine<M>, root: &Path, step: u64) {
    let info = SaveInfo {
        tag: checkpoint::tag_name(step),
        step,
        tokens_seen: 0,
        model_config: serde_json::json!({}),
        config: serde_json::json!({}),
        init_dir: None,
        lr: LR,
        data: serde_json::json!({}),
        metrics: serde_json::json!({}),
        keep_last: 0,
        best: None,
    };
    let state = e.state();
    let rank = e.comm().rank();
    let model = e.model_tensors().unwrap().map(|tensors| ModelFiles { tensors, hf_config: "{}".into() });
    assert_eq!(model.is_some(), rank == 0);
    Saver::new().save(e.comm(), &state, model.as_ref(), root, info, SaveMode::Blocking).unwrap();
}

fn resume<M: Model>(e: &mut Engine<M>, root: &Path) {
    let want = e.state();
    let tag = checkpoint::resolve(root, None).unwrap();
    let (_, part) = checkpoint::load(&tag, &want.layout, want.partition, Device::Cpu, &mut || {}).unwrap();
    e.load_state(part).unwrap();
}

#[test]
fn state_moves_between_world_sizes_and_stages_through_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = ranks(1, |comm| {
        let mut e = Engine::new(gpt(), engine_config(0, 1), comm).unwrap();
        train(&mut e, 1, 0, 1, 0..6, LR)
    })
    .remove(0);
    // Three steps on 3 ranks at stage 2 (and at stage 3 with the optimizer offloaded), saved; the
    // next three at other world sizes and stages.
    for save_stage in [2u8, 3] {
        let root = tmp.path().join(format!("run{save_stage}"));
        ranks(3, |comm| {
            let rank = comm.rank();
            let cfg = EngineConfig { offload_optimizer: save_stage == 3, ..engine_config(save_stage, 1) };
            let mut e = Engine::new(gpt(), cfg, comm).unwrap();
            train(&mut e, 3, rank, 1, 0..3, LR);
            save(&mut e, &root, 3);
        });
        for (world, stage) in [(2usize, 1u8), (1, 0), (2, 3), (1, 3)] {
            let what = format!("saved at stage {save_stage}, resumed on {world} ranks at stage {stage}");
            let out = ranks(world, |comm| {
                let rank = comm.rank();
                // A different seed: every weight must come from the checkpoint.
                let cfg = GptConfig {
                    n_layer: 2,
                    n_head: 2,
                    n_embd: 16,
                    block_size: SEQ as usize,
                    vocab_size: VOCAB as usize,
                };
                let mut e =
                    Engine::new(Gpt::new(&cfg, Device::Cpu, Kind::Float, 99).unwrap(), engine_config(stage, 1), comm)
                        .unwrap();
                resume(&mut e, &root);
                train(&mut e, world, rank, 1, 3..6, LR)
            });
            for losses in out {
                assert_close(&losses, &reference[3..], 1e-5, &what);
            }
        }
    }
}

/// A model that is not GPT-2: token embedding, residual tanh MLP blocks, an untied linear head.
struct TinyLm {
    embed: Tensor,
    blocks: Vec<(Tensor, Tensor)>,
    head: Tensor,
}

impl TinyLm {
    fn new(blocks: usize, c: i64) -> TinyLm {
        // Values from a pure function of (seed, index): ranks build the model in their own
        // threads, where libtorch's global generator would race.
        let p = |shape: &[i64], seed: u64| {
            let n: i64 = shape.iter().product();
            let v: Vec<f32> =
                (0..n).map(|i| ((mix(seed, i as u64) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6).collect();
            Tensor::from_slice(&v).view(shape).set_requires_grad(true)
        };
        TinyLm {
            embed: p(&[VOCAB, c], 1),
            blocks: (0..blocks).map(|i| (p(&[c, c], 10 + i as u64), p(&[c], 20 + i as u64))).collect(),
            head: p(&[c, VOCAB], 2),
        }
    }

    fn forward(&self, idx: &Tensor) -> Tensor {
        let mut x = self.embed(idx);
        for i in 0..self.blocks.len() {
            x = self.block(i, &x);
        }
        x.matmul(&self.head)
    }
}

fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    logits.view([-1, VOCAB]).cross_entropy_for_logits(&targets.view([-1]))
}

impl Model for TinyLm {
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("embed".to_string(), self.embed.shallow_clone())];
        for (i, (w, b)) in self.blocks.iter().enumerate() {
            out.push((format!("block{i}.w"), w.shallow_clone()));
            out.push((format!("block{i}.b"), b.shallow_clone()));
        }
        out.push(("head".to_string(), self.head.shallow_clone()));
        out
    }

    /// One bucket per block, the head with the last block, the embedding alone.
    fn buckets(&self) -> Vec<Vec<String>> {
        let n = self.blocks.len();
        let mut buckets: Vec<Vec<String>> = (0..n).rev().map(|i| self.block_parameters(i)).collect();
        buckets[0].push("head".into());
        buckets.push(self.embed_parameters());
        buckets
    }

    fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn embed_parameters(&self) -> Vec<String> {
        vec!["embed".into()]
    }

    fn block_parameters(&self, i: usize) -> Vec<String> {
        vec![format!("block{i}.w"), format!("block{i}.b")]
    }

    fn head_parameters(&self) -> Vec<String> {
        vec!["head".into()]
    }

    fn embed(&self, idx: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed, idx, -1, false, false)
    }

    fn block(&self, i: usize, x: &Tensor) -> Tensor {
        let (w, b) = &self.blocks[i];
        x + (x.matmul(w) + b).tanh()
    }

    fn head_backward(&self, x: &Tensor, targets: &Tensor, scale: f64) -> Result<HeadGrads, TchError> {
        let x = x.detach().set_requires_grad(true);
        let l = loss(&x.matmul(&self.head), targets);
        let mut g = Tensor::f_run_backward(&[&l * scale], &[&self.head, &x], false, false)?;
        let input = g.pop().unwrap();
        Ok(HeadGrads { loss: l.detach(), input, params: vec![("head".into(), g.pop().unwrap())] })
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.head)
    }

    fn set_placement(&mut self, _: Device, _: Kind) {}
}

/// Stage 3 in each of its modes gives one rank's training: parameters gathered and released
/// with and without recomputation, gathered ahead or not, small buckets kept gathered, the
/// optimizer and the parameters offloaded, on one rank and several, with accumulation.
#[test]
fn stage_3_matches_one_rank_in_every_mode() {
    let reference = ranks(1, |comm| {
        let mut e = Engine::new(gpt(), engine_config(0, 1), comm).unwrap();
        (train(&mut e, 1, 0, 1, 0..4, LR), weights(&mut e))
    })
    .remove(0);
    let modes = [
        // (ranks, micro-steps, recompute, prefetch, persistence, offload optimizer, offload params)
        (1, 1, false, 0, 0, false, false),
        (2, 1, true, 0, 0, false, false),
        (2, 1, false, 1 << 30, 0, false, false),
        (3, 1, true, 1 << 30, 1 << 30, false, false),
        (2, 3, true, 1000, 0, true, false),
        (3, 2, false, 1000, 0, true, true),
        (1, 2, true, 1 << 30, 0, true, true),
    ];
    for (world, accum, recompute, prefetch, persist, off_opt, off_par) in modes {
        let what = format!(
            "{world} ranks, {accum} micro-steps, recompute {recompute}, prefetch {prefetch}, persistence {persist}, \
             offload optimizer {off_opt}, parameters {off_par}"
        );
        let out = ranks(world, |comm| {
            let rank = comm.rank();
            let cfg = EngineConfig {
                activation_checkpointing: recompute,
                prefetch_elems: prefetch,
                persistence_threshold: persist,
                offload_optimizer: off_opt,
                offload_params: off_par,
                ..engine_config(3, accum)
            };
            let mut e = Engine::new(gpt(), cfg, comm).unwrap();
            assert!(!e.parameters_resident());
            let losses = train(&mut e, world, rank, accum, 0..4, LR);
            let eval = e.eval_loss(&batch(9, 0..2).0, &batch(9, 0..2).1).unwrap();
            (losses, weights(&mut e), eval)
        });
        for (rank, (losses, w, eval)) in out.iter().enumerate() {
            assert_close(losses, &reference.0, 1e-5, &format!("{what}, rank {rank}"));
            assert_weights_close(w, &reference.1, 2e-5, &format!("{what}, rank {rank}"));
            assert!((eval - out[0].2).abs() < 1e-9, "{what}: every rank evaluates the same batch alike");
        }
    }
}

#[test]
fn offload_and_stage_3_combinations_that_cannot_work_are_refused() {
    for (stage, off_opt, off_par, want) in [
        (0u8, true, false, "optimizer offload needs ZeRO stage 1, 2 or 3"),
        (2, false, true, "parameter offload needs ZeRO stage 3"),
        (4, false, false, "ZeRO stage 4"),
    ] {
        let cfg = EngineConfig { offload_optimizer: off_opt, offload_params: off_par, ..engine_config(stage, 1) };
        let err = ranks(1, |comm| Engine::new(gpt(), cfg.clone(), comm).err().unwrap().to_string()).remove(0);
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn the_engine_trains_a_model_that_is_not_gpt2() {
    // The independent reference: plain autograd over the whole first batch.
    let plain = TinyLm::new(3, 12);
    let (x, y) = batch(0, 0..GLOBAL);
    let l = loss(&plain.forward(&x), &y);
    let params: Vec<Tensor> = plain.named_parameters().into_iter().map(|(_, t)| t).collect();
    let grads = Tensor::run_backward(&[&l], &params.iter().collect::<Vec<_>>(), false, false);
    let norm = grads.iter().map(|g| g.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();

    for (world, stage) in [(1usize, 0u8), (2, 2), (3, 1)] {
        let out = ranks(world, |comm| {
            let rank = comm.rank();
            let mut e = Engine::new(TinyLm::new(3, 12), engine_config(stage, 1), comm).unwrap();
            let b = GLOBAL / world;
            let (x, y) = batch(0, rank * b..(rank + 1) * b);
            e.forward_backward(&x, &y).unwrap();
            let first = e.step(LR).unwrap();
            let later = train(&mut e, world, rank, 1, 1..40, 3e-2);
            (first, later)
        });
        for (first, later) in out {
            let what = format!("{world} ranks, stage {stage}");
            assert!((first.loss - l.double_value(&[])).abs() < 1e-5, "{what}: loss {} vs {}", first.loss, l);
            assert!(
                (first.grad_norm - norm).abs() < 1e-5 * norm,
                "{what}: gradient norm {} vs {norm}",
                first.grad_norm
            );
            assert!(later[38] < 0.8 * first.loss, "{what}: the loss falls: {} -> {}", first.loss, later[38]);
        }
    }
}

#[test]
fn a_model_whose_buckets_are_out_of_gradient_order_is_refused() {
    struct Reversed(TinyLm);
    impl Model for Reversed {
        fn named_parameters(&self) -> Vec<(String, Tensor)> {
            self.0.named_parameters()
        }
        fn buckets(&self) -> Vec<Vec<String>> {
            let mut b = self.0.buckets();
            b.reverse();
            b
        }
        fn n_blocks(&self) -> usize {
            self.0.n_blocks()
        }
        fn embed_parameters(&self) -> Vec<String> {
            self.0.embed_parameters()
        }
        fn block_parameters(&self, i: usize) -> Vec<String> {
            self.0.block_parameters(i)
        }
        fn head_parameters(&self) -> Vec<String> {
            self.0.head_parameters()
        }
        fn embed(&self, idx: &Tensor) -> Tensor {
            self.0.embed(idx)
        }
        fn block(&self, i: usize, x: &Tensor) -> Tensor {
            self.0.block(i, x)
        }
        fn head_backward(&self, x: &Tensor, t: &Tensor, s: f64) -> Result<HeadGrads, TchError> {
            self.0.head_backward(x, t, s)
        }
        fn logits(&self, x: &Tensor) -> Tensor {
            self.0.logits(x)
        }
        fn set_placement(&mut self, d: Device, k: Kind) {
            self.0.set_placement(d, k)
        }
    }
    let err =
        ranks(1, |comm| Engine::new(Reversed(TinyLm::new(2, 8)), engine_config(0, 1), comm).err().unwrap().to_string())
            .remove(0);
    assert!(err.contains("gradient-ready order"), "{err}");
}

/// On a GPU machine (`--ignored`): offloading really moves state through pinned host memory and
/// host AdamW, and stage 3 gathers on the device. One rank on CUDA at stage 0 without offload is
/// the reference; fp32 must agree as closely as two AdamW implementations do (libtorch's fused
/// CUDA kernel against its CPU one), bf16 within bf16's rounding of the weights.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn offload_and_stage_3_on_cuda_match_the_device_reference() {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    let cuda = Device::Cuda(0);
    for (kind, loss_tol, weight_tol) in [(Kind::Float, 1e-5, 5e-5), (Kind::BFloat16, 2e-2, 2e-2)] {
        let run = |stage: u8, off_opt: bool, off_par: bool, pin: bool| {
            ranks(1, |comm| {
                let cfg = EngineConfig {
                    device: cuda,
                    kind,
                    offload_optimizer: off_opt,
                    offload_params: off_par,
                    pin_memory: pin,
                    prefetch_elems: 1000,
                    activation_checkpointing: stage == 3,
                    ..engine_config(stage, 2)
                };
                let mut e = Engine::new(gpt(), cfg, comm).unwrap();
                let mut losses = Vec::new();
                for step in 0..4 {
                    for m in 0..2 {
                        let (x, y) = batch(step, m * 6..m * 6 + 6);
                        e.forward_backward(&x.to_device(cuda), &y.to_device(cuda)).unwrap();
                    }
                    losses.push(e.step(LR).unwrap().loss);
                }
                let w: Vec<(String, Vec<f32>)> = e
                    .gather_parameters(true)
                    .unwrap()
                    .unwrap()
                    .into_iter()
                    .map(|(n, t)| {
                        (
                            n,
                            Vec::<f32>::try_from(t.detach().to_kind(Kind::Float).to_device(Device::Cpu).view(-1))
                                .unwrap(),
                        )
                    })
                    .collect();
                (losses, w)
            })
            .remove(0)
        };
        let reference = run(0, false, false, false);
        for (stage, off_opt, off_par, pin) in [
            (1, true, false, true),
            (2, true, false, false),
            (3, false, false, false),
            (3, true, true, true),
            (3, false, true, true),
            (3, false, true, false),
        ] {
            let what =
                format!("{kind:?}, stage {stage}, offload optimizer {off_opt}, parameters {off_par}, pinned {pin}");
            let (losses, w) = run(stage, off_opt, off_par, pin);
            println!("{what}: losses {losses:?} against {:?}", reference.0);
            assert_close(&losses, &reference.0, loss_tol, &what);
            assert_weights_close(&w, &reference.1, weight_tol, &what);
        }
    }
}

/// On a GPU machine (`--ignored`): zerokit's AdamW kernel, which reads the model's gradients
/// where they lie (one rank, one micro-step) or the fp32 gradient partition (accumulating) and
/// writes the model's weights itself, trains as libtorch's fused AdamW followed by the weight
/// copy does, in fp32, bf16 and fp16 (with loss scaling), at stages 0 and 1.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn zerokit_adamw_trains_as_libtorch_fused_adamw_on_cuda() {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    let cuda = Device::Cuda(0);
    for (kind, loss_tol, weight_tol) in
        [(Kind::Float, 1e-6, 1e-5), (Kind::BFloat16, 1e-3, 1e-2), (Kind::Half, 1e-3, 1e-2)]
    {
        for (stage, accum) in [(0u8, 1usize), (1, 1), (0, 2), (1, 2)] {
            let run = |own: bool| {
                ranks(1, |comm| {
                    let cfg = EngineConfig { device: cuda, kind, ..engine_config(stage, accum) };
                    let mut e = Engine::new(gpt(), cfg, comm).unwrap();
                    e.set_zerokit_adamw(own).unwrap();
                    let b = GLOBAL / accum;
                    let mut losses = Vec::new();
                    for step in 0..5 {
                        for m in 0..accum {
                            let (x, y) = batch(step, m * b..(m + 1) * b);
                            e.forward_backward(&x.to_device(cuda), &y.to_device(cuda)).unwrap();
                        }
                        losses.push(e.step(LR).unwrap().loss);
                    }
                    let w: Vec<(String, Vec<f32>)> = e
                        .model
                        .named_parameters()
                        .into_iter()
                        .map(|(n, t)| {
                            let v = t.detach().to_kind(Kind::Float).to_device(Device::Cpu).view(-1);
                            (n, Vec::<f32>::try_from(v).unwrap())
                        })
                        .collect();
                    (losses, w, e.held().grad)
                })
                .remove(0)
            };
            let what = format!("{kind:?}, stage {stage}, {accum} micro-steps");
            let (own, libtorch) = (run(true), run(false));
            let same = own.0 == libtorch.0 && own.1 == libtorch.1;
            println!("{what}: losses {:?} against {:?} (bitwise {same})", own.0, libtorch.0);
            assert_close(&own.0, &libtorch.0, loss_tol, &what);
            assert_weights_close(&own.1, &libtorch.1, weight_tol, &what);
            // One micro-step keeps no fp32 gradient partition.
            assert_eq!(own.2 == 0, accum == 1, "{what}: fp32 gradient partition of {} bytes", own.2);
            assert!(libtorch.2 > 0, "{what}");
        }
    }
}
