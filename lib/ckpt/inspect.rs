//! `ckpt inspect`: a readable summary of a checkpoint, or the same as stable JSON
//! (docs/ckpt.md documents the schema). Reads only manifests, headers and pickles, never the
//! tensor data, so it is instant on any checkpoint size.

use super::header::read_header;
use super::{hf_weight_files, layout, list_root, tag_dir, CkptError, Format, InspectArgs, Target};
use crate::checkpoint::{self, Manifest};
use crate::formats::dtype::DType;
use crate::formats::source::ShardedSource;
use crate::formats::tags::Latest;
use crate::formats::torch_pickle::Value;
use crate::formats::torch_zip::TorchFile;
use crate::interop::deepspeed::DeepSpeedSource;
use crate::interop::{hf, hf_model};
use crate::units::human_bytes;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The `schema` value of the JSON form; bumped on any incompatible change.
pub const SCHEMA: &str = "zerokit.ckpt.inspect/1";

/// Everything `inspect` reports. Fields a format does not store are null.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Inspection {
    pub schema: &'static str,
    pub path: PathBuf,
    pub format: Format,
    /// zerokit: the manifest's format version; DeepSpeed: the version that saved it.
    pub format_version: Option<String>,
    /// Under a root: its tags in step order.
    pub tags: Vec<String>,
    /// Under a root: what `latest` names (even when that tag is missing).
    pub latest: Option<String>,
    /// The tag described.
    pub tag: Option<String>,
    pub step: Option<u64>,
    pub tokens_seen: Option<u64>,
    /// DeepSpeed records samples, not tokens.
    pub samples_seen: Option<u64>,
    pub world_size: Option<usize>,
    pub zero_stage: Option<u8>,
    /// How many ranks' partitions the optimizer state is cut into.
    pub partitions: Option<usize>,
    /// Role -> safetensors dtype name: "model", "master", "optimizer" (checkpoints), "tensors"
    /// (a safetensors file or model directory: every dtype present, comma-separated).
    pub dtypes: BTreeMap<String, String>,
    pub model_config: Option<serde_json::Value>,
    /// Trainable parameters (tied weights counted once, buffers excluded); for a plain
    /// safetensors file or model directory, the elements of every stored tensor.
    pub parameters: u64,
    /// The learning rate of the last step.
    pub learning_rate: Option<f64>,
    /// The fp16 loss scale (null when the run kept none).
    pub loss_scale: Option<f64>,
    /// zerokit: the validation loss of the evaluation the tag was saved at.
    pub val_loss: Option<f64>,
    /// zerokit: the best validation loss of the run up to this tag, and the tag saved at it.
    pub best_val_loss: Option<f64>,
    pub best_tag: Option<String>,
    /// Files of the tag (or the file itself), sizes on disk.
    pub files: Vec<FileInfo>,
    /// With `--tensors`: every tensor.
    pub tensors: Option<Vec<TensorRow>>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileInfo {
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TensorRow {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: String,
    pub bytes: u64,
    /// The file holding it, where one file does.
    pub file: Option<String>,
    /// zerokit: where each rank's fp32 partition holds this parameter, in rank order.
    pub partitions: Option<Vec<PartitionPiece>>,
}

/// Elements [param_offset, param_offset + len) of the flattened parameter sit at
/// [partition_offset, partition_offset + len) of rank `rank`'s master, exp_avg and exp_avg_sq.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PartitionPiece {
    pub rank: usize,
    pub param_offset: usize,
    pub partition_offset: usize,
    pub len: usize,
}

/// The command: the text summary, or the JSON form.
pub fn run(args: &InspectArgs) -> Result<String, CkptError> {
    let i = inspect(&args.path, args.tag.as_deref(), args.tensors)?;
    Ok(if args.json { serde_json::to_string_pretty(&i).expect("an inspection serializes") + "\n" } else { render(&i) })
}

/// Describes `path`; under a root, the tag `tag` names or else the one `latest` names (else the
/// newest).
pub fn inspect(path: &Path, tag: Option<&str>, tensors: bool) -> Result<Inspection, CkptError> {
    match super::detect(path)? {
        Target::Root(format, root) => {
            let listing = list_root(&root, format)?;
            let name = match tag {
                Some(t) => t.to_string(),
                None => match &listing.latest {
                    Latest::Names(l) if listing.tags.contains(l) => l.clone(),
                    _ => listing.tags.last().cloned().ok_or_else(|| CkptError::NoSuchTag {
                        path: root.clone(),
                        tag: match &listing.latest {
                            Latest::Names(l) => l.clone(),
                            _ => String::new(),
                        },
                        available: String::new(),
                    })?,
                },
            };
            let dir = tag_dir(&root, &listing, &name)?;
            let mut i = inspect_tag(format, &dir, tensors)?;
            i.path = root;
            i.tags = listing.tags;
            i.latest = match listing.latest {
                Latest::Names(l) => Some(l),
                _ => None,
            };
            Ok(i)
        }
        Target::Tag(format, dir) => inspect_tag(format, &dir, tensors),
        Target::SafetensorsFile(p) => safetensors_file(&p, tensors),
        Target::HfDir(dir) => hf_dir(&dir, tensors),
    }
}

fn inspect_tag(format: Format, dir: &Path, tensors: bool) -> Result<Inspection, CkptError> {
    match format {
        Format::Zerokit => zerokit(dir, tensors),
        _ => deepspeed(dir, tensors),
    }
}

fn empty(format: Format, path: &Path) -> Inspection {
    Inspection {
        schema: SCHEMA,
        path: path.to_path_buf(),
        format,
        format_version: None,
        tags: vec![],
        latest: None,
        tag: None,
        step: None,
        tokens_seen: None,
        samples_seen: None,
        world_size: None,
        zero_stage: None,
        partitions: None,
        dtypes: BTreeMap::new(),
        model_config: None,
        parameters: 0,
        learning_rate: None,
        loss_scale: None,
        val_loss: None,
        best_val_loss: None,
        best_tag: None,
        files: vec![],
        tensors: None,
    }
}

/// Sizes of `names` in `dir`, skipping any that are missing (`verify` reports those).
fn file_sizes(dir: &Path, names: impl IntoIterator<Item = String>) -> Vec<FileInfo> {
    let mut out: Vec<FileInfo> = names
        .into_iter()
        .filter_map(|name| {
            let bytes = dir.join(&name).metadata().ok()?.len();
            Some(FileInfo { name, bytes })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn zerokit(dir: &Path, tensors: bool) -> Result<Inspection, CkptError> {
    let m: Manifest = checkpoint::read_manifest(dir)?;
    let mut i = empty(Format::Zerokit, dir);
    i.format_version = Some(m.version.to_string());
    i.tag = Some(m.tag.clone());
    i.step = Some(m.step);
    i.tokens_seen = Some(m.tokens_seen);
    i.world_size = Some(m.world_size);
    i.zero_stage = Some(m.zero_stage);
    i.partitions = Some(m.layout.parts);
    i.dtypes = m.dtypes.clone();
    i.model_config = Some(m.model_config.clone());
    i.parameters = m.layout.num_params() as u64;
    i.learning_rate = m.optimizer.get("lr").and_then(|v| v.as_f64());
    i.loss_scale = m.loss_scaler.get("cur_scale").and_then(|v| v.as_f64());
    i.val_loss = m.metrics.get("val_loss").and_then(|v| v.as_f64());
    i.best_val_loss = m.metrics.get("best_val_loss").and_then(|v| v.as_f64());
    i.best_tag = m.metrics.get("best_tag").and_then(|v| v.as_str()).map(String::from);
    i.files = file_sizes(dir, std::iter::once("manifest.json".to_string()).chain(m.files.keys().cloned()));
    if tensors {
        // The table walks the layout's pieces, which index its parameter table: refuse a layout
        // that does not hold together rather than describe it wrongly.
        let lp = layout::layout_problems(&m.layout, &dir.join("manifest.json"));
        if !lp.is_empty() {
            return Err(CkptError::Damaged(lp));
        }
        let l = &m.layout;
        let mut parts: Vec<Vec<PartitionPiece>> = vec![Vec::new(); l.params.len()];
        for r in 0..l.parts {
            for pc in l.pieces(r) {
                parts[pc.param].push(PartitionPiece {
                    rank: r,
                    param_offset: pc.param_offset,
                    partition_offset: pc.partition_offset,
                    len: pc.len,
                });
            }
        }
        let dtype = m.dtypes.get("model").cloned().unwrap_or_default();
        let es = DType::from_safetensors_name(&dtype).map_or(0, |d| d.size()) as u64;
        i.tensors = Some(
            l.params
                .iter()
                .zip(parts)
                .map(|(p, partitions)| TensorRow {
                    name: p.name.clone(),
                    shape: p.shape.iter().map(|&d| d as u64).collect(),
                    dtype: dtype.clone(),
                    bytes: p.numel as u64 * es,
                    file: Some("model.safetensors".into()),
                    partitions: Some(partitions),
                })
                .collect(),
        );
    }
    Ok(i)
}

/// A key of a pickled object: in its dict items or in the state BUILD gave it.
fn deepspeed(dir: &Path, tensors: bool) -> Result<Inspection, CkptError> {
    let src = DeepSpeedSource::open(dir)?;
    let (stage, world) = (src.stage(), src.world_size());
    let mut i = empty(Format::Deepspeed, dir);
    i.tag = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    i.zero_stage = Some(stage);
    i.world_size = Some(world);
    i.partitions = Some(world);

    let model_path =
        dir.join(if stage <= 2 { "mp_rank_00_model_states.pt" } else { "zero_pp_rank_0_mp_rank_00_model_states.pt" });
    let model = TorchFile::open(&model_path)?;
    let root = model.root();
    i.format_version = root.get("ds_version").and_then(Value::as_str).map(str::to_string);
    i.step = root.get("global_steps").and_then(Value::as_int).map(|s| s as u64);
    i.samples_seen = root.get("global_samples").and_then(Value::as_int).map(|s| s as u64);
    let buffers: BTreeSet<&str> =
        root.get("buffer_names").and_then(Value::as_seq).unwrap_or(&[]).iter().filter_map(Value::as_str).collect();
    let tied: BTreeSet<&str> = root
        .get("shared_params")
        .and_then(Value::dict_items)
        .unwrap_or(&[])
        .iter()
        .filter_map(|(k, _)| k.as_str())
        .collect();
    // The compute dtype: a parameter's tensor in the module (stage 3 keeps empty placeholders,
    // still of that dtype).
    let model_dtype = root.get("module").and_then(Value::dict_items).and_then(|items| {
        items.iter().find_map(|(k, v)| {
            let name = k.as_str()?;
            (!buffers.contains(name)).then(|| v.as_tensor().map(|t| t.dtype.safetensors_name()))?
        })
    });
    if let Some(d) = model_dtype {
        i.dtypes.insert("model".into(), d.into());
    }
    i.dtypes.insert("master".into(), "F32".into());

    // Rank 0's optimizer file: loss scale, learning rate, moment dtype.
    let optim_path = std::fs::read_dir(dir)
        .map_err(|e| CkptError::Io { path: dir.to_path_buf(), source: e })?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("zero_pp_rank_0_mp_rank_00_optim_states.pt"));
    if let Some(op) = optim_path {
        let opt = TorchFile::open(&op)?;
        if let Some(osd) = opt.root().get("optimizer_state_dict") {
            i.loss_scale = osd.get("loss_scaler").and_then(|s| s.attr("cur_scale")).and_then(Value::as_f64);
            let inner = osd.get("base_optimizer_state").or_else(|| osd.get("optimizer_state_dict"));
            i.learning_rate = inner
                .and_then(|s| s.get("param_groups"))
                .and_then(Value::as_seq)
                .and_then(|g| g.first())
                .and_then(|g| g.get("lr"))
                .and_then(Value::as_f64);
            let moment = inner
                .and_then(|s| s.get("state"))
                .and_then(Value::dict_items)
                .and_then(|items| items.first())
                .and_then(|(_, st)| st.get("exp_avg"))
                .and_then(Value::as_tensor);
            if let Some(t) = moment {
                i.dtypes.insert("optimizer".into(), t.dtype.safetensors_name().into());
            }
        }
    }

    let infos = src.describe();
    i.parameters = infos
        .iter()
        .filter(|t| !buffers.contains(t.name.as_str()) && !tied.contains(t.name.as_str()))
        .map(|t| t.numel())
        .sum();
    let names = std::fs::read_dir(dir)
        .map_err(|e| CkptError::Io { path: dir.to_path_buf(), source: e })?
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    i.files = file_sizes(dir, names);
    if tensors {
        i.tensors = Some(
            infos
                .iter()
                .map(|t| TensorRow {
                    name: t.name.clone(),
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                    dtype: t.dtype.safetensors_name().into(),
                    bytes: t.numel() * t.dtype.size() as u64,
                    file: None,
                    partitions: None,
                })
                .collect(),
        );
    }
    Ok(i)
}

/// Rows, parameter count and dtypes of safetensors files (`dir`-relative names).
fn safetensors_rows(dir: &Path, files: &[String], i: &mut Inspection, tensors: bool) -> Result<(), CkptError> {
    let mut rows = Vec::new();
    let mut dtypes = BTreeSet::new();
    for f in files {
        let h = read_header(&dir.join(f)).map_err(CkptError::Damaged)?;
        for t in &h.tensors {
            i.parameters += t.numel();
            dtypes.insert(t.dtype.to_string());
            rows.push(TensorRow {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype.to_string(),
                bytes: t.bytes(),
                file: Some(f.clone()),
                partitions: None,
            });
        }
    }
    i.dtypes.insert("tensors".into(), dtypes.into_iter().collect::<Vec<_>>().join(","));
    if tensors {
        i.tensors = Some(rows);
    }
    Ok(())
}

fn safetensors_file(path: &Path, tensors: bool) -> Result<Inspection, CkptError> {
    let mut i = empty(Format::Safetensors, path);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    safetensors_rows(dir, std::slice::from_ref(&name), &mut i, tensors)?;
    i.files = file_sizes(dir, [name]);
    Ok(i)
}

fn hf_dir(dir: &Path, tensors: bool) -> Result<Inspection, CkptError> {
    let mut i = empty(Format::HuggingFace, dir);
    let (files, index) = hf_weight_files(dir)?;
    safetensors_rows(dir, &files, &mut i, tensors)?;
    let cpath = dir.join(hf::CONFIG_FILE);
    // A GPT-2, Llama or Gemma config in zerokit's terms when it is one, else the file as it is.
    i.model_config = match hf_model::read_config(&cpath) {
        Ok(c) => Some(c.to_manifest()),
        Err(_) => std::fs::read_to_string(&cpath).ok().and_then(|s| serde_json::from_str(&s).ok()),
    };
    let mut names: Vec<String> = files.clone();
    names.push(hf::CONFIG_FILE.into());
    if index.is_some() {
        names.push(hf::INDEX_FILE.into());
    }
    i.files = file_sizes(dir, names);
    Ok(i)
}

// ---------------------------------------------------------------------------------------------
// Text

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (k, c) in s.chars().enumerate() {
        if k > 0 && (s.len() - k) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "k v, k v", the keys in `first` leading in that order, the rest after them.
fn in_order<'a>(items: impl Iterator<Item = (&'a str, String)>, first: &[&str]) -> String {
    let mut items: Vec<(&str, String)> = items.collect();
    items.sort_by_key(|(k, _)| first.iter().position(|f| f == k).unwrap_or(first.len()));
    items.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

fn config_line(v: &serde_json::Value) -> String {
    match v.as_object() {
        Some(o) => in_order(
            o.iter()
                .filter(|(_, x)| x.is_number() || x.is_string() || x.is_boolean())
                .map(|(k, x)| (k.as_str(), x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))),
            &[
                "family",
                "n_layer",
                "n_head",
                "n_embd",
                "block_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "hidden_size",
                "intermediate_size",
                "max_position_embeddings",
                "vocab_size",
            ],
        ),
        None => v.to_string(),
    }
}

/// The text form.
pub fn render(i: &Inspection) -> String {
    let mut s = String::new();
    let version = i.format_version.as_ref().map(|v| match i.format {
        Format::Zerokit => format!(" (format version {v})"),
        _ => format!(" (saved by deepspeed {v})"),
    });
    let _ = writeln!(s, "{}{}: {}", i.format.describe(), version.unwrap_or_default(), i.path.display());
    let mut row = |k: &str, v: String| {
        let _ = writeln!(s, "  {k:<14}{v}");
    };
    if !i.tags.is_empty() || i.latest.is_some() {
        let mut tags: Vec<String> = i
            .tags
            .iter()
            .map(|t| if Some(t) == i.latest.as_ref() { format!("{t} (latest)") } else { t.clone() })
            .collect();
        if let Some(l) = i.latest.as_ref().filter(|l| !i.tags.contains(l)) {
            tags.push(format!("latest names {l:?}, which is missing"));
        }
        row("tags", tags.join(", "));
    }
    if let Some(t) = &i.tag {
        row("tag", t.clone());
    }
    if let Some(v) = i.step {
        row("step", thousands(v));
    }
    if let Some(v) = i.tokens_seen {
        row("tokens seen", thousands(v));
    }
    if let Some(v) = i.samples_seen {
        row("samples seen", thousands(v));
    }
    if let Some(v) = i.world_size {
        row("world size", v.to_string());
    }
    if let Some(v) = i.zero_stage {
        row(
            "ZeRO stage",
            format!("{v} ({} partition{})", i.partitions.unwrap_or(0), if i.partitions == Some(1) { "" } else { "s" }),
        );
    }
    if !i.dtypes.is_empty() {
        row(
            "dtypes",
            in_order(i.dtypes.iter().map(|(k, v)| (k.as_str(), v.clone())), &["model", "master", "optimizer"]),
        );
    }
    if let Some(c) = &i.model_config {
        row("model", config_line(c));
    }
    row("parameters", thousands(i.parameters));
    if let Some(v) = i.learning_rate {
        row("learning rate", format!("{v:.4e}"));
    }
    if let Some(v) = i.loss_scale {
        row("loss scale", format!("{v}"));
    }
    if let Some(v) = i.val_loss {
        row("val loss", format!("{v:.4}"));
    }
    match (&i.best_tag, i.best_val_loss) {
        (Some(t), Some(v)) => row("best", format!("{t} (val loss {v:.4})")),
        (None, Some(v)) => row("best", format!("val loss {v:.4}")),
        _ => {}
    }
    let total: u64 = i.files.iter().map(|f| f.bytes).sum();
    row("files", format!("{} ({})", i.files.len(), human_bytes(total)));
    let w = i.files.iter().map(|f| f.name.len()).max().unwrap_or(0);
    for f in &i.files {
        let _ = writeln!(s, "    {:<w$}  {:>10}", f.name, human_bytes(f.bytes));
    }
    if let Some(rows) = &i.tensors {
        let _ = writeln!(s, "tensors ({}):", rows.len());
        let cells: Vec<[String; 5]> = rows
            .iter()
            .map(|t| {
                let parts = t.partitions.as_ref().map_or(String::new(), |ps| {
                    ps.iter()
                        .map(|p| {
                            format!(
                                "r{} [{}, {})@{}",
                                p.rank,
                                p.param_offset,
                                p.param_offset + p.len,
                                p.partition_offset
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                });
                [t.name.clone(), format!("{:?}", t.shape), t.dtype.clone(), thousands(t.bytes), parts]
            })
            .collect();
        let head = [
            "name",
            "shape",
            "dtype",
            "bytes",
            if rows.iter().any(|t| t.partitions.is_some()) { "partitions: rank [elements)@offset" } else { "" },
        ];
        let widths: Vec<usize> =
            (0..4).map(|c| cells.iter().map(|r| r[c].len()).chain([head[c].len()]).max().unwrap_or(0)).collect();
        let mut put = |r: &[String; 5]| {
            let l = format!(
                "  {:<a$}  {:<b$}  {:<c$}  {:>d$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                a = widths[0],
                b = widths[1],
                c = widths[2],
                d = widths[3]
            );
            let _ = writeln!(s, "{}", l.trim_end());
        };
        put(&head.map(str::to_string));
        for r in &cells {
            put(r);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(124475904), "124,475,904");
    }
}
