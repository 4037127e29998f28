//! Hugging Face model directories of any family zerokit implements: which family a config.json
//! describes (its `model_type`), and loading, saving and config.json writing through that
//! family's module (`hf` for GPT-2, `hf_llama` for Llama, Mistral and Qwen2, `hf_gemma` for Gemma 2 and 3).

use super::hf::{self, HfError, CONFIG_FILE};
use super::{hf_gemma, hf_llama};
use crate::model::{AnyModel, ModelConfig};
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind};

/// The `model_type`s read here, by family.
const MODEL_TYPES: &str = "\"gpt2\", \"llama\", \"mistral\", \"qwen2\", \"gemma2\" or \"gemma3_text\"";

/// Reads the configuration of a model directory (or of the config.json `path` names), of the
/// family its `model_type` says; a config.json without one is read as GPT-2, as before Llama.
pub fn read_config(path: &Path) -> Result<ModelConfig, HfError> {
    let file = if path.is_dir() { path.join(CONFIG_FILE) } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file).map_err(|source| HfError::Io { path: file.clone(), source })?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| HfError::Config { path: file.clone(), msg: e.to_string() })?;
    match v.get("model_type").and_then(Value::as_str) {
        Some("llama" | "mistral" | "qwen2") => Ok(ModelConfig::Llama(hf_llama::read_config(&file)?)),
        Some("gemma2" | "gemma3_text") => Ok(ModelConfig::Gemma(hf_gemma::read_config(&file)?)),
        None | Some("gpt2") => Ok(ModelConfig::Gpt2(hf::read_config(&file)?)),
        Some(other) => Err(HfError::Config {
            path: file,
            msg: format!("model_type {other:?} is not supported (zerokit reads {MODEL_TYPES})"),
        }),
    }
}

/// Loads a Hugging Face model directory of any supported family into a model of `kind` on
/// `device`.
pub fn load(path: &Path, device: Device, kind: Kind) -> Result<AnyModel, HfError> {
    Ok(match read_config(path)? {
        ModelConfig::Gpt2(_) => hf::load_gpt2(path, device, kind)?.0.into(),
        ModelConfig::Llama(_) => hf_llama::load_llama(path, device, kind)?.0.into(),
        ModelConfig::Gemma(_) => hf_gemma::load_gemma(path, device, kind)?.0.into(),
    })
}

/// The config.json transformers loads a model of `cfg` from, its weights stored as `kind`.
pub fn config_json(cfg: &ModelConfig, kind: Kind) -> String {
    match cfg {
        ModelConfig::Gpt2(c) => hf::config_json(c, kind),
        ModelConfig::Llama(c) => hf_llama::config_json(c, kind),
        ModelConfig::Gemma(c) => hf_gemma::config_json(c, kind),
    }
}

/// Writes `model` as a Hugging Face directory of its family (atomically; an existing `dir` is
/// replaced only with `force`).
pub fn save(model: &AnyModel, dir: &Path, force: bool) -> Result<(), HfError> {
    match model {
        AnyModel::Gpt2(m) => hf::save_gpt2(m, dir, force),
        AnyModel::Llama(m) => hf_llama::save_llama(m, dir, force),
        AnyModel::Gemma(m) => hf_gemma::save_gemma(m, dir, force),
    }
}
