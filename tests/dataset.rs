//! TokenDataset: windows, determinism, sequential coverage, dtype from meta.json, and rejection
//! of ids outside the model's vocabulary.

use std::fs;
use std::path::Path;
use zerokit::data::TokenDataset;

fn write_u16(dir: &Path, split: &str, ids: impl Iterator<Item = u16>) {
    let bytes: Vec<u8> = ids.flat_map(|i| i.to_le_bytes()).collect();
    fs::write(dir.join(format!("{split}.bin")), bytes).unwrap();
}

/// A split whose token at position i is i % 50000: a window's tokens reveal where it starts.
fn ramp(len: usize) -> (tempfile::TempDir, TokenDataset) {
    let tmp = tempfile::tempdir().unwrap();
    write_u16(tmp.path(), "train", (0..len).map(|i| (i % 50000) as u16));
    let ds = TokenDataset::open(tmp.path(), "train", 50257).unwrap();
    (tmp, ds)
}

#[test]
fn random_windows_are_shifted_pairs_inside_the_split() {
    let (_tmp, ds) = ramp(1000);
    assert_eq!(ds.len(), 1000);
    let (batch, block) = (64, 16);
    let (x, y) = ds.random_batch(7, 0, 3, batch, block).unwrap();
    assert_eq!((x.len(), y.len()), (batch * block, batch * block));
    for r in 0..batch {
        let row = &x[r * block..(r + 1) * block];
        let start = row[0];
        // nanoGPT: starts in [0, len - block), so y's last token is at most len - 1.
        assert!((0..1000 - block as i64).contains(&start), "start {start}");
        for t in 0..block {
            assert_eq!(row[t], start + t as i64);
            assert_eq!(y[r * block + t], start + t as i64 + 1);
        }
    }
}

#[test]
fn random_batches_are_a_function_of_seed_rank_and_index() {
    let (_tmp, ds) = ramp(100_000);
    let b = |seed, rank, index| ds.random_batch(seed, rank, index, 8, 32).unwrap().0;
    assert_eq!(b(1, 0, 5), b(1, 0, 5));
    assert_ne!(b(1, 0, 5), b(1, 0, 6));
    assert_ne!(b(1, 0, 5), b(1, 1, 5));
    assert_ne!(b(1, 0, 5), b(2, 0, 5));
    // Reopening (a resumed run) gives the same batch.
    let again = TokenDataset::open(_tmp.path(), "train", 50257).unwrap();
    assert_eq!(again.random_batch(1, 0, 5, 8, 32).unwrap().0, b(1, 0, 5));
}

#[test]
fn random_starts_cover_the_whole_range() {
    // len - block = 4 possible starts; all must appear, none other.
    let (_tmp, ds) = ramp(12);
    let mut seen = [0usize; 4];
    for index in 0..200 {
        let (x, _) = ds.random_batch(0, 0, index, 4, 8).unwrap();
        for r in 0..4 {
            seen[x[r * 8] as usize] += 1;
        }
    }
    assert!(seen.iter().all(|&c| c > 100), "{seen:?}");
}

#[test]
fn sequential_batches_walk_non_overlapping_windows_and_wrap() {
    let (_tmp, ds) = ramp(101);
    let block = 10;
    assert_eq!(ds.num_windows(block), 10);
    let (x, y) = ds.sequential_batch(0, 4, block).unwrap();
    let starts: Vec<i64> = (0..4).map(|r| x[r * block]).collect();
    assert_eq!(starts, [0, 10, 20, 30]);
    assert_eq!(y[3 * block + block - 1], 40);
    // Batch 2 holds windows 8, 9, then wraps to 0 and 1.
    let (x, _) = ds.sequential_batch(2, 4, block).unwrap();
    let starts: Vec<i64> = (0..4).map(|r| x[r * block]).collect();
    assert_eq!(starts, [80, 90, 0, 10]);
    // The last window ends exactly at the last token.
    let (_, y) = ds.sequential_batch(9, 1, block).unwrap();
    assert_eq!(*y.last().unwrap(), 100);
}

#[test]
fn short_splits_and_bad_shapes_are_errors() {
    let (tmp, ds) = ramp(10);
    let err = ds.random_batch(0, 0, 0, 1, 10).unwrap_err().to_string();
    assert!(err.contains("10 tokens, but a window of block size 10 needs at least 11"), "{err}");
    assert!(err.contains("train.bin"), "{err}");
    assert!(ds.sequential_batch(0, 1, 10).is_err());
    assert!(ds.random_batch(0, 0, 0, 0, 4).is_err());
    assert!(ds.random_batch(0, 0, 0, 1, 9).is_ok());
    fs::write(tmp.path().join("odd.bin"), [1u8, 2, 3]).unwrap();
    let err = TokenDataset::open(tmp.path(), "odd", 50257).err().unwrap().to_string();
    assert!(err.contains("odd.bin") && err.contains("not a whole number of uint16 tokens"), "{err}");
    let err = TokenDataset::open(tmp.path(), "missing", 50257).err().unwrap().to_string();
    assert!(err.contains("missing.bin"), "{err}");
    fs::write(tmp.path().join("empty.bin"), []).unwrap();
    let empty = TokenDataset::open(tmp.path(), "empty", 50257).unwrap();
    assert!(empty.is_empty() && empty.random_batch(0, 0, 0, 1, 1).is_err());
}

#[test]
fn ids_at_or_above_the_vocab_size_are_rejected_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    // Past the first parallel chunk (2^20 tokens), so the position report is tested across chunks.
    let mut ids: Vec<u16> = (0..3_000_000).map(|i| (i % 50257) as u16).collect();
    ids[2_500_000] = 50300;
    ids[2_900_000] = 60000;
    write_u16(tmp.path(), "train", ids.into_iter());
    let err = TokenDataset::open(tmp.path(), "train", 50257).err().unwrap().to_string();
    assert!(err.contains("token id 50300 at position 2500000") && err.contains("vocab size 50257"), "{err}");
    assert!(err.contains("train.bin"), "{err}");
    // A model with a padded vocabulary (nanoGPT's 50304) accepts 50300 but not 60000.
    let err = TokenDataset::open(tmp.path(), "train", 50304).err().unwrap().to_string();
    assert!(err.contains("token id 60000 at position 2900000"), "{err}");
    assert!(TokenDataset::open(tmp.path(), "train", 65536).is_ok());
}

#[test]
fn dtype_comes_from_meta_json() {
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..100).map(|i| 70000 + i).collect();
    fs::write(tmp.path().join("val.bin"), ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    fs::write(tmp.path().join("meta.json"), r#"{"dtype": "uint32", "vocab_size": 200019}"#).unwrap();
    let ds = TokenDataset::open(tmp.path(), "val", 200019).unwrap();
    assert_eq!(ds.len(), 100);
    let (x, y) = ds.sequential_batch(0, 1, 99).unwrap();
    assert_eq!((x[0], y[98]), (70000, 70099));
    assert!(TokenDataset::open(tmp.path(), "val", 50257).is_err());
    fs::write(tmp.path().join("meta.json"), r#"{"dtype": "float32"}"#).unwrap();
    let err = TokenDataset::open(tmp.path(), "val", 200019).err().unwrap().to_string();
    assert!(err.contains("meta.json") && err.contains("unsupported dtype \"float32\""), "{err}");
}

#[test]
fn reads_what_prepare_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shk");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_prepare"))
        .args([concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt"), "--out", out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let train = TokenDataset::open(&out, "train", 50257).unwrap();
    let val = TokenDataset::open(&out, "val", 50257).unwrap();
    assert_eq!((train.len(), val.len()), (301966, 36059));
    // "First Citizen:\n" opens the play: nanoGPT's first tokens.
    let (x, y) = train.sequential_batch(0, 1, 4).unwrap();
    assert_eq!(x, [5962, 22307, 25, 198]);
    assert_eq!(y, [22307, 25, 198, 8421]);
}
