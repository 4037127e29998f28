//! zerokit's own checkpoints (docs/checkpoint-format.md) as a [`ShardedSource`].
//!
//! The weights come from the fp32 master partitions in the rank files, not from
//! `model.safetensors`, which holds the model in its compute dtype (bf16 or fp16 in a mixed
//! precision run) and so has lost the master's low bits. [`PartitionReader`] maps the rank files
//! and resolves each parameter to its pieces through the manifest's layout, whatever the ZeRO
//! stage and world size; a parameter is read in bounded chunks and its pages are released once
//! copied, so memory stays at one output tensor. The Adam moments are never touched.
//!
//! The layout already holds transformers' names and shapes for the checkpoint's family (GPT-2's
//! lm_head tied to wte and stored once, as `GPT2LMHeadModel` expects; Llama's as
//! `LlamaForCausalLM` names them, lm_head stored only when untied), so the output needs no
//! renaming; tensors come out in the model's canonical order.

use crate::checkpoint::{self, CheckpointError, PartitionReader};
use crate::formats::dtype::DType;
use crate::formats::source::{ShardedSource, SourceError, TensorInfo};
use crate::model::ModelConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum ZerokitSourceError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

fn invalid(path: &Path, msg: impl Into<String>) -> ZerokitSourceError {
    ZerokitSourceError::Invalid { path: path.to_path_buf(), msg: msg.into() }
}

/// Whether `dir` looks like a zerokit checkpoint tag: a manifest, or rank files (a tag whose
/// manifest is missing is then reported as such rather than as an unknown format).
pub fn is_zerokit_dir(dir: &Path) -> bool {
    dir.join("manifest.json").is_file() || dir.join(checkpoint::rank_file_name(0)).is_file()
}

/// An opened zerokit checkpoint tag: manifest checked, rank files mapped.
pub struct ZerokitSource {
    reader: PartitionReader,
    cfg: ModelConfig,
    tensors: Vec<TensorInfo>,
}

impl ZerokitSource {
    /// Opens the tag directory `dir`. Every rank file the layout needs must be present with the
    /// size manifest.json records and carry its own identity in its header (rank, partitions,
    /// world size, stage, step: a truncated, replaced, swapped or misplaced file is named before
    /// anything is read, see [`PartitionReader::open`]), and the layout must hold exactly the
    /// parameters of the model that `model_config` describes.
    pub fn open(dir: &Path) -> Result<Self, ZerokitSourceError> {
        let manifest_path = dir.join("manifest.json");
        if !manifest_path.is_file() {
            return Err(invalid(
                &manifest_path,
                "missing: not a complete zerokit checkpoint tag (a save that did not finish leaves its rank files without a manifest)",
            ));
        }
        let reader = PartitionReader::open(dir)?;
        let m = &reader.manifest;
        let cfg = ModelConfig::from_manifest(&m.model_config)
            .map_err(|e| invalid(&manifest_path, format!("model_config: {e}")))?;
        cfg.validate().map_err(|e| invalid(&manifest_path, format!("model_config: {e}")))?;
        let specs = cfg.param_specs();
        let stored: HashMap<&str, &[usize]> =
            m.layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
        for s in &specs {
            let want: Vec<usize> = s.shape.iter().map(|&d| d as usize).collect();
            match stored.get(s.name.as_str()) {
                None => {
                    return Err(invalid(
                        &manifest_path,
                        format!("layout has no parameter {} (model_config {cfg:?} needs it)", s.name),
                    ))
                }
                Some(got) if *got != want.as_slice() => {
                    return Err(invalid(
                        &manifest_path,
                        format!("layout gives {} the shape {got:?}, model_config needs {want:?}", s.name),
                    ))
                }
                Some(_) => {}
            }
        }
        if stored.len() != specs.len() {
            let extra: Vec<&str> = stored.keys().filter(|n| !specs.iter().any(|s| s.name == **n)).copied().collect();
            return Err(invalid(
                &manifest_path,
                format!("layout holds parameters that this {} model does not have: {extra:?}", cfg.family()),
            ));
        }
        let tensors: Vec<TensorInfo> = specs
            .iter()
            .map(|s| TensorInfo {
                name: s.name.clone(),
                shape: s.shape.iter().map(|&d| d as usize).collect(),
                dtype: DType::F32,
                frozen: false,
            })
            .collect();
        Ok(ZerokitSource { reader, cfg, tensors })
    }
}

impl ShardedSource for ZerokitSource {
    fn format(&self) -> String {
        let m = &self.reader.manifest;
        format!(
            "zerokit checkpoint {} (step {}), ZeRO-{}, {} ranks, {} compute; reading the fp32 master weights from {} rank file(s)",
            m.tag,
            m.step,
            m.zero_stage,
            m.world_size,
            m.dtypes.get("model").map(String::as_str).unwrap_or("?"),
            m.layout.parts
        )
    }

    fn describe(&self) -> Vec<TensorInfo> {
        self.tensors.clone()
    }

    fn read_range(&self, name: &str, start: u64, out: &mut [u8]) -> Result<(), SourceError> {
        if start % 4 != 0 || out.len() % 4 != 0 {
            return Err(
                format!("{}: {name}: byte range not aligned to fp32 elements", self.reader.dir.display()).into()
            );
        }
        let (at, n) = (start as usize / 4, out.len() / 4);
        self.reader.read_bytes("master", name, at, out)?;
        self.reader.release("master", name, at, n)?;
        Ok(())
    }

    fn hf_config(&self, dtype: DType) -> Option<serde_json::Value> {
        let text = super::hf_model::config_json(&self.cfg, dtype.kind());
        Some(serde_json::from_str(&text).expect("config_json writes valid JSON"))
    }

    fn training_config(&self) -> Option<serde_json::Value> {
        Some(self.reader.manifest.config.clone())
    }

    fn init_dir(&self) -> Option<PathBuf> {
        self.reader.manifest.init_dir.as_ref().map(PathBuf::from)
    }

    fn verify(&self) -> Result<(), SourceError> {
        let m = &self.reader.manifest;
        let bytes: u64 = m.files.values().map(|f| f.bytes).sum();
        info!("verifying {} files ({:.2} GB) against manifest.json", m.files.len(), bytes as f64 / 1e9);
        let problems = checkpoint::check_files(&self.reader.dir, m);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n").into())
        }
    }
}
