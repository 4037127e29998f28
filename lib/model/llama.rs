//! Llama in tch, exactly as transformers' LlamaForCausalLM computes it (models/llama/
//! modeling_llama.py), to be read beside it: RMSNorm in fp32 cast back to the input's kind,
//! rotary position embeddings (Llama 3's frequency scaling optional), grouped-query attention
//! through libtorch's scaled_dot_product_attention, a SwiGLU MLP, and an lm_head tied to the
//! token embedding or not. Optional biases on the attention (`attention_bias`, Qwen2-like) and
//! on the MLP (`mlp_bias`).
//!
//! Parameters are plain tensors named as transformers names them, with nn.Linear's [out, in]
//! layout, so Hugging Face checkpoints move in and out with a plain copy. As for GPT-2, the engine
//! re-points them into its flat buffer and runs the model piecewise (`embed`, `block`, head).

use super::generate::{generate, Context};
use super::init::{init_params, Init};
use super::{check_kind, head_backward_in_chunks, HeadGrads, Model, ModelError, NamedParams, ParamSpec};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

pub const EMBED: &str = "model.embed_tokens.weight";
pub const NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
/// Shapes of Meta's released Llama 3 models as their config.json files give them, and a tiny
/// one for CPU runs and tests.
pub const PRESETS: [&str; 4] = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-tiny"];

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

/// The shape and arithmetic of a Llama, under transformers' LlamaConfig names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Width of one attention head; hidden_size / num_attention_heads unless a config says.
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// None: plain rope.
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Standard deviation of the normal initialisation of matrices and the embedding.
    pub initializer_range: f64,
    /// The embedding's padding_idx: its row starts at zero and receives no gradient.
    pub pad_token_id: Option<usize>,
}

impl LlamaConfig {
    /// The shape of a preset (see [`PRESETS`]): Llama 3.1 and 3.2 with their 128256-token
    /// vocabulary, llama3 rope scaling and 131072 positions; `llama-tiny` is a two-layer GQA model
    /// with GPT-2's padded vocabulary, for CPU runs on `prepare`'s tokens.
    pub fn preset(name: &str) -> Result<LlamaConfig, ModelError> {
        // (hidden, intermediate, layers, heads, kv heads, head_dim)
        let (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim) =
            match name {
                "llama-3.2-1b" => (2048, 8192, 16, 32, 8, 64),
                "llama-3.2-3b" => (3072, 8192, 28, 24, 8, 128),
                "llama-3.1-8b" => (4096, 14336, 32, 32, 8, 128),
                "llama-tiny" => (64, 176, 2, 4, 2, 16),
                _ => return Err(ModelError::UnknownPreset(name.to_string())),
            };
        let tiny = name == "llama-tiny";
        let rope_scaling = (!tiny).then_some(RopeScaling {
            factor: if name == "llama-3.1-8b" { 8.0 } else { 32.0 },
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        Ok(LlamaConfig {
            vocab_size: if tiny { 50304 } else { 128256 },
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: if tiny { 1024 } else { 131072 },
            rms_norm_eps: 1e-5,
            rope_theta: if tiny { 10000.0 } else { 500000.0 },
            rope_scaling,
            tie_word_embeddings: name != "llama-3.1-8b",
            attention_bias: false,
            mlp_bias: false,
            initializer_range: 0.02,
            pad_token_id: None,
        })
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::LlamaConfig(m));
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((key, _)) = sizes.iter().find(|(_, n)| *n == 0) {
            return bad(format!("{key} must be positive"));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} is odd; rope rotates pairs of dimensions", self.head_dim));
        }
        let positive = [("rms_norm_eps", self.rms_norm_eps), ("rope_theta", self.rope_theta)];
        if let Some((key, x)) = positive.iter().find(|(_, x)| !(x.is_finite() && *x > 0.0)) {
            return bad(format!("{key} must be a positive number, got {x}"));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return bad(format!("initializer_range must be >= 0, got {}", self.initializer_range));
        }
        if let Some(s) = &self.rope_scaling {
            let factors = [s.factor, s.low_freq_factor, s.high_freq_factor];
            if factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                return bad(format!(
                    "rope_scaling: factor, low_freq_factor and high_freq_factor must be positive ({s:?})"
                ));
            }
            // The smooth interpolation divides by their difference.
            if s.high_freq_factor <= s.low_freq_factor || s.original_max_position_embeddings == 0 {
                return bad(format!(
                    "rope_scaling: high_freq_factor must exceed low_freq_factor and \
                     original_max_position_embeddings be positive ({s:?})"
                ));
            }
        }
        if let Some(p) = self.pad_token_id.filter(|&p| p >= self.vocab_size) {
            return bad(format!("pad_token_id {p} is not below vocab_size {}", self.vocab_size));
        }
        // Token ids travel as i64 and sizes as i64 through libtorch.
        if self.num_params() as u128 > i64::MAX as u128 / 8 {
            return bad(format!("{self:?} is too large"));
        }
        Ok(())
    }

    /// Every parameter in transformers' order: the embedding, each layer's attention, MLP and two
    /// norms, the final norm, and lm_head unless it is the embedding.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let (v, c) = (self.vocab_size as i64, self.hidden_size as i64);
        let mut specs = vec![ParamSpec::new(EMBED.into(), vec![v, c])];
        for i in 0..self.num_hidden_layers {
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
    /// registers them (self_attn, mlp, input_layernorm, post_attention_layernorm; weight, bias).
    fn layer_shapes(&self) -> Vec<(&'static str, Vec<i64>)> {
        let c = self.hidden_size as i64;
        let q = (self.num_attention_heads * self.head_dim) as i64;
        let kv = (self.num_key_value_heads * self.head_dim) as i64;
        let f = self.intermediate_size as i64;
        let (ab, mb) = (self.attention_bias, self.mlp_bias);
        let all = [
            ("self_attn.q_proj.weight", vec![q, c], true),
            ("self_attn.q_proj.bias", vec![q], ab),
            ("self_attn.k_proj.weight", vec![kv, c], true),
            ("self_attn.k_proj.bias", vec![kv], ab),
            ("self_attn.v_proj.weight", vec![kv, c], true),
            ("self_attn.v_proj.bias", vec![kv], ab),
            ("self_attn.o_proj.weight", vec![c, q], true),
            ("self_attn.o_proj.bias", vec![c], ab),
            ("mlp.gate_proj.weight", vec![f, c], true),
            ("mlp.gate_proj.bias", vec![f], mb),
            ("mlp.up_proj.weight", vec![f, c], true),
            ("mlp.up_proj.bias", vec![f], mb),
            ("mlp.down_proj.weight", vec![c, f], true),
            ("mlp.down_proj.bias", vec![c], mb),
            ("input_layernorm.weight", vec![c], true),
            ("post_attention_layernorm.weight", vec![c], true),
        ];
        all.into_iter().filter(|(_, _, present)| *present).map(|(s, shape, _)| (s, shape)).collect()
    }

    /// Parameter count, a tied lm_head counted once.
    pub fn num_params(&self) -> usize {
        let layer: i64 = self.layer_shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum();
        let (v, c) = (self.vocab_size, self.hidden_size);
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + self.num_hidden_layers * layer as usize + c + head
    }
}

fn layer_param_name(i: usize, suffix: &str) -> String {
    format!("model.layers.{i}.{suffix}")
}

/// transformers' _init_weights for Llama: N(0, initializer_range) for nn.Linear weights and the
/// embedding, zero biases, RMSNorm gains 1.
fn init_of(name: &str, std: f64) -> Init {
    if name.ends_with("norm.weight") {
        Init::Ones
    } else if name.ends_with(".bias") {
        Init::Zeros
    } else {
        Init::Normal(std)
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

/// LlamaRMSNorm: normalised in fp32, cast back to the input's kind, then scaled by the gain.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let input_kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, None);
        let h = h * (variance + self.eps).rsqrt();
        &self.weight * h.to_kind(input_kind)
    }
}

/// The rotary embedding's inverse frequencies (fp32, [head_dim / 2]), computed as transformers'
/// rope init functions compute them ("default" and "llama3").
fn inv_freq(cfg: &LlamaConfig) -> Tensor {
    let dim = cfg.head_dim as i64;
    let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / dim as f64;
    let inv_freq = Tensor::pow_scalar(cfg.rope_theta, &exponent).reciprocal();
    let Some(s) = &cfg.rope_scaling else {
        return inv_freq;
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

/// cos and sin of the rotary embedding for positions 0..t ([t, head_dim], in `kind`), as
/// LlamaRotaryEmbedding.forward gives them (llama3 and default have attention scaling 1).
fn rope_tables(inv_freq: &Tensor, t: i64, kind: Kind) -> (Tensor, Tensor) {
    let positions = Tensor::arange(t, (Kind::Int64, inv_freq.device())).to_kind(Kind::Float);
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

struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl Layer {
    /// The tensors in `LlamaConfig::layer_shapes` order.
    fn tensors(&self) -> Vec<&Tensor> {
        let mut out = Vec::with_capacity(16);
        for lin in
            [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj]
        {
            out.push(&lin.weight);
            out.extend(&lin.bias);
        }
        out.push(&self.input_layernorm.weight);
        out.push(&self.post_attention_layernorm.weight);
        out
    }

    /// LlamaDecoderLayer.forward on x [B, T, C].
    fn forward(&self, x: &Tensor, cfg: &LlamaConfig, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (b, t, _) = x.size3().expect("layer input is [B, T, C]");
        let hd = cfg.head_dim as i64;
        // LlamaAttention: [B, T, heads * hd] to [B, heads, T, hd].
        let h = self.input_layernorm.forward(x);
        let heads = |m: Tensor| m.view([b, t, -1, hd]).transpose(1, 2);
        let q = apply_rope(&heads(self.q_proj.forward(&h)), cos, sin);
        let k = apply_rope(&heads(self.k_proj.forward(&h)), cos, sin);
        let v = heads(self.v_proj.forward(&h));
        // Causal, scale 1/sqrt(head_dim); enable_gqa lets num_attention_heads / num_key_value_heads
        // query heads share each key/value head, as transformers' sdpa path does without a mask.
        let gqa = cfg.num_key_value_heads != cfg.num_attention_heads;
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, gqa);
        let y = y.transpose(1, 2).contiguous().reshape([b, t, -1]);
        let x = x + self.o_proj.forward(&y);
        // LlamaMLP: down(silu(gate(h)) * up(h)).
        let h = self.post_attention_layernorm.forward(&x);
        let m = self.down_proj.forward(&(self.gate_proj.forward(&h).silu() * self.up_proj.forward(&h)));
        x + m
    }
}

/// LlamaForCausalLM with its parameters as plain leaf tensors (requires_grad) of one kind on one
/// device.
pub struct Llama {
    cfg: LlamaConfig,
    device: Device,
    kind: Kind,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// None when tied: the head is `embed_tokens`.
    lm_head: Option<Tensor>,
    /// The rotary embedding's inverse frequencies, fp32 on `device` (a buffer, not a parameter).
    inv_freq: Tensor,
}

impl Llama {
    /// A freshly initialised Llama (see `init_of`); the values depend only on `seed` and the
    /// config (model::init).
    pub fn new(cfg: &LlamaConfig, device: Device, kind: Kind, seed: u64) -> Result<Llama, ModelError> {
        cfg.validate()?;
        check_kind(kind)?;
        let specs = cfg.param_specs();
        tracing::info!(
            "initialising Llama {}L/{}H/{}KV/{}C, {} parameters, seed {seed}",
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.hidden_size,
            cfg.num_params()
        );
        let named = init_params(&specs, seed, device, kind, |spec| init_of(&spec.name, cfg.initializer_range))?;
        if let Some(p) = cfg.pad_token_id {
            // nn.Embedding zeroes its padding_idx row at initialisation.
            let _ = named[0].1.get(p as i64).f_zero_()?;
        }
        Llama::from_named(cfg, device, kind, named)
    }

    /// Builds the model from tensors that are already of the right kind, device and shape
    /// (interop::hf loads them from a Hugging Face directory).
    pub fn from_named(
        cfg: &LlamaConfig,
        device: Device,
        kind: Kind,
        named: Vec<(String, Tensor)>,
    ) -> Result<Llama, ModelError> {
        cfg.validate()?;
        let mut params = NamedParams::new(&cfg.param_specs(), named)?;
        let mut take = |name: &str| params.take(name);
        let eps = cfg.rms_norm_eps;
        let embed_tokens = take(EMBED);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let mut linear = |name: &str, bias: bool| Linear {
                    weight: take(&layer_param_name(i, &format!("{name}.weight"))),
                    bias: bias.then(|| take(&layer_param_name(i, &format!("{name}.bias")))),
                };
                let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
                let (q_proj, k_proj) = (linear("self_attn.q_proj", ab), linear("self_attn.k_proj", ab));
                let (v_proj, o_proj) = (linear("self_attn.v_proj", ab), linear("self_attn.o_proj", ab));
                let (gate_proj, up_proj) = (linear("mlp.gate_proj", mb), linear("mlp.up_proj", mb));
                let down_proj = linear("mlp.down_proj", mb);
                let mut norm = |name: &str| RmsNorm { weight: take(&layer_param_name(i, name)), eps };
                let input_layernorm = norm("input_layernorm.weight");
                let post_attention_layernorm = norm("post_attention_layernorm.weight");
                Layer {
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj,
                    gate_proj,
                    up_proj,
                    down_proj,
                    input_layernorm,
                    post_attention_layernorm,
                }
            })
            .collect();
        let norm = RmsNorm { weight: take(NORM), eps };
        let lm_head = (!cfg.tie_word_embeddings).then(|| take(LM_HEAD));
        let inv_freq = inv_freq(cfg).f_to_device(device)?;
        Ok(Llama { cfg: cfg.clone(), device, kind, embed_tokens, layers, norm, lm_head, inv_freq })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
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

    /// The final norm and lm_head: [B, T, C] to logits [B, T, V].
    pub fn head(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x).linear(self.lm_head_weight(), None::<Tensor>)
    }

    /// Logits [B, T, V] for token ids [B, T].
    pub fn forward(&self, idx: &Tensor) -> Tensor {
        let mut x = self.embed(idx);
        for i in 0..self.cfg.num_hidden_layers {
            x = self.block(i, &x);
        }
        self.head(&x)
    }

    /// nanoGPT's sampling over this model's logits ([`super::generate::generate`]), the context
    /// cropped to max_position_embeddings.
    pub fn generate(
        &self,
        idx: &Tensor,
        max_new_tokens: usize,
        temperature: f64,
        top_k: Option<usize>,
        seed: u64,
    ) -> Result<Tensor, ModelError> {
        let c = &self.cfg;
        let limits = Context { positions: c.max_position_embeddings, vocab_size: c.vocab_size, device: self.device };
        generate(|x| self.forward(x), limits, idx, max_new_tokens, temperature, top_k, seed)
    }
}

impl Model for Llama {
    /// Shallow handles to every parameter in `param_specs` order (see `Gpt::named_parameters`).
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(EMBED.to_string(), self.embed_tokens.shallow_clone())];
        let shapes = self.cfg.layer_shapes();
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
        let l = self.cfg.num_hidden_layers;
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
        self.cfg.num_hidden_layers
    }

    fn embed_parameters(&self) -> Vec<String> {
        vec![EMBED.to_string()]
    }

    fn block_parameters(&self, i: usize) -> Vec<String> {
        assert!(i < self.cfg.num_hidden_layers, "layer {i} of a {}-layer model", self.cfg.num_hidden_layers);
        self.cfg.layer_shapes().iter().map(|(s, _)| layer_param_name(i, s)).collect()
    }

    fn head_parameters(&self) -> Vec<String> {
        let head = if self.lm_head.is_some() { LM_HEAD } else { EMBED };
        vec![NORM.to_string(), head.to_string()]
    }

    /// The token embedding: idx [B, T] to [B, T, C]. No position embedding: positions enter
    /// through rope inside attention.
    fn embed(&self, idx: &Tensor) -> Tensor {
        let padding_idx = self.cfg.pad_token_id.map_or(-1, |p| p as i64);
        Tensor::embedding(&self.embed_tokens, idx, padding_idx, false, false)
    }

    fn block(&self, i: usize, x: &Tensor) -> Tensor {
        let (cos, sin) = rope_tables(&self.inv_freq, x.size()[1], x.kind());
        self.layers[i].forward(x, &self.cfg, &cos, &sin)
    }

    /// The final norm, lm_head and the fp32 mean cross-entropy over targets != -1, in chunks.
    fn head_backward(&self, x: &Tensor, targets: &Tensor, scale: f64) -> Result<HeadGrads, TchError> {
        let norm = [&self.norm.weight];
        head_backward_in_chunks(x, targets, scale, self.head_parameters(), &norm, self.lm_head_weight(), |x| {
            self.norm.forward(x)
        })
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.head(x))
    }

    /// Records where the parameters live after the engine re-pointed them, and moves the rope
    /// buffer there.
    fn set_placement(&mut self, device: Device, kind: Kind) {
        self.device = device;
        self.kind = kind;
        self.inv_freq = self.inv_freq.to_device(device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tied: bool, bias: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 6,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: tied,
            attention_bias: bias,
            mlp_bias: bias,
            initializer_range: 0.02,
            pad_token_id: None,
        }
    }

    #[test]
    fn presets_are_valid_with_their_published_sizes() {
        // Parameter counts as transformers' num_parameters() gives them for Meta's configs.
        for (name, params) in
            [("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824), ("llama-3.1-8b", 8_030_261_248)]
        {
            let c = LlamaConfig::preset(name).unwrap();
            c.validate().unwrap();
            assert_eq!(c.num_params(), params, "{name}");
        }
        LlamaConfig::preset("llama-tiny").unwrap().validate().unwrap();
        assert!(matches!(LlamaConfig::preset("llama-2-7b"), Err(ModelError::UnknownPreset(_))));
    }

    #[test]
    fn names_and_counts_agree_with_the_specs() {
        for (tied, bias) in [(true, false), (false, true)] {
            let c = cfg(tied, bias);
            let specs = c.param_specs();
            let n: usize = specs.iter().map(ParamSpec::numel).sum();
            assert_eq!(n, c.num_params());
            let model = Llama::new(&c, Device::Cpu, Kind::Float, 1).unwrap();
            let names: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
            let spec_names: Vec<String> = specs.into_iter().map(|s| s.name).collect();
            assert_eq!(names, spec_names);
        }
    }
}
