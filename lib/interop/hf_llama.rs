//! Hugging Face Llama directories (LlamaForCausalLM), both ways: config.json read into a
//! `LlamaConfig`, refusing by name every key whose value would change the arithmetic of the
//! model zerokit implements, and the weights through `interop::hf`'s safetensors reading and
//! writing. config.json is read in transformers 5's form (`rope_parameters`) and in the earlier
//! one (`rope_theta` with `rope_scaling`), and written in transformers 5's.

use super::hf::{self, kind_name, Family, HfError, Key};
use crate::model::check_kind;
use crate::model::decoder::{Arch, DecoderConfig};
use crate::model::llama::{Llama, LlamaConfig, RopeScaling, EMBED};
use serde_json::{json, Map, Value};
use std::path::Path;
use tch::{Device, Kind};

/// Llama's keys: transformers' names as they are; the rope frequencies older versions saved are
/// skipped; a stored lm_head.weight under a tied config must equal the embedding.
pub const LLAMA: Family = Family {
    name: "Llama",
    classify: classify_llama,
    tied: ("lm_head.weight", EMBED),
    untied_why: "config.json sets tie_word_embeddings, so they must be one tensor",
    transposed_hint: " (transposed: a Conv1D [in, out] weight; Llama stores nn.Linear [out, in])",
};

fn classify_llama(key: &str) -> Key {
    if key.starts_with("model.layers.") && key.ends_with(".self_attn.rotary_emb.inv_freq") {
        return Key::Buffer;
    }
    Key::Param(key.to_string())
}

/// Keys of other families' configurations that change the arithmetic whenever they are set
/// (anything but null or false): sliding windows (Mistral, Qwen2), soft-capping and query
/// scaling (Gemma), QK-norm, quantized weights. Refused rather than ignored.
const REFUSED_KEYS: [&str; 8] = [
    "sliding_window",
    "use_sliding_window",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "use_qk_norm",
    "logit_scale",
    "quantization_config",
];

/// The keys a rope dictionary may hold.
const ROPE_KEYS: [&str; 8] = [
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "partial_rotary_factor",
];

/// A config.json object's keys, read with messages that name the key.
pub(super) struct Keys<'a> {
    pub(super) obj: &'a Map<String, Value>,
    /// Prefix of key names in messages ("rope_parameters.").
    pub(super) prefix: &'a str,
}

impl Keys<'_> {
    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn size(&self, key: &str) -> Result<Option<usize>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => match x.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(format!("{}{key} must be a positive integer, got {x}", self.prefix)),
            },
        }
    }

    pub(super) fn required(&self, key: &str) -> Result<usize, String> {
        self.size(key)?.ok_or_else(|| format!("{}{key} is missing", self.prefix))
    }

    pub(super) fn number(&self, key: &str) -> Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| format!("{}{key} must be a number, got {x}", self.prefix)),
        }
    }

    pub(super) fn flag(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(x) => Err(format!("{}{key} must be true or false, got {x}", self.prefix)),
        }
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<&str>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x.as_str().map(Some).ok_or_else(|| format!("{}{key} must be a string, got {x}", self.prefix)),
        }
    }
}

/// A LlamaForCausalLM config (the parsed config.json) as a `LlamaConfig`, with transformers'
/// LlamaConfig defaults for absent keys. Errors name the key.
pub fn parse_config(v: &Value) -> Result<LlamaConfig, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let keys = Keys { obj, prefix: "" };
    if let Some(t) = keys.string("model_type")? {
        if t != "llama" {
            return Err(format!("model_type is {t:?}, expected \"llama\""));
        }
    }
    let act = keys.string("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(format!("hidden_act {act:?} is not supported (Llama's SwiGLU uses \"silu\")"));
    }
    refuse(&keys, &REFUSED_KEYS, "Llama")?;

    let hidden_size = keys.required("hidden_size")?;
    let num_attention_heads = keys.required("num_attention_heads")?;
    let (rope_theta, rope_scaling) = rope(&keys)?;
    let pad_token_id = match keys.get("pad_token_id") {
        None => None,
        Some(x) => Some(x.as_u64().ok_or(format!("pad_token_id must be a token id, got {x}"))? as usize),
    };
    Ok(LlamaConfig {
        vocab_size: keys.required("vocab_size")?,
        hidden_size,
        intermediate_size: keys.required("intermediate_size")?,
        num_hidden_layers: keys.required("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads: keys.size("num_key_value_heads")?.unwrap_or(num_attention_heads),
        head_dim: keys.size("head_dim")?.unwrap_or(hidden_size / num_attention_heads),
        max_position_embeddings: keys.size("max_position_embeddings")?.unwrap_or(2048),
        rms_norm_eps: keys.number("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        tie_word_embeddings: keys.flag("tie_word_embeddings", false)?,
        attention_bias: keys.flag("attention_bias", false)?,
        mlp_bias: keys.flag("mlp_bias", false)?,
        initializer_range: keys.number("initializer_range")?.unwrap_or(0.02),
        pad_token_id,
    })
}

/// The refusals every decoder family's config.json goes through: `refused` keys set to anything
/// but null or false, a non-zero attention_dropout, a partial_rotary_factor other than 1.
pub(super) fn refuse(keys: &Keys<'_>, refused: &[&str], family: &str) -> Result<(), String> {
    for key in refused {
        if let Some(x) = keys.get(key).filter(|x| **x != Value::Bool(false)) {
            return Err(format!("{key} {x} is not supported by zerokit's {family}"));
        }
    }
    if let Some(p) = keys.number("attention_dropout")?.filter(|&p| p != 0.0) {
        return Err(format!("attention_dropout {p} is not supported (zerokit trains without dropout)"));
    }
    check_partial_rotary(keys)
}

pub(super) fn check_partial_rotary(keys: &Keys<'_>) -> Result<(), String> {
    match keys.number("partial_rotary_factor")? {
        Some(f) if f != 1.0 => {
            Err(format!("{}partial_rotary_factor {f} is not supported (rope over the whole head only)", keys.prefix))
        }
        _ => Ok(()),
    }
}

/// The rope base and scaling: from `rope_parameters` (transformers 5) or from `rope_theta` and
/// `rope_scaling` (earlier versions). Types other than "default" and "llama3" are refused by name.
fn rope(keys: &Keys<'_>) -> Result<(f64, Option<RopeScaling>), String> {
    let (name, dict) = match (keys.get("rope_parameters"), keys.get("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", p),
        (None, Some(s)) => ("rope_scaling", s),
        (None, None) => return Ok((keys.number("rope_theta")?.unwrap_or(10000.0), None)),
    };
    let obj = dict.as_object().ok_or(format!("{name} must be an object, got {dict}"))?;
    let prefix = format!("{name}.");
    let rope = Keys { obj, prefix: &prefix };
    if let Some(key) = obj.keys().find(|k| !ROPE_KEYS.contains(&k.as_str())) {
        return Err(format!("{name}.{key} is not supported by zerokit's Llama"));
    }
    check_partial_rotary(&rope)?;
    let theta = match rope.number("rope_theta")? {
        Some(t) => t,
        None => keys.number("rope_theta")?.unwrap_or(10000.0),
    };
    let kind = match rope.string("rope_type")? {
        Some(t) => t,
        None => rope.string("type")?.unwrap_or("default"),
    };
    match kind {
        "default" => Ok((theta, None)),
        "llama3" => {
            let number = |key: &str| rope.number(key)?.ok_or(format!("{name}.{key} is missing"));
            let scaling = RopeScaling {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: rope.required("original_max_position_embeddings")?,
            };
            Ok((theta, Some(scaling)))
        }
        other => Err(format!("{name}.rope_type {other:?} is not supported (only \"default\" and \"llama3\")")),
    }
}

/// Reads a Llama config.json (`path` is the file or its directory) and validates it.
pub fn read_config(path: &Path) -> Result<LlamaConfig, HfError> {
    hf::read_decoder_config(path, parse_config)
}

/// A LlamaForCausalLM config.json, as transformers 5 writes it, with dropout off.
pub fn config_json(cfg: &LlamaConfig, kind: Kind) -> String {
    let mut rope = json!({ "rope_theta": cfg.rope_theta, "rope_type": "default" });
    if let Some(s) = &cfg.rope_scaling {
        rope = json!({
            "factor": s.factor,
            "high_freq_factor": s.high_freq_factor,
            "low_freq_factor": s.low_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
            "rope_theta": cfg.rope_theta,
            "rope_type": "llama3",
        });
    }
    let mut v = decoder_keys(&cfg.arch(), kind);
    let own = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "mlp_bias": cfg.mlp_bias,
        "rope_parameters": rope,
    });
    v.extend(own.as_object().expect("an object").clone());
    pretty(v)
}

/// The config.json keys transformers' decoder configs share, from the decoder's [`Arch`], with
/// dropout off; the family adds its own.
pub(super) fn decoder_keys(a: &Arch, kind: Kind) -> Map<String, Value> {
    let v = json!({
        "attention_bias": a.attention_bias,
        "attention_dropout": 0.0,
        "dtype": kind_name(kind),
        "head_dim": a.head_dim,
        "hidden_size": a.hidden_size,
        "initializer_range": a.initializer_range,
        "intermediate_size": a.intermediate_size,
        "max_position_embeddings": a.max_position_embeddings,
        "num_attention_heads": a.num_attention_heads,
        "num_hidden_layers": a.layers.len(),
        "num_key_value_heads": a.num_key_value_heads,
        "pad_token_id": a.pad_token_id,
        "rms_norm_eps": a.rms_norm_eps,
        "tie_word_embeddings": a.tie_word_embeddings,
        "use_cache": true,
        "vocab_size": a.vocab_size,
    });
    v.as_object().expect("an object").clone()
}

/// A config.json's text: pretty, with a final newline.
pub(super) fn pretty(v: Map<String, Value>) -> String {
    let mut s = serde_json::to_string_pretty(&Value::Object(v)).expect("a JSON value serialises");
    s.push('\n');
    s
}

/// Loads a Hugging Face Llama directory (config.json with model.safetensors or a sharded
/// model.safetensors.index.json) into a model of `kind` on `device`.
pub fn load_llama(path: &Path, device: Device, kind: Kind) -> Result<(Llama, LlamaConfig), HfError> {
    check_kind(kind)?;
    let cfg = read_config(path)?;
    Ok((hf::load_decoder(path, &LLAMA, &cfg, device, kind)?, cfg))
}

/// Writes `model` as a LlamaForCausalLM directory (config.json + model.safetensors, parameters in
/// the model's kind, a tied lm_head stored once as the embedding), atomically; an existing `dir`
/// is replaced only with `force`.
pub fn save_llama(model: &Llama, dir: &Path, force: bool) -> Result<(), HfError> {
    hf::save_model(model, model.kind(), &config_json(model.config(), model.kind()), dir, force)
}
