//! zerokit's checkpoint format (docs/checkpoint-format.md): a root directory holding one tag
//! directory per save and a `latest` file naming the newest complete tag. A tag holds
//! `manifest.json`, `model.safetensors` (the model in its compute dtype, transformers' names) and
//! `rank_NNNNN.safetensors` (a rank's partition of the fp32 master weights and Adam moments).
//! A save is built in `.TAG.partial` and renamed into place only when every file is written and
//! hashed; `latest` moves after that, so a crash at any moment leaves the previous checkpoint
//! intact.

use crate::fsutil::{self, FsError};
use crate::zero::layout::{FlatLayout, Piece};
use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const FORMAT: &str = "zerokit-checkpoint";
pub const VERSION: u32 = 1;
/// The three fp32 partition tensors in every rank file.
pub const PARTITION_TENSORS: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("tensor: {0}")]
    Tensor(#[from] tch::TchError),
}

fn invalid(path: &Path, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid { path: path.to_path_buf(), msg: msg.into() }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
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

pub fn tag_name(step: u64) -> String {
    format!("{TAG_PREFIX}{step:08}")
}

/// What shows that `root` already holds checkpoints, complete or not: its `latest` file, else
/// its first tag. None for a fresh (or missing) directory.
pub fn any_checkpoint(root: &Path) -> Option<String> {
    if root.join("latest").is_file() {
        return Some("latest".into());
    }
    let mut tags: Vec<String> = fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with(TAG_PREFIX))
        .collect();
    tags.sort();
    tags.into_iter().next()
}

/// safetensors dtype name of a tch kind.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        _ => "U8",
    }
}

/// Writes `tensors` as one safetensors file at `path` (atomically), streaming device tensors to
/// disk in chunks so host memory stays bounded. Returns the file's size and sha256.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<FileEntry, CheckpointError> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings serialize"));
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let n = t.numel() * t.kind().elt_size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype_name(t.kind()), "shape": t.size(), "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header)).expect("header serializes");
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut file = fsutil::AtomicFile::create(path)?;
    let mut hasher = Sha256::new();
    let mut put = |f: &mut fsutil::AtomicFile, bytes: &[u8]| -> Result<(), CheckpointError> {
        hasher.update(bytes);
        f.write_all(bytes).map_err(|e| FsError::io(path, e))?;
        Ok(())
    };
    put(&mut file, &(head.len() as u64).to_le_bytes())?;
    put(&mut file, &head)?;
    const CHUNK: i64 = 16 << 20; // elements per device-to-host copy
    let mut buf = Vec::new();
    for (_, t) in tensors {
        let flat = t.detach().contiguous().view(-1);
        let elt = t.kind().elt_size_in_bytes();
        let mut start = 0;
        while start < flat.numel() as i64 {
            let len = CHUNK.min(flat.numel() as i64 - start);
            let part = flat.narrow(0, start, len).to_device(Device::Cpu);
            buf.resize(len as usize * elt, 0);
            part.f_copy_data_u8(&mut buf, len as usize)?;
            put(&mut file, &buf)?;
            start += len;
        }
    }
    let size = 8 + head.len() as u64 + offset as u64;
    file.commit()?;
    Ok(FileEntry { bytes: size, sha256: hex::encode(hasher.finalize()) })
}

/// Finds the tag directory: `path` itself when it holds a manifest, else the tag that `tag`
/// names or `latest` points to under `path`.
pub fn resolve(path: &Path, tag: Option<&str>) -> Result<PathBuf, CheckpointError> {
    if let Some(t) = tag {
        let dir = path.join(t);
        if !dir.join("manifest.json").is_file() {
            return Err(invalid(&dir, "no manifest.json: not a complete zerokit checkpoint tag"));
        }
        return Ok(dir);
    }
    if path.join("manifest.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("latest");
    let name = fs::read_to_string(&latest).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            invalid(path, "neither a checkpoint tag (manifest.json) nor a checkpoint root (latest)")
        } else {
            FsError::io(&latest, e).into()
        }
    })?;
    let name = name.trim();
    let dir = path.join(name);
    if name.is_empty() || name.contains('/') || !dir.join("manifest.json").is_file() {
        return Err(invalid(&latest, format!("names tag {name:?}, which is not a complete checkpoint")));
    }
    Ok(dir)
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

/// Part of a range of one parameter's elements that one rank file holds: the rank, the byte
/// offset in its mapping, and where those elements go (from the range's start) and how many.
struct Span {
    rank: usize,
    at: usize,
    dst: usize,
    len: usize,
}

/// Read access to the partition tensors of a saved checkpoint, for any target layout: resume on
/// another world size or stage, and conversion to a consolidated model.
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
            let f = File::open(&path).map_err(|e| FsError::io(&path, e))?;
            // SAFETY: checkpoint files are never modified in place (tags are immutable once renamed).
            let map = unsafe { Mmap::map(&f) }.map_err(|e| FsError::io(&path, e))?;
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

    /// Fills `dst` (a partition of `layout`, fp32, any device) with `tensor` of this checkpoint.
    pub fn fill_partition(
        &self,
        tensor: &str,
        layout: &FlatLayout,
        rank: usize,
        dst: &Tensor,
    ) -> Result<(), CheckpointError> {
        let mut host = vec![0f32; layout.partition];
        for p in layout.pieces(rank) {
            let name = &layout.params[p.param].name;
            self.read(tensor, name, p.param_offset, &mut host[p.partition_offset..p.partition_offset + p.len])?;
        }
        dst.shallow_clone().copy_(&Tensor::from_slice(&host).to_device(dst.device()));
        Ok(())
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
/// now names, even when tags of higher steps exist); removes the other complete tags and any
/// `.partial` left by an interrupted save.
pub fn apply_retention(root: &Path, keep_last: usize, best: Option<&str>, saved: &str) -> Result<(), CheckpointError> {
    let mut tags = Vec::new();
    for e in fs::read_dir(root).map_err(|e| FsError::io(root, e))? {
        let e = e.map_err(|e| FsError::io(root, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{TAG_PREFIX}")) && name.ends_with(".partial") {
            let _ = fs::remove_dir_all(e.path());
        } else if name.starts_with(TAG_PREFIX) && e.path().join("manifest.json").is_file() {
            tags.push(name);
        }
    }
    tags.sort();
    let keep_from = tags.len().saturating_sub(keep_last.max(1));
    for (i, t) in tags.iter().enumerate() {
        if i < keep_from && Some(t.as_str()) != best && t != saved {
            fs::remove_dir_all(root.join(t)).map_err(|e| FsError::io(root.join(t), e))?;
        }
    }
    Ok(())
}

/// What the trainer records with a save besides the engine's state.
pub struct SaveInfo {
    pub step: u64,
    pub tokens_seen: u64,
    pub model_config: serde_json::Value,
    pub config: serde_json::Value,
    pub lr: f64,
    pub data: serde_json::Value,
    pub metrics: serde_json::Value,
    pub keep_last: usize,
    /// The tag to keep whatever keep_last says (best validation loss).
    pub best: Option<String>,
}

/// Test hook: set to a step number to make rank 0 die in the middle of that step's save, after
/// the rank files are written and before the tag is complete (CI checks that `latest` stays
/// loadable).
const CRASH_HOOK: &str = "ZEROKIT_TEST_CRASH_DURING_SAVE";

/// Saves `engine` as tag `step_NNNNNNNN` under `root`. Collective: every rank calls it.
pub fn save(engine: &mut crate::zero::Engine, root: &Path, info: &SaveInfo) -> Result<PathBuf, CheckpointError> {
    let rank = engine.comm.rank();
    let tag = tag_name(info.step);
    let partial = root.join(format!(".{tag}.partial"));
    if rank == 0 {
        fs::create_dir_all(root).map_err(|e| FsError::io(root, e))?;
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| FsError::io(&partial, e))?;
        }
        fs::create_dir(&partial).map_err(|e| FsError::io(&partial, e))?;
    }
    comm_step(engine.comm.control().barrier("checkpoint start"), &partial)?;

    let mut mine = Vec::new();
    if engine.layout.parts > 1 || rank == 0 {
        let r = if engine.layout.parts > 1 { rank } else { 0 };
        let (m, v, _) = engine.opt.state();
        let tensors = vec![
            ("master".to_string(), engine.master.shallow_clone()),
            ("exp_avg".to_string(), m.shallow_clone()),
            ("exp_avg_sq".to_string(), v.shallow_clone()),
        ];
        let meta = BTreeMap::from([
            ("format".to_string(), "zerokit-rank".to_string()),
            ("rank".to_string(), r.to_string()),
            ("parts".to_string(), engine.layout.parts.to_string()),
        ]);
        let name = rank_file_name(r);
        let entry = write_safetensors(&partial.join(&name), &tensors, &meta)?;
        mine = serde_json::to_vec(&(name, entry)).expect("entry serializes");
    }
    let gathered = comm_step(engine.comm.control().gather(&mine, "checkpoint files"), &partial)?;
    let result = match gathered {
        Some(all) => finish_save(engine, root, &partial, &tag, info, all),
        None => Ok(root.join(&tag)),
    };
    if let Err(e) = &result {
        engine.comm.abort(&format!("checkpoint save failed on rank 0: {e}"));
    }
    let dir = result?;
    comm_step(engine.comm.control().barrier("checkpoint end"), &partial)?;
    Ok(dir)
}

fn comm_step<T>(r: Result<T, crate::comm::CommError>, path: &Path) -> Result<T, CheckpointError> {
    r.map_err(|e| invalid(path, format!("checkpoint save: {e}")))
}

fn finish_save(
    engine: &mut crate::zero::Engine,
    root: &Path,
    partial: &Path,
    tag: &str,
    info: &SaveInfo,
    gathered: Vec<Vec<u8>>,
) -> Result<PathBuf, CheckpointError> {
    let mut files = BTreeMap::new();
    for payload in gathered.into_iter().filter(|p| !p.is_empty()) {
        let (name, entry): (String, FileEntry) =
            serde_json::from_slice(&payload).map_err(|e| invalid(partial, format!("bad file report: {e}")))?;
        files.insert(name, entry);
    }
    if std::env::var(CRASH_HOOK).ok().and_then(|v| v.parse::<u64>().ok()) == Some(info.step) {
        std::process::abort();
    }
    let named: Vec<(String, Tensor)> = engine.model.named_parameters();
    let kind = engine.cfg.kind;
    let model_meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    files.insert(
        "model.safetensors".into(),
        write_safetensors(&partial.join("model.safetensors"), &named, &model_meta)?,
    );
    // With config.json the tag is also a Hugging Face model directory (GPT2LMHeadModel loads it).
    let hf_config = engine.model.config().to_hf_config_json(kind);
    fsutil::write_atomic(&partial.join("config.json"), hf_config.as_bytes())?;
    files.insert(
        "config.json".into(),
        FileEntry { bytes: hf_config.len() as u64, sha256: hex::encode(Sha256::digest(hf_config.as_bytes())) },
    );
    let (_, _, opt_step) = engine.opt.state();
    let a = &engine.cfg.adamw;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        tag: tag.into(),
        step: info.step,
        tokens_seen: info.tokens_seen,
        world_size: engine.comm.world(),
        zero_stage: engine.cfg.stage,
        dtypes: BTreeMap::from([
            ("model".to_string(), dtype_name(kind).to_string()),
            ("master".to_string(), "F32".to_string()),
            ("optimizer".to_string(), "F32".to_string()),
        ]),
        model_config: info.model_config.clone(),
        config: info.config.clone(),
        layout: engine.layout.clone(),
        optimizer: serde_json::json!({
            "type": "adamw", "step": opt_step, "lr": info.lr, "betas": [a.betas.0, a.betas.1],
            "eps": a.eps, "weight_decay": a.weight_decay,
        }),
        loss_scaler: engine
            .scaler
            .as_ref()
            .map_or(serde_json::Value::Null, |s| serde_json::to_value(s.state()).expect("state serializes")),
        data: info.data.clone(),
        metrics: info.metrics.clone(),
        files,
    };
    let text = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    fsutil::write_atomic(&partial.join("manifest.json"), &text)?;
    fsutil::sync_parent(&partial.join("manifest.json"));
    let dir = root.join(tag);
    if dir.exists() {
        // Saving the same step twice (a resumed run): the new save replaces the old one.
        fs::remove_dir_all(&dir).map_err(|e| FsError::io(&dir, e))?;
    }
    fs::rename(partial, &dir).map_err(|e| FsError::io(&dir, e))?;
    fsutil::sync_parent(&dir);
    fsutil::write_atomic(&root.join("latest"), format!("{tag}\n").as_bytes())?;
    apply_retention(root, info.keep_last, info.best.as_deref(), tag)?;
    Ok(dir)
}

/// Restores the engine's partitions, optimizer and loss-scaler state from a tag, whatever world
/// size and stage it was saved with. Collective: every rank calls it.
pub fn load(engine: &mut crate::zero::Engine, tag_dir: &Path) -> Result<Manifest, CheckpointError> {
    let reader = PartitionReader::open(tag_dir)?;
    let m = &reader.manifest;
    let ours: Vec<(&str, &[usize])> =
        engine.layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    let theirs: Vec<(&str, &[usize])> = m.layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    if ours.len() != theirs.len() || ours.iter().any(|o| !theirs.contains(o)) {
        return Err(invalid(tag_dir, "the checkpoint's parameters differ from this model's (names or shapes)"));
    }
    let pr = if engine.layout.parts > 1 { engine.comm.rank() } else { 0 };
    reader.fill_partition("master", &engine.layout, pr, &engine.master)?;
    engine.comm.heartbeat();
    let m1 = engine.master.zeros_like();
    let v1 = engine.master.zeros_like();
    reader.fill_partition("exp_avg", &engine.layout, pr, &m1)?;
    engine.comm.heartbeat();
    reader.fill_partition("exp_avg_sq", &engine.layout, pr, &v1)?;
    engine.comm.heartbeat();
    let step = m
        .optimizer
        .get("step")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| invalid(tag_dir, "manifest optimizer.step missing"))?;
    engine.opt.load_state(&m1, &v1, step).map_err(|e| invalid(tag_dir, format!("optimizer state: {e}")))?;
    if let Some(s) = &mut engine.scaler {
        if !m.loss_scaler.is_null() {
            let st = serde_json::from_value(m.loss_scaler.clone())
                .map_err(|e| invalid(tag_dir, format!("loss_scaler: {e}")))?;
            s.load_state(st).map_err(|e| invalid(tag_dir, format!("loss_scaler: {e}")))?;
        }
    }
    engine.publish_weights().map_err(|e| invalid(tag_dir, format!("publishing weights: {e}")))?;
    Ok(reader.manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_the_best_and_the_tag_just_saved() {
        let root = tempfile::tempdir().unwrap();
        for t in ["step_00000003", "step_00000010", "step_00000020", "step_00000030"] {
            fs::create_dir_all(root.path().join(t)).unwrap();
            fs::write(root.path().join(t).join("manifest.json"), "{}").unwrap();
        }
        fs::create_dir_all(root.path().join(".step_00000040.partial")).unwrap();
        // A tag saved below older, higher-numbered tags stays: `latest` names it.
        apply_retention(root.path(), 1, Some("step_00000010"), "step_00000003").unwrap();
        let mut left: Vec<String> =
            fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["step_00000003", "step_00000010", "step_00000030"]);
    }
}
