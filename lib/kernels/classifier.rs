//! The fused classifier's launch (classifier.cu) and its reference in libtorch ops.

use super::{kernel_params, kernels_for, launch, Loaded};
use tch::{Kind, TchError, Tensor};

/// Threads per row of the classifier: enough 16-byte loads in flight to stream a 100 KB row.
const CLASSIFIER_THREADS: u32 = 1024;

/// Softmax cross-entropy of `logits` [N, V] (fp32, fp16 or bf16, contiguous) against `targets`
/// [N] (Int64; -1 is ignored), computed in fp32, and its gradient written over the logits:
/// `logits <- (softmax(logits) - onehot(targets)) * scale / count` for every counted row, zero for
/// ignored rows. `count` is a one-element fp32 tensor on the logits' device (the number of counted
/// targets in the whole micro-batch, so chunks of it add up), so that nothing waits for the host.
/// Returns the per-row losses [N] in fp32 (zero for ignored rows).
pub fn classifier(logits: &Tensor, targets: &Tensor, count: &Tensor, scale: f64) -> Result<Tensor, TchError> {
    let size = logits.size();
    let shape_ok = size.len() == 2 && targets.size() == [size[0]] && targets.kind() == Kind::Int64;
    if !shape_ok || !logits.is_contiguous() || count.kind() != Kind::Float || count.numel() != 1 {
        return Err(TchError::Kind(format!(
            "classifier: logits {size:?} {:?} (contiguous: {}), targets {:?} {:?}, count {:?}",
            logits.kind(),
            logits.is_contiguous(),
            targets.size(),
            targets.kind(),
            count.kind()
        )));
    }
    match kernels_for(logits.device()) {
        Some(k) => launch_classifier(k, logits, targets, count, scale),
        None => classifier_reference(logits, targets, count, scale),
    }
}

/// [`classifier`] in libtorch ops: an fp32 copy of the logits, log-softmax, and the gradient
/// of the mean cross-entropy written back in the logits' kind.
pub fn classifier_reference(logits: &Tensor, targets: &Tensor, count: &Tensor, scale: f64) -> Result<Tensor, TchError> {
    let counted = targets.f_ne(-1)?.f_to_kind(Kind::Float)?;
    let safe = targets.f_clamp_min(0)?.f_unsqueeze(1)?;
    // log-probabilities in fp32, then turned into the gradient in place.
    let mut p = logits.f_to_kind(Kind::Float)?.f_log_softmax(1, Kind::Float)?;
    let losses = p.f_gather(1, &safe, false)?.f_squeeze_dim(1)?.f_neg()?.f_mul(&counted)?;
    let _ = p.f_exp_()?;
    let minus_one = Tensor::f_full([targets.size()[0], 1], -1.0, (Kind::Float, logits.device()))?;
    let _ = p.f_scatter_add_(1, &safe, &minus_one)?;
    let _ = p.f_mul_(&counted.f_unsqueeze(1)?.f_mul(&(count.f_reciprocal()? * scale))?)?;
    logits.shallow_clone().f_copy_(&p)?;
    Ok(losses)
}

fn launch_classifier(
    k: &Loaded,
    logits: &Tensor,
    targets: &Tensor,
    count: &Tensor,
    scale: f64,
) -> Result<Tensor, TchError> {
    let (n, v) = (logits.size()[0], logits.size()[1]);
    let which = match logits.kind() {
        Kind::Float => 0,
        Kind::BFloat16 => 1,
        Kind::Half => 2,
        other => return Err(TchError::Kind(format!("classifier: logits of kind {other:?}"))),
    };
    let device = logits.device();
    let (targets, count) = (targets.f_to_device(device)?.f_contiguous()?, count.f_to_device(device)?);
    let losses = Tensor::f_empty([n], (Kind::Float, device))?;
    if n == 0 {
        return Ok(losses);
    }
    if v > i32::MAX as i64 || n > i32::MAX as i64 {
        return Err(TchError::Kind(format!("classifier: logits {n} x {v} exceed the kernel's 32-bit grid")));
    }
    let elem = logits.kind().elt_size_in_bytes() as i64;
    let mut data = logits.data_ptr();
    let vectorized = i32::from((data as usize) % 16 == 0 && (v * elem) % 16 == 0);
    let (mut t, mut l, mut c) = (targets.data_ptr(), losses.data_ptr(), count.data_ptr());
    let (mut scale, mut v32, mut vec) = (scale as f32, v as i32, vectorized);
    let mut params = kernel_params![data, t, l, c, scale, v32, vec];
    // SAFETY: the function takes (T*, const i64*, float*, const float*, float, int, int), matching
    // `params`; every pointer is a live, contiguous device tensor of the checked shape, kept alive
    // by the caller (logits, losses) or by the caching allocator's stream order (targets, count
    // copies are freed only after work queued on this stream).
    let grid = (n as u32, 1, 1);
    unsafe { launch(k, k.classifier[which], grid, (CLASSIFIER_THREADS, 1, 1), &mut params, "classifier") }
        .map_err(TchError::Kind)?;
    Ok(losses)
}
