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
//! These decisions are a [`Schedule`], kept apart from the tensors so that `ckpt estimate`
//! walks the very ones the engine acts on for the gathered working set it reports.
//!
//! A released parameter points at an empty tensor: the embedding's backward, which runs without
//! its weight being gathered again, needs only the token ids.

use super::host::{copy_async, host_buffer, CopyDone, CopyStream};
use super::layout::FlatLayout;
use super::ZeroError;
use crate::comm::Collectives;
use tch::{Device, Kind, Tensor};

/// What stage 3 gathers, prefetches and releases at each position of a micro-step, apart from
/// any tensor: [`Residency`] acts on these decisions, and `ckpt estimate` walks the same ones
/// ([`Schedule::peak_elems`]) for the gathered working set it reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Buckets each position uses.
    pub uses: Vec<Vec<usize>>,
    /// Elements of each bucket (padded), as gathered.
    pub sizes: Vec<usize>,
    /// Buckets that stay gathered for the whole step (at most the persistence threshold).
    pub persistent: Vec<bool>,
    /// Blocks' buckets stay gathered from forward to backward (no activation checkpointing).
    pub keep_for_backward: bool,
    pub n_blocks: usize,
    pub prefetch_elems: usize,
}

impl Schedule {
    /// The positions of a model whose embedding, blocks and head use the given buckets
    /// (`sizes[b]`: bucket b's padded elements).
    pub fn new(
        sizes: Vec<usize>,
        embed: Vec<usize>,
        blocks: Vec<Vec<usize>>,
        head: Vec<usize>,
        keep_for_backward: bool,
        prefetch_elems: usize,
        persistence_threshold: usize,
    ) -> Schedule {
        let n_blocks = blocks.len();
        let mut uses = vec![embed];
        uses.extend(blocks.iter().cloned());
        uses.push(head);
        uses.extend(blocks.into_iter().rev());
        for u in &mut uses {
            u.sort_unstable();
            u.dedup();
        }
        let persistent = sizes.iter().map(|&n| n <= persistence_threshold).collect();
        Schedule { uses, sizes, persistent, keep_for_backward, n_blocks, prefetch_elems }
    }

    pub fn head_position(&self) -> usize {
        self.n_blocks + 1
    }

    pub fn last_position(&self) -> usize {
        self.uses.len() - 1
    }

    /// The buckets to gather ahead on entering `pos` (whole positions after it, up to `last`,
    /// while they fit the prefetch size, and at least the next), given which are gathered.
    pub fn prefetch(&self, pos: usize, last: usize, gathered: &[bool]) -> Vec<usize> {
        let mut have = gathered.to_vec();
        let mut out = Vec::new();
        let mut budget = self.prefetch_elems;
        for next in pos + 1..=last.min(self.uses.len() - 1) {
            if budget == 0 {
                break;
            }
            let want: Vec<usize> = self.uses[next].iter().copied().filter(|&b| !have[b]).collect();
            let elems: usize = want.iter().map(|&b| self.sizes[b]).sum();
            if next > pos + 1 && elems > budget {
                break;
            }
            for b in want {
                have[b] = true;
                out.push(b);
            }
            budget = budget.saturating_sub(elems);
        }
        out
    }

    /// The buckets released on leaving `pos`: those the next position does not use, unless
    /// persistent, or a forward block's kept for its backward. `training`: a backward follows
    /// this forward (evaluation keeps nothing for one).
    pub fn releases(&self, pos: usize, training: bool) -> Vec<usize> {
        let forward_block = (1..=self.n_blocks).contains(&pos);
        if forward_block && self.keep_for_backward && training {
            return Vec::new();
        }
        let next = self.uses.get(pos + 1);
        self.uses[pos]
            .iter()
            .copied()
            .filter(|b| !next.is_some_and(|u| u.contains(b)) && !self.persistent[*b])
            .collect()
    }

    /// The most elements gathered at once over `micro_steps` training micro-steps of one
    /// optimizer step, visiting the positions in order as `Engine::forward_backward` does
    /// (persistent buckets stay gathered from one micro-step to the next; the step's refresh
    /// releases them).
    pub fn peak_elems(&self, micro_steps: usize) -> usize {
        let mut gathered = vec![false; self.sizes.len()];
        let held = |g: &[bool]| g.iter().zip(&self.sizes).filter(|(g, _)| **g).map(|(_, &n)| n).sum::<usize>();
        let mut peak = 0;
        let last = self.last_position();
        for _ in 0..micro_steps.max(1) {
            for pos in 0..=last {
                for &b in &self.uses[pos] {
                    gathered[b] = true;
                }
                for b in self.prefetch(pos, last, &gathered) {
                    gathered[b] = true;
                }
                peak = peak.max(held(&gathered));
                for b in self.releases(pos, true) {
                    gathered[b] = false;
                }
            }
            for (g, &p) in gathered.iter_mut().zip(&self.persistent) {
                *g &= p;
            }
        }
        peak
    }
}

pub(super) struct Residency {
    /// This rank's shard of every bucket in the compute dtype, laid out as the partition; in
    /// host memory with parameter offload.
    shard: Tensor,
    /// Buckets gathered now.
    full: Vec<Option<Tensor>>,
    /// Some gather was issued and the compute stream has not waited for it yet.
    in_flight: bool,
    /// Parameter offload on a GPU: the host shards come up on a copy stream of their own, so a
    /// prefetched bucket's copy overlaps the compute before it; `ready[b]` is the copy's event,
    /// which the compute stream waits on before it uses or frees bucket b.
    h2d: Option<CopyStream>,
    ready: Vec<Option<CopyDone>>,
    schedule: Schedule,
    part_rank: usize,
    device: Device,
    kind: Kind,
    /// What released parameters point at.
    empty: Tensor,
    /// Elements of gathered buckets allocated now (one rank's shard on its own device is the
    /// whole bucket, no copy), and the most there have been: what the engine reports as its
    /// gathered working set.
    allocated: usize,
    pub peak_allocated: usize,
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
        let buckets_of = |slots: &[usize]| slots.iter().map(|&s| layout.params[s].bucket).collect::<Vec<usize>>();
        let schedule = Schedule::new(
            layout.buckets.iter().map(|b| b.padded).collect(),
            buckets_of(pieces.embed),
            pieces.blocks.iter().map(|s| buckets_of(s)).collect(),
            buckets_of(pieces.head),
            keep_for_backward,
            prefetch_elems,
            persistence_threshold,
        );
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
        let h2d = match device {
            Device::Cuda(i) if shard.device() == Device::Cpu => Some(CopyStream::new(i).map_err(ZeroError::Offload)?),
            _ => None,
        };
        Ok(Residency {
            shard,
            h2d,
            ready: (0..layout.buckets.len()).map(|_| None).collect(),
            full: (0..layout.buckets.len()).map(|_| None).collect(),
            in_flight: false,
            schedule,
            part_rank,
            device,
            kind,
            empty,
            allocated: 0,
            peak_allocated: 0,
        })
    }

    pub fn head_position(&self) -> usize {
        self.schedule.head_position()
    }

    pub fn last_position(&self) -> usize {
        self.schedule.last_position()
    }

    /// This rank's compute-dtype shards, in bytes.
    pub fn shard_bytes(&self) -> usize {
        self.shard.numel() * self.kind.elt_size_in_bytes()
    }

    /// Whether a gathered bucket is a tensor of its own: not when this one rank's shard, on the
    /// device already, is the whole bucket.
    fn copies(&self, layout: &FlatLayout) -> bool {
        layout.parts > 1 || self.shard.device() != self.device
    }

    /// Starts gathering bucket `b` unless it is gathered.
    fn fetch(&mut self, b: usize, layout: &FlatLayout, comm: &mut dyn Collectives) -> Result<(), ZeroError> {
        if self.full[b].is_some() {
            return Ok(());
        }
        let bk = &layout.buckets[b];
        let own = self.shard.narrow(0, bk.shard_offset as i64, bk.shard as i64);
        let full = if !self.copies(layout) {
            own // one rank's shard is the whole bucket: no copy
        } else {
            let full = Tensor::f_empty([bk.padded as i64], (self.kind, self.device))?;
            self.allocated += full.numel();
            let mut mine = full.narrow(0, (self.part_rank * bk.shard) as i64, bk.shard as i64);
            match &mut self.h2d {
                Some(h2d) => self.ready[b] = Some(h2d.to_device(&mine, &own).map_err(ZeroError::Offload)?),
                None => copy_async(&mut mine, &own)?,
            }
            if layout.parts > 1 {
                // The all-gather reads this rank's part once the compute stream's work is done,
                // so the compute stream first waits for its copy (the overlap is for one rank).
                self.landed(b)?;
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
        let need = self.schedule.uses[pos].clone();
        for &b in &need {
            self.fetch(b, layout, comm)?;
            self.landed(b)?;
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
        let gathered: Vec<bool> = self.full.iter().map(Option::is_some).collect();
        for b in self.schedule.prefetch(pos, last, &gathered) {
            self.fetch(b, layout, comm)?;
        }
        self.peak_allocated = self.peak_allocated.max(self.allocated);
        Ok(())
    }

    /// Orders the compute stream after bucket `b`'s host-to-device copy, if one is pending: before
    /// the bucket is used (or gathered from: the all-gather runs after the compute stream), and
    /// before it is freed (the allocator would hand its memory to later compute).
    fn landed(&mut self, b: usize) -> Result<(), ZeroError> {
        if let (Some(h2d), Some(ev)) = (&mut self.h2d, self.ready[b].take()) {
            h2d.compute_waits(ev).map_err(ZeroError::Offload)?;
        }
        Ok(())
    }

    /// Releases the buckets of `pos` that the next position does not use. `training`: a backward
    /// follows this forward (evaluation keeps nothing for one).
    pub fn leave(&mut self, pos: usize, layout: &FlatLayout, handles: &mut [Tensor], training: bool) {
        for b in self.schedule.releases(pos, training) {
            self.release(b, layout, handles);
        }
    }

    fn release(&mut self, b: usize, layout: &FlatLayout, handles: &mut [Tensor]) {
        if let Err(e) = self.landed(b) {
            // The copy's event could not be waited on: wait for the whole copy stream instead.
            tracing::warn!("{e}; waiting for every parameter copy before releasing a bucket");
            if let Some(h2d) = &mut self.h2d {
                let _ = h2d.wait();
            }
        }
        if let Some(full) = self.full[b].take() {
            if self.copies(layout) {
                self.allocated -= full.numel();
            }
            for &s in &layout.buckets[b].params {
                handles[s].set_data(&self.empty);
            }
        }
    }

    /// Releases every gathered bucket, persistent ones too when `all`.
    pub fn release_all(&mut self, layout: &FlatLayout, handles: &mut [Tensor], all: bool) {
        for b in 0..self.full.len() {
            if all || !self.schedule.persistent[b] {
                self.release(b, layout, handles);
            }
        }
    }

    /// The compute-dtype shards after an optimizer step: `master` (this rank's fp32 partition,
    /// on the device or in host memory) converted into them; every gathered bucket is stale.
    pub fn refresh(&mut self, master: &Tensor, layout: &FlatLayout, handles: &mut [Tensor]) -> Result<(), ZeroError> {
        self.release_all(layout, handles, true);
        // The host shards are about to be written: no copy may still read them.
        if let Some(h2d) = &mut self.h2d {
            h2d.wait().map_err(ZeroError::Offload)?;
        }
        if master.device() == self.shard.device() {
            self.shard.f_copy_(master)?;
        } else {
            // One bucket at a time, so the converting copy needs only a bucket's shard in fp32
            // on the side it lands on. The move blocks: from the device into host memory an
            // asynchronous one would land in pinned memory that the host-side conversion reads
            // before the copy is done (a stale shard, what the GPU test caught).
            for bk in &layout.buckets {
                let src = master.narrow(0, bk.shard_offset as i64, bk.shard as i64);
                let mut dst = self.shard.narrow(0, bk.shard_offset as i64, bk.shard as i64);
                let moved = src.f_to_device_(dst.device(), Kind::Float, false, false)?;
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
            self.landed(b)?;
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
