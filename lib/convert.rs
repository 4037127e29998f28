//! zero-to-fp32: consolidates a sharded training checkpoint into one set of full tensors, written
//! as safetensors (one file, or a Hugging Face directory with shards and an index).
//!
//! Sources implement [`ShardedSource`]: they describe their tensors up front and hand out byte
//! ranges of them from any thread. Since every tensor's place in the output is known from the
//! shapes alone, the work is cut into units of [`UNIT_ELEMS`] elements that worker threads read,
//! cast and write at their final offsets, in any order. Each worker holds one unit (stored and
//! output dtype): peak memory is a few MiB per thread plus fixed overhead, whatever the model.

use crate::fsutil::{self, AtomicDir, AtomicFile, FsError};
use crate::interop::deepspeed::{self, DeepSpeedError, DeepSpeedSource};
use crate::interop::safetensors_out::{self, SafetensorsOutError, TensorSpec};
use crate::interop::torch_pickle::DType;
use crate::interop::zerokit_source::{self, ZerokitSource, ZerokitSourceError};
use crate::tags::{self, TagError};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::info;

/// Errors a source reports while reading; they name their file.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// One tensor of a source, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    /// The stored dtype of the bytes `read_range` returns.
    pub dtype: DType,
    /// Not trained (excluded by `--exclude-frozen`).
    pub frozen: bool,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64
    }
}

/// A checkpoint that can be consolidated piece by piece, from several threads at once.
pub trait ShardedSource: Sync {
    /// One line for the log, e.g. "DeepSpeed ZeRO-2 checkpoint, 4 ranks, fp16".
    fn format(&self) -> String;
    /// Every tensor of the consolidated model, in output order.
    fn describe(&self) -> Vec<TensorInfo>;
    /// Checks that reading relies on, run once before the first `read_range` (DeepSpeed: the
    /// CRC-32 of every storage that is read), in parallel on rayon's current pool.
    fn prepare(&self) -> Result<(), SourceError> {
        Ok(())
    }
    /// Bytes [start, start + out.len()) of tensor `name`, little-endian in its
    /// `TensorInfo::dtype`, into `out`. Ranges are whole elements.
    fn read_range(&self, name: &str, start: u64, out: &mut [u8]) -> Result<(), SourceError>;
    /// A transformers `config.json` for the model with its floating-point parameters stored as
    /// `dtype`, when the source knows the architecture.
    fn hf_config(&self, dtype: DType) -> Option<serde_json::Value>;
    /// Checks the whole source against its own integrity records before anything is converted
    /// (`--verify`), naming every damaged file.
    fn verify(&self) -> Result<(), SourceError>;
}

/// Elements per unit of work: small enough that a worker's buffers stay at a few MiB, large
/// enough that the per-unit system calls cost nothing.
pub const UNIT_ELEMS: u64 = 1 << 20;

/// The units of a tensor of `numel` elements: (first element, element count).
pub fn units(numel: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..numel.div_ceil(UNIT_ELEMS)).map(move |k| (k * UNIT_ELEMS, UNIT_ELEMS.min(numel - k * UNIT_ELEMS)))
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    DeepSpeed(#[from] DeepSpeedError),
    #[error(transparent)]
    Zerokit(#[from] ZerokitSourceError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: SafetensorsOutError },
    #[error("{0}")]
    Source(SourceError),
    #[error("{0}: not a directory")]
    NotADir(PathBuf),
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error("{0}: not a checkpoint zero-to-fp32 can read (neither zerokit nor DeepSpeed files found)")]
    UnknownFormat(PathBuf),
    #[error("--max-shard-size: {0}")]
    ShardSize(SafetensorsOutError),
    #[error("{0}")]
    Threads(String),
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
/// root's `latest` names (lib/tags.rs checks that it stays inside the root).
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
        let max = safetensors_out::parse_shard_size(&args.max_shard_size).map_err(ConvertError::ShardSize)?;
        safetensors_out::plan_shards(&specs, max)
    };
    let names: Vec<String> = if single {
        vec![args.output.file_name().unwrap_or_default().to_string_lossy().into_owned()]
    } else {
        (0..shards.len()).map(|k| safetensors_out::shard_file_name(k, shards.len())).collect()
    };
    info!("{}: {}", args.checkpoint.display(), source.format());
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
        // Errors name the file the user asked for, not the temporary one.
        let shown = match &dir {
            Some(_) => args.output.join(&names[k]),
            None => args.output.clone(),
        };
        let werr = |e: std::io::Error| ConvertError::Write { path: shown.clone(), source: e.into() };
        let mut file = AtomicFile::create(&final_path)?;
        let shard_specs: Vec<TensorSpec> = shard.iter().map(|&i| specs[i].clone()).collect();
        let header = safetensors_out::header_bytes(&shard_specs, &meta);
        let out = file.positional().map_err(werr)?;
        out.write_all_at(&header, 0).map_err(werr)?;
        let mut at = header.len() as u64;
        let mut work = Vec::new();
        for &i in shard {
            work.extend(units(infos[i].numel()).map(|(e0, n)| (i, at, e0, n)));
            at += specs[i].nbytes();
            weight_map.insert(infos[i].name.clone(), names[k].clone());
        }
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
        file.commit().map_err(|e| match e {
            FsError::Io { source, .. } => werr(source),
            other => other.into(),
        })?;
    }
    if let Some(d) = dir {
        if names.len() > 1 {
            let index = safetensors_out::index_json(&weight_map, total_bytes);
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

/// Converts little-endian elements between dtypes, rounding to nearest-even as torch's `.to()`.
pub fn cast(src: &[u8], from: DType, to: DType, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(src.len() / from.size() * to.size());
    let n = src.len() / from.size();
    match (from, to) {
        (DType::F32, DType::F16) => {
            for c in src.chunks_exact(4) {
                let x = f32::from_le_bytes(c.try_into().unwrap());
                out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
            }
        }
        (DType::F32, DType::BF16) => {
            for c in src.chunks_exact(4) {
                let x = f32::from_le_bytes(c.try_into().unwrap());
                out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
        }
        _ => {
            for i in 0..n {
                let x = read_f64(&src[i * from.size()..], from);
                write_f64(out, x, to);
            }
        }
    }
}

fn read_f64(b: &[u8], d: DType) -> f64 {
    match d {
        DType::F64 => f64::from_le_bytes(b[..8].try_into().unwrap()),
        DType::F32 => f32::from_le_bytes(b[..4].try_into().unwrap()) as f64,
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        // Integer tensors are never cast (out_dtype keeps them), so this is unreachable in use.
        DType::I64 => i64::from_le_bytes(b[..8].try_into().unwrap()) as f64,
        DType::I32 => i32::from_le_bytes(b[..4].try_into().unwrap()) as f64,
        DType::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
        DType::I8 => b[0] as i8 as f64,
        DType::U8 | DType::Bool => b[0] as f64,
    }
}

fn write_f64(out: &mut Vec<u8>, x: f64, d: DType) {
    match d {
        // f64 -> f32 -> half would round twice; go straight from f64.
        DType::F64 => out.extend_from_slice(&x.to_le_bytes()),
        DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
        DType::F16 => out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
        DType::I64 => out.extend_from_slice(&(x as i64).to_le_bytes()),
        DType::I32 => out.extend_from_slice(&(x as i32).to_le_bytes()),
        DType::I16 => out.extend_from_slice(&(x as i16).to_le_bytes()),
        DType::I8 => out.push(x as i8 as u8),
        DType::U8 | DType::Bool => out.push(x as u8),
    }
}

/// This process's peak resident set (VmHWM), on Linux.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casts_round_to_nearest_even_like_torch() {
        // 1 + 2^-8 + 2^-9 lies above the bf16 midpoint: rounds up; 1 + 2^-8 is a tie: to even.
        let xs = [1.0f32 + 1.0 / 256.0 + 1.0 / 512.0, 1.0 + 1.0 / 256.0, -2.5, 65520.0];
        let src: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut out = vec![];
        cast(&src, DType::F32, DType::BF16, &mut out);
        let got: Vec<u16> = out.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(got, vec![0x3f81, 0x3f80, 0xc020, 0x4780]);
        cast(&src, DType::F32, DType::F16, &mut out);
        let got: Vec<u16> = out.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        // 65520 overflows half's range on rounding: inf, as torch gives.
        assert_eq!(got, vec![0x3c06, 0x3c04, 0xc100, 0x7c00]);
        let mut back = vec![];
        cast(&out, DType::F16, DType::F32, &mut back);
        assert_eq!(f32::from_le_bytes(back[8..12].try_into().unwrap()), -2.5);
    }
}
