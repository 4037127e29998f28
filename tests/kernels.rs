//! zerokit's fused kernels (lib/kernels) against libtorch. On CPU: the kernel source compiled by
//! NVRTC for every target architecture; the classifier's reference (the
//! path CPU runs take, and the yardstick of the kernel) against libtorch's own cross-entropy and
//! autograd; the gated MLP's autograd function against the composed ops, bit for bit. On a GPU
//! machine (`--ignored`): the NVRTC kernel against that reference in every kind and on odd shapes,
//! the head's backward built on it against plain autograd, libtorch's fused RMSNorm and the gated
//! product against their references, the column-sum kernel (bias and LayerNorm parameter
//! gradients) against float64 sums, the widening copy against libtorch's, the AdamW kernel
//! against libtorch's fused AdamW and its gradient sum of squares against float64, and two
//! deterministic training runs compared bit for bit.

mod common;

use common::tiny::{config, dataset, launch_args, train_command};
use std::path::Path;
use tch::{Device, Kind, Reduction, Tensor};
use zerokit::kernels::{
    activated_linear, activated_linear_reference, add_layer_norm, add_layer_norm_reference, classifier,
    classifier_reference, fused_on, gated_product, gated_product_reference, layer_norm, layer_norm_reference, linear,
    linear_reference, rms_norm, rms_norm_reference, sum_of_squares, widen_into, AdamWPiece, Gate, PieceTable, Span,
};
use zerokit::model::{Gpt, GptConfig, Model};
use zerokit::optim::{AdamW, AdamWConfig, Segment};

/// Random logits [n, v] of `kind` with a wide spread, targets with some ignored (-1) rows, and
/// the count of a micro-batch larger than this chunk (so the gradient is not just the chunk's
/// mean).
fn case(n: i64, v: i64, kind: Kind, device: Device, seed: i64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(seed);
    let logits = (Tensor::randn([n, v], (Kind::Float, device)) * 4.0).to_kind(kind);
    let targets = Tensor::randint(v, [n], (Kind::Int64, device));
    if n > 2 {
        let _ = targets.narrow(0, 1, 1).fill_(-1);
        let _ = targets.narrow(0, n - 1, 1).fill_(v - 1);
    }
    let counted = targets.ne(-1).sum(Kind::Float).double_value(&[]);
    let count = Tensor::from_slice(&[(counted + 3.0) as f32]).to_device(device);
    (logits, targets, count)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// The reference against libtorch's cross-entropy (summed, over counted rows) and the gradient
/// autograd gives for `sum / count * scale`, through the fp32 upcast the models use.
#[test]
fn classifier_reference_matches_cross_entropy_and_autograd() {
    for (kind, tol) in [(Kind::Float, 1e-6), (Kind::BFloat16, 1e-2), (Kind::Half, 2e-3)] {
        let (logits, targets, count) = case(7, 37, kind, Device::Cpu, 1);
        let scale = 1024.0;
        let leaf = logits.detach().set_requires_grad(true);
        let sum = leaf.to_kind(Kind::Float).cross_entropy_loss(&targets, None::<Tensor>, Reduction::Sum, -1, 0.0);
        let scaled = &sum / &count * scale;
        let grad = Tensor::run_backward(&[&scaled], &[&leaf], false, false).pop().unwrap();

        let work = logits.copy();
        let rows = classifier_reference(&work, &targets, &count, scale).unwrap();
        assert_eq!(rows.kind(), Kind::Float);
        assert_eq!(rows.double_value(&[1]), 0.0, "an ignored row has no loss");
        let loss_err = (rows.sum(Kind::Float) - &sum).abs().double_value(&[]) / sum.double_value(&[]);
        assert!(loss_err < 1e-6, "{kind:?}: loss relative error {loss_err:e}");
        assert_eq!(work.kind(), kind);
        let err = max_abs(&(work.to_kind(Kind::Float) - grad.to_kind(Kind::Float))) / max_abs(&grad);
        assert!(err <= tol, "{kind:?}: gradient relative error {err:e} (tolerance {tol:e})");
        assert_eq!(max_abs(&work.narrow(0, 1, 1)), 0.0, "an ignored row has no gradient");
    }
}

/// The kinds a kernel test runs in on `device` (libtorch's CPU ops have no fp16 matmul).
fn kinds_on(device: Device) -> Vec<Kind> {
    let mut kinds = vec![Kind::Float, Kind::BFloat16];
    if device != Device::Cpu {
        kinds.push(Kind::Half);
    }
    kinds
}

/// The GPU of a kernel test, with zerokit's kernels compiled and loaded on it.
fn fused_cuda() -> Device {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    assert!(fused_on(Device::Cuda(0)), "the fused kernels did not compile or load (see the log)");
    Device::Cuda(0)
}

/// Forward output and the gradients of `inputs` for a fixed upstream gradient (a sine of the
/// position), through `f`.
fn value_and_grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, seed: i64) -> Vec<Tensor> {
    let leaves: Vec<Tensor> = inputs.iter().map(|t| t.detach().set_requires_grad(true)).collect();
    let y = f(&leaves);
    let g = upstream(&y, seed);
    let grads = Tensor::run_backward(&[&y * &g], &leaves, false, false);
    std::iter::once(y.detach()).chain(grads).collect()
}

/// The upstream gradient `value_and_grads` gives y: a fixed function of the position, not the
/// global generator (tests run in parallel threads, and another test's draws between two calls
/// here gave the two sides different gradients).
fn upstream(y: &Tensor, seed: i64) -> Tensor {
    (Tensor::arange(y.numel() as i64, (Kind::Float, y.device())) * 0.7548 + seed as f64)
        .sin()
        .view(y.size().as_slice())
        .to_kind(y.kind())
}

/// The unit roundoff of `kind`.
fn unit_roundoff(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => 2f64.powi(-8),
        Kind::Half => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

/// A parameter gradient that is a sum over rows (`terms` [rows, cols], float64) against the
/// float64 sum: within one rounding into its kind, fp32 accumulation over the rows, and `slack`
/// (per column: the terms' own fp32 error where they are computed, as LayerNorm's x̂).
fn assert_column_sums(got: &Tensor, terms: &Tensor, slack: Option<&Tensor>, what: &str) {
    let exact = terms.sum_dim_intlist(0, false, Kind::Double);
    let mut bound =
        exact.abs() * unit_roundoff(got.kind()) + terms.abs().sum_dim_intlist(0, false, Kind::Double) * 1e-6 + 1e-30;
    if let Some(s) = slack {
        bound += s;
    }
    let over = ((got.to_kind(Kind::Double) - &exact).abs() - bound).max().double_value(&[]);
    assert!(over <= 0.0, "{what}: off the float64 sum by {over:e} beyond its bound");
}

/// The gated product keeps only gate and up for backward and recomputes the activation there;
/// its value and both gradients are bitwise the composed ops', for SiLU and tanh-GELU, in fp32
/// and bf16, on `device`.
fn gated_product_is_bitwise_the_composed_ops(device: Device) {
    for kind in kinds_on(device) {
        for act in [Gate::Silu, Gate::GeluTanh] {
            for (i, shape) in [[2i64, 5, 7], [1, 1, 1], [3, 17, 96]].into_iter().enumerate() {
                tch::manual_seed(i as i64);
                let gate = (Tensor::randn(shape, (Kind::Float, device)) * 3.0).to_kind(kind);
                let up = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
                let ours = value_and_grads(
                    &[gate.shallow_clone(), up.shallow_clone()],
                    |t| gated_product(&t[0], &t[1], act).unwrap(),
                    7,
                );
                let reference = value_and_grads(&[gate, up], |t| gated_product_reference(&t[0], &t[1], act), 7);
                for (what, (a, b)) in
                    ["value", "gate's gradient", "up's gradient"].iter().zip(ours.iter().zip(&reference))
                {
                    assert!(a.equal(b), "{device:?} {kind:?} {act:?} {shape:?}: the {what} differs");
                }
            }
        }
    }
    // No gradient wanted: a plain value.
    let x = Tensor::ones([4], (Kind::Float, device));
    assert!(!gated_product(&x, &x, Gate::Silu).unwrap().requires_grad());
}

#[test]
fn gated_product_matches_the_composed_ops_bitwise_on_cpu() {
    gated_product_is_bitwise_the_composed_ops(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn gated_product_matches_the_composed_ops_bitwise_on_cuda() {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    gated_product_is_bitwise_the_composed_ops(Device::Cuda(0));
}

/// GPT-2's MLP projection on its GELU keeps only the pre-activation for backward; its value and
/// the gradients of pre-activation, weight and bias are bitwise the composed ops' (addmm on
/// gelu), in every kind, on odd shapes and GPT-2's, on `device`.
fn activated_linear_is_bitwise_the_composed_ops(device: Device) {
    for kind in kinds_on(device) {
        for act in [Gate::GeluTanh, Gate::Silu] {
            for (i, (rows, n_in, n_out)) in
                [(5i64, 7i64, 3i64), (1, 1, 1), (33, 96, 24), (64, 256, 64)].into_iter().enumerate()
            {
                tch::manual_seed(10 + i as i64);
                let pre = (Tensor::randn([rows, n_in], (Kind::Float, device)) * 3.0).to_kind(kind);
                let weight = (Tensor::randn([n_in, n_out], (Kind::Float, device)) / (n_in as f64).sqrt()).to_kind(kind);
                let bias = (Tensor::randn([n_out], (Kind::Float, device)) * 0.1).to_kind(kind);
                let inputs = [pre, weight, bias];
                let ours = value_and_grads(&inputs, |t| activated_linear(&t[0], &t[1], &t[2], act).unwrap(), 9);
                let reference = value_and_grads(&inputs, |t| activated_linear_reference(&t[0], &t[1], &t[2], act), 9);
                let case = format!("{device:?} {kind:?} {act:?} [{rows}, {n_in}] x [{n_in}, {n_out}]");
                assert_bitwise_but_bias(&ours, &reference, &["value", "pre's gradient", "weight's gradient"], &case);
                let g = upstream(&ours[0], 9).to_kind(Kind::Double);
                assert_column_sums(&ours[3], &g, None, &format!("{case}: the bias's gradient"));
            }
        }
    }
    let x = Tensor::ones([2, 3], (Kind::Float, device));
    let err = activated_linear(&x, &x, &x, Gate::GeluTanh).unwrap_err().to_string();
    assert!(err.contains("bias [out]"), "{err}");
}

/// `ours` and `reference` (value, then gradients, the last a bias's) agree bit for bit but for
/// the last: on a GPU the column-sum kernel adds the bias's gradient in another order than
/// libtorch's reduction (checked against the float64 sum by the caller), on the CPU the same
/// reduction runs and it agrees too.
fn assert_bitwise_but_bias(ours: &[Tensor], reference: &[Tensor], names: &[&str], case: &str) {
    let n = ours.len() - 1;
    assert_eq!(names.len(), n);
    for (what, (a, b)) in names.iter().zip(ours.iter().zip(reference)) {
        assert!(a.equal(b), "{case}: the {what} differs");
    }
    if ours[n].device() == Device::Cpu {
        assert!(ours[n].equal(&reference[n]), "{case}: the bias's gradient differs on the CPU");
    }
}

/// A Conv1D through `kernels::linear` against addmm: value, input's and weight's gradients
/// bitwise; the bias's gradient bitwise on the CPU and, on a GPU, within rounding of the float64
/// sum and the same bits on a second run. Odd shapes (scalar loads, several column tiles, many
/// row chunks) and GPT-2's.
fn linear_matches_addmm(device: Device) {
    for kind in kinds_on(device) {
        for (i, (rows, n_in, n_out)) in
            [(5i64, 7i64, 3i64), (1, 1, 1), (1000, 24, 130), (5000, 16, 7), (2048, 768, 2304)].into_iter().enumerate()
        {
            tch::manual_seed(30 + i as i64);
            let x = Tensor::randn([rows, n_in], (Kind::Float, device)).to_kind(kind);
            let weight = (Tensor::randn([n_in, n_out], (Kind::Float, device)) / (n_in as f64).sqrt()).to_kind(kind);
            let bias = (Tensor::randn([n_out], (Kind::Float, device)) * 0.1).to_kind(kind);
            let inputs = [x, weight, bias];
            let ours = value_and_grads(&inputs, |t| linear(&t[0], &t[1], &t[2]).unwrap(), 4);
            let again = value_and_grads(&inputs, |t| linear(&t[0], &t[1], &t[2]).unwrap(), 4);
            let reference = value_and_grads(&inputs, |t| linear_reference(&t[0], &t[1], &t[2]), 4);
            let case = format!("{device:?} {kind:?} [{rows}, {n_in}] x [{n_in}, {n_out}]");
            assert_bitwise_but_bias(&ours, &reference, &["value", "input's gradient", "weight's gradient"], &case);
            assert_column_sums(&ours[3], &upstream(&ours[0], 4).to_kind(Kind::Double), None, &format!("{case}: bias"));
            assert!(ours[3].equal(&again[3]), "{case}: the bias's gradient differs between two runs");
        }
    }
    let x = Tensor::ones([2, 3], (Kind::Float, device));
    let err = linear(&x, &x, &x).unwrap_err().to_string();
    assert!(err.contains("bias [out]"), "{err}");
}

#[test]
fn linear_matches_addmm_on_cpu() {
    linear_matches_addmm(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn linear_matches_addmm_on_cuda() {
    linear_matches_addmm(fused_cuda());
}

/// The gradients of `inputs` for upstream gradient `g` of f's output.
fn grads_with(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, g: &Tensor) -> Vec<Tensor> {
    let leaves: Vec<Tensor> = inputs.iter().map(|t| t.detach().set_requires_grad(true)).collect();
    let y = f(&leaves);
    Tensor::run_backward(&[&y * g], &leaves, false, false)
}

/// `ours` is about as close to the float64 `exact` as libtorch's `theirs` is, or within a few
/// roundings into its kind: max |ours - exact| <= 2 max(max |theirs - exact|, 4u max |exact|).
fn assert_as_close(ours: &Tensor, theirs: &Tensor, exact: &Tensor, what: &str) {
    let err = |t: &Tensor| max_abs(&(t.to_kind(Kind::Double) - exact));
    let floor = 4.0 * unit_roundoff(ours.kind()) * max_abs(exact);
    let (e_ours, e_theirs) = (err(ours), err(theirs));
    println!("{what}: off float64 by {e_ours:.3e}, libtorch by {e_theirs:.3e}");
    assert!(
        e_ours <= 2.0 * e_theirs.max(floor),
        "{what}: off float64 by {e_ours:e}, libtorch by {e_theirs:e} (four roundings: {floor:e})"
    );
}

/// LayerNorm through `kernels::layer_norm`, and with the residual add before it through
/// `kernels::add_layer_norm` (`residual`), against libtorch's layer_norm (after libtorch's add).
/// On the CPU (the path CPU runs take) everything is bitwise libtorch's. On a GPU (zerokit's
/// kernels) the sum is bitwise the add's; the value and the input's gradient (which, with the
/// residual, includes the sum's own gradient) are as close to float64 as libtorch's; the gain's
/// and bias's gradients are the same bits on a second run and within rounding of the float64
/// sums of dy·x̂ and dy. [B, T, C] inputs of odd and GPT-2 widths. The loss reads the sum as well
/// as the output, so that both paths of the residual carry a gradient.
fn layer_norm_matches_libtorch(device: Device, residual: bool) {
    let eps = 1e-5;
    let ours_of = |t: &[Tensor]| {
        if residual {
            let (sum, out) = add_layer_norm(&t[0], &t[3], &t[1], &t[2], eps).unwrap();
            Tensor::cat(&[out, sum * 0.5], -1)
        } else {
            layer_norm(&t[0], &t[1], &t[2], eps).unwrap()
        }
    };
    let theirs_of = |t: &[Tensor]| {
        if residual {
            let (sum, out) = add_layer_norm_reference(&t[0], &t[3], &t[1], &t[2], eps);
            Tensor::cat(&[out, sum * 0.5], -1)
        } else {
            layer_norm_reference(&t[0], &t[1], &t[2], eps)
        }
    };
    for kind in kinds_on(device) {
        // Rows held in registers (up to 2048 wide: 1600 is GPT-2 XL's) and wider ones (2052, 2501).
        let shapes = [[1i64, 1, 1], [2, 5, 7], [3, 333, 130], [4, 1024, 768], [1, 9, 1600], [2, 3, 2052], [1, 5, 2501]];
        for (i, shape) in shapes.into_iter().enumerate() {
            tch::manual_seed(40 + i as i64);
            let x = (Tensor::randn(shape, (Kind::Float, device)) * 2.0 + 0.5).to_kind(kind);
            let w = (Tensor::randn([shape[2]], (Kind::Float, device)) * 0.1 + 1.0).to_kind(kind);
            let b = (Tensor::randn([shape[2]], (Kind::Float, device)) * 0.1).to_kind(kind);
            let r = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
            let mut inputs = vec![x.shallow_clone(), w, b];
            if residual {
                inputs.push(r.shallow_clone());
            }
            let ours = value_and_grads(&inputs, ours_of, 6);
            let again = value_and_grads(&inputs, ours_of, 6);
            let theirs = value_and_grads(&inputs, theirs_of, 6);
            let case = format!("{device:?} {kind:?} {shape:?} residual {residual}");
            if device == Device::Cpu {
                for (j, (a, t)) in ours.iter().zip(&theirs).enumerate() {
                    assert!(a.equal(t), "{case}: output {j} (value, then the gradients) differs on the CPU");
                }
                continue; // libtorch's own sums (its bf16 CPU kernel is further from float64 than the bound)
            }
            for j in 2..4 {
                assert!(ours[j].equal(&again[j]), "{case}: a parameter's gradient differs between two runs");
            }
            let c = shape[2];
            // The LayerNorm's input as both sides stored it (the add is bitwise the same).
            let input = if residual { &x + &r } else { x.shallow_clone() };
            if residual {
                assert!(ours[0].narrow(-1, c, c).equal(&theirs[0].narrow(-1, c, c)), "{case}: the sum differs");
            }
            // float64 through the composed ops on the inputs as stored, with the same upstream.
            let g = upstream(&ours[0], 6);
            let double: Vec<Tensor> = inputs.iter().map(|t| t.to_kind(Kind::Double)).collect();
            let exact_value = tch::no_grad(|| theirs_of(&double));
            let exact = grads_with(&double, theirs_of, &g.to_kind(Kind::Double));
            assert_as_close(&ours[0], &theirs[0], &exact_value, &format!("{case}: the value"));
            assert_as_close(&ours[1], &theirs[1], &exact[0], &format!("{case}: the input's gradient"));
            if residual {
                assert!(ours[4].equal(&ours[1]), "{case}: the residual's gradient is not the input's");
            }
            let gd = g.narrow(-1, 0, c).to_kind(Kind::Double).reshape([-1, c]);
            let xd = input.to_kind(Kind::Double).reshape([-1, c]);
            let mean = xd.mean_dim(-1, true, Kind::Double);
            let var = (&xd - &mean).square().mean_dim(-1, true, Kind::Double);
            let rstd = (var + eps).rsqrt();
            let xhat = (&xd - &mean) * &rstd;
            // x̂ is computed in fp32 from an fp32 mean: off by about |x|·rstd·2^-23 a term (at
            // width one, where x - mean is 0, that is all there is).
            let slack = (gd.abs() * xd.abs() * &rstd).sum_dim_intlist(0, false, Kind::Double) * 2f64.powi(-21);
            assert_column_sums(&ours[2], &(&gd * &xhat), Some(&slack), &format!("{case}: the gain's gradient"));
            assert_column_sums(&ours[3], &gd, None, &format!("{case}: the bias's gradient"));
        }
    }
}

#[test]
fn layer_norm_matches_libtorch_on_cpu() {
    layer_norm_matches_libtorch(Device::Cpu, false);
}

#[test]
fn add_layer_norm_matches_libtorch_on_cpu() {
    layer_norm_matches_libtorch(Device::Cpu, true);
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn layer_norm_matches_libtorch_on_cuda() {
    layer_norm_matches_libtorch(fused_cuda(), false);
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn add_layer_norm_matches_libtorch_on_cuda() {
    layer_norm_matches_libtorch(fused_cuda(), true);
}

/// `widen_into` (16-bit into fp32) gives libtorch's copy_ bit for bit: sizes around the 8-element
/// groups, views at odd offsets (the scalar path), infinities and NaN.
fn widen_matches_copy(device: Device) {
    for kind in [Kind::BFloat16, Kind::Half] {
        for (i, n) in [1i64, 7, 8, 9, 4099, 1 << 20].into_iter().enumerate() {
            for offset in [0i64, 1, 3] {
                tch::manual_seed(50 + i as i64);
                let base = (Tensor::randn([n + offset], (Kind::Float, device)) * 100.0).to_kind(kind);
                if n > 4 {
                    let _ = base.narrow(0, offset + 1, 1).fill_(f64::INFINITY);
                    let _ = base.narrow(0, offset + 2, 1).fill_(f64::NAN);
                }
                let src = base.narrow(0, offset, n);
                let out = Tensor::full([n + offset], 7.0, (Kind::Float, device));
                let dst = out.narrow(0, offset, n);
                widen_into(&dst, &src).unwrap();
                let want = src.to_kind(Kind::Float);
                let same = dst.isnan().equal(&want.isnan())
                    && dst.nan_to_num(0.0, None, None).equal(&want.nan_to_num(0.0, None, None));
                assert!(same, "{device:?} {kind:?} n {n} offset {offset}: widened values differ");
                if offset > 0 {
                    assert_eq!(out.narrow(0, 0, offset).sum(Kind::Double).double_value(&[]), 7.0 * offset as f64);
                }
            }
        }
    }
}

#[test]
fn widen_matches_copy_on_cpu() {
    widen_matches_copy(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn widen_matches_copy_on_cuda() {
    widen_matches_copy(fused_cuda());
}

/// Segments of odd lengths at aligned and unaligned starts (the vector and scalar paths), with
/// gaps between them that no piece covers, and the flat length after them.
fn odd_segments() -> (Vec<Segment>, usize) {
    let lens = [1usize, 3, 4, 4097, 8192, 8197, 100_003, 5, 16_384];
    let gaps = [0usize, 3, 1, 4, 0, 2, 5, 8, 1];
    let mut start = 0;
    let mut segs = Vec::new();
    for (i, (&len, &gap)) in lens.iter().zip(&gaps).enumerate() {
        start += gap;
        segs.push(Segment { start, len, decay: i % 3 != 1 });
        start += len;
    }
    (segs, start + 2)
}

/// Elements of `a` and `b` (fp32) that differ, and the largest difference relative to
/// |b| + `floor` (a parameter near zero moves by the update, about the learning rate).
fn differences(a: &Tensor, b: &Tensor, floor: f64) -> (i64, f64) {
    let diff = (a - b).abs();
    let count = diff.ne(0.0).sum(Kind::Int64).int64_value(&[]);
    let rel = (diff / (b.abs() + floor)).max().double_value(&[]);
    (count, rel)
}

/// Pieces that would make the AdamW kernel read or write outside a tensor, or mix kinds, are
/// refused with what is wrong, on any device and before anything runs; on the CPU, where the
/// kernel does not exist, valid pieces leave everything as it was.
#[test]
fn adamw_kernel_refuses_bad_pieces_and_leaves_the_cpu_to_libtorch() {
    let (segs, numel) = odd_segments();
    let cfg = AdamWConfig::default();
    let mut opt = AdamW::new(numel, segs.clone(), cfg, Device::Cpu).unwrap();
    let mut p = Tensor::ones([numel as i64], (Kind::Float, Device::Cpu));
    let g = Tensor::ones([numel as i64], (Kind::BFloat16, Device::Cpu));
    let short = Tensor::ones([10], (Kind::BFloat16, Device::Cpu));
    let half = Tensor::ones([numel as i64], (Kind::Half, Device::Cpu));
    fn piece<'a>(s: &Segment, grad: &'a Tensor) -> AdamWPiece<'a> {
        AdamWPiece {
            start: s.start,
            len: s.len,
            grad: Span { tensor: grad, offset: s.start },
            weight: None,
            decay: s.decay,
        }
    }
    let good: Vec<AdamWPiece> = segs.iter().map(|s| piece(s, &g)).collect();
    let cpu = Device::Cpu;
    assert!(
        !opt.step_pieces(&mut p, &PieceTable::new(&good, cpu).unwrap(), 1e-3, 1.0).unwrap(),
        "no kernel on the CPU"
    );
    assert_eq!(opt.state().2, 0, "nothing ran");
    assert!(p.equal(&Tensor::ones([numel as i64], (Kind::Float, cpu))));
    assert!(sum_of_squares(&PieceTable::new(&good, cpu).unwrap()).unwrap().is_none());
    let refused = |pieces: &[AdamWPiece]| PieceTable::new(pieces, cpu).err().expect("refused").to_string();
    let mut outside = good.clone();
    outside[5] = piece(&segs[5], &short);
    let err = refused(&outside);
    assert!(err.contains("of a tensor of 10 elements"), "{err}");
    let mut mixed = good.clone();
    mixed[2] = piece(&segs[2], &half);
    let err = refused(&mixed);
    assert!(err.contains("Half beside BFloat16"), "{err}");
    let mut overlapping = good.clone();
    overlapping.swap(3, 4);
    let err = refused(&overlapping);
    assert!(err.contains("overlaps or precedes"), "{err}");
    let beyond =
        [AdamWPiece { start: numel - 1, len: 2, grad: Span { tensor: &g, offset: 0 }, weight: None, decay: false }];
    let err = opt.step_pieces(&mut p, &PieceTable::new(&beyond, cpu).unwrap(), 1e-3, 1.0).unwrap_err().to_string();
    assert!(err.contains("at least"), "{err}");
}

/// zerokit's AdamW kernel (`AdamW::step_pieces`) against libtorch's fused AdamW (`step_scaled`,
/// what torch.optim.AdamW(fused=True) runs) over four steps: gradients in fp32, bf16 and fp16
/// read where they lie, the weights written in each kind, with and without a gradient scale.
/// The kernel follows torch's operation for operation, so the count of differing elements
/// (printed) should be zero; the bounds asserted are those tests/optim.rs holds libtorch's
/// fused CUDA kernel to against its unfused path (parameters relative to |p| + lr). The weights it writes are the master weights rounded to their kind, bit
/// for bit, and nothing outside the pieces moves.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn adamw_kernel_matches_libtorch_fused_adamw_on_cuda() {
    let cuda = fused_cuda();
    let (segs, numel) = odd_segments();
    let cfg = AdamWConfig { lr: 1e-3, betas: (0.9, 0.95), eps: 1e-8, weight_decay: 0.1 };
    let f32s = (Kind::Float, cuda);
    for (gk, wk) in [
        (Kind::Float, Kind::Float),
        (Kind::Float, Kind::BFloat16),
        (Kind::Float, Kind::Half),
        (Kind::BFloat16, Kind::BFloat16),
        (Kind::Half, Kind::Half),
    ] {
        for grad_scale in [1.0, 1024.0] {
            let case = format!("{gk:?} gradients, {wk:?} weights, gradient scale {grad_scale}");
            tch::manual_seed(7);
            let init = Tensor::randn([numel as i64], f32s) * 0.1;
            let (mut p_ref, mut p_own) = (init.copy(), init.copy());
            let mut reference = AdamW::new(numel, segs.clone(), cfg, cuda).unwrap();
            let mut own = AdamW::new(numel, segs.clone(), cfg, cuda).unwrap();
            // The weights sit one element further on, so their offset is not the master's.
            let weights = Tensor::zeros([numel as i64 + 1], (wk, cuda));
            let covered = Tensor::zeros([numel as i64], (Kind::Bool, cuda));
            for s in &segs {
                let _ = covered.narrow(0, s.start as i64, s.len as i64).fill_(1);
            }
            for step in 0..4 {
                let g = (Tensor::randn([numel as i64], f32s) * grad_scale * 0.01).to_kind(gk);
                // The reference reads the same values widened, and zeros where no piece is.
                let g32 = g.to_kind(Kind::Float).where_self(&covered, &Tensor::zeros([], f32s));
                reference.step_scaled(&mut p_ref, &g32, 1e-3, grad_scale).unwrap();
                let pieces: Vec<AdamWPiece> = segs
                    .iter()
                    .map(|s| AdamWPiece {
                        start: s.start,
                        len: s.len,
                        grad: Span { tensor: &g, offset: s.start },
                        weight: Some(Span { tensor: &weights, offset: s.start + 1 }),
                        decay: s.decay,
                    })
                    .collect();
                let table = PieceTable::new(&pieces, cuda).unwrap();
                assert!(own.step_pieces(&mut p_own, &table, 1e-3, grad_scale).unwrap(), "{case}: the kernel must run");
                let (m_ref, v_ref, n_ref) = reference.state();
                let (m_own, v_own, n_own) = own.state();
                assert_eq!(n_ref, n_own);
                let (dp, rp) = differences(&p_own, &p_ref, 1e-3);
                let (dm, rm) = differences(m_own, m_ref, 1e-30);
                let (dv, rv) = differences(v_own, v_ref, 1e-30);
                println!("{case}, step {step}: differing params {dp} (rel {rp:e}), exp_avg {dm} ({rm:e}), exp_avg_sq {dv} ({rv:e})");
                assert!(rp <= 2.5e-7 && rm <= 5e-7 && rv <= 5e-7, "{case}, step {step}: off libtorch's fused AdamW");
                let written = weights.narrow(0, 1, numel as i64);
                let want = p_own.to_kind(wk).where_self(&covered, &Tensor::zeros([], (wk, cuda)));
                assert!(written.equal(&want), "{case}, step {step}: the weights are not the master weights rounded");
                assert_eq!(weights.narrow(0, 0, 1).double_value(&[0]), 0.0);
            }
        }
    }
}

/// The gradient's sum of squares over pieces of several tensors (the model's gradients) against
/// the float64 sum of the same elements, and the same bits on a second run.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn gradient_sum_of_squares_matches_float64_on_cuda() {
    let cuda = fused_cuda();
    let (segs, numel) = odd_segments();
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        tch::manual_seed(11);
        // Two tensors: the pieces alternate between them, at their own offsets plus one.
        let grads: Vec<Tensor> =
            (0..2).map(|_| (Tensor::randn([numel as i64 + 1], (Kind::Float, cuda)) * 3.0).to_kind(kind)).collect();
        let pieces: Vec<AdamWPiece> = segs
            .iter()
            .enumerate()
            .map(|(i, s)| AdamWPiece {
                start: s.start,
                len: s.len,
                grad: Span { tensor: &grads[i % 2], offset: s.start + 1 },
                weight: None,
                decay: false,
            })
            .collect();
        let got = sum_of_squares(&PieceTable::new(&pieces, cuda).unwrap()).unwrap().unwrap();
        let again = sum_of_squares(&PieceTable::new(&pieces, cuda).unwrap()).unwrap().unwrap();
        assert!(got.equal(&again), "{kind:?}: two runs differ");
        let exact: f64 = segs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let g = grads[i % 2].narrow(0, s.start as i64 + 1, s.len as i64).to_kind(Kind::Double);
                (&g * &g).sum(Kind::Double).double_value(&[])
            })
            .sum();
        let rel = (got.double_value(&[]) - exact).abs() / exact;
        println!("{kind:?}: sum of squares {} against {exact} (relative {rel:e})", got.double_value(&[]));
        assert!(rel <= 1e-12, "{kind:?}: relative error {rel:e}");
    }
}

/// The kernel source compiles with NVRTC for every architecture zerokit targets, and defines
/// each kernel `load` looks up: on the CPU machines of CI too (NVRTC needs no GPU; the Python
/// reference environment has it), so a kernel that does not compile fails here and not at a
/// GPU run's start.
#[test]
fn kernel_source_compiles_with_nvrtc() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("zerokit_kernels.cu");
    std::fs::write(&src, zerokit::kernels::KERNELS_SRC).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/nvrtc_check.py");
    let out = std::process::Command::new(common::python()).arg(&script).arg(&src).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for line in lines {
        let entries: Vec<&str> = line.split_whitespace().skip(1).collect();
        for name in zerokit::kernels::KERNEL_ENTRIES {
            assert!(entries.contains(&name), "{line}: no kernel {name}");
        }
    }
}

#[test]
fn activated_linear_matches_the_composed_ops_bitwise_on_cpu() {
    activated_linear_is_bitwise_the_composed_ops(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn activated_linear_matches_the_composed_ops_bitwise_on_cuda() {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    activated_linear_is_bitwise_the_composed_ops(Device::Cuda(0));
}

/// libtorch's fused RMSNorm on the GPU against LlamaRMSNorm's composed ops, value and the
/// gradients of input and gain, on odd and even widths. The value element by element: fp32
/// within float rounding, bf16 and fp16 within two units in the last place of the larger
/// magnitude (the composed ops round the normalised input and then the product, the kernel
/// once). The gradients tensor-wise, against the largest magnitude: the input's gradient
/// subtracts a row mean, so elements near zero carry the roundings of the larger terms (the
/// composed backward rounds each step to bf16/fp16), within two units in the last place of the
/// tensor's largest element; the gain's (a sum over every row) within 1e-2 relative.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn fused_rms_norm_matches_the_composed_ops_on_cuda() {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    let cuda = Device::Cuda(0);
    for (kind, ulp) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2.0 / 128.0), (Kind::Half, 2.0 / 1024.0)] {
        for (i, &(rows, width)) in [(64i64, 2048i64), (33, 4095), (3, 7), (1, 1), (17, 4096)].iter().enumerate() {
            tch::manual_seed(20 + i as i64);
            let x = (Tensor::randn([rows, width], (Kind::Float, cuda)) * 2.0).to_kind(kind);
            let w = (Tensor::randn([width], (Kind::Float, cuda)) * 0.1 + 1.0).to_kind(kind);
            let ours = value_and_grads(&[x.shallow_clone(), w.shallow_clone()], |t| rms_norm(&t[0], &t[1], 1e-5), 5);
            let reference = value_and_grads(&[x, w], |t| rms_norm_reference(&t[0], &t[1], 1e-5), 5);
            for (j, (what, (a, b))) in
                ["value", "input's gradient", "gain's gradient"].iter().zip(ours.iter().zip(&reference)).enumerate()
            {
                let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
                let over = match j {
                    0 => ((&a - &b).abs() - a.abs().maximum(&b.abs()) * ulp - 1e-6).max().double_value(&[]),
                    // A width of one normalises to ±1, whose input gradient is rounding noise.
                    1 => max_abs(&(&a - &b)) - ulp * max_abs(&b) - 1e-6,
                    _ => max_abs(&(&a - &b)) - 1e-2 * max_abs(&b).max(1e-30),
                };
                assert!(over <= 0.0, "{kind:?} {rows}x{width}: the {what} is off by {over:e} beyond its bound");
            }
            eprintln!("{kind:?} {rows}x{width}: fused RMSNorm within bounds");
        }
    }
}

/// The fused kernel against the reference on the GPU, in fp32, bf16 and fp16, on the
/// vectorized path (V a multiple of 8, GPT-2's padded 50304) and the scalar one (odd V, one
/// column, one row). fp32 agrees to float rounding; bf16 and fp16 to one unit in the last place
/// of the stored gradient, since both compute in fp32 and round once.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn classifier_kernel_matches_the_reference_on_cuda() {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    let cuda = Device::Cuda(0);
    assert!(fused_on(cuda), "the fused kernels did not compile or load (see the log)");
    let shapes = [(64i64, 50304i64), (33, 50257), (5, 7), (1, 1), (3, 1000), (17, 4096)];
    for (kind, ulp) in [(Kind::Float, 2e-6), (Kind::BFloat16, 1.0 / 128.0), (Kind::Half, 1.0 / 1024.0)] {
        for (i, &(n, v)) in shapes.iter().enumerate() {
            let (logits, targets, count) = case(n, v, kind, cuda, 10 + i as i64);
            let scale = 65536.0;
            let (a, b) = (logits.copy(), logits.copy());
            let rows_k = classifier(&a, &targets, &count, scale).unwrap();
            let rows_r = classifier_reference(&b, &targets, &count, scale).unwrap();
            let loss_err = max_abs(&(&rows_k - &rows_r)) / max_abs(&rows_r).max(1e-30);
            assert!(loss_err < 1e-5, "{kind:?} {n}x{v}: row losses differ by {loss_err:e} relative");
            let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
            // Per element: within `ulp` of the larger magnitude (one unit in the last place), or
            // below fp32 noise for the tiny probabilities.
            let floor = 1e-7 * scale / count.double_value(&[]);
            let bound = a.abs().maximum(&b.abs()) * ulp + floor;
            let over = ((&a - &b).abs() - bound).max().double_value(&[]);
            assert!(over <= 0.0, "{kind:?} {n}x{v}: gradient outside one ulp by {over:e}");
            eprintln!("{kind:?} {n}x{v}: row losses within {loss_err:.1e}, gradient within one ulp");
        }
    }
    // A target outside the vocabulary gives a NaN loss rather than a wrong number.
    let (logits, _, count) = case(2, 9, Kind::Float, cuda, 3);
    let targets = Tensor::from_slice(&[0i64, 9]).to_device(cuda);
    let rows = classifier(&logits, &targets, &count, 1.0).unwrap();
    assert!(rows.double_value(&[1]).is_nan() && rows.double_value(&[0]).is_finite());
}

/// GPT-2's head backward on the GPU (fused classifier, written-out products, autograd only for
/// ln_f) against plain autograd through libtorch's cross-entropy, in fp32 and bf16, over several
/// chunks with ignored targets and a loss scale.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn head_backward_matches_autograd_on_cuda() {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    let cuda = Device::Cuda(0);
    let cfg = GptConfig { n_layer: 1, n_head: 2, n_embd: 64, block_size: 1024, vocab_size: 50304 };
    for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2e-2)] {
        let model = Gpt::new(&cfg, cuda, kind, 5).unwrap();
        let (b, t) = (5i64, 1024i64);
        tch::manual_seed(3);
        let x = Tensor::randn([b, t, 64], (kind, cuda));
        let targets = Tensor::randint(cfg.vocab_size as i64, [b, t], (Kind::Int64, cuda));
        let _ = targets.narrow(1, 0, 100).fill_(-1);
        let scale = 64.0;
        let params = model.named_parameters();
        let get = |n: &str| params.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        let (w, bias, wte) =
            (get("transformer.ln_f.weight"), get("transformer.ln_f.bias"), get("transformer.wte.weight"));
        let leaf = x.detach().set_requires_grad(true);
        let loss = Gpt::loss(&model.head(&leaf), &targets);
        let plain = Tensor::run_backward(&[&loss * scale], &[&w, &bias, &wte, &leaf], false, false);
        let fused = model.head_backward(&x, &targets, scale).unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let err = max_abs(&(a.to_kind(Kind::Float) - b.to_kind(Kind::Float)));
            let size = max_abs(&b.to_kind(Kind::Float));
            eprintln!("{kind:?} {what}: max difference {err:.2e} against max {size:.2e}");
            assert!(err <= tol * size.max(1e-12), "{kind:?} {what}: {err:e} against {size:e}");
        };
        close(&fused.loss, &loss, "loss");
        close(&fused.params[0].1, &plain[0], "ln_f.weight");
        close(&fused.params[1].1, &plain[1], "ln_f.bias");
        close(&fused.params[2].1, &plain[2], "wte");
        close(&fused.input, &plain[3], "input");
    }
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `deterministic = true`: two GPU runs with the same seed and configuration give the same
/// losses and the same final weights, bit for bit. A third run without it says (without
/// asserting: libtorch's default kernels may happen to agree) whether it differs.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn deterministic_runs_are_bitwise_identical_on_cuda() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let mut finals = Vec::new();
    let mut metrics = Vec::new();
    for (run, deterministic) in [("a", true), ("b", true), ("c", false)] {
        let dir = tmp.path().join(run);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config(
            &dir,
            &data,
            &format!(
                "device = \"cuda\"\ndtype = \"bf16\"\nn_layer = 4\nn_head = 12\nn_embd = 768\nblock_size = 512\n\
             batch_size = 8\nmax_iters = 20\ndeterministic = {deterministic}"
            ),
        );
        let out = train_command(&cfg, &launch_args(1), &[]).env_remove("ZEROKIT_NO_CUDA").output().unwrap();
        assert!(out.status.success(), "run {run}: {}", String::from_utf8_lossy(&out.stderr));
        finals.push(file_bytes(&dir.join("out/final/model.safetensors")));
        let m = String::from_utf8(file_bytes(&dir.join("out/metrics.jsonl"))).unwrap();
        // Timings differ between runs; the losses, norms and scales must not.
        let values: Vec<String> = m
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {} {}", v["step"], v["loss"], v["grad_norm"])
            })
            .collect();
        metrics.push(values);
    }
    assert_eq!(metrics[0], metrics[1], "the two deterministic runs' losses differ");
    assert!(finals[0] == finals[1], "the two deterministic runs' final weights differ");
    let first = metrics[0].iter().zip(&metrics[2]).position(|(a, b)| a != b);
    eprintln!(
        "without deterministic: weights {}, first differing metrics line {first:?}",
        if finals[2] == finals[0] { "identical" } else { "differ" }
    );
}
