//! Data: tokenization (`tokenize`; Hugging Face tokenizer.json files in `hf_tokenizer`), reading corpora (`corpus`), the `prepare` pipeline that
//! writes nanoGPT-compatible token files (`prepare`), and the memory-mapped dataset that
//! training reads them with (`dataset`). docs/prepare.md is the user guide.

mod charclass;
pub mod corpus;
pub mod dataset;
pub mod hf_tokenizer;
pub mod prepare;
pub mod tokenize;

pub use dataset::TokenDataset;
pub use hf_tokenizer::{Boundary, BoundaryChoice, HfTokenizer, Side};
pub use prepare::{prepare, PrepareArgs, PrepareSummary};
pub use tokenize::{Encoding, Tokenizer};

use std::path::PathBuf;

/// Element type of a token file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    /// numpy's name, as written in meta.json.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U16 => "uint16",
            Dtype::U32 => "uint32",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }

    /// Token ids as the file stores them: little-endian of this width (ids fit: the encoding's
    /// vocabulary chose the dtype).
    pub fn encode(self, ids: &[u32]) -> Vec<u8> {
        match self {
            Dtype::U16 => ids.iter().flat_map(|&id| (id as u16).to_le_bytes()).collect(),
            Dtype::U32 => ids.iter().flat_map(|&id| id.to_le_bytes()).collect(),
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "uint16" => Some(Dtype::U16),
            "uint32" => Some(Dtype::U32),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Fs(#[from] crate::fsutil::FsError),
    #[error("--tokenizer {0}")]
    Hub(#[from] crate::hub::HubError),
    #[error("{0}: no such file or directory")]
    NotFound(PathBuf),
    #[error("{0}: empty input ({1})")]
    EmptyInput(PathBuf, &'static str),
    #[error("{0}: {1}")]
    BadInput(PathBuf, String),
    #[error(
        "{path}: invalid UTF-8 at byte offset {offset}{detail} (pass --lossy to replace invalid bytes with U+FFFD)"
    )]
    InvalidUtf8 { path: PathBuf, offset: u64, detail: String },
    #[error("{path}: corrupt or truncated zstd stream: {message}")]
    Zstd { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Jsonl { path: PathBuf, line: u64, message: String },
    #[error("{0}")]
    Split(String),
    #[error("invalid argument: {0}")]
    Args(String),
    #[error("tokenizer: {0}")]
    Encoding(String),
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: crate::fsutil::shown(&path.into()), source }
    }
}
