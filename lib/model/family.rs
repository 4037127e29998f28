//! The model families zerokit trains behind one configuration type ([`ModelConfig`]) and one
//! model type ([`AnyModel`]): what the trainer, `train eval`/`sample`, checkpoints and the tools
//! hold when the family is only known at run time (a preset, a config.json, a checkpoint).
//!
//! A checkpoint's manifest records the configuration as `model_config`: GPT-2's as it always has
//! (its five sizes, no `family` key, so checkpoints of every earlier version read unchanged),
//! every other family's with `"family"` naming it.

use super::decoder::DecoderConfig;
use super::generate::{generate, Context, Decode, Sampling};
use super::kv_cache::LayerKv;
use super::{Gemma, GemmaConfig, Gpt, GptConfig, HeadGrads, Llama, LlamaConfig, Model, ModelError, ParamSpec};
use serde_json::Value;
use tch::{Device, Kind, TchError, Tensor};

/// A model's shape, whichever family it is.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Gpt2(GptConfig),
    Llama(LlamaConfig),
    Gemma(GemmaConfig),
}

/// Every preset name, GPT-2's first.
pub fn preset_names() -> Vec<&'static str> {
    let (gpt2, llama, gemma) =
        (super::gpt2::PRESETS.iter(), super::llama::PRESETS.iter(), super::gemma::PRESETS.iter());
    gpt2.chain(llama).chain(gemma).copied().collect()
}

impl ModelConfig {
    /// A GPT-2, Llama or Gemma preset by name ([`preset_names`]).
    pub fn preset(name: &str) -> Result<ModelConfig, ModelError> {
        match GptConfig::preset(name) {
            Ok(c) => Ok(ModelConfig::Gpt2(c)),
            Err(_) => match LlamaConfig::preset(name) {
                Ok(c) => Ok(ModelConfig::Llama(c)),
                Err(_) => GemmaConfig::preset(name).map(ModelConfig::Gemma),
            },
        }
    }

    /// The family's name as manifests and messages give it.
    pub fn family(&self) -> &'static str {
        match self {
            ModelConfig::Gpt2(_) => "gpt2",
            ModelConfig::Llama(_) => "llama",
            ModelConfig::Gemma(_) => "gemma",
        }
    }

    /// The configuration a manifest's `model_config` records (no `family`: GPT-2).
    pub fn from_manifest(v: &Value) -> Result<ModelConfig, String> {
        let family = match v.get("family") {
            None => "gpt2",
            Some(f) => f.as_str().ok_or(format!("family must be a string, got {f}"))?,
        };
        let parsed = match family {
            "gpt2" => serde_json::from_value(v.clone()).map(ModelConfig::Gpt2),
            "llama" => serde_json::from_value(v.clone()).map(ModelConfig::Llama),
            "gemma" => serde_json::from_value(v.clone()).map(ModelConfig::Gemma),
            other => return Err(format!("family {other:?} is not one zerokit knows (gpt2, llama, gemma)")),
        };
        parsed.map_err(|e| format!("not a {family} configuration: {e}"))
    }

    /// What a manifest records as `model_config`.
    pub fn to_manifest(&self) -> Value {
        match self {
            ModelConfig::Gpt2(c) => serde_json::to_value(c).expect("a config serializes"),
            ModelConfig::Llama(c) => with_family(serde_json::to_value(c), "llama"),
            ModelConfig::Gemma(c) => with_family(serde_json::to_value(c), "gemma"),
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            ModelConfig::Gpt2(c) => c.validate(),
            ModelConfig::Llama(c) => c.validate(),
            ModelConfig::Gemma(c) => c.validate(),
        }
    }

    /// Every parameter in the family's canonical order.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        match self {
            ModelConfig::Gpt2(c) => c.param_specs(),
            ModelConfig::Llama(c) => c.param_specs(),
            ModelConfig::Gemma(c) => c.param_specs(),
        }
    }

    /// Parameter count, a tied head counted once.
    pub fn num_params(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.num_params(),
            ModelConfig::Llama(c) => c.num_params(),
            ModelConfig::Gemma(c) => c.num_params(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Gemma(c) => c.vocab_size,
        }
    }

    pub fn set_vocab_size(&mut self, v: usize) {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size = v,
            ModelConfig::Llama(c) => c.vocab_size = v,
            ModelConfig::Gemma(c) => c.vocab_size = v,
        }
    }

    /// The longest sequence the model takes: GPT-2's learned positions, Llama's and Gemma's
    /// max_position_embeddings.
    pub fn positions(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.block_size,
            ModelConfig::Llama(c) => c.max_position_embeddings,
            ModelConfig::Gemma(c) => c.max_position_embeddings,
        }
    }

    /// (layers, attention heads, hidden size).
    pub fn dims(&self) -> (usize, usize, usize) {
        match self {
            ModelConfig::Gpt2(c) => (c.n_layer, c.n_head, c.n_embd),
            ModelConfig::Llama(c) => (c.num_hidden_layers, c.num_attention_heads, c.hidden_size),
            ModelConfig::Gemma(c) => (c.num_hidden_layers, c.num_attention_heads, c.hidden_size),
        }
    }

    /// Training FLOPs per token at sequence length `seq` (PaLM's appendix B, as nanoGPT's MFU):
    /// 6 per parameter, plus attention's 12 · layers · (query heads · head width) · seq.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        let (layers, width) = match self {
            ModelConfig::Gpt2(c) => (c.n_layer, c.n_embd),
            ModelConfig::Llama(c) => (c.num_hidden_layers, c.num_attention_heads * c.head_dim),
            ModelConfig::Gemma(c) => (c.num_hidden_layers, c.num_attention_heads * c.head_dim),
        };
        6.0 * self.num_params() as f64 + 12.0 * (layers * width * seq) as f64
    }

    /// One line for logs: family and sizes.
    pub fn summary(&self) -> String {
        let params = self.num_params() as f64 / 1e6;
        match self {
            ModelConfig::Gpt2(c) => format!(
                "GPT-2, {} layers, {} heads, {} embd, block {}, vocab {}: {params:.2}M parameters",
                c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size
            ),
            ModelConfig::Llama(c) => {
                let windowed = c.windows().iter().filter(|w| w.is_some()).count();
                let layers = match c.sliding_window {
                    Some(w) if windowed > 0 => {
                        format!("{} layers ({windowed} with sliding window {w})", c.num_hidden_layers)
                    }
                    _ => format!("{} layers", c.num_hidden_layers),
                };
                format!(
                    "{}, {layers}, {} heads ({} key/value), hidden {}, MLP {}, {} positions, vocab {}, {} head: \
                     {params:.2}M parameters",
                    c.model_type.name(),
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.hidden_size,
                    c.intermediate_size,
                    c.max_position_embeddings,
                    c.vocab_size,
                    if c.tie_word_embeddings { "tied" } else { "untied" }
                )
            }
            ModelConfig::Gemma(c) => format!(
                "Gemma ({}), {} layers ({} local with window {}), {} heads ({} key/value), hidden {}, MLP {}, \
                 {} positions, vocab {}: {params:.2}M parameters",
                c.model_type.model_type(),
                c.num_hidden_layers,
                c.layer_types.iter().filter(|t| **t == super::LayerType::Sliding).count(),
                c.sliding_window,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.hidden_size,
                c.intermediate_size,
                c.max_position_embeddings,
                c.vocab_size
            ),
        }
    }

    /// A freshly initialised model of this shape (the family's seeded init).
    pub fn new_model(&self, device: Device, kind: Kind, seed: u64) -> Result<AnyModel, ModelError> {
        Ok(match self {
            ModelConfig::Gpt2(c) => AnyModel::Gpt2(Gpt::new(c, device, kind, seed)?),
            ModelConfig::Llama(c) => AnyModel::Llama(Llama::new(c, device, kind, seed)?),
            ModelConfig::Gemma(c) => AnyModel::Gemma(Gemma::new(c, device, kind, seed)?),
        })
    }
}

/// A family's configuration as a manifest records it: its fields and `family`.
fn with_family(v: serde_json::Result<Value>, family: &str) -> Value {
    let mut v = v.expect("a config serializes");
    v["family"] = Value::from(family);
    v
}

/// A model of any family: the one type the trainer's engine, evaluation and sampling hold.
pub enum AnyModel {
    Gpt2(Gpt),
    Llama(Llama),
    Gemma(Gemma),
}

impl From<Gpt> for AnyModel {
    fn from(m: Gpt) -> AnyModel {
        AnyModel::Gpt2(m)
    }
}

impl From<Llama> for AnyModel {
    fn from(m: Llama) -> AnyModel {
        AnyModel::Llama(m)
    }
}

impl From<Gemma> for AnyModel {
    fn from(m: Gemma) -> AnyModel {
        AnyModel::Gemma(m)
    }
}

/// `$body` with `$m` bound to the model inside, whichever family.
macro_rules! each {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            AnyModel::Gpt2($m) => $body,
            AnyModel::Llama($m) => $body,
            AnyModel::Gemma($m) => $body,
        }
    };
}

impl AnyModel {
    pub fn config(&self) -> ModelConfig {
        match self {
            AnyModel::Gpt2(m) => ModelConfig::Gpt2(*m.config()),
            AnyModel::Llama(m) => ModelConfig::Llama(m.config().clone()),
            AnyModel::Gemma(m) => ModelConfig::Gemma(m.config().clone()),
        }
    }

    pub fn device(&self) -> Device {
        each!(self, m => m.device())
    }

    pub fn kind(&self) -> Kind {
        each!(self, m => m.kind())
    }

    /// Logits [B, T, V] for token ids [B, T].
    pub fn forward(&self, idx: &Tensor) -> Tensor {
        each!(self, m => m.forward(idx))
    }

    /// nanoGPT's sampling ([`super::generate::generate`]) with the key/value cache, the context
    /// cropped to the model's positions.
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

impl Decode for AnyModel {
    fn context(&self) -> Context {
        each!(self, m => m.context())
    }

    fn embed_at(&self, idx: &Tensor, start: i64) -> Tensor {
        each!(self, m => m.embed_at(idx, start))
    }

    fn block_at(&self, i: usize, x: &Tensor, start: i64, cache: Option<&mut LayerKv>) -> Tensor {
        each!(self, m => m.block_at(i, x, start, cache))
    }

    fn head(&self, x: &Tensor) -> Tensor {
        each!(self, m => Decode::head(m, x))
    }
}

impl Model for AnyModel {
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        each!(self, m => m.named_parameters())
    }

    fn buckets(&self) -> Vec<Vec<String>> {
        each!(self, m => m.buckets())
    }

    fn n_blocks(&self) -> usize {
        each!(self, m => m.n_blocks())
    }

    fn embed_parameters(&self) -> Vec<String> {
        each!(self, m => m.embed_parameters())
    }

    fn block_parameters(&self, i: usize) -> Vec<String> {
        each!(self, m => m.block_parameters(i))
    }

    fn head_parameters(&self) -> Vec<String> {
        each!(self, m => m.head_parameters())
    }

    fn embed(&self, idx: &Tensor) -> Tensor {
        each!(self, m => m.embed(idx))
    }

    fn block(&self, i: usize, x: &Tensor) -> Tensor {
        each!(self, m => m.block(i, x))
    }

    fn head_backward(&self, x: &Tensor, targets: &Tensor, scale: f64) -> Result<HeadGrads, TchError> {
        each!(self, m => m.head_backward(x, targets, scale))
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        each!(self, m => m.logits(x))
    }

    fn eval_loss(&self, idx: &Tensor, targets: &Tensor) -> Tensor {
        each!(self, m => m.eval_loss(idx, targets))
    }

    fn set_placement(&mut self, device: Device, kind: Kind) {
        each!(self, m => m.set_placement(device, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_name_the_family_except_gpt2s() {
        let gpt = ModelConfig::preset("gpt2").unwrap();
        let v = gpt.to_manifest();
        assert!(v.get("family").is_none(), "{v}");
        assert_eq!(ModelConfig::from_manifest(&v).unwrap(), gpt);
        for name in super::super::llama::PRESETS {
            let llama = ModelConfig::preset(name).unwrap();
            let v = llama.to_manifest();
            assert_eq!(v["family"], "llama");
            assert_eq!(ModelConfig::from_manifest(&v).unwrap(), llama);
        }
        for name in super::super::gemma::PRESETS {
            let gemma = ModelConfig::preset(name).unwrap();
            let v = gemma.to_manifest();
            assert_eq!(v["family"], "gemma");
            assert_eq!(ModelConfig::from_manifest(&v).unwrap(), gemma);
        }
        let err = ModelConfig::from_manifest(&serde_json::json!({"family": "mamba"})).unwrap_err();
        assert!(err.contains("mamba"), "{err}");
        let err = ModelConfig::from_manifest(&serde_json::json!({"family": "llama", "vocab_size": 5})).unwrap_err();
        assert!(err.contains("not a llama configuration"), "{err}");
    }

    #[test]
    fn every_preset_name_resolves() {
        for name in preset_names() {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
        assert!(matches!(ModelConfig::preset("gemma-7b"), Err(ModelError::UnknownPreset(_))));
        let msg = ModelError::UnknownPreset("x".into()).to_string();
        assert!(preset_names().iter().all(|n| msg.contains(n)), "{msg}");
    }
}
