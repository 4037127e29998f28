//! The NCCL backend. libnccl and libcuda are loaded at run time by cudarc, so the build needs
//! no CUDA. Collectives run on a stream of their own, ordered against libtorch's compute stream
//! (the legacy default stream, which zerokit never changes) with events, as llm.c's zero.cuh
//! does: `wait_compute` makes the NCCL stream wait for compute, `wait_comm` makes compute wait for
//! NCCL. Tensors handed to a collective are kept alive until compute has waited on it, because
//! libtorch's caching allocator only orders reuse on the compute stream.

use super::{Collectives, CommError, ControlPlane};
use cudarc::driver::{result as cu, sys as cusys};
use cudarc::nccl::{result as nc, sys as ncsys};
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Marks a process that already re-executed itself to share libtorch's NCCL.
const REEXEC_MARK: &str = "ZEROKIT_NCCL_DIR";

/// The file of the shared object that defines `name` in the library `handle`.
fn object_file(handle: *mut c_void, name: &str) -> Option<PathBuf> {
    let sym = CString::new(name).ok()?;
    // SAFETY: handle is a live dlopen handle; dladdr only reads the loader's tables.
    unsafe {
        let addr = libc::dlsym(handle, sym.as_ptr());
        if addr.is_null() {
            return None;
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(addr, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let p = PathBuf::from(CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned());
        Some(p.canonicalize().unwrap_or(p))
    }
}

/// The file behind the first of `names` that the dynamic loader finds (loading it).
fn first_loadable(names: &[String]) -> Option<PathBuf> {
    names.iter().find_map(|n| {
        let c = CString::new(n.as_str()).ok()?;
        // SAFETY: plain dlopen of a library name; the handle stays open (the process either
        // uses this library or re-executes itself).
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if h.is_null() {
            None
        } else {
            object_file(h, "ncclGetVersion")
        }
    })
}

/// Makes cudarc use the very NCCL library that libtorch_cuda loaded.
///
/// libtorch_cuda links libnccl.so.2, but cudarc looks for other names first (libnccl.so, ...).
/// Where one of those is a different file (a system NCCL beside the PyTorch wheel's, say), the
/// process holds two NCCL instances and communicators made by one are rejected by the other
/// ("corrupted comm object"); where none exists, cudarc finds no NCCL at all. The loader keeps
/// one instance per file, so this points cudarc's first name, libnccl.so, at libtorch's file
/// through a private folder put first on LD_LIBRARY_PATH, and re-executes the process (same
/// pid, same arguments) so that the loader sees it. Call before any other work; a no-op when
/// the two already agree or libtorch has no NCCL.
pub fn use_torch_nccl() -> Result<(), CommError> {
    let torch = {
        // SAFETY: RTLD_NOLOAD only looks the library up among those already loaded.
        let h = unsafe { libc::dlopen(c"libnccl.so.2".as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        if h.is_null() {
            return Ok(());
        }
        match object_file(h, "ncclGetVersion") {
            Some(p) => p,
            None => return Ok(()),
        }
    };
    let candidates = cudarc::get_lib_name_candidates("nccl");
    let found = first_loadable(&candidates);
    if found.as_deref() == Some(torch.as_path()) {
        return Ok(());
    }
    let problem = match &found {
        Some(f) => format!("cudarc would load {} while libtorch uses {}", f.display(), torch.display()),
        None => {
            format!("cudarc finds no NCCL under its names ({}) while libtorch uses {}", candidates[0], torch.display())
        }
    };
    if std::env::var_os(REEXEC_MARK).is_some() {
        return Err(CommError::Nccl(format!("{problem}, even after putting a link to it first on LD_LIBRARY_PATH")));
    }
    let dir = link_dir(&torch).map_err(|e| CommError::Nccl(format!("{problem}; cannot make the link folder: {e}")))?;
    tracing::debug!("{problem}: re-executing with {} first on LD_LIBRARY_PATH", dir.display());
    let path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) if !old.is_empty() => {
            let mut p = dir.clone().into_os_string();
            p.push(":");
            p.push(old);
            p
        }
        _ => dir.clone().into_os_string(),
    };
    let exe =
        std::env::current_exe().map_err(|e| CommError::Nccl(format!("{problem}; cannot find this executable: {e}")))?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env(REEXEC_MARK, &dir)
        .exec();
    Err(CommError::Nccl(format!("{problem}; re-executing failed: {err}")))
}

/// A private folder holding `libnccl.so` -> `target`, made atomically (safe for concurrent ranks).
fn link_dir(target: &Path) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    target.hash(&mut h);
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = std::env::temp_dir().join(format!("zerokit-nccl-{uid}-{:016x}", h.finish()));
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("libnccl.so");
    if std::fs::canonicalize(&link).ok().as_deref() != Some(target) {
        let tmp = dir.join(format!(".libnccl.so.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    Ok(dir)
}

/// NCCL's version and the file cudarc loaded it from, for the log.
fn nccl_identity() -> String {
    let mut v: i32 = 0;
    // SAFETY: v is a valid out-pointer.
    let version = match unsafe { ncsys::ncclGetVersion(&mut v) } {
        ncsys::ncclResult_t::ncclSuccess => format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
        _ => "unknown".into(),
    };
    let file = first_loadable(&cudarc::get_lib_name_candidates("nccl")).map_or("?".into(), |p| p.display().to_string());
    format!("NCCL {version} from {file}")
}

pub struct NcclComm {
    ctl: ControlPlane,
    comm: ncsys::ncclComm_t,
    stream: cusys::CUstream,
    compute_done: cusys::CUevent,
    comm_done: cusys::CUevent,
    in_flight: Vec<Tensor>,
    device: usize,
    ctx: cusys::CUcontext,
    watchdog: super::watchdog::Watchdog,
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
        let (_, ctx) = crate::device::cuda_primary_context(device).map_err(CommError::Nccl)?;
        let (rank, world) = (ctl.rank(), ctl.world());
        tracing::info!("rank {rank}: {} on cuda:{device}", nccl_identity());
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
        let status = unsafe { nc::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        if status != nc::NcclStatus::Success || comm.is_null() {
            return Err(CommError::Nccl("ncclCommInitRank did not complete (blocking mode expected)".into()));
        }
        let stream =
            cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(|e| cuda_err("cuStreamCreate", e))?;
        let flags = cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let compute_done = cu::event::create(flags).map_err(|e| cuda_err("cuEventCreate", e))?;
        let comm_done = cu::event::create(flags).map_err(|e| cuda_err("cuEventCreate", e))?;
        let timeout = ctl.timeout();
        let watchdog = super::watchdog::Watchdog::start(timeout, move |idle| {
            let msg = format!(
                "rank {rank}: no progress for {:.0} s (timeout {} s): a collective is hung or a peer rank died; \
                 ending this rank (the other ranks' logs name the first failure)",
                idle.as_secs_f64(),
                timeout.as_secs()
            );
            tracing::error!("{msg}");
            eprintln!("{msg}");
            // The host thread may be blocked in a CUDA sync behind a spinning NCCL kernel: end
            // the process without running exit handlers that could wait on the device too.
            // SAFETY: _exit ends the process at once; nothing after it runs.
            unsafe { libc::_exit(1) }
        });
        Ok(NcclComm { ctl, comm, stream, compute_done, comm_done, in_flight: Vec::new(), device, ctx, watchdog })
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
        self.watchdog.beat();
        self.check(t)?;
        let ptr = t.data_ptr();
        // SAFETY: ptr is a live device buffer of numel elements, kept alive in in_flight.
        unsafe {
            nc::all_reduce(
                ptr,
                ptr,
                t.numel(),
                dtype(t.kind())?,
                ncsys::ncclRedOp_t::ncclSum,
                self.comm,
                self.nccl_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclAllReduce", e))?;
        self.in_flight.push(t.shallow_clone());
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, input: &Tensor, output: &Tensor) -> Result<(), CommError> {
        self.watchdog.beat();
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
        self.watchdog.beat();
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
        self.watchdog.beat();
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
        self.watchdog.beat();
        // SAFETY: as above.
        unsafe {
            cu::ctx::set_current(self.ctx).map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
            cu::event::record(self.comm_done, self.stream).map_err(|e| cuda_err("cuEventRecord", e))?;
            cu::stream::wait_event(
                cu::stream::null(),
                self.comm_done,
                cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(|e| cuda_err("cuStreamWaitEvent", e))?;
        }
        // Compute is now ordered after every collective: the buffers may go back to the allocator.
        self.in_flight.clear();
        Ok(())
    }

    fn control(&mut self) -> &mut ControlPlane {
        self.watchdog.beat();
        &mut self.ctl
    }

    fn heartbeat(&self) {
        self.watchdog.beat();
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
