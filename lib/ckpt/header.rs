//! A safetensors header read and checked field by field, so a damaged file gets a message that
//! says what is wrong (which tensor, which bytes) rather than a parser's refusal.
//!
//! The format: an 8-byte little-endian header length N, N bytes of JSON (an object mapping
//! tensor names to `{dtype, shape, data_offsets}`, plus an optional `__metadata__` object of
//! strings), then the data region. `data_offsets` are [begin, end) byte offsets into the data
//! region; each tensor's span must be exactly its dtype size times its element count, and the
//! spans must tile the data region with no gap, no overlap and nothing after the last one.

use safetensors::Dtype;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Headers larger than this are refused (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// [begin, end) within the data region.
    pub begin: u64,
    pub end: u64,
}

impl HeaderTensor {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> u64 {
        self.end - self.begin
    }
}

/// A checked header: every span in range, sized for its dtype and shape, the spans tiling the
/// data region exactly.
#[derive(Debug, Clone)]
pub struct Header {
    pub path: PathBuf,
    pub file_len: u64,
    /// Absolute offset of the data region (8 + header length).
    pub data_start: u64,
    pub metadata: BTreeMap<String, String>,
    /// In data order.
    pub tensors: Vec<HeaderTensor>,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&HeaderTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Absolute byte range of a tensor's data in the file.
    pub fn span(&self, t: &HeaderTensor) -> (u64, u64) {
        (self.data_start + t.begin, self.data_start + t.end)
    }
}

/// Reads and checks the header of `path`. On failure, every problem found, each a full line
/// naming the file.
pub fn read_header(path: &Path) -> Result<Header, Vec<String>> {
    let one = |msg: String| vec![format!("{}: {msg}", path.display())];
    let mut f = File::open(path).map_err(|e| one(format!("cannot open: {e}")))?;
    let file_len = f.metadata().map_err(|e| one(format!("cannot stat: {e}")))?.len();
    parse_header(path, file_len, &mut f)
}

/// [`read_header`] of a file of `file_len` bytes whose beginning `f` reads (`path` only names it
/// in messages).
pub fn parse_header(path: &Path, file_len: u64, f: &mut impl Read) -> Result<Header, Vec<String>> {
    let line = |msg: String| format!("{}: {msg}", path.display());
    let one = |msg: String| vec![line(msg)];
    if file_len < 8 {
        return Err(one(format!("{file_len} bytes, too short for a safetensors file (8-byte header length)")));
    }
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).map_err(|e| one(format!("cannot read the header length: {e}")))?;
    let n = u64::from_le_bytes(len8);
    if n > file_len - 8 {
        return Err(one(format!(
            "header length {n} runs past the end of the file ({file_len} bytes): truncated, or not a safetensors file"
        )));
    }
    if n > MAX_HEADER {
        return Err(one(format!("header length {n} exceeds the {MAX_HEADER}-byte limit")));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(|e| one(format!("cannot read the {n}-byte header: {e}")))?;
    let text = std::str::from_utf8(&head).map_err(|e| one(format!("header is not UTF-8 ({e})")))?;
    let json: Value = serde_json::from_str(text).map_err(|e| one(format!("header is not valid JSON ({e})")))?;
    let Value::Object(obj) = json else {
        return Err(one("header is not a JSON object".into()));
    };
    // A JSON object keeps the last of two equal keys; the safetensors crate reads (and may
    // refuse) every one, so a name given twice would be checked here in one form and read there
    // in another.
    if let Some(name) = repeated_key(text) {
        return Err(one(format!("{name} appears twice in the header")));
    }

    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut problems = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, v) in &obj {
        if name == "__metadata__" {
            match v.as_object() {
                Some(m) => {
                    for (k, x) in m {
                        match x.as_str() {
                            Some(s) => {
                                metadata.insert(k.clone(), s.to_string());
                            }
                            None => problems.push(line(format!("__metadata__ entry {k:?} is {x}, not a string"))),
                        }
                    }
                }
                None => problems.push(line("__metadata__ is not an object of strings".into())),
            }
            continue;
        }
        match tensor_entry(name, v) {
            Ok(t) => tensors.push(t),
            Err(msg) => problems.push(line(format!("tensor {name}: {msg}"))),
        }
    }

    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    // Tiling: walk the spans in order. An empty tensor too must sit where the spans before it
    // end, as the safetensors crate (which zerokit loads with) requires.
    let mut pos = 0u64;
    let mut last: Option<&str> = None;
    for t in &tensors {
        if t.end > data_len {
            problems.push(line(format!(
                "tensor {} ends at byte {} of the data region, but the file holds only {data_len} data bytes (truncated?)",
                t.name, t.end
            )));
        }
        if t.begin > pos {
            problems.push(line(format!(
                "bytes {pos}..{} of the data region belong to no tensor (a gap before {})",
                t.begin, t.name
            )));
        } else if t.begin < pos {
            problems.push(line(format!(
                "tensor {} (bytes {}..{}) overlaps tensor {} (which ends at byte {pos})",
                t.name,
                t.begin,
                t.end,
                last.unwrap_or("?")
            )));
        }
        if t.end > pos {
            pos = t.end;
            last = Some(&t.name);
        }
    }
    if pos < data_len {
        problems.push(line(format!(
            "{} bytes after the last tensor's data (bytes {pos}..{data_len} of the data region) belong to no tensor",
            data_len - pos
        )));
    }
    if problems.is_empty() {
        Ok(Header { path: path.to_path_buf(), file_len, data_start, metadata, tensors })
    } else {
        Err(problems)
    }
}

fn tensor_entry(name: &str, v: &Value) -> Result<HeaderTensor, String> {
    let obj = v.as_object().ok_or_else(|| format!("entry is {v}, not an object"))?;
    if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets")) {
        return Err(format!("unexpected field {k:?}"));
    }
    let dname = obj.get("dtype").ok_or("no dtype")?;
    let dtype: Dtype = dname
        .as_str()
        .and_then(|s| serde_json::from_value(Value::String(s.to_string())).ok())
        .ok_or_else(|| format!("unknown dtype {dname}"))?;
    let shape_v = obj.get("shape").ok_or("no shape")?;
    let shape: Vec<u64> = shape_v
        .as_array()
        .and_then(|a| a.iter().map(Value::as_u64).collect())
        .ok_or_else(|| format!("shape {shape_v} is not a list of non-negative integers"))?;
    let off_v = obj.get("data_offsets").ok_or("no data_offsets")?;
    let offs: Vec<u64> = off_v
        .as_array()
        .and_then(|a| a.iter().map(Value::as_u64).collect())
        .filter(|o: &Vec<u64>| o.len() == 2)
        .ok_or_else(|| format!("data_offsets {off_v} is not a pair of non-negative integers"))?;
    let (begin, end) = (offs[0], offs[1]);
    if begin > end {
        return Err(format!("data_offsets [{begin}, {end}] end before they begin"));
    }
    let bits = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.bitsize() as u64))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if bits % 8 != 0 {
        return Err(format!("{dtype} {shape:?} is not a whole number of bytes"));
    }
    if end - begin != bits / 8 {
        return Err(format!(
            "data_offsets [{begin}, {end}] hold {} bytes, but {dtype} {shape:?} needs {}",
            end - begin,
            bits / 8
        ));
    }
    Ok(HeaderTensor { name: name.to_string(), dtype, shape, begin, end })
}

/// The first top-level key of a JSON object that appears twice, if any.
fn repeated_key(text: &str) -> Option<String> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut repeated = None;
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if repeated.is_none() && !seen.insert(k.clone()) {
                    repeated = Some(k);
                }
            }
            Ok(repeated)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    serde::Deserializer::deserialize_map(&mut de, Keys).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(dir: &Path, header: &str, data: usize) -> PathBuf {
        let p = dir.join("t.safetensors");
        let mut f = File::create(&p).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(&vec![0u8; data]).unwrap();
        p
    }

    fn problems(header: &str, data: usize) -> String {
        let d = tempfile::tempdir().unwrap();
        read_header(&file(d.path(), header, data)).unwrap_err().join("\n")
    }

    #[test]
    fn accepts_a_well_formed_file_and_agrees_with_the_crate() {
        let d = tempfile::tempdir().unwrap();
        let h = r#"{"__metadata__":{"k":"v"},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"e":{"dtype":"I64","shape":[0],"data_offsets":[22,22]}}"#;
        let p = file(d.path(), h, 22);
        let got = read_header(&p).unwrap();
        assert_eq!(got.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b", "e"]);
        assert_eq!(got.metadata["k"], "v");
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for t in &got.tensors {
            let v = st.tensor(&t.name).unwrap();
            assert_eq!(v.dtype(), t.dtype);
            assert_eq!(v.data().len() as u64, t.bytes());
            assert_eq!(v.data().as_ptr() as u64 - bytes.as_ptr() as u64, got.span(t).0);
        }
    }

    #[test]
    fn names_what_is_wrong() {
        let ok = r#""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
        assert!(problems(&format!("{{{ok}}}"), 12).contains("4 bytes after the last tensor"));
        assert!(problems(&format!("{{{ok}}}"), 6)
            .contains("tensor a ends at byte 8 of the data region, but the file holds only 6"));
        let p = problems(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8);
        assert!(p.contains("tensor a: data_offsets [0, 8] hold 8 bytes, but F32 [3] needs 12"), "{p}");
        let p = problems(&format!(r#"{{{ok},"b":{{"dtype":"F16","shape":[2],"data_offsets":[6,10]}}}}"#), 10);
        assert!(p.contains("tensor b (bytes 6..10) overlaps tensor a"), "{p}");
        let p = problems(&format!(r#"{{{ok},"b":{{"dtype":"F16","shape":[2],"data_offsets":[10,14]}}}}"#), 14);
        assert!(p.contains("bytes 8..10 of the data region belong to no tensor"), "{p}");
        assert!(
            problems(r#"{"a":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}}"#, 8).contains("unknown dtype \"F31\"")
        );
        assert!(problems(r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, 8)
            .contains("not a list of non-negative"));
        assert!(
            problems(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, 8).contains("end before they begin")
        );
        assert!(problems(r#"{"a": 3}"#, 0).contains("not an object"));
        assert!(problems(r#"{"a"#, 0).contains("not valid JSON"));
        assert!(problems(r#"{"__metadata__":{"k":1}}"#, 0).contains("not a string"));
        // An empty tensor inside another's span: no bytes overlap, but the crate refuses it.
        let p = problems(&format!(r#"{{{ok},"e":{{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}}}"#), 8);
        assert!(p.contains("tensor e (bytes 4..4) overlaps tensor a"), "{p}");
        let h = format!(r#"{{{ok},"e":{{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}}}"#);
        let bytes = [&(h.len() as u64).to_le_bytes()[..], h.as_bytes(), &[0; 8]].concat();
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_err());
        // A name given twice, the first time with a dtype the crate refuses (a fuzzing find):
        // a JSON object would keep only the second.
        let h = format!(r#"{{"a":{{"dtype":"Bt","shape":[2],"data_offsets":[0,8]}},{ok}}}"#);
        let bytes = [&(h.len() as u64).to_le_bytes()[..], h.as_bytes(), &[0; 8]].concat();
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_err());
        assert!(problems(&h, 8).contains("a appears twice in the header"), "{}", problems(&h, 8));
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("short");
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert!(read_header(&p).unwrap_err()[0].contains("too short"));
        std::fs::write(&p, 1000u64.to_le_bytes()).unwrap();
        assert!(read_header(&p).unwrap_err()[0].contains("header length 1000 runs past the end of the file (8 bytes)"));
    }
}
