//! Llama (transformers' LlamaForCausalLM, models/llama/modeling_llama.py) as a configuration of
//! the shared decoder ([`super::decoder`]): RMSNorm in fp32 cast back to the input's kind, rotary
//! position embeddings (Llama 3's frequency scaling optional), grouped-query attention, a SwiGLU
//! MLP, and an lm_head tied to the token embedding or not. Optional biases on the attention
//! (`attention_bias`, Qwen2-like) and on the MLP (`mlp_bias`). This module holds the
//! configuration under transformers' names and the presets.

use super::decoder::{Activation, Arch, Decoder, DecoderConfig, LayerAttention, Rope, RopeKind};
pub use super::decoder::{RopeScaling, EMBED, LM_HEAD, NORM};
use super::ModelError;
use serde::{Deserialize, Serialize};

/// LlamaForCausalLM: the decoder with a Llama configuration.
pub type Llama = Decoder<LlamaConfig>;

/// Shapes of Meta's released Llama 3 models as their config.json files give them, and a tiny
/// one for CPU runs and tests.
pub const PRESETS: [&str; 4] = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-tiny"];

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
            layers: vec![LayerAttention { window: None, rope: 0 }; self.num_hidden_layers],
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
