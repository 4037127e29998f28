//! Sizes as transformers spells them, for zero-to-fp32's `--max-shard-size`. The safetensors
//! writer itself is `formats::safetensors`.

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsOutError {
    #[error("bad size {0:?}: expected a number with an optional unit (KB, MB, GB, KiB, MiB, GiB)")]
    BadSize(String),
}

/// Parses sizes as transformers spells them: "5GB" (10^9), "500MiB" (2^20), or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, SafetensorsOutError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| SafetensorsOutError::BadSize(s.into()))?;
    let mul: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1048576.0,
        "GIB" => 1073741824.0,
        _ => return Err(SafetensorsOutError::BadSize(s.into())),
    };
    let v = num * mul;
    if v.is_nan() || v < 1.0 {
        return Err(SafetensorsOutError::BadSize(s.into()));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }
}
