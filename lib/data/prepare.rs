//! `prepare`: tokenizes a corpus into nanoGPT's token files, `train.bin` and `val.bin` (flat
//! little-endian token ids) and a `meta.json` that records how they were made.
//!
//! Two modes, chosen by the input:
//! - one plain-text file (a single document): split by characters, the first
//!   `1 - val_fraction` to train and the rest to val, each half encoded with no EOT, as
//!   nanoGPT's data/shakespeare/prepare.py does;
//! - anything else (several files, JSONL): documents, each followed by EOT and sent whole to
//!   train or val by a hash of (seed, document number), as nanoGPT's data/openwebtext/prepare.py
//!   appends EOT (its split itself comes from Hugging Face datasets and is not reproduced). A
//!   Hugging Face tokenizer.json may put its boundary token before each document instead
//!   (`Tokenizer::boundary`).
//!
//! One reader thread streams the inputs into chunks cut where tokenization is unaffected and
//! hands each to a rayon pool as soon as it is read; the main thread writes results back in
//! input order. The output is the same for any thread count, and memory is bounded by the
//! pieces in flight (a fixed number per thread), not by the corpus.

use super::corpus::{self, Format, Input, LineError, LineReader, Stream, TextChunker};
use super::hf_tokenizer::{Boundary, BoundaryChoice, HfTokenizer, Side};
use super::tokenize::{Encoding, Tokenizer};
use super::{DataError, Dtype};
use crate::fsutil::{self, thread_cpu_seconds, AtomicDir, BackgroundSha256};
use crate::logging;
use crate::units::human_bytes;
use indicatif::ProgressBar;
use serde_json::json;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::time::Instant;

/// Arguments of `prepare` (the binary parses exactly this).
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "prepare",
    version,
    about = "Tokenize text into nanoGPT-compatible train.bin / val.bin token files",
    long_about = "Tokenize text into nanoGPT-compatible train.bin / val.bin token files.\n\n\
Inputs are files or directories (searched recursively, files taken in sorted path order, hidden \
names skipped): plain text, JSONL (one document a line, text in --field) and their \
zstd-compressed forms (.zst). A single plain-text file is split by characters exactly as \
nanoGPT's data/shakespeare/prepare.py does; otherwise every document is followed by the \
end-of-text token and sent whole to train or val, as in data/openwebtext/prepare.py.\n\n\
With --tokenizer, a Hugging Face tokenizer.json (or a model directory holding one) tokenizes \
instead, and each document gets the tokenizer's own boundary: its end-of-text token after the \
document for byte-level BPE (Llama 3, Qwen, GPT-2), its beginning-of-sequence token before it \
otherwise (Gemma, Llama 2, Mistral); --boundary and --boundary-token override.\n\n\
Writes DIR/train.bin, DIR/val.bin (little-endian uint16 token ids, or uint32 for vocabularies \
with ids above 65535) and DIR/meta.json. Nothing is written under DIR until everything \
succeeded. See docs/prepare.md."
)]
pub struct PrepareArgs {
    /// Input files or directories (.txt and any other name: plain text; .jsonl/.ndjson: JSON
    /// lines; a further .zst: zstd-compressed).
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Output directory.
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace DIR if it exists (the old one is removed only after the new one is complete).
    #[arg(long)]
    pub force: bool,
    /// Tokenizer encoding (tiktoken's names; gpt2 is r50k_base).
    #[arg(long, value_enum, default_value = "gpt2")]
    pub encoding: Encoding,
    /// A Hugging Face tokenizer.json, or a model directory holding one, instead of --encoding.
    #[arg(long, value_name = "PATH", conflicts_with = "encoding")]
    pub tokenizer: Option<PathBuf>,
    /// Document boundary with --tokenizer (auto: the tokenizer's own convention).
    #[arg(long, value_enum, default_value = "auto", requires = "tokenizer")]
    pub boundary: BoundaryChoice,
    /// The boundary token's text with --tokenizer (default: <|end_of_text|>, <|endoftext|>,
    /// <eos> or </s> for eos; the post-processor's, <bos>, <s> or <|begin_of_text|> for bos).
    #[arg(long, value_name = "TOKEN", requires = "tokenizer")]
    pub boundary_token: Option<String>,
    /// JSONL field holding the document text.
    #[arg(long, default_value = "text", value_name = "NAME")]
    pub field: String,
    /// Fraction of the characters (single text file) or of the documents (expected, chosen by
    /// hash) that goes to val.
    #[arg(long, default_value_t = 0.1, value_name = "F")]
    pub val_fraction: f64,
    /// Seed of the train/val assignment of documents.
    #[arg(long, default_value_t = 2357)]
    pub seed: u64,
    /// Worker threads; 0 means all cores. The output does not depend on it.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// Replace invalid UTF-8 with U+FFFD instead of failing.
    #[arg(long)]
    pub lossy: bool,
    /// Target size in bytes of the text chunks handed to threads (tests use small ones).
    #[arg(long, default_value_t = 64 * 1024, hide = true)]
    pub chunk_bytes: usize,
    /// Chunks allowed between reading and writing, per thread: enough that no thread starves
    /// while the writer waits for a slow (descheduled) one. Bounds memory with --chunk-bytes.
    #[arg(long, default_value_t = 32, hide = true)]
    pub chunks_in_flight: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One plain-text document split by characters (nanoGPT's shakespeare/prepare.py).
    Chars,
    /// Documents, each with its boundary token, assigned whole to a split (openwebtext/prepare.py).
    Documents,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Chars => "chars",
            Mode::Documents => "documents",
        }
    }
}

/// What `prepare` wrote.
#[derive(Debug, Clone)]
pub struct PrepareSummary {
    pub out: PathBuf,
    pub mode: Mode,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub train_documents: u64,
    pub val_documents: u64,
    pub input_bytes: u64,
    pub seconds: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Val,
}

/// Whether document `doc` goes to val: a hash of (seed, doc) read as a uniform number in [0, 1),
/// so the assignment needs no count of the documents and no state.
fn is_val(seed: u64, doc: u64, fraction: f64) -> bool {
    let h = splitmix64(seed ^ splitmix64(doc));
    ((h >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < fraction
}

pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A unit of work for one thread.
enum Work {
    /// A piece of one document's text; `first` and `last` on the document's first and last
    /// pieces (where its boundary goes; both false in chars mode, which has none); `count_doc`
    /// on one piece of each document (its last; in chars mode the first of each side).
    Text { text: String, split: Split, first: bool, last: bool, count_doc: bool },
    /// Consecutive JSONL lines of one file, in one buffer.
    Lines { input: usize, buf: Vec<u8>, lines: Vec<Line> },
}

struct Line {
    number: u64,
    offset: u64,
    range: std::ops::Range<usize>,
    doc: u64,
}

/// A piece's tokens, already in the files' byte form so the (serial) writer only writes them.
#[derive(Default)]
struct Produced {
    train: Vec<u8>,
    val: Vec<u8>,
    train_docs: u64,
    val_docs: u64,
}

struct Ctx<'a> {
    args: &'a PrepareArgs,
    inputs: &'a [Input],
    tokenizer: &'a Tokenizer,
    boundary: Boundary,
    dtype: Dtype,
}

impl Ctx<'_> {
    fn process(&self, work: Work) -> Result<Produced, DataError> {
        let (mut train, mut val) = (Vec::new(), Vec::new());
        let (mut train_docs, mut val_docs) = (0u64, 0u64);
        match work {
            Work::Text { text, split, first, last, count_doc } => {
                let (tokens, docs) = match split {
                    Split::Train => (&mut train, &mut train_docs),
                    Split::Val => (&mut val, &mut val_docs),
                };
                self.document(&text, first, last, tokens)?;
                *docs += count_doc as u64;
            }
            Work::Lines { input, buf, lines } => {
                let path = &self.inputs[input].path;
                for line in lines {
                    let text = corpus::jsonl_document(&buf[line.range], &self.args.field, self.args.lossy).map_err(
                        |e| match e {
                            LineError::Utf8(at) => DataError::InvalidUtf8 {
                                path: path.clone(),
                                offset: line.offset + at as u64,
                                detail: format!(
                                    " (line {}{})",
                                    line.number,
                                    if self.inputs[input].zstd { " of the decompressed stream" } else { "" }
                                ),
                            },
                            LineError::Other(message) => {
                                DataError::Jsonl { path: path.clone(), line: line.number, message }
                            }
                        },
                    )?;
                    let (tokens, docs) = if is_val(self.args.seed, line.doc, self.args.val_fraction) {
                        (&mut val, &mut val_docs)
                    } else {
                        (&mut train, &mut train_docs)
                    };
                    self.document(&text, true, true, tokens)?;
                    *docs += 1;
                }
            }
        }
        Ok(Produced { train: self.dtype.encode(&train), val: self.dtype.encode(&val), train_docs, val_docs })
    }

    /// A piece of a document with the boundary token where it belongs: before the document's
    /// first piece or after its last.
    fn document(&self, text: &str, first: bool, last: bool, tokens: &mut Vec<u32>) -> Result<(), DataError> {
        let Boundary { side, id, .. } = self.boundary;
        if first && side == Side::Before {
            tokens.push(id);
        }
        self.tokenizer.encode_into(text, tokens)?;
        if last && side == Side::After {
            tokens.push(id);
        }
        Ok(())
    }
}

/// A file's record for meta.json.
struct InputRecord {
    path: PathBuf,
    format: Format,
    zstd: bool,
    bytes: u64,
    sha256: String,
}

type Numbered = (u64, Result<Produced, DataError>);

/// Hands each piece of work to the pool as soon as it is read, numbered so the writer can put
/// results back in input order. A piece takes a permit when dispatched and the writer returns
/// it once the piece is written, so at most `--chunks-in-flight` × threads pieces exist at
/// once: memory stays bounded however fast or slow either side is, and no thread waits for a
/// batch to drain.
struct Dispatcher<'a, 's> {
    scope: &'a rayon::Scope<'s>,
    ctx: &'s Ctx<'s>,
    results: Sender<Numbered>,
    permits: SyncSender<()>,
    next: u64,
    /// Time spent waiting for a permit: the reader running ahead of tokenizing or writing.
    waited: std::time::Duration,
}

/// The writer hung up (it failed); the reader just stops.
struct Hangup;

impl<'s> Dispatcher<'_, 's> {
    fn push(&mut self, w: Work) -> Result<(), Hangup> {
        let t0 = Instant::now();
        self.permits.send(()).map_err(|_| Hangup)?;
        self.waited += t0.elapsed();
        let (seq, results, ctx) = (self.next, self.results.clone(), self.ctx);
        self.next += 1;
        self.scope.spawn(move |_| {
            let _ = results.send((seq, ctx.process(w)));
        });
        Ok(())
    }

    /// A reading error, numbered after the work before it: the first problem in input order is
    /// the one reported.
    fn fail(&mut self, e: DataError) {
        let _ = self.results.send((self.next, Err(e)));
        self.next += 1;
    }
}

enum ReadFail {
    Hangup,
    Error(DataError),
}

impl From<Hangup> for ReadFail {
    fn from(_: Hangup) -> Self {
        ReadFail::Hangup
    }
}

impl From<DataError> for ReadFail {
    fn from(e: DataError) -> Self {
        ReadFail::Error(e)
    }
}

struct Reader<'a> {
    ctx: &'a Ctx<'a>,
    mode: Mode,
    progress: ProgressBar,
    records: Vec<InputRecord>,
}

impl Reader<'_> {
    fn run(&mut self, out: &mut Dispatcher) -> Result<(), ReadFail> {
        match self.mode {
            Mode::Chars => self.read_chars(out)?,
            Mode::Documents => {
                let mut doc = 0u64;
                for i in 0..self.ctx.inputs.len() {
                    match self.ctx.inputs[i].format {
                        Format::Text => self.read_text_document(i, &mut doc, out)?,
                        Format::Jsonl => self.read_jsonl(i, &mut doc, out)?,
                    }
                }
            }
        }
        Ok(())
    }

    fn chunker(&self, input: &Input) -> Result<TextChunker<'_>, DataError> {
        let stream = Stream::open(input, &self.progress)?;
        Ok(TextChunker::new(stream, self.ctx.tokenizer, self.ctx.args.chunk_bytes, self.ctx.args.lossy))
    }

    fn record(&mut self, stream: Stream) -> Result<(), DataError> {
        let input = stream.input.clone();
        let (bytes, sha256) = stream.finish()?;
        self.records.push(InputRecord { path: input.path, format: input.format, zstd: input.zstd, bytes, sha256 });
        Ok(())
    }

    /// nanoGPT's shakespeare split: `n` characters, the first `floor(n * (1 - f))` to train.
    /// A first pass counts characters (and validates the text before anything is tokenized).
    fn read_chars(&mut self, out: &mut Dispatcher) -> Result<(), ReadFail> {
        let input = self.ctx.inputs[0].clone();
        self.progress.set_message("counting characters");
        let mut chunker = self.chunker(&input)?;
        let mut n: u64 = 0;
        while let Some(text) = chunker.next_chunk()? {
            n += count_chars(&text);
        }
        self.record(chunker.into_stream())?;
        let train_chars = (n as f64 * (1.0 - self.ctx.args.val_fraction)) as u64;
        self.progress.set_message("tokenizing");
        let mut chunker = self.chunker(&input)?;
        let mut seen: u64 = 0;
        let mut first = [true, true];
        while let Some(text) = chunker.next_chunk()? {
            let len = count_chars(&text);
            let mut parts = Vec::with_capacity(2);
            if seen + len <= train_chars {
                parts.push((text, Split::Train));
            } else if seen >= train_chars {
                parts.push((text, Split::Val));
            } else {
                let at = text.char_indices().nth((train_chars - seen) as usize).map(|(b, _)| b).unwrap_or(text.len());
                let (a, b) = text.split_at(at);
                parts.push((a.to_string(), Split::Train));
                parts.push((b.to_string(), Split::Val));
            }
            seen += len;
            for (text, split) in parts {
                // Count the one document on each side once, on its first piece.
                let f = &mut first[split as usize];
                let count_doc = std::mem::replace(f, false);
                out.push(Work::Text { text, split, first: false, last: false, count_doc })?;
            }
        }
        // Both passes read the same bytes; finish() checks the file did not change between them.
        chunker.into_stream().finish()?;
        Ok(())
    }

    fn read_text_document(&mut self, i: usize, doc: &mut u64, out: &mut Dispatcher) -> Result<(), ReadFail> {
        let input = self.ctx.inputs[i].clone();
        let split =
            if is_val(self.ctx.args.seed, *doc, self.ctx.args.val_fraction) { Split::Val } else { Split::Train };
        *doc += 1;
        let mut chunker = self.chunker(&input)?;
        // One chunk of look-ahead tells which piece is the document's last (an EOT follows it).
        let mut current = chunker.next_chunk()?;
        if current.is_none() {
            return Err(DataError::EmptyInput(input.path.clone(), "no text").into());
        }
        let mut first = true;
        while let Some(text) = current {
            let next = chunker.next_chunk()?;
            let last = next.is_none();
            out.push(Work::Text { text, split, first, last, count_doc: last })?;
            first = false;
            current = next;
        }
        self.record(chunker.into_stream())?;
        Ok(())
    }

    fn read_jsonl(&mut self, i: usize, doc: &mut u64, out: &mut Dispatcher) -> Result<(), ReadFail> {
        let input = self.ctx.inputs[i].clone();
        let mut lines = LineReader::new(Stream::open(&input, &self.progress)?);
        // Sized for a whole piece up front: growing by doubling would copy each piece again.
        let capacity = self.ctx.args.chunk_bytes + (64 << 10);
        let mut buf = Vec::with_capacity(capacity);
        let mut piece_lines = Vec::new();
        let first_doc = *doc;
        loop {
            let start = buf.len();
            if !lines.next_line(&mut buf)? {
                break;
            }
            if corpus::is_blank(&buf[start..]) {
                buf.truncate(start);
                continue;
            }
            piece_lines.push(Line {
                number: lines.line,
                offset: lines.line_offset,
                range: start..buf.len(),
                doc: *doc,
            });
            *doc += 1;
            if buf.len() >= self.ctx.args.chunk_bytes {
                let lines = std::mem::take(&mut piece_lines);
                out.push(Work::Lines {
                    input: i,
                    buf: std::mem::replace(&mut buf, Vec::with_capacity(capacity)),
                    lines,
                })?;
            }
        }
        if !piece_lines.is_empty() {
            out.push(Work::Lines { input: i, buf, lines: piece_lines })?;
        }
        if *doc == first_doc {
            return Err(DataError::EmptyInput(input.path.clone(), "no JSON lines").into());
        }
        self.record(lines.into_stream())?;
        Ok(())
    }
}

fn count_chars(s: &str) -> u64 {
    s.bytes().filter(|&b| (b & 0xC0) != 0x80).count() as u64
}

/// A token file written on a thread of its own, which hands the bytes on to the file's sha256 in
/// order. The kernel's copy into the page cache is a core's worth of work per file at 16
/// threads; on the thread that puts pieces in order it capped the whole pipeline.
struct TokenWriter {
    path: PathBuf,
    tx: Option<SyncSender<Vec<u8>>>,
    /// The file, its sha256 and the thread's CPU seconds.
    worker: Option<std::thread::JoinHandle<std::io::Result<(File, String, f64)>>>,
    tokens: u64,
    dtype: Dtype,
}

impl TokenWriter {
    fn create(path: PathBuf, dtype: Dtype) -> Result<Self, DataError> {
        let file = File::create(&path).map_err(|e| DataError::io(&path, e))?;
        let (tx, rx) = sync_channel::<Vec<u8>>(PIECES_QUEUED);
        let worker = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                let mut out = &file;
                let mut sha = BackgroundSha256::new(PIECES_QUEUED);
                // Writeback starts every WRITEBACK_BYTES, so the fsync at the end, which no
                // thread count shortens, finds little left to write.
                let (mut written, mut synced) = (0u64, 0u64);
                for bytes in rx {
                    out.write_all(&bytes)?;
                    written += bytes.len() as u64;
                    if written - synced >= WRITEBACK_BYTES {
                        fsutil::start_writeback(&file, synced, written - synced);
                        synced = written;
                    }
                    sha.update(bytes);
                }
                Ok((file, sha.finish(), thread_cpu_seconds()))
            })
            .map_err(|e| DataError::io(&path, e))?;
        Ok(TokenWriter { path, tx: Some(tx), worker: Some(worker), tokens: 0, dtype })
    }

    /// Appends tokens in the file's byte form (`Dtype::encode`).
    fn write(&mut self, bytes: Vec<u8>) -> Result<(), DataError> {
        self.tokens += (bytes.len() / self.dtype.size()) as u64;
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(bytes).is_ok());
        if !sent {
            // The thread stopped at a write error: report it.
            return self.join().map(|_| ());
        }
        Ok(())
    }

    /// Waits for the thread: the file and its sha256, or the write error that stopped it.
    fn join(&mut self) -> Result<(File, String, f64), DataError> {
        drop(self.tx.take());
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(Ok(done))) => Ok(done),
            Some(Ok(Err(e))) => Err(DataError::io(&self.path, e)),
            Some(Err(_)) => Err(DataError::Split(format!("{}: the writing thread panicked", self.path.display()))),
            None => Err(DataError::io(&self.path, std::io::Error::other("written after a write error"))),
        }
    }

    fn finish(mut self) -> Result<(u64, String), DataError> {
        let t0 = Instant::now();
        let (file, sha, cpu) = self.join()?;
        let t1 = Instant::now();
        file.sync_all().map_err(|e| DataError::io(&self.path, e))?;
        tracing::debug!(
            "serial stages: {} written with {cpu:.2} s CPU; at the end {:.2} s to finish writing and hashing, {:.2} s fsync",
            self.path.display(),
            (t1 - t0).as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
        Ok((self.tokens, sha))
    }
}

/// Pieces that may wait for a token file's writing thread, and again for its hash: about 10 MB
/// each at the default chunk size, tens of milliseconds of output. With every core tokenizing,
/// those two threads are descheduled now and then; a shallow queue would pass each such pause
/// back up the chain (ordering, reading) and leave the tokenizing threads without work.
const PIECES_QUEUED: usize = 256;

/// How much of a token file is written before its writeback is started (see TokenWriter).
const WRITEBACK_BYTES: u64 = 8 << 20;

const BAR: &str =
    "{spinner} [{elapsed_precise}] {wide_bar} {decimal_bytes}/{decimal_total_bytes} ({decimal_bytes_per_sec}, {eta}) {msg}";

/// Runs `prepare`. `command` is the command line recorded in meta.json.
pub fn prepare(args: &PrepareArgs, command: &[String]) -> Result<PrepareSummary, DataError> {
    let started = Instant::now();
    fsutil::clean_up_on_signals();
    if !(0.0..1.0).contains(&args.val_fraction) {
        return Err(DataError::Args(format!("--val-fraction {} is not in [0, 1)", args.val_fraction)));
    }
    if args.chunk_bytes == 0 || args.chunks_in_flight == 0 || args.field.is_empty() {
        return Err(DataError::Args("--chunk-bytes, --chunks-in-flight and --field must not be empty".into()));
    }
    let threads = crate::cli::threads(args.threads).map_err(DataError::Args)?;
    let inputs = corpus::discover(&args.inputs)?;
    let given = args.inputs.iter().map(PathBuf::as_path);
    fsutil::refuse_overlap(&args.out, &given.chain(inputs.iter().map(|i| i.path.as_path())).collect::<Vec<_>>())?;
    let tokenizer = match &args.tokenizer {
        Some(path) => {
            // A model id (ORG/NAME) that is no local path: its snapshot in the hub cache.
            let local = path.to_str().map(crate::hub::resolve).transpose()?.flatten();
            let hf = HfTokenizer::open(local.as_deref().unwrap_or(path))?;
            let boundary = hf.boundary(args.boundary, args.boundary_token.as_deref())?;
            Tokenizer::hugging_face(hf, boundary)
        }
        None => Tokenizer::new(args.encoding)?,
    };
    let dir = AtomicDir::create(&args.out, args.force)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("prepare-{i}"))
        .build()
        .map_err(|e| DataError::Args(format!("cannot start {threads} threads: {e}")))?;
    let mode = if inputs.len() == 1 && inputs[0].format == Format::Text { Mode::Chars } else { Mode::Documents };
    let input_bytes: u64 = inputs.iter().map(|i| i.bytes).sum();
    let passes = if mode == Mode::Chars { 2 } else { 1 };
    tracing::info!(
        "prepare: {} input file(s), {}, {} mode, {} with {threads} thread(s)",
        inputs.len(),
        human_bytes(input_bytes),
        mode.name(),
        tokenizer.hf().map_or(args.encoding.name().to_string(), |hf| hf.path().display().to_string())
    );
    let progress = logging::progress_bar(input_bytes * passes, BAR);
    let dtype = tokenizer.dtype();
    let boundary = tokenizer.boundary();
    let mut train = TokenWriter::create(dir.path().join("train.bin"), dtype)?;
    let mut val = TokenWriter::create(dir.path().join("val.bin"), dtype)?;
    let ctx = Ctx { args, inputs: &inputs, tokenizer: &tokenizer, boundary: boundary.clone(), dtype };
    let (mut train_docs, mut val_docs) = (0u64, 0u64);

    let setup_done = started.elapsed().as_secs_f64();
    let (results_tx, results_rx) = channel::<Numbered>();
    let (permits_tx, permits_rx) = sync_channel::<()>(args.chunks_in_flight * threads);
    let records = std::thread::scope(|s| -> Result<Vec<InputRecord>, DataError> {
        let reader = std::thread::Builder::new().name("reader".into()).spawn_scoped(s, || {
            let cpu0 = thread_cpu_seconds();
            let mut reader = Reader { ctx: &ctx, mode, progress: progress.clone(), records: Vec::new() };
            // The scope runs this closure on the reader thread and waits for every piece it
            // spawned onto the pool.
            let dispatched = pool.in_place_scope(|scope| {
                let mut out = Dispatcher {
                    scope,
                    ctx: &ctx,
                    results: results_tx,
                    permits: permits_tx,
                    next: 0,
                    waited: Default::default(),
                };
                if let Err(ReadFail::Error(e)) = reader.run(&mut out) {
                    out.fail(e);
                }
                (out.next, out.waited.as_secs_f64())
            });
            (reader.records, dispatched, thread_cpu_seconds() - cpu0)
        });
        let reader = reader.map_err(|e| DataError::Split(format!("cannot start the reader thread: {e}")))?;
        let writer_cpu0 = thread_cpu_seconds();
        let written = write_in_order(
            results_rx,
            permits_rx,
            &progress,
            started,
            &mut train,
            &mut val,
            &mut train_docs,
            &mut val_docs,
        );
        let writer_cpu = thread_cpu_seconds() - writer_cpu0;
        let (records, (dispatched, reader_waited), reader_cpu) =
            reader.join().map_err(|_| DataError::Split("a tokenizing thread panicked".into()))?;
        // The serial stages' CPU time (these two, and each file's writing thread, logged at its
        // finish) bounds the throughput any thread count can reach: input bytes / the largest.
        tracing::debug!(
            "serial stages: reader {reader_cpu:.2} s CPU ({reader_waited:.2} s waiting for tokenizing), reordering {writer_cpu:.2} s CPU, over {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let written = written?;
        if written != dispatched {
            return Err(DataError::Split(format!("{written} of {dispatched} pieces were written")));
        }
        Ok(records)
    });
    // Cleared on failure too, so the error is not printed under a stale bar.
    progress.finish_and_clear();
    let records = records?;
    let pipeline_done = started.elapsed().as_secs_f64();

    let (train_tokens, train_sha) = train.finish()?;
    let (val_tokens, val_sha) = val.finish()?;
    check_splits(args, mode, train_docs, val_docs, train_tokens, val_tokens)?;

    let meta = json!({
        "format": "zerokit-tokens",
        "format_version": 1,
        "encoding": tokenizer.name(),
        "tokenizer": tokenizer.hf().map(|hf| json!({
            // Absolute, so `train sample` finds it from the run's dataset whatever its directory.
            "path": std::fs::canonicalize(hf.path()).unwrap_or_else(|_| hf.path().to_path_buf()).display().to_string(),
            "sha256": hf.sha256(),
        })),
        "vocab_size": tokenizer.vocab_size(),
        "eot_token": (boundary.side == Side::After).then_some(boundary.id),
        "boundary": {"side": boundary.side.name(), "token": boundary.id, "text": boundary.text},
        "dtype": dtype.name(),
        "byte_order": "little",
        "mode": mode.name(),
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "jsonl_field": args.field,
        "lossy": args.lossy,
        "splits": {
            "train": {"file": "train.bin", "tokens": train_tokens, "documents": train_docs, "sha256": train_sha},
            "val": {"file": "val.bin", "tokens": val_tokens, "documents": val_docs, "sha256": val_sha},
        },
        "inputs": records.iter().map(|r| json!({
            "path": r.path.display().to_string(),
            "format": r.format.name(),
            "zstd": r.zstd,
            "bytes": r.bytes,
            "sha256": r.sha256,
        })).collect::<Vec<_>>(),
        "zerokit_version": env!("CARGO_PKG_VERSION"),
        "command": command,
    });
    let text = serde_json::to_string_pretty(&meta).expect("json values serialize") + "\n";
    fsutil::write_atomic(&dir.path().join("meta.json"), text.as_bytes())?;
    let out = dir.commit()?;

    let seconds = started.elapsed().as_secs_f64();
    // What no thread count shortens: set-up (the tokenizer's tables) and finishing (the hashes'
    // last blocks, fsync, meta.json, the rename).
    tracing::debug!(
        "phases: set-up {setup_done:.2} s, pipeline {:.2} s, finishing {:.2} s",
        pipeline_done - setup_done,
        seconds - pipeline_done
    );
    let summary = PrepareSummary {
        out,
        mode,
        train_tokens,
        val_tokens,
        train_documents: train_docs,
        val_documents: val_docs,
        input_bytes,
        seconds,
    };
    tracing::info!(
        "prepare: {} -> {}: train {} tokens ({} docs), val {} tokens ({} docs), {:.2} s, {}/s, {:.2} M tokens/s",
        human_bytes(input_bytes),
        summary.out.display(),
        train_tokens,
        train_docs,
        val_tokens,
        val_docs,
        seconds,
        human_bytes((input_bytes as f64 / seconds.max(1e-9)) as u64),
        (train_tokens + val_tokens) as f64 / seconds.max(1e-9) / 1e6
    );
    Ok(summary)
}

/// Writes results in input order as they arrive; returns how many pieces were written.
/// Returning (an error included) drops both receivers, which stops the reader at its next piece.
#[allow(clippy::too_many_arguments)]
fn write_in_order(
    results: Receiver<Numbered>,
    permits: Receiver<()>,
    progress: &ProgressBar,
    started: Instant,
    train: &mut TokenWriter,
    val: &mut TokenWriter,
    train_docs: &mut u64,
    val_docs: &mut u64,
) -> Result<u64, DataError> {
    let mut early = BTreeMap::new();
    let mut next = 0u64;
    for (seq, result) in results {
        early.insert(seq, result);
        while let Some(result) = early.remove(&next) {
            let p = result?;
            train.write(p.train)?;
            val.write(p.val)?;
            *train_docs += p.train_docs;
            *val_docs += p.val_docs;
            next += 1;
            let _ = permits.recv();
            if next % 64 == 0 {
                let tokens = train.tokens + val.tokens;
                progress.set_message(format!(
                    "{:.2} M tokens, {:.2} M tokens/s",
                    tokens as f64 / 1e6,
                    tokens as f64 / started.elapsed().as_secs_f64().max(1e-9) / 1e6
                ));
            }
        }
    }
    Ok(next)
}

fn check_splits(
    args: &PrepareArgs,
    mode: Mode,
    train_docs: u64,
    val_docs: u64,
    train_tokens: u64,
    val_tokens: u64,
) -> Result<(), DataError> {
    let what = match mode {
        Mode::Chars => "characters",
        Mode::Documents => "documents",
    };
    if train_tokens == 0 || train_docs == 0 {
        return Err(DataError::Split(format!(
            "the train split is empty ({} {what} in all, --val-fraction {}): nothing written",
            train_docs + val_docs,
            args.val_fraction
        )));
    }
    if args.val_fraction > 0.0 && (val_docs == 0 || val_tokens == 0) {
        return Err(DataError::Split(format!(
            "no {what} fell in the val split ({} document(s), --val-fraction {}, --seed {}): add documents, \
             raise --val-fraction or change --seed (--val-fraction 0 writes an empty val.bin); nothing written",
            train_docs + val_docs,
            args.val_fraction,
            args.seed
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn val_assignment_follows_the_fraction_and_the_seed() {
        let n = 100_000u64;
        let count = |seed, f| (0..n).filter(|&d| is_val(seed, d, f)).count() as f64 / n as f64;
        assert!((count(2357, 0.1) - 0.1).abs() < 0.005);
        assert!((count(7, 0.5) - 0.5).abs() < 0.01);
        assert_eq!(count(1, 0.0), 0.0);
        let a: Vec<bool> = (0..64).map(|d| is_val(1, d, 0.5)).collect();
        let b: Vec<bool> = (0..64).map(|d| is_val(2, d, 0.5)).collect();
        assert_ne!(a, b);
    }
}
