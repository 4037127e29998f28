//! Text from a model with nanoGPT's sampling: at the end of a run, and `train sample` from a
//! checkpoint.

use super::state::TrainError;
use crate::data::tokenize::{Encoding, Tokenizer};
use crate::model::AnyModel;
use std::path::Path;
use tch::{Device, Tensor};

/// Generates text from `model` with nanoGPT's sampling (temperature, top-k, seeded). Text is
/// GPT-2's BPE, the tokens `prepare` writes, whatever the family (a Llama trained on them
/// included); ids beyond GPT-2's vocabulary are dropped from the text.
pub fn text(
    model: &AnyModel,
    prompt: &str,
    tokens: usize,
    temperature: f64,
    top_k: usize,
    seed: u64,
) -> Result<String, TrainError> {
    let bpe = Tokenizer::new(Encoding::R50kBase)?;
    let mut ids: Vec<i64> = bpe.encode_ordinary(prompt)?.into_iter().map(|t| t as i64).collect();
    if ids.is_empty() {
        ids.push(50256);
    }
    let idx = Tensor::from_slice(&ids).view([1, -1]).to_device(model.device());
    let top_k = (top_k > 0).then_some(top_k);
    let out = tch::no_grad(|| model.generate(&idx, tokens, temperature, top_k, seed))?;
    let out: Vec<i64> = Vec::<i64>::try_from(out.view(-1).to_device(Device::Cpu))
        .map_err(|e: tch::TchError| TrainError::Other(e.to_string()))?;
    // Padded vocabulary rows (>= 50257) are not tokens: they are dropped from the text.
    let ids: Vec<u32> = out.iter().filter(|&&t| (t as usize) < bpe.vocab_size()).map(|&t| t as u32).collect();
    Ok(String::from_utf8_lossy(&bpe.decode_bytes(&ids)?).into_owned())
}

/// `train sample`: text from a checkpoint (a root, its `latest` followed, or a tag directory) or
/// a Hugging Face directory.
pub fn from_checkpoint(
    path: &Path,
    prompt: &str,
    tokens: usize,
    temperature: f64,
    top_k: usize,
    seed: u64,
    device: &str,
) -> Result<String, TrainError> {
    let loaded = super::eval::load_model(path, device)?;
    text(&loaded.model, prompt, tokens, temperature, top_k, seed)
}
