//! zero-to-fp32 on DeepSpeed checkpoints.
//!
//! tests/fixtures/deepspeed/<case>/ are real checkpoints written by DeepSpeed
//! (tools/gen_deepspeed_fixtures.py), each with DeepSpeed's own consolidation beside it
//! (reference.safetensors, reference_bf16.safetensors). zerokit must match them bit for bit.
//! Larger synthetic checkpoints, written here in the same pickle structure, test streaming
//! memory, and damaged copies of the fixtures test the errors.

use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
mod common;
#[path = "common/torch_zip.rs"]
mod torch_zip;

use zerokit::convert::{self, OutDtype};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepspeed")
}

fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("fixtures present")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("latest").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 6, "expected the generated fixture cases, found {v:?}");
    v
}

fn tensors(buf: &[u8]) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let st = SafeTensors::deserialize(buf).unwrap();
    st.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect()
}

#[test]
fn fixtures_match_deepspeeds_own_consolidation_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for case in cases() {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let out = tmp.path().join(format!("{name}.safetensors"));
        let src = convert::open_source(&case, None).unwrap();
        // DeepSpeed's order of names (buffers, frozen, trainable, tied) is kept.
        let reference = std::fs::read(case.join("reference.safetensors")).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&reference).unwrap();
        let ds_names: Vec<String> = serde_json::from_str(&meta.metadata().as_ref().unwrap()["names"]).unwrap();
        let ours: Vec<String> = src.describe().into_iter().map(|t| t.name).collect();
        assert_eq!(ours, ds_names, "{name}: tensor names or order differ");
        convert::convert(src.as_ref(), &common::convert_args(&case, &out)).unwrap();
        let got = tensors(&std::fs::read(&out).unwrap());
        let want = tensors(&reference);
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{name}");
        for (k, w) in &want {
            assert_eq!(&got[k], w, "{name}: {k} differs from DeepSpeed's consolidation");
        }
        // The bf16 output matches DeepSpeed's to(torch.bfloat16), integer buffers untouched.
        let out16 = tmp.path().join(format!("{name}-bf16.safetensors"));
        let mut a = common::convert_args(&case, &out16);
        a.dtype = OutDtype::Bf16;
        convert::run(&a).unwrap();
        let got = tensors(&std::fs::read(&out16).unwrap());
        let want = tensors(&std::fs::read(case.join("reference_bf16.safetensors")).unwrap());
        assert_eq!(got, want, "{name}: bf16 output differs");
    }
}

#[test]
fn exclude_frozen_drops_only_frozen_parameters() {
    let case = fixtures().join("s2_fp16_w4");
    let src = convert::open_source(&case, None).unwrap();
    let frozen: Vec<String> = src.describe().into_iter().filter(|t| t.frozen).map(|t| t.name).collect();
    assert_eq!(frozen, vec!["transformer.wpe.weight".to_string()]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let mut a = common::convert_args(&case, &out);
    a.exclude_frozen = true;
    let s = convert::run(&a).unwrap();
    let got = tensors(&std::fs::read(&out).unwrap());
    assert!(!got.contains_key("transformer.wpe.weight"));
    assert_eq!(s.tensors, src.describe().len() - 1);
}

#[test]
fn directory_output_is_sharded_with_an_index() {
    let case = fixtures().join("s3_bf16_w4");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    let mut a = common::convert_args(&case, &out);
    a.max_shard_size = "4KB".into();
    let s = convert::run(&a).unwrap();
    assert!(s.files.len() > 1, "{:?}", s.files);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let want = tensors(&std::fs::read(case.join("reference.safetensors")).unwrap());
    assert_eq!(map.len(), want.len());
    let mut total = 0u64;
    for f in &s.files {
        let buf = std::fs::read(out.join(f)).unwrap();
        for (k, v) in tensors(&buf) {
            assert_eq!(map[&k].as_str(), Some(f.as_str()));
            assert_eq!(v, want[&k], "{k}");
            total += v.2.len() as u64;
        }
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    // No temporary names are left beside the output.
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("hf")]);
}

#[test]
fn tag_selection_and_dry_run() {
    let case = fixtures().join("s1_bf16_w4");
    let tag = std::fs::read_to_string(case.join("latest")).unwrap().trim().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    // The tag directory itself, and --tag on the root, both work.
    let mut a = common::convert_args(&case.join(&tag), &out);
    a.dry_run = true;
    let s = convert::run(&a).unwrap();
    assert!(s.tensors > 10 && s.parameters > 1000);
    assert!(!out.exists(), "dry run wrote something");
    let mut a = common::convert_args(&case, &out);
    a.tag = Some("no_such_tag".into());
    let e = convert::run(&a).err().unwrap().to_string();
    assert!(e.contains("no_such_tag"), "{e}");
}

// ---------------------------------------------------------------- damaged inputs

fn copy_case(name: &str, to: &Path) -> PathBuf {
    let src = fixtures().join(name);
    let dst = to.join(name);
    let tag = std::fs::read_to_string(src.join("latest")).unwrap().trim().to_string();
    std::fs::create_dir_all(dst.join(&tag)).unwrap();
    std::fs::copy(src.join("latest"), dst.join("latest")).unwrap();
    for e in std::fs::read_dir(src.join(&tag)).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(&tag).join(e.file_name())).unwrap();
    }
    dst.join(tag)
}

fn fails_naming(ckpt: &Path, file_part: &str, what: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let e = convert::run(&common::convert_args(ckpt, &out)).expect_err("conversion should fail").to_string();
    assert!(e.contains(file_part), "error does not name {file_part}: {e}");
    assert!(e.to_lowercase().contains(what), "error does not say {what}: {e}");
    assert!(!out.exists());
}

#[test]
fn missing_rank_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_case("s2_fp16_w4", tmp.path());
    std::fs::remove_file(dir.join("zero_pp_rank_2_mp_rank_00_optim_states.pt")).unwrap();
    fails_naming(&dir, "zero_pp_rank_2_mp_rank_00_optim_states.pt", "missing");
    let dir3 = copy_case("s3_bf16_w4", tmp.path());
    std::fs::remove_file(dir3.join("zero_pp_rank_3_mp_rank_00_model_states.pt")).unwrap();
    fails_naming(&dir3, "zero_pp_rank_3_mp_rank_00_model_states.pt", "missing");
}

#[test]
fn mixed_world_sizes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_case("s2_bf16_w2", tmp.path());
    // A rank file left over from a 4-rank run of the same model.
    let w4 = fixtures().join("s2_bf16_w4");
    let tag4 = std::fs::read_to_string(w4.join("latest")).unwrap().trim().to_string();
    let f = "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt";
    std::fs::copy(w4.join(tag4).join(f), dir.join(f)).unwrap();
    fails_naming(&dir, f, "mixed world sizes");
    // And one rank replaced by a rank of the other run.
    let dir = copy_case("s2_bf16_w4", tmp.path().join("b").as_path());
    let w2 = fixtures().join("s2_bf16_w2");
    let tag2 = std::fs::read_to_string(w2.join("latest")).unwrap().trim().to_string();
    let f = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt";
    std::fs::copy(w2.join(tag2).join(f), dir.join(f)).unwrap();
    fails_naming(&dir, f, "mixed");
}

#[test]
fn truncated_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    for (case, file) in
        [("s2_fp16_w4", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), ("s1_bf16_w4", "mp_rank_00_model_states.pt")]
    {
        for keep in [0.3, 0.9, 0.999] {
            let dir = copy_case(case, &tmp.path().join(format!("{keep}")));
            let p = dir.join(file);
            let len = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len((len as f64 * keep) as u64).unwrap();
            fails_naming(&dir, file, "truncated");
        }
    }
}

#[test]
fn corrupted_pickle_storage_and_version_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let file = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt";
    // A damaged pickle opcode, with the CRC-32 a buggy writer would have recorded for it.
    let dir = copy_case("s2_bf16_w2", &tmp.path().join("a"));
    let mut buf = std::fs::read(dir.join(file)).unwrap();
    torch_zip::rewrite(&mut buf, "/data.pkl", |b| b[2] = 0xff);
    std::fs::write(dir.join(file), &buf).unwrap();
    fails_naming(&dir, file, "pickle");
    // Flipped bits in the fp32 weights: caught by the zip's CRC.
    let dir = copy_case("s2_bf16_w2", &tmp.path().join("b"));
    let mut buf = std::fs::read(dir.join(file)).unwrap();
    let src = zerokit::formats::torch_zip::TorchFile::open(&dir.join(file)).unwrap();
    let key = common::deepspeed_fp32_partition(&src).storage_key.clone();
    drop(src);
    let at = torch_zip::find(&buf, &format!("data/{key}")).unwrap().data;
    buf[at + 5] ^= 0x10;
    std::fs::write(dir.join(file), &buf).unwrap();
    fails_naming(&dir, file, "crc");
    // A serialization format version from the future (its CRC-32 recorded to match).
    let dir = copy_case("s2_bf16_w2", &tmp.path().join("c"));
    let mut buf = std::fs::read(dir.join(file)).unwrap();
    torch_zip::rewrite(&mut buf, "/version", |b| {
        assert_eq!(b[0], b'3');
        b[0] = b'9';
    });
    std::fs::write(dir.join(file), &buf).unwrap();
    fails_naming(&dir, file, "unknown serialization format version \"9\"");
}

/// A flipped byte inside data.pkl can leave a valid pickle that names a tensor differently: only
/// the CRC-32 the zip recorded for the entry shows it. zero-to-fp32 refuses, naming the file and
/// the entry, where it used to write the model with the tensor renamed.
#[test]
fn a_flipped_byte_in_the_pickle_is_caught_by_the_entry_crc() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_case("s2_bf16_w2", tmp.path());
    let file = "mp_rank_00_model_states.pt";
    let mut buf = std::fs::read(dir.join(file)).unwrap();
    let e = torch_zip::find(&buf, "/data.pkl").unwrap();
    let name = b"transformer.h.0.attn.c_attn.weight";
    let at = e.data + buf[e.data..e.data + e.size].windows(name.len()).rposition(|w| w == name).unwrap();
    // The last occurrence, in param_shapes, names the output tensor: ...c_attn.weighu.
    buf[at + name.len() - 1] ^= 1;
    std::fs::write(dir.join(file), &buf).unwrap();
    let out = tmp.path().join("o.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_zero-to-fp32")).arg(&dir).arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let want = format!("global_step3/{file}: zip entry mp_rank_00_model_states/data.pkl is corrupted: CRC-32 ");
    assert!(err.contains(&want), "no {want:?} in:\n{err}");
    assert!(!out.exists());
}

/// Two entries of one name: the second's bytes, with their own valid CRC-32, would stand in for
/// the first's. Here the model file's serialization id (40 bytes) takes the name of the integer
/// buffer stored before it (40 bytes), which zero-to-fp32 used to write as the buffer's values.
#[test]
fn a_zip_entry_named_twice_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_case("s2_bf16_w2", tmp.path());
    let file = "mp_rank_00_model_states.pt";
    let mut buf = std::fs::read(dir.join(file)).unwrap();
    let (id, buffer) =
        (torch_zip::find(&buf, "/.data/serialization_id").unwrap(), torch_zip::find(&buf, "/data/1").unwrap());
    assert!(id.size == buffer.size && id.data > buffer.data);
    torch_zip::rename(&mut buf, "/.data/serialization_id", "/data/1", true);
    std::fs::write(dir.join(file), &buf).unwrap();
    fails_naming(&dir, file, "entry mp_rank_00_model_states/data/1 appears twice");
}

/// The central directory alone damaged so that two storages of one size swap names: each name
/// then leads to the other's bytes, under the CRC-32 recorded for them. Here the fp32 master
/// partition and an Adam moment, which zero-to-fp32 used to convert as the weights; the local
/// headers still name each entry, and the reader compares.
#[test]
fn a_central_directory_at_odds_with_the_local_headers_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_case("s2_bf16_w2", tmp.path());
    let file = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt";
    let tf = zerokit::formats::torch_zip::TorchFile::open(&dir.join(file)).unwrap();
    let master = common::deepspeed_fp32_partition(&tf).storage_key.clone();
    drop(tf);
    let mut buf = std::fs::read(dir.join(file)).unwrap();
    let (m, moment) = (format!("/data/{master}"), "/data/1");
    assert_eq!(torch_zip::find(&buf, &m).unwrap().size, torch_zip::find(&buf, moment).unwrap().size);
    torch_zip::rename(&mut buf, moment, "/data/x", false);
    torch_zip::rename(&mut buf, &m, moment, false);
    torch_zip::rename(&mut buf, "/data/x", &m, false);
    std::fs::write(dir.join(file), &buf).unwrap();
    let want = format!("entry bf16_zero_pp_rank_0_mp_rank_00_optim_states/data/{master}: its local header at byte");
    fails_naming(&dir, file, &want);
}

/// A parameter shape whose element count overflows 64 bits (a pickle written wrong, under a valid
/// CRC-32): an error naming the file, where the count used to wrap (to 0 here, which converted
/// into a [2^40, 2^40] tensor with no bytes).
#[test]
fn shapes_beyond_64_bits_are_refused() {
    use torchsave::P;
    let tmp = tempfile::tempdir().unwrap();
    let dir = synthetic_stage2(tmp.path(), &[("w".into(), 0)], 1);
    let shapes = P::OrderedDict(vec![("w".into(), P::Size(vec![1 << 40, 1 << 40]))]);
    let model = P::Dict(vec![
        ("module".into(), P::OrderedDict(vec![])),
        ("buffer_names".into(), P::List(vec![])),
        ("param_shapes".into(), P::List(vec![shapes])),
        ("shared_params".into(), P::Dict(vec![])),
    ]);
    torchsave::save(&dir.join("mp_rank_00_model_states.pt"), &model, &[]);
    fails_naming(
        &dir,
        "mp_rank_00_model_states.pt",
        "w: shape [1099511627776, 1099511627776] has more elements than 64 bits count",
    );
}

/// Two ranks' optimizer files swapped (stage 3 partitions every parameter alike, so the files
/// agree in every size): torch named each archive after its file, and that name gives them away.
#[test]
fn rank_files_swapped_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_case("s3_bf16_w4", tmp.path());
    let (a, b) = ("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt");
    std::fs::rename(dir.join(a), dir.join("tmp")).unwrap();
    std::fs::rename(dir.join(b), dir.join(a)).unwrap();
    std::fs::rename(dir.join("tmp"), dir.join(b)).unwrap();
    fails_naming(
        &dir,
        a,
        "holds the archive torch wrote as bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt: the file was renamed, or swapped",
    );
}

#[test]
fn existing_output_is_not_replaced_without_force() {
    let case = fixtures().join("s1_bf16_w4");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    std::fs::write(&out, b"precious").unwrap();
    let e = convert::run(&common::convert_args(&case, &out)).err().unwrap().to_string();
    assert!(e.contains("o.safetensors") && e.contains("exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let mut a = common::convert_args(&case, &out);
    a.force = true;
    convert::run(&a).unwrap();
    assert_ne!(std::fs::read(&out).unwrap(), b"precious");
}

// ---------------------------------------------------------------- synthetic checkpoints

/// Minimal writer of torch.save's format (protocol-2 pickle in a stored zip), enough to lay out
/// a DeepSpeed stage-2 checkpoint of any size.
mod torchsave {
    use std::io::Write;

    pub enum P {
        Str(String),
        Int(i64),
        None,
        List(Vec<P>),
        Tuple(Vec<P>),
        Dict(Vec<(String, P)>),
        OrderedDict(Vec<(String, P)>),
        /// An IntEnum member, as DeepSpeed's ZeroStageEnum is pickled.
        Enum(&'static str, &'static str, i64),
        Size(Vec<i64>),
        /// A 1-D fp32 tensor over the whole storage `key` of `n` elements.
        F32(String, i64),
    }

    fn global(o: &mut Vec<u8>, m: &str, n: &str) {
        o.push(b'c');
        o.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
    }

    fn emit(p: &P, o: &mut Vec<u8>) {
        match p {
            P::Str(s) => {
                o.push(b'X');
                o.extend_from_slice(&(s.len() as u32).to_le_bytes());
                o.extend_from_slice(s.as_bytes());
            }
            P::Int(i) => {
                o.push(0x8a);
                o.push(8);
                o.extend_from_slice(&i.to_le_bytes());
            }
            P::None => o.push(b'N'),
            P::List(v) => {
                o.extend_from_slice(b"](");
                v.iter().for_each(|x| emit(x, o));
                o.push(b'e');
            }
            P::Tuple(v) => {
                o.push(b'(');
                v.iter().for_each(|x| emit(x, o));
                o.push(b't');
            }
            P::Dict(kv) | P::OrderedDict(kv) => {
                if matches!(p, P::Dict(_)) {
                    o.push(b'}');
                } else {
                    global(o, "collections", "OrderedDict");
                    o.extend_from_slice(b")R");
                }
                o.push(b'(');
                for (k, v) in kv {
                    emit(&P::Str(k.clone()), o);
                    emit(v, o);
                }
                o.push(b'u');
            }
            P::Enum(m, n, i) => {
                global(o, m, n);
                emit(&P::Tuple(vec![P::Int(*i)]), o);
                o.push(b'R');
            }
            P::Size(d) => {
                global(o, "torch", "Size");
                emit(&P::Tuple(vec![P::Tuple(d.iter().map(|&x| P::Int(x)).collect())]), o);
                o.push(b'R');
            }
            P::F32(key, n) => {
                global(o, "torch._utils", "_rebuild_tensor_v2");
                o.push(b'(');
                o.push(b'(');
                emit(&P::Str("storage".into()), o);
                global(o, "torch", "FloatStorage");
                emit(&P::Str(key.clone()), o);
                emit(&P::Str("cpu".into()), o);
                emit(&P::Int(*n), o);
                o.extend_from_slice(b"tQ");
                emit(&P::Int(0), o);
                emit(&P::Tuple(vec![P::Int(*n)]), o);
                emit(&P::Tuple(vec![P::Int(1)]), o);
                o.push(0x89);
                global(o, "collections", "OrderedDict");
                o.extend_from_slice(b")R");
                o.extend_from_slice(b"tR");
            }
        }
    }

    /// Writes `root` and the storages (key, little-endian bytes) as a torch zip.
    pub fn save(path: &std::path::Path, root: &P, storages: &[(String, Vec<u8>)]) {
        let mut pkl = vec![0x80, 2];
        emit(root, &mut pkl);
        pkl.push(b'.');
        let mut entries: Vec<(String, &[u8])> = vec![("archive/data.pkl".into(), &pkl)];
        for (k, b) in storages {
            entries.push((format!("archive/data/{k}"), b));
        }
        entries.push(("archive/version".into(), b"3\n"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        let mut cd = vec![];
        let mut off = 0u64;
        for (name, data) in &entries {
            let crc = crc32fast::hash(data);
            let mut h = vec![];
            h.extend_from_slice(&0x04034b50u32.to_le_bytes());
            h.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(name.as_bytes());
            f.write_all(&h).unwrap();
            f.write_all(data).unwrap();
            cd.extend_from_slice(&0x02014b50u32.to_le_bytes());
            cd.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            cd.extend_from_slice(&crc.to_le_bytes());
            cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
            cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
            cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&[0; 12]);
            cd.extend_from_slice(&(off as u32).to_le_bytes());
            cd.extend_from_slice(name.as_bytes());
            off += h.len() as u64 + data.len() as u64;
        }
        f.write_all(&cd).unwrap();
        let mut e = vec![];
        e.extend_from_slice(&0x06054b50u32.to_le_bytes());
        e.extend_from_slice(&[0; 4]);
        e.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        e.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        e.extend_from_slice(&(cd.len() as u32).to_le_bytes());
        e.extend_from_slice(&(off as u32).to_le_bytes());
        e.extend_from_slice(&[0, 0]);
        f.write_all(&e).unwrap();
        f.flush().unwrap();
    }
}

/// A stage-2 checkpoint of `params` (name, numel) over `world` ranks, one group, with element i
/// of the flat vector equal to i as f32 (exact below 2^24). Returns the tag directory.
fn synthetic_stage2(root: &Path, params: &[(String, i64)], world: i64) -> PathBuf {
    use torchsave::P;
    let dir = root.join("global_step1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(root.join("latest"), "global_step1").unwrap();
    let total: i64 = params.iter().map(|p| p.1).sum();
    let align = 2 * world;
    let padded = (total + align - 1) / align * align;
    let part = padded / world;
    let model = P::Dict(vec![
        ("module".into(), P::OrderedDict(vec![])),
        ("buffer_names".into(), P::List(vec![])),
        ("optimizer".into(), P::None),
        (
            "param_shapes".into(),
            P::List(vec![P::OrderedDict(params.iter().map(|(n, k)| (n.clone(), P::Size(vec![*k]))).collect())]),
        ),
        ("frozen_param_shapes".into(), P::None),
        ("shared_params".into(), P::Dict(vec![])),
        ("frozen_param_fragments".into(), P::None),
        ("dp_world_size".into(), P::Int(world)),
        ("ds_version".into(), P::Str("0.19.8".into())),
    ]);
    torchsave::save(&dir.join("mp_rank_00_model_states.pt"), &model, &[]);
    for r in 0..world {
        // Rank r's slice without the group's tail padding, as DeepSpeed saves it.
        let lo = r * part;
        let hi = ((r + 1) * part).min(total);
        let n = (hi - lo).max(0);
        let data: Vec<u8> = (lo..lo + n).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let osd = P::Dict(vec![
            ("zero_stage".into(), P::Enum("deepspeed.runtime.zero.config", "ZeroStageEnum", 2)),
            ("partition_count".into(), P::List(vec![P::Int(world)])),
            ("single_partition_of_fp32_groups".into(), P::List(vec![P::F32("0".into(), n)])),
            ("base_optimizer_state".into(), P::Dict(vec![])),
        ]);
        let root = P::Dict(vec![("optimizer_state_dict".into(), osd), ("ds_version".into(), P::Str("0.19.8".into()))]);
        torchsave::save(
            &dir.join(format!("zero_pp_rank_{r}_mp_rank_00_optim_states.pt")),
            &root,
            &[("0".into(), data)],
        );
    }
    dir
}

#[test]
fn synthetic_layout_values_land_where_they_belong() {
    let tmp = tempfile::tempdir().unwrap();
    // Sizes that straddle rank boundaries and leave tail padding.
    let params: Vec<(String, i64)> =
        [7, 130, 1, 61, 333].iter().enumerate().map(|(i, &n)| (format!("p{i}"), n)).collect();
    let dir = synthetic_stage2(tmp.path(), &params, 4);
    let out = tmp.path().join("o.safetensors");
    convert::run(&common::convert_args(tmp.path(), &out)).unwrap();
    let got = tensors(&std::fs::read(&out).unwrap());
    let mut base = 0;
    for (n, k) in &params {
        let want: Vec<u8> = (base..base + k).flat_map(|i| (i as f32).to_le_bytes()).collect();
        assert_eq!(got[n].2, want, "{n}");
        base += k;
    }
    // Shapes that disagree with the partitions are refused: model states of a larger model.
    let mut bad = params.clone();
    bad[4].1 += 9;
    let other = synthetic_stage2(&tmp.path().join("other"), &bad, 4);
    std::fs::copy(other.join("mp_rank_00_model_states.pt"), dir.join("mp_rank_00_model_states.pt")).unwrap();
    let e =
        convert::run(&common::convert_args(tmp.path(), &tmp.path().join("p.safetensors"))).err().unwrap().to_string();
    assert!(e.contains("disagree") || e.contains("shorter"), "{e}");
}

/// Streaming: 256 MB of weights in 16 MiB tensors, converted by 2 threads in 4 MiB units, must
/// not hold the model: peak RSS above the dry run's (same process set-up, pickles parsed, no
/// data) stays under two tensors' worth, where holding the ranks or the output would cost 256 MB. Each tensor spans several units and most span two ranks' files; element i
/// of the flat group holds the value i, so every value checks where it landed.
#[test]
fn peak_memory_is_bounded_by_threads_not_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let n = (4 << 20) + 3; // a little over 16 MiB of fp32 per parameter
    let params: Vec<(String, i64)> = (0..16).map(|i| (format!("layer{i}.weight"), n)).collect();
    synthetic_stage2(tmp.path(), &params, 4);
    let out = tmp.path().join("out");
    common::assert_conversion_streams(tmp.path(), &out, (n * 4) as f64 / 1048576.0);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let mut seen = 0;
    for (name, file) in index["weight_map"].as_object().unwrap() {
        let k: i64 = name.trim_start_matches("layer").trim_end_matches(".weight").parse().unwrap();
        let buf = std::fs::read(out.join(file.as_str().unwrap())).unwrap();
        let st = SafeTensors::deserialize(&buf).unwrap();
        let data = st.tensor(name).unwrap().data().to_vec();
        assert_eq!(data.len() as i64, n * 4, "{name}");
        for (j, c) in data.chunks_exact(4).enumerate() {
            let want = (k * n + j as i64) as f32;
            assert_eq!(f32::from_le_bytes(c.try_into().unwrap()), want, "{name}[{j}]");
        }
        seen += 1;
    }
    assert_eq!(seen, 16);
}

#[test]
fn full_disk_leaves_no_partial_output_and_names_the_file() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let params: Vec<(String, i64)> = (0..4).map(|i| (format!("w{i}"), 1 << 18)).collect();
    synthetic_stage2(tmp.path(), &params, 2);
    let out = tmp.path().join("model.safetensors");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zero-to-fp32"));
    cmd.arg(tmp.path()).arg(&out);
    // A 1 MiB file-size limit makes writes fail as on a full disk (EFBIG instead of ENOSPC).
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 1 << 20, rlim_max: 1 << 20 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("model.safetensors") && err.contains("too large"), "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().contains("model.safetensors")), "{left:?}");
    let _ = std::io::stdout().flush();
}
