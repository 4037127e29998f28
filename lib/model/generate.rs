//! nanoGPT's sampling, for any model that gives logits for token ids: `max_new_tokens` times,
//! crop the context to the model's positions, take the last position's logits / temperature,
//! keep the top_k, and draw from the softmax; temperature 0 takes the argmax (greedy, as
//! transformers' `generate(do_sample=False)`).
//!
//! With the key/value cache ([`KvCache`], the default) the prompt runs once and then each new
//! token alone against the cached keys and values; without it each new token recomputes the
//! whole (cropped) context. Both go through the model's one [`Decode::last_logits`], and give the
//! same tokens.

use super::init::SplitMix64;
use super::kv_cache::{KvCache, LayerKv};
use super::ModelError;
use tch::{Device, Kind, Tensor};

/// What sampling needs to know of a model besides its forward.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// Longest context the model takes (older tokens are cropped); the cache's capacity.
    pub positions: usize,
    pub vocab_size: usize,
    /// Layers, each with its own cached keys and values.
    pub layers: usize,
    /// Where the model's parameters live.
    pub device: Device,
}

/// A model sampling runs: its forward in pieces, at any positions, with a layer's cache or
/// without; [`Decode::last_logits`] puts them together once for every family.
pub trait Decode {
    fn context(&self) -> Context;
    /// Token ids [B, T] to the residual stream at positions start..start + T.
    fn embed_at(&self, idx: &Tensor, start: i64) -> Tensor;
    /// Layer `i` on the residual stream at positions start..start + T; with its cache, the
    /// positions after the cached ones (start is the cache's length), whose keys and values join
    /// the cache.
    fn block_at(&self, i: usize, x: &Tensor, start: i64, cache: Option<&mut LayerKv>) -> Tensor;
    /// The head: [B, T, C] to logits [B, T, V].
    fn head(&self, x: &Tensor) -> Tensor;

    /// Logits [B, V] of the last of `idx`'s tokens ([B, t] Int64), which come after the
    /// `cache`'s positions and are added to it; without a cache, `idx` is the whole context,
    /// from position 0. An error when the cache would exceed the model's positions.
    fn last_logits(&self, idx: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor, ModelError> {
        let t = idx.size()[1];
        let past = cache.as_ref().map_or(0, |c| c.len());
        let positions = self.context().positions;
        if t == 0 || past + t as usize > positions {
            return Err(ModelError::Generate(format!(
                "{t} new tokens after {past} cached positions: need at least one, and at most the model's \
                 {positions} positions in all"
            )));
        }
        let mut x = self.embed_at(idx, past as i64);
        for i in 0..self.context().layers {
            x = self.block_at(i, &x, past as i64, cache.as_deref_mut().map(|c| c.layer(i)));
        }
        // Only the last position's logits: the others would cost a [T, V] product for nothing.
        Ok(self.head(&x.narrow(1, t - 1, 1)).squeeze_dim(1))
    }

    /// An empty cache for this model.
    fn new_cache(&self) -> KvCache {
        let c = self.context();
        KvCache::new(c.layers, c.positions)
    }
}

/// How to sample.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Cache keys and values (the default); false recomputes the context for each token.
    pub kv_cache: bool,
}

impl Sampling {
    /// With the key/value cache.
    pub fn new(max_new_tokens: usize, temperature: f64, top_k: Option<usize>, seed: u64) -> Sampling {
        Sampling { max_new_tokens, temperature, top_k, seed, kv_cache: true }
    }
}

/// Appends `s.max_new_tokens` tokens to each row of `idx` ([B, T] Int64), drawing with `model`'s
/// logits. Draws come from a generator seeded with `s.seed` (not libtorch's global one), so a
/// seed gives the same text on CPU and CUDA up to float ties.
pub fn generate(model: &impl Decode, idx: &Tensor, s: &Sampling) -> Result<Tensor, ModelError> {
    let ctx = model.context();
    let (temperature, top_k) = (s.temperature, s.top_k);
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
    if lo < 0 || hi as usize >= ctx.vocab_size {
        return bad(format!("token ids must lie in [0, {}), got {lo}..={hi}", ctx.vocab_size));
    }
    let b = idx.size()[0];
    let v = ctx.vocab_size as i64;
    let positions = ctx.positions as i64;
    let mut rng = SplitMix64::new(s.seed);
    let mut cache = s.kv_cache.then(|| model.new_cache());
    tch::no_grad(|| {
        let mut idx = idx.to_device(ctx.device);
        for _ in 0..s.max_new_tokens {
            let t = idx.size()[1];
            if t > positions {
                // Beyond the model's positions nanoGPT crops to the last `positions` tokens. Each
                // crop moves every kept token to a new position (GPT-2's learned positions exist
                // only up to block_size; rope rotates by position) and drops the oldest token
                // from the context the others' keys and values were computed in, so no cached
                // key is still valid: from here each token re-encodes the last block, as without
                // a cache.
                cache = None;
            }
            let logits = match cache.as_mut() {
                // The tokens not yet cached: the prompt at first, then the last drawn one.
                Some(c) => model.last_logits(&idx.narrow(1, c.len() as i64, t - c.len() as i64), Some(c))?,
                None => {
                    let start = (t - positions).max(0);
                    model.last_logits(&idx.narrow(1, start, t - start), None)?
                }
            };
            let logits = logits.to_kind(Kind::Float);
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
                Tensor::from_slice(&picks).view([b, 1]).to_device(ctx.device)
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
