//! `ckpt verify`: is a checkpoint intact? One line per problem, each naming its file.
//!
//! zerokit tags: every file's size and sha256 against the manifest; every safetensors header
//! checked field by field (header.rs); the manifest's layout self-consistent, its partitions
//! tiling every parameter exactly once, padding exactly as the format declares it; shapes and
//! counts agreeing across the manifest, its model config, config.json, model.safetensors and the
//! rank files; the padding positions of every rank file zero (always: only those bytes are
//! read). `--scan` reads every value: NaN/Inf, negative second moments, and model.safetensors
//! against the fp32 master weights rounded to the model dtype.
//!
//! DeepSpeed tags: the structure DeepSpeedSource checks when it opens a tag (every rank's files,
//! stage and world size agreeing, partition sizes against param_shapes), plus the CRC-32 the
//! zip recorded for every storage of every file; `--scan` adds NaN/Inf in every float storage.

use super::header::{read_header, Header};
use super::{list_root, tag_dir, CkptError, Format, RootListing, Target, VerifyArgs};
use crate::checkpoint::{self, FileEntry, Manifest, PartitionReader, TagFile, PARTITION_TENSORS};
use crate::formats::dtype::{cast, DType};
use crate::formats::source::{units, ShardedSource};
use crate::formats::tags::{valid_tag_name, Latest};
use crate::formats::torch_pickle::{TensorRef, Value};
use crate::formats::torch_zip::TorchFile;
use crate::interop::deepspeed::{self, DeepSpeedSource};
use crate::interop::{hf, hf_model};
use crate::logging;
use crate::model::ModelConfig;
use crate::zero::layout::{FlatLayout, Piece};
use indicatif::ProgressBar;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tracing::info;

/// What verify found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// What was checked, one entry per tag or file.
    pub checked: Vec<String>,
    /// One line per problem, each naming its file.
    pub problems: Vec<String>,
    /// Harmless findings (an interrupted save's directory).
    pub notes: Vec<String>,
    /// Files verify could not read at all (permission denied, I/O errors, not the format they
    /// claim to be): nothing can be said of them, so the exit status is 2, not 1.
    pub unreadable: Vec<String>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty() && self.unreadable.is_empty()
    }

    /// 0 when intact, 1 when damaged, 2 when something could not be read (also what an `Err`
    /// from [`verify`] means).
    pub fn exit_code(&self) -> i32 {
        match (self.unreadable.is_empty(), self.problems.is_empty()) {
            (false, _) => 2,
            (true, false) => 1,
            (true, true) => 0,
        }
    }
}

/// Runs every check on `args.path`. `Err` means there was nothing verify could read (no such
/// path, not a known checkpoint format, no such tag).
pub fn verify(args: &VerifyArgs) -> Result<VerifyReport, CkptError> {
    let mut r = VerifyReport { unreadable: unreadable_files(&args.path), ..Default::default() };
    match super::detect(&args.path)? {
        Target::Root(format, root) => {
            let listing = list_root(&root, format)?;
            for p in &listing.partial {
                let what = checkpoint::leftover(p).map_or("a leftover", |(kind, _)| kind.describe());
                r.notes.push(format!("{}: {what}", root.join(p).display()));
            }
            let tags = match &args.tag {
                Some(t) => vec![tag_dir(&root, &listing, t)?],
                None => {
                    check_latest(&root, &listing, format, &mut r);
                    listing.tags.iter().map(|t| root.join(t)).collect()
                }
            };
            for t in tags {
                verify_tag(format, &t, args.scan, &mut r);
            }
        }
        Target::Tag(format, dir) => verify_tag(format, &dir, args.scan, &mut r),
        Target::SafetensorsFile(path) => {
            r.checked.push(path.display().to_string());
            if super::safetensors_content(&path) {
                r.problems.extend(check_safetensors(&path, args.scan));
            } else if r.unreadable.is_empty() {
                r.unreadable.push(line(&path, "not a safetensors file (no JSON header after the 8-byte length)"));
            }
        }
        Target::HfDir(dir) => {
            r.checked.push(dir.display().to_string());
            r.problems.extend(check_hf_dir(&dir, args.scan));
        }
    }
    // The same fault can surface through two checks with the same words; say it once.
    let mut seen = BTreeSet::new();
    r.problems.retain(|p| seen.insert(p.clone()));
    for n in &r.notes {
        info!("{n}");
    }
    info!(
        "checked {}: {}",
        r.checked.join(", "),
        if r.is_intact() { "intact".to_string() } else { format!("{} problem(s)", r.problems.len()) }
    );
    Ok(r)
}

/// Every file under `path` (itself, or two levels of a root's tags) that cannot be opened and read,
/// each a line naming it. A missing file is damage, reported by the checks; this is for files
/// that exist but that this user or the disk cannot read.
fn unreadable_files(path: &Path) -> Vec<String> {
    fn probe(p: &Path, depth: usize, out: &mut Vec<String>) {
        let Ok(meta) = std::fs::metadata(p) else { return };
        if meta.is_dir() {
            if depth == 0 {
                return;
            }
            match std::fs::read_dir(p) {
                Ok(rd) => rd.flatten().for_each(|e| probe(&e.path(), depth - 1, out)),
                Err(e) => out.push(line(p, format!("cannot be read: {e}"))),
            }
        } else if meta.is_file() {
            let mut one = [0u8; 1];
            if let Err(e) = File::open(p).and_then(|f| f.read_at(&mut one, 0)) {
                out.push(line(p, format!("cannot be read: {e}")));
            }
        }
    }
    let mut out = Vec::new();
    probe(path, 2, &mut out);
    out.sort();
    out
}

fn verify_tag(format: Format, dir: &Path, scan: bool, r: &mut VerifyReport) {
    r.checked.push(dir.display().to_string());
    let problems = match format {
        Format::Zerokit => verify_zerokit_tag(dir, scan),
        _ => verify_deepspeed_tag(dir, scan),
    };
    r.problems.extend(problems);
}

/// `latest` must name a complete tag. DeepSpeed can save without one (`save_latest=False`);
/// zerokit always writes it.
fn check_latest(root: &Path, listing: &RootListing, format: Format, r: &mut VerifyReport) {
    let path = root.join("latest");
    // A first save puts its tag in place, then writes `latest`: a crash between the two leaves
    // one complete tag and no `latest`, which `train` writes when it resumes here. With two
    // tags `latest` has existed, so its absence is damage.
    if format == Format::Zerokit
        && listing.latest == Latest::Missing
        && listing.tags.len() == 1
        && root.join(&listing.tags[0]).join("manifest.json").is_file()
    {
        r.notes.push(format!(
            "{}: missing; the first save stopped before writing it (harmless: resuming writes it, naming {})",
            path.display(),
            listing.tags[0]
        ));
        return;
    }
    let complete = |d: &Path| match format {
        Format::Zerokit => d.join("manifest.json").is_file(),
        _ => deepspeed::is_deepspeed_dir(d),
    };
    let problem = match &listing.latest {
        Latest::Missing if format == Format::Zerokit => {
            Some("missing: nothing names the newest complete tag".to_string())
        }
        Latest::Missing => {
            r.notes.push(format!("{}: none (DeepSpeed loads need an explicit tag)", path.display()));
            None
        }
        Latest::Bad(what) => Some(what.clone()),
        Latest::Names(name) if !root.join(name).is_dir() => Some(format!("names tag {name:?}, which does not exist")),
        Latest::Names(name) if !complete(&root.join(name)) => {
            Some(format!("names tag {name:?}, which is not a complete checkpoint (no manifest.json)"))
        }
        Latest::Names(_) => None,
    };
    if let Some(p) = problem {
        r.problems.push(format!("{}: {p}", path.display()));
    }
}

// ---------------------------------------------------------------------------------------------
// zerokit

fn line(path: &Path, msg: impl std::fmt::Display) -> String {
    format!("{}: {msg}", path.display())
}

/// Every check of one zerokit tag directory.
pub fn verify_zerokit_tag(dir: &Path, scan: bool) -> Vec<String> {
    let mpath = dir.join("manifest.json");
    if !mpath.is_file() {
        return vec![line(&mpath, "missing: the tag is incomplete (an interrupted save, or the file was removed)")];
    }
    let m = match checkpoint::read_manifest(dir) {
        Ok(m) => m,
        Err(e) => return vec![e.to_string()],
    };
    let mut p = manifest_problems(dir, &m);
    let layout = super::layout::layout_problems(&m.layout, &mpath);
    let layout_ok = layout.is_empty();
    p.extend(layout);
    let parts = if layout_ok { m.layout.parts } else { 0 };

    // Which files the tag must hold, and whether the manifest lists them.
    let mut required = vec!["model.safetensors".to_string(), hf::CONFIG_FILE.to_string()];
    required.extend((0..parts).map(checkpoint::rank_file_name));
    for name in &required {
        if !m.files.contains_key(name) {
            p.push(line(&mpath, format!("does not list {name}")));
            if !dir.join(name).is_file() {
                p.push(line(&dir.join(name), "missing"));
            }
        }
    }
    let listed: Vec<(&String, &FileEntry)> = m
        .files
        .iter()
        .filter(|(name, _)| {
            let ok = valid_tag_name(name) && *name != "manifest.json";
            if !ok {
                p.push(line(&mpath, format!("lists {name:?}, not a file of the tag directory")));
            }
            ok
        })
        .collect();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("rank_") && name.ends_with(".safetensors") && parts > 0 && !required.contains(&name) {
                p.push(line(
                    &e.path(),
                    format!("a rank file beyond the layout's {parts} partitions (left from another run?)"),
                ));
            }
        }
    }

    // Sizes and hashes, in parallel: on a large checkpoint this is the disk-bound bulk of the work.
    let total: u64 = listed.iter().map(|(_, e)| e.bytes).sum();
    let pb = logging::progress_bar(total, "verify {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}");
    pb.set_message(dir.file_name().unwrap_or_default().to_string_lossy().into_owned());
    let hashed: Vec<String> = listed
        .par_iter()
        .filter_map(|(name, entry)| {
            let r = checkpoint::check_file(dir, name, entry);
            pb.inc(entry.bytes);
            r
        })
        .collect();
    pb.finish_and_clear();
    p.extend(hashed);

    // config.json against the manifest's model config.
    let cfg = ModelConfig::from_manifest(&m.model_config).ok();
    let cpath = dir.join(hf::CONFIG_FILE);
    if cpath.is_file() {
        match hf_model::read_config(&cpath) {
            Ok(c) if cfg.as_ref() != Some(&c) => {
                p.push(line(&cpath, format!("describes {c:?}, manifest.json's model_config is {}", m.model_config)))
            }
            Ok(_) => {}
            Err(e) => p.push(e.to_string()),
        }
    }

    // model.safetensors: one tensor per parameter, in the model dtype.
    let model_path = dir.join("model.safetensors");
    let model = if model_path.is_file() {
        match read_header(&model_path) {
            Ok(h) => {
                let before = p.len();
                p.extend(model_file_problems(&h, &m));
                (p.len() == before).then_some(h)
            }
            Err(lines) => {
                p.extend(lines);
                None
            }
        }
    } else {
        None
    };

    // Rank files: their tensors, metadata and padding.
    let gaps: Vec<Vec<(usize, usize)>> = (0..parts).map(|r| padding_ranges(&m.layout, r)).collect();
    let ranks: Vec<(Option<Header>, Vec<String>)> = (0..parts)
        .into_par_iter()
        .map(|r| {
            let path = dir.join(checkpoint::rank_file_name(r));
            if !path.is_file() {
                return (None, vec![]); // reported above, as missing or unlisted
            }
            let h = match read_header(&path) {
                Ok(h) => h,
                Err(lines) => return (None, lines),
            };
            let mut q = rank_file_problems(&h, &m, r);
            if q.is_empty() {
                q.extend(padding_problems(&h, &gaps[r]));
            }
            (q.is_empty().then_some(h), q)
        })
        .collect();
    let mut all_ranks_ok = parts > 0;
    let mut headers = Vec::new();
    for (h, q) in ranks {
        all_ranks_ok &= h.is_some();
        headers.extend(h);
        p.extend(q);
    }

    if scan && layout_ok {
        p.extend(scan_rank_files(&headers, &m.layout));
        match &model {
            Some(h) if all_ranks_ok => p.extend(scan_model_file(dir, h, &m)),
            Some(h) => p.extend(scan_safetensors_values(h)),
            None => {}
        }
    }
    p
}

/// The manifest against itself: tag name, distribution, dtypes, layout, model config.
fn manifest_problems(dir: &Path, m: &Manifest) -> Vec<String> {
    let mpath = dir.join("manifest.json");
    let mut p = Vec::new();
    let mut bad = |msg: String| p.push(line(&mpath, msg));
    let dir_name = dir.file_name().unwrap_or_default().to_string_lossy();
    if m.tag != dir_name {
        bad(format!("tag {:?}, but the directory is named {dir_name:?}", m.tag));
    }
    if m.world_size == 0 {
        bad("world_size is 0".into());
    }
    match crate::zero::layout::parts_for(m.world_size, m.zero_stage) {
        Err(e) => bad(e),
        Ok(want) if m.layout.parts != want => bad(format!(
            "layout has {} partitions, but world_size {} at ZeRO stage {} needs {want}",
            m.layout.parts, m.world_size, m.zero_stage
        )),
        Ok(_) => {}
    }
    for (role, allowed) in [("model", &["F32", "F16", "BF16"][..]), ("master", &["F32"]), ("optimizer", &["F32"])] {
        match m.dtypes.get(role) {
            Some(d) if allowed.contains(&d.as_str()) => {}
            Some(d) => bad(format!("dtypes.{role} is {d:?}, expected one of {allowed:?}")),
            None => bad(format!("dtypes.{role} is missing")),
        }
    }
    if m.optimizer.get("step").and_then(|s| s.as_u64()).is_none() {
        bad("optimizer.step is missing".into());
    }
    match ModelConfig::from_manifest(&m.model_config) {
        Err(e) => p.push(line(&mpath, format!("model_config: {e}"))),
        Ok(cfg) => {
            let want: BTreeMap<String, Vec<usize>> = cfg
                .param_specs()
                .into_iter()
                .map(|s| (s.name, s.shape.iter().map(|&d| d as usize).collect()))
                .collect();
            let have: BTreeMap<String, Vec<usize>> =
                m.layout.params.iter().map(|s| (s.name.clone(), s.shape.clone())).collect();
            p.extend(compare_tables(&mpath, "model_config", &want, "layout", &have));
        }
    }
    p
}

/// Differences between two name -> shape tables, at most a few lines.
fn compare_tables(
    path: &Path,
    a_name: &str,
    a: &BTreeMap<String, Vec<usize>>,
    b_name: &str,
    b: &BTreeMap<String, Vec<usize>>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (k, sa) in a {
        match b.get(k) {
            None => diffs.push(format!("{k} is in the {a_name} but not in the {b_name}")),
            Some(sb) if sa != sb => diffs.push(format!("{k} has shape {sb:?} in the {b_name}, {sa:?} in the {a_name}")),
            _ => {}
        }
    }
    diffs.extend(
        b.keys().filter(|k| !a.contains_key(*k)).map(|k| format!("{k} is in the {b_name} but not in the {a_name}")),
    );
    const SHOWN: usize = 4;
    let n = diffs.len();
    let mut out: Vec<String> = diffs.into_iter().take(SHOWN).map(|d| line(path, d)).collect();
    if n > SHOWN {
        out.push(line(path, format!("{} more differences between the {a_name} and the {b_name}", n - SHOWN)));
    }
    out
}

/// The positions of rank `r`'s partition that no parameter covers, as [start, end) ranges.
/// Only for a layout that passed `layout_problems`.
pub fn padding_ranges(l: &FlatLayout, r: usize) -> Vec<(usize, usize)> {
    let mut pieces = l.pieces(r);
    pieces.sort_by_key(|pc| pc.partition_offset);
    let mut gaps = Vec::new();
    let mut pos = 0;
    for pc in &pieces {
        if pc.partition_offset > pos {
            gaps.push((pos, pc.partition_offset));
        }
        pos = pc.partition_offset + pc.len;
    }
    if pos < l.partition {
        gaps.push((pos, l.partition));
    }
    gaps
}

fn model_file_problems(h: &Header, m: &Manifest) -> Vec<String> {
    let mut p: Vec<String> =
        checkpoint::identity_problems(TagFile::Model, &h.metadata, m).into_iter().map(|q| line(&h.path, q)).collect();
    let want_dtype = m.dtypes.get("model").map(String::as_str).unwrap_or("?");
    for t in &h.tensors {
        if t.dtype.to_string() != want_dtype {
            p.push(line(&h.path, format!("{} is {}, manifest.json's model dtype is {want_dtype}", t.name, t.dtype)));
        }
    }
    let want: BTreeMap<String, Vec<usize>> =
        m.layout.params.iter().map(|s| (s.name.clone(), s.shape.clone())).collect();
    let have: BTreeMap<String, Vec<usize>> =
        h.tensors.iter().map(|t| (t.name.clone(), t.shape.iter().map(|&d| d as usize).collect())).collect();
    p.extend(compare_tables(&h.path, "manifest's layout", &want, "model file", &have));
    p
}

fn rank_file_problems(h: &Header, m: &Manifest, r: usize) -> Vec<String> {
    let mut p = Vec::new();
    let mut bad = |msg: String| p.push(line(&h.path, msg));
    for name in PARTITION_TENSORS {
        match h.get(name) {
            None => bad(format!("has no tensor {name}")),
            Some(t) if t.dtype != safetensors::Dtype::F32 || t.shape != [m.layout.partition as u64] => bad(format!(
                "{name} is {} {:?}, the layout's partition is F32 [{}]",
                t.dtype, t.shape, m.layout.partition
            )),
            _ => {}
        }
    }
    for t in &h.tensors {
        if !PARTITION_TENSORS.contains(&t.name.as_str()) {
            bad(format!("unexpected tensor {}", t.name));
        }
    }
    checkpoint::identity_problems(TagFile::Rank(r), &h.metadata, m).into_iter().for_each(bad);
    p
}

/// Reads `[start, start+len)` of a file in chunks of at most CHUNK bytes.
const CHUNK: u64 = 8 << 20;

fn for_chunks(path: &Path, start: u64, len: u64, mut f: impl FnMut(u64, &[u8])) -> Result<(), String> {
    let file = File::open(path).map_err(|e| line(path, e))?;
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut off = 0;
    while off < len {
        let n = CHUNK.min(len - off) as usize;
        file.read_exact_at(&mut buf[..n], start + off)
            .map_err(|e| line(path, format!("read at byte {}: {e}", start + off)))?;
        f(off, &buf[..n]);
        off += n as u64;
    }
    Ok(())
}

/// Padding must be zero in all three partition tensors: anything else is data where the
/// layout says none lies (a layout/file mismatch, or a write past a parameter).
fn padding_problems(h: &Header, gaps: &[(usize, usize)]) -> Vec<String> {
    let mut p = Vec::new();
    for name in PARTITION_TENSORS {
        let t = h.get(name).expect("checked by rank_file_problems");
        let (start, _) = h.span(t);
        let (mut count, mut first) = (0u64, None);
        for &(a, b) in gaps {
            let r = for_chunks(&h.path, start + 4 * a as u64, 4 * (b - a) as u64, |off, bytes| {
                for (k, c) in bytes.chunks_exact(4).enumerate() {
                    if f32::from_le_bytes(c.try_into().expect("4 bytes")) != 0.0 {
                        count += 1;
                        first.get_or_insert(a + off as usize / 4 + k);
                    }
                }
            });
            if let Err(e) = r {
                p.push(e);
            }
        }
        if let Some(i) = first {
            p.push(line(&h.path, format!("{name} holds {count} non-zero value(s) in padding, where no parameter lies (first at partition element {i})")));
        }
    }
    p
}

/// Non-finite values, and negative ones where a tensor must be non-negative.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    nonfinite: u64,
    first_nonfinite: Option<(u64, f64)>,
    negative: u64,
    first_negative: Option<(u64, f64)>,
}

impl Tally {
    fn add(&mut self, i: u64, x: f64) {
        if !x.is_finite() {
            self.nonfinite += 1;
            self.first_nonfinite.get_or_insert((i, x));
        } else if x < 0.0 {
            self.negative += 1;
            self.first_negative.get_or_insert((i, x));
        }
    }

    /// Tallies little-endian elements of `dtype` (floats only; others are skipped) starting at
    /// element `base`.
    fn add_bytes(&mut self, bytes: &[u8], dtype: DType, base: u64) {
        match dtype {
            DType::F32 => bytes.chunks_exact(4).enumerate().for_each(|(k, c)| {
                self.add(base + k as u64, f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            }),
            DType::F64 => bytes
                .chunks_exact(8)
                .enumerate()
                .for_each(|(k, c)| self.add(base + k as u64, f64::from_le_bytes(c.try_into().expect("8 bytes")))),
            DType::F16 => bytes
                .chunks_exact(2)
                .enumerate()
                .for_each(|(k, c)| self.add(base + k as u64, half::f16::from_le_bytes([c[0], c[1]]).to_f64())),
            DType::BF16 => bytes
                .chunks_exact(2)
                .enumerate()
                .for_each(|(k, c)| self.add(base + k as u64, half::bf16::from_le_bytes([c[0], c[1]]).to_f64())),
            _ => {}
        }
    }
}

/// Where a partition element lies: a parameter element, or padding.
fn locate(l: &FlatLayout, pieces: &[Piece], i: u64) -> String {
    let i = i as usize;
    let k = pieces.partition_point(|pc| pc.partition_offset + pc.len <= i);
    match pieces.get(k) {
        Some(pc) if pc.partition_offset <= i => {
            format!("{} element {}", l.params[pc.param].name, pc.param_offset + i - pc.partition_offset)
        }
        _ => "padding".into(),
    }
}

/// `--scan` of the rank files: every value of master, exp_avg, exp_avg_sq finite; exp_avg_sq
/// non-negative.
fn scan_rank_files(headers: &[Header], l: &FlatLayout) -> Vec<String> {
    let total: u64 = headers.iter().map(|h| h.file_len).sum();
    let pb = logging::progress_bar(total, "scan [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}");
    let out = headers
        .par_iter()
        .flat_map_iter(|h| {
            let r: usize = h.metadata.get("rank").and_then(|s| s.parse().ok()).unwrap_or(0);
            let mut pieces = l.pieces(r);
            pieces.sort_by_key(|pc| pc.partition_offset);
            let mut p = Vec::new();
            for name in PARTITION_TENSORS {
                let t = h.get(name).expect("checked by rank_file_problems");
                let mut tally = Tally::default();
                let (s, e) = h.span(t);
                if let Err(err) = for_chunks(&h.path, s, e - s, |off, b| {
                    tally.add_bytes(b, DType::F32, off / 4);
                    pb.inc(b.len() as u64);
                }) {
                    p.push(err);
                }
                if let Some((i, x)) = tally.first_nonfinite {
                    p.push(line(&h.path, format!("{name} holds {} non-finite value(s) (first: {x} at partition element {i}, {})", tally.nonfinite, locate(l, &pieces, i))));
                }
                if let (Some((i, x)), "exp_avg_sq") = (tally.first_negative, name) {
                    p.push(line(&h.path, format!("exp_avg_sq holds {} negative value(s), impossible for a second moment (first: {x} at partition element {i}, {})", tally.negative, locate(l, &pieces, i))));
                }
            }
            p
        })
        .collect();
    pb.finish_and_clear();
    out
}

/// `--scan` of model.safetensors: finite, and equal to the fp32 master weights rounded to the
/// model dtype (the engine publishes the model from the master before every save).
fn scan_model_file(dir: &Path, h: &Header, m: &Manifest) -> Vec<String> {
    let reader = match PartitionReader::open(dir) {
        Ok(r) => r,
        Err(e) => return vec![e.to_string()],
    };
    let Some(dtype) = m.dtypes.get("model").and_then(|d| DType::from_safetensors_name(d)) else {
        return vec![];
    };
    let es = dtype.size() as u64;
    h.tensors
        .par_iter()
        .flat_map_iter(|t| {
            let mut p = Vec::new();
            let (s, e) = h.span(t);
            let mut tally = Tally::default();
            let (mut differ, mut first_diff) = (0u64, None);
            let mut master = Vec::new();
            let (mut master_bytes, mut want, mut have32) = (Vec::new(), Vec::new(), Vec::new());
            let r = for_chunks(&h.path, s, e - s, |off, bytes| {
                let base = off / es;
                tally.add_bytes(bytes, dtype, base);
                master.resize(bytes.len() / es as usize, 0f32);
                if let Err(err) = reader.read("master", &t.name, base as usize, &mut master) {
                    p.push(err.to_string());
                    return;
                }
                master_bytes.clear();
                master_bytes.extend(master.iter().flat_map(|x| x.to_le_bytes()));
                cast(&master_bytes, DType::F32, dtype, &mut want);
                if want != bytes {
                    cast(bytes, dtype, DType::F32, &mut have32);
                    for (k, (a, b)) in bytes.chunks_exact(es as usize).zip(want.chunks_exact(es as usize)).enumerate() {
                        if a != b {
                            differ += 1;
                            let here = f32::from_le_bytes(have32[4 * k..4 * k + 4].try_into().expect("4 bytes"));
                            first_diff.get_or_insert((base + k as u64, here, master[k]));
                        }
                    }
                }
            });
            if let Err(err) = r {
                p.push(err);
            }
            if let Some((i, x)) = tally.first_nonfinite {
                p.push(line(&h.path, format!("{} holds {} non-finite value(s) (first: {x} at element {i})", t.name, tally.nonfinite)));
            }
            if let Some((i, here, master)) = first_diff {
                p.push(line(&h.path, format!(
                    "{} differs from the fp32 master weights in the rank files at {differ} element(s) (first: element {i} is {here} here, {master} in the master)",
                    t.name
                )));
            }
            p
        })
        .collect()
}

/// `--scan` of any safetensors file: every float value finite.
fn scan_safetensors_values(h: &Header) -> Vec<String> {
    h.tensors
        .par_iter()
        .filter_map(|t| {
            let dtype = DType::from_safetensors(t.dtype).filter(|d| d.is_float())?;
            let mut tally = Tally::default();
            let (s, e) = h.span(t);
            if let Err(err) =
                for_chunks(&h.path, s, e - s, |off, b| tally.add_bytes(b, dtype, off / dtype.size() as u64))
            {
                return Some(err);
            }
            let (i, x) = tally.first_nonfinite?;
            Some(line(
                &h.path,
                format!("{} holds {} non-finite value(s) (first: {x} at element {i})", t.name, tally.nonfinite),
            ))
        })
        .collect()
}

fn check_safetensors(path: &Path, scan: bool) -> Vec<String> {
    match read_header(path) {
        Ok(h) if scan => scan_safetensors_values(&h),
        Ok(_) => vec![],
        Err(lines) => lines,
    }
}

/// A Hugging Face directory: config.json is JSON, every weight file's header is sound, and a
/// shard index agrees with the shards.
fn check_hf_dir(dir: &Path, scan: bool) -> Vec<String> {
    let mut p = Vec::new();
    let cpath = dir.join(hf::CONFIG_FILE);
    match std::fs::read_to_string(&cpath) {
        Err(e) => p.push(line(&cpath, e)),
        Ok(s) => {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&s) {
                p.push(line(&cpath, format!("not valid JSON ({e})")));
            }
        }
    }
    let (files, index) = match super::hf_weight_files(dir) {
        Ok(x) => x,
        Err(e) => {
            p.push(e.to_string());
            return p;
        }
    };
    for f in &files {
        let path = dir.join(f);
        match read_header(&path) {
            Err(lines) => p.extend(lines),
            Ok(h) => {
                if let Some((ipath, map)) = &index {
                    for t in &h.tensors {
                        if map.get(&t.name) != Some(f) {
                            p.push(line(
                                ipath,
                                format!("{} is stored in {f} but the index lists it in {:?}", t.name, map.get(&t.name)),
                            ));
                        }
                    }
                    for (name, file) in map.iter().filter(|(_, file)| *file == f) {
                        if h.get(name).is_none() {
                            p.push(line(ipath, format!("lists {name} in {file}, which does not hold it")));
                        }
                    }
                }
                if scan {
                    p.extend(scan_safetensors_values(&h));
                }
            }
        }
    }
    p
}

// ---------------------------------------------------------------------------------------------
// DeepSpeed

/// Every check of one DeepSpeed tag directory.
pub fn verify_deepspeed_tag(dir: &Path, scan: bool) -> Vec<String> {
    let mut p = Vec::new();
    // Structure: DeepSpeedSource refuses a tag whose files disagree, naming the file.
    let src = match DeepSpeedSource::open(dir) {
        Ok(src) => Some(src),
        Err(e) => {
            p.push(e.to_string());
            None
        }
    };
    let world = src.as_ref().map(|s| s.world_size());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|f| f.to_string_lossy().ends_with("_states.pt")).collect())
        .unwrap_or_default();
    files.sort();
    let total: u64 = files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    let pb = logging::progress_bar(total, "verify {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}");
    pb.set_message(dir.file_name().unwrap_or_default().to_string_lossy().into_owned());
    let per_file: Vec<String> = files.par_iter().flat_map_iter(|f| check_torch_file(f, world, scan, &pb)).collect();
    pb.finish_and_clear();
    p.extend(per_file);
    // The fp32 master weights are scanned through the consolidation plan: stage 3 leaves the
    // padding of its per-parameter partitions uninitialized (torch.empty), so whole storages
    // may hold NaN where no parameter lies.
    if let (true, Some(src)) = (scan && p.is_empty(), src.as_ref()) {
        let mut buf = Vec::new();
        'tensors: for t in src.describe().into_iter().filter(|t| t.dtype.is_float()) {
            let mut tally = Tally::default();
            let size = t.dtype.size() as u64;
            for (e0, n) in units(t.numel()) {
                buf.resize((n * size) as usize, 0);
                if let Err(e) = src.read_range(&t.name, e0 * size, &mut buf) {
                    p.push(e.to_string());
                    continue 'tensors;
                }
                tally.add_bytes(&buf, t.dtype, e0);
            }
            if let Some((i, x)) = tally.first_nonfinite {
                p.push(line(
                    dir,
                    format!("{} holds {} non-finite value(s) (first: {x} at element {i})", t.name, tally.nonfinite),
                ));
            }
        }
    }
    p
}

/// Storages of the fp32 master partitions, scanned through the plan instead (see above).
fn is_master_partition(at: &str) -> bool {
    at.contains("single_partition_of_fp32_groups") || at.contains("fp32_flat_groups")
}

/// Every tensor reference in a decoded pickle, with where it sits ("optimizer_state_dict.
/// base_optimizer_state.state.0.exp_avg").
fn tensor_refs<'a>(v: &'a Value, at: &str, out: &mut Vec<(String, &'a TensorRef)>) {
    let join = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    let key = |k: &Value| match k {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => "?".into(),
    };
    match v {
        Value::Tensor(t) => out.push((at.to_string(), t)),
        Value::List(xs) | Value::Tuple(xs) => {
            xs.iter().enumerate().for_each(|(i, x)| tensor_refs(x, &join(&i.to_string()), out))
        }
        Value::Dict(items) => items.iter().for_each(|(k, x)| tensor_refs(x, &join(&key(k)), out)),
        Value::Object { args, state, items, .. } => {
            args.iter().for_each(|x| tensor_refs(x, at, out));
            if let Some(s) = state {
                tensor_refs(s, at, out);
            }
            items.iter().for_each(|(k, x)| tensor_refs(x, &join(&key(k)), out));
        }
        _ => {}
    }
}

/// One torch file: it opens, its model states agree on the world size, every storage matches
/// the CRC-32 the zip recorded, and with `scan` every float storage is finite.
fn check_torch_file(path: &Path, world: Option<usize>, scan: bool, pb: &ProgressBar) -> Vec<String> {
    let tf = match TorchFile::open(path) {
        Ok(f) => f,
        Err(e) => return vec![e.to_string()],
    };
    let mut p = Vec::new();
    if let (Some(w), Some(dp)) = (world, tf.root().get("dp_world_size").and_then(Value::as_int)) {
        if dp != w as i64 {
            p.push(line(path, format!("dp_world_size {dp}, but the optimizer files were saved by {w} ranks")));
        }
    }
    let mut refs = Vec::new();
    tensor_refs(tf.root(), "", &mut refs);
    let mut seen = BTreeSet::new();
    for (at, t) in refs {
        if !seen.insert(t.storage_key.clone()) {
            continue;
        }
        if let Err(e) = tf.verify_storage(t) {
            p.push(format!("{e} (holding {at})"));
            continue;
        }
        // The whole storage, whatever view of it the pickle names.
        let whole = TensorRef {
            storage_key: t.storage_key.clone(),
            dtype: t.dtype,
            storage_numel: t.storage_numel,
            offset: 0,
            shape: vec![t.storage_numel],
            stride: vec![1],
        };
        let (start, len) = match tf.tensor_span(&whole) {
            Ok(s) => s,
            Err(e) => {
                p.push(format!("{e} (holding {at})"));
                continue;
            }
        };
        if scan && t.dtype.is_float() && !is_master_partition(&at) {
            let mut tally = Tally::default();
            let es = t.dtype.size() as u64;
            let mut off = 0;
            while off < len {
                let n = (CHUNK / es * es).min(len - off);
                tally.add_bytes(tf.bytes(start + off, n), t.dtype, off / es);
                tf.release(start + off, n);
                off += n;
            }
            if let Some((i, x)) = tally.first_nonfinite {
                p.push(line(
                    path,
                    format!("{at} holds {} non-finite value(s) (first: {x} at element {i})", tally.nonfinite),
                ));
            }
            if let (Some((i, x)), true) = (tally.first_negative, at.ends_with("exp_avg_sq")) {
                p.push(line(
                    path,
                    format!(
                        "{at} holds {} negative value(s), impossible for a second moment (first: {x} at element {i})",
                        tally.negative
                    ),
                ));
            }
        }
    }
    pb.inc(path.metadata().map(|m| m.len()).unwrap_or(0));
    p
}
