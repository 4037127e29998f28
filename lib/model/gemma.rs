//! Gemma 2 and Gemma 3's text model (transformers' Gemma2ForCausalLM and Gemma3ForCausalLM,
//! models/gemma2/modeling_gemma2.py and models/gemma3/modeling_gemma3.py) as configurations of
//! the shared decoder ([`super::decoder`]): the embedding scaled by sqrt(hidden_size), RMSNorm
//! scaling by (1 + gain), GeGLU (tanh-approximated GELU), norms before and after both attention
//! and the MLP, attention scaled by query_pre_attn_scalar^-0.5, local sliding-window layers
//! interleaved with global ones (`layer_types`), and a tied head. Gemma 2 soft-caps the attention
//! and final logits; Gemma 3 normalises queries and keys (QK-norm) and gives its local layers
//! their own rope base (rope_local_base_freq), its global ones linear rope scaling.
//! This module holds the configuration under transformers' names and the presets.

use super::decoder::{Activation, Arch, Decoder, DecoderConfig, LayerAttention, Rope, RopeKind};
use super::ModelError;
use serde::{Deserialize, Serialize};

/// Gemma2ForCausalLM or Gemma3ForCausalLM: the decoder with a Gemma configuration.
pub type Gemma = Decoder<GemmaConfig>;

/// Published shapes (Gemma 2 2B; Gemma 3 27B's text model) and a tiny Gemma 3 for CPU runs and
/// tests.
pub const PRESETS: [&str; 3] = ["gemma-2-2b", "gemma-3-27b", "gemma-tiny"];

/// Which Gemma, by transformers' model_type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GemmaVersion {
    #[serde(rename = "gemma2")]
    Gemma2,
    /// Gemma 3's text model (Gemma3TextConfig).
    #[serde(rename = "gemma3_text")]
    Gemma3,
}

impl GemmaVersion {
    pub fn model_type(self) -> &'static str {
        match self {
            GemmaVersion::Gemma2 => "gemma2",
            GemmaVersion::Gemma3 => "gemma3_text",
        }
    }
}

/// A layer's attention, under transformers' layer_types names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerType {
    #[serde(rename = "sliding_attention")]
    Sliding,
    #[serde(rename = "full_attention")]
    Full,
}

impl LayerType {
    /// transformers' default pattern: every `period`-th layer global, the others local (Gemma 2:
    /// 2, alternating from a local first layer; Gemma 3: sliding_window_pattern, 6).
    pub fn pattern(layers: usize, period: usize) -> Vec<LayerType> {
        (0..layers).map(|i| if (i + 1) % period == 0 { LayerType::Full } else { LayerType::Sliding }).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            LayerType::Sliding => "sliding_attention",
            LayerType::Full => "full_attention",
        }
    }
}

/// The shape and arithmetic of a Gemma 2 or 3 text model, under transformers' config names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmaConfig {
    pub model_type: GemmaVersion,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// The rope base of the global layers (Gemma 2: of every layer).
    pub rope_theta: f64,
    /// The rope base of the sliding-window layers (Gemma 3's rope_local_base_freq; Gemma 2 uses
    /// `rope_theta` for all).
    pub rope_local_base_freq: f64,
    /// Linear rope scaling of the global layers (Gemma 3 27B: 8); None: plain rope.
    pub rope_scaling_factor: Option<f64>,
    pub query_pre_attn_scalar: usize,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Standard deviation of the normal initialisation of matrices and the embedding.
    pub initializer_range: f64,
    /// The embedding's padding_idx: its row starts at zero and receives no gradient.
    pub pad_token_id: Option<usize>,
}

impl GemmaConfig {
    /// The shape of a preset (see [`PRESETS`]), as google's config.json files give them:
    /// gemma-2-2b (soft-capping, alternating local and global layers, 256000 tokens) and
    /// gemma-3-27b's text model (QK-norm, five local layers to a global one, 262208 tokens, linear
    /// rope scaling 8 on the global layers); `gemma-tiny` is a four-layer Gemma 3 with GPT-2's
    /// padded vocabulary and a window of 64, for CPU runs on `prepare`'s tokens.
    pub fn preset(name: &str) -> Result<GemmaConfig, ModelError> {
        use GemmaVersion::{Gemma2, Gemma3};
        // (version, vocab, hidden, intermediate, layers, heads, kv heads, head_dim,
        //  query_pre_attn_scalar, window, positions, pattern period)
        let (model_type, vocab, hidden, inter, layers, heads, kv, head_dim, scalar, window, positions, period) =
            match name {
                "gemma-2-2b" => (Gemma2, 256000, 2304, 9216, 26, 8, 4, 256, 256, 4096, 8192, 2),
                "gemma-3-27b" => (Gemma3, 262208, 5376, 21504, 62, 32, 16, 128, 168, 1024, 131072, 6),
                "gemma-tiny" => (Gemma3, 50304, 64, 128, 4, 4, 2, 16, 16, 64, 1024, 2),
                _ => return Err(ModelError::UnknownPreset(name.to_string())),
            };
        let gemma2 = model_type == Gemma2;
        Ok(GemmaConfig {
            model_type,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            max_position_embeddings: positions,
            rms_norm_eps: 1e-6,
            rope_theta: if gemma2 { 10000.0 } else { 1_000_000.0 },
            rope_local_base_freq: 10000.0,
            rope_scaling_factor: (name == "gemma-3-27b").then_some(8.0),
            query_pre_attn_scalar: scalar,
            sliding_window: window,
            layer_types: LayerType::pattern(layers, period),
            attn_logit_softcapping: gemma2.then_some(50.0),
            final_logit_softcapping: gemma2.then_some(30.0),
            tie_word_embeddings: true,
            attention_bias: false,
            initializer_range: 0.02,
            pad_token_id: Some(0),
        })
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(ModelError::GemmaConfig(format!(
                "layer_types has {} entries for {} layers",
                self.layer_types.len(),
                self.num_hidden_layers
            )));
        }
        self.arch().validate().map_err(ModelError::GemmaConfig)
    }
}

impl DecoderConfig for GemmaConfig {
    const FAMILY: &'static str = "Gemma";

    fn arch(&self) -> Arch {
        let gemma3 = self.model_type == GemmaVersion::Gemma3;
        let global = Rope {
            theta: self.rope_theta,
            scaling: self.rope_scaling_factor.map_or(RopeKind::Default, RopeKind::Linear),
        };
        // Gemma 2 has one rotary embedding for every layer; Gemma 3 one per layer type.
        let local = if gemma3 { Rope { theta: self.rope_local_base_freq, scaling: RopeKind::Default } } else { global };
        let layers = self
            .layer_types
            .iter()
            .map(|t| match t {
                LayerType::Full => LayerAttention { window: None, rope: 0 },
                LayerType::Sliding => LayerAttention { window: Some(self.sliding_window), rope: 1 },
            })
            .collect();
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
            o_proj_bias: self.attention_bias,
            mlp_bias: false,
            pad_token_id: self.pad_token_id,
            initializer_range: self.initializer_range,
            unit_offset_norm: true,
            activation: Activation::GeluTanh,
            scale_embedding: true,
            sandwich_norms: true,
            qk_norm: gemma3,
            attention_scale: 1.0 / (self.query_pre_attn_scalar as f64).sqrt(),
            attn_softcap: self.attn_logit_softcapping,
            final_softcap: self.final_logit_softcapping,
            ropes: vec![global, local],
            layers,
        }
    }

    fn validate(&self) -> Result<(), ModelError> {
        GemmaConfig::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::DecoderConfig;
    use crate::model::Model;
    use tch::{Device, Kind};

    #[test]
    fn presets_are_valid_with_their_published_sizes() {
        // Parameter counts as transformers' num_parameters() gives them for google's configs.
        for (name, params) in [("gemma-2-2b", 2_614_341_888), ("gemma-3-27b", 27_009_346_304)] {
            let c = GemmaConfig::preset(name).unwrap();
            c.validate().unwrap();
            assert_eq!(c.num_params(), params, "{name}");
        }
        let tiny = GemmaConfig::preset("gemma-tiny").unwrap();
        tiny.validate().unwrap();
        let model = Gemma::new(&tiny, Device::Cpu, Kind::Float, 1).unwrap();
        let names: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
        let spec_names: Vec<String> = tiny.param_specs().into_iter().map(|s| s.name).collect();
        assert_eq!(names, spec_names);
        assert!(names.iter().any(|n| n.ends_with("self_attn.q_norm.weight")));
    }

    #[test]
    fn layer_types_follow_transformers_default_patterns() {
        use LayerType::{Full, Sliding};
        assert_eq!(LayerType::pattern(4, 2), [Sliding, Full, Sliding, Full]);
        assert_eq!(LayerType::pattern(7, 6), [Sliding, Sliding, Sliding, Sliding, Sliding, Full, Sliding]);
        let mut c = GemmaConfig::preset("gemma-tiny").unwrap();
        c.layer_types.pop();
        assert!(c.validate().unwrap_err().to_string().contains("layer_types"));
    }
}
