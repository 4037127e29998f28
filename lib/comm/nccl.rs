//! The NCCL backend. libnccl and libcuda are loaded at run time by cudarc, so the build needs
//! no CUDA. Collectives run on a stream of their own, ordered against libtorch's compute stream
//! (the legacy default stream, which zerokit never changes) with events, as llm.c's zero.cuh
//! does: `wait_compute` makes the NCCL stream wait for compute, `wait_comm` makes compute wait for
//! NCCL. Tensors handed to a collective are kept alive until compute has waited on it, because
//! libtorch's caching allocator only orders reuse on the compute stream.

use super::{Collectives, CommError, ControlPlane};
use cudarc::driver::{result as cu, sys as cusys};
use cudarc::nccl::{result as nc, sys as ncsys};
use std::ffi::c_void;
use tch::{Device, Kind, Tensor};

pub struct NcclComm {
    ctl: ControlPlane,
    comm: ncsys::ncclComm_t,
    stream: cusys::CUstream,
    compute_done: cusys::CUevent,
    comm_done: cusys::CUevent,
    in_flight: Vec<Tensor>,
    device: usize,
    ctx: cusys::CUcontext,
}

fn nccl_err(what: &str, e: nc::NcclError) -> CommError {
    CommError::Nccl(format!("{what} failed: {:?}", e.0))
}

fn cuda_err(what: &str, e: cu::DriverError) -> CommError {
    CommError::Nccl(format!("{what} failed: {e:?}"))
}

fn dtype(kind: Kind) -> Result<ncsys::ncclDataType_t, CommError> {
    Ok(match kind {
        Kind::Float => ncsys::ncclDataType_t::ncclFloat32,
        Kind::Half => ncsys::ncclDataType_t::ncclFloat16,
        Kind::BFloat16 => ncsys::ncclDataType_t::ncclBfloat16,
        Kind::Double => ncsys::ncclDataType_t::ncclFloat64,
        k => return Err(CommError::Nccl(format!("unsupported dtype {k:?}"))),
    })
}

impl NcclComm {
    /// Creates the communicator on `device` (a CUDA ordinal). Rank 0 makes the NCCL unique id
    /// and the control plane carries it to the others.
    pub fn new(mut ctl: ControlPlane, device: usize) -> Result<Self, CommError> {
        // SAFETY: plain probe of the dynamic library.
        if !unsafe { ncsys::is_culib_present() } {
            return Err(CommError::Nccl(
                "libnccl.so.2 was not found: add the folder holding it to LD_LIBRARY_PATH".into(),
            ));
        }
        cu::init().map_err(|e| cuda_err("cuInit", e))?;
        let dev = cu::device::get(device as i32).map_err(|e| cuda_err("cuDeviceGet", e))?;
        // SAFETY: the primary context is the one libtorch's runtime calls use on this device.
        let ctx = unsafe {
            let ctx = cu::primary_ctx::retain(dev).map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
            cu::ctx::set_current(ctx).map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
            ctx
        };
        let (rank, world) = (ctl.rank(), ctl.world());
        let id_bytes = if rank == 0 {
            let id = nc::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            let bytes: Vec<u8> = id.internal.iter().map(|c| *c as u8).collect();
            ctl.broadcast(Some(&bytes), "NCCL unique id")?
        } else {
            ctl.broadcast(None, "NCCL unique id")?
        };
        let mut id = ncsys::ncclUniqueId { internal: [0; 128] };
        if id_bytes.len() != id.internal.len() {
            return Err(CommError::Protocol { rank, msg: "NCCL unique id has the wrong size".into() });
        }
        for (d, s) in id.internal.iter_mut().zip(&id_bytes) {
            *d = *s as _;
        }
        let mut comm: ncsys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: comm is a valid out-pointer; every rank calls this with the same id and world.
        unsafe { nc::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| cuda_err("cuStreamCreate", e))?;
        let flags = cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let compute_done = cu::event::create(flags).map_err(|e| cuda_err("cuEventCreate", e))?;
        let comm_done = cu::event::create(flags).map_err(|e| cuda_err("cuEventCreate", e))?;
        Ok(NcclComm { ctl, comm, stream, compute_done, comm_done, in_flight: Vec::new(), device, ctx })
    }

    fn check(&self, t: &Tensor) -> Result<(), CommError> {
        if t.device() != Device::Cuda(self.device) || !t.is_contiguous() {
            return Err(CommError::Nccl(format!(
                "collective on a tensor that is not contiguous on cuda:{} ({:?})",
                self.device,
                t.device()
            )));
        }
        Ok(())
    }

    fn nccl_stream(&self) -> ncsys::cudaStream_t {
        self.stream as ncsys::cudaStream_t
    }

    /// Aborts the communicator so that NCCL kernels stuck on a dead peer return.
    pub fn abort_nccl(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: comm is a live communicator; after abort it is never used again.
            let _ = unsafe { nc::comm_abort(self.comm) };
            self.comm = std::ptr::null_mut();
        }
    }
}

impl Collectives for NcclComm {
    fn rank(&self) -> usize {
        self.ctl.rank()
    }

    fn world(&self) -> usize {
        self.ctl.world()
    }

    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<(), CommError> {
        self.check(t)?;
        let ptr = t.data_ptr();
        // SAFETY: ptr is a live device buffer of numel elements, kept alive in in_flight.
        unsafe {
            nc::all_reduce(ptr, ptr, t.numel(), dtype(t.kind())?, ncsys::ncclRedOp_t::ncclSum, self.comm, self.nccl_stream())
        }
        .map_err(|e| nccl_err("ncclAllReduce", e))?;
        self.in_flight.push(t.shallow_clone());
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, input: &Tensor, output: &Tensor) -> Result<(), CommError> {
        self.check(input)?;
        self.check(output)?;
        if input.numel() != output.numel() * self.world() || input.kind() != output.kind() {
            return Err(CommError::Nccl("reduce_scatter: input must be world x output, same dtype".into()));
        }
        // SAFETY: both buffers are live device memory of the stated sizes, kept alive in in_flight.
        unsafe {
            nc::reduce_scatter(
                input.data_ptr(),
                output.data_ptr(),
                output.numel(),
                dtype(output.kind())?,
                ncsys::ncclRedOp_t::ncclSum,
                self.comm,
                self.nccl_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclReduceScatter", e))?;
        self.in_flight.push(input.shallow_clone());
        self.in_flight.push(output.shallow_clone());
        Ok(())
    }

    fn all_gather_in_place(&mut self, buffer: &Tensor) -> Result<(), CommError> {
        self.check(buffer)?;
        let world = self.world();
        if buffer.numel() % world != 0 {
            return Err(CommError::Nccl("all_gather: buffer not divisible by world".into()));
        }
        let n = buffer.numel() / world;
        let elt = buffer.kind().elt_size_in_bytes();
        let base = buffer.data_ptr() as *mut u8;
        // SAFETY: in-place form (sendbuff = recvbuff + rank*n), both inside the live buffer.
        unsafe {
            let send = base.add(self.rank() * n * elt) as *const c_void;
            nc::all_gather(send, base as *mut c_void, n, dtype(buffer.kind())?, self.comm, self.nccl_stream())
        }
        .map_err(|e| nccl_err("ncclAllGather", e))?;
        self.in_flight.push(buffer.shallow_clone());
        Ok(())
    }

    fn wait_compute(&mut self) -> Result<(), CommError> {
        // SAFETY: events and streams are live for the communicator's lifetime; libtorch may have
        // made another device's context current on this thread, so ours is made current first.
        unsafe {
            cu::ctx::set_current(self.ctx).map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
            cu::event::record(self.compute_done, cu::stream::null()).map_err(|e| cuda_err("cuEventRecord", e))?;
            cu::stream::wait_event(self.stream, self.compute_done, cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(|e| cuda_err("cuStreamWaitEvent", e))
        }
    }

    fn wait_comm(&mut self) -> Result<(), CommError> {
        // SAFETY: as above.
        unsafe {
            cu::ctx::set_current(self.ctx).map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
            cu::event::record(self.comm_done, self.stream).map_err(|e| cuda_err("cuEventRecord", e))?;
            cu::stream::wait_event(cu::stream::null(), self.comm_done, cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(|e| cuda_err("cuStreamWaitEvent", e))?;
        }
        // Compute is now ordered after every collective: the buffers may go back to the allocator.
        self.in_flight.clear();
        Ok(())
    }

    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        self.ctl.all_reduce_f64(values, "scalar all_reduce")
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.ctl.barrier("barrier")
    }

    fn control(&mut self) -> &mut ControlPlane {
        &mut self.ctl
    }

    fn abort(&mut self, msg: &str) {
        self.ctl.abort(msg);
        self.abort_nccl();
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: all work was waited for by the engine before the communicator is dropped.
            let _ = unsafe { nc::comm_destroy(self.comm) };
        }
    }
}
