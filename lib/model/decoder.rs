//! The decoder-only transformer that Llama, Mistral and Qwen2 ([`super::llama`]) and Gemma 2 and 3
//! ([`super::gemma`]) are configurations of, written once, to be read beside transformers'
//! modeling_llama.py, modeling_gemma2.py and modeling_gemma3.py: token embedding (scaled by
//! sqrt(hidden) for Gemma), layers of RMSNorm, grouped-query attention with rotary positions and
//! a gated MLP, a final RMSNorm and an lm_head tied to the embedding or not.
//!
//! A family's configuration says how it differs through an [`Arch`]: the RMSNorm's form (Llama
//! casts back to the input's kind before the gain; Gemma scales by (1 + gain) in fp32), the gate's
//! activation (SiLU or tanh-approximated GELU), Gemma's norms after attention and after the MLP,
//! Gemma 3's QK-norm, the attention scale (query_pre_attn_scalar), soft-capping of attention and
//! final logits (Gemma 2), and per layer a sliding window and which rotary embedding it uses.
//!
//! Parameters are plain tensors named as transformers names them, with nn.Linear's [out, in]
//! layout, so Hugging Face checkpoints move in and out with a plain copy. As for GPT-2, the engine
//! re-points them into its flat buffer and runs the model piecewise (`embed`, `block`, head).

use super::generate::{generate, Context, Decode, Sampling};
use super::init::{init_params, Init};
use super::kv_cache::{attend, Attend, LayerKv};
use super::{check_kind, head_backward_in_chunks, Head, HeadGrads, Model, ModelError, NamedParams, ParamSpec};
use crate::kernels;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

pub const EMBED: &str = "model.embed_tokens.weight";
pub const NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// Llama 3's rope scaling (rope_type "llama3"): wavelengths longer than the original context /
/// low_freq_factor are stretched by `factor`, those shorter than original / high_freq_factor are
/// kept, and the ones between are interpolated smoothly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// One rotary embedding: its base and how its frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeKind,
}

/// transformers' rope types zerokit implements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeKind {
    Default,
    /// "llama3".
    Llama3(RopeScaling),
    /// "linear": every frequency divided by the factor (Gemma 3's global layers).
    Linear(f64),
}

/// The gate's activation in the gated MLP `down(act(gate(h)) * up(h))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma's gelu_pytorch_tanh).
    GeluTanh,
}

/// One layer's attention: its sliding window (None: global) and the index of its rope in
/// [`Arch::ropes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerAttention {
    pub window: Option<usize>,
    pub rope: usize,
}

/// Everything the decoder computes from: sizes and the arithmetic a family chooses.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Biases on q_proj, k_proj and v_proj.
    pub attention_bias: bool,
    /// A bias on o_proj: Llama's attention_bias puts one there too, Qwen2's biases stop at v_proj.
    pub o_proj_bias: bool,
    pub mlp_bias: bool,
    pub pad_token_id: Option<usize>,
    pub initializer_range: f64,
    /// Gemma's RMSNorm: `norm(x) * (1 + gain)` in fp32, gains initialised to 0.
    pub unit_offset_norm: bool,
    pub activation: Activation,
    /// Gemma: the embedding multiplied by sqrt(hidden_size), rounded to the compute kind.
    pub scale_embedding: bool,
    /// Gemma: RMSNorms on the attention's and the MLP's outputs (post_attention_layernorm,
    /// post_feedforward_layernorm), the MLP's input norm being pre_feedforward_layernorm.
    pub sandwich_norms: bool,
    /// Gemma 3: RMSNorm over head_dim on the queries and keys before rope.
    pub qk_norm: bool,
    /// Multiplies q·k: 1/sqrt(head_dim) for Llama, query_pre_attn_scalar^-0.5 for Gemma.
    pub attention_scale: f64,
    /// `cap * tanh(x / cap)` on the attention logits (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `cap * tanh(x / cap)` on the final logits (Gemma 2).
    pub final_softcap: Option<f64>,
    pub ropes: Vec<Rope>,
    /// One per layer.
    pub layers: Vec<LayerAttention>,
}

impl Arch {
    /// The checks every family shares, as messages naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.layers.len()),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((key, _)) = sizes.iter().find(|(_, n)| *n == 0) {
            return Err(format!("{key} must be positive"));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!("head_dim {} is odd; rope rotates pairs of dimensions", self.head_dim));
        }
        let mut positive = vec![("rms_norm_eps", self.rms_norm_eps), ("attention scale", self.attention_scale)];
        positive.extend(self.ropes.iter().map(|r| ("rope_theta", r.theta)));
        positive.extend(self.attn_softcap.map(|c| ("attn_logit_softcapping", c)));
        positive.extend(self.final_softcap.map(|c| ("final_logit_softcapping", c)));
        if let Some((key, x)) = positive.iter().find(|(_, x)| !(x.is_finite() && *x > 0.0)) {
            return Err(format!("{key} must be a positive number, got {x}"));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(format!("initializer_range must be >= 0, got {}", self.initializer_range));
        }
        for rope in &self.ropes {
            match rope.scaling {
                RopeKind::Default => {}
                RopeKind::Linear(f) if f.is_finite() && f > 0.0 => {}
                RopeKind::Linear(f) => return Err(format!("rope scaling factor must be positive, got {f}")),
                RopeKind::Llama3(s) => {
                    let factors = [s.factor, s.low_freq_factor, s.high_freq_factor];
                    if factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                        return Err(format!(
                            "rope_scaling: factor, low_freq_factor and high_freq_factor must be positive ({s:?})"
                        ));
                    }
                    // The smooth interpolation divides by their difference.
                    if s.high_freq_factor <= s.low_freq_factor || s.original_max_position_embeddings == 0 {
                        return Err(format!(
                            "rope_scaling: high_freq_factor must exceed low_freq_factor and \
                             original_max_position_embeddings be positive ({s:?})"
                        ));
                    }
                }
            }
        }
        if self.layers.iter().any(|l| l.rope >= self.ropes.len() || l.window == Some(0)) {
            return Err("every layer needs a rope and a positive sliding window".into());
        }
        if let Some(p) = self.pad_token_id.filter(|&p| p >= self.vocab_size) {
            return Err(format!("pad_token_id {p} is not below vocab_size {}", self.vocab_size));
        }
        // Token ids travel as i64 and sizes as i64 through libtorch.
        if self.num_params() as u128 > i64::MAX as u128 / 8 {
            return Err("the model is too large".into());
        }
        Ok(())
    }

    /// Every parameter in transformers' order: the embedding, each layer's parameters, the final
    /// norm, and lm_head unless it is the embedding.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let (v, c) = (self.vocab_size as i64, self.hidden_size as i64);
        let mut specs = vec![ParamSpec::new(EMBED.into(), vec![v, c])];
        for i in 0..self.layers.len() {
            for (suffix, shape) in self.layer_shapes() {
                specs.push(ParamSpec::new(layer_param_name(i, suffix), shape));
            }
        }
        specs.push(ParamSpec::new(NORM.into(), vec![c]));
        if !self.tie_word_embeddings {
            specs.push(ParamSpec::new(LM_HEAD.into(), vec![v, c]));
        }
        specs
    }

    /// The parameters of one decoder layer after `model.layers.{i}.`, in the order transformers
    /// registers them: self_attn (q, k, v, o, then Gemma 3's q_norm and k_norm), mlp, then the
    /// norms (input_layernorm, post_attention_layernorm, and Gemma's pre_ and
    /// post_feedforward_layernorm); weight before bias.
    pub fn layer_shapes(&self) -> Vec<(&'static str, Vec<i64>)> {
        let c = self.hidden_size as i64;
        let hd = self.head_dim as i64;
        let q = self.num_attention_heads as i64 * hd;
        let kv = self.num_key_value_heads as i64 * hd;
        let f = self.intermediate_size as i64;
        let (ab, ob, mb) = (self.attention_bias, self.o_proj_bias, self.mlp_bias);
        let (qk, sandwich) = (self.qk_norm, self.sandwich_norms);
        let all = [
            ("self_attn.q_proj.weight", vec![q, c], true),
            ("self_attn.q_proj.bias", vec![q], ab),
            ("self_attn.k_proj.weight", vec![kv, c], true),
            ("self_attn.k_proj.bias", vec![kv], ab),
            ("self_attn.v_proj.weight", vec![kv, c], true),
            ("self_attn.v_proj.bias", vec![kv], ab),
            ("self_attn.o_proj.weight", vec![c, q], true),
            ("self_attn.o_proj.bias", vec![c], ob),
            ("self_attn.q_norm.weight", vec![hd], qk),
            ("self_attn.k_norm.weight", vec![hd], qk),
            ("mlp.gate_proj.weight", vec![f, c], true),
            ("mlp.gate_proj.bias", vec![f], mb),
            ("mlp.up_proj.weight", vec![f, c], true),
            ("mlp.up_proj.bias", vec![f], mb),
            ("mlp.down_proj.weight", vec![c, f], true),
            ("mlp.down_proj.bias", vec![c], mb),
            ("input_layernorm.weight", vec![c], true),
            ("post_attention_layernorm.weight", vec![c], true),
            ("pre_feedforward_layernorm.weight", vec![c], sandwich),
            ("post_feedforward_layernorm.weight", vec![c], sandwich),
        ];
        all.into_iter().filter(|(_, _, present)| *present).map(|(s, shape, _)| (s, shape)).collect()
    }

    /// Parameter count, a tied lm_head counted once.
    pub fn num_params(&self) -> usize {
        let layer: i64 = self.layer_shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum();
        let (v, c) = (self.vocab_size, self.hidden_size);
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + self.layers.len() * layer as usize + c + head
    }

    /// transformers' _init_weights: N(0, initializer_range) for nn.Linear weights and the
    /// embedding, zero biases, RMSNorm gains 1 (Llama) or 0 (Gemma, whose norm adds 1).
    fn init_of(&self, name: &str) -> Init {
        if name.ends_with("norm.weight") {
            if self.unit_offset_norm {
                Init::Zeros
            } else {
                Init::Ones
            }
        } else if name.ends_with(".bias") {
            Init::Zeros
        } else {
            Init::Normal(self.initializer_range)
        }
    }
}

pub(crate) fn layer_param_name(i: usize, suffix: &str) -> String {
    format!("model.layers.{i}.{suffix}")
}

/// What a family's configuration gives the decoder.
pub trait DecoderConfig: Clone {
    /// The family's name in logs ("Llama", "Gemma").
    const FAMILY: &'static str;
    fn arch(&self) -> Arch;
    /// The family's checks (the shared ones through [`Arch::validate`]).
    fn validate(&self) -> Result<(), ModelError>;

    /// Every parameter in transformers' order ([`Arch::param_specs`]).
    fn param_specs(&self) -> Vec<ParamSpec> {
        self.arch().param_specs()
    }

    /// Parameter count, a tied lm_head counted once.
    fn num_params(&self) -> usize {
        self.arch().num_params()
    }
}

/// nn.Linear: `x @ weight^T + bias`, weight stored [out, in].
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// RMSNorm over the last dimension, normalised in fp32. Llama (LlamaRMSNorm) casts back to the
/// input's kind and then scales by the gain; Gemma (Gemma2RMSNorm) scales by (1 + gain) in fp32
/// and then casts.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
    unit_offset: bool,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        if !self.unit_offset {
            return kernels::rms_norm(x, &self.weight, self.eps);
        }
        let h = x.to_kind(Kind::Float);
        let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, None);
        let h = h * (variance + self.eps).rsqrt();
        (h * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(x.kind())
    }
}

/// The rotary embedding's inverse frequencies (fp32, [head_dim / 2]), computed as transformers'
/// rope init functions compute them ("default", "linear" and "llama3").
fn inv_freq(rope: &Rope, head_dim: usize) -> Tensor {
    let dim = head_dim as i64;
    let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / dim as f64;
    let inv_freq = Tensor::pow_scalar(rope.theta, &exponent).reciprocal();
    let s = match rope.scaling {
        RopeKind::Default => return inv_freq,
        RopeKind::Linear(factor) => return inv_freq / factor,
        RopeKind::Llama3(s) => s,
    };
    let old_context_len = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context_len / s.low_freq_factor;
    let high_freq_wavelen = old_context_len / s.high_freq_factor;
    let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
    // wavelen < high_freq_wavelen: kept; wavelen > low_freq_wavelen: divided by factor.
    let inv_freq_llama = (&inv_freq / s.factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
    // In between: interpolated with a smooth factor.
    let smooth_factor =
        (wavelen.reciprocal() * old_context_len - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
    let smoothed_inv_freq = (-&smooth_factor + 1.0) * &inv_freq_llama / s.factor + &smooth_factor * &inv_freq_llama;
    let is_medium_freq =
        wavelen.lt(high_freq_wavelen).logical_not().logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
    smoothed_inv_freq.where_self(&is_medium_freq, &inv_freq_llama)
}

/// cos and sin of the rotary embedding for positions start..start + t ([t, head_dim], in `kind`),
/// as the rotary embeddings' forward gives them (the implemented rope types have attention
/// scaling 1).
fn rope_tables(inv_freq: &Tensor, start: i64, t: i64, kind: Kind) -> (Tensor, Tensor) {
    let positions = Tensor::arange_start(start, start + t, (Kind::Int64, inv_freq.device())).to_kind(Kind::Float);
    let freqs = positions.unsqueeze(-1) * inv_freq;
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

/// The second half of the last dimension, negated, followed by the first half.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().expect("rotated tensors have a last dimension") / 2;
    let (x1, x2) = (x.narrow(-1, 0, half), x.narrow(-1, half, half));
    Tensor::cat(&[&-x2, &x1], -1)
}

/// apply_rotary_pos_emb on one of q, k ([B, heads, T, head_dim]; cos and sin [T, head_dim]).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

/// `cap * tanh(x / cap)`, each step in x's kind as transformers computes it.
fn softcap(x: &Tensor, cap: f64) -> Tensor {
    (x / cap).tanh() * cap
}

struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Gemma 3's QK-norm.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    /// Llama: the MLP's input norm; Gemma: the attention output's norm.
    post_attention_layernorm: RmsNorm,
    /// Gemma's pre_feedforward_layernorm (the MLP's input) and post_feedforward_layernorm.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
}

impl Layer {
    /// The tensors in `Arch::layer_shapes` order.
    fn tensors(&self) -> Vec<&Tensor> {
        let mut out = Vec::with_capacity(20);
        for lin in [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj] {
            out.push(&lin.weight);
            out.extend(&lin.bias);
        }
        if let Some((q, k)) = &self.qk_norm {
            out.extend([&q.weight, &k.weight]);
        }
        for lin in [&self.gate_proj, &self.up_proj, &self.down_proj] {
            out.push(&lin.weight);
            out.extend(&lin.bias);
        }
        out.push(&self.input_layernorm.weight);
        out.push(&self.post_attention_layernorm.weight);
        if let Some((pre, post)) = &self.feedforward_norms {
            out.extend([&pre.weight, &post.weight]);
        }
        out
    }

    /// The decoder layer on x [B, T, C] (LlamaDecoderLayer, Gemma2DecoderLayer,
    /// Gemma3DecoderLayer), cos and sin those of x's positions; with a layer cache, x holds the
    /// positions after the cached ones, whose keys and values join the cache (see [`attend`]).
    fn forward(
        &self,
        x: &Tensor,
        arch: &Arch,
        attn: LayerAttention,
        rope: &(Tensor, Tensor),
        cache: Option<&mut LayerKv>,
    ) -> Tensor {
        let h = self.input_layernorm.forward(x);
        let a = self.attention(&h, arch, attn, rope, cache);
        let (x, h) = match &self.feedforward_norms {
            None => {
                let x = x + a;
                let h = self.post_attention_layernorm.forward(&x);
                (x, h)
            }
            Some((pre, _)) => {
                let x = x + self.post_attention_layernorm.forward(&a);
                let h = pre.forward(&x);
                (x, h)
            }
        };
        let act = match arch.activation {
            Activation::Silu => kernels::Gate::Silu,
            Activation::GeluTanh => kernels::Gate::GeluTanh,
        };
        let product = kernels::gated_product(&self.gate_proj.forward(&h), &self.up_proj.forward(&h), act)
            .unwrap_or_else(|e| panic!("the gated MLP's product: {e}"));
        let m = self.down_proj.forward(&product);
        match &self.feedforward_norms {
            None => x + m,
            Some((_, post)) => x + post.forward(&m),
        }
    }

    /// Self-attention on the normed input h [B, T, C], through o_proj.
    fn attention(
        &self,
        h: &Tensor,
        arch: &Arch,
        attn: LayerAttention,
        (cos, sin): &(Tensor, Tensor),
        cache: Option<&mut LayerKv>,
    ) -> Tensor {
        let (b, t, _) = h.size3().expect("layer input is [B, T, C]");
        let hd = arch.head_dim as i64;
        // [B, T, heads * hd] to [B, heads, T, hd].
        let heads = |m: Tensor| m.view([b, t, -1, hd]).transpose(1, 2);
        let (mut q, mut k) = (heads(self.q_proj.forward(h)), heads(self.k_proj.forward(h)));
        let v = heads(self.v_proj.forward(h));
        if let Some((qn, kn)) = &self.qk_norm {
            q = qn.forward(&q);
            k = kn.forward(&k);
        }
        let (q, k) = (apply_rope(&q, cos, sin), apply_rope(&k, cos, sin));
        // Keys are cached after rope: each keeps the rotation of its own position.
        let Attend { k, v, mask } = attend(k, v, attn.window, cache);
        let gqa = arch.num_key_value_heads != arch.num_attention_heads;
        let y = match arch.attn_softcap {
            // libtorch's fused attention has no soft-capping: transformers' eager attention,
            // written out (scores in the input's kind, softmax in fp32 cast back).
            Some(cap) => {
                let groups = (arch.num_attention_heads / arch.num_key_value_heads) as i64;
                let repeat = |m: &Tensor| m.repeat_interleave_self_int(groups, 1, None);
                let (k, v) = if gqa { (repeat(&k), repeat(&v)) } else { (k, v) };
                let scores = softcap(&(q.matmul(&k.transpose(2, 3)) * arch.attention_scale), cap);
                let scores = match mask.allowed(t, h.device()) {
                    Some(allowed) => scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY),
                    None => scores,
                };
                scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
            }
            // enable_gqa lets num_attention_heads / num_key_value_heads query heads share each
            // key/value head, as transformers' sdpa path does; an explicit mask only where the
            // plain causal one is not it (a sliding window shorter than the sequence, or queries
            // after cached keys).
            None => {
                let (mask, causal) = mask.sdpa();
                Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, Some(arch.attention_scale), gqa)
            }
        };
        let y = y.transpose(1, 2).contiguous().reshape([b, t, -1]);
        self.o_proj.forward(&y)
    }
}

/// A decoder-only causal LM of configuration `C`, with its parameters as plain leaf tensors
/// (requires_grad) of one kind on one device.
pub struct Decoder<C: DecoderConfig> {
    cfg: C,
    arch: Arch,
    device: Device,
    kind: Kind,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// None when tied: the head is `embed_tokens`.
    lm_head: Option<Tensor>,
    /// Each rope's inverse frequencies, fp32 on `device` (buffers, not parameters).
    inv_freqs: Vec<Tensor>,
}

impl<C: DecoderConfig> Decoder<C> {
    /// A freshly initialised model (transformers' init); the values depend only on `seed` and
    /// the config (model::init).
    pub fn new(cfg: &C, device: Device, kind: Kind, seed: u64) -> Result<Decoder<C>, ModelError> {
        cfg.validate()?;
        check_kind(kind)?;
        let arch = cfg.arch();
        let specs = arch.param_specs();
        tracing::info!(
            "initialising {} {}L/{}H/{}KV/{}C, {} parameters, seed {seed}",
            C::FAMILY,
            arch.layers.len(),
            arch.num_attention_heads,
            arch.num_key_value_heads,
            arch.hidden_size,
            arch.num_params()
        );
        let named = init_params(&specs, seed, device, kind, |spec| arch.init_of(&spec.name))?;
        if let Some(p) = arch.pad_token_id {
            // nn.Embedding zeroes its padding_idx row at initialisation.
            let _ = named[0].1.get(p as i64).f_zero_()?;
        }
        Decoder::from_named(cfg, device, kind, named)
    }

    /// Builds the model from tensors that are already of the right kind, device and shape
    /// (interop loads them from a Hugging Face directory).
    pub fn from_named(cfg: &C, device: Device, kind: Kind, named: Vec<(String, Tensor)>) -> Result<Self, ModelError> {
        cfg.validate()?;
        let arch = cfg.arch();
        let mut params = NamedParams::new(&arch.param_specs(), named)?;
        let mut take = |name: &str| params.take(name);
        let (eps, unit_offset) = (arch.rms_norm_eps, arch.unit_offset_norm);
        let embed_tokens = take(EMBED);
        let layers = (0..arch.layers.len())
            .map(|i| {
                let mut linear = |name: &str, bias: bool| Linear {
                    weight: take(&layer_param_name(i, &format!("{name}.weight"))),
                    bias: bias.then(|| take(&layer_param_name(i, &format!("{name}.bias")))),
                };
                let (ab, mb) = (arch.attention_bias, arch.mlp_bias);
                let (q_proj, k_proj) = (linear("self_attn.q_proj", ab), linear("self_attn.k_proj", ab));
                let (v_proj, o_proj) = (linear("self_attn.v_proj", ab), linear("self_attn.o_proj", arch.o_proj_bias));
                let (gate_proj, up_proj) = (linear("mlp.gate_proj", mb), linear("mlp.up_proj", mb));
                let down_proj = linear("mlp.down_proj", mb);
                let mut norm = |name: &str| RmsNorm { weight: take(&layer_param_name(i, name)), eps, unit_offset };
                let qk_norm = arch.qk_norm.then(|| (norm("self_attn.q_norm.weight"), norm("self_attn.k_norm.weight")));
                let input_layernorm = norm("input_layernorm.weight");
                let post_attention_layernorm = norm("post_attention_layernorm.weight");
                let feedforward_norms = arch
                    .sandwich_norms
                    .then(|| (norm("pre_feedforward_layernorm.weight"), norm("post_feedforward_layernorm.weight")));
                Layer {
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj,
                    qk_norm,
                    gate_proj,
                    up_proj,
                    down_proj,
                    input_layernorm,
                    post_attention_layernorm,
                    feedforward_norms,
                }
            })
            .collect();
        let norm = RmsNorm { weight: take(NORM), eps, unit_offset };
        let lm_head = (!arch.tie_word_embeddings).then(|| take(LM_HEAD));
        let inv_freqs =
            arch.ropes.iter().map(|r| inv_freq(r, arch.head_dim).f_to_device(device)).collect::<Result<Vec<_>, _>>()?;
        Ok(Decoder { cfg: cfg.clone(), arch, device, kind, embed_tokens, layers, norm, lm_head, inv_freqs })
    }

    pub fn config(&self) -> &C {
        &self.cfg
    }

    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// The final norm, lm_head and the final soft-cap: [B, T, C] to logits [B, T, V].
    pub fn head(&self, x: &Tensor) -> Tensor {
        let logits = self.norm.forward(x).linear(self.lm_head_weight(), None::<Tensor>);
        match self.arch.final_softcap {
            Some(cap) => softcap(&logits, cap),
            None => logits,
        }
    }

    /// Logits [B, T, V] for token ids [B, T].
    pub fn forward(&self, idx: &Tensor) -> Tensor {
        let mut x = self.embed(idx);
        for i in 0..self.layers.len() {
            x = self.block(i, &x);
        }
        self.head(&x)
    }

    /// nanoGPT's sampling over this model's logits ([`super::generate::generate`]) with the
    /// key/value cache, the context cropped to max_position_embeddings.
    pub fn generate(
        &self,
        idx: &Tensor,
        max_new_tokens: usize,
        temperature: f64,
        top_k: Option<usize>,
        seed: u64,
    ) -> Result<Tensor, ModelError> {
        generate(self, idx, &Sampling::new(max_new_tokens, temperature, top_k, seed))
    }
}

impl<C: DecoderConfig> Decode for Decoder<C> {
    fn context(&self) -> Context {
        let a = &self.arch;
        Context {
            positions: a.max_position_embeddings,
            vocab_size: a.vocab_size,
            layers: a.layers.len(),
            device: self.device,
        }
    }

    /// The token embedding; positions enter through rope in `block_at`.
    fn embed_at(&self, idx: &Tensor, _start: i64) -> Tensor {
        self.embed(idx)
    }

    /// Rope at the positions start..start + T.
    fn block_at(&self, i: usize, x: &Tensor, start: i64, cache: Option<&mut LayerKv>) -> Tensor {
        let attn = self.arch.layers[i];
        let rope = rope_tables(&self.inv_freqs[attn.rope], start, x.size()[1], x.kind());
        self.layers[i].forward(x, &self.arch, attn, &rope, cache)
    }

    fn head(&self, x: &Tensor) -> Tensor {
        Decoder::head(self, x)
    }
}

impl<C: DecoderConfig> Model for Decoder<C> {
    /// Shallow handles to every parameter in `param_specs` order (see `Gpt::named_parameters`).
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(EMBED.to_string(), self.embed_tokens.shallow_clone())];
        let shapes = self.arch.layer_shapes();
        for (i, layer) in self.layers.iter().enumerate() {
            for ((suffix, _), t) in shapes.iter().zip(layer.tensors()) {
                out.push((layer_param_name(i, suffix), t.shallow_clone()));
            }
        }
        out.push((NORM.to_string(), self.norm.weight.shallow_clone()));
        if let Some(h) = &self.lm_head {
            out.push((LM_HEAD.to_string(), h.shallow_clone()));
        }
        out
    }

    /// Untied, the head (lm_head and the final norm) is a bucket of its own, complete before the
    /// last layer's backward runs; tied, the final norm joins the last layer's bucket, and the
    /// embedding, whose gradient is complete only after the embedding's backward adds to the
    /// head's, comes last as it always does.
    fn buckets(&self) -> Vec<Vec<String>> {
        let l = self.layers.len();
        let layers = (0..l).rev().map(|i| self.block_parameters(i));
        let mut buckets: Vec<Vec<String>> = Vec::with_capacity(l + 2);
        if self.lm_head.is_some() {
            buckets.push(vec![LM_HEAD.to_string(), NORM.to_string()]);
            buckets.extend(layers);
        } else {
            buckets.extend(layers);
            buckets[0].push(NORM.to_string());
        }
        buckets.push(self.embed_parameters());
        buckets
    }

    fn n_blocks(&self) -> usize {
        self.layers.len()
    }

    fn embed_parameters(&self) -> Vec<String> {
        vec![EMBED.to_string()]
    }

    fn block_parameters(&self, i: usize) -> Vec<String> {
        assert!(i < self.layers.len(), "layer {i} of a {}-layer model", self.layers.len());
        self.arch.layer_shapes().iter().map(|(s, _)| layer_param_name(i, s)).collect()
    }

    fn head_parameters(&self) -> Vec<String> {
        let head = if self.lm_head.is_some() { LM_HEAD } else { EMBED };
        vec![NORM.to_string(), head.to_string()]
    }

    /// The token embedding: idx [B, T] to [B, T, C], times sqrt(hidden_size) for Gemma (the scale
    /// rounded to the embedding's kind first, as transformers multiplies by a tensor of that
    /// kind). No position embedding: positions enter through rope inside attention.
    fn embed(&self, idx: &Tensor) -> Tensor {
        let padding_idx = self.arch.pad_token_id.map_or(-1, |p| p as i64);
        let x = Tensor::embedding(&self.embed_tokens, idx, padding_idx, false, false);
        if !self.arch.scale_embedding {
            return x;
        }
        let scale = Tensor::from((self.arch.hidden_size as f64).sqrt()).to_kind(x.kind()).to_device(x.device());
        x * scale
    }

    fn block(&self, i: usize, x: &Tensor) -> Tensor {
        self.block_at(i, x, 0, None)
    }

    /// The final norm, lm_head (soft-capped for Gemma 2) and the fp32 mean cross-entropy over
    /// targets != -1, in chunks.
    fn head_backward(&self, x: &Tensor, targets: &Tensor, scale: f64) -> Result<HeadGrads, TchError> {
        let head = Head {
            names: self.head_parameters(),
            norm_params: vec![&self.norm.weight],
            weight: self.lm_head_weight(),
            softcap: self.arch.final_softcap,
        };
        head_backward_in_chunks(x, targets, scale, head, |x| self.norm.forward(x))
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.head(x))
    }

    /// Records where the parameters live after the engine re-pointed them, and moves the rope
    /// buffers there.
    fn set_placement(&mut self, device: Device, kind: Kind) {
        self.device = device;
        self.kind = kind;
        for f in &mut self.inv_freqs {
            *f = f.to_device(device);
        }
    }
}
