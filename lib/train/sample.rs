//! Text from a model with nanoGPT's sampling: at the end of a run, and `train sample` from a
//! checkpoint.

use super::state::TrainError;
use crate::data::hf_tokenizer::HfTokenizer;
use crate::data::tokenize::{Encoding, Tokenizer};
use crate::model::generate::generate;
use crate::model::{AnyModel, Sampling};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// How sampled text becomes ids and back: the tokenizer.json the model comes with, or else
/// GPT-2's BPE (the tokens `prepare` writes by default).
pub enum Codec {
    Gpt2(Tokenizer),
    HuggingFace(Box<HfTokenizer>),
}

impl Codec {
    /// The codec for a model: `model_dir`'s tokenizer.json (a Hugging Face directory), else the
    /// tokenizer `prepare --tokenizer` recorded in `dataset`'s meta.json (the run's token
    /// directory), else GPT-2's BPE. A recorded tokenizer that is gone or changed is an error:
    /// decoding through another one would print the wrong text.
    pub fn for_model(model_dir: Option<&Path>, dataset: Option<&Path>) -> Result<Self, TrainError> {
        if let Some(file) = model_dir.map(|d| d.join("tokenizer.json")).filter(|f| f.is_file()) {
            return Ok(Codec::HuggingFace(Box::new(HfTokenizer::open(&file)?)));
        }
        if let Some((file, sha256)) = dataset.map(recorded_tokenizer).transpose()?.flatten() {
            let hf = HfTokenizer::open(&file)?;
            if hf.sha256() != sha256 {
                return Err(TrainError::Other(format!(
                    "{}: not the tokenizer.json the run's data was prepared with (its sha256 differs from {}'s meta.json)",
                    file.display(),
                    dataset.unwrap_or(Path::new("")).display()
                )));
            }
            return Ok(Codec::HuggingFace(Box::new(hf)));
        }
        Ok(Codec::Gpt2(Tokenizer::new(Encoding::R50kBase)?))
    }

    /// A prompt's ids: GPT-2's, `<|endoftext|>` alone for an empty one; a tokenizer.json's with
    /// its post-processor's special tokens (Llama's and Gemma's BOS), as transformers encodes it.
    pub fn prompt(&self, prompt: &str) -> Result<Vec<u32>, TrainError> {
        let ids = match self {
            Codec::Gpt2(bpe) => bpe.encode_ordinary(prompt)?,
            Codec::HuggingFace(hf) => hf.encode_prompt(prompt)?,
        };
        match (ids.is_empty(), self) {
            (false, _) => Ok(ids),
            (true, Codec::Gpt2(bpe)) => Ok(vec![bpe.boundary().id]),
            (true, Codec::HuggingFace(hf)) => Err(TrainError::Other(format!(
                "{}: an empty prompt encodes to no token (the tokenizer adds no BOS): give --prompt",
                hf.path().display()
            ))),
        }
    }

    /// One more than the largest id that is a token (a model's padded rows are not).
    pub fn vocab_size(&self) -> usize {
        match self {
            Codec::Gpt2(bpe) => bpe.vocab_size(),
            Codec::HuggingFace(hf) => hf.vocab_size(),
        }
    }

    /// The text of `ids`: GPT-2's with `<|endoftext|>` as text, a tokenizer.json's without
    /// special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TrainError> {
        Ok(match self {
            Codec::Gpt2(bpe) => String::from_utf8_lossy(&bpe.decode_bytes(ids)?).into_owned(),
            // As transformers' examples print samples: without the BOS the prompt was given.
            Codec::HuggingFace(hf) => hf.decode(ids, true)?,
        })
    }
}

/// The tokenizer.json and its sha256 that DIR/meta.json records, if any (nanoGPT's directories
/// and GPT-2 runs have none).
fn recorded_tokenizer(dir: &Path) -> Result<Option<(PathBuf, String)>, TrainError> {
    let path = dir.join("meta.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let meta: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::Other(format!("{}: invalid JSON: {e}", path.display())))?;
    let t = &meta["tokenizer"];
    Ok(t["path"].as_str().zip(t["sha256"].as_str()).map(|(p, s)| (PathBuf::from(p), s.to_string())))
}

/// nanoGPT's sampling settings as the config and `train sample` give them (`top_k` 0: no top-k),
/// with the key/value cache.
pub fn sampling(tokens: usize, temperature: f64, top_k: usize, seed: u64) -> Sampling {
    Sampling::new(tokens, temperature, (top_k > 0).then_some(top_k), seed)
}

/// Generates text from `model` with nanoGPT's sampling (temperature, top-k, seeded; see
/// [`sampling`]), prompt and text through `codec`; ids beyond its vocabulary (padded rows) are
/// dropped from the text.
pub fn text(model: &AnyModel, codec: &Codec, prompt: &str, s: &Sampling) -> Result<String, TrainError> {
    let ids: Vec<i64> = codec.prompt(prompt)?.into_iter().map(|t| t as i64).collect();
    let idx = Tensor::from_slice(&ids).view([1, -1]).to_device(model.device());
    let out = tch::no_grad(|| generate(model, &idx, s))?;
    let out: Vec<i64> = Vec::<i64>::try_from(out.view(-1).to_device(Device::Cpu))
        .map_err(|e: tch::TchError| TrainError::Other(e.to_string()))?;
    let ids: Vec<u32> = out.iter().filter(|&&t| (t as usize) < codec.vocab_size()).map(|&t| t as u32).collect();
    codec.decode(&ids)
}

/// `train sample`: text from a checkpoint (a root, its `latest` followed, or a tag directory) or
/// a Hugging Face directory, through the tokenizer `Codec::for_model` finds.
pub fn from_checkpoint(path: &Path, prompt: &str, s: &Sampling, device: &str) -> Result<String, TrainError> {
    let loaded = super::eval::load_model(path, device)?;
    let codec = Codec::for_model(Some(&loaded.dir), loaded.dataset.as_deref())?;
    text(&loaded.model, &codec, prompt, s)
}
