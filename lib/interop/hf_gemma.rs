//! Hugging Face Gemma 2 and Gemma 3 text directories (Gemma2ForCausalLM, model_type "gemma2";
//! Gemma3ForCausalLM, model_type "gemma3_text"), both ways: config.json read into a
//! `GemmaConfig` with transformers' defaults for absent keys, refusing by name every key whose
//! value would change the arithmetic of the model zerokit implements, and the weights through
//! `interop::hf`'s safetensors reading and writing. config.json is read in transformers 5's form
//! (`rope_parameters`, per layer type for Gemma 3) and in the earlier one (`rope_theta`,
//! `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`), and written in
//! transformers 5's.

use super::hf::{self, Family, HfError, Key};
use super::hf_llama::{check_partial_rotary, decoder_keys, pretty, refuse, Keys};
use crate::model::check_kind;
use crate::model::decoder::{DecoderConfig, EMBED};
use crate::model::gemma::{Gemma, GemmaConfig, GemmaVersion, LayerType};
use serde_json::{json, Value};
use std::path::Path;
use tch::{Device, Kind};

/// Gemma's keys: transformers' names as they are; a stored lm_head.weight under a tied config must
/// equal the embedding.
pub const GEMMA: Family = Family {
    name: "Gemma",
    classify: |key| Key::Param(key.to_string()),
    tied: ("lm_head.weight", EMBED),
    untied_why: "config.json sets tie_word_embeddings, so they must be one tensor",
    transposed_hint: " (transposed: a Conv1D [in, out] weight; Gemma stores nn.Linear [out, in])",
};

/// The keys a rope dictionary may hold.
const ROPE_KEYS: [&str; 5] = ["rope_type", "type", "rope_theta", "factor", "partial_rotary_factor"];

/// A number that may be absent (the family's default), null (off) or given.
fn optional_number(keys: &Keys<'_>, key: &str, default: Option<f64>) -> Result<Option<f64>, String> {
    if keys.obj.contains_key(key) {
        keys.number(key)
    } else {
        Ok(default)
    }
}

/// One rope dictionary: its base (or `theta` when it gives none) and linear scaling factor, if
/// any; `linear_ok` says whether linear scaling is allowed there.
fn rope_dict(name: &str, dict: &Value, theta: f64, linear_ok: bool) -> Result<(f64, Option<f64>), String> {
    let obj = dict.as_object().ok_or(format!("{name} must be an object, got {dict}"))?;
    let prefix = format!("{name}.");
    let rope = Keys { obj, prefix: &prefix };
    if let Some(key) = obj.keys().find(|k| !ROPE_KEYS.contains(&k.as_str())) {
        return Err(format!("{name}.{key} is not supported by zerokit's Gemma"));
    }
    check_partial_rotary(&rope)?;
    let theta = rope.number("rope_theta")?.unwrap_or(theta);
    let kind = match rope.string("rope_type")? {
        Some(t) => t,
        None => rope.string("type")?.unwrap_or("default"),
    };
    match kind {
        "default" => Ok((theta, None)),
        "linear" if linear_ok => Ok((theta, Some(rope.number("factor")?.ok_or(format!("{name}.factor is missing"))?))),
        other => Err(format!(
            "{name}.rope_type {other:?} is not supported here (\"default\" or Gemma 3's global \"linear\")"
        )),
    }
}

/// (rope_theta, rope_local_base_freq, linear factor of the global layers).
fn rope(keys: &Keys<'_>, version: GemmaVersion) -> Result<(f64, f64, Option<f64>), String> {
    let gemma3 = version == GemmaVersion::Gemma3;
    let theta = keys.number("rope_theta")?.unwrap_or(if gemma3 { 1_000_000.0 } else { 10000.0 });
    let local = keys.number("rope_local_base_freq")?.unwrap_or(10000.0);
    if let Some(p) = keys.get("rope_parameters") {
        let per_type = p.get("full_attention").is_some() || p.get("sliding_attention").is_some();
        if gemma3 && per_type {
            let (mut global, mut sliding) = ((theta, None), (local, None));
            for (key, dict) in p.as_object().expect("indexed as an object above") {
                let name = format!("rope_parameters.{key}");
                match key.as_str() {
                    "full_attention" => global = rope_dict(&name, dict, theta, true)?,
                    "sliding_attention" => sliding = rope_dict(&name, dict, local, false)?,
                    _ => return Err(format!("{name} is not a layer type (full_attention, sliding_attention)")),
                }
            }
            return Ok((global.0, sliding.0, global.1));
        }
        let (theta, factor) = rope_dict("rope_parameters", p, theta, gemma3)?;
        return Ok((theta, local, factor));
    }
    match keys.get("rope_scaling") {
        Some(s) => {
            let (theta, factor) = rope_dict("rope_scaling", s, theta, gemma3)?;
            Ok((theta, local, factor))
        }
        None => Ok((theta, local, None)),
    }
}

/// A Gemma2ForCausalLM or Gemma3ForCausalLM config (the parsed config.json) as a `GemmaConfig`,
/// with transformers' defaults (Gemma2Config's, Gemma3TextConfig's) for absent keys. Errors name
/// the key.
pub fn parse_config(v: &Value) -> Result<GemmaConfig, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let keys = Keys { obj, prefix: "" };
    let model_type = match keys.string("model_type")? {
        Some("gemma2") => GemmaVersion::Gemma2,
        Some("gemma3_text") => GemmaVersion::Gemma3,
        other => return Err(format!("model_type is {other:?}, expected \"gemma2\" or \"gemma3_text\"")),
    };
    let gemma3 = model_type == GemmaVersion::Gemma3;
    for key in ["hidden_activation", "hidden_act"] {
        if let Some(act) = keys.string(key)?.filter(|a| *a != "gelu_pytorch_tanh") {
            return Err(format!("{key} {act:?} is not supported (Gemma's GeGLU uses \"gelu_pytorch_tanh\")"));
        }
    }
    // Bidirectional attention (embedding models) and quantized weights change the arithmetic.
    refuse(&keys, &["use_bidirectional_attention", "quantization_config"], "Gemma")?;

    let num_hidden_layers = keys.required("num_hidden_layers")?;
    let num_attention_heads = keys.required("num_attention_heads")?;
    let sliding_window = keys.required("sliding_window")?;
    let layer_types = match keys.get("layer_types") {
        Some(list) => super::hf_llama::parse_layer_types(list)?,
        None => {
            let period = if gemma3 { keys.size("sliding_window_pattern")?.unwrap_or(6) } else { 2 };
            LayerType::pattern(num_hidden_layers, period)
        }
    };
    let (rope_theta, rope_local_base_freq, rope_scaling_factor) = rope(&keys, model_type)?;
    let pad_token_id = match obj.get("pad_token_id") {
        None => Some(0),
        Some(Value::Null) => None,
        Some(x) => Some(x.as_u64().ok_or(format!("pad_token_id must be a token id, got {x}"))? as usize),
    };
    Ok(GemmaConfig {
        model_type,
        vocab_size: keys.required("vocab_size")?,
        hidden_size: keys.required("hidden_size")?,
        intermediate_size: keys.required("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: keys.size("num_key_value_heads")?.unwrap_or(num_attention_heads),
        head_dim: keys.size("head_dim")?.unwrap_or(256),
        max_position_embeddings: keys.size("max_position_embeddings")?.unwrap_or(if gemma3 { 131072 } else { 8192 }),
        rms_norm_eps: keys.number("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        rope_local_base_freq,
        rope_scaling_factor,
        query_pre_attn_scalar: keys.size("query_pre_attn_scalar")?.unwrap_or(256),
        sliding_window,
        layer_types,
        attn_logit_softcapping: optional_number(&keys, "attn_logit_softcapping", (!gemma3).then_some(50.0))?,
        final_logit_softcapping: optional_number(&keys, "final_logit_softcapping", (!gemma3).then_some(30.0))?,
        tie_word_embeddings: keys.flag("tie_word_embeddings", true)?,
        attention_bias: keys.flag("attention_bias", false)?,
        initializer_range: keys.number("initializer_range")?.unwrap_or(0.02),
        pad_token_id,
    })
}

/// Reads a Gemma config.json (`path` is the file or its directory) and validates it.
pub fn read_config(path: &Path) -> Result<GemmaConfig, HfError> {
    hf::read_decoder_config(path, parse_config)
}

/// A Gemma2ForCausalLM or Gemma3ForCausalLM config.json, as transformers 5 writes it, with
/// dropout off.
pub fn config_json(cfg: &GemmaConfig, kind: Kind) -> String {
    let global = match cfg.rope_scaling_factor {
        None => json!({ "rope_theta": cfg.rope_theta, "rope_type": "default" }),
        Some(f) => json!({ "factor": f, "rope_theta": cfg.rope_theta, "rope_type": "linear" }),
    };
    let (architecture, rope) = match cfg.model_type {
        GemmaVersion::Gemma2 => ("Gemma2ForCausalLM", global),
        GemmaVersion::Gemma3 => (
            "Gemma3ForCausalLM",
            json!({
                "full_attention": global,
                "sliding_attention": { "rope_theta": cfg.rope_local_base_freq, "rope_type": "default" },
            }),
        ),
    };
    let layer_types: Vec<&str> = cfg.layer_types.iter().map(|t| t.name()).collect();
    let mut v = decoder_keys(&cfg.arch(), kind);
    let own = json!({
        "architectures": [architecture],
        "model_type": cfg.model_type.model_type(),
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": layer_types,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "rope_parameters": rope,
        "sliding_window": cfg.sliding_window,
    });
    v.extend(own.as_object().expect("an object").clone());
    pretty(v)
}

/// Loads a Hugging Face Gemma 2 or Gemma 3 text directory (config.json with model.safetensors or
/// a sharded model.safetensors.index.json) into a model of `kind` on `device`.
pub fn load_gemma(path: &Path, device: Device, kind: Kind) -> Result<(Gemma, GemmaConfig), HfError> {
    check_kind(kind)?;
    let cfg = read_config(path)?;
    Ok((hf::load_decoder(path, &GEMMA, &cfg, device, kind)?, cfg))
}

/// Writes `model` as a Gemma2ForCausalLM or Gemma3ForCausalLM directory (config.json +
/// model.safetensors, parameters in the model's kind, a tied lm_head stored once as the
/// embedding), atomically; an existing `dir` is replaced only with `force`.
pub fn save_gemma(model: &Gemma, dir: &Path, force: bool) -> Result<(), HfError> {
    hf::save_model(model, model.kind(), &config_json(model.config(), model.kind()), dir, force)
}
