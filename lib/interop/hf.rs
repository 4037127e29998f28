//! Hugging Face model directories, both ways: config.json plus model.safetensors (or shards
//! listed in model.safetensors.index.json). The safetensors reading and writing here serve every
//! model family (`Family` says how a family's stored keys map to its parameters); the GPT-2
//! config and directories are here too, Llama's in `interop::hf_llama`, Gemma's in `interop::hf_gemma`.
//!
//! GPT-2: names are transformers' GPT-2 names and weights keep their Conv1D [in, out] layout, so
//! moving weights is a copy; the older key style without the `transformer.` prefix, the
//! `attn.bias`/`attn.masked_bias` mask buffers of old checkpoints and a stored `lm_head.weight`
//! equal to wte are accepted on the way in.

use crate::formats::dtype::{DType, DTypeError};
use crate::formats::safetensors::{write_tensors, SafetensorsError};
use crate::fsutil::{self, AtomicDir, FsError};
use crate::model::decoder::{Decoder, DecoderConfig};
use crate::model::gpt2::{Gpt, GptConfig, LAYER_NORM_EPS, WTE};
use crate::model::{check_kind, ModelError};
use crate::model::{Model, ParamSpec};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, TchError, Tensor};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: bad config.json: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors checkpoints are read here)")]
    NoWeights { path: PathBuf },
    #[error("{path}: bad shard index: {msg}")]
    Index { path: PathBuf, msg: String },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: missing tensor {name}")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: unexpected tensor {key} (not a parameter of this {family} config)")]
    Unexpected { path: PathBuf, key: String, family: &'static str },
    #[error("{path}: tensor {key} is a second copy of {name} (first seen as {first})")]
    Duplicate { path: PathBuf, key: String, name: String, first: String },
    #[error("{path}: tensor {key} has shape {found:?}, expected {expected:?} for this config{hint}")]
    Shape { path: PathBuf, key: String, found: Vec<usize>, expected: Vec<i64>, hint: &'static str },
    #[error("{path}: tensor {key} has dtype {dtype}, expected F32, F16 or BF16")]
    Dtype { path: PathBuf, key: String, dtype: String },
    #[error("{path}: {key} differs from {name}; {why}")]
    Untied { path: PathBuf, key: String, name: String, why: &'static str },
    #[error("{path}: libtorch: {source}")]
    Torch { path: PathBuf, source: TchError },
    #[error("{path}: {source}")]
    Kind { path: PathBuf, source: DTypeError },
    #[error(transparent)]
    Write(#[from] SafetensorsError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io { path: path.to_path_buf(), source }
}

fn torch_err(path: &Path) -> impl FnOnce(TchError) -> HfError + '_ {
    move |source| HfError::Torch { path: path.to_path_buf(), source }
}

/// Reads the GPT-2 shape from config.json (`path` is the file or its directory), refusing
/// configs whose arithmetic differs from the model here (exact GELU, another LayerNorm eps,
/// untied head, a non-4x MLP, unscaled or layer-scaled attention, cross-attention).
pub fn read_config(path: &Path) -> Result<GptConfig, HfError> {
    let file = if path.is_dir() { path.join(CONFIG_FILE) } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file).map_err(io_err(&file))?;
    let bad = |msg: String| HfError::Config { path: file.clone(), msg };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;

    let size = |key: &str| -> Result<Option<usize>, HfError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(bad(format!("{key} must be a positive integer, got {x}"))),
            },
        }
    };
    let required = |key: &str| size(key)?.ok_or_else(|| bad(format!("{key} is missing")));
    let flag = |key: &str, default: bool| -> Result<bool, HfError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(x) => Err(bad(format!("{key} must be true or false, got {x}"))),
        }
    };

    if let Some(t) = obj.get("model_type") {
        if t.as_str() != Some("gpt2") {
            return Err(bad(format!("model_type is {t}, expected \"gpt2\"")));
        }
    }
    let n_embd = required("n_embd")?;
    let block_size = match size("n_positions")? {
        Some(n) => n,
        None => size("n_ctx")?.ok_or_else(|| bad("n_positions is missing".into()))?,
    };
    let cfg = GptConfig {
        n_layer: required("n_layer")?,
        n_head: required("n_head")?,
        n_embd,
        block_size,
        vocab_size: required("vocab_size")?,
    };
    // gelu_new, gelu_fast and gelu_pytorch_tanh are all the tanh approximation.
    let act = obj.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
    if !matches!(act, "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh") {
        return Err(bad(format!("activation_function {act:?} is not the tanh GELU of GPT-2")));
    }
    if let Some(x) = obj.get("layer_norm_epsilon") {
        let eps = x.as_f64().ok_or_else(|| bad(format!("layer_norm_epsilon must be a number, got {x}")))?;
        if (eps - LAYER_NORM_EPS).abs() > 1e-12 {
            return Err(bad(format!("layer_norm_epsilon {eps} is not GPT-2's {LAYER_NORM_EPS}")));
        }
    }
    if let Some(n_inner) = size("n_inner")? {
        if n_inner != 4 * n_embd {
            return Err(bad(format!("n_inner {n_inner} is not 4 * n_embd = {}", 4 * n_embd)));
        }
    }
    if !flag("scale_attn_weights", true)? {
        return Err(bad("scale_attn_weights false (unscaled attention) is not supported".into()));
    }
    if flag("scale_attn_by_inverse_layer_idx", false)? {
        return Err(bad("scale_attn_by_inverse_layer_idx true is not supported".into()));
    }
    if !flag("tie_word_embeddings", true)? {
        return Err(bad("tie_word_embeddings false (separate lm_head) is not supported".into()));
    }
    if flag("add_cross_attention", false)? {
        return Err(bad("add_cross_attention true is not supported".into()));
    }
    Ok(cfg)
}

pub(crate) fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        _ => "float32",
    }
}

/// A GPT2LMHeadModel config.json: transformers' GPT2Config fields with their defaults, dropout
/// off (zerokit trains without it), and the dtype under both the current (`dtype`) and the older
/// (`torch_dtype`) key.
pub fn config_json(cfg: &GptConfig, kind: Kind) -> String {
    // GPT-2's <|endoftext|> is 50256; smaller custom vocabularies have no such token.
    let eot = (cfg.vocab_size > 50256).then_some(50256);
    let v = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "add_cross_attention": false,
        "attn_pdrop": 0.0,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "embd_pdrop": 0.0,
        "initializer_range": 0.02,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_inner": null,
        "n_layer": cfg.n_layer,
        "n_positions": cfg.block_size,
        "reorder_and_upcast_attn": false,
        "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": false,
        "scale_attn_weights": true,
        "summary_activation": null,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": true,
        "summary_type": "cls_index",
        "summary_use_proj": true,
        "tie_word_embeddings": true,
        "dtype": kind_name(kind),
        "torch_dtype": kind_name(kind),
        "use_cache": true,
        "vocab_size": cfg.vocab_size,
    });
    let mut s = serde_json::to_string_pretty(&v).expect("a JSON value serialises");
    s.push('\n');
    s
}

/// What a stored key is to a model family.
pub enum Key {
    /// The parameter of this name (or a stored copy of a tied one, see `Family::tied`).
    Param(String),
    /// A buffer older transformers versions saved (GPT-2's causal masks, Llama's rope
    /// frequencies): derived, not learned, skipped.
    Buffer,
}

/// How a model family's checkpoints name and lay out its parameters, for `load_tensors`.
pub struct Family {
    /// The family's name in messages ("GPT-2").
    pub name: &'static str,
    /// The parameter (or buffer) a stored key is.
    pub classify: fn(&str) -> Key,
    /// (stored key, parameter): a key that, when it is not itself a parameter of the config, is a
    /// second copy of the parameter tied to it; loaded only if equal to it.
    pub tied: (&'static str, &'static str),
    /// Why a tied copy must be equal, for the message when it is not.
    pub untied_why: &'static str,
    /// Said when a stored matrix has the expected shape transposed.
    pub transposed_hint: &'static str,
}

/// GPT-2's keys: `transformer.` optional, old mask buffers skipped, lm_head tied to wte.
pub const GPT2: Family = Family {
    name: "GPT-2",
    classify: classify_gpt2,
    tied: ("lm_head.weight", WTE),
    untied_why: "zerokit's GPT-2 ties them",
    transposed_hint: " (transposed: an nn.Linear [out, in] weight; GPT-2 stores Conv1D [in, out])",
};

fn classify_gpt2(key: &str) -> Key {
    if key == "lm_head.weight" {
        return Key::Param(key.into());
    }
    let rest = key.strip_prefix("transformer.").unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    if let ["h", i, "attn", "bias" | "masked_bias"] = parts.as_slice() {
        if i.parse::<usize>().is_ok() {
            return Key::Buffer;
        }
    }
    Key::Param(format!("transformer.{rest}"))
}

/// The libtorch kind of a stored dtype that loads as a parameter (F32, F16 or BF16).
fn kind_of(dtype: Dtype) -> Option<Kind> {
    DType::from_safetensors(dtype).filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16)).map(DType::kind)
}

/// model.safetensors.index.json: where each tensor of a sharded checkpoint is stored.
struct ShardIndex {
    path: PathBuf,
    weight_map: BTreeMap<String, String>,
}

/// The weight files of a model directory, and for a sharded one its index.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<ShardIndex>), HfError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        return Err(HfError::NoWeights { path: dir.to_path_buf() });
    }
    let bad = |msg: String| HfError::Index { path: index_path.clone(), msg };
    let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no weight_map object".into()))?;
    let mut weight_map = BTreeMap::new();
    let mut files: Vec<String> = Vec::new();
    for (key, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("{key} maps to {file}, not a file name")))?;
        // Shards live beside the index; a path elsewhere is not a checkpoint we wrote or trust.
        if file.is_empty() || file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!("{key} maps to {file:?}, not a file name in this directory")));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
        weight_map.insert(key.clone(), file.to_string());
    }
    files.sort();
    Ok((files.iter().map(|f| dir.join(f)).collect(), Some(ShardIndex { path: index_path, weight_map })))
}

fn map_file(path: &Path) -> Result<Mmap, HfError> {
    let file = File::open(path).map_err(io_err(path))?;
    // SAFETY: the mapping is read-only and lives only for this load; a checkpoint modified by
    // another process while being loaded is outside what any loader can guard against.
    unsafe { Mmap::map(&file) }.map_err(io_err(path))
}

/// Loads the parameters `specs` names from a model directory of `family`, in `specs` order, as
/// `kind` on `device`. Every check (names, shapes, dtypes, a tied copy) runs before any data is
/// copied.
pub fn load_tensors(
    dir: &Path,
    family: &Family,
    specs: &[ParamSpec],
    device: Device,
    kind: Kind,
) -> Result<Vec<(String, Tensor)>, HfError> {
    let (paths, index) = weight_files(dir)?;
    let maps = paths.iter().map(|p| map_file(p)).collect::<Result<Vec<_>, _>>()?;
    let files = paths
        .iter()
        .zip(&maps)
        .map(|(p, m)| {
            SafeTensors::deserialize(m).map_err(|e| HfError::Safetensors { path: p.clone(), msg: e.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let wanted: HashMap<&str, &ParamSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    // canonical name -> (file index, key as stored, view)
    let mut found: HashMap<String, (usize, String, TensorView<'_>)> = HashMap::new();
    let (tied_key, tied_to) = family.tied;
    let mut tied_copy: Option<(usize, TensorView<'_>)> = None;
    for (fi, st) in files.iter().enumerate() {
        let path = &paths[fi];
        for (key, view) in st.iter() {
            if let Some(ShardIndex { path: index_path, weight_map }) = &index {
                let listed = weight_map.get(key).map(String::as_str);
                let here = path.file_name().and_then(|n| n.to_str());
                if listed != here {
                    return Err(HfError::Index {
                        path: index_path.clone(),
                        msg: format!("{key} is stored in {} but the index lists it in {listed:?}", path.display()),
                    });
                }
            }
            if kind_of(view.dtype()).is_none() {
                return Err(HfError::Dtype { path: path.clone(), key: key.into(), dtype: view.dtype().to_string() });
            }
            match (family.classify)(key) {
                Key::Buffer => {}
                Key::Param(name) if name == tied_key && !wanted.contains_key(name.as_str()) => {
                    tied_copy = Some((fi, view))
                }
                Key::Param(name) => {
                    let Some(spec) = wanted.get(name.as_str()) else {
                        return Err(HfError::Unexpected { path: path.clone(), key: key.into(), family: family.name });
                    };
                    if view.shape().len() != spec.shape.len()
                        || view.shape().iter().zip(&spec.shape).any(|(&a, &b)| a as i64 != b)
                    {
                        let transposed = view.shape().len() == 2
                            && view.shape()[0] as i64 == spec.shape[1]
                            && view.shape()[1] as i64 == spec.shape[0];
                        return Err(HfError::Shape {
                            path: path.clone(),
                            key: key.into(),
                            found: view.shape().to_vec(),
                            expected: spec.shape.clone(),
                            hint: if transposed { family.transposed_hint } else { "" },
                        });
                    }
                    if let Some((_, first, _)) = found.get(&name) {
                        return Err(HfError::Duplicate {
                            path: path.clone(),
                            key: key.into(),
                            name,
                            first: first.clone(),
                        });
                    }
                    found.insert(name, (fi, key.to_string(), view));
                }
            }
        }
    }
    if let Some(ShardIndex { path: index_path, weight_map }) = &index {
        let stored: std::collections::HashSet<&str> = files.iter().flat_map(|st| st.names()).collect();
        if let Some(key) = weight_map.keys().find(|k| !stored.contains(k.as_str())) {
            return Err(HfError::Index {
                path: index_path.clone(),
                msg: format!("{key} is listed in {} but not stored there", weight_map[key]),
            });
        }
    }
    let where_ = || {
        if paths.len() == 1 {
            paths[0].clone()
        } else {
            dir.to_path_buf()
        }
    };
    if let Some(spec) = specs.iter().find(|s| !found.contains_key(&s.name)) {
        return Err(HfError::Missing { path: where_(), name: spec.name.clone() });
    }
    if let Some((fi, copy)) = &tied_copy {
        // A tied copy of a parameter the config does not have is a tensor that does not belong.
        let Some((_, _, param)) = found.get(tied_to) else {
            return Err(HfError::Unexpected { path: paths[*fi].clone(), key: tied_key.into(), family: family.name });
        };
        if !same_values(copy, param).map_err(torch_err(&paths[*fi]))? {
            return Err(HfError::Untied {
                path: paths[*fi].clone(),
                key: tied_key.into(),
                name: tied_to.into(),
                why: family.untied_why,
            });
        }
    }

    let total: u64 = specs.iter().map(|s| found[&s.name].2.data().len() as u64).sum();
    let pb = crate::logging::progress_bar(total, "load {bar:40} {bytes}/{total_bytes} {eta}");
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let (fi, _, view) = &found[&spec.name];
        let t = to_tensor(view)
            .and_then(|t| t.f_to_kind(kind))
            .and_then(|t| t.f_to_device(device))
            .map_err(torch_err(&paths[*fi]))?;
        pb.inc(view.data().len() as u64);
        out.push((spec.name.clone(), t));
    }
    pb.finish_and_clear();
    tracing::info!("loaded {} tensors ({} bytes) from {}", out.len(), total, dir.display());
    Ok(out)
}

/// A CPU tensor holding a copy of a stored tensor, in its stored dtype.
fn to_tensor(view: &TensorView<'_>) -> Result<Tensor, TchError> {
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let kind = kind_of(view.dtype()).expect("dtype checked when the file was scanned");
    Tensor::f_from_data_size(view.data(), &shape, kind)
}

/// Whether two stored tensors hold the same values (bytes when the dtypes agree).
fn same_values(a: &TensorView<'_>, b: &TensorView<'_>) -> Result<bool, TchError> {
    if a.shape() != b.shape() {
        return Ok(false);
    }
    if a.dtype() == b.dtype() {
        return Ok(a.data() == b.data());
    }
    Ok(to_tensor(a)?.f_to_kind(Kind::Float)?.equal(&to_tensor(b)?.f_to_kind(Kind::Float)?))
}

/// Writes `config_json` as config.json and model.safetensors for `tensors` (canonical names, all
/// of `kind`) into `dir`, atomically: the directory appears complete or not at all.
pub fn save(
    dir: &Path,
    config_json: &str,
    kind: Kind,
    tensors: &[(String, Tensor)],
    force: bool,
) -> Result<(), HfError> {
    let dtype = DType::from_kind(kind).map_err(|source| HfError::Kind { path: dir.to_path_buf(), source })?;
    let out = AtomicDir::create(dir, force)?;
    let total: usize = tensors.iter().map(|(_, t)| t.numel() * dtype.size()).sum();
    let pb = crate::logging::progress_bar(total as u64, "save {bar:40} {bytes}/{total_bytes} {eta}");
    // In name order, where transformers' own writer (the safetensors crate) puts them.
    let mut sorted: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_tensors(&out.path().join(WEIGHTS_FILE), &sorted, Some(dtype), &metadata, Some(&pb))?;
    fsutil::write_atomic(&out.path().join(CONFIG_FILE), config_json.as_bytes())?;
    pb.finish_and_clear();
    out.commit()?;
    tracing::info!("saved {} tensors ({total} bytes) to {}", tensors.len(), dir.display());
    Ok(())
}

/// Loads a Hugging Face GPT-2 directory (config.json with model.safetensors or a sharded
/// model.safetensors.index.json) into a model of `kind` on `device`.
pub fn load_gpt2(path: &Path, device: Device, kind: Kind) -> Result<(Gpt, GptConfig), HfError> {
    check_kind(kind)?;
    let cfg = read_config(path)?;
    cfg.validate().map_err(|e| HfError::Config { path: path.join(CONFIG_FILE), msg: e.to_string() })?;
    let named = load_tensors(path, &GPT2, &cfg.param_specs(), device, kind)?;
    let model = Gpt::from_named(&cfg, device, kind, named)?;
    Ok((model, cfg))
}

/// Writes `model` as a GPT2LMHeadModel directory (config.json + model.safetensors, parameters
/// in the model's kind, the tied lm_head stored once as transformer.wte.weight), atomically; an
/// existing `dir` is replaced only with `force`.
pub fn save_gpt2(model: &Gpt, dir: &Path, force: bool) -> Result<(), HfError> {
    save_model(model, model.kind(), &config_json(model.config(), model.kind()), dir, force)
}

/// Writes any model's parameters (all of `kind`) with `config_json` as a Hugging Face directory
/// (see [`save`]).
pub(crate) fn save_model(
    model: &impl Model,
    kind: Kind,
    config_json: &str,
    dir: &Path,
    force: bool,
) -> Result<(), HfError> {
    let tensors: Vec<(String, Tensor)> = model.named_parameters().into_iter().map(|(n, t)| (n, t.detach())).collect();
    save(dir, config_json, kind, &tensors, force)
}

/// A decoder (Llama, Gemma) of configuration `cfg` from a Hugging Face directory's weights
/// (model.safetensors or a sharded index), named as `family` names them.
pub(crate) fn load_decoder<C: DecoderConfig>(
    path: &Path,
    family: &Family,
    cfg: &C,
    device: Device,
    kind: Kind,
) -> Result<Decoder<C>, HfError> {
    check_kind(kind)?;
    let named = load_tensors(path, family, &cfg.arch().param_specs(), device, kind)?;
    Ok(Decoder::from_named(cfg, device, kind, named)?)
}

/// A decoder family's config.json (`path` is the file or its directory), parsed by `parse` and
/// validated.
pub(crate) fn read_decoder_config<C: DecoderConfig>(
    path: &Path,
    parse: fn(&Value) -> Result<C, String>,
) -> Result<C, HfError> {
    read_json_config(path, |v| {
        let cfg = parse(v)?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    })
}

/// A family's config.json (`path` is the file or its directory), parsed and checked by `parse`,
/// whose message the error carries with the file's name.
pub(crate) fn read_json_config<C>(path: &Path, parse: impl Fn(&Value) -> Result<C, String>) -> Result<C, HfError> {
    let file = if path.is_dir() { path.join(CONFIG_FILE) } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file).map_err(|source| HfError::Io { path: file.clone(), source })?;
    let bad = |msg: String| HfError::Config { path: file.clone(), msg };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    parse(&v).map_err(bad)
}
