//! Sharded checkpoints read as whole tensors: the interface zero-to-fp32 and `ckpt verify`
//! consolidate through, and that each checkpoint format (interop's DeepSpeed reader, zerokit's
//! own checkpoints) implements. It lives below both sides so that the sources import the
//! interface and the commands import the sources, never the other way round.

use crate::formats::dtype::DType;

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
    /// The training configuration the checkpoint records (zerokit's manifest `config`: where the
    /// run's model and tokens came from), if any.
    fn training_config(&self) -> Option<serde_json::Value> {
        None
    }
    /// The model directory the run's weights started from, when the checkpoint records it
    /// (zerokit's manifest `init_dir`).
    fn init_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// Checks the whole source against its own integrity records before anything is converted
    /// (`--verify`), naming every damaged file.
    fn verify(&self) -> Result<(), SourceError>;
}

/// Elements per unit of work when a source is read in parts: small enough that a worker's
/// buffers stay at a few MiB, large enough that the per-unit system calls cost nothing.
pub const UNIT_ELEMS: u64 = 1 << 20;

/// The units of a tensor of `numel` elements: (first element, element count).
pub fn units(numel: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..numel.div_ceil(UNIT_ELEMS)).map(move |k| (k * UNIT_ELEMS, UNIT_ELEMS.min(numel - k * UNIT_ELEMS)))
}
