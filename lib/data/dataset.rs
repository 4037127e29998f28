//! The token dataset `train` reads: one split file (`train.bin`, `val.bin`) memory-mapped, served
//! as (x, y) windows of `block + 1` consecutive tokens, y being x shifted by one. Random batches
//! follow nanoGPT's get_batch (window starts uniform in `[0, len - block)`); their positions come
//! from a generator seeded by (seed, rank, batch index), so a resumed run recomputes any batch
//! without stored state. Sequential batches walk non-overlapping windows for evaluation.

use super::prepare::splitmix64;
use super::{DataError, Dtype};
use memmap2::Mmap;
use rayon::prelude::*;
use std::fs::File;
use std::path::{Path, PathBuf};

pub struct TokenDataset {
    path: PathBuf,
    map: Option<Mmap>,
    dtype: Dtype,
    len: usize,
}

impl TokenDataset {
    /// Opens DIR/{split}.bin; dtype from DIR/meta.json when present, else uint16 (nanoGPT files
    /// have no meta). Every token id is checked against `vocab_size` here, once, in parallel.
    pub fn open(dir: &Path, split: &str, vocab_size: usize) -> Result<Self, DataError> {
        let dtype = read_dtype(dir)?;
        let path = dir.join(format!("{split}.bin"));
        let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let bytes = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
        if bytes % dtype.size() as u64 != 0 {
            return Err(DataError::Dataset {
                path,
                message: format!("size {bytes} bytes is not a whole number of {} tokens", dtype.name()),
            });
        }
        let len = (bytes / dtype.size() as u64) as usize;
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the file is opened read-only and the map is never written. Another process
            // truncating it while training runs would fault; token files are written once by
            // `prepare` (atomically renamed into place) and not modified afterwards.
            Some(unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(&path, e))?)
        };
        let ds = TokenDataset { path, map, dtype, len };
        ds.check_vocab(vocab_size)?;
        Ok(ds)
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    #[inline]
    fn token(&self, i: usize) -> u32 {
        let b = self.bytes();
        match self.dtype {
            Dtype::U16 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32,
            Dtype::U32 => u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        }
    }

    fn check_vocab(&self, vocab_size: usize) -> Result<(), DataError> {
        const CHUNK: usize = 1 << 20;
        let n_chunks = self.len.div_ceil(CHUNK);
        let bad = (0..n_chunks).into_par_iter().find_map_first(|c| {
            (c * CHUNK..((c + 1) * CHUNK).min(self.len)).find_map(|i| {
                let id = self.token(i);
                (id as usize >= vocab_size).then_some((i, id))
            })
        });
        match bad {
            Some((i, id)) => Err(DataError::Dataset {
                path: self.path.clone(),
                message: format!(
                    "token id {id} at position {i} is not below the model's vocab size {vocab_size} \
                     (tokenized with a different encoding?)"
                ),
            }),
            None => Ok(()),
        }
    }

    fn check_window(&self, batch: usize, block: usize) -> Result<(), DataError> {
        if batch == 0 || block == 0 {
            return Err(DataError::Dataset {
                path: self.path.clone(),
                message: format!("batch ({batch}) and block ({block}) must be positive"),
            });
        }
        if self.len < block + 1 {
            return Err(DataError::Dataset {
                path: self.path.clone(),
                message: format!(
                    "{} tokens, but a window of block size {block} needs at least {}",
                    self.len,
                    block + 1
                ),
            });
        }
        Ok(())
    }

    fn fill(&self, starts: impl Iterator<Item = usize>, batch: usize, block: usize) -> (Vec<i64>, Vec<i64>) {
        let mut x = Vec::with_capacity(batch * block);
        let mut y = Vec::with_capacity(batch * block);
        for p in starts {
            x.extend((p..p + block).map(|i| self.token(i) as i64));
            y.extend((p + 1..p + block + 1).map(|i| self.token(i) as i64));
        }
        (x, y)
    }

    /// Batch number `index` of rank `rank`: `batch` random windows, positions drawn from a
    /// generator seeded by (seed, rank, index) so any batch can be recomputed on resume without
    /// stored state. Returns x and y, each batch*block tokens as i64, row-major.
    pub fn random_batch(
        &self,
        seed: u64,
        rank: usize,
        index: u64,
        batch: usize,
        block: usize,
    ) -> Result<(Vec<i64>, Vec<i64>), DataError> {
        self.check_window(batch, block)?;
        let range = (self.len - block) as u64;
        let mut state = splitmix64(splitmix64(splitmix64(seed) ^ rank as u64) ^ index);
        let starts = (0..batch).map(move |_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let r = splitmix64(state);
            // Multiply-shift maps 64 random bits onto [0, range); the bias is below range / 2^64.
            ((r as u128 * range as u128) >> 64) as usize
        });
        Ok(self.fill(starts, batch, block))
    }

    /// Number of non-overlapping windows of `block + 1` tokens (consecutive windows share one
    /// token: the last target of one is the first input of the next).
    pub fn num_windows(&self, block: usize) -> usize {
        if block == 0 || self.len < block + 1 {
            0
        } else {
            (self.len - 1) / block
        }
    }

    /// Deterministic evaluation batches: batch number `index` of consecutive non-overlapping
    /// windows (wrapping). Batches `0..ceil(num_windows / batch)` cover every window once.
    pub fn sequential_batch(&self, index: u64, batch: usize, block: usize) -> Result<(Vec<i64>, Vec<i64>), DataError> {
        self.check_window(batch, block)?;
        let windows = self.num_windows(block) as u128;
        let first = index as u128 * batch as u128;
        let starts = (0..batch as u128).map(move |r| ((first + r) % windows) as usize * block);
        Ok(self.fill(starts, batch, block))
    }
}

fn read_dtype(dir: &Path) -> Result<Dtype, DataError> {
    let meta = dir.join("meta.json");
    let text = match std::fs::read_to_string(&meta) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Dtype::U16),
        Err(e) => return Err(DataError::io(&meta, e)),
    };
    let bad = |message: String| DataError::Dataset { path: meta.clone(), message };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    match value.get("dtype") {
        // A meta.json without dtype (nanoGPT's char-level meta.pkl has no JSON twin) means uint16.
        None => Ok(Dtype::U16),
        Some(serde_json::Value::String(s)) => {
            Dtype::from_name(s).ok_or_else(|| bad(format!("unsupported dtype \"{s}\" (expected uint16 or uint32)")))
        }
        Some(other) => Err(bad(format!("dtype is {other}, expected a string"))),
    }
}
