//! `train eval`: the loss and perplexity of a model on a token split, and the model loading that
//! `eval` and `sample` share (a zerokit root or tag, or a Hugging Face directory).

use super::state::TrainError;
use crate::checkpoint;
use crate::data::dataset::TokenDataset;
use crate::interop::{hf, hf_model};
use crate::model::AnyModel;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Kind, Reduction, Tensor};

/// A model loaded for `train eval` or `sample`.
pub struct Loaded {
    pub model: AnyModel,
    /// The directory the weights came from (a tag directory or a Hugging Face directory).
    pub dir: PathBuf,
    /// The sequence length the checkpoint was trained at (its run's block_size); None for a
    /// Hugging Face directory.
    pub trained_block: Option<usize>,
    /// The token directory the checkpoint's run trained on (its config's `dataset`); None for a
    /// Hugging Face directory.
    pub dataset: Option<PathBuf>,
}

/// Loads the model at `path` in fp32 on `device`: a zerokit checkpoint root (the tag `latest`
/// names) or tag (checked against its manifest by size and header first), or a Hugging Face
/// GPT-2, Llama or Gemma directory (config.json and model.safetensors, as zero-to-fp32 writes it).
pub fn load_model(path: &Path, device: &str) -> Result<Loaded, TrainError> {
    let device = crate::device::parse_device(device).map_err(TrainError::Other)?;
    let is_hf = path.join(hf::CONFIG_FILE).is_file() && !path.join("manifest.json").is_file();
    let (dir, trained_block, dataset) = if is_hf {
        (path.to_path_buf(), None, None)
    } else {
        // A tag directory is also a Hugging Face model directory (config.json + model.safetensors).
        let dir = checkpoint::resolve(path, None)?;
        let m = checkpoint::read_manifest(&dir)?;
        checkpoint::check_tag(&dir, &m)?;
        let block = m.config.get("block_size").and_then(serde_json::Value::as_u64).map(|b| b as usize);
        let dataset = m.config.get("dataset").and_then(serde_json::Value::as_str).map(PathBuf::from);
        (dir, block, dataset)
    };
    let model = hf_model::load(&dir, device, Kind::Float)?;
    Ok(Loaded { model, dir, trained_block, dataset })
}

/// What `train eval` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Where the weights came from (a tag directory or a Hugging Face directory).
    pub model: PathBuf,
    /// The token file evaluated.
    pub data: PathBuf,
    /// Predicted tokens: every window's `block_size` targets.
    pub tokens: u64,
    pub windows: u64,
    pub block_size: usize,
    /// Mean cross-entropy per token (nats), and its exponential.
    pub loss: f64,
    pub perplexity: f64,
}

/// The token file `split` names: DIR/{split}.bin for a split name (val, test, train), or a
/// `.bin` file given by path.
fn split_file(dataset: &Path, split: &str) -> Result<(PathBuf, String), TrainError> {
    let as_path = Path::new(split);
    if split.ends_with(".bin") || as_path.components().count() > 1 {
        let stem = as_path.file_stem().and_then(|s| s.to_str()).filter(|_| split.ends_with(".bin"));
        let Some(stem) = stem else {
            return Err(TrainError::Other(format!("--split {split}: a token file must end in .bin")));
        };
        let dir = as_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return Ok((dir.to_path_buf(), stem.to_string()));
    }
    Ok((dataset.to_path_buf(), split.to_string()))
}

/// Mean loss of the loaded model over every non-overlapping window of `block` + 1 tokens of the
/// split (each window once), `batch` windows at a time. `block` defaults to the length the
/// checkpoint was trained at, else the model's positions; it is at most the positions.
pub fn evaluate(
    loaded: &Loaded,
    dataset: &Path,
    split: &str,
    block: Option<usize>,
    batch: usize,
) -> Result<Evaluation, TrainError> {
    let (model, cfg) = (&loaded.model, loaded.model.config());
    let (dir, stem) = split_file(dataset, split)?;
    let data = TokenDataset::open(&dir, &stem, cfg.vocab_size())?;
    let block = block.or(loaded.trained_block).unwrap_or(cfg.positions()).min(cfg.positions());
    let windows = data.num_windows(block);
    if windows == 0 {
        return Err(TrainError::Other(format!(
            "{}: {} tokens, fewer than one window of {} + 1 (a shorter --block-size fits)",
            data.path().display(),
            data.len(),
            block
        )));
    }
    let batch = batch.max(1);
    let pb = crate::logging::progress_bar(windows as u64, "eval {bar:40} {pos}/{len} windows {eta}");
    let mut sum = 0.0f64;
    for index in 0..windows.div_ceil(batch) {
        // The last batch wraps around to the first windows: only its first `rows` count.
        let rows = batch.min(windows - index * batch) as i64;
        let (x, y) = data.sequential_batch(index as u64, batch, block)?;
        let shape = [batch as i64, block as i64];
        let x = Tensor::from_slice(&x).view(shape).narrow(0, 0, rows).to_device(model.device());
        let y = Tensor::from_slice(&y).view(shape).narrow(0, 0, rows).to_device(model.device());
        let logits = tch::no_grad(|| model.forward(&x)).to_kind(Kind::Float);
        let v = logits.size()[2];
        let nll = logits.view([-1, v]).cross_entropy_loss(&y.view([-1]), None::<Tensor>, Reduction::Sum, -1, 0.0);
        sum += nll.double_value(&[]);
        pb.inc(rows as u64);
    }
    pb.finish_and_clear();
    let tokens = (windows * block) as u64;
    let loss = sum / tokens as f64;
    Ok(Evaluation {
        model: loaded.dir.clone(),
        data: data.path().to_path_buf(),
        tokens,
        windows: windows as u64,
        block_size: block,
        loss,
        perplexity: loss.exp(),
    })
}

/// The text `train eval` prints.
pub fn render(e: &Evaluation) -> String {
    format!(
        "{} on {}: loss {:.4}, perplexity {:.2} ({} tokens in {} windows of {})",
        e.model.display(),
        e.data.display(),
        e.loss,
        e.perplexity,
        e.tokens,
        e.windows,
        e.block_size
    )
}
