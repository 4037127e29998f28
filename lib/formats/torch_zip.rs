//! Reading `torch.save` files without Python: the zip container. A torch file is a zip archive
//! (entries stored, never compressed) holding `<prefix>/data.pkl`, a pickle of the saved object
//! (decoded by [`torch_pickle`](super::torch_pickle)), and one `<prefix>/data/<key>` entry per
//! storage. Tensors stay references into the memory-mapped archive ([`TensorRef`]), so opening
//! a multi-GB optimizer file costs only its pickle, and only the storages actually used are ever
//! paged in. Every entry read is checked against the CRC-32 the zip records for it.

use crate::formats::torch_pickle::{parse_pickle, TensorRef, Value};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TorchError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a readable torch zip file: {what}")]
    Zip { path: PathBuf, what: String },
    #[error("{path}: corrupted pickle (data.pkl) at byte {pos}: {what}")]
    Pickle { path: PathBuf, pos: usize, what: String },
    #[error("{path}: unsupported torch file: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: storage {key} is corrupted: {what}")]
    Storage { path: PathBuf, key: String, what: String },
    #[error("{path}: zip entry {entry} is corrupted: {what}")]
    Entry { path: PathBuf, entry: String, what: String },
}

/// One entry of the archive, where its bytes lie in the mapped file.
#[derive(Debug, Clone, Copy)]
struct Entry {
    data_start: u64,
    size: u64,
    crc32: u32,
}

/// The bytes of an archive: the file mapped ([`TorchFile::open`]) or a buffer
/// ([`TorchFile::from_bytes`]).
enum Data {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Data::Mapped(m) => m,
            Data::Owned(v) => v,
        }
    }
}

/// A memory-mapped `torch.save` archive and its decoded pickle.
pub struct TorchFile {
    path: PathBuf,
    data: Data,
    entries: HashMap<String, Entry>,
    prefix: String,
    root: Value,
}

/// Format versions of torch's zip serialization we know (torch 1.6 through 2.x write 1 to 3).
const KNOWN_VERSIONS: &[&str] = &["1", "2", "3"];

impl TorchFile {
    pub fn open(path: &Path) -> Result<TorchFile, TorchError> {
        let io = |e| TorchError::Io { path: path.to_path_buf(), source: e };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; checkpoints are not modified while being converted.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Data::Mapped(map))
    }

    /// The archive held in `bytes`, as if read from `path` (which only names it in errors).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<TorchFile, TorchError> {
        Self::parse(path, Data::Owned(bytes))
    }

    fn parse(path: &Path, data: Data) -> Result<TorchFile, TorchError> {
        let entries =
            read_central_directory(&data).map_err(|what| TorchError::Zip { path: path.to_path_buf(), what })?;
        let pkl = entries
            .keys()
            .filter(|k| k.ends_with("data.pkl") && k.matches('/').count() <= 1)
            .min_by_key(|k| k.len())
            .cloned()
            .ok_or_else(|| TorchError::Unsupported {
                path: path.to_path_buf(),
                what: "no data.pkl entry (a legacy pre-1.6 torch file, or not a torch file)".into(),
            })?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let mut tf = TorchFile { path: path.to_path_buf(), data, entries, prefix, root: Value::None };
        for name in [".data/version", "version"] {
            if let Some(bytes) = tf.entry(&format!("{}{}", tf.prefix, name))? {
                let v: String = String::from_utf8_lossy(bytes).trim().chars().take(40).collect();
                if !KNOWN_VERSIONS.contains(&v.as_str()) {
                    return Err(tf.unsupported(format!("unknown serialization format version {v:?}")));
                }
            }
        }
        if let Some(bo) = tf.entry(&format!("{}byteorder", tf.prefix))? {
            if bo != b"little" {
                let bo: String = String::from_utf8_lossy(bo).chars().take(40).collect();
                return Err(tf.unsupported(format!("byte order {bo:?}")));
            }
        }
        let data = tf.entry(&pkl)?.expect("entry listed");
        let root =
            parse_pickle(data).map_err(|(pos, what)| TorchError::Pickle { path: path.to_path_buf(), pos, what })?;
        tf.root = root;
        Ok(tf)
    }

    /// The name torch gave the archive when it wrote it: the entries' common prefix, which
    /// `torch.save(obj, path)` takes from the file name (`archive` when it wrote to a stream).
    pub fn archive_name(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved object.
    pub fn root(&self) -> &Value {
        &self.root
    }

    fn unsupported(&self, what: String) -> TorchError {
        TorchError::Unsupported { path: self.path.clone(), what }
    }

    /// The whole of entry `name`, checked against the CRC-32 the zip recorded for it: every
    /// entry other than the storages is read through here. None if the archive has no such entry.
    fn entry(&self, name: &str) -> Result<Option<&[u8]>, TorchError> {
        let Some(e) = self.entries.get(name) else { return Ok(None) };
        let got = self.crc32(e);
        if got != e.crc32 {
            return Err(TorchError::Entry {
                path: self.path.clone(),
                entry: name.to_string(),
                what: crc_mismatch(got, e.crc32),
            });
        }
        Ok(Some(self.bytes(e.data_start, e.size)))
    }

    /// The CRC-32 of an entry's bytes as they are now. Chunks are hashed in parallel (rayon's
    /// current pool) and combined in order: a GPT-2 XL rank's fp32 partition is one 1.5 GB
    /// storage. Releases the pages it touched.
    fn crc32(&self, e: &Entry) -> u32 {
        const CHUNK: u64 = 4 << 20;
        let parts: Vec<crc32fast::Hasher> = (0..e.size.div_ceil(CHUNK))
            .into_par_iter()
            .map(|k| {
                let (off, n) = (k * CHUNK, CHUNK.min(e.size - k * CHUNK));
                let mut h = crc32fast::Hasher::new();
                h.update(self.bytes(e.data_start + off, n));
                self.release(e.data_start + off, n);
                h
            })
            .collect();
        let mut h = crc32fast::Hasher::new();
        for part in &parts {
            h.combine(part);
        }
        h.finalize()
    }

    /// Where a contiguous tensor's bytes lie in this file: (absolute byte offset, byte length).
    /// Checks the view against its storage entry, so a truncated or inconsistent file is an
    /// error here rather than a wrong read later.
    pub fn tensor_span(&self, t: &TensorRef) -> Result<(u64, u64), TorchError> {
        let storage_err =
            |what: String| TorchError::Storage { path: self.path.clone(), key: t.storage_key.clone(), what };
        if !t.is_contiguous() {
            return Err(storage_err(format!("non-contiguous view (shape {:?}, stride {:?})", t.shape, t.stride)));
        }
        let name = format!("{}data/{}", self.prefix, t.storage_key);
        let e = self.entries.get(&name).ok_or_else(|| storage_err("its zip entry is missing".into()))?;
        let es = t.dtype.size() as u64;
        let start = t.offset.checked_mul(es).ok_or_else(|| storage_err("offset overflows".into()))?;
        let len = t.numel().checked_mul(es).ok_or_else(|| storage_err("size overflows".into()))?;
        if start.checked_add(len).is_none_or(|end| end > e.size) {
            return Err(storage_err(format!(
                "view of {len} bytes at byte {start} exceeds the entry's {} bytes",
                e.size
            )));
        }
        Ok((e.data_start + start, len))
    }

    /// The bytes of a span from [`tensor_span`](Self::tensor_span).
    pub fn bytes(&self, start: u64, len: u64) -> &[u8] {
        &self.data[start as usize..(start + len) as usize]
    }

    /// Checks the CRC-32 the zip recorded for a tensor's whole storage entry. Catches bit rot and
    /// torn copies that leave sizes intact. Storages are read in parts (a tensor's span, 4 MiB at a
    /// time), so they are checked here, once, rather than on every read as `entry` does.
    /// Releases the pages it touched.
    pub fn verify_storage(&self, t: &TensorRef) -> Result<(), TorchError> {
        let name = format!("{}data/{}", self.prefix, t.storage_key);
        let storage_err =
            |what: String| TorchError::Storage { path: self.path.clone(), key: t.storage_key.clone(), what };
        let e = self.entries.get(&name).ok_or_else(|| storage_err("its zip entry is missing".into()))?;
        let got = self.crc32(e);
        if got != e.crc32 {
            return Err(storage_err(crc_mismatch(got, e.crc32)));
        }
        Ok(())
    }

    /// Drops the mapped pages of a byte range from this process's resident set (the page cache
    /// keeps them): see [`crate::fsutil::release_mapped`].
    pub fn release(&self, start: u64, len: u64) {
        if let Data::Mapped(map) = &self.data {
            crate::fsutil::release_mapped(map, start as usize, len as usize);
        }
    }
}

fn crc_mismatch(got: u32, recorded: u32) -> String {
    format!("CRC-32 {got:08x} does not match the recorded {recorded:08x}")
}

/// `n` bytes at `at`, or an error for a range past the end (or past any address).
fn slice_at(b: &[u8], at: u64, n: usize) -> Result<&[u8], String> {
    usize::try_from(at)
        .ok()
        .and_then(|at| b.get(at..at.checked_add(n)?))
        .ok_or_else(|| format!("a {n}-byte field at byte {at} lies past the end of the file (truncated?)"))
}

fn u16_at(b: &[u8], at: u64) -> Result<u16, String> {
    slice_at(b, at, 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

/// What the zip crate reports about a directory it cannot read, in this module's words.
fn directory_error(e: zip::result::ZipError) -> String {
    match e {
        zip::result::ZipError::InvalidArchive("Could not find central directory end") => {
            "no end-of-central-directory record (truncated or not a zip file)".into()
        }
        zip::result::ZipError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the central directory runs past the end of the file (truncated?)".into()
        }
        e => e.to_string(),
    }
}

/// Reads the zip's central directory (zip64 included: optimizer files of large models exceed
/// 4 GiB) through the zip crate, into entry name -> where its bytes lie in `b`: torch stores
/// entries uncompressed, so every storage is read in place from the memory map. Every entry is
/// checked against the file, so a damaged directory is an error, never a read elsewhere: stored,
/// sizes that agree, a local header that names it as the directory does, its bytes inside the
/// file, and no second entry of its name.
fn read_central_directory(b: &[u8]) -> Result<HashMap<String, Entry>, String> {
    let len = b.len() as u64;
    if len < 22 {
        return Err(format!("file is {len} bytes, too short for a zip archive (truncated?)"));
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(b)).map_err(directory_error)?;
    let mut entries = HashMap::new();
    for i in 0..zip.len() {
        // The crate reads the entry's local header here (for where its data starts); the entry
        // has no name to report until that succeeds.
        let e = zip.by_index_raw(i).map_err(|e| match e {
            zip::result::ZipError::InvalidArchive("Invalid local file header") | zip::result::ZipError::Io(_) => {
                format!("entry {i} of the central directory: no local header where it says (truncated?)")
            }
            e => directory_error(e),
        })?;
        let name = String::from_utf8_lossy(e.name_raw()).into_owned();
        let (local, size, crc32) = (e.header_start(), e.compressed_size(), e.crc32());
        if e.compression() != zip::CompressionMethod::Stored {
            let method = u16_at(b, e.central_header_start() + 10)?;
            return Err(format!("entry {name} is compressed (method {method}); torch stores entries uncompressed"));
        }
        if size != e.size() {
            return Err(format!("entry {name}: stored sizes disagree ({size} vs {})", e.size()));
        }
        // Names are the only link from the directory to the bytes that each CRC-32 covers.
        let local_name = slice_at(b, local + 30, u16_at(b, local + 26)? as usize)?;
        if local_name != e.name_raw() {
            let local_name = String::from_utf8_lossy(local_name);
            return Err(format!("entry {name}: its local header at byte {local} names it {local_name}"));
        }
        let data_start = e.data_start();
        if data_start.checked_add(size).is_none_or(|end| end > len) {
            return Err(format!("entry {name}: data runs past the end of the file (truncated?)"));
        }
        // A second entry of the same name would make one storage's bytes stand in for another's
        // (each with its own valid CRC).
        if entries.insert(name.clone(), Entry { data_start, size, crc32 }).is_some() {
            return Err(format!("entry {name} appears twice in the central directory"));
        }
    }
    Ok(entries)
}
