//! Stage 3's parameters: each rank keeps only its shard of every bucket (the same shards the
//! optimizer state is cut into), and a bucket's full parameters exist on the device only while
//! a piece of the model that uses them runs.
//!
//! A micro-step visits the model's pieces in a fixed sequence of positions: the embedding (0),
//! the blocks forward (1..=n), the head's forward and backward (n + 1), then the blocks' backward
//! last first (n + 2..=2n + 1). Entering a position gathers the buckets it uses (all-gather of
//! the ranks' shards, on the communication stream) and points the parameters at them; the
//! buckets of the positions after it are gathered ahead, up to `prefetch_elems` elements, while
//! it computes. Leaving a position releases each bucket the next position does not use, so a
//! rank holds about one or two blocks of full parameters. Without activation checkpointing,
//! autograd keeps a block's weights for its backward anyway: then a block's buckets stay
//! gathered from its forward to its backward, and only the embedding's and head's are released
//! in between. Buckets of at most `persistence_threshold` elements stay gathered for the whole
//! step (DeepSpeed's stage3_param_persistence_threshold, by bucket).
//!
//! A released parameter points at an empty tensor: the embedding's backward, which runs without
//! its weight being gathered again, needs only the token ids.

use super::host::{copy_async, host_buffer};
use super::layout::FlatLayout;
use super::ZeroError;
use crate::comm::Collectives;
use tch::{Device, Kind, Tensor};

pub(super) struct Residency {
    /// This rank's shard of every bucket in the compute dtype, laid out as the partition; in
    /// host memory with parameter offload.
    shard: Tensor,
    /// Buckets gathered now.
    full: Vec<Option<Tensor>>,
    /// Some gather was issued and the compute stream has not waited for it yet.
    in_flight: bool,
    persistent: Vec<bool>,
    /// Buckets each position uses, and their element counts.
    uses: Vec<Vec<usize>>,
    /// Blocks' buckets stay gathered from forward to backward (no activation checkpointing).
    keep_for_backward: bool,
    n_blocks: usize,
    prefetch_elems: usize,
    part_rank: usize,
    device: Device,
    kind: Kind,
    /// What released parameters point at.
    empty: Tensor,
}

/// Where each piece of the model runs in a micro-step's sequence, and which buckets it uses.
pub(super) struct Pieces<'a> {
    pub embed: &'a [usize],
    pub blocks: &'a [Vec<usize>],
    pub head: &'a [usize],
}

impl Residency {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layout: &FlatLayout,
        handles: &mut [Tensor],
        pieces: Pieces,
        part_rank: usize,
        kind: Kind,
        device: Device,
        offload: bool,
        pin: bool,
        keep_for_backward: bool,
        prefetch_elems: usize,
        persistence_threshold: usize,
    ) -> Result<Residency, ZeroError> {
        let buckets_of = |slots: &[usize]| {
            let mut b: Vec<usize> = slots.iter().map(|&s| layout.params[s].bucket).collect();
            b.sort_unstable();
            b.dedup();
            b
        };
        let n = pieces.blocks.len();
        let mut uses = vec![buckets_of(pieces.embed)];
        uses.extend(pieces.blocks.iter().map(|s| buckets_of(s)));
        uses.push(buckets_of(pieces.head));
        uses.extend(pieces.blocks.iter().rev().map(|s| buckets_of(s)));
        let shard = if offload {
            host_buffer(layout.partition, kind, pin, device)?
        } else {
            Tensor::f_zeros([layout.partition as i64], (kind, device))?
        };
        let empty = Tensor::f_empty([0], (kind, device))?;
        // Every parameter starts released; the host copies the model was built with go.
        for h in handles.iter_mut() {
            h.set_data(&empty);
        }
        Ok(Residency {
            shard,
            full: (0..layout.buckets.len()).map(|_| None).collect(),
            in_flight: false,
            persistent: layout.buckets.iter().map(|b| b.padded <= persistence_threshold).collect(),
            uses,
            keep_for_backward,
            n_blocks: n,
            prefetch_elems,
            part_rank,
            device,
            kind,
            empty,
        })
    }

    pub fn head_position(&self) -> usize {
        self.n_blocks + 1
    }

    pub fn last_position(&self) -> usize {
        self.uses.len() - 1
    }

    /// Starts gathering bucket `b` unless it is gathered.
    fn fetch(&mut self, b: usize, layout: &FlatLayout, comm: &mut dyn Collectives) -> Result<(), ZeroError> {
        if self.full[b].is_some() {
            return Ok(());
        }
        let bk = &layout.buckets[b];
        let own = self.shard.narrow(0, bk.shard_offset as i64, bk.shard as i64);
        let full = if layout.parts == 1 && self.shard.device() == self.device {
            own // one rank's shard is the whole bucket: no copy
        } else {
            let full = Tensor::f_empty([bk.padded as i64], (self.kind, self.device))?;
            let mut mine = full.narrow(0, (self.part_rank * bk.shard) as i64, bk.shard as i64);
            copy_async(&mut mine, &own)?;
            if layout.parts > 1 {
                comm.wait_compute()?;
                comm.all_gather_in_place(&full)?;
                self.in_flight = true;
            }
            full
        };
        self.full[b] = Some(full);
        Ok(())
    }

    /// Gathers what position `pos` uses, points its parameters (`handles`, by slot) at it, and
    /// starts gathering the buckets of the positions after it, up to position `last`.
    pub fn enter(
        &mut self,
        pos: usize,
        last: usize,
        layout: &FlatLayout,
        handles: &mut [Tensor],
        comm: &mut dyn Collectives,
    ) -> Result<(), ZeroError> {
        let need = self.uses[pos].clone();
        for &b in &need {
            self.fetch(b, layout, comm)?;
        }
        if self.in_flight {
            comm.wait_comm()?;
            self.in_flight = false;
        }
        for &b in &need {
            let full = self.full[b].as_ref().expect("fetched above");
            for &s in &layout.buckets[b].params {
                let p = &layout.params[s];
                let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
                handles[s].set_data(&full.narrow(0, p.offset as i64, p.numel as i64).view(shape.as_slice()));
            }
        }
        // Prefetch: whole positions ahead, while they fit the prefetch size (at least the next).
        let mut budget = self.prefetch_elems;
        for next in pos + 1..=last.min(self.uses.len() - 1) {
            if budget == 0 {
                break;
            }
            let want: Vec<usize> = self.uses[next].iter().copied().filter(|&b| self.full[b].is_none()).collect();
            let elems: usize = want.iter().map(|&b| layout.buckets[b].padded).sum();
            if next > pos + 1 && elems > budget {
                break;
            }
            for b in want {
                self.fetch(b, layout, comm)?;
            }
            budget = budget.saturating_sub(elems);
        }
        Ok(())
    }

    /// Releases the buckets of `pos` that the next position does not use. `training`: a backward
    /// follows this forward (evaluation keeps nothing for one).
    pub fn leave(&mut self, pos: usize, layout: &FlatLayout, handles: &mut [Tensor], training: bool) {
        let forward_block = (1..=self.n_blocks).contains(&pos);
        if forward_block && self.keep_for_backward && training {
            return;
        }
        for b in self.uses[pos].clone() {
            let next_uses = self.uses.get(pos + 1).is_some_and(|u| u.contains(&b));
            if !next_uses && !self.persistent[b] {
                self.release(b, layout, handles);
            }
        }
    }

    fn release(&mut self, b: usize, layout: &FlatLayout, handles: &mut [Tensor]) {
        if self.full[b].take().is_some() {
            for &s in &layout.buckets[b].params {
                handles[s].set_data(&self.empty);
            }
        }
    }

    /// Releases every gathered bucket, persistent ones too when `all`.
    pub fn release_all(&mut self, layout: &FlatLayout, handles: &mut [Tensor], all: bool) {
        for b in 0..self.full.len() {
            if all || !self.persistent[b] {
                self.release(b, layout, handles);
            }
        }
    }

    /// The compute-dtype shards after an optimizer step: `master` (this rank's fp32 partition,
    /// on the device or in host memory) converted into them; every gathered bucket is stale.
    pub fn refresh(&mut self, master: &Tensor, layout: &FlatLayout, handles: &mut [Tensor]) -> Result<(), ZeroError> {
        self.release_all(layout, handles, true);
        if master.device() == self.shard.device() {
            self.shard.f_copy_(master)?;
        } else {
            // One bucket at a time, so the converting copy needs only a bucket's shard in fp32
            // on the side it lands on.
            for bk in &layout.buckets {
                let src = master.narrow(0, bk.shard_offset as i64, bk.shard as i64);
                let mut dst = self.shard.narrow(0, bk.shard_offset as i64, bk.shard as i64);
                let moved = src.f_to_device_(dst.device(), Kind::Float, true, false)?;
                dst.f_copy_(&moved)?;
            }
        }
        Ok(())
    }

    /// Whole parameters for a checkpoint, one bucket at a time (collective): every rank takes part
    /// in each gather, rank `keep` copies the parameters to host memory and returns them.
    pub fn host_parameters(
        &mut self,
        layout: &FlatLayout,
        handles: &mut [Tensor],
        comm: &mut dyn Collectives,
        keep: bool,
    ) -> Result<Vec<Option<Tensor>>, ZeroError> {
        let mut out: Vec<Option<Tensor>> = (0..layout.params.len()).map(|_| None).collect();
        for b in 0..layout.buckets.len() {
            let was = self.full[b].is_some();
            self.fetch(b, layout, comm)?;
            if self.in_flight {
                comm.wait_comm()?;
                self.in_flight = false;
            }
            if keep {
                let full = self.full[b].as_ref().expect("fetched above");
                for &s in &layout.buckets[b].params {
                    let p = &layout.params[s];
                    let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
                    let host = full.narrow(0, p.offset as i64, p.numel as i64).f_to_device(Device::Cpu)?;
                    out[s] = Some(host.f_view(shape.as_slice())?);
                }
            }
            if !was {
                self.release(b, layout, handles);
            }
        }
        Ok(out)
    }
}
