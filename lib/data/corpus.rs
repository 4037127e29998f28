//! Reading a corpus: finding the input files, streaming them (zstd decompressed on the fly,
//! hashed as read), and turning bytes into validated text in pieces of bounded size.
//!
//! Plain-text files are one document each; JSONL files hold one document a line, in a chosen
//! string field. A `.zst` suffix means zstd-compressed, the format is read from the name under
//! it (`.jsonl`/`.ndjson` is JSONL, anything else plain text).

use super::tokenize::Tokenizer;
use super::DataError;
use crate::fsutil::BackgroundSha256;
use indicatif::ProgressBar;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Jsonl,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Jsonl => "jsonl",
        }
    }
}

/// One input file.
#[derive(Clone, Debug)]
pub struct Input {
    pub path: PathBuf,
    pub format: Format,
    pub zstd: bool,
    /// Size on disk (compressed size for `.zst`).
    pub bytes: u64,
}

impl Input {
    fn from_path(path: PathBuf, bytes: u64) -> Self {
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        let (zstd, inner) = match name.strip_suffix(".zst") {
            Some(inner) => (true, inner.to_string()),
            None => (false, name),
        };
        let format = if inner.ends_with(".jsonl") || inner.ends_with(".ndjson") { Format::Jsonl } else { Format::Text };
        Input { path, format, zstd, bytes }
    }
}

/// Expands files and directories into the list of input files, in order: arguments as given,
/// each directory's files (recursively, hidden names skipped) sorted by path. Empty files,
/// dangling links and inputs that are not regular files are rejected here, before any work.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<Input>, DataError> {
    let mut inputs = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => match fs::read_link(path) {
                Ok(to) => dangling(path, &to),
                Err(_) => DataError::NotFound(path.clone()),
            },
            _ => DataError::io(path, e),
        })?;
        if meta.is_dir() {
            let mut files = Vec::new();
            walk(path, &mut files)?;
            if files.is_empty() {
                return Err(DataError::EmptyInput(path.clone(), "directory holds no files"));
            }
            files.sort();
            for f in files {
                let len = fs::metadata(&f).map_err(|e| DataError::io(&f, e))?.len();
                inputs.push(Input::from_path(f, len));
            }
        } else if meta.is_file() {
            inputs.push(Input::from_path(path.clone(), meta.len()));
        } else {
            // A pipe (`prepare <(cmd)`), a socket or a device: its size is unknown (0), and a
            // single text input is read twice (once to count, once to split).
            return Err(DataError::BadInput(
                path.clone(),
                "not a regular file (a pipe or device?): prepare needs files it can size and read twice; \
                 write the stream to a file first (.zst files are read as they are)"
                    .into(),
            ));
        }
    }
    for input in &inputs {
        if input.bytes == 0 {
            return Err(DataError::EmptyInput(input.path.clone(), "0 bytes"));
        }
        // Unreadable files fail now rather than after hours of work on the ones before them.
        File::open(&input.path).map_err(|e| DataError::io(&input.path, e))?;
    }
    Ok(inputs)
}

fn dangling(link: &Path, to: &Path) -> DataError {
    DataError::BadInput(link.to_path_buf(), format!("a symbolic link to {}, which does not exist", to.display()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for entry in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| DataError::io(&path, e))?;
        if kind.is_dir() {
            walk(&path, out)?;
        } else if kind.is_file() {
            out.push(path);
        } else if kind.is_symlink() {
            // Links to files are followed; links to directories are not (no cycles), and a
            // dangling link is an error: a corpus silently missing a file is a wrong corpus.
            match fs::metadata(&path) {
                Ok(m) if m.is_file() => out.push(path),
                Ok(m) if m.is_dir() => {
                    tracing::warn!("{}: a symbolic link to a directory, not followed", path.display())
                }
                Ok(_) => tracing::warn!("{}: a link to something that is not a regular file, skipped", path.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(dangling(&path, &fs::read_link(&path).unwrap_or_default()))
                }
                Err(e) => return Err(DataError::io(&path, e)),
            }
        } else {
            tracing::warn!("{}: not a regular file (a pipe, socket or device), skipped", path.display());
        }
    }
    Ok(())
}

/// What was read from one file: its sha256 and byte count, and whether the file itself (not a
/// decoder above it) failed, which tells a read error from a corrupt zstd stream.
pub struct Tally {
    sha: BackgroundSha256,
    pub bytes: u64,
    file_failed: bool,
}

struct TallyReader {
    file: File,
    tally: Arc<Mutex<Tally>>,
    progress: ProgressBar,
}

impl Read for TallyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut t = self.tally.lock().expect("tally lock is never poisoned");
        match self.file.read(buf) {
            Ok(n) => {
                t.sha.update(buf[..n].to_vec());
                t.bytes += n as u64;
                self.progress.inc(n as u64);
                Ok(n)
            }
            Err(e) => {
                t.file_failed = true;
                Err(e)
            }
        }
    }
}

/// An open input: a byte stream of its content (decompressed) and the tally of its file.
pub struct Stream {
    pub input: Input,
    reader: Box<dyn Read + Send>,
    pub tally: Arc<Mutex<Tally>>,
    /// Bytes of content delivered so far (decompressed), for error offsets.
    pub offset: u64,
}

impl Stream {
    pub fn open(input: &Input, progress: &ProgressBar) -> Result<Self, DataError> {
        let file = File::open(&input.path).map_err(|e| DataError::io(&input.path, e))?;
        // Reads are of LineReader's and TextChunker's 1 MiB buffers: 16 MiB may wait for the hash.
        let tally = Arc::new(Mutex::new(Tally { sha: BackgroundSha256::new(16), bytes: 0, file_failed: false }));
        let raw = TallyReader { file, tally: tally.clone(), progress: progress.clone() };
        let reader: Box<dyn Read + Send> = if input.zstd {
            Box::new(zstd::stream::read::Decoder::new(raw).map_err(|e| DataError::io(&input.path, e))?)
        } else {
            Box::new(raw)
        };
        Ok(Stream { input: input.clone(), reader, tally, offset: 0 })
    }

    /// Reads up to `buf.len()` bytes of content; 0 at the end.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, DataError> {
        loop {
            match self.reader.read(buf) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.error(e)),
            }
        }
    }

    fn error(&self, e: io::Error) -> DataError {
        let file_failed = self.tally.lock().map(|t| t.file_failed).unwrap_or(true);
        if self.input.zstd && !file_failed {
            DataError::Zstd { path: self.input.path.clone(), message: e.to_string() }
        } else {
            DataError::io(&self.input.path, e)
        }
    }

    /// Checks that the whole file was read (it did not change under us) and returns its tally.
    pub fn finish(self) -> Result<(u64, String), DataError> {
        // The reader holds the other handle on the tally: drop it to take the tally back.
        drop(self.reader);
        let t = Arc::try_unwrap(self.tally)
            .ok()
            .expect("the reader was the tally's only other owner")
            .into_inner()
            .expect("tally lock is never poisoned");
        if t.bytes != self.input.bytes {
            return Err(DataError::io(
                &self.input.path,
                io::Error::other(format!(
                    "file changed while reading ({} bytes at start, {} read)",
                    self.input.bytes, t.bytes
                )),
            ));
        }
        Ok((t.bytes, t.sha.finish()))
    }

    fn utf8_detail(&self) -> &'static str {
        if self.input.zstd {
            " of the decompressed stream"
        } else {
            ""
        }
    }
}

/// Splits a plain-text stream into UTF-8 text chunks of about `chunk` bytes, cut only where
/// `Tokenizer::find_cut` allows, so chunks can be tokenized independently.
pub struct TextChunker<'t> {
    stream: Stream,
    tokenizer: &'t Tokenizer,
    chunk: usize,
    lossy: bool,
    raw: Vec<u8>,
    pending: String,
    searched: usize,
    eof: bool,
    block: Vec<u8>,
}

impl<'t> TextChunker<'t> {
    pub fn new(stream: Stream, tokenizer: &'t Tokenizer, chunk: usize, lossy: bool) -> Self {
        TextChunker {
            stream,
            tokenizer,
            chunk,
            lossy,
            raw: Vec::new(),
            pending: String::new(),
            searched: 0,
            eof: false,
            block: vec![0u8; chunk.clamp(16, 1 << 20)],
        }
    }

    pub fn into_stream(self) -> Stream {
        self.stream
    }

    /// The next chunk, `None` at the end of the stream.
    pub fn next_chunk(&mut self) -> Result<Option<String>, DataError> {
        loop {
            if self.pending.len() >= self.chunk {
                if let Some(p) = self.tokenizer.find_cut(&self.pending, self.searched) {
                    let rest = self.pending.split_off(p);
                    self.searched = 0;
                    return Ok(Some(std::mem::replace(&mut self.pending, rest)));
                }
                // No cut yet (a very long run of one class): keep reading, search only the new part.
                self.searched = self.pending.len();
            }
            if self.eof {
                if self.pending.is_empty() {
                    return Ok(None);
                }
                self.searched = 0;
                return Ok(Some(std::mem::take(&mut self.pending)));
            }
            let n = self.stream.read(&mut self.block)?;
            if n == 0 {
                self.eof = true;
            }
            self.raw.extend_from_slice(&self.block[..n]);
            self.absorb()?;
        }
    }

    /// Moves the valid UTF-8 prefix of `raw` into `pending`, keeping an incomplete trailing
    /// sequence for the next read.
    fn absorb(&mut self) -> Result<(), DataError> {
        let base = self.stream.offset - self.raw.len() as u64;
        let mut start = 0;
        while start < self.raw.len() {
            match std::str::from_utf8(&self.raw[start..]) {
                Ok(s) => {
                    self.pending.push_str(s);
                    start = self.raw.len();
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    let ok = std::str::from_utf8(&self.raw[start..valid]).expect("valid prefix");
                    self.pending.push_str(ok);
                    let bad_len = match e.error_len() {
                        Some(len) => len,
                        None if !self.eof => {
                            start = valid;
                            break;
                        }
                        None => self.raw.len() - valid,
                    };
                    if !self.lossy {
                        return Err(DataError::InvalidUtf8 {
                            path: self.stream.input.path.clone(),
                            offset: base + valid as u64,
                            detail: self.stream.utf8_detail().to_string(),
                        });
                    }
                    self.pending.push(char::REPLACEMENT_CHARACTER);
                    start = valid + bad_len;
                }
            }
        }
        self.raw.drain(..start);
        Ok(())
    }
}

/// Reads a JSONL stream line by line.
pub struct LineReader {
    reader: BufReader<StreamRead>,
    pub line: u64,
    /// Content offset of the start of the last line read.
    pub line_offset: u64,
    next_offset: u64,
}

struct StreamRead(Stream, Option<DataError>);

impl Read for StreamRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            let msg = e.to_string();
            self.1 = Some(e);
            io::Error::other(msg)
        })
    }
}

impl LineReader {
    pub fn new(stream: Stream) -> Self {
        LineReader {
            reader: BufReader::with_capacity(1 << 20, StreamRead(stream, None)),
            line: 0,
            line_offset: 0,
            next_offset: 0,
        }
    }

    /// Appends the next line (without its line ending) to `buf`; false at the end.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> Result<bool, DataError> {
        let start = buf.len();
        let n = match self.reader.read_until(b'\n', buf) {
            Ok(n) => n,
            Err(e) => {
                let inner = self.reader.get_mut();
                return Err(inner.1.take().unwrap_or_else(|| DataError::io(&inner.0.input.path, e)));
            }
        };
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        self.line_offset = self.next_offset;
        self.next_offset += n as u64;
        if buf.ends_with(b"\n") {
            buf.pop();
            if buf.len() > start && buf.ends_with(b"\r") {
                buf.pop();
            }
        }
        Ok(true)
    }

    pub fn into_stream(self) -> Stream {
        self.reader.into_inner().0
    }

    pub fn path(&self) -> &Path {
        &self.reader.get_ref().0.input.path
    }
}

/// Why a JSONL line gave no document; the caller adds `file:line`.
#[derive(Debug, PartialEq)]
pub enum LineError {
    /// Invalid UTF-8 at this byte offset within the line.
    Utf8(usize),
    Other(String),
}

/// The document text in `field` of one JSONL line.
pub fn jsonl_document(line: &[u8], field: &str, lossy: bool) -> Result<String, LineError> {
    let text = match std::str::from_utf8(line) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(e) if !lossy => return Err(LineError::Utf8(e.valid_up_to())),
        Err(_) => String::from_utf8_lossy(line),
    };
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| LineError::Other(format!("malformed JSON line: {e}")))?;
    match map.remove(field) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(LineError::Other(format!(
            "field \"{field}\" is {}, expected a string",
            match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Object(_) => "an object",
                serde_json::Value::String(_) => unreachable!("strings are taken above"),
            }
        ))),
        None => Err(LineError::Other(format!("missing field \"{field}\" (choose the field with --field)"))),
    }
}

/// Whether a JSONL line holds nothing (blank lines are skipped, not documents).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenize::{Encoding, Tokenizer};
    use sha2::{Digest, Sha256};

    fn chunks(bytes: &[u8], chunk: usize, lossy: bool, zstd: bool) -> Result<Vec<String>, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(if zstd { "t.txt.zst" } else { "t.txt" });
        let stored = if zstd { zstd::encode_all(bytes, 1).unwrap() } else { bytes.to_vec() };
        fs::write(&path, &stored).unwrap();
        let input = discover(&[path]).unwrap().remove(0);
        let tok = Tokenizer::new(Encoding::R50kBase).unwrap();
        let stream = Stream::open(&input, &ProgressBar::hidden())?;
        let mut c = TextChunker::new(stream, &tok, chunk, lossy);
        let mut out = Vec::new();
        while let Some(s) = c.next_chunk()? {
            out.push(s);
        }
        let (n, sha) = c.into_stream().finish()?;
        assert_eq!(n, stored.len() as u64);
        assert_eq!(sha, hex::encode(Sha256::digest(&stored)));
        Ok(out)
    }

    #[test]
    fn chunks_rejoin_to_the_text_across_multibyte_reads() {
        let text = "Mixed \u{4e2d}\u{6587} text, caf\u{e9} and \u{1f980} emoji: it's 42! ".repeat(50);
        for (chunk, zstd) in [(17, false), (64, true), (1000, false)] {
            let parts = chunks(text.as_bytes(), chunk, false, zstd).unwrap();
            assert!(parts.len() > 1);
            assert_eq!(parts.concat(), text, "chunk {chunk}");
            assert!(parts.iter().all(|p| !p.is_empty()));
        }
    }

    #[test]
    fn invalid_utf8_is_located_or_replaced() {
        let mut bytes = "\u{e9}t\u{e9} ".repeat(40).into_bytes();
        bytes.insert(101, 0xff);
        let err = chunks(&bytes, 16, false, false).unwrap_err().to_string();
        assert!(err.contains("invalid UTF-8 at byte offset 101"), "{err}");
        let err = chunks(&bytes, 16, false, true).unwrap_err().to_string();
        assert!(err.contains("byte offset 101 of the decompressed stream"), "{err}");
        let text = chunks(&bytes, 16, true, false).unwrap().concat();
        assert_eq!(text, String::from_utf8_lossy(&bytes));
        // A sequence cut short by the end of the file.
        let mut cut = "abc ".repeat(10).into_bytes();
        cut.extend([0xe4, 0xb8]);
        assert!(chunks(&cut, 16, false, false).unwrap_err().to_string().contains("offset 40"));
        assert_eq!(chunks(&cut, 16, true, false).unwrap().concat(), String::from_utf8_lossy(&cut));
    }

    #[test]
    fn jsonl_lines_give_their_field() {
        assert_eq!(jsonl_document(br#"{"text": "a\nb", "x": [1]}"#, "text", false), Ok("a\nb".to_string()));
        assert_eq!(jsonl_document(b"{\"t\": \"\xff\"}", "t", false), Err(LineError::Utf8(7)));
        assert_eq!(jsonl_document(b"{\"t\": \"\xff\"}", "t", true), Ok("\u{fffd}".to_string()));
        assert!(
            matches!(jsonl_document(b"[1, 2]", "text", false), Err(LineError::Other(m)) if m.contains("malformed"))
        );
        assert!(
            matches!(jsonl_document(b"{\"text\": null}", "text", false), Err(LineError::Other(m)) if m.contains("null"))
        );
    }
}
