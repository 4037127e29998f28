//! Surgery on the stored zip archives that `torch.save` writes, for tests that damage a real
//! file in one precise place: where an entry's bytes lie, and rewriting them as a writer would
//! have (CRC-32 recorded to match), so that a check past the CRC is what meets the damage.
#![allow(dead_code)]

/// An entry's bytes in the archive, where the central directory records their CRC-32, and where
/// its central directory record and local header start.
#[derive(Debug, Clone, Copy)]
pub struct EntryAt {
    pub data: usize,
    pub size: usize,
    pub crc_at: usize,
    record: usize,
    local: usize,
}

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// The entry whose name ends with `suffix`, through the central directory (the local headers of
/// torch's archives record no sizes). Only for intact archives of under 4 GiB.
pub fn find(buf: &[u8], suffix: &str) -> Option<EntryAt> {
    let eocd = (0..=buf.len().checked_sub(22)?).rev().find(|&i| buf[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])?;
    let (count, mut p) = (u16_at(buf, eocd + 10)?, u32_at(buf, eocd + 16)?);
    for _ in 0..count {
        let (size, nlen) = (u32_at(buf, p + 20)?, u16_at(buf, p + 28)?);
        let (xlen, clen, local) = (u16_at(buf, p + 30)?, u16_at(buf, p + 32)?, u32_at(buf, p + 42)?);
        let name = buf.get(p + 46..p + 46 + nlen)?;
        if name.ends_with(suffix.as_bytes()) {
            let data = local + 30 + u16_at(buf, local + 26)? + u16_at(buf, local + 28)?;
            return Some(EntryAt { data, size, crc_at: p + 16, record: p, local });
        }
        p += 46 + nlen + xlen + clen;
    }
    None
}

/// Changes the bytes of entry `suffix` in place through `edit` and records their new CRC-32.
pub fn rewrite(buf: &mut [u8], suffix: &str, edit: impl FnOnce(&mut [u8])) {
    let e = find(buf, suffix).unwrap_or_else(|| panic!("no zip entry *{suffix}"));
    edit(&mut buf[e.data..e.data + e.size]);
    let crc = crc32fast::hash(&buf[e.data..e.data + e.size]);
    buf[e.crc_at..e.crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Renames entry `suffix` so that its name ends with `new_suffix` instead: in its central
/// directory record, and in its local header too when `also_local` (as a writer could have named
/// it; otherwise as damage to the directory alone would). The name may only shrink: the bytes it
/// frees join the extra fields, so nothing else moves.
pub fn rename(buf: &mut [u8], suffix: &str, new_suffix: &str, also_local: bool) {
    let e = find(buf, suffix).unwrap_or_else(|| panic!("no zip entry *{suffix}"));
    let mut headers = vec![(e.record + 28, e.record + 46)];
    if also_local {
        headers.push((e.local + 26, e.local + 30));
    }
    for (len_at, name_at) in headers {
        let n = u16_at(buf, len_at).unwrap();
        let new = [&buf[name_at..name_at + n - suffix.len()], new_suffix.as_bytes()].concat();
        assert!(new.len() <= n, "{new_suffix} is longer than {suffix}");
        let x = u16_at(buf, len_at + 2).unwrap() + n - new.len();
        buf[len_at..len_at + 2].copy_from_slice(&(new.len() as u16).to_le_bytes());
        buf[len_at + 2..len_at + 4].copy_from_slice(&(x as u16).to_le_bytes());
        buf[name_at..name_at + new.len()].copy_from_slice(&new);
    }
}
