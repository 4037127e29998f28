//! nanoGPT's sampling, for any model that gives logits for token ids: `max_new_tokens` times,
//! crop the context to the model's positions, take the last position's logits / temperature,
//! keep the top_k, and draw from the softmax; temperature 0 takes the argmax (greedy, as
//! transformers' `generate(do_sample=False)`). Each new token recomputes the whole (cropped)
//! context: no KV cache, so the tokens are exactly those of the full forward.

use super::init::SplitMix64;
use super::ModelError;
use tch::{Device, Kind, Tensor};

/// What sampling needs to know of a model besides its forward.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// Longest context the model takes (older tokens are cropped).
    pub positions: usize,
    pub vocab_size: usize,
    /// Where the model's parameters live.
    pub device: Device,
}

/// Appends `max_new_tokens` tokens to each row of `idx` ([B, T] Int64), drawing with `forward`'s
/// logits ([B, T, V]). Draws come from a generator seeded with `seed` (not libtorch's global
/// one), so a seed gives the same text on CPU and CUDA up to float ties.
pub fn generate(
    forward: impl Fn(&Tensor) -> Tensor,
    model: Context,
    idx: &Tensor,
    max_new_tokens: usize,
    temperature: f64,
    top_k: Option<usize>,
    seed: u64,
) -> Result<Tensor, ModelError> {
    let bad = |m: String| Err(ModelError::Generate(m));
    if idx.dim() != 2 || idx.kind() != Kind::Int64 {
        return bad(format!("token ids must be a 2-D Int64 tensor, got {:?} {:?}", idx.kind(), idx.size()));
    }
    if idx.size()[1] == 0 {
        return bad("the prompt is empty".into());
    }
    if !(temperature.is_finite() && temperature >= 0.0) {
        return bad(format!("temperature must be finite and >= 0, got {temperature}"));
    }
    if top_k == Some(0) {
        return bad("top_k must be at least 1".into());
    }
    let (lo, hi) = (idx.f_min()?.int64_value(&[]), idx.f_max()?.int64_value(&[]));
    if lo < 0 || hi as usize >= model.vocab_size {
        return bad(format!("token ids must lie in [0, {}), got {lo}..={hi}", model.vocab_size));
    }
    let b = idx.size()[0];
    let v = model.vocab_size as i64;
    let mut rng = SplitMix64::new(seed);
    tch::no_grad(|| {
        let mut idx = idx.to_device(model.device);
        for _ in 0..max_new_tokens {
            let t = idx.size()[1];
            let start = (t - model.positions as i64).max(0);
            let idx_cond = idx.narrow(1, start, t - start);
            let logits = forward(&idx_cond).select(1, -1).to_kind(Kind::Float);
            let next = if temperature == 0.0 {
                logits.argmax(-1, true)
            } else {
                let mut logits = logits / temperature;
                if let Some(k) = top_k.filter(|&k| (k as i64) < v) {
                    let (top, _) = logits.topk(k as i64, -1, true, true);
                    let kth = top.narrow(1, k as i64 - 1, 1);
                    logits = logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY);
                }
                let probs = logits.softmax(-1, Kind::Float).to_device(Device::Cpu).contiguous();
                let probs = Vec::<f32>::try_from(probs.view([-1]))?;
                let picks: Vec<i64> = probs.chunks(v as usize).map(|row| sample(row, rng.next_f64()) as i64).collect();
                Tensor::from_slice(&picks).view([b, 1]).to_device(model.device)
            };
            idx = Tensor::cat(&[idx, next], 1);
        }
        Ok(idx)
    })
}

/// Index drawn from a probability row by inverse CDF at `u` in [0, 1); rows that sum a little
/// under 1 (rounding) fall back to the last non-zero entry.
fn sample(probs: &[f32], u: f64) -> usize {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let target = u * total;
    let mut acc = 0.0f64;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p as f64;
            last = i;
            if acc > target {
                return i;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_follows_the_cdf() {
        let p = [0.0, 0.25, 0.0, 0.75];
        assert_eq!(sample(&p, 0.0), 1);
        assert_eq!(sample(&p, 0.2499), 1);
        assert_eq!(sample(&p, 0.25), 3);
        assert_eq!(sample(&p, 0.999_999), 3);
    }
}
