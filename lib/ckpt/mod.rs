//! `ckpt inspect` and `ckpt verify` (docs/ckpt.md): what a checkpoint holds, and whether it is
//! intact. Both read zerokit checkpoints (roots and tags), DeepSpeed ZeRO checkpoints (roots and
//! tags), single safetensors files and Hugging Face model directories. This module finds which
//! of those a path is; `inspect` and `verify` do the rest.

pub mod header;
pub mod inspect;
pub mod layout;
pub mod verify;

use crate::checkpoint::{self, CheckpointError};
use crate::formats::tags::{self, Latest, TagError};
use crate::formats::torch_zip::TorchError;
use crate::interop::deepspeed::{self, DeepSpeedError};
use crate::interop::hf;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What stops inspect or verify before they can look at a checkpoint's contents. `ckpt verify`
/// exits with status 2 on these ("unreadable"), and 1 when it found problems.
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    #[error("{0}: no such file or directory")]
    NotFound(PathBuf),
    #[error(
        "{0}: not a checkpoint ckpt can read (no zerokit manifest.json or rank files, no DeepSpeed \
         *_states.pt files, no safetensors)"
    )]
    UnknownFormat(PathBuf),
    #[error("{path}: no tag {tag:?} here (tags: {available})")]
    NoSuchTag { path: PathBuf, tag: String, available: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(transparent)]
    DeepSpeed(#[from] DeepSpeedError),
    #[error(transparent)]
    Torch(#[from] TorchError),
    /// Problems that make a file unreadable, each a line naming the file.
    #[error("{}", .0.join("\n"))]
    Damaged(Vec<String>),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CkptError + '_ {
    move |source| CkptError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Zerokit,
    Deepspeed,
    Safetensors,
    HuggingFace,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::Zerokit => "zerokit checkpoint",
            Format::Deepspeed => "DeepSpeed ZeRO checkpoint",
            Format::Safetensors => "safetensors file",
            Format::HuggingFace => "Hugging Face model directory",
        }
    }
}

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A directory of tags plus a `latest` file (zerokit or DeepSpeed).
    Root(Format, PathBuf),
    /// One tag directory (zerokit or DeepSpeed).
    Tag(Format, PathBuf),
    SafetensorsFile(PathBuf),
    HfDir(PathBuf),
}

/// A zerokit tag, complete or not: its manifest, or a rank file left without one.
fn is_zerokit_tag(dir: &Path) -> bool {
    dir.join("manifest.json").is_file() || dir.join(checkpoint::rank_file_name(0)).is_file()
}

fn format_of_tag(dir: &Path) -> Option<Format> {
    if is_zerokit_tag(dir) {
        Some(Format::Zerokit)
    } else if deepspeed::is_deepspeed_dir(dir) {
        Some(Format::Deepspeed)
    } else {
        None
    }
}

/// Finds what `path` is.
pub fn detect(path: &Path) -> Result<Target, CkptError> {
    if !path.exists() {
        return Err(CkptError::NotFound(path.to_path_buf()));
    }
    if path.is_file() {
        return if looks_like_safetensors(path) {
            Ok(Target::SafetensorsFile(path.to_path_buf()))
        } else {
            Err(CkptError::UnknownFormat(path.to_path_buf()))
        };
    }
    if let Some(f) = format_of_tag(path) {
        return Ok(Target::Tag(f, path.to_path_buf()));
    }
    // A root: `latest` names a tag of some format, or some subdirectory is one.
    let latest = tags::read_latest(path)?;
    if let Latest::Names(name) = &latest {
        if let Some(f) = format_of_tag(&path.join(name)) {
            return Ok(Target::Root(f, path.to_path_buf()));
        }
    }
    for sub in subdirs(path)? {
        if let Some(f) = format_of_tag(&path.join(&sub)) {
            return Ok(Target::Root(f, path.to_path_buf()));
        }
    }
    if let Latest::Names(name) = &latest {
        // Every tag is gone, `latest` still names one: say which format it was.
        if name.starts_with("step_") {
            return Ok(Target::Root(Format::Zerokit, path.to_path_buf()));
        }
        if name.starts_with("global_step") {
            return Ok(Target::Root(Format::Deepspeed, path.to_path_buf()));
        }
    }
    if path.join(hf::WEIGHTS_FILE).is_file() || path.join(hf::INDEX_FILE).is_file() {
        return Ok(Target::HfDir(path.to_path_buf()));
    }
    Err(CkptError::UnknownFormat(path.to_path_buf()))
}

fn looks_like_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors") || safetensors_content(path)
}

/// Whether a file starts as safetensors does: an 8-byte length, then a JSON object.
pub(crate) fn safetensors_content(path: &Path) -> bool {
    let mut head = [0u8; 9];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok_and(|_| head[8] == b'{')
}

/// Visible subdirectories, sorted.
fn subdirs(dir: &Path) -> Result<Vec<String>, CkptError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && e.path().is_dir() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The tags under a root, and what `latest` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootListing {
    /// Tag directories of the root's format, in step order. zerokit tags without a manifest are
    /// listed (verify reports them).
    pub tags: Vec<String>,
    /// What `latest` says.
    pub latest: Latest,
    /// What crashes left (`.step_N.partial`, `.step_N.deleting`, ...: see
    /// [`checkpoint::Leftover`]): harmless, cleared when the next run starts.
    pub partial: Vec<String>,
}

pub fn list_root(dir: &Path, format: Format) -> Result<RootListing, CkptError> {
    let mut found: Vec<String> = subdirs(dir)?
        .into_iter()
        .filter(|name| {
            let sub = dir.join(name);
            match format {
                Format::Zerokit => is_zerokit_tag(&sub) || name.starts_with("step_"),
                _ => format_of_tag(&sub) == Some(format),
            }
        })
        .collect();
    found.sort_by_key(|t| tags::tag_order(t));
    let mut partial: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| checkpoint::leftover(n).is_some())
        .collect();
    partial.sort();
    Ok(RootListing { tags: found, latest: tags::read_latest(dir)?, partial })
}

/// The tag directory `--tag` names under a root.
fn tag_dir(root: &Path, listing: &RootListing, tag: &str) -> Result<PathBuf, CkptError> {
    if tags::valid_tag_name(tag) && listing.tags.iter().any(|t| t == tag) {
        return Ok(root.join(tag));
    }
    Err(CkptError::NoSuchTag { path: root.to_path_buf(), tag: tag.to_string(), available: listing.tags.join(", ") })
}

/// `ckpt inspect`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// A zerokit or DeepSpeed checkpoint root or tag directory, a safetensors file, or a Hugging
    /// Face model directory.
    pub path: PathBuf,
    /// Under a root, the tag to describe instead of the one `latest` names.
    #[arg(long)]
    pub tag: Option<String>,
    /// List every tensor: name, shape, dtype, bytes and, for zerokit, each rank's partition.
    #[arg(long)]
    pub tensors: bool,
    /// Print the stable JSON form (docs/ckpt.md) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ckpt verify`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// A zerokit or DeepSpeed checkpoint root (every tag and `latest` are checked) or tag
    /// directory, a safetensors file, or a Hugging Face model directory.
    pub path: PathBuf,
    /// Under a root, check only this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Also read every value: NaN or Inf in weights and optimizer state, negative second
    /// moments, and (zerokit) the model file against the fp32 master weights.
    #[arg(long)]
    pub scan: bool,
}

/// The weight files of a Hugging Face directory, and for a sharded one its index
/// (path, tensor -> file).
pub type ShardIndex = (PathBuf, BTreeMap<String, String>);

pub fn hf_weight_files(dir: &Path) -> Result<(Vec<String>, Option<ShardIndex>), CkptError> {
    if dir.join(hf::WEIGHTS_FILE).is_file() {
        return Ok((vec![hf::WEIGHTS_FILE.into()], None));
    }
    let ip = dir.join(hf::INDEX_FILE);
    let damaged = |msg: String| CkptError::Damaged(vec![format!("{}: {msg}", ip.display())]);
    let text = std::fs::read_to_string(&ip).map_err(|e| CkptError::Io { path: ip.clone(), source: e })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| damaged(format!("not valid JSON ({e})")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| damaged("no weight_map object".into()))?;
    let mut weight_map = BTreeMap::new();
    for (k, f) in map {
        match f.as_str() {
            Some(f) if tags::valid_tag_name(f) => {
                weight_map.insert(k.clone(), f.to_string());
            }
            _ => return Err(damaged(format!("{k} maps to {f}, not a file name in this directory"))),
        }
    }
    let files: BTreeSet<String> = weight_map.values().cloned().collect();
    Ok((files.into_iter().collect(), Some((ip, weight_map))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_what_a_path_is() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(detect(&d.path().join("nope")), Err(CkptError::NotFound(_))));
        assert!(matches!(detect(d.path()), Err(CkptError::UnknownFormat(_))));
        let tag = d.path().join("step_00000001");
        std::fs::create_dir(&tag).unwrap();
        std::fs::write(tag.join("rank_00000.safetensors"), b"").unwrap();
        assert_eq!(detect(&tag).unwrap(), Target::Tag(Format::Zerokit, tag.clone()));
        assert_eq!(detect(d.path()).unwrap(), Target::Root(Format::Zerokit, d.path().to_path_buf()));
        std::fs::write(d.path().join("notes.txt"), b"hello").unwrap();
        assert!(matches!(detect(&d.path().join("notes.txt")), Err(CkptError::UnknownFormat(_))));
    }
}
