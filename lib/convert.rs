//! zero-to-fp32: consolidates a sharded training checkpoint into one set of full tensors, written
//! as safetensors (one file, or a Hugging Face directory with shards and an index).
//!
//! Sources implement [`ShardedSource`] (lib/formats/source.rs): they describe their tensors up
//! front and hand out byte ranges of them from any thread. Since every tensor's place in the
//! output is known from the shapes alone, the work is cut into units of
//! [`UNIT_ELEMS`](crate::formats::source::UNIT_ELEMS) elements that worker threads read, cast
//! and write at their final offsets, in any order. Each worker holds one unit (stored and
//! output dtype): peak memory is a few MiB per thread plus fixed overhead, whatever the model.
//! A directory output also gets config.json and the tokenizer's files ([`tokenizer`]).

pub mod tokenizer;

use crate::formats::dtype::{cast, DType};
use crate::formats::safetensors::{self as st, SafetensorsError, TensorSpec};
use crate::formats::source::{units, ShardedSource, SourceError, TensorInfo};
use crate::formats::tags::{self, TagError};
use crate::fsutil::{self, AtomicDir, FsError};
use crate::interop::deepspeed::{self, DeepSpeedError, DeepSpeedSource};
use crate::interop::zerokit_source::{self, ZerokitSource, ZerokitSourceError};
use crate::units::{parse_size, SizeError};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    DeepSpeed(#[from] DeepSpeedError),
    #[error(transparent)]
    Zerokit(#[from] ZerokitSourceError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Write(#[from] SafetensorsError),
    #[error("{0}")]
    Source(SourceError),
    #[error("{0}: not a directory")]
    NotADir(PathBuf),
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error("{0}: not a checkpoint zero-to-fp32 can read (neither zerokit nor DeepSpeed files found)")]
    UnknownFormat(PathBuf),
    #[error("--max-shard-size: {0}")]
    ShardSize(SizeError),
    #[error("{0}")]
    Threads(String),
    #[error("{0}")]
    Tokenizer(String),
}

/// Output floating-point dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDtype {
    Fp32,
    Fp16,
    Bf16,
}

impl OutDtype {
    pub fn dtype(self) -> DType {
        match self {
            OutDtype::Fp32 => DType::F32,
            OutDtype::Fp16 => DType::F16,
            OutDtype::Bf16 => DType::BF16,
        }
    }
}

/// zero-to-fp32's command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "zero-to-fp32",
    version,
    about = "Consolidate a zerokit or DeepSpeed ZeRO checkpoint into safetensors"
)]
pub struct ConvertArgs {
    /// Checkpoint root (its `latest` file is followed) or a tag directory.
    pub checkpoint: PathBuf,
    /// A `.safetensors` file, or a directory to write in Hugging Face layout.
    pub output: PathBuf,
    /// Tag (sub-directory) to convert instead of the one `latest` names.
    #[arg(long)]
    pub tag: Option<String>,
    /// Floating-point dtype of the output (integer buffers keep theirs).
    #[arg(long, value_enum, default_value = "fp32")]
    pub dtype: OutDtype,
    /// Leave out parameters that were not trained.
    #[arg(long)]
    pub exclude_frozen: bool,
    /// List what would be written, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Largest shard of a directory output ("5GB", "500MiB", bytes).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace an existing OUTPUT.
    #[arg(long)]
    pub force: bool,
    /// Print this process's peak resident memory at the end.
    #[arg(long)]
    pub report_peak_rss: bool,
    /// First check every file of a zerokit checkpoint against the sha256 in its manifest (reads
    /// the whole checkpoint, Adam moments included). DeepSpeed storages are always checked
    /// against their CRC-32 before they are read.
    #[arg(long)]
    pub verify: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Tokenizer files for a directory OUTPUT: a directory holding tokenizer.json or
    /// tokenizer.model (they and tokenizer_config.json, special_tokens_map.json and
    /// generation_config.json are copied), or a tokenizer.json file. Default: the tokenizer of the
    /// model or dataset the checkpoint's run started from, when it records one that is here.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct Summary {
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
    pub files: Vec<String>,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Finds the tag directory: `--tag`, else `checkpoint` itself when it is a tag, else the tag the
/// root's `latest` names (lib/formats/tags.rs checks that it stays inside the root).
pub fn resolve_tag_dir(checkpoint: &Path, tag: Option<&str>) -> Result<PathBuf, ConvertError> {
    if !checkpoint.is_dir() {
        return Err(ConvertError::NotADir(checkpoint.to_path_buf()));
    }
    let is_tag = |d: &Path| zerokit_source::is_zerokit_dir(d) || deepspeed::is_deepspeed_dir(d);
    if tag.is_none() && is_tag(checkpoint) {
        return Ok(checkpoint.to_path_buf());
    }
    Ok(tags::resolve(checkpoint, tag, &is_tag)?)
}

/// Opens whichever supported checkpoint `checkpoint` is.
pub fn open_source(checkpoint: &Path, tag: Option<&str>) -> Result<Box<dyn ShardedSource>, ConvertError> {
    let dir = resolve_tag_dir(checkpoint, tag)?;
    if zerokit_source::is_zerokit_dir(&dir) {
        return Ok(Box::new(ZerokitSource::open(&dir)?));
    }
    if deepspeed::is_deepspeed_dir(&dir) {
        return Ok(Box::new(DeepSpeedSource::open(&dir)?));
    }
    Err(ConvertError::UnknownFormat(dir))
}

/// The command: open, convert, log the summary.
pub fn run(args: &ConvertArgs) -> Result<Summary, ConvertError> {
    fsutil::clean_up_on_signals();
    let source = open_source(&args.checkpoint, args.tag.as_deref())?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(crate::cli::threads(args.threads).map_err(ConvertError::Threads)?)
        .build()
        .map_err(|e| ConvertError::Threads(format!("cannot start the worker threads: {e}")))?;
    let summary = pool.install(|| convert(source.as_ref(), args))?;
    if let Some(rss) = summary.peak_rss_bytes {
        info!("peak RSS: {:.1} MiB", rss as f64 / 1048576.0);
    }
    Ok(summary)
}

/// The output dtype of a stored dtype: floats become `want`, integers and bools stay.
fn out_dtype(stored: DType, want: DType) -> DType {
    if stored.is_float() {
        want
    } else {
        stored
    }
}

/// Consolidates `source` into `args.output`.
pub fn convert(source: &dyn ShardedSource, args: &ConvertArgs) -> Result<Summary, ConvertError> {
    let start = Instant::now();
    fsutil::refuse_overlap(&args.output, &[&args.checkpoint])?;
    let want = args.dtype.dtype();
    let infos: Vec<TensorInfo> = source.describe().into_iter().filter(|t| !(args.exclude_frozen && t.frozen)).collect();
    let specs: Vec<TensorSpec> = infos
        .iter()
        .map(|t| TensorSpec { name: t.name.clone(), dtype: out_dtype(t.dtype, want), shape: t.shape.clone() })
        .collect();
    let total_bytes: u64 = specs.iter().map(TensorSpec::nbytes).sum();
    let parameters: u64 = infos.iter().map(TensorInfo::numel).sum();
    let single = args.output.extension().is_some_and(|e| e == "safetensors");
    let shards = if single {
        vec![(0..specs.len()).collect()]
    } else {
        st::plan_shards(&specs, shard_size(&args.max_shard_size)?)
    };
    let names: Vec<String> = if single {
        vec![args.output.file_name().unwrap_or_default().to_string_lossy().into_owned()]
    } else {
        (0..shards.len()).map(|k| st::shard_file_name(k, shards.len())).collect()
    };
    info!("{}: {}", args.checkpoint.display(), source.format());
    // Decided before the conversion, so that a wrong --tokenizer fails at once.
    let tokenizer = match (&args.tokenizer, single) {
        (Some(path), true) => {
            return Err(ConvertError::Tokenizer(format!(
                "--tokenizer {}: OUTPUT {} is a single .safetensors file; tokenizer files go into a directory OUTPUT",
                path.display(),
                args.output.display()
            )))
        }
        (Some(path), false) => Some(tokenizer::explicit(path)?),
        (None, false) => Some(tokenizer::recorded(source.training_config().as_ref(), source.init_dir().as_deref())),
        (None, true) => None,
    };
    if args.verify {
        source.verify().map_err(ConvertError::Source)?;
    }

    if args.dry_run {
        for (k, shard) in shards.iter().enumerate() {
            for &i in shard {
                let s = &specs[i];
                println!(
                    "{}\t{:?}\t{}\t{}\t{}{}",
                    s.name,
                    s.shape,
                    s.dtype.safetensors_name(),
                    s.nbytes(),
                    names[k],
                    if infos[i].frozen { "\tfrozen" } else { "" }
                );
            }
        }
        info!(
            "dry run: would write {} tensors, {} parameters, {} bytes in {} file(s) to {}",
            specs.len(),
            parameters,
            total_bytes,
            names.len(),
            args.output.display()
        );
        if let Some(t) = &tokenizer {
            info!("{}", t.describe(false));
        }
        return Ok(Summary {
            tensors: specs.len(),
            parameters,
            bytes: total_bytes,
            files: names,
            seconds: start.elapsed().as_secs_f64(),
            peak_rss_bytes: args.report_peak_rss.then(peak_rss).flatten(),
        });
    }

    if args.output.exists() && !args.force {
        return Err(FsError::Exists(args.output.clone()).into());
    }
    let pb = crate::logging::progress_bar(
        total_bytes,
        "{spinner} [{elapsed_precise}] [{bar:40}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta})",
    );
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    source.prepare().map_err(ConvertError::Source)?;

    let dir = if single { None } else { Some(AtomicDir::create(&args.output, args.force)?) };
    let mut weight_map = BTreeMap::new();
    for (k, shard) in shards.iter().enumerate() {
        let final_path = match &dir {
            Some(d) => d.path().join(&names[k]),
            None => args.output.clone(),
        };
        // Errors name the file the user asked for, not the temporary one (fsutil::shown).
        let werr = |e: std::io::Error| ConvertError::Write(SafetensorsError::write(&final_path, e));
        let shard_specs: Vec<TensorSpec> = shard.iter().map(|&i| specs[i].clone()).collect();
        let mut file = st::Writer::create(&final_path, &shard_specs, &meta)?;
        let mut work = Vec::new();
        for (j, &i) in shard.iter().enumerate() {
            work.extend(units(infos[i].numel()).map(|(e0, n)| (i, file.start(j), e0, n)));
            weight_map.insert(infos[i].name.clone(), names[k].clone());
        }
        let out = file.positional()?;
        work.par_iter().try_for_each_init(
            || (Vec::new(), Vec::new()),
            |(raw, cast_buf), &(i, tensor_at, e0, n)| {
                let (from, to) = (infos[i].dtype, specs[i].dtype);
                raw.resize(n as usize * from.size(), 0);
                source.read_range(&infos[i].name, e0 * from.size() as u64, raw).map_err(ConvertError::Source)?;
                let bytes: &[u8] = if to == from {
                    raw
                } else {
                    cast(raw, from, to, cast_buf);
                    cast_buf
                };
                write_unit(out, tensor_at + e0 * to.size() as u64, bytes).map_err(werr)?;
                pb.inc(bytes.len() as u64);
                Ok::<(), ConvertError>(())
            },
        )?;
        file.commit()?;
    }
    if let Some(d) = dir {
        if names.len() > 1 {
            let index = st::index_json(&weight_map, total_bytes);
            crate::fsutil::write_atomic(
                &d.path().join("model.safetensors.index.json"),
                &serde_json::to_vec_pretty(&index).expect("json serializes"),
            )?;
        }
        if let Some(cfg) = source.hf_config(want) {
            crate::fsutil::write_atomic(
                &d.path().join("config.json"),
                &serde_json::to_vec_pretty(&cfg).expect("json serializes"),
            )?;
        }
        if let Some(t) = &tokenizer {
            t.copy_into(d.path())?;
            match t {
                tokenizer::Plan::Copy { .. } => info!("{}", t.describe(true)),
                tokenizer::Plan::Nothing(_) => tracing::warn!("{}", t.describe(true)),
            }
        }
        d.commit()?;
    }
    pb.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    info!(
        "wrote {} tensors, {} parameters, {:.2} GB in {} file(s) to {} in {:.2} s ({:.2} GB/s)",
        specs.len(),
        parameters,
        total_bytes as f64 / 1e9,
        names.len(),
        args.output.display(),
        seconds,
        total_bytes as f64 / 1e9 / seconds.max(1e-9)
    );
    Ok(Summary {
        tensors: specs.len(),
        parameters,
        bytes: total_bytes,
        files: names,
        seconds,
        peak_rss_bytes: args.report_peak_rss.then(peak_rss).flatten(),
    })
}

/// Writes one unit at its offset and starts its writeback at once: with many GiB of RAM the
/// kernel would otherwise hold the whole output dirty until the final fsync and only then write
/// it, so writing to disk would not overlap reading and converting.
fn write_unit(file: &File, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all_at(bytes, offset)?;
    crate::fsutil::start_writeback(file, offset, bytes.len() as u64);
    Ok(())
}

/// This process's peak resident set (VmHWM), on Linux.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `--max-shard-size`: a size ([`parse_size`]) of at least one byte.
fn shard_size(s: &str) -> Result<u64, ConvertError> {
    parse_size(s).ok().filter(|&n| n >= 1).ok_or_else(|| ConvertError::ShardSize(SizeError(s.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sizes_parse_like_transformers() {
        assert_eq!(shard_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(shard_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(shard_size("1234").unwrap(), 1234);
        assert!(shard_size("lots").is_err());
        assert!(shard_size("0").is_err());
    }
}
