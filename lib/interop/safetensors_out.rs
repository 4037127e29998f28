//! Safetensors output: the header is computed from shapes and dtypes alone, so every tensor's
//! place in the file is known before any is read and tensors can be written at their offsets,
//! never holding a whole model. Also the
//! Hugging Face sharding convention (`model-0000K-of-0000N.safetensors` +
//! `model.safetensors.index.json`).

use crate::interop::torch_pickle::DType;
use std::collections::BTreeMap;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsOutError {
    #[error("write failed: {0}")]
    Io(#[from] io::Error),
    #[error("bad size {0:?}: expected a number with an optional unit (KB, MB, GB, KiB, MiB, GiB)")]
    BadSize(String),
}

/// What a tensor in the output will be.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// The header (length prefix included) for `tensors` laid out back to back in the given order.
pub fn header_bytes(tensors: &[TensorSpec], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings serialize"));
    }
    let mut off = 0u64;
    for t in tensors {
        let n = t.nbytes();
        map.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [off, off + n] }),
        );
        off += n;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).expect("json serializes");
    // Pad so the data starts 8-byte aligned, as the reference implementation does; readers
    // that map the file can then view tensors in place.
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// Splits tensors, in order, into shards of at most `max_bytes` each (a tensor larger than
/// that gets a shard of its own), as transformers does. Returns index lists.
pub fn plan_shards(tensors: &[TensorSpec], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut cur: Vec<usize> = vec![];
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes();
        if !cur.is_empty() && size + n > max_bytes {
            shards.push(std::mem::take(&mut cur));
            size = 0;
        }
        cur.push(i);
        size += n;
    }
    if !cur.is_empty() || shards.is_empty() {
        shards.push(cur);
    }
    shards
}

/// `model.safetensors` for one shard, `model-0000K-of-0000N.safetensors` otherwise (K from 1).
pub fn shard_file_name(k: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
    }
}

/// The `model.safetensors.index.json` contents.
pub fn index_json(weight_map: &BTreeMap<String, String>, total_size: u64) -> serde_json::Value {
    serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map })
}

/// Reads `--max-shard-size` ([`crate::units::parse_size`]); a shard holds at least one byte.
pub fn parse_shard_size(s: &str) -> Result<u64, SafetensorsOutError> {
    crate::units::parse_size(s).ok().filter(|&n| n >= 1).ok_or_else(|| SafetensorsOutError::BadSize(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
    }

    #[test]
    fn header_then_tensors_in_order_reads_back_with_the_safetensors_crate() {
        let specs = vec![spec("b", DType::F32, &[2, 3]), spec("a", DType::BF16, &[3]), spec("i", DType::I64, &[1])];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let f: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut buf = header_bytes(&specs, &meta);
        buf.extend_from_slice(&f);
        buf.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        buf.extend_from_slice(&7i64.to_le_bytes());
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &f[..]);
        assert_eq!(st.tensor("b").unwrap().shape(), &[2, 3]);
        assert_eq!(st.tensor("a").unwrap().data(), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(st.tensor("i").unwrap().dtype(), safetensors::Dtype::I64);
        assert_eq!(st.tensor("i").unwrap().data(), &7i64.to_le_bytes());
        let (_, m) = safetensors::SafeTensors::read_metadata(&buf).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["format"], "pt");
        assert_eq!((u64::from_le_bytes(buf[..8].try_into().unwrap()) + 8) % 8, 0);
    }

    #[test]
    fn shards_split_greedily_and_big_tensors_stand_alone() {
        let specs: Vec<_> = [10, 10, 30, 5, 5].iter().map(|&n| spec("t", DType::U8, &[n])).collect();
        assert_eq!(plan_shards(&specs, 20), vec![vec![0, 1], vec![2], vec![3, 4]]);
        assert_eq!(plan_shards(&specs, 1000), vec![vec![0, 1, 2, 3, 4]]);
        assert_eq!(plan_shards(&[], 10), vec![Vec::<usize>::new()]);
        assert_eq!(shard_file_name(1, 3), "model-00002-of-00003.safetensors");
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
    }

    #[test]
    fn shard_sizes_parse_like_transformers() {
        assert_eq!(parse_shard_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_shard_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_shard_size("1234").unwrap(), 1234);
        assert!(parse_shard_size("lots").is_err());
        assert!(parse_shard_size("0").is_err());
    }
}
