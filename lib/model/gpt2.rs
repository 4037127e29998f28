//! GPT-2 in tch, exactly as Hugging Face's GPT2LMHeadModel and nanoGPT define it: learned
//! position embeddings, pre-LayerNorm blocks, causal attention through libtorch's
//! scaled_dot_product_attention, tanh-approximated GELU, biases everywhere, LayerNorm eps 1e-5,
//! and an output projection tied to the token embedding.
//!
//! Parameters are plain tensors (no VarStore) named and laid out as transformers names and lays
//! them out, Conv1D weights included ([in, out], applied as `x @ w + b`), so Hugging Face
//! checkpoints move in and out with a plain copy. The trainer re-points every parameter into its
//! flat ZeRO buffer through the handles of `named_parameters` and runs the model piecewise
//! (`embed`, `block`, `head`) to overlap gradient reduction with backward.

use super::generate::{generate, Context, Decode, Sampling};
use super::init::{init_params, Init};
use super::kv_cache::{attend, Attend, LayerKv};
use super::{check_kind, head_backward_in_chunks, Head, HeadGrads, Model, ModelError, NamedParams, ParamSpec};
use crate::kernels;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

/// LayerNorm epsilon of every GPT-2 checkpoint.
pub const LAYER_NORM_EPS: f64 = 1e-5;
/// Standard deviation of GPT-2's normal initialisation.
pub const INIT_STD: f64 = 0.02;
/// The model sizes OpenAI released, by their Hugging Face names.
pub const PRESETS: [&str; 4] = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"];

/// Parameter names inside block `i`, after the `transformer.h.{i}.` prefix, in transformers'
/// order (which is the canonical order here too).
const BLOCK_PARAMS: [&str; 12] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];

pub const WTE: &str = "transformer.wte.weight";
pub const WPE: &str = "transformer.wpe.weight";
pub const LN_F_WEIGHT: &str = "transformer.ln_f.weight";
pub const LN_F_BIAS: &str = "transformer.ln_f.bias";

/// The shape of a GPT-2. `vocab_size` may be padded beyond the tokenizer's 50257 (nanoGPT uses
/// 50304, a multiple of 64, for faster matrix products); padded rows are never produced by the
/// tokenizer and learn to be improbable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub vocab_size: usize,
}

impl GptConfig {
    /// OpenAI's released sizes, with the tokenizer's vocabulary (50257) and 1024 positions.
    pub fn preset(name: &str) -> Result<GptConfig, ModelError> {
        let (n_layer, n_head, n_embd) = match name {
            "gpt2" => (12, 12, 768),
            "gpt2-medium" => (24, 16, 1024),
            "gpt2-large" => (36, 20, 1280),
            "gpt2-xl" => (48, 25, 1600),
            _ => return Err(ModelError::UnknownPreset(name.to_string())),
        };
        Ok(GptConfig { n_layer, n_head, n_embd, block_size: 1024, vocab_size: 50257 })
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 {
            return bad(format!("n_layer, n_head and n_embd must be positive (got {self:?})"));
        }
        if self.block_size == 0 || self.vocab_size == 0 {
            return bad(format!("block_size and vocab_size must be positive (got {self:?})"));
        }
        if self.n_embd % self.n_head != 0 {
            return bad(format!("n_embd {} is not a multiple of n_head {}", self.n_embd, self.n_head));
        }
        // Token ids travel as i64 and sizes as i64 through libtorch.
        if self.num_params() as u128 > i64::MAX as u128 / 8 {
            return bad(format!("{self:?} is too large"));
        }
        Ok(())
    }

    /// Every parameter in canonical order: wte, wpe, h.0.*, ..., h.{L-1}.*, ln_f.*.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let (c, v, t) = (self.n_embd as i64, self.vocab_size as i64, self.block_size as i64);
        let spec = ParamSpec::new;
        let mut specs = vec![spec(WTE.into(), vec![v, c]), spec(WPE.into(), vec![t, c])];
        for i in 0..self.n_layer {
            for (suffix, shape) in BLOCK_PARAMS.iter().zip(block_shapes(c)) {
                specs.push(spec(block_param_name(i, suffix), shape));
            }
        }
        specs.push(spec(LN_F_WEIGHT.into(), vec![c]));
        specs.push(spec(LN_F_BIAS.into(), vec![c]));
        specs
    }

    /// Parameter count, the tied lm_head counted once (as transformers' num_parameters does).
    pub fn num_params(&self) -> usize {
        let (c, v, t, l) = (self.n_embd, self.vocab_size, self.block_size, self.n_layer);
        let block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c);
        v * c + t * c + l * block + 2 * c
    }
}

fn block_shapes(c: i64) -> [Vec<i64>; 12] {
    [
        vec![c],
        vec![c],
        vec![c, 3 * c],
        vec![3 * c],
        vec![c, c],
        vec![c],
        vec![c],
        vec![c],
        vec![c, 4 * c],
        vec![4 * c],
        vec![4 * c, c],
        vec![c],
    ]
}

fn block_param_name(i: usize, suffix: &str) -> String {
    format!("transformer.h.{i}.{suffix}")
}

/// GPT-2's initialisation of one parameter: N(0, 0.02) for matrices and embeddings, with the two
/// residual projections scaled by 1/sqrt(2·n_layer) so the residual stream's variance does not
/// grow with depth; zero biases; LayerNorm gain 1.
fn init_of(name: &str, n_layer: usize) -> Init {
    if name.ends_with("c_proj.weight") {
        Init::Normal(INIT_STD / (2.0 * n_layer as f64).sqrt())
    } else if name.ends_with(".bias") {
        Init::Zeros
    } else if name.contains(".ln_") {
        Init::Ones
    } else {
        Init::Normal(INIT_STD)
    }
}

/// A Conv1D in transformers' sense: a linear layer whose weight is stored [in, out].
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    /// `bias + x @ weight` through one addmm, as transformers' Conv1D computes it (cuBLAS reads
    /// the [in, out] weight without a transpose copy), by `kernels::linear`, whose backward
    /// sums the bias's gradient with zerokit's kernel on a GPU.
    fn forward(&self, x: &Tensor) -> Tensor {
        self.on_rows(x, |rows| kernels::linear(rows, &self.weight, &self.bias).expect("linear on a Conv1D's shapes"))
    }

    /// `forward(gelu(pre))` through `kernels::activated_linear`, which keeps pre for backward
    /// but not gelu(pre): the MLP's largest saved tensor but one, 4·C a token and layer.
    fn forward_gelu(&self, pre: &Tensor) -> Tensor {
        self.on_rows(pre, |rows| {
            kernels::activated_linear(rows, &self.weight, &self.bias, kernels::Gate::GeluTanh)
                .expect("activated_linear on a GPT-2 MLP's shapes")
        })
    }

    /// `f` on x's rows ([-1, in]), its [rows, out] result viewed back to x's leading dimensions.
    fn on_rows(&self, x: &Tensor, f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        let mut out_shape = x.size();
        let n_in = *out_shape.last().expect("Conv1D input has at least one dimension");
        *out_shape.last_mut().unwrap() = self.weight.size()[1];
        f(&x.reshape([-1, n_in])).view(out_shape.as_slice())
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    /// libtorch's layer_norm by `kernels::layer_norm`, whose backward sums the gain's and bias's
    /// gradients with zerokit's kernel on a GPU.
    fn forward(&self, x: &Tensor) -> Tensor {
        kernels::layer_norm(x, &self.weight, &self.bias, LAYER_NORM_EPS).expect("layer_norm on a LayerNorm's shapes")
    }

    /// `(x + branch, forward(x + branch))` by `kernels::add_layer_norm`: on a GPU the residual add
    /// is made in the LayerNorm's pass, and its gradient added in the LayerNorm backward's.
    fn forward_after_add(&self, x: &Tensor, branch: &Tensor) -> (Tensor, Tensor) {
        kernels::add_layer_norm(x, branch, &self.weight, &self.bias, LAYER_NORM_EPS)
            .expect("add_layer_norm on a block's residual stream")
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
}

impl Block {
    /// The tensors in BLOCK_PARAMS order.
    fn tensors(&self) -> [&Tensor; 12] {
        [
            &self.ln_1.weight,
            &self.ln_1.bias,
            &self.c_attn.weight,
            &self.c_attn.bias,
            &self.attn_proj.weight,
            &self.attn_proj.bias,
            &self.ln_2.weight,
            &self.ln_2.bias,
            &self.c_fc.weight,
            &self.c_fc.bias,
            &self.mlp_proj.weight,
            &self.mlp_proj.bias,
        ]
    }

    /// The block on x [B, T, C]; with a layer cache, x holds the positions after the cached
    /// ones, whose keys and values join the cache (see [`attend`]).
    fn forward(&self, x: &Tensor, n_head: i64, cache: Option<&mut LayerKv>) -> Tensor {
        let (b, t, c) = x.size3().expect("block input is [B, T, C]");
        let hd = c / n_head;
        let qkv = self.c_attn.forward(&self.ln_1.forward(x));
        // [B, T, C] each, then [B, nh, T, hd]: heads become a batch dimension for attention.
        let heads = |m: &Tensor| m.view([b, t, n_head, hd]).transpose(1, 2);
        let qkv = qkv.split(c, 2);
        let Attend { k, v, mask } = attend(heads(&qkv[1]), heads(&qkv[2]), None, cache);
        let (mask, causal) = mask.sdpa();
        let y = Tensor::scaled_dot_product_attention(&heads(&qkv[0]), &k, &v, mask, 0.0, causal, None, false);
        let y = y.transpose(1, 2).contiguous().view([b, t, c]);
        let (x, h) = self.ln_2.forward_after_add(x, &self.attn_proj.forward(&y));
        let pre = self.c_fc.forward(&h);
        x + self.mlp_proj.forward_gelu(&pre)
    }
}

/// GPT-2 with its parameters as plain leaf tensors (requires_grad) of one kind on one device.
pub struct Gpt {
    cfg: GptConfig,
    device: Device,
    kind: Kind,
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
}

impl Gpt {
    /// A freshly initialised GPT-2 (see `init_of`). The values depend only on `seed` and the
    /// config: they are drawn in fp32 on the host by a counter-based generator, so the same seed
    /// gives the same model on CPU and CUDA, in any kind and with any number of threads.
    pub fn new(cfg: &GptConfig, device: Device, kind: Kind, seed: u64) -> Result<Gpt, ModelError> {
        cfg.validate()?;
        check_kind(kind)?;
        let specs = cfg.param_specs();
        let total: usize = specs.iter().map(ParamSpec::numel).sum();
        tracing::info!(
            "initialising GPT-2 {}L/{}H/{}C, {} parameters, seed {seed}",
            cfg.n_layer,
            cfg.n_head,
            cfg.n_embd,
            total
        );
        let named = init_params(&specs, seed, device, kind, |spec| init_of(&spec.name, cfg.n_layer))?;
        Gpt::from_named(cfg, device, kind, named)
    }

    /// Builds the model from tensors that are already of the right kind, device and shape
    /// (interop::hf loads them from a Hugging Face directory).
    pub fn from_named(
        cfg: &GptConfig,
        device: Device,
        kind: Kind,
        named: Vec<(String, Tensor)>,
    ) -> Result<Gpt, ModelError> {
        let mut params = NamedParams::new(&cfg.param_specs(), named)?;
        let mut take = |name: &str| params.take(name);
        let wte = take(WTE);
        let wpe = take(WPE);
        let h = (0..cfg.n_layer)
            .map(|i| {
                let mut p = BLOCK_PARAMS.map(|s| take(&block_param_name(i, s))).into_iter();
                let mut next = || p.next().expect("12 block parameters");
                let ln_1 = LayerNorm { weight: next(), bias: next() };
                let c_attn = Conv1D { weight: next(), bias: next() };
                let attn_proj = Conv1D { weight: next(), bias: next() };
                let ln_2 = LayerNorm { weight: next(), bias: next() };
                let c_fc = Conv1D { weight: next(), bias: next() };
                let mlp_proj = Conv1D { weight: next(), bias: next() };
                Block { ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj }
            })
            .collect();
        let ln_f = LayerNorm { weight: take(LN_F_WEIGHT), bias: take(LN_F_BIAS) };
        Ok(Gpt { cfg: *cfg, device, kind, wte, wpe, h, ln_f })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Final LayerNorm and the logits through the tied embedding: [B, T, C] to [B, T, V].
    pub fn head(&self, x: &Tensor) -> Tensor {
        self.ln_f.forward(x).linear(&self.wte, None::<Tensor>)
    }

    /// Logits [B, T, V] for token ids [B, T].
    pub fn forward(&self, idx: &Tensor) -> Tensor {
        let mut x = self.embed(idx);
        for i in 0..self.cfg.n_layer {
            x = self.block(i, &x);
        }
        self.head(&x)
    }

    /// Mean cross-entropy over targets != -1, computed in fp32 whatever the logits' kind.
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
        super::loss(logits, targets)
    }

    /// nanoGPT's sampling over this model's logits ([`super::generate::generate`]) with the
    /// key/value cache, the context cropped to block_size.
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

impl Decode for Gpt {
    fn context(&self) -> Context {
        let c = &self.cfg;
        Context { positions: c.block_size, vocab_size: c.vocab_size, layers: c.n_layer, device: self.device }
    }

    /// Token plus position embeddings.
    fn embed_at(&self, idx: &Tensor, start: i64) -> Tensor {
        let t = idx.size()[1];
        let end = start + t;
        assert!(end as usize <= self.cfg.block_size, "position {end} exceeds block_size {}", self.cfg.block_size);
        let pos = Tensor::arange_start(start, end, (Kind::Int64, idx.device()));
        let tok_emb = Tensor::embedding(&self.wte, idx, -1, false, false);
        let pos_emb = Tensor::embedding(&self.wpe, &pos, -1, false, false);
        tok_emb + pos_emb
    }

    /// GPT-2's positions enter through `embed_at`: the block needs no `start`.
    fn block_at(&self, i: usize, x: &Tensor, _start: i64, cache: Option<&mut LayerKv>) -> Tensor {
        self.h[i].forward(x, self.cfg.n_head as i64, cache)
    }

    fn head(&self, x: &Tensor) -> Tensor {
        Gpt::head(self, x)
    }
}

impl Model for Gpt {
    /// Shallow handles to every parameter in canonical order. A handle shares the parameter's
    /// TensorImpl: `set_data` on it re-points the model's own parameter (how ZeRO moves
    /// parameters into its flat buffer), and its `grad()` is the parameter's gradient.
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 + 12 * self.cfg.n_layer + 2);
        out.push((WTE.to_string(), self.wte.shallow_clone()));
        out.push((WPE.to_string(), self.wpe.shallow_clone()));
        for (i, block) in self.h.iter().enumerate() {
            for (suffix, t) in BLOCK_PARAMS.iter().zip(block.tensors()) {
                out.push((block_param_name(i, suffix), t.shallow_clone()));
            }
        }
        out.push((LN_F_WEIGHT.to_string(), self.ln_f.weight.shallow_clone()));
        out.push((LN_F_BIAS.to_string(), self.ln_f.bias.shallow_clone()));
        out
    }

    /// The last block's bucket also takes ln_f (ready after the head, tiny on its own), block i
    /// is bucket n_layer-1-i, and the embeddings come last: wte's gradient is complete only
    /// after the embedding's backward adds to the head's.
    fn buckets(&self) -> Vec<Vec<String>> {
        let l = self.cfg.n_layer;
        let mut buckets: Vec<Vec<String>> = (0..l).rev().map(|i| self.block_parameters(i)).collect();
        buckets[0].extend([LN_F_WEIGHT.to_string(), LN_F_BIAS.to_string()]);
        buckets.push(self.embed_parameters());
        buckets
    }

    fn n_blocks(&self) -> usize {
        self.cfg.n_layer
    }

    fn embed_parameters(&self) -> Vec<String> {
        vec![WTE.to_string(), WPE.to_string()]
    }

    fn block_parameters(&self, i: usize) -> Vec<String> {
        assert!(i < self.cfg.n_layer, "block {i} of a {}-layer model", self.cfg.n_layer);
        BLOCK_PARAMS.iter().map(|s| block_param_name(i, s)).collect()
    }

    /// ln_f and the lm_head, which is wte (tied).
    fn head_parameters(&self) -> Vec<String> {
        vec![LN_F_WEIGHT.to_string(), LN_F_BIAS.to_string(), WTE.to_string()]
    }

    /// Token plus position embeddings: idx [B, T] (Int64, T <= block_size) to [B, T, C].
    fn embed(&self, idx: &Tensor) -> Tensor {
        self.embed_at(idx, 0)
    }

    /// Transformer block `i` on the residual stream x [B, T, C].
    fn block(&self, i: usize, x: &Tensor) -> Tensor {
        self.block_at(i, x, 0, None)
    }

    /// Forward and backward of the head: ln_f, the tied lm_head and the mean cross-entropy over
    /// targets != -1, in chunks (see `model::head_backward_in_chunks`).
    fn head_backward(&self, x: &Tensor, targets: &Tensor, scale: f64) -> Result<HeadGrads, TchError> {
        let head = Head {
            names: self.head_parameters(),
            norm_params: vec![&self.ln_f.weight, &self.ln_f.bias],
            weight: &self.wte,
            softcap: None,
        };
        head_backward_in_chunks(x, targets, scale, head, |x| self.ln_f.forward(x))
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.head(x))
    }

    /// Records where the parameters live after their data were replaced in place (the ZeRO
    /// engine points them into its flat buffers, possibly on another device and kind).
    fn set_placement(&mut self, device: Device, kind: Kind) {
        self.device = device;
        self.kind = kind;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_specs_count_matches_num_params() {
        for name in PRESETS {
            let cfg = GptConfig::preset(name).unwrap();
            let n: usize = cfg.param_specs().iter().map(ParamSpec::numel).sum();
            assert_eq!(n, cfg.num_params(), "{name}");
        }
    }
}
