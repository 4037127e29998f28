//! zerokit's checkpoint format (docs/checkpoint-format.md): a root directory holding one tag
//! directory per save and a `latest` file naming the newest complete tag. A tag holds
//! `manifest.json`, `model.safetensors` (the model in its compute dtype, transformers' names) and
//! `rank_NNNNN.safetensors` (a rank's partition of the fp32 master weights and Adam moments).
//! A save is built in `.TAG.partial` and renamed into place only when every file is written,
//! hashed and synced; `latest` moves after that, so a crash at any moment leaves the previous
//! checkpoint intact. [`saver`] runs saves: by default it copies the state to host memory and
//! writes in the background while training goes on. A tag is retired by renaming it out of the namespace (`.TAG.deleting`) before it is
//! deleted, and a re-saved step swaps the new tag with the old in one rename, so no crash leaves
//! a half-written or half-deleted tag under a tag name; what a crash does leave is hidden and
//! cleared by [`recover_root`] when the next run starts.
//!
//! Readers check cheaply, from sizes and safetensors headers, that every file is the one the
//! manifest describes ([`check_tag`]; rank files carry their rank, partition count, world size,
//! stage and step, model.safetensors its step), and hash on request ([`check_files`]).

use crate::comm::{Collectives, CommError, ControlPlane};
use crate::formats::dtype::{DType, DTypeError};
use crate::fsutil::{self, FsError};
// Manifests record each file's size and sha256 as the safetensors writer reports them.
pub use crate::formats::safetensors::FileEntry;
use crate::formats::safetensors::{write_tensors, SafetensorsError};
use crate::formats::tags::{self, TagError};
use crate::zero::layout::{FlatLayout, Piece};
use crate::zero::state::{PartitionState, ZeroState};
use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use tch::{Device, Tensor};

pub mod saver;

pub const FORMAT: &str = "zerokit-checkpoint";
pub const VERSION: u32 = 1;
/// The three fp32 partition tensors in every rank file.
pub const PARTITION_TENSORS: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];
/// The safetensors metadata `format` of a rank file, and of model.safetensors (transformers
/// requires "pt" there).
pub const RANK_FORMAT: &str = "zerokit-rank";
pub const MODEL_FORMAT: &str = "pt";
pub const MODEL_FILE: &str = "model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("tensor: {0}")]
    Tensor(#[from] tch::TchError),
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(transparent)]
    Write(#[from] SafetensorsError),
    #[error(transparent)]
    Dtype(#[from] DTypeError),
    /// A save that failed on a background thread or on another rank, reported where training
    /// next meets the saver.
    #[error("saving {tag}: {msg}")]
    Save { tag: String, msg: String },
}

fn invalid(path: &Path, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid { path: path.to_path_buf(), msg: msg.into() }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tag: String,
    pub step: u64,
    pub tokens_seen: u64,
    pub world_size: usize,
    pub zero_stage: u8,
    /// Dtypes: "model" (compute), "master", "optimizer".
    pub dtypes: BTreeMap<String, String>,
    /// The model's architecture (n_layer, n_head, n_embd, block_size, vocab_size).
    pub model_config: serde_json::Value,
    /// The full resolved training configuration.
    pub config: serde_json::Value,
    /// The Hugging Face directory the run's weights started from (`init_from` made absolute, a
    /// hub id as its cached snapshot), carried over resumes, for zero-to-fp32 to find the
    /// tokenizer; absent from scratch runs and from checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_dir: Option<String>,
    /// Parameter table, buckets, padding and partition sizes.
    pub layout: FlatLayout,
    /// AdamW hyper-parameters, step count and the learning rate of the last step.
    pub optimizer: serde_json::Value,
    /// Loss-scaler state (fp16 runs), else null.
    pub loss_scaler: serde_json::Value,
    /// Where the data stream continues: batches are a pure function of (seed, row, step).
    pub data: serde_json::Value,
    /// Losses at save time and the best validation loss so far.
    pub metrics: serde_json::Value,
    /// Size and sha256 of every other file of the tag.
    pub files: BTreeMap<String, FileEntry>,
}

pub fn rank_file_name(rank: usize) -> String {
    format!("rank_{rank:05}.safetensors")
}

const TAG_PREFIX: &str = "step_";

/// What a crash can leave in a checkpoint root: hidden directories named after a tag, never a
/// tag name. `ckpt verify` notes them as harmless; [`recover_root`] clears them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// `.TAG.partial`: a save that did not finish.
    Partial,
    /// `.TAG.deleting`: a tag that retention (or a re-save of its step) was removing.
    Deleting,
    /// `.TAG.replaced`: a tag a re-save of its step moved aside on a filesystem that cannot swap
    /// two directories in one rename; it is put back if its replacement never arrived.
    Replaced,
}

const LEFTOVERS: [(Leftover, &str); 3] =
    [(Leftover::Partial, ".partial"), (Leftover::Deleting, ".deleting"), (Leftover::Replaced, ".replaced")];

impl Leftover {
    fn suffix(self) -> &'static str {
        LEFTOVERS.iter().find(|(k, _)| *k == self).map(|(_, s)| *s).expect("every kind has a suffix")
    }

    /// The hidden name of this kind of leftover for `tag`.
    pub fn name(self, tag: &str) -> String {
        format!(".{tag}{}", self.suffix())
    }

    pub fn describe(self) -> &'static str {
        match self {
            Leftover::Partial => "an interrupted save (harmless; removed when the next run starts)",
            Leftover::Deleting => "a tag that was being removed when a run stopped (harmless; removed when the next run starts)",
            Leftover::Replaced => {
                "a tag that a re-save of its step was replacing when a run stopped (harmless; the next run keeps whichever is complete)"
            }
        }
    }
}

/// The kind of leftover `name` (a root's entry) is, and the tag it belongs to.
pub fn leftover(name: &str) -> Option<(Leftover, &str)> {
    let rest = name.strip_prefix('.').filter(|r| r.starts_with(TAG_PREFIX))?;
    LEFTOVERS.iter().find_map(|&(kind, suffix)| rest.strip_suffix(suffix).map(|tag| (kind, tag)))
}

pub fn tag_name(step: u64) -> String {
    format!("{TAG_PREFIX}{step:08}")
}

/// The tag every run saves when it ends, whatever its validation loss did (`out/final`, as the
/// DeepSpeed guides' `save_checkpoint(out_dir, tag="final")`). Retention keeps it: it retires
/// `step_N` tags only.
pub const FINAL_TAG: &str = "final";

/// What shows that `root` already holds checkpoints, complete or not: its `latest` file, else
/// its first tag. None for a fresh (or missing) directory.
pub fn any_checkpoint(root: &Path) -> Option<String> {
    if root.join("latest").is_file() {
        return Some("latest".into());
    }
    let mut tags: Vec<String> = fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        // A step tag even incomplete, and any complete named tag (a run's `final` saved just
        // before a crash that came ahead of its `latest`).
        .filter(|n| {
            n.starts_with(TAG_PREFIX) || (tags::valid_tag_name(n) && root.join(n).join("manifest.json").is_file())
        })
        .collect();
    tags.sort();
    tags.into_iter().next()
}

/// Finds the tag directory: `path` itself when it holds a manifest, else the tag that `tag`
/// names or `latest` points to under `path` (lib/formats/tags.rs checks that it stays inside `path`).
pub fn resolve(path: &Path, tag: Option<&str>) -> Result<PathBuf, CheckpointError> {
    if tag.is_none() && path.join("manifest.json").is_file() {
        return Ok(path.to_path_buf());
    }
    Ok(tags::resolve(path, tag, &|d| d.join("manifest.json").is_file())?)
}

pub fn read_manifest(tag_dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = tag_dir.join("manifest.json");
    let text = fs::read_to_string(&path).map_err(|e| FsError::io(&path, e))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| invalid(&path, format!("not a valid manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(invalid(&path, format!("format {:?} is not {FORMAT:?}", m.format)));
    }
    if m.version != VERSION {
        return Err(invalid(
            &path,
            format!("format version {} is not supported (this zerokit reads {VERSION})", m.version),
        ));
    }
    m.layout.validate(m.world_size, m.zero_stage).map_err(|e| invalid(&path, e))?;
    Ok(m)
}

/// Which file of a tag a safetensors file is meant to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagFile {
    Model,
    Rank(usize),
}

/// Where the safetensors metadata of a file contradicts its being `file` of the tag `m`
/// describes, one message per disagreement (empty when it fits): the file's own record of which
/// rank, partition count, world size, ZeRO stage and step it belongs to. A rank file renamed,
/// swapped with another or copied from another tag or run is caught here, from the header
/// alone. `world_size`, `zero_stage` and `step` (and model.safetensors' `step`) are checked
/// where present: checkpoints saved before zerokit wrote them have only format, rank and parts.
/// The one definition of a file's identity: every reader and `ckpt verify` go through it.
pub fn identity_problems(file: TagFile, meta: &BTreeMap<String, String>, m: &Manifest) -> Vec<String> {
    let mut p = Vec::new();
    let shown = |k: &str| meta.get(k).map_or("none".to_string(), |v| format!("{v:?}"));
    let format = if file == TagFile::Model { MODEL_FORMAT } else { RANK_FORMAT };
    if meta.get("format").map(String::as_str) != Some(format) {
        p.push(format!("metadata format is {}, not {format:?}", shown("format")));
    }
    let optional = |key: &str, what: &str, want: String| {
        meta.get(key)
            .filter(|v| **v != want)
            .map(|_| format!("metadata says {what} {}, manifest.json says {want}", shown(key)))
    };
    if let TagFile::Rank(r) = file {
        p.extend(optional("world_size", "world size", m.world_size.to_string()));
        p.extend(optional("zero_stage", "ZeRO stage", m.zero_stage.to_string()));
        if meta.get("rank") != Some(&r.to_string()) {
            p.push(format!("metadata says rank {}, the file name says {r}", shown("rank")));
        }
        if meta.get("parts") != Some(&m.layout.parts.to_string()) {
            p.push(format!("metadata says {} partitions, manifest.json says {}", shown("parts"), m.layout.parts));
        }
    }
    p.extend(optional("step", "step", m.step.to_string()));
    p
}

/// The metadata a save writes into the rank file of `state`'s partition at `step`.
fn rank_metadata(state: &ZeroState, step: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_string(), RANK_FORMAT.to_string()),
        ("rank".to_string(), state.partition.to_string()),
        ("parts".to_string(), state.layout.parts.to_string()),
        ("world_size".to_string(), state.world.to_string()),
        ("zero_stage".to_string(), state.stage.to_string()),
        ("step".to_string(), step.to_string()),
    ])
}

/// Checks that file `name` of a tag exists with the size its manifest records.
fn check_size(tag_dir: &Path, name: &str, entry: &FileEntry, m: &Manifest) -> Result<(), CheckpointError> {
    let path = tag_dir.join(name);
    let md = match fs::metadata(&path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(
                &path,
                format!(
                    "missing (manifest.json lists it; the checkpoint was saved by {} ranks at ZeRO stage {}, in {} partitions)",
                    m.world_size, m.zero_stage, m.layout.parts
                ),
            ))
        }
        Err(e) => return Err(FsError::io(&path, e).into()),
    };
    if md.len() != entry.bytes {
        return Err(invalid(
            &path,
            format!("{} bytes, manifest.json records {}: the file is truncated or was replaced", md.len(), entry.bytes),
        ));
    }
    Ok(())
}

/// Maps the safetensors file `name` of a tag after checking it is listed, has its recorded
/// size, has a valid header, and carries the identity of `file` in that tag. Touches the
/// header's pages only.
fn open_tag_file(tag_dir: &Path, m: &Manifest, name: &str, file: TagFile) -> Result<Mmap, CheckpointError> {
    let path = tag_dir.join(name);
    let entry = m
        .files
        .get(name)
        .ok_or_else(|| invalid(&tag_dir.join("manifest.json"), format!("does not list {name}, which the tag needs")))?;
    check_size(tag_dir, name, entry, m)?;
    let f = File::open(&path).map_err(|e| FsError::io(&path, e))?;
    // SAFETY: checkpoint files are never modified in place (tags are immutable once renamed).
    let map = unsafe { Mmap::map(&f) }.map_err(|e| FsError::io(&path, e))?;
    let (_, header) = SafeTensors::read_metadata(&map).map_err(|e| invalid(&path, format!("bad safetensors: {e}")))?;
    let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let problems = identity_problems(file, &meta, m);
    if !problems.is_empty() {
        let what = match file {
            TagFile::Rank(r) => format!("rank {r}'s partition"),
            TagFile::Model => "the model".to_string(),
        };
        return Err(invalid(
            &path,
            format!(
                "{}: not {what} of {} (renamed, swapped, or copied from another tag or run?)",
                problems.join("; "),
                m.tag
            ),
        ));
    }
    Ok(map)
}

/// Everything a reader checks before trusting a tag, cheaply (sizes and safetensors headers;
/// no tensor data is read and nothing is hashed, see [`check_files`] for that): every file the
/// manifest lists exists with its recorded size, and model.safetensors and each rank file the
/// layout needs parse and carry this tag's identity ([`identity_problems`]). `train` resume and
/// `train sample` call it; [`PartitionReader::open`] checks the rank files the same way.
pub fn check_tag(tag_dir: &Path, m: &Manifest) -> Result<(), CheckpointError> {
    for (name, entry) in &m.files {
        check_size(tag_dir, name, entry, m)?;
    }
    open_tag_file(tag_dir, m, MODEL_FILE, TagFile::Model)?;
    for r in 0..m.layout.parts {
        open_tag_file(tag_dir, m, &rank_file_name(r), TagFile::Rank(r))?;
    }
    Ok(())
}

/// Part of a range of one parameter's elements that one rank file holds: the rank, the byte
/// offset in its mapping, and where those elements go (from the range's start) and how many.
struct Span {
    rank: usize,
    at: usize,
    dst: usize,
    len: usize,
}

/// Read access to the partition tensors of a saved checkpoint, for any target layout: resume on
/// another world size or stage, and conversion to a consolidated model. Opening checks each rank
/// file's size, header and identity (as [`check_tag`] does) before anything is read.
pub struct PartitionReader {
    pub dir: PathBuf,
    pub manifest: Manifest,
    maps: Vec<Mmap>,
    /// Per rank, the byte offset of each PARTITION_TENSORS entry's data in its file.
    starts: Vec<[usize; 3]>,
    /// Per parameter: the pieces (with their rank) that hold it.
    pieces: Vec<Vec<(usize, Piece)>>,
}

impl PartitionReader {
    pub fn open(tag_dir: &Path) -> Result<Self, CheckpointError> {
        let manifest = read_manifest(tag_dir)?;
        let layout = &manifest.layout;
        let mut maps = Vec::with_capacity(layout.parts);
        let mut starts = Vec::with_capacity(layout.parts);
        let mut pieces: Vec<Vec<(usize, Piece)>> = vec![Vec::new(); layout.params.len()];
        for r in 0..layout.parts {
            let path = tag_dir.join(rank_file_name(r));
            let map = open_tag_file(tag_dir, &manifest, &rank_file_name(r), TagFile::Rank(r))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| invalid(&path, format!("bad safetensors: {e}")))?;
            let mut start = [0usize; 3];
            for (k, name) in PARTITION_TENSORS.iter().enumerate() {
                let t = st.tensor(name).map_err(|_| invalid(&path, format!("missing tensor {name}")))?;
                if t.dtype() != safetensors::Dtype::F32 || t.shape() != [layout.partition] {
                    return Err(invalid(&path, format!("{name} is not F32 [{}]", layout.partition)));
                }
                start[k] = t.data().as_ptr() as usize - map.as_ptr() as usize;
            }
            starts.push(start);
            for p in layout.pieces(r) {
                pieces[p.param].push((r, p));
            }
            maps.push(map);
        }
        Ok(PartitionReader { dir: tag_dir.to_path_buf(), manifest, maps, starts, pieces })
    }

    /// Copies elements [offset, offset+out.len()) of parameter `name`'s `tensor` (one of
    /// PARTITION_TENSORS) into `out`.
    pub fn read(&self, tensor: &str, name: &str, offset: usize, out: &mut [f32]) -> Result<(), CheckpointError> {
        for sp in self.spans(tensor, name, offset, out.len())? {
            let bytes = &self.maps[sp.rank][sp.at..sp.at + sp.len * 4];
            for (k, c) in bytes.chunks_exact(4).enumerate() {
                out[sp.dst + k] = f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
        Ok(())
    }

    /// The same elements as `read` as the files store them, little-endian fp32 (4 bytes each):
    /// a plain copy for callers that want bytes.
    pub fn read_bytes(&self, tensor: &str, name: &str, offset: usize, out: &mut [u8]) -> Result<(), CheckpointError> {
        for sp in self.spans(tensor, name, offset, out.len() / 4)? {
            out[sp.dst * 4..(sp.dst + sp.len) * 4].copy_from_slice(&self.maps[sp.rank][sp.at..sp.at + sp.len * 4]);
        }
        Ok(())
    }

    /// Drops the mapped pages holding elements [offset, offset+len) of parameter `name`'s `tensor`
    /// from this process's resident set (see [`fsutil::release_mapped`]), so streaming a whole
    /// checkpoint through `read` keeps memory bounded by what the caller holds.
    pub fn release(&self, tensor: &str, name: &str, offset: usize, len: usize) -> Result<(), CheckpointError> {
        for sp in self.spans(tensor, name, offset, len)? {
            fsutil::release_mapped(&self.maps[sp.rank], sp.at, sp.len * 4);
        }
        Ok(())
    }

    /// Where elements [offset, offset+len) of parameter `name`'s `tensor` lie in the rank files,
    /// after checking that the range is inside the parameter and that the files cover all of it.
    fn spans(&self, tensor: &str, name: &str, offset: usize, len: usize) -> Result<Vec<Span>, CheckpointError> {
        let (k, pi) = self.locate(tensor, name)?;
        let numel = self.manifest.layout.params[pi].numel;
        if offset + len > numel {
            return Err(invalid(&self.dir, format!("{name}: range beyond its {numel} elements")));
        }
        let mut spans = Vec::new();
        for (r, pc) in &self.pieces[pi] {
            let (s, e) = (pc.param_offset.max(offset), (pc.param_offset + pc.len).min(offset + len));
            if s < e {
                let at = self.starts[*r][k] + (pc.partition_offset + s - pc.param_offset) * 4;
                spans.push(Span { rank: *r, at, dst: s - offset, len: e - s });
            }
        }
        let filled: usize = spans.iter().map(|sp| sp.len).sum();
        if filled != len {
            return Err(invalid(&self.dir, format!("{name}: the rank files cover {filled} of {len} elements")));
        }
        Ok(spans)
    }

    /// Indices of a PARTITION_TENSORS entry and of a parameter in the layout.
    fn locate(&self, tensor: &str, name: &str) -> Result<(usize, usize), CheckpointError> {
        let k = PARTITION_TENSORS
            .iter()
            .position(|t| *t == tensor)
            .ok_or_else(|| invalid(&self.dir, format!("no partition tensor {tensor}")))?;
        let pi = self
            .manifest
            .layout
            .params
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| invalid(&self.dir, format!("checkpoint has no parameter {name}")))?;
        Ok((k, pi))
    }

    /// `tensor` of this checkpoint as partition `part` of `layout` (fp32, on `device`), whatever
    /// layout it was saved with.
    pub fn read_partition(
        &self,
        tensor: &str,
        layout: &FlatLayout,
        part: usize,
        device: Device,
    ) -> Result<Tensor, CheckpointError> {
        let mut host = vec![0f32; layout.partition];
        for p in layout.pieces(part) {
            let name = &layout.params[p.param].name;
            self.read(tensor, name, p.param_offset, &mut host[p.partition_offset..p.partition_offset + p.len])?;
        }
        Ok(Tensor::from_slice(&host).to_device(device))
    }
}

/// Hashes every file listed in the manifest; returns one message per mismatch.
pub fn check_files(tag_dir: &Path, m: &Manifest) -> Vec<String> {
    m.files.iter().filter_map(|(name, entry)| check_file(tag_dir, name, entry)).collect()
}

/// Checks one file of a tag against its manifest entry (size, then sha256); the message on a
/// mismatch names the file. Separate from `check_files` so callers can hash files in parallel.
pub fn check_file(tag_dir: &Path, name: &str, entry: &FileEntry) -> Option<String> {
    let path = tag_dir.join(name);
    match fs::metadata(&path) {
        Err(_) => Some(format!("{}: missing (listed in manifest.json)", path.display())),
        Ok(md) if md.len() != entry.bytes => {
            Some(format!("{}: size {} bytes, manifest.json says {}", path.display(), md.len(), entry.bytes))
        }
        Ok(_) => match fsutil::sha256_file(&path) {
            Ok(h) if h != entry.sha256 => {
                Some(format!("{}: sha256 {h} does not match manifest.json ({})", path.display(), entry.sha256))
            }
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        },
    }
}

/// Keeps the newest `keep_last` tags (by step), `best` (if any) and `saved` (the tag `latest`
/// now names, even when tags of higher steps exist); retires the other complete tags (see
/// [`retire`]) and clears what earlier crashes left ([`recover_root`]).
pub fn apply_retention(root: &Path, keep_last: usize, best: Option<&str>, saved: &str) -> Result<(), CheckpointError> {
    recover_root(root)?;
    let mut tags = Vec::new();
    for e in fs::read_dir(root).map_err(|e| FsError::io(root, e))? {
        let e = e.map_err(|e| FsError::io(root, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(TAG_PREFIX) && e.path().join("manifest.json").is_file() {
            tags.push(name);
        }
    }
    tags.sort();
    let keep_from = tags.len().saturating_sub(keep_last.max(1));
    for (i, t) in tags.iter().enumerate() {
        if i < keep_from && Some(t.as_str()) != best && t != saved {
            retire(root, &root.join(t), t)?;
        }
    }
    Ok(())
}

/// Removes the directory `dir` holding tag `tag`'s files without ever leaving part of it under a
/// tag name: it is renamed out of the namespace (`.TAG.deleting`, one atomic rename) and only
/// then deleted, so a crash mid-way leaves a hidden leftover, not a half-deleted tag that
/// `latest`, resume or `ckpt verify` would trip on.
fn retire(root: &Path, dir: &Path, tag: &str) -> Result<(), CheckpointError> {
    let aside = root.join(Leftover::Deleting.name(tag));
    if aside.exists() {
        fs::remove_dir_all(&aside).map_err(|e| FsError::io(&aside, e))?;
    }
    fs::rename(dir, &aside).map_err(|e| FsError::io(dir, e))?;
    fsutil::sync_parent(&aside);
    save_point("retire: moved aside", tag);
    fs::remove_dir_all(&aside).map_err(|e| FsError::io(&aside, e))?;
    save_point("retire: removed", tag);
    Ok(())
}

/// Puts the finished save `partial` in place as `root/tag`. A re-save of a step (a run resumed
/// from an earlier tag, after a crash that kept a later one) swaps the two directories in one
/// rename where the filesystem can (Linux renameat2 RENAME_EXCHANGE), so `tag` is a complete
/// tag at every instant; elsewhere the old tag is moved to `.TAG.replaced` first, and
/// [`recover_root`] puts it back if a crash comes before its replacement is in place.
fn put_in_place(root: &Path, partial: &Path, tag: &str) -> Result<PathBuf, CheckpointError> {
    let dir = root.join(tag);
    if !dir.exists() {
        fs::rename(partial, &dir).map_err(|e| FsError::io(&dir, e))?;
        fsutil::sync_parent(&dir);
        save_point("tag in place", tag);
        return Ok(dir);
    }
    match exchange(partial, &dir) {
        Ok(()) => {
            fsutil::sync_parent(&dir);
            save_point("tag in place (exchanged with the old one)", tag);
            // `partial` now holds the old tag.
            retire(root, partial, tag)?;
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) => {
            let aside = root.join(Leftover::Replaced.name(tag));
            fs::rename(&dir, &aside).map_err(|e| FsError::io(&dir, e))?;
            fsutil::sync_parent(&aside);
            save_point("old tag moved aside", tag);
            fs::rename(partial, &dir).map_err(|e| FsError::io(&dir, e))?;
            fsutil::sync_parent(&dir);
            save_point("tag in place", tag);
            fs::remove_dir_all(&aside).map_err(|e| FsError::io(&aside, e))?;
        }
        Err(e) => return Err(FsError::io(&dir, e).into()),
    }
    Ok(dir)
}

/// Swaps two directory entries atomically (renameat2 with RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Brings a checkpoint root back to a clean state after a crash; `train` runs it under the run
/// lock before anything else touches the root (and retention after every save). Interrupted
/// saves (`.TAG.partial`) and half-removed tags (`.TAG.deleting`) are deleted, a tag that a
/// re-save moved aside (`.TAG.replaced`) is put back if its replacement never arrived, stray
/// temporary copies of `latest` are removed, and a root whose first save stopped between putting
/// its tag in place and writing `latest` gets `latest` naming its newest complete tag. Returns
/// one line per thing done. A missing root is left alone.
pub fn recover_root(root: &Path) -> Result<Vec<String>, CheckpointError> {
    let mut done = Vec::new();
    let Ok(entries) = fs::read_dir(root) else {
        return Ok(done);
    };
    let mut tags = Vec::new();
    for e in entries {
        let e = e.map_err(|e| FsError::io(root, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        match leftover(&name) {
            Some((Leftover::Replaced, tag)) if !root.join(tag).exists() && path.join("manifest.json").is_file() => {
                fs::rename(&path, root.join(tag)).map_err(|e| FsError::io(&path, e))?;
                fsutil::sync_parent(&path);
                done.push(format!("{}: put back as {tag} (its re-save did not finish)", path.display()));
                tags.push(tag.to_string());
            }
            Some((kind, _)) => {
                fs::remove_dir_all(&path).map_err(|e| FsError::io(&path, e))?;
                done.push(format!("{}: removed, {}", path.display(), kind.describe()));
            }
            // fsutil::write_atomic's temporary name for `latest`, left by a crash mid-write.
            None if name.starts_with(".latest.tmp-") => {
                fs::remove_file(&path).map_err(|e| FsError::io(&path, e))?;
                done.push(format!("{}: removed, an unfinished write of latest", path.display()));
            }
            None if name.starts_with(TAG_PREFIX) && path.join("manifest.json").is_file() => tags.push(name),
            None => {}
        }
    }
    let latest = root.join("latest");
    if !latest.exists() {
        if let Some(newest) = tags.iter().max() {
            fsutil::write_atomic(&latest, format!("{newest}\n").as_bytes())?;
            done.push(format!(
                "{}: written, naming {newest} (the first save stopped before it wrote latest)",
                latest.display()
            ));
        }
    }
    Ok(done)
}

/// What the trainer records with a save besides the engine's state.
pub struct SaveInfo {
    /// The tag to save as: `tag_name(step)`, or a name such as [`FINAL_TAG`].
    pub tag: String,
    pub step: u64,
    pub tokens_seen: u64,
    pub model_config: serde_json::Value,
    pub config: serde_json::Value,
    /// [`Manifest::init_dir`].
    pub init_dir: Option<String>,
    pub lr: f64,
    pub data: serde_json::Value,
    pub metrics: serde_json::Value,
    pub keep_last: usize,
    /// The tag to keep whatever keep_last says (best validation loss).
    pub best: Option<String>,
}

/// The model as a tag stores it: its parameters (in the compute dtype) and the Hugging Face
/// config.json that makes the tag a model directory transformers loads.
pub struct ModelFiles {
    pub tensors: Vec<(String, Tensor)>,
    pub hf_config: String,
}

/// Test hooks, at every point of a save and of retention where a crash leaves a different state
/// on disk. ZEROKIT_TEST_SAVE_PAUSE_MS=N sleeps N ms at every point, widening the moments a kill
/// from outside can land in (tests/crash.rs); ZEROKIT_TEST_SAVE_PAUSE_MS="N:POINT@TAG" sleeps at
/// that one point only (a test holds a background write open while training goes on).
/// ZEROKIT_TEST_CRASH_AT="POINT@TAG" aborts the process at that point for that tag. A point runs
/// on the thread that reaches it: training's for "partial created", the background writer's for
/// the rest ([`saver`]). Each point is logged at debug level first, so the rank's log tells where
/// a kill landed.
fn save_point(point: &str, tag: &str) {
    tracing::debug!("checkpoint {tag}: {point}");
    static PAUSE: OnceLock<Option<(Duration, Option<String>)>> = OnceLock::new();
    static CRASH: OnceLock<Option<String>> = OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        let v = std::env::var("ZEROKIT_TEST_SAVE_PAUSE_MS").ok()?;
        let (ms, at) = match v.split_once(':') {
            Some((ms, at)) => (ms, Some(at.to_string())),
            None => (v.as_str(), None),
        };
        Some((Duration::from_millis(ms.trim().parse().ok()?), at))
    });
    let here = format!("{point}@{tag}");
    if let Some((d, at)) = pause {
        if at.as_ref().is_none_or(|a| *a == here) {
            std::thread::sleep(*d);
        }
    }
    if CRASH.get_or_init(|| std::env::var("ZEROKIT_TEST_CRASH_AT").ok()).as_deref() == Some(&here) {
        std::process::abort();
    }
}

/// Opens a save of `tag` under `root`: rank 0 makes `.TAG.partial` afresh (removing what an
/// earlier attempt left there), and every rank waits until it exists. Collective. Returns it.
fn begin_save(comm: &mut dyn Collectives, root: &Path, tag: &str) -> Result<PathBuf, CheckpointError> {
    if !tags::valid_tag_name(tag) {
        return Err(invalid(root, format!("{tag:?} is not a valid tag name")));
    }
    let partial = root.join(Leftover::Partial.name(tag));
    if comm.rank() == 0 {
        fs::create_dir_all(root).map_err(|e| FsError::io(root, e))?;
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| FsError::io(&partial, e))?;
        }
        fs::create_dir(&partial).map_err(|e| FsError::io(&partial, e))?;
        save_point("partial created", tag);
    }
    comm_step(comm.control().barrier("checkpoint start"), &partial)?;
    Ok(partial)
}

/// Writes `state`'s partition file into `partial` when this rank is the one that saves it, and
/// returns its name and manifest entry (size and sha256, hashed as it is written; the file is
/// synced before it gets its name).
fn write_rank_file(
    partial: &Path,
    state: &ZeroState,
    step: u64,
    tag: &str,
) -> Result<Option<(String, FileEntry)>, CheckpointError> {
    if !state.saves {
        return Ok(None);
    }
    let tensors = vec![
        ("master".to_string(), state.master.shallow_clone()),
        ("exp_avg".to_string(), state.exp_avg.shallow_clone()),
        ("exp_avg_sq".to_string(), state.exp_avg_sq.shallow_clone()),
    ];
    let name = rank_file_name(state.partition);
    let entry = write_tensors(&partial.join(&name), &tensors, None, &rank_metadata(state, step), None)?;
    save_point("rank file written", tag);
    Ok(Some((name, entry)))
}

/// Writes rank 0's model files into `partial`: model.safetensors and config.json, with their
/// manifest entries.
fn write_model_files(
    partial: &Path,
    model: &ModelFiles,
    step: u64,
    tag: &str,
) -> Result<Vec<(String, FileEntry)>, CheckpointError> {
    // "format": "pt" is what transformers requires; the step ties the file to its tag.
    let model_meta =
        BTreeMap::from([("format".to_string(), MODEL_FORMAT.to_string()), ("step".to_string(), step.to_string())]);
    let weights = write_tensors(&partial.join(MODEL_FILE), &model.tensors, None, &model_meta, None)?;
    save_point("model written", tag);
    // With config.json the tag is also a Hugging Face model directory.
    let hf_config = model.hf_config.as_bytes();
    fsutil::write_atomic(&partial.join("config.json"), hf_config)?;
    let config = FileEntry { bytes: hf_config.len() as u64, sha256: hex::encode(Sha256::digest(hf_config)) };
    Ok(vec![(MODEL_FILE.to_string(), weights), ("config.json".to_string(), config)])
}

fn comm_step<T>(r: Result<T, CommError>, path: &Path) -> Result<T, CheckpointError> {
    r.map_err(|e| invalid(path, format!("checkpoint save: {e}")))
}

/// Rank 0, once every rank's files in `partial` are written and synced (`files`: all of them):
/// the manifest, the tag put in place, `latest` moved to it, and retention. Each step is durable
/// before the next begins, so a crash anywhere leaves either the previous `latest` and a hidden
/// leftover, or the new tag complete.
fn finish_save(
    state: &ZeroState,
    root: &Path,
    partial: &Path,
    info: &SaveInfo,
    files: BTreeMap<String, FileEntry>,
) -> Result<PathBuf, CheckpointError> {
    let tag = info.tag.as_str();
    save_point("rank files gathered", tag);
    let a = &state.adamw;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        tag: tag.into(),
        step: info.step,
        tokens_seen: info.tokens_seen,
        world_size: state.world,
        zero_stage: state.stage,
        dtypes: BTreeMap::from([
            ("model".to_string(), DType::from_kind(state.kind)?.safetensors_name().to_string()),
            ("master".to_string(), "F32".to_string()),
            ("optimizer".to_string(), "F32".to_string()),
        ]),
        model_config: info.model_config.clone(),
        config: info.config.clone(),
        init_dir: info.init_dir.clone(),
        layout: state.layout.clone(),
        optimizer: serde_json::json!({
            "type": "adamw", "step": state.optimizer_step, "lr": info.lr, "betas": [a.betas.0, a.betas.1],
            "eps": a.eps, "weight_decay": a.weight_decay,
        }),
        loss_scaler: state
            .scaler
            .as_ref()
            .map_or(serde_json::Value::Null, |s| serde_json::to_value(s).expect("state serializes")),
        data: info.data.clone(),
        metrics: info.metrics.clone(),
        files,
    };
    let text = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    fsutil::write_atomic(&partial.join("manifest.json"), &text)?;
    fsutil::sync_parent(&partial.join("manifest.json"));
    save_point("manifest written", tag);
    let dir = put_in_place(root, partial, tag)?;
    fsutil::write_atomic(&root.join("latest"), format!("{tag}\n").as_bytes())?;
    save_point("latest written", tag);
    apply_retention(root, info.keep_last, info.best.as_deref(), tag)?;
    Ok(dir)
}

/// Rank 0: the tag `info.tag` made of the files of `from`, a complete tag of this very state
/// (the same step) under `root`: they are hard-linked into `partial` (copied and synced where the
/// filesystem has no hard links), and [`finish_save`] gives the tag its own manifest. A run whose
/// last evaluation saved the last step ends with `final` this way, without writing the state a
/// second time or taking its space twice; the files hold no tag name, only the step.
fn link_tag(
    state: &ZeroState,
    root: &Path,
    partial: &Path,
    from: &str,
    info: &SaveInfo,
) -> Result<PathBuf, CheckpointError> {
    let src = root.join(from);
    let m = read_manifest(&src)?;
    if m.step != info.step || m.world_size != state.world || m.zero_stage != state.stage {
        return Err(invalid(
            &src,
            format!(
                "holds step {} (world size {}, stage {}), not the state being saved as {} (step {}, world size {}, stage {})",
                m.step, m.world_size, m.zero_stage, info.tag, info.step, state.world, state.stage
            ),
        ));
    }
    for name in m.files.keys() {
        let (a, b) = (src.join(name), partial.join(name));
        if fs::hard_link(&a, &b).is_err() {
            fs::copy(&a, &b).map_err(|e| FsError::io(&b, e))?;
            fs::File::open(&b).and_then(|f| f.sync_all()).map_err(|e| FsError::io(&b, e))?;
        }
    }
    fsutil::sync_parent(&partial.join(MODEL_FILE));
    save_point("files linked", &info.tag);
    finish_save(state, root, partial, info, m.files)
}

/// The files of a tag that `rank` hashes when a run resumes from it (see [`ResumeHashes`]):
/// each rank file once, by the lowest rank whose partition of `layout` (the resuming run's)
/// reads from it, so the bytes are hashed on the node that just read them and the work is
/// spread over ranks as the reading was; the files training does not read (model.safetensors,
/// config.json, and a rank file holding only padding) by rank 0.
pub fn resume_hash_share(m: &Manifest, layout: &FlatLayout, rank: usize) -> Vec<String> {
    let old = &m.layout;
    let index: BTreeMap<&str, usize> = old.params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
    // Per old parameter: (old rank, first element, elements) of each piece.
    let mut held: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); old.params.len()];
    for r in 0..old.parts {
        for pc in old.pieces(r) {
            held[pc.param].push((r, pc.param_offset, pc.len));
        }
    }
    // At stage 0 every rank loads the one partition: rank 0 stands for all of them.
    let mut reader: Vec<Option<usize>> = vec![None; old.parts];
    for part in 0..layout.parts {
        for pc in layout.pieces(part) {
            let Some(&oi) = index.get(layout.params[pc.param].name.as_str()) else { continue };
            for &(r, off, len) in &held[oi] {
                if off < pc.param_offset + pc.len && pc.param_offset < off + len {
                    reader[r].get_or_insert(part);
                }
            }
        }
    }
    let ranks: BTreeMap<String, usize> = (0..old.parts).map(|r| (rank_file_name(r), reader[r].unwrap_or(0))).collect();
    m.files.keys().filter(|name| ranks.get(*name).copied().unwrap_or(0) == rank).cloned().collect()
}

/// The sha256 check of the tag a run resumed from, against its manifest. Resume checks sizes
/// and headers before training ([`check_tag`]) but hashing a large checkpoint takes a while, so
/// it runs on a thread of its own beside training; [`ResumeHashes::settle`] waits for it, and
/// the trainer settles before its first save, so a damaged file is reported before that save
/// (or its retention) replaces or removes anything.
pub struct ResumeHashes {
    dir: PathBuf,
    files: usize,
    worker: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl ResumeHashes {
    /// Starts hashing `names` (files of the tag `m` at `tag_dir`) on a new thread.
    pub fn start(tag_dir: &Path, m: &Manifest, names: Vec<String>) -> Self {
        let dir = tag_dir.to_path_buf();
        let entries: Vec<(String, FileEntry)> =
            names.into_iter().filter_map(|n| m.files.get(&n).map(|e| (n, e.clone()))).collect();
        let files = entries.len();
        let d = dir.clone();
        let worker = std::thread::Builder::new()
            .name("resume-sha256".into())
            .spawn(move || entries.iter().filter_map(|(n, e)| check_file(&d, n, e)).collect())
            .expect("a thread can be started");
        ResumeHashes { dir, files, worker: Some(worker) }
    }

    /// How many files this rank hashes.
    pub fn files(&self) -> usize {
        self.files
    }

    /// Waits for this rank's hashes and combines every rank's on rank 0. Collective. Every rank
    /// returns the same error, naming each damaged file, when any file failed.
    pub fn settle(mut self, ctl: &mut ControlPlane) -> Result<(), CheckpointError> {
        let mine: Vec<String> = match self.worker.take().map(|w| w.join()) {
            Some(Ok(p)) => p,
            Some(Err(_)) => vec![format!("{}: the sha256 thread failed", self.dir.display())],
            None => Vec::new(),
        };
        let what = "resumed checkpoint hashes";
        let encode = |v: &Vec<String>| serde_json::to_vec(v).expect("strings serialize");
        let all: Vec<String> = match comm_step(ctl.gather(&encode(&mine), what), &self.dir)? {
            Some(each) => {
                let all: Vec<String> =
                    each.iter().flat_map(|p| serde_json::from_slice::<Vec<String>>(p).unwrap_or_default()).collect();
                comm_step(ctl.broadcast(Some(&encode(&all)), what), &self.dir)?;
                all
            }
            None => serde_json::from_slice(&comm_step(ctl.broadcast(None, what), &self.dir)?).unwrap_or_default(),
        };
        if all.is_empty() {
            return Ok(());
        }
        Err(invalid(
            &self.dir,
            format!(
                "the checkpoint this run resumed from is damaged (found by the sha256 check that runs beside \
                 training; the run stopped before saving, so nothing was replaced or removed): {}",
                all.join("; ")
            ),
        ))
    }
}

/// Reads partition `part` of `layout` (the resuming engine's: `ZeroState::layout` and
/// `partition`) with its optimizer and loss-scaler state from a tag, whatever world size and
/// stage the tag was saved with, onto `device`. `heartbeat` runs between the large reads (a
/// rank that reads for long still tells the others it is alive).
pub fn load(
    tag_dir: &Path,
    layout: &FlatLayout,
    part: usize,
    device: Device,
    heartbeat: &mut dyn FnMut(),
) -> Result<(Manifest, PartitionState), CheckpointError> {
    let reader = PartitionReader::open(tag_dir)?;
    let m = &reader.manifest;
    let ours: Vec<(&str, &[usize])> = layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    let theirs: Vec<(&str, &[usize])> = m.layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    if ours.len() != theirs.len() || ours.iter().any(|o| !theirs.contains(o)) {
        return Err(invalid(tag_dir, "the checkpoint's parameters differ from this model's (names or shapes)"));
    }
    let mut read = |tensor: &str| {
        let t = reader.read_partition(tensor, layout, part, device);
        heartbeat();
        t
    };
    let (master, exp_avg, exp_avg_sq) = (read("master")?, read("exp_avg")?, read("exp_avg_sq")?);
    let optimizer_step = m
        .optimizer
        .get("step")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| invalid(tag_dir, "manifest optimizer.step missing"))?;
    let scaler = match &m.loss_scaler {
        serde_json::Value::Null => None,
        v => Some(serde_json::from_value(v.clone()).map_err(|e| invalid(tag_dir, format!("loss_scaler: {e}")))?),
    };
    Ok((reader.manifest, PartitionState { master, exp_avg, exp_avg_sq, optimizer_step, scaler }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(root: &Path) -> Vec<String> {
        let mut left: Vec<String> =
            fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        left
    }

    fn tag(root: &Path, name: &str, files: &[&str]) {
        fs::create_dir_all(root.join(name)).unwrap();
        for f in files {
            fs::write(root.join(name).join(f), name).unwrap();
        }
    }

    #[test]
    fn leftover_names_round_trip() {
        for kind in [Leftover::Partial, Leftover::Deleting, Leftover::Replaced] {
            assert_eq!(leftover(&kind.name("step_00000007")), Some((kind, "step_00000007")));
        }
        assert_eq!(leftover("step_00000007"), None);
        assert_eq!(leftover(".latest.tmp-12"), None);
        assert_eq!(leftover(".other.partial"), None);
    }

    /// What kill -9 leaves at each moment of a save or of retention, and what start-up makes of it.
    /// What makes a root an earlier run's: `latest`, a step tag (complete or not), or a complete
    /// named tag; not a directory that only looks like one.
    #[test]
    fn any_checkpoint_sees_named_tags_too() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("logs")).unwrap();
        fs::create_dir_all(root.join("final")).unwrap();
        assert_eq!(any_checkpoint(root), None, "an empty `final` is no tag");
        tag(root, "final", &["manifest.json"]);
        assert_eq!(any_checkpoint(root).as_deref(), Some("final"));
        fs::create_dir_all(root.join("step_00000002")).unwrap();
        assert_eq!(any_checkpoint(root).as_deref(), Some("final"));
        fs::write(root.join("latest"), "final\n").unwrap();
        assert_eq!(any_checkpoint(root).as_deref(), Some("latest"));
    }

    #[test]
    fn recovery_clears_what_a_crash_leaves_and_keeps_every_complete_tag() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        tag(root, "step_00000002", &["manifest.json", "config.json"]);
        // Killed while retention deleted step 1 (moved aside first), while saving step 5, while
        // writing `latest`, and between the two renames of a re-save of step 4 (its old tag
        // aside, the new one not yet in place).
        tag(root, ".step_00000001.deleting", &["config.json"]);
        tag(root, ".step_00000005.partial", &["rank_00000.safetensors"]);
        fs::write(root.join(".latest.tmp-4242"), "step_00000004\n").unwrap();
        tag(root, ".step_00000004.replaced", &["manifest.json", "model.safetensors"]);
        fs::write(root.join("latest"), "step_00000004\n").unwrap();
        let done = recover_root(root).unwrap();
        assert_eq!(done.len(), 4, "{done:?}");
        assert_eq!(listing(root), ["latest", "step_00000002", "step_00000004"]);
        assert_eq!(
            fs::read_to_string(root.join("step_00000004/model.safetensors")).unwrap(),
            ".step_00000004.replaced"
        );
        // A re-save that did finish: the moved-aside old tag goes.
        tag(root, ".step_00000004.replaced", &["manifest.json"]);
        recover_root(root).unwrap();
        assert_eq!(listing(root), ["latest", "step_00000002", "step_00000004"]);
        assert!(recover_root(root).unwrap().is_empty(), "a clean root needs nothing");
    }

    #[test]
    fn recovery_writes_latest_when_the_first_save_stopped_before_it() {
        let d = tempfile::tempdir().unwrap();
        tag(d.path(), "step_00000003", &["manifest.json"]);
        let done = recover_root(d.path()).unwrap();
        assert!(done[0].contains("naming step_00000003"), "{done:?}");
        assert_eq!(fs::read_to_string(d.path().join("latest")).unwrap(), "step_00000003\n");
        // Nothing saved yet: nothing to name.
        let e = tempfile::tempdir().unwrap();
        tag(e.path(), ".step_00000001.partial", &[]);
        recover_root(e.path()).unwrap();
        assert!(listing(e.path()).is_empty());
        assert!(recover_root(&e.path().join("missing")).unwrap().is_empty());
    }

    /// A manifest of a layout of two buckets over `parts` partitions, listing every file.
    fn manifest_of(parts: usize) -> Manifest {
        let params = [("a".to_string(), vec![300], 0), ("b".to_string(), vec![40, 10], 1)];
        let layout = FlatLayout::new(&params, parts).unwrap();
        let entry = FileEntry { bytes: 0, sha256: String::new() };
        let mut files: BTreeMap<String, FileEntry> = (0..parts).map(|r| (rank_file_name(r), entry.clone())).collect();
        files.insert(MODEL_FILE.into(), entry.clone());
        files.insert("config.json".into(), entry);
        let null = serde_json::Value::Null;
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            tag: tag_name(4),
            step: 4,
            tokens_seen: 0,
            world_size: parts,
            zero_stage: 2,
            dtypes: BTreeMap::new(),
            model_config: null.clone(),
            config: null.clone(),
            init_dir: None,
            layout,
            optimizer: null.clone(),
            loss_scaler: null.clone(),
            data: null.clone(),
            metrics: null,
            files,
        }
    }

    #[test]
    fn resume_hashes_every_file_once_on_a_rank_that_reads_it() {
        let old = manifest_of(2);
        // The same world size: rank r hashes its own file; rank 0 also the files nobody trains on.
        let same = FlatLayout::new(&[("a".into(), vec![300], 0), ("b".into(), vec![40, 10], 1)], 2).unwrap();
        assert_eq!(resume_hash_share(&old, &same, 0), ["config.json", MODEL_FILE, "rank_00000.safetensors"]);
        assert_eq!(resume_hash_share(&old, &same, 1), ["rank_00001.safetensors"]);
        // Stage 0 on 3 ranks (one partition, loaded by all): rank 0 alone.
        let one = FlatLayout::new(&[("a".into(), vec![300], 0), ("b".into(), vec![40, 10], 1)], 1).unwrap();
        assert_eq!(resume_hash_share(&old, &one, 0).len(), 4);
        assert!(resume_hash_share(&old, &one, 1).is_empty() && resume_hash_share(&old, &one, 2).is_empty());
        // 4 partitions from 2: each old file once, by the lowest rank whose partition reads it.
        let four = FlatLayout::new(&[("a".into(), vec![300], 0), ("b".into(), vec![40, 10], 1)], 4).unwrap();
        let shares: Vec<Vec<String>> = (0..4).map(|r| resume_hash_share(&old, &four, r)).collect();
        let mut all: Vec<String> = shares.concat();
        all.sort();
        assert_eq!(all, ["config.json", MODEL_FILE, "rank_00000.safetensors", "rank_00001.safetensors"]);
        for (r, share) in shares.iter().enumerate() {
            for f in share.iter().filter(|f| f.starts_with("rank_")) {
                let old_rank: usize = f[5..10].parse().unwrap();
                let reads = |part: usize| {
                    four.pieces(part).iter().any(|pc| {
                        old.layout.pieces(old_rank).iter().any(|o| {
                            o.param == pc.param
                                && o.param_offset < pc.param_offset + pc.len
                                && pc.param_offset < o.param_offset + o.len
                        })
                    })
                };
                assert!(reads(r) && (0..r).all(|p| !reads(p)), "rank {r} hashes {f}");
            }
        }
    }

    #[test]
    fn a_re_save_replaces_the_old_tag_in_one_step() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        tag(root, "step_00000004", &["manifest.json", "old"]);
        tag(root, ".step_00000004.partial", &["manifest.json", "new"]);
        put_in_place(root, &root.join(".step_00000004.partial"), "step_00000004").unwrap();
        assert_eq!(listing(root), ["step_00000004"]);
        assert!(root.join("step_00000004/new").exists() && !root.join("step_00000004/old").exists());
    }

    #[test]
    fn retention_keeps_the_newest_the_best_and_the_tag_just_saved() {
        let root = tempfile::tempdir().unwrap();
        for t in ["step_00000003", "step_00000010", "step_00000020", "step_00000030"] {
            fs::create_dir_all(root.path().join(t)).unwrap();
            fs::write(root.path().join(t).join("manifest.json"), "{}").unwrap();
        }
        fs::create_dir_all(root.path().join(".step_00000040.partial")).unwrap();
        fs::write(root.path().join("latest"), "step_00000003\n").unwrap();
        // A tag saved below older, higher-numbered tags stays: `latest` names it.
        apply_retention(root.path(), 1, Some("step_00000010"), "step_00000003").unwrap();
        assert_eq!(listing(root.path()), ["latest", "step_00000003", "step_00000010", "step_00000030"]);
    }
}
