//! Hugging Face Llama directories (LlamaForCausalLM, and MistralForCausalLM and
//! Qwen2ForCausalLM, which are Llama with a sliding window and Qwen2's biases), both ways:
//! config.json read into a `LlamaConfig` with the class's own defaults for absent keys, refusing
//! by name every key whose value would change the arithmetic of the model zerokit implements,
//! and the weights through `interop::hf`'s safetensors reading and writing. config.json is read
//! in transformers 5's form (`rope_parameters`) and in the earlier one (`rope_theta` with
//! `rope_scaling`), and written in transformers 5's, as the class it was read as.

use super::hf::{self, kind_name, Family, HfError, Key};
use crate::model::check_kind;
use crate::model::decoder::{Arch, DecoderConfig};
use crate::model::llama::{Llama, LlamaConfig, LlamaVariant, RopeScaling, EMBED};
use crate::model::LayerType;
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
/// (anything but null or false): soft-capping and query scaling (Gemma), QK-norm, quantized
/// weights, and for model_type "llama" the sliding windows of Mistral and Qwen2
/// ([`SLIDING_KEYS`]). Refused rather than ignored.
const REFUSED_KEYS: [&str; 6] = [
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "use_qk_norm",
    "logit_scale",
    "quantization_config",
];

/// Mistral's and Qwen2's window keys, which LlamaForCausalLM would ignore.
const SLIDING_KEYS: [&str; 2] = ["sliding_window", "use_sliding_window"];

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

/// A LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM config (the parsed config.json,
/// by its model_type; none: Llama) as a `LlamaConfig`, with transformers' LlamaConfig,
/// MistralConfig or Qwen2Config defaults for absent keys. Errors name the key.
pub fn parse_config(v: &Value) -> Result<LlamaConfig, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let keys = Keys { obj, prefix: "" };
    let variant = match keys.string("model_type")? {
        None | Some("llama") => LlamaVariant::Llama,
        Some("mistral") => LlamaVariant::Mistral,
        Some("qwen2") => LlamaVariant::Qwen2,
        Some(t) => return Err(format!("model_type is {t:?}, expected \"llama\", \"mistral\" or \"qwen2\"")),
    };
    let name = variant.name();
    let act = keys.string("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(format!("hidden_act {act:?} is not supported ({name}'s SwiGLU uses \"silu\")"));
    }
    refuse(&keys, &REFUSED_KEYS, name)?;
    if variant == LlamaVariant::Llama {
        refuse(&keys, &SLIDING_KEYS, "Llama (model_type \"llama\"; Mistral and Qwen2 have sliding windows)")?;
    }
    if variant == LlamaVariant::Mistral && keys.get("layer_types").is_some() {
        // transformers warns and ignores them: MistralForCausalLM windows every layer alike.
        return Err("layer_types is not read by MistralForCausalLM (alternating attention is Ministral's, which \
                    zerokit does not implement)"
            .into());
    }

    let hidden_size = keys.required("hidden_size")?;
    let num_hidden_layers = keys.required("num_hidden_layers")?;
    let num_attention_heads = keys.required("num_attention_heads")?;
    let (rope_theta, rope_scaling) = rope(&keys)?;
    let pad_token_id = match keys.get("pad_token_id") {
        None => None,
        Some(x) => Some(x.as_u64().ok_or(format!("pad_token_id must be a token id, got {x}"))? as usize),
    };
    // A key absent takes the class's default, a null one the value its __post_init__ gives None.
    let absent = |key: &str| !obj.contains_key(key);
    let kv_default = match variant {
        LlamaVariant::Mistral if absent("num_key_value_heads") => 8,
        LlamaVariant::Qwen2 if absent("num_key_value_heads") => 32,
        _ => num_attention_heads,
    };
    let window_default = |key: &str| if absent(key) { Some(4096) } else { None };
    let (sliding_window, layer_types, max_window_layers) = match variant {
        LlamaVariant::Llama => (None, None, None),
        LlamaVariant::Mistral => (keys.size("sliding_window")?.or(window_default("sliding_window")), None, None),
        LlamaVariant::Qwen2 => {
            let window = match keys.flag("use_sliding_window", false)? {
                true => keys.size("sliding_window")?.or(window_default("sliding_window")),
                false => None,
            };
            let max_window_layers = keys.size("max_window_layers")?.unwrap_or(28);
            let types = match keys.get("layer_types") {
                Some(list) => parse_layer_types(list)?,
                // Qwen2Config's: the window on the layers from max_window_layers on, if any.
                None => (0..num_hidden_layers)
                    .map(|i| match window {
                        Some(_) if i >= max_window_layers => LayerType::Sliding,
                        _ => LayerType::Full,
                    })
                    .collect(),
            };
            (window, Some(types), Some(max_window_layers))
        }
    };
    let (attention_bias, mlp_bias) = match variant {
        LlamaVariant::Llama => (keys.flag("attention_bias", false)?, keys.flag("mlp_bias", false)?),
        // Hard-coded by the classes, whatever config.json says.
        LlamaVariant::Mistral => (false, false),
        LlamaVariant::Qwen2 => (true, false),
    };
    let max_positions = match variant {
        LlamaVariant::Llama => 2048,
        LlamaVariant::Mistral => 131072,
        LlamaVariant::Qwen2 => 32768,
    };
    Ok(LlamaConfig {
        vocab_size: keys.required("vocab_size")?,
        hidden_size,
        intermediate_size: keys.required("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: keys.size("num_key_value_heads")?.unwrap_or(kv_default),
        head_dim: keys.size("head_dim")?.unwrap_or(hidden_size / num_attention_heads),
        max_position_embeddings: keys.size("max_position_embeddings")?.unwrap_or(max_positions),
        rms_norm_eps: keys.number("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        tie_word_embeddings: keys.flag("tie_word_embeddings", false)?,
        attention_bias,
        mlp_bias,
        initializer_range: keys.number("initializer_range")?.unwrap_or(0.02),
        pad_token_id,
        model_type: variant,
        sliding_window,
        layer_types,
        max_window_layers,
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

/// A LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM config.json (as `cfg.model_type`
/// says), as transformers 5 writes it, with dropout off.
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
    let variant = cfg.model_type;
    let mut v = decoder_keys(&cfg.arch(), kind);
    let mut own = json!({
        "architectures": [format!("{}ForCausalLM", variant.name())],
        "model_type": variant.model_type(),
        "hidden_act": "silu",
        "rope_parameters": rope,
    });
    let add = |own: &mut Value, more: Value| {
        own.as_object_mut().expect("an object").extend(more.as_object().expect("an object").clone())
    };
    match variant {
        LlamaVariant::Llama => add(&mut own, json!({ "mlp_bias": cfg.mlp_bias })),
        LlamaVariant::Mistral => add(&mut own, json!({ "sliding_window": cfg.sliding_window })),
        LlamaVariant::Qwen2 => {
            let types = cfg.layer_types.as_deref().unwrap_or_default();
            let types: Vec<&str> = types.iter().map(|t| t.name()).collect();
            add(
                &mut own,
                json!({
                    "layer_types": types,
                    "max_window_layers": cfg.max_window_layers.unwrap_or(cfg.num_hidden_layers),
                    "sliding_window": cfg.sliding_window,
                    "use_sliding_window": cfg.sliding_window.is_some(),
                }),
            )
        }
    }
    if variant != LlamaVariant::Llama {
        // Not a key of MistralConfig or Qwen2Config: their biases are fixed by the class.
        v.remove("attention_bias");
    }
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

/// transformers' `layer_types` list ("sliding_attention" / "full_attention" per layer), as Gemma 2
/// and 3 and Qwen2 configs write it.
pub(super) fn parse_layer_types(list: &Value) -> Result<Vec<LayerType>, String> {
    let items = list.as_array().ok_or(format!("layer_types must be a list, got {list}"))?;
    let parse = |x: &Value| match x.as_str() {
        Some("sliding_attention") => Ok(LayerType::Sliding),
        Some("full_attention") => Ok(LayerType::Full),
        _ => Err(format!("layer_types: {x} is not \"sliding_attention\" or \"full_attention\"")),
    };
    items.iter().map(parse).collect()
}
