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
    fn rejects_empty_bucket() {
        let params = vec![("a".to_string(), vec![3], 1)];
        assert!(FlatLayout::new(&params, 1).is_err());
    }
}
