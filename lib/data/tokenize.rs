//! Byte-pair encoding with OpenAI's encodings, identical to tiktoken's `encode_ordinary`.
//!
//! The GPT-2 family (r50k_base, p50k_base) runs on zerokit's own engine: a hand-written scanner
//! for the GPT-2 pretokenizer pattern (tiktoken evaluates it with a backtracking regex, the
//! bulk of its time) and a merge loop over token-id pairs with a per-thread cache of the
//! pieces that are not themselves tokens. The ranks are tiktoken-rs's embedded files, read back
//! through its decoder. Other encodings go through tiktoken-rs itself.
//!
//! `find_cut` gives positions where text can be cut and the halves encoded separately with the
//! same result, which is what lets one long document be tokenized by many threads.

use super::charclass::{self, Class, ClassTable};
use super::hf_tokenizer::{Boundary, HfTokenizer, Side};
use super::{DataError, Dtype};
use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use tiktoken_rs::CoreBPE;

/// The encodings `prepare` offers. `gpt2` is tiktoken's name for the ranks of r50k_base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    #[value(name = "gpt2", alias = "r50k_base")]
    R50kBase,
    #[value(name = "p50k_base")]
    P50kBase,
    #[value(name = "cl100k_base")]
    Cl100kBase,
    #[value(name = "o200k_base")]
    O200kBase,
}

impl Encoding {
    /// The name written to meta.json (tiktoken's encoding name).
    pub fn name(self) -> &'static str {
        match self {
            Encoding::R50kBase => "gpt2",
            Encoding::P50kBase => "p50k_base",
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::O200kBase => "o200k_base",
        }
    }

    /// tiktoken's `n_vocab`: one more than the largest id, special tokens included.
    pub fn vocab_size(self) -> usize {
        match self {
            Encoding::R50kBase => 50257,
            Encoding::P50kBase => 50281,
            Encoding::Cl100kBase => 100277,
            Encoding::O200kBase => 200019,
        }
    }

    /// The id of `<|endoftext|>`, appended after each document.
    pub fn eot(self) -> u32 {
        match self {
            Encoding::R50kBase | Encoding::P50kBase => 50256,
            Encoding::Cl100kBase => 100257,
            Encoding::O200kBase => 199999,
        }
    }

    fn core(self) -> &'static CoreBPE {
        match self {
            Encoding::R50kBase => tiktoken_rs::r50k_base_singleton(),
            Encoding::P50kBase => tiktoken_rs::p50k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
        }
    }

    fn uses_gpt2_pattern(self) -> bool {
        matches!(self, Encoding::R50kBase | Encoding::P50kBase)
    }
}

/// An encoder: one of OpenAI's encodings, or a Hugging Face tokenizer.json
/// (`super::hf_tokenizer`). Cheap to share across threads (`&Tokenizer` is `Sync`).
pub struct Tokenizer {
    engine: Engine,
    /// Identifies this tokenizer's entries in the per-thread piece cache.
    uid: usize,
}

enum Engine {
    Gpt2(Encoding, Box<Bpe>),
    Tiktoken(Encoding, &'static CoreBPE),
    HuggingFace(Box<HfTokenizer>, Boundary),
}

/// Where chunks of a document may be cut (`Tokenizer::find_cut`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CutRule {
    /// At a change of character class, or before whitespace (GPT-2's pattern).
    Gpt2Pattern,
    /// Only at a space after a non-space character.
    SpaceAfterNonSpace,
    /// Never: documents are encoded whole.
    Never,
}

impl Tokenizer {
    pub fn new(encoding: Encoding) -> Result<Self, DataError> {
        let core = encoding.core();
        let engine = if encoding.uses_gpt2_pattern() {
            Engine::Gpt2(encoding, Box::new(Bpe::from_core(encoding, core)?))
        } else {
            Engine::Tiktoken(encoding, core)
        };
        Ok(Self::with(engine))
    }

    /// A Hugging Face tokenizer.json with the document boundary it writes
    /// (`HfTokenizer::boundary`).
    pub fn hugging_face(hf: HfTokenizer, boundary: Boundary) -> Self {
        Self::with(Engine::HuggingFace(Box::new(hf), boundary))
    }

    fn with(engine: Engine) -> Self {
        static NEXT_UID: AtomicUsize = AtomicUsize::new(1);
        Tokenizer { engine, uid: NEXT_UID.fetch_add(1, Ordering::Relaxed) }
    }

    /// The encoding's name, or `tokenizer.json` for a Hugging Face tokenizer.
    pub fn name(&self) -> &'static str {
        match &self.engine {
            Engine::Gpt2(e, _) | Engine::Tiktoken(e, _) => e.name(),
            Engine::HuggingFace(..) => "tokenizer.json",
        }
    }

    /// The Hugging Face tokenizer behind this one, if it is one.
    pub fn hf(&self) -> Option<&HfTokenizer> {
        match &self.engine {
            Engine::HuggingFace(hf, _) => Some(hf),
            _ => None,
        }
    }

    /// One more than the largest id, special tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.engine {
            Engine::Gpt2(e, _) | Engine::Tiktoken(e, _) => e.vocab_size(),
            Engine::HuggingFace(hf, _) => hf.vocab_size(),
        }
    }

    /// uint16 when every id fits (nanoGPT's format), else uint32.
    pub fn dtype(&self) -> Dtype {
        if self.vocab_size() <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }

    /// The token written at each document's edge: `<|endoftext|>` after it for OpenAI's
    /// encodings, the tokenizer's own convention for a tokenizer.json.
    pub fn boundary(&self) -> Boundary {
        match &self.engine {
            Engine::Gpt2(e, _) | Engine::Tiktoken(e, _) => {
                Boundary { side: Side::After, id: e.eot(), text: "<|endoftext|>".into() }
            }
            Engine::HuggingFace(_, boundary) => boundary.clone(),
        }
    }

    /// tiktoken's `encode_ordinary`: special-token text such as `<|endoftext|>` is plain text.
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Appends the tokens of `text` to `out`. Only a tokenizer.json can fail (a model with no
    /// way to encode a character, such as a word-level vocabulary without an unknown token).
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), DataError> {
        match &self.engine {
            Engine::Gpt2(_, bpe) => bpe.encode_into(text, self.uid, out),
            Engine::Tiktoken(_, core) => out.extend(core.encode_ordinary(text)),
            Engine::HuggingFace(hf, _) => hf.encode_into(text, out)?,
        }
        Ok(())
    }

    /// The bytes of `ids` (special tokens as their text), for checks, debugging and sampling.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, DataError> {
        match &self.engine {
            Engine::Gpt2(e, _) | Engine::Tiktoken(e, _) => e
                .core()
                .decode_bytes(ids)
                .map_err(|err| DataError::Encoding(format!("{}: cannot decode token {}", e.name(), err.token))),
            Engine::HuggingFace(hf, _) => hf.decode(ids, false).map(String::into_bytes),
        }
    }

    fn cut_rule(&self) -> CutRule {
        match &self.engine {
            Engine::Gpt2(..) => CutRule::Gpt2Pattern,
            Engine::Tiktoken(..) => CutRule::SpaceAfterNonSpace,
            Engine::HuggingFace(hf, _) if hf.cuts_at_spaces() => CutRule::SpaceAfterNonSpace,
            Engine::HuggingFace(..) => CutRule::Never,
        }
    }

    /// The largest `p` in `[min, text.len())`, `p > 0`, such that encoding `text[..p]` and
    /// `text[p..]` separately gives exactly the tokens of `text`; `None` if there is none.
    ///
    /// Why these cuts are safe (GPT-2 pattern): every alternative of the pattern that can cover a
    /// non-space character stops at the next whitespace, and at a change between letters,
    /// numbers and other characters, except a contraction that starts with an apostrophe. The
    /// scanner never looks behind, and the only end-of-text rule (`\s++$`) concerns whitespace,
    /// which a left half never ends with. The other encodings' patterns let punctuation absorb
    /// following newlines and a space-less prefix join letters, so for them only a space after a
    /// non-space character is a cut. A tokenizer.json is cut only where
    /// `HfTokenizer::cuts_at_spaces` says that same rule holds.
    pub fn find_cut(&self, text: &str, min: usize) -> Option<usize> {
        let rule = self.cut_rule();
        if rule == CutRule::Never {
            return None;
        }
        let table = charclass::table();
        let gpt2 = rule == CutRule::Gpt2Pattern;
        let mut next: Option<(char, Class)> = None;
        for (i, c) in text.char_indices().rev() {
            if i + c.len_utf8() < min {
                break;
            }
            let class = table.of(c);
            if let Some((nc, ncls)) = next {
                let p = i + c.len_utf8();
                if p >= min && class != Class::Space {
                    let cut = if gpt2 { ncls == Class::Space || (ncls != class && c != '\'') } else { nc == ' ' };
                    if cut {
                        return Some(p);
                    }
                }
            }
            next = Some((c, class));
        }
        None
    }
}

/// Iterates the pieces of the GPT-2 pretokenizer pattern
/// `'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s`
/// with leftmost-first alternation, as tiktoken's regex engine does.
pub struct Pieces<'a> {
    text: &'a [u8],
    pos: usize,
    table: &'static ClassTable,
    ascii: &'static [Class; 128],
}

fn ascii_classes() -> &'static [Class; 128] {
    static ASCII: std::sync::OnceLock<[Class; 128]> = std::sync::OnceLock::new();
    ASCII.get_or_init(|| {
        let t = charclass::table();
        std::array::from_fn(|b| t.of(b as u8 as char))
    })
}

impl<'a> Pieces<'a> {
    pub fn new(text: &'a str) -> Self {
        Pieces { text: text.as_bytes(), pos: 0, table: charclass::table(), ascii: ascii_classes() }
    }

    /// Class and byte length of the character at `i` (a character boundary).
    #[inline(always)]
    fn class_at(&self, i: usize) -> (Class, usize) {
        let b = self.text[i];
        if b < 0x80 {
            return (self.ascii[b as usize], 1);
        }
        // The text is a &str, so this is a well-formed sequence of 2 to 4 bytes.
        let (len, init) = if b < 0xE0 {
            (2, (b & 0x1F) as u32)
        } else if b < 0xF0 {
            (3, (b & 0x0F) as u32)
        } else {
            (4, (b & 0x07) as u32)
        };
        let mut cp = init;
        for k in 1..len {
            cp = (cp << 6) | (self.text[i + k] & 0x3F) as u32;
        }
        let c = char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER);
        (self.table.of(c), len)
    }

    #[inline(always)]
    fn run(&self, mut j: usize, class: Class) -> usize {
        let n = self.text.len();
        while j < n {
            let (c, l) = self.class_at(j);
            if c != class {
                break;
            }
            j += l;
        }
        j
    }

    fn piece_end(&self, i: usize) -> usize {
        let t = self.text;
        let n = t.len();
        if t[i] == b'\'' && i + 1 < n {
            match t[i + 1] {
                b's' | b'd' | b'm' | b't' => return i + 2,
                b'l' if i + 2 < n && t[i + 2] == b'l' => return i + 3,
                b'v' | b'r' if i + 2 < n && t[i + 2] == b'e' => return i + 3,
                _ => {}
            }
        }
        let (class, len) = self.class_at(i);
        if class != Class::Space {
            return self.run(i + len, class);
        }
        if t[i] == b' ' && i + 1 < n {
            let (next, nlen) = self.class_at(i + 1);
            if next != Class::Space {
                return self.run(i + 1 + nlen, next);
            }
        }
        // A whitespace run: whole if it ends the text (`\s++$`), else all but its last character
        // (`\s+(?!\S)`), which then starts the next piece; a lone character is `\s`.
        let mut j = i;
        let mut last = i;
        while j < n {
            let (c, l) = self.class_at(j);
            if c != Class::Space {
                break;
            }
            last = j;
            j += l;
        }
        if j == n {
            n
        } else if last > i {
            last
        } else {
            i + len
        }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a [u8];
    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.pos >= self.text.len() {
            return None;
        }
        let start = self.pos;
        self.pos = self.piece_end(start);
        Some(&self.text[start..self.pos])
    }
}

/// Pieces longer than this use the heap-based merge; shorter ones the quadratic scan, which is
/// faster at these sizes.
const LARGE_PIECE: usize = 64;
/// Per-thread cache bounds: pieces that are not tokens repeat (names, rare words), so most hit.
const CACHE_MAX_PIECE: usize = 48;
const CACHE_MAX_ENTRIES: usize = 1 << 16;

struct Bpe {
    vocab: FxHashMap<Box<[u8]>, u32>,
    byte_ids: [u32; 256],
    /// (left id, right id) -> id of their concatenation; its id is also its merge rank.
    merges: FxHashMap<u64, u32>,
}

struct PieceCache {
    owner: usize,
    map: FxHashMap<Box<[u8]>, Box<[u32]>>,
}

thread_local! {
    static CACHE: RefCell<PieceCache> = RefCell::new(PieceCache { owner: 0, map: FxHashMap::default() });
}

#[inline(always)]
fn pair(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

impl Bpe {
    /// Rebuilds the rank table from tiktoken-rs's decoder, skipping special tokens.
    fn from_core(encoding: Encoding, core: &CoreBPE) -> Result<Self, DataError> {
        let specials: Vec<u32> =
            core.special_tokens().into_iter().flat_map(|s| core.encode_with_special_tokens(s)).collect();
        let mut vocab = FxHashMap::default();
        for id in 0..encoding.vocab_size() as u32 {
            if specials.contains(&id) {
                continue;
            }
            let bytes = core.decode_bytes(&[id]).map_err(|_| {
                DataError::Encoding(format!("{}: rank {id} is missing from the embedded table", encoding.name()))
            })?;
            vocab.insert(bytes.into_boxed_slice(), id);
        }
        let mut byte_ids = [0u32; 256];
        for b in 0..=255u8 {
            byte_ids[b as usize] = *vocab
                .get(&[b][..])
                .ok_or_else(|| DataError::Encoding(format!("{}: byte {b:#04x} has no token", encoding.name())))?;
        }
        let mut merges = FxHashMap::default();
        for (bytes, &id) in &vocab {
            for k in 1..bytes.len() {
                if let (Some(&a), Some(&b)) = (vocab.get(&bytes[..k]), vocab.get(&bytes[k..])) {
                    merges.insert(pair(a, b), id);
                }
            }
        }
        Ok(Bpe { vocab, byte_ids, merges })
    }

    #[inline(always)]
    fn rank(&self, a: u32, b: u32) -> u32 {
        *self.merges.get(&pair(a, b)).unwrap_or(&u32::MAX)
    }

    fn encode_into(&self, text: &str, uid: usize, out: &mut Vec<u32>) {
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.owner != uid {
                cache.owner = uid;
                cache.map.clear();
            }
            for piece in Pieces::new(text) {
                if let Some(&id) = self.vocab.get(piece) {
                    out.push(id);
                } else if let Some(ids) = cache.map.get(piece) {
                    out.extend_from_slice(ids);
                } else {
                    let start = out.len();
                    self.merge(piece, out);
                    if piece.len() <= CACHE_MAX_PIECE {
                        if cache.map.len() >= CACHE_MAX_ENTRIES {
                            cache.map.clear();
                        }
                        cache.map.insert(piece.into(), out[start..].into());
                    }
                }
            }
        })
    }

    /// Byte-pair merges of one piece: repeatedly merge the adjacent pair whose concatenation
    /// has the lowest rank, the leftmost on ties (tiktoken's rule).
    fn merge(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() > LARGE_PIECE {
            return self.merge_large(piece, out);
        }
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut ranks: Vec<u32> = ids.windows(2).map(|w| self.rank(w[0], w[1])).collect();
        loop {
            let mut best = (u32::MAX, 0);
            for (i, &r) in ranks.iter().enumerate() {
                if r < best.0 {
                    best = (r, i);
                }
            }
            let (rank, i) = best;
            if rank == u32::MAX {
                break;
            }
            ids[i] = rank;
            ids.remove(i + 1);
            ranks.remove(i);
            if i > 0 {
                ranks[i - 1] = self.rank(ids[i - 1], ids[i]);
            }
            if i < ranks.len() {
                ranks[i] = self.rank(ids[i], ids[i + 1]);
            }
        }
        out.extend_from_slice(&ids);
    }

    /// The same merges in O(n log n): parts form a linked list over their start offsets and
    /// candidate pairs wait in a min-heap ordered by (rank, start); stale entries are skipped.
    fn merge_large(&self, piece: &[u8], out: &mut Vec<u32>) {
        let n = piece.len();
        let end = n as u32;
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut next: Vec<u32> = (1..=end).collect();
        let mut prev: Vec<u32> = (0..end).map(|i| i.wrapping_sub(1)).collect();
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let r = self.rank(ids[i], ids[i + 1]);
            if r != u32::MAX {
                heap.push(Reverse((r, i as u32)));
            }
        }
        while let Some(Reverse((rank, pos))) = heap.pop() {
            let p = pos as usize;
            let right = next[p];
            // Skip entries for parts merged away (ids reset to MAX) or pairs that changed.
            if ids[p] == u32::MAX || right >= end || self.rank(ids[p], ids[right as usize]) != rank {
                continue;
            }
            let r = right as usize;
            ids[p] = rank;
            ids[r] = u32::MAX;
            next[p] = next[r];
            if next[p] < end {
                prev[next[p] as usize] = pos;
                let nr = self.rank(ids[p], ids[next[p] as usize]);
                if nr != u32::MAX {
                    heap.push(Reverse((nr, pos)));
                }
            }
            if p > 0 {
                let q = prev[p] as usize;
                let nr = self.rank(ids[q], ids[p]);
                if nr != u32::MAX {
                    heap.push(Reverse((nr, q as u32)));
                }
            }
        }
        let mut i = 0;
        while i < n {
            out.push(ids[i]);
            i = next[i] as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2() -> Tokenizer {
        Tokenizer::new(Encoding::R50kBase).unwrap()
    }

    #[test]
    fn pieces_follow_the_gpt2_pattern() {
        let split =
            |s: &str| -> Vec<String> { Pieces::new(s).map(|p| String::from_utf8(p.to_vec()).unwrap()).collect() };
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(split("a  b"), ["a", " ", " b"]);
        assert_eq!(split("x \n y"), ["x", " \n", " y"]);
        assert_eq!(split("x\n\ny"), ["x", "\n", "\n", "y"]);
        assert_eq!(split("end  "), ["end", "  "]);
        assert_eq!(split("I'm don't 'x"), ["I", "'m", " don", "'t", " '", "x"]);
        assert_eq!(split("?'s"), ["?'", "s"]);
        assert_eq!(split("abc123 !!"), ["abc", "123", " !!"]);
        assert_eq!(split(""), Vec::<String>::new());
    }

    #[test]
    fn large_and_small_merges_agree() {
        let tok = gpt2();
        let bpe = match &tok.engine {
            Engine::Gpt2(_, b) => &**b,
            _ => unreachable!("gpt2 runs on zerokit's engine"),
        };
        let mut state = 0x2545F4914F6CDD1Du64;
        let alphabet = b"aaabbbeeehnorst  ";
        for len in [2usize, 3, 5, 17, 40, 64] {
            for _ in 0..200 {
                let piece: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        alphabet[(state % alphabet.len() as u64) as usize]
                    })
                    .collect();
                let (mut a, mut b) = (Vec::new(), Vec::new());
                bpe.merge(&piece, &mut a);
                bpe.merge_large(&piece, &mut b);
                assert_eq!(a, b, "{:?}", String::from_utf8_lossy(&piece));
            }
        }
    }

    #[test]
    fn cuts_never_change_the_tokens() {
        let text =
            "The quick (brown) fox's 3rd jump, \u{4e2d}\u{6587}\u{3002}  \n\tdone!! 42x 'quoted' \u{1f980}\r\n  end   ";
        for enc in [Encoding::R50kBase, Encoding::Cl100kBase, Encoding::O200kBase] {
            let tok = Tokenizer::new(enc).unwrap();
            let whole = tok.encode_ordinary(text).unwrap();
            let mut end = text.len();
            let mut cuts = 0;
            // Every cut position, not only the last: cut repeatedly from the right.
            while let Some(p) = tok.find_cut(&text[..end], 0) {
                let mut parts = tok.encode_ordinary(&text[..p]).unwrap();
                parts.extend(tok.encode_ordinary(&text[p..]).unwrap());
                assert_eq!(parts, whole, "{} cut at {p}", enc.name());
                end = p;
                cuts += 1;
            }
            assert!(cuts > 5, "{}: only {cuts} cuts", enc.name());
        }
    }

    #[test]
    fn dtype_follows_vocab_size() {
        assert_eq!(Tokenizer::new(Encoding::R50kBase).unwrap().dtype(), Dtype::U16);
        assert_eq!(Tokenizer::new(Encoding::Cl100kBase).unwrap().dtype(), Dtype::U32);
    }
}
