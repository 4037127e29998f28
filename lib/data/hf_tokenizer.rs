//! Hugging Face tokenizer.json files (`prepare --tokenizer`), run by the `tokenizers` crate: the
//! same code the Python library runs, so ids are the library's.
//!
//! Documents are encoded as `encode(text, add_special_tokens=False)` with
//! `encode_special_tokens = True`: text that spells a special token (`<|end_of_text|>`, `<bos>`)
//! is plain text, as `encode_ordinary` treats GPT-2's, so only the document boundary that
//! `prepare` writes is a special id. Truncation and padding stored in the file are switched off.
//!
//! The boundary follows the tokenizer's lineage (`Boundary::auto`): byte-level BPE (the GPT-2
//! line: Llama 3, Qwen, GPT-NeoX) ends each document with its end-of-text token, as those models
//! were trained; anything else (the SentencePiece line: Gemma, Llama 2, Mistral) starts each
//! document with the beginning-of-sequence token its post-processor adds.

use super::DataError;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Where the boundary token goes relative to each document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Appended after each document (end-of-text).
    After,
    /// Prepended before each document (beginning-of-sequence).
    Before,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::After => "after",
            Side::Before => "before",
        }
    }
}

/// The token written at each document's edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boundary {
    pub side: Side,
    pub id: u32,
    /// The token's text (`<|endoftext|>`, `<bos>`).
    pub text: String,
}

/// `prepare --boundary`: the tokenizer's own convention, or a side forced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BoundaryChoice {
    /// End-of-text after each document for byte-level BPE, else the post-processor's BOS before it.
    #[default]
    Auto,
    /// The end-of-text token after each document.
    Eos,
    /// The beginning-of-sequence token before each document.
    Bos,
}

/// End-of-text tokens, by the names the model families give them, in the order they are tried.
const EOS_NAMES: [&str; 4] = ["<|end_of_text|>", "<|endoftext|>", "<eos>", "</s>"];
/// Beginning-of-sequence tokens, tried when the post-processor adds none.
const BOS_NAMES: [&str; 3] = ["<bos>", "<s>", "<|begin_of_text|>"];

/// Split patterns under which a space after a non-space character is a safe chunk cut (see
/// `HfTokenizer::cuts_at_spaces`): Llama 3's, and GPT-2's (ByteLevel's own regex).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct HfTokenizer {
    /// The tokenizer.json read.
    path: PathBuf,
    sha256: String,
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    /// A ByteLevel pre-tokenizer or decoder: the GPT-2 line.
    byte_level: bool,
    /// The special token the post-processor puts before a single sequence.
    template_bos: Option<String>,
    cuts_at_spaces: bool,
}

impl HfTokenizer {
    /// Reads `path`: a tokenizer.json, or a directory holding one.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let path = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if !path.exists() {
            return Err(DataError::NotFound(path));
        }
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        let bad = |message: String| DataError::BadInput(crate::fsutil::shown(&path), message);
        let spec: Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a tokenizer.json (invalid JSON: {e})")))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| bad(format!("not a tokenizer.json the tokenizers library reads: {e}")))?;
        inner.with_truncation(None).map_err(|e| bad(e.to_string()))?;
        inner.with_padding(None);
        inner.set_encode_special_tokens(true);
        let vocab_size = match inner.get_vocab(true).values().max() {
            Some(&max) => max as usize + 1,
            None => return Err(bad("the vocabulary is empty".into())),
        };
        let sha256 = crate::fsutil::sha256_file(&path)?;
        Ok(HfTokenizer {
            byte_level: has_type(&spec["pre_tokenizer"], "ByteLevel") || has_type(&spec["decoder"], "ByteLevel"),
            template_bos: template_bos(&spec["post_processor"]),
            cuts_at_spaces: cuts_at_spaces(&spec),
            path,
            sha256,
            inner,
            vocab_size,
        })
    }

    /// The document boundary `choice` asks for. `token` names the token instead of the defaults
    /// (`EOS_NAMES` after; the post-processor's BOS, then `BOS_NAMES`, before).
    pub fn boundary(&self, choice: BoundaryChoice, token: Option<&str>) -> Result<Boundary, DataError> {
        let bad = |message: String| DataError::BadInput(crate::fsutil::shown(&self.path), message);
        let side = match choice {
            BoundaryChoice::Auto if self.byte_level => Side::After,
            BoundaryChoice::Auto => Side::Before,
            BoundaryChoice::Eos => Side::After,
            BoundaryChoice::Bos => Side::Before,
        };
        let added = self.inner.get_added_tokens_decoder();
        let special = |name: &&&str| added.values().any(|t| t.special && t.content == **name);
        let text = match (token, side) {
            (Some(t), _) => Some(t.to_string()),
            (None, Side::After) => EOS_NAMES.iter().find(special).map(|n| n.to_string()),
            (None, Side::Before) => {
                self.template_bos.clone().or_else(|| BOS_NAMES.iter().find(special).map(|n| n.to_string()))
            }
        };
        let Some(text) = text else {
            let (what, names) = match side {
                Side::After => ("an end-of-text token", EOS_NAMES.join(", ")),
                Side::Before => ("a beginning-of-sequence token (none in the post-processor)", BOS_NAMES.join(", ")),
            };
            return Err(bad(format!(
                "no special token among {names}: a document boundary needs {what}; name it with --boundary-token"
            )));
        };
        let Some(id) = self.inner.token_to_id(&text) else {
            return Err(bad(format!("the boundary token {text:?} is not in the vocabulary")));
        };
        Ok(Boundary { side, id, text })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// One more than the largest id, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Appends the ids of `text` (no special tokens added, special-token text as plain text).
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), DataError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| DataError::Encoding(format!("{}: {e}", self.path.display())))?;
        out.extend_from_slice(encoding.get_ids());
        Ok(())
    }

    /// A prompt's ids as transformers' `tokenizer(prompt)` gives them: with the post-processor's
    /// special tokens (Llama's and Gemma's BOS).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| DataError::Encoding(format!("{}: {e}", self.path.display())))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; special tokens left out when `skip_special`, else as their text.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, DataError> {
        self.inner.decode(ids, skip_special).map_err(|e| DataError::Encoding(format!("{}: {e}", self.path.display())))
    }

    /// Whether a space after a non-space character is a cut that leaves the tokens unchanged.
    /// It is for byte-level BPE split by GPT-2's or Llama 3's pattern with no normalizer: no
    /// piece of those patterns holds a non-space character followed by a space (a space only
    /// ever leads a piece, or sits in a run of whitespace), nothing looks behind, the only
    /// look-ahead concerns whitespace, and the model sees one piece at a time. A non-special
    /// added token could span the cut (special ones are plain text here), so none may exist.
    /// Any other tokenizer is never cut: each document is encoded whole.
    pub fn cuts_at_spaces(&self) -> bool {
        self.cuts_at_spaces
    }
}

fn cuts_at_spaces(spec: &Value) -> bool {
    let plain_added = spec["added_tokens"].as_array().is_some_and(|a| a.iter().any(|t| t["special"] != true));
    if !spec["normalizer"].is_null() || plain_added {
        return false;
    }
    let byte_level =
        |p: &Value, regex: bool| p["type"] == "ByteLevel" && p["add_prefix_space"] == false && p["use_regex"] == regex;
    let pre = &spec["pre_tokenizer"];
    match pre["type"].as_str() {
        Some("ByteLevel") => byte_level(pre, true),
        Some("Sequence") => match pre["pretokenizers"].as_array().map(Vec::as_slice) {
            Some([split, bl]) => {
                split["type"] == "Split"
                    && split["pattern"]["Regex"] == LLAMA3_PATTERN
                    && split["behavior"] == "Isolated"
                    && split["invert"] == false
                    && byte_level(bl, false)
            }
            _ => false,
        },
        _ => false,
    }
}

/// Whether `v` is a component of `kind`, or a Sequence holding one.
fn has_type(v: &Value, kind: &str) -> bool {
    if v["type"] == kind {
        return true;
    }
    ["pretokenizers", "decoders", "processors"]
        .iter()
        .filter_map(|k| v[k].as_array())
        .any(|parts| parts.iter().any(|p| has_type(p, kind)))
}

/// The special token the post-processor's single-sequence template puts before `$A` (Gemma's
/// `<bos> $A`), looked for in a Sequence of processors too.
fn template_bos(pp: &Value) -> Option<String> {
    if pp["type"] == "TemplateProcessing" {
        let first = pp["single"].as_array()?.first()?;
        return first["SpecialToken"]["id"].as_str().map(str::to_string);
    }
    pp["processors"].as_array()?.iter().find_map(template_bos)
}
