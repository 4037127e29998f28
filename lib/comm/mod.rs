//! Collectives for ZeRO. Two backends behind one trait: NCCL for GPUs (cudarc, libnccl loaded at
//! run time) and a CPU backend over the TCP control plane, so multi-rank ZeRO runs and is tested
//! without a GPU. Every rank also holds a control-plane connection (TCP star around rank 0): it
//! carries the NCCL unique id, small scalar reductions, barriers, and failure detection (a dead
//! rank closes its socket, so the others stop with a message naming it instead of hanging).

mod control;
mod cpu;
pub mod nccl;
mod rendezvous;
pub mod watchdog;

pub use control::ControlPlane;
pub use cpu::CpuComm;
pub use rendezvous::{Rendezvous, RendezvousError};

use std::time::Duration;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: connection to rank {peer} failed: {msg}")]
    Peer { rank: usize, peer: usize, msg: String },
    #[error("rank {rank}: timed out after {timeout:?} waiting for rank {peer} ({what})")]
    Timeout { rank: usize, peer: usize, what: String, timeout: Duration },
    #[error("rendezvous at {addr}: {msg}")]
    Rendezvous { addr: String, msg: String },
    #[error("rank {rank}: protocol error: {msg}")]
    Protocol { rank: usize, msg: String },
    #[error("rank {rank}: rank {peer} reported a failure: {msg}")]
    Aborted { rank: usize, peer: usize, msg: String },
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("tensor: {0}")]
    Tensor(#[from] tch::TchError),
}

/// The collectives the ZeRO engine needs. Tensor collectives may be asynchronous (NCCL enqueues
/// them on its own stream): call `wait_compute` before enqueueing collectives on tensors that
/// compute just wrote, and `wait_comm` before compute reads their results. The CPU backend is
/// synchronous and treats both as no-ops.
pub trait Collectives {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums `t` across ranks, in place.
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<(), CommError>;
    /// `input` has world*n elements; rank r receives the sum of every rank's chunk r in `output` (n).
    fn reduce_scatter_sum(&mut self, input: &Tensor, output: &Tensor) -> Result<(), CommError>;
    /// In-place all-gather: `buffer` has world*n elements and this rank's chunk is at rank*n.
    fn all_gather_in_place(&mut self, buffer: &Tensor) -> Result<(), CommError>;
    /// Collectives wait for compute enqueued so far.
    fn wait_compute(&mut self) -> Result<(), CommError>;
    /// Compute waits for collectives enqueued so far; their tensors may be released after this.
    fn wait_comm(&mut self) -> Result<(), CommError>;
    /// Element-wise sum of a few f64 values across ranks (norms, loss sums, flags), on the host:
    /// both backends carry them on the control plane, a round trip cheaper than a device
    /// collective plus a device-to-host copy for a handful of numbers.
    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        self.control().all_reduce_f64(values, "scalar all_reduce")
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.control().barrier("barrier")
    }
    /// Tells a watchdog (NCCL) that this rank is making progress in work with no collectives
    /// (evaluation, loading a checkpoint).
    fn heartbeat(&self) {}
    /// Tells the other ranks that this rank failed, so they stop at once with `msg`.
    fn abort(&mut self, msg: &str);
    /// The control plane, for small host-side messages (checkpoint bookkeeping).
    fn control(&mut self) -> &mut ControlPlane;
}
