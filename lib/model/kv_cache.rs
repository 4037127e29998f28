//! The key/value cache of sampling, and the attention masks of every forward, cached or not.
//!
//! Sampling with a cache runs the prompt once (prefill), keeping each layer's keys (after rope)
//! and values, then runs each new token alone at its own position against them. GPT-2 and the
//! decoder both attend through [`attend`]: without a cache it hands back the new keys and values
//! with the mask training has always used (causal, or a sliding window shorter than the
//! sequence), so the training forward runs the same operations as before; with one, it appends
//! the new keys and values to the layer's cache and masks by absolute position.

use tch::{Device, Kind, Tensor};

/// One layer's cached keys and values ([B, kv_heads, n, head_dim]) for the absolute positions
/// `start..end`. A sliding-window layer keeps only the positions a later query can still see.
#[derive(Default)]
pub struct LayerKv {
    kv: Option<(Tensor, Tensor)>,
    start: i64,
    end: i64,
}

/// Every layer's [`LayerKv`], for at most `capacity` positions (the model's context length).
pub struct KvCache {
    layers: Vec<LayerKv>,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for a model of `layers` layers and `capacity` positions.
    pub fn new(layers: usize, capacity: usize) -> KvCache {
        KvCache { layers: (0..layers).map(|_| LayerKv::default()).collect(), capacity }
    }

    /// How many positions the cache has seen (the next token's position).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.end as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The model's context length: the positions a cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Layer `i`'s cache.
    pub(crate) fn layer(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }
}

/// Which keys each query may see.
pub(crate) enum Mask {
    /// Every query sees every key (one new token, no window in reach).
    All,
    /// Square causal: query i sees keys 0..=i (keys and queries start at the same position).
    Causal,
    /// Boolean [queries, keys], true where attention is allowed.
    Allowed(Tensor),
}

impl Mask {
    /// The mask for `t` queries at absolute positions `past..past + t` over keys at
    /// `start..past + t`, key j seen from query i when 0 <= i - j < window (transformers'
    /// sliding_window_overlay; no window: causal). Without a cache (`past == start == 0`) this is
    /// the training forward's: `Causal` unless a window is shorter than the sequence.
    pub(crate) fn new(t: i64, past: i64, start: i64, window: Option<usize>, device: Device) -> Mask {
        let end = past + t;
        // The window cuts only when the farthest query-key distance reaches it.
        let window = window.map(|w| w as i64).filter(|&w| end - 1 - start >= w);
        match window {
            None if t == 1 => Mask::All,
            None if start == past => Mask::Causal,
            _ => {
                let i = Tensor::arange_start(past, end, (Kind::Int64, device)).unsqueeze(1);
                let j = Tensor::arange_start(start, end, (Kind::Int64, device)).unsqueeze(0);
                let d = &i - &j;
                let causal = d.ge(0);
                Mask::Allowed(match window {
                    Some(w) => causal.logical_and(&d.lt(w)),
                    None => causal,
                })
            }
        }
    }

    /// The mask and is_causal flag for scaled_dot_product_attention.
    pub(crate) fn sdpa(self) -> (Option<Tensor>, bool) {
        match self {
            Mask::All => (None, false),
            Mask::Causal => (None, true),
            Mask::Allowed(m) => (Some(m), false),
        }
    }

    /// A boolean [queries, keys] mask for attention written out (None: nothing masked).
    pub(crate) fn allowed(self, t: i64, device: Device) -> Option<Tensor> {
        match self {
            Mask::All => None,
            Mask::Causal => Some(Tensor::ones([t, t], (Kind::Bool, device)).tril(0)),
            Mask::Allowed(m) => Some(m),
        }
    }
}

/// What new queries attend to: keys (after rope) and values [B, kv_heads, keys, head_dim], and
/// the mask.
pub(crate) struct Attend {
    pub k: Tensor,
    pub v: Tensor,
    pub mask: Mask,
}

/// The keys and values `t` new queries attend to, given the new positions' `k` and `v`
/// ([B, kv_heads, t, head_dim], at the positions after the cached ones): these alone without a cache;
/// with one, appended to the cached ones, which are then kept for the next call (trimmed, in a
/// sliding-window layer, to the window's last positions: nothing older is seen again).
pub(crate) fn attend(k: Tensor, v: Tensor, window: Option<usize>, cache: Option<&mut LayerKv>) -> Attend {
    let t = k.size()[2];
    let device = k.device();
    let Some(c) = cache else {
        return Attend { k, v, mask: Mask::new(t, 0, 0, window, device) };
    };
    let (past, start) = (c.end, c.start);
    // Appended by concatenation: one copy of the layer's cache per token, no more traffic than
    // the attention's own read of it, and no buffer of the whole context held for a short text.
    let (k, v) = match c.kv.take() {
        None => (k, v),
        Some((ck, cv)) => (Tensor::cat(&[ck, k], 2), Tensor::cat(&[cv, v], 2)),
    };
    let end = past + t;
    // The next query, at position `end`, sees back to end - window + 1.
    let keep_from = window.map_or(start, |w| start.max(end + 1 - w as i64));
    let n = end - keep_from;
    c.kv = Some((k.narrow(2, keep_from - start, n), v.narrow(2, keep_from - start, n)));
    (c.start, c.end) = (keep_from, end);
    Attend { k, v, mask: Mask::new(t, past, start, window, device) }
}
