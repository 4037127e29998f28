//! Llama (transformers' LlamaForCausalLM, models/llama/modeling_llama.py) as a configuration of
//! the shared decoder ([`super::decoder`]): RMSNorm in fp32 cast back to the input's kind, rotary
//! position embeddings (Llama 3's frequency scaling optional), grouped-query attention, a SwiGLU
//! MLP, and an lm_head tied to the token embedding or not. Optional biases on the attention
//! (`attention_bias`: q, k, v and o) and on the MLP (`mlp_bias`).
//!
//! Mistral (MistralForCausalLM, modeling_mistral.py) and Qwen2 (Qwen2ForCausalLM,
//! modeling_qwen2.py) are the same model with two differences, so they are this configuration
//! with `model_type` saying which class it is: a sliding window (Mistral's `sliding_window` on
//! every layer; Qwen2's on the layers its `layer_types` mark, by default those from
//! `max_window_layers` on, and only when `use_sliding_window`), and Qwen2's biases on q, k and v
//! but not o. This module holds the configuration under transformers' names and the presets.

use super::decoder::{Activation, Arch, Decoder, DecoderConfig, LayerAttention, Rope, RopeKind};
pub use super::decoder::{RopeScaling, EMBED, LM_HEAD, NORM};
use super::gemma::LayerType;
use super::ModelError;
use serde::{Deserialize, Serialize};

/// LlamaForCausalLM: the decoder with a Llama configuration.
pub type Llama = Decoder<LlamaConfig>;

/// Shapes of Meta's released Llama 3 models as their config.json files give them, a tiny one for
/// CPU runs and tests, and Mistral 7B's and Qwen2.5 0.5B's shapes.
pub const PRESETS: [&str; 6] =
    ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-tiny", "mistral-7b", "qwen2.5-0.5b"];

/// Which transformers class the configuration is, by its model_type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LlamaVariant {
    #[default]
    #[serde(rename = "llama")]
    Llama,
    #[serde(rename = "mistral")]
    Mistral,
    #[serde(rename = "qwen2")]
    Qwen2,
}

impl LlamaVariant {
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaVariant::Llama => "llama",
            LlamaVariant::Mistral => "mistral",
            LlamaVariant::Qwen2 => "qwen2",
        }
    }

    /// The name in logs and in config.json's `architectures` (with "ForCausalLM").
    pub fn name(self) -> &'static str {
        match self {
            LlamaVariant::Llama => "Llama",
            LlamaVariant::Mistral => "Mistral",
            LlamaVariant::Qwen2 => "Qwen2",
        }
    }
}

/// The shape and arithmetic of a Llama, Mistral or Qwen2, under transformers' config names
/// (LlamaConfig's, MistralConfig's, Qwen2Config's). The last four fields are absent from the
/// manifests of checkpoints written before Mistral and Qwen2, which read as Llama's.
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
    #[serde(default)]
    pub model_type: LlamaVariant,
    /// The window of the sliding-window layers (key j seen from query i when i - window < j <= i);
    /// None: every layer attends to the whole prefix. Qwen2's is None unless use_sliding_window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2's per-layer attention (`layer_types`, resolved from max_window_layers when a
    /// config.json does not list them); None (Llama, Mistral): every layer the same.
    #[serde(default)]
    pub layer_types: Option<Vec<LayerType>>,
    /// Qwen2's max_window_layers as read (written back; layer_types is what counts).
    #[serde(default)]
    pub max_window_layers: Option<usize>,
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
                "mistral-7b" | "qwen2.5-0.5b" => return Ok(LlamaConfig::other_preset(name)),
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
            model_type: LlamaVariant::Llama,
            sliding_window: None,
            layer_types: None,
            max_window_layers: None,
        })
    }

    /// mistral-7b: Mistral-7B-v0.1's config.json (a window of 4096 on every layer, 32768
    /// positions); qwen2.5-0.5b: Qwen2.5-0.5B's (q/k/v biases, a tied head, 151936 tokens,
    /// use_sliding_window off).
    fn other_preset(name: &str) -> LlamaConfig {
        let mistral = name == "mistral-7b";
        let layers = if mistral { 32 } else { 24 };
        LlamaConfig {
            vocab_size: if mistral { 32000 } else { 151936 },
            hidden_size: if mistral { 4096 } else { 896 },
            intermediate_size: if mistral { 14336 } else { 4864 },
            num_hidden_layers: layers,
            num_attention_heads: if mistral { 32 } else { 14 },
            num_key_value_heads: if mistral { 8 } else { 2 },
            head_dim: if mistral { 128 } else { 64 },
            max_position_embeddings: 32768,
            rms_norm_eps: if mistral { 1e-5 } else { 1e-6 },
            rope_theta: if mistral { 10000.0 } else { 1_000_000.0 },
            rope_scaling: None,
            tie_word_embeddings: !mistral,
            attention_bias: !mistral,
            mlp_bias: false,
            initializer_range: 0.02,
            pad_token_id: None,
            model_type: if mistral { LlamaVariant::Mistral } else { LlamaVariant::Qwen2 },
            sliding_window: mistral.then_some(4096),
            layer_types: (!mistral).then(|| vec![LayerType::Full; layers]),
            max_window_layers: (!mistral).then_some(24),
        }
    }

    /// The window of each layer (None: global).
    pub fn windows(&self) -> Vec<Option<usize>> {
        match &self.layer_types {
            None => vec![self.sliding_window; self.num_hidden_layers],
            Some(types) => {
                types.iter().map(|t| if *t == LayerType::Sliding { self.sliding_window } else { None }).collect()
            }
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |msg: String| Err(ModelError::LlamaConfig(msg));
        let (name, qwen2) = (self.model_type.name(), self.model_type == LlamaVariant::Qwen2);
        // What each class hard-codes: transformers ignores these keys for Mistral and Qwen2, so
        // a configuration that sets them otherwise would not be the model transformers builds.
        if self.model_type != LlamaVariant::Llama && (self.mlp_bias || self.attention_bias != qwen2) {
            return err(format!(
                "{name} has {} biases on q/k/v and none on the MLP (attention_bias {}, mlp_bias {})",
                if qwen2 { "" } else { "no" },
                self.attention_bias,
                self.mlp_bias
            ));
        }
        if self.model_type == LlamaVariant::Llama && self.sliding_window.is_some() {
            return err("sliding_window is set, but LlamaForCausalLM has no sliding window (Mistral has)".into());
        }
        match (&self.layer_types, qwen2) {
            (Some(t), true) if t.len() != self.num_hidden_layers => {
                return err(format!("layer_types has {} entries for {} layers", t.len(), self.num_hidden_layers))
            }
            (Some(_), false) => {
                return err(format!("layer_types is Qwen2's; {name} applies one attention to every layer"))
            }
            (None, true) => return err("Qwen2 needs its layer_types".into()),
            _ => {}
        }
        self.arch().validate().map_err(ModelError::LlamaConfig)
    }
}

impl DecoderConfig for LlamaConfig {
    const FAMILY: &'static str = "Llama";

    fn arch(&self) -> Arch {
        let scaling = self.rope_scaling.map_or(RopeKind::Default, RopeKind::Llama3);
        Arch {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias,
            // Qwen2's attention biases stop at v_proj.
            o_proj_bias: self.attention_bias && self.model_type != LlamaVariant::Qwen2,
            mlp_bias: self.mlp_bias,
            pad_token_id: self.pad_token_id,
            initializer_range: self.initializer_range,
            unit_offset_norm: false,
            activation: Activation::Silu,
            scale_embedding: false,
            sandwich_norms: false,
            qk_norm: false,
            attention_scale: 1.0 / (self.head_dim as f64).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            ropes: vec![Rope { theta: self.rope_theta, scaling }],
            layers: self.windows().into_iter().map(|window| LayerAttention { window, rope: 0 }).collect(),
        }
    }

    fn validate(&self) -> Result<(), ModelError> {
        LlamaConfig::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::DecoderConfig;
    use crate::model::{Model, ParamSpec};
    use tch::{Device, Kind};

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
            model_type: LlamaVariant::Llama,
            sliding_window: None,
            layer_types: None,
            max_window_layers: None,
        }
    }

    #[test]
    fn presets_are_valid_with_their_published_sizes() {
        // Parameter counts as transformers' num_parameters() gives them for Meta's configs.
        let published = [
            ("llama-3.2-1b", 1_235_814_400),
            ("llama-3.2-3b", 3_212_749_824),
            ("llama-3.1-8b", 8_030_261_248),
            ("mistral-7b", 7_241_732_096),
            ("qwen2.5-0.5b", 494_032_768),
        ];
        for (name, params) in published {
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
