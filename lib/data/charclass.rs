//! The four character classes the GPT-2 pretokenizer pattern distinguishes: `\p{L}`, `\p{N}`,
//! `\s` and everything else. The tables come from regex-syntax, the crate that compiles
//! tiktoken's own pattern, so a code point is classified exactly as tiktoken classifies it.

use regex_syntax::hir::{Class as HirClass, HirKind};
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    Letter = 0,
    Number = 1,
    Space = 2,
    Other = 3,
}

const BLOCK: usize = 256;
const N_BLOCKS: usize = (char::MAX as usize + 1) / BLOCK;

/// Two-level table: one index entry per 256 code points, pointing at a deduplicated block.
/// About 60 distinct blocks exist, so the table is small and stays in cache.
pub struct ClassTable {
    index: Vec<u16>,
    blocks: Vec<[Class; BLOCK]>,
}

fn ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(pattern).expect("static Unicode class pattern parses");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(c)) => c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect(),
        _ => unreachable!("{pattern} is a single Unicode class"),
    }
}

impl ClassTable {
    fn build() -> Self {
        let mut flat = vec![Class::Other; char::MAX as usize + 1];
        // The three classes are disjoint in Unicode; later writes could not overwrite earlier ones.
        for (pattern, class) in [(r"\p{L}", Class::Letter), (r"\p{N}", Class::Number), (r"\s", Class::Space)] {
            for (lo, hi) in ranges(pattern) {
                flat[lo as usize..=hi as usize].fill(class);
            }
        }
        let mut blocks: Vec<[Class; BLOCK]> = Vec::new();
        let mut seen = rustc_hash::FxHashMap::default();
        let mut index = Vec::with_capacity(N_BLOCKS);
        for chunk in flat.chunks_exact(BLOCK) {
            let block: [Class; BLOCK] = chunk.try_into().expect("exact chunk");
            let key: Vec<u8> = block.iter().map(|&c| c as u8).collect();
            let id = *seen.entry(key).or_insert_with(|| {
                blocks.push(block);
                blocks.len() - 1
            });
            index.push(u16::try_from(id).expect("fewer than 65536 distinct blocks"));
        }
        ClassTable { index, blocks }
    }

    #[inline]
    pub fn of(&self, c: char) -> Class {
        let c = c as usize;
        self.blocks[self.index[c / BLOCK] as usize][c % BLOCK]
    }
}

pub fn table() -> &'static ClassTable {
    static TABLE: OnceLock<ClassTable> = OnceLock::new();
    TABLE.get_or_init(ClassTable::build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_unicode_general_categories() {
        let t = table();
        for (c, want) in [
            ('a', Class::Letter),
            ('Z', Class::Letter),
            ('\u{4e2d}', Class::Letter), // CJK ideograph, Lo
            ('\u{01c5}', Class::Letter), // Lt
            ('\u{02b0}', Class::Letter), // Lm
            ('\u{0301}', Class::Other),  // combining mark: Mn is not \p{L}
            ('\u{093f}', Class::Other),  // Devanagari vowel sign, Mc
            ('7', Class::Number),
            ('\u{0663}', Class::Number), // Arabic-Indic digit, Nd
            ('\u{2167}', Class::Number), // Roman numeral, Nl
            ('\u{00b2}', Class::Number), // superscript two, No
            (' ', Class::Space),
            ('\u{00a0}', Class::Space),
            ('\u{3000}', Class::Space),
            ('\u{0085}', Class::Space),
            ('\u{200b}', Class::Other), // zero-width space is not White_Space
            ('\'', Class::Other),
            ('\u{1f980}', Class::Other),
            ('\u{10ffff}', Class::Other),
        ] {
            assert_eq!(t.of(c), want, "{:?} U+{:04X}", c, c as u32);
        }
    }
}
