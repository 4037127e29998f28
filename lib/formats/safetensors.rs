//! Writing safetensors: the one encoder of the header, and the one writer every zerokit output
//! goes through (checkpoint rank files and model.safetensors, Hugging Face directories,
//! zero-to-fp32's consolidated files). Reading is the safetensors crate's.
//!
//! The header is computed from names, dtypes and shapes alone, so every tensor's place in the
//! file is known before any is read: a [`Writer`] either appends the tensors in order (hashing
//! the file as it goes, for the manifests' [`FileEntry`]) or writes them at their offsets from
//! several threads at once (zero-to-fp32), never holding a whole model. Files appear under their
//! final name only when complete (`fsutil::AtomicFile`). Also the Hugging Face sharding
//! convention (`model-0000K-of-0000N.safetensors` + `model.safetensors.index.json`).

use crate::formats::dtype::{DType, DTypeError};
use crate::fsutil::{self, AtomicFile, FsError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: write failed: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: tensor {name}: {source}")]
    Tensor { path: PathBuf, name: String, source: tch::TchError },
    #[error("{path}: tensor {name}: {source}")]
    Dtype { path: PathBuf, name: String, source: DTypeError },
    #[error("{path}: {written} bytes written where the header announces {size}")]
    Size { path: PathBuf, written: u64, size: u64 },
}

impl SafetensorsError {
    /// A failed write to `path`, named as the user knows it (see [`fsutil::shown`]).
    pub fn write(path: &Path, source: io::Error) -> Self {
        SafetensorsError::Write { path: fsutil::shown(path), source }
    }
}

/// Size and sha256 of a written file, as checkpoint manifests record it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// What a tensor in the output will be.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// The header (length prefix included) for `tensors` laid out back to back in the given order.
pub fn header_bytes(tensors: &[TensorSpec], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings serialize"));
    }
    let mut off = 0u64;
    for t in tensors {
        let n = t.nbytes();
        map.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [off, off + n] }),
        );
        off += n;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).expect("json serializes");
    // Pad so the data starts 8-byte aligned, as the reference implementation does; readers
    // that map the file can then view tensors in place.
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// A safetensors file being written under a temporary name: the header is written by
/// [`create`](Self::create), the tensors' bytes follow, and [`commit`](Self::commit) (or
/// [`finish`](Self::finish)) puts the file under its final name.
pub struct Writer {
    file: AtomicFile,
    /// Where each tensor's bytes start in the file, in the order given to `create`.
    starts: Vec<u64>,
    size: u64,
    /// Bytes appended so far (header included) and their sha256.
    written: u64,
    sha: Sha256,
}

impl Writer {
    /// Creates the file for `tensors`, laid out back to back in this order, and writes its header.
    pub fn create(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Writer, SafetensorsError> {
        let header = header_bytes(tensors, metadata);
        let mut starts = Vec::with_capacity(tensors.len());
        let mut at = header.len() as u64;
        for t in tensors {
            starts.push(at);
            at += t.nbytes();
        }
        let mut w = Writer { file: AtomicFile::create(path)?, starts, size: at, written: 0, sha: Sha256::new() };
        w.append(&header)?;
        Ok(w)
    }

    /// The file offset at which tensor `i` (in `create`'s order) starts.
    pub fn start(&self, i: usize) -> u64 {
        self.starts[i]
    }

    /// Writes `bytes` after everything appended so far, hashing them.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), SafetensorsError> {
        self.file.writer().write_all(bytes).map_err(|e| SafetensorsError::write(self.file.path(), e))?;
        self.sha.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// The file, for positional writes of tensor bytes at their [`start`](Self::start) from
    /// several threads. A file written this way is committed with [`commit`](Self::commit): its
    /// bytes were not hashed in order.
    pub fn positional(&mut self) -> Result<&File, SafetensorsError> {
        let path = self.file.path().to_path_buf();
        self.file.positional().map_err(|e| SafetensorsError::write(&path, e))
    }

    /// Flushes, syncs and renames the file onto its final name.
    pub fn commit(self) -> Result<PathBuf, SafetensorsError> {
        let path = self.file.path().to_path_buf();
        self.file.commit().map_err(|e| match e {
            FsError::Io { source, .. } => SafetensorsError::write(&path, source),
            other => other.into(),
        })
    }

    /// Commits a file written entirely by [`append`](Self::append), and returns its size and
    /// sha256; every byte the header announces must have been appended.
    pub fn finish(self) -> Result<FileEntry, SafetensorsError> {
        if self.written != self.size {
            return Err(SafetensorsError::Size {
                path: fsutil::shown(self.file.path()),
                written: self.written,
                size: self.size,
            });
        }
        let entry = FileEntry { bytes: self.size, sha256: hex::encode(self.sha.clone().finalize()) };
        self.commit()?;
        Ok(entry)
    }
}

/// Writes `tensors` as one safetensors file at `path` (atomically), in the given order, each
/// stored as `dtype` (None: its own). Device tensors are copied to the host and converted in
/// chunks, so host memory stays bounded whatever the model; `progress` counts the bytes written.
/// Returns the file's size and sha256.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    dtype: Option<DType>,
    metadata: &BTreeMap<String, String>,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<FileEntry, SafetensorsError> {
    let tensor_err =
        |name: &str, source| SafetensorsError::Tensor { path: fsutil::shown(path), name: name.to_string(), source };
    let mut specs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let stored = match dtype {
            Some(d) => d,
            None => DType::from_kind(t.kind()).map_err(|source| SafetensorsError::Dtype {
                path: fsutil::shown(path),
                name: name.clone(),
                source,
            })?,
        };
        let shape = t.size().iter().map(|&d| d as usize).collect();
        specs.push(TensorSpec { name: name.clone(), dtype: stored, shape });
    }
    let mut w = Writer::create(path, &specs, metadata)?;
    const CHUNK: i64 = 16 << 20; // elements per device-to-host copy
    let mut buf = Vec::new();
    for ((name, t), spec) in tensors.iter().zip(&specs) {
        let kind: Kind = spec.dtype.kind();
        let flat = t.detach().f_contiguous().and_then(|t| t.f_view(-1)).map_err(|e| tensor_err(name, e))?;
        let numel = flat.numel() as i64;
        let mut start = 0;
        while start < numel {
            let len = CHUNK.min(numel - start);
            let part = flat
                .f_narrow(0, start, len)
                .and_then(|p| p.f_to_device(Device::Cpu))
                .and_then(|p| p.f_to_kind(kind))
                .map_err(|e| tensor_err(name, e))?;
            buf.resize(len as usize * spec.dtype.size(), 0);
            part.f_copy_data_u8(&mut buf, len as usize).map_err(|e| tensor_err(name, e))?;
            w.append(&buf)?;
            if let Some(pb) = progress {
                pb.inc(buf.len() as u64);
            }
            start += len;
        }
    }
    w.finish()
}

/// Splits tensors, in order, into shards of at most `max_bytes` each (a tensor larger than
/// that gets a shard of its own), as transformers does. Returns index lists.
pub fn plan_shards(tensors: &[TensorSpec], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut cur: Vec<usize> = vec![];
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes();
        if !cur.is_empty() && size + n > max_bytes {
            shards.push(std::mem::take(&mut cur));
            size = 0;
        }
        cur.push(i);
        size += n;
    }
    if !cur.is_empty() || shards.is_empty() {
        shards.push(cur);
    }
    shards
}

/// `model.safetensors` for one shard, `model-0000K-of-0000N.safetensors` otherwise (K from 1).
pub fn shard_file_name(k: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
    }
}

/// The `model.safetensors.index.json` contents.
pub fn index_json(weight_map: &BTreeMap<String, String>, total_size: u64) -> serde_json::Value {
    serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
    }

    #[test]
    fn header_then_tensors_in_order_reads_back_with_the_safetensors_crate() {
        let specs = vec![spec("b", DType::F32, &[2, 3]), spec("a", DType::BF16, &[3]), spec("i", DType::I64, &[1])];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let f: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut buf = header_bytes(&specs, &meta);
        buf.extend_from_slice(&f);
        buf.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        buf.extend_from_slice(&7i64.to_le_bytes());
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &f[..]);
        assert_eq!(st.tensor("b").unwrap().shape(), &[2, 3]);
        assert_eq!(st.tensor("a").unwrap().data(), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(st.tensor("i").unwrap().dtype(), safetensors::Dtype::I64);
        assert_eq!(st.tensor("i").unwrap().data(), &7i64.to_le_bytes());
        let (_, m) = safetensors::SafeTensors::read_metadata(&buf).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["format"], "pt");
        assert_eq!((u64::from_le_bytes(buf[..8].try_into().unwrap()) + 8) % 8, 0);
    }

    #[test]
    fn tensors_are_written_in_order_converted_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::from_slice(&[1.0f32, -2.5, 3.0]);
        let b = Tensor::from_slice(&[7i64, 8]);
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let e = write_tensors(&path, &[("z".into(), a.shallow_clone()), ("b".into(), b)], None, &meta, None).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(e, FileEntry { bytes: bytes.len() as u64, sha256: hex::encode(Sha256::digest(&bytes)) });
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("z").unwrap().dtype(), safetensors::Dtype::F32);
        assert_eq!(st.tensor("b").unwrap().data(), [7i64, 8].map(i64::to_le_bytes).concat());
        // The given order, not the names' order.
        assert!(st.tensor("z").unwrap().data().as_ptr() < st.tensor("b").unwrap().data().as_ptr());
        write_tensors(&path, &[("z".into(), a)], Some(DType::BF16), &meta, None).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("z").unwrap().data(), [0x3f80u16, 0xc020, 0x4040].map(u16::to_le_bytes).concat());
    }

    #[test]
    fn shards_split_greedily_and_big_tensors_stand_alone() {
        let specs: Vec<_> = [10, 10, 30, 5, 5].iter().map(|&n| spec("t", DType::U8, &[n])).collect();
        assert_eq!(plan_shards(&specs, 20), vec![vec![0, 1], vec![2], vec![3, 4]]);
        assert_eq!(plan_shards(&specs, 1000), vec![vec![0, 1, 2, 3, 4]]);
        assert_eq!(plan_shards(&[], 10), vec![Vec::<usize>::new()]);
        assert_eq!(shard_file_name(1, 3), "model-00002-of-00003.safetensors");
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
    }
}
