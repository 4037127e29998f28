//! The flat parameter space and its partition. Parameters are laid out bucket after bucket in
//! the order their gradients become ready in backward (the last block first, the embeddings
//! last), so a bucket can be reduced while backward carries on. Each bucket is padded to a
//! multiple of `parts * ALIGN` elements and cut into `parts` equal shards; rank r owns shard r of
//! every bucket. Its partition (fp32 master, Adam moments, gradient) is the concatenation of
//! those shards. `parts` is the world size for stages 1 and 2, and 1 for stage 0 (every rank
//! owns everything).

use serde::{Deserialize, Serialize};

/// Shard sizes are multiples of this many elements, so every shard starts 256-byte aligned
/// for fp16/bf16 and fp32 and NCCL moves whole cache lines.
pub const ALIGN: usize = 128;

/// More partitions than any run has; bounds what a damaged manifest can make readers do per rank.
pub const MAX_PARTS: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSlot {
    pub name: String,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub bucket: usize,
    /// Offset within the bucket.
    pub offset: usize,
    /// AdamW weight decay applies (tensors of 2 or more dimensions, as nanoGPT groups them).
    pub decay: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Indices into `FlatLayout::params`.
    pub params: Vec<usize>,
    pub numel: usize,
    pub padded: usize,
    /// Start of the bucket in the full flat space.
    pub flat_offset: usize,
    /// Elements of this bucket per rank (padded / parts).
    pub shard: usize,
    /// Start of this bucket's shard within a rank's partition.
    pub shard_offset: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatLayout {
    pub parts: usize,
    pub params: Vec<ParamSlot>,
    pub buckets: Vec<Bucket>,
    /// Padded size of the full flat space.
    pub total: usize,
    /// Size of each rank's partition.
    pub partition: usize,
}

/// A contiguous piece of one parameter inside one rank's partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub param: usize,
    /// Element offset within the flattened parameter.
    pub param_offset: usize,
    /// Element offset within the rank's partition.
    pub partition_offset: usize,
    pub len: usize,
}

/// How many partitions the flat state of `world_size` ranks at `zero_stage` has: one copy at
/// stage 0, one shard per rank at stages 1 to 3 (stage 3 partitions the parameters too, with the
/// same offsets, so its checkpoints hold the same shards as stage 1's and 2's).
pub fn parts_for(world_size: usize, zero_stage: u8) -> Result<usize, String> {
    match zero_stage {
        0 => Ok(1),
        1..=3 => Ok(world_size),
        s => Err(format!("zero_stage {s} is not one zerokit trains with (0, 1, 2, 3)")),
    }
}

impl FlatLayout {
    /// `params` are (name, shape, bucket) in any order; buckets are numbered from 0 in
    /// gradient-ready order and each must be non-empty.
    pub fn new(params: &[(String, Vec<usize>, usize)], parts: usize) -> Result<Self, String> {
        if parts == 0 {
            return Err("the number of partitions must be at least 1".into());
        }
        let n_buckets = params.iter().map(|p| p.2 + 1).max().unwrap_or(0);
        let mut slots = Vec::with_capacity(params.len());
        let mut buckets: Vec<Bucket> = (0..n_buckets)
            .map(|_| Bucket { params: vec![], numel: 0, padded: 0, flat_offset: 0, shard: 0, shard_offset: 0 })
            .collect();
        for (name, shape, b) in params {
            let numel = shape.iter().product::<usize>();
            let bucket = &mut buckets[*b];
            bucket.params.push(slots.len());
            slots.push(ParamSlot {
                name: name.clone(),
                shape: shape.clone(),
                numel,
                bucket: *b,
                offset: bucket.numel,
                decay: shape.len() >= 2,
            });
            bucket.numel += numel;
        }
        let (mut flat, mut part) = (0, 0);
        for (i, b) in buckets.iter_mut().enumerate() {
            if b.params.is_empty() {
                return Err(format!("bucket {i} holds no parameters"));
            }
            let unit = parts * ALIGN;
            b.padded = b.numel.div_ceil(unit) * unit;
            b.shard = b.padded / parts;
            b.flat_offset = flat;
            b.shard_offset = part;
            flat += b.padded;
            part += b.shard;
        }
        Ok(FlatLayout { parts, params: slots, buckets, total: flat, partition: part })
    }

    /// Checks a layout read from a manifest against the format's rules, together with the run
    /// shape saved beside it, before anything indexes with it: every parameter's size is its
    /// shape's, lies in exactly one existing bucket, and the bucket's parameters tile it without
    /// gap or overlap; each bucket is padded exactly as [`new`](Self::new) pads it, its shard is
    /// its padded size over `parts`, and the offsets and totals are the running sums; `parts` is
    /// what `world_size` at `zero_stage` partitions into. All sums are checked, so
    /// [`pieces`](Self::pieces), [`flat_offset`](Self::flat_offset) and
    /// [`num_params`](Self::num_params) are then in range and cannot overflow: a bucket's
    /// parameters tile [0, numel) within padded = shard x parts, so rank r's pieces of it lie in
    /// [shard_offset, shard_offset + shard) of a partition of `partition` elements, and together
    /// the ranks hold every element exactly once. The error lists the problems found.
    pub fn validate(&self, world_size: usize, zero_stage: u8) -> Result<(), String> {
        let mut p = Vec::new();
        if world_size == 0 {
            p.push("world_size is 0".to_string());
        }
        match parts_for(world_size, zero_stage) {
            Err(m) => p.push(m),
            Ok(want) if self.parts != want => p.push(format!(
                "layout has {} partitions, but world_size {world_size} at ZeRO stage {zero_stage} needs {want}",
                self.parts
            )),
            Ok(_) => {}
        }
        p.extend(self.problems().into_iter().map(|m| format!("layout: {m}")));
        if p.is_empty() {
            return Ok(());
        }
        const SHOWN: usize = 6;
        let more = p.len().saturating_sub(SHOWN);
        p.truncate(SHOWN);
        if more > 0 {
            p.push(format!("and {more} more problem(s)"));
        }
        Err(p.join("; "))
    }

    /// The layout's own problems (see [`validate`](Self::validate)), one message each; in time
    /// linear in its size, whatever its numbers.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.parts == 0 || self.parts > MAX_PARTS {
            p.push(format!("parts is {}, expected 1 to {MAX_PARTS}", self.parts));
            return p;
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.params {
            if !names.insert(s.name.as_str()) {
                p.push(format!("parameter {} appears twice", s.name));
            }
            let n = s.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if n != Some(s.numel) {
                p.push(format!(
                    "{}: shape {:?} has {} elements, numel says {}",
                    s.name,
                    s.shape,
                    n.map_or("too many".into(), |n| n.to_string()),
                    s.numel
                ));
            }
            if s.bucket >= self.buckets.len() {
                p.push(format!("{}: bucket {} does not exist ({} buckets)", s.name, s.bucket, self.buckets.len()));
            }
        }
        let unit = self.parts * ALIGN;
        // Running sums; None once they overflow.
        let (mut flat, mut part) = (Some(0usize), Some(0usize));
        let show = |v: Option<usize>| v.map_or("more than 64 bits count".to_string(), |v| v.to_string());
        // The bucket that lists each parameter, and how many do.
        let mut listed: Vec<(usize, usize)> = vec![(0, 0); self.params.len()];
        for (bi, b) in self.buckets.iter().enumerate() {
            let mut members = Vec::new();
            for &pi in &b.params {
                let Some(s) = self.params.get(pi) else {
                    p.push(format!("bucket {bi} lists parameter {pi}, but there are {}", self.params.len()));
                    continue;
                };
                listed[pi] = (bi, listed[pi].1 + 1);
                if s.bucket != bi {
                    p.push(format!("bucket {bi} lists {}, whose bucket is {}", s.name, s.bucket));
                }
                members.push((s.offset, s.numel, &s.name));
            }
            if members.is_empty() {
                p.push(format!("bucket {bi} holds no parameters"));
            }
            members.sort();
            let mut pos = 0usize;
            for (off, n, name) in members {
                if off > pos {
                    p.push(format!("bucket {bi}: elements {pos}..{off} belong to no parameter (before {name})"));
                } else if off < pos {
                    p.push(format!(
                        "bucket {bi}: {name} at offset {off} overlaps the parameter before it (which ends at {pos})"
                    ));
                }
                pos = pos.max(off.saturating_add(n));
            }
            if pos != b.numel {
                p.push(format!("bucket {bi}: its parameters cover {pos} elements, numel says {}", b.numel));
            }
            match b.numel.div_ceil(unit).checked_mul(unit) {
                Some(want) if b.padded == want => {}
                want => p.push(format!(
                    "bucket {bi}: padded to {} elements, but {} elements rounded up to a multiple of {} ranks x {ALIGN} is {}: padding not as declared",
                    b.padded,
                    b.numel,
                    self.parts,
                    show(want)
                )),
            }
            if b.shard.checked_mul(self.parts) != Some(b.padded) {
                p.push(format!(
                    "bucket {bi}: shard {} x {} partitions is not its padded size {}",
                    b.shard, self.parts, b.padded
                ));
            }
            if Some(b.flat_offset) != flat {
                p.push(format!(
                    "bucket {bi}: flat_offset {}, but the buckets before it end at {}",
                    b.flat_offset,
                    show(flat)
                ));
            }
            if Some(b.shard_offset) != part {
                p.push(format!(
                    "bucket {bi}: shard_offset {}, but the shards before it end at {}",
                    b.shard_offset,
                    show(part)
                ));
            }
            flat = flat.and_then(|f| f.checked_add(b.padded));
            part = part.and_then(|q| q.checked_add(b.shard));
        }
        for (s, &(bi, n)) in self.params.iter().zip(&listed) {
            if n == 0 && s.bucket < self.buckets.len() {
                p.push(format!("{}: not listed in its bucket {}", s.name, s.bucket));
            } else if n > 1 {
                p.push(format!("{} is listed {n} times (last by bucket {bi})", s.name));
            }
        }
        if Some(self.total) != flat {
            p.push(format!("total {} is not the sum of the padded buckets, {}", self.total, show(flat)));
        }
        if Some(self.partition) != part {
            p.push(format!("partition {} is not the sum of the shards, {}", self.partition, show(part)));
        }
        p
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.numel).sum()
    }

    /// Offset of a parameter in the full flat space.
    pub fn flat_offset(&self, param: usize) -> usize {
        let p = &self.params[param];
        self.buckets[p.bucket].flat_offset + p.offset
    }

    /// The pieces of parameters that rank `rank`'s partition holds, in partition order.
    /// Everything in the partition that is not in a piece is padding.
    pub fn pieces(&self, rank: usize) -> Vec<Piece> {
        let mut out = Vec::new();
        for b in &self.buckets {
            let (lo, hi) = (rank * b.shard, (rank + 1) * b.shard);
            for &pi in &b.params {
                let p = &self.params[pi];
                let (s, e) = (p.offset.max(lo), (p.offset + p.numel).min(hi));
                if s < e {
                    out.push(Piece {
                        param: pi,
                        param_offset: s - p.offset,
                        partition_offset: b.shard_offset + (s - lo),
                        len: e - s,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(parts: usize) -> FlatLayout {
        let params = vec![
            ("a".to_string(), vec![10, 30], 1),
            ("b".to_string(), vec![7], 1),
            ("c".to_string(), vec![333], 0),
            ("d".to_string(), vec![5, 5], 0),
        ];
        FlatLayout::new(&params, parts).unwrap()
    }

    #[test]
    fn partitions_tile_every_parameter_exactly_once() {
        for parts in 1..=5 {
            let l = layout(parts);
            let mut seen: Vec<Vec<u8>> = l.params.iter().map(|p| vec![0; p.numel]).collect();
            let mut used = vec![0u8; l.partition];
            for r in 0..parts {
                used.iter_mut().for_each(|u| *u = 0);
                for pc in l.pieces(r) {
                    for k in 0..pc.len {
                        seen[pc.param][pc.param_offset + k] += 1;
                        used[pc.partition_offset + k] += 1;
                    }
                }
                assert!(used.iter().all(|&u| u <= 1), "pieces overlap in rank {r}'s partition");
            }
            assert!(seen.iter().flatten().all(|&c| c == 1), "parts={parts}");
            assert_eq!(l.partition * parts, l.total);
            assert_eq!(l.num_params(), 300 + 7 + 333 + 25);
            for b in &l.buckets {
                assert_eq!(b.padded % (parts * ALIGN), 0);
                assert!(b.padded >= b.numel && b.padded - b.numel < parts * ALIGN);
            }
        }
    }

    #[test]
    fn bucket_order_and_decay_groups() {
        let l = layout(2);
        assert_eq!(l.buckets[0].flat_offset, 0);
        assert_eq!(l.flat_offset(2), 0); // "c" opens bucket 0
        assert_eq!(l.flat_offset(0), l.buckets[0].padded); // "a" opens bucket 1
        assert!(l.params[0].decay && !l.params[1].decay && !l.params[2].decay && l.params[3].decay);
    }

    #[test]
    fn validate_accepts_what_new_builds_and_names_each_inconsistency() {
        for parts in 1..=5 {
            assert_eq!(layout(parts).validate(parts, 2), Ok(()));
        }
        assert_eq!(layout(1).validate(4, 0), Ok(()));
        let bad = |f: fn(&mut FlatLayout), world: usize, stage: u8| {
            let mut l = layout(2);
            f(&mut l);
            l.validate(world, stage).unwrap_err()
        };
        let keep = |_: &mut FlatLayout| {};
        assert!(bad(keep, 3, 2).contains("layout has 2 partitions, but world_size 3 at ZeRO stage 2 needs 3"));
        assert!(bad(keep, 2, 4).contains("zero_stage 4 is not one zerokit trains with"));
        assert!(bad(keep, 3, 3).contains("layout has 2 partitions, but world_size 3 at ZeRO stage 3 needs 3"));
        assert!(bad(keep, 0, 1).contains("world_size is 0"));
        assert!(bad(|l| l.buckets[0].params.push(99), 2, 2).contains("bucket 0 lists parameter 99, but there are 4"));
        assert!(bad(|l| l.params[0].bucket = 7, 2, 2).contains("a: bucket 7 does not exist"));
        assert!(bad(|l| l.params[0].offset = usize::MAX, 2, 2).contains("belong to no parameter"));
        assert!(bad(|l| l.params[1].numel = 8, 2, 2).contains("b: shape [7] has 7 elements, numel says 8"));
        assert!(bad(|l| l.params[1].shape = vec![usize::MAX, 2], 2, 2).contains("has too many elements"));
        assert!(bad(|l| l.params[3].name = "c".into(), 2, 2).contains("parameter c appears twice"));
        assert!(bad(|l| l.buckets[1].params.push(0), 2, 2).contains("a is listed 2 times"));
        assert!(bad(|l| l.buckets[0].padded += 256, 2, 2).contains("padding not as declared"));
        assert!(bad(|l| l.buckets[1].shard_offset = usize::MAX, 2, 2).contains("shard_offset"));
        assert!(bad(|l| l.buckets[0].padded = usize::MAX, 2, 2).contains("padding not as declared"));
        assert!(bad(|l| l.total += 1, 2, 2).contains("total"));
        assert!(bad(|l| l.partition = 0, 2, 2).contains("partition 0 is not the sum of the shards"));
        assert!(bad(|l| l.parts = 0, 0, 1).contains("parts is 0"));
        // Many problems: the first few, and a count.
        let e = bad(|l| l.params.iter_mut().for_each(|p| p.numel += 1), 2, 2);
        assert!(e.contains("; and ") && e.contains("more problem(s)"), "{e}");
    }

    #[test]
    fn rejects_empty_bucket() {
        let params = vec![("a".to_string(), vec![3], 1)];
        assert!(FlatLayout::new(&params, 1).is_err());
    }
}
