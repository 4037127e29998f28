//! The fuzz targets (docs/fuzzing.md). Each feeds bytes to one of zerokit's readers through the
//! entry points the tools use and asserts the rule: no panic, no hang, bounded memory, and never
//! a clean exit with different tensors. Where the format records integrity data (the CRC-32 of
//! every zip entry of a torch file), a read that succeeds after damage must give exactly the
//! tensors of the undamaged file, computed once from the real DeepSpeed fixtures; where it records
//! none (a safetensors header, manifest.json), a reader may accept changed bytes, and the rule is
//! that it says what is wrong or reads them consistently.
//!
//! Written once, included by path by both drivers: the coverage-guided cargo-fuzz crate (fuzz/)
//! and the bounded run of the test suite (tests/fuzz.rs).
#![allow(dead_code)]

#[path = "torch_zip.rs"]
mod torch_zip;

use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use zerokit::checkpoint::{self, PartitionReader};
use zerokit::formats::source::{ShardedSource, TensorInfo};
use zerokit::formats::torch_pickle::{TensorRef, Value};
use zerokit::formats::torch_zip::TorchFile;
use zerokit::interop::deepspeed::DeepSpeedSource;
use zerokit::interop::zerokit_source::ZerokitSource;

pub type Target = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz target and of its corpus directory.
pub const TARGETS: [(&str, Target); 5] = [
    ("torch_zip", torch_zip),
    ("torch_pickle", torch_pickle),
    ("deepspeed", deepspeed),
    ("safetensors", safetensors),
    ("manifest", manifest),
];

/// The repository root, from either driver's crate.
pub fn repo() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if dir.join("tests/fixtures").is_dir() {
        dir.to_path_buf()
    } else {
        dir.parent().expect("the fuzz crate lies in the repository").to_path_buf()
    }
}

pub fn corpus_dir(target: &str) -> PathBuf {
    repo().join("fuzz/corpus").join(target)
}

/// A scratch directory, in memory where the system has one: targets write a file per execution.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let b =
        tempfile::Builder::new().prefix("zerokit-fuzz").tempdir_in(if shm.is_dir() { shm } else { Path::new("/tmp") });
    b.or_else(|_| tempfile::tempdir()).expect("a temporary directory")
}

// ---------------------------------------------------------------------------------------------
// The DeepSpeed fixtures and what they hold

/// One file of a DeepSpeed fixture tag: the torch and DeepSpeed targets replace it.
pub struct Slot {
    pub dir: PathBuf,
    pub file: String,
    pub bytes: Vec<u8>,
    /// The decoded pickle, as `Debug` prints it: what identifies the file's contents.
    root: String,
}

/// What reading a fixture gives, computed once from the undamaged files.
struct Fixtures {
    slots: Vec<Slot>,
    /// torch_digest of every fixture file.
    torch: HashSet<[u8; 32]>,
    /// Per tag directory, every tensor DeepSpeedSource reads from it.
    deepspeed: HashMap<PathBuf, Vec<(TensorInfo, Vec<u8>)>>,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let root = repo().join("tests/fixtures/deepspeed");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
            .expect("tests/fixtures/deepspeed")
            .flatten()
            .filter_map(|case| {
                let tag = std::fs::read_to_string(case.path().join("latest")).ok()?;
                Some(case.path().join(tag.trim()))
            })
            .collect();
        dirs.sort();
        let (mut slots, mut torch, mut deepspeed) = (Vec::new(), HashSet::new(), HashMap::new());
        for dir in dirs {
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".pt"))
                .collect();
            files.sort();
            for file in files {
                let bytes = std::fs::read(dir.join(&file)).unwrap();
                let tf = TorchFile::from_bytes(&dir.join(&file), bytes.clone()).expect("fixture opens");
                torch.insert(torch_digest(&tf).expect("fixture reads"));
                slots.push(Slot { dir: dir.clone(), file, bytes, root: format!("{:?}", tf.root()) });
            }
            let read = read_deepspeed(&dir).expect("fixture converts");
            deepspeed.insert(dir, read);
        }
        assert!(slots.len() <= 256, "a one-byte selector names a slot");
        Fixtures { slots, torch, deepspeed }
    })
}

pub fn slots() -> &'static [Slot] {
    &fixtures().slots
}

/// The slot that an input's first byte selects, and the rest of the input.
fn select(data: &[u8]) -> Option<(&'static Slot, &[u8])> {
    let (&sel, rest) = data.split_first()?;
    Some((&slots()[sel as usize % slots().len()], rest))
}

fn tensor_refs<'a>(v: &'a Value, out: &mut Vec<&'a TensorRef>) {
    match v {
        Value::Tensor(t) => out.push(t),
        Value::List(xs) | Value::Tuple(xs) => xs.iter().for_each(|x| tensor_refs(x, out)),
        Value::Dict(kv) => kv.iter().for_each(|(k, x)| {
            tensor_refs(k, out);
            tensor_refs(x, out)
        }),
        Value::Object { args, state, items, .. } => {
            args.iter().for_each(|x| tensor_refs(x, out));
            state.iter().for_each(|s| tensor_refs(s, out));
            items.iter().for_each(|(k, x)| {
                tensor_refs(k, out);
                tensor_refs(x, out)
            });
        }
        _ => {}
    }
}

/// A digest of everything a torch file holds: its decoded pickle (names, shapes, dtypes of
/// every tensor) and the bytes of every tensor, each storage checked against its CRC-32 first.
fn torch_digest(tf: &TorchFile) -> Result<[u8; 32], String> {
    let mut h = Sha256::new();
    h.update(format!("{:?}", tf.root()).as_bytes());
    let mut refs = Vec::new();
    tensor_refs(tf.root(), &mut refs);
    let mut checked = HashSet::new();
    for t in refs {
        if checked.insert(&t.storage_key) {
            tf.verify_storage(t).map_err(|e| e.to_string())?;
        }
        let (start, len) = tf.tensor_span(t).map_err(|e| e.to_string())?;
        h.update(tf.bytes(start, len));
    }
    Ok(h.finalize().into())
}

/// What zero-to-fp32 reads from a DeepSpeed tag directory: every tensor and its bytes.
fn read_deepspeed(dir: &Path) -> Result<Vec<(TensorInfo, Vec<u8>)>, String> {
    let src = DeepSpeedSource::open(dir).map_err(|e| e.to_string())?;
    let _ = src.format();
    src.prepare().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for t in src.describe() {
        let mut buf = vec![0u8; t.numel() as usize * t.dtype.size()];
        src.read_range(&t.name, 0, &mut buf).map_err(|e| e.to_string())?;
        out.push((t, buf));
    }
    Ok(out)
}

/// The slot's tag directory with `file` in place of the slot's file (the others linked).
fn tag_with(slot: &Slot, file: &[u8]) -> tempfile::TempDir {
    let tmp = scratch();
    for e in std::fs::read_dir(&slot.dir).unwrap().flatten() {
        let name = e.file_name();
        if name.to_string_lossy() == slot.file {
            std::fs::write(tmp.path().join(&name), file).unwrap();
        } else {
            std::os::unix::fs::symlink(e.path(), tmp.path().join(&name)).unwrap();
        }
    }
    tmp
}

// ---------------------------------------------------------------------------------------------
// The targets

/// A whole torch file (the bytes of a fixture's `*_states.pt`). CRC-32s guard every entry, so
/// if it opens and every tensor reads, it must be one of the fixtures, tensor for tensor.
pub fn torch_zip(data: &[u8]) {
    let Ok(tf) = TorchFile::from_bytes(Path::new("fuzz.pt"), data.to_vec()) else { return };
    if let Ok(d) = torch_digest(&tf) {
        assert!(fixtures().torch.contains(&d), "a damaged torch file read cleanly, with contents no fixture has");
    }
}

/// A selector byte, then a pickle put in place of the selected fixture file's data.pkl (cut or
/// zero-padded to its length) with its CRC-32 recorded to match: the damage a buggy or hostile
/// writer could leave, which no checksum catches. The file is read alone and in its tag
/// directory; any outcome but a panic, a hang or unbounded memory is allowed.
pub fn torch_pickle(data: &[u8]) {
    let Some((slot, pkl)) = select(data) else { return };
    let mut file = slot.bytes.clone();
    torch_zip::rewrite(&mut file, "/data.pkl", |b| {
        let n = pkl.len().min(b.len());
        b[..n].copy_from_slice(&pkl[..n]);
        b[n..].fill(0);
    });
    let Ok(tf) = TorchFile::from_bytes(&slot.dir.join(&slot.file), file.clone()) else { return };
    let _ = torch_digest(&tf);
    drop(tf);
    let tag = tag_with(slot, &file);
    let _ = read_deepspeed(tag.path());
}

/// A selector byte, then the bytes of the selected fixture file, in its tag directory. If
/// zero-to-fp32's reader succeeds, it must read the fixture's tensors exactly, unless the bytes
/// are another intact torch file (a different pickle passes its CRC only if it is one).
pub fn deepspeed(data: &[u8]) {
    let Some((slot, file)) = select(data) else { return };
    let tag = tag_with(slot, file);
    let Ok(got) = read_deepspeed(tag.path()) else { return };
    if got != fixtures().deepspeed[&slot.dir] {
        let pickle = TorchFile::from_bytes(Path::new("fuzz.pt"), file.to_vec()).map(|tf| format!("{:?}", tf.root()));
        assert!(
            pickle.is_ok_and(|p| p != slot.root),
            "{}/{} damaged: DeepSpeedSource read it cleanly, with different tensors",
            slot.dir.display(),
            slot.file
        );
    }
}

/// A safetensors file: `ckpt verify`'s header check (header::parse_header) and the safetensors
/// crate that zerokit loads with. What the check accepts, the crate must read the same way.
pub fn safetensors(data: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    let ours = zerokit::ckpt::header::parse_header(path, data.len() as u64, &mut &data[..]);
    let theirs = safetensors::SafeTensors::deserialize(data);
    match (ours, theirs) {
        (Ok(h), theirs) => {
            let st =
                theirs.unwrap_or_else(|e| panic!("the header check accepts a file the safetensors crate refuses: {e}"));
            assert_eq!(st.len(), h.tensors.len(), "tensor counts differ");
            for t in &h.tensors {
                let v = st.tensor(&t.name).unwrap_or_else(|e| panic!("{}: {e}", t.name));
                assert_eq!(v.dtype(), t.dtype, "{}", t.name);
                assert_eq!(v.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(), t.shape, "{}", t.name);
                let at = v.data().as_ptr() as usize - data.as_ptr() as usize;
                assert_eq!((at as u64, v.data().len() as u64), (h.span(t).0, t.bytes()), "{}", t.name);
            }
            let (_, meta) = safetensors::SafeTensors::read_metadata(data).expect("deserialized above");
            let meta: std::collections::BTreeMap<String, String> =
                meta.metadata().clone().unwrap_or_default().into_iter().collect();
            assert_eq!(meta, h.metadata, "metadata differs");
        }
        (Err(_), Ok(st)) => {
            for (_, v) in st.tensors() {
                let _ = (v.dtype(), v.shape(), v.data().len());
            }
        }
        (Err(_), Err(_)) => {}
    }
}

/// A manifest.json, alone in its tag directory: read_manifest either refuses it or returns a
/// layout every reader can index without a check of its own. Rank pieces are then checked to
/// lie in range and to hold every parameter element exactly once (when that is cheap), and
/// the readers zero-to-fp32 and resume open must fail cleanly on the missing rank files.
pub fn manifest(data: &[u8]) {
    let tmp = scratch();
    std::fs::write(tmp.path().join("manifest.json"), data).unwrap();
    let Ok(m) = checkpoint::read_manifest(tmp.path()) else { return };
    let l = &m.layout;
    let _ = l.num_params();
    for i in 0..l.params.len() {
        let _ = l.flat_offset(i);
    }
    if l.parts.saturating_mul(l.params.len() + l.buckets.len()) <= 1 << 20 {
        let mut held: Vec<Vec<(usize, usize)>> = vec![Vec::new(); l.params.len()];
        for r in 0..l.parts {
            let mut used = Vec::new();
            for pc in l.pieces(r) {
                let p = &l.params[pc.param];
                assert!(pc.param_offset + pc.len <= p.numel, "rank {r}: a piece past the end of {}", p.name);
                assert!(pc.partition_offset + pc.len <= l.partition, "rank {r}: a piece past its partition");
                used.push((pc.partition_offset, pc.len));
                held[pc.param].push((pc.param_offset, pc.len));
            }
            used.sort();
            assert!(used.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0), "rank {r}: pieces overlap");
        }
        for (p, mut h) in l.params.iter().zip(held) {
            h.sort();
            let mut pos = 0;
            for (off, len) in h {
                assert_eq!(off, pos, "{}: the partitions do not tile it", p.name);
                pos += len;
            }
            assert_eq!(pos, p.numel, "{}: the partitions do not hold all of it", p.name);
        }
    }
    assert!(PartitionReader::open(tmp.path()).is_err(), "opened without rank files");
    assert!(ZerokitSource::open(tmp.path()).is_err(), "opened without rank files");
}

// ---------------------------------------------------------------------------------------------
// Seeds

/// The inputs each target starts from, taken from the real fixtures: (corpus file name, bytes).
/// The safetensors and manifest targets also start from files of a tiny zerokit run, committed
/// in their corpora (docs/fuzzing.md).
pub fn fixture_seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let f = fixtures();
    // Per case, its rank-0 optimizer file and its (rank-0) model file.
    let chosen =
        f.slots.iter().enumerate().filter(|(_, s)| s.file.contains("rank_0_") || s.file.starts_with("mp_rank"));
    let name = |s: &Slot| format!("seed-{}-{}", s.dir.parent().unwrap().file_name().unwrap().to_string_lossy(), s.file);
    match target {
        "torch_zip" => chosen.map(|(_, s)| (name(s), s.bytes.clone())).collect(),
        "deepspeed" => chosen.map(|(i, s)| (name(s), [&[i as u8][..], &s.bytes].concat())).collect(),
        "torch_pickle" => chosen
            .map(|(i, s)| {
                let e = torch_zip::find(&s.bytes, "/data.pkl").expect("a data.pkl entry");
                (name(s), [&[i as u8][..], &s.bytes[e.data..e.data + e.size]].concat())
            })
            .collect(),
        "safetensors" => {
            let case = f.slots[0].dir.parent().unwrap();
            ["reference.safetensors", "reference_bf16.safetensors"]
                .iter()
                .map(|n| (format!("seed-{n}"), std::fs::read(case.join(n)).unwrap()))
                .collect()
        }
        _ => vec![],
    }
}
