//! Host memory for offloading: page-locked buffers of exactly the bytes asked for, and copies
//! between them and the device that do not wait for the device.
//!
//! libtorch's own pinned allocator (`pin_memory`) rounds every block up to a power of two and
//! keeps it cached: a 30 GB optimizer partition would take 32 GiB, and the transient pageable copy
//! that `pin_memory` starts from doubles the peak. Here the driver allocates the pinned bytes
//! (`cuMemHostAlloc`, through cudarc's dynamically loaded driver, so building needs no CUDA) and
//! lib/zero/host.cpp wraps them as a tensor whose storage returns them to the driver when its last
//! view goes.

use crate::device::{cuda_primary_context, shim_result};
use std::ffi::{c_char, c_void};
use std::sync::OnceLock;
use tch::{Device, Kind, TchError, Tensor};

extern "C" {
    fn zerokit_host_tensor(
        data: *mut c_void,
        numel: i64,
        like: *const c_void,
        release: extern "C" fn(*mut c_void),
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn zerokit_copy_async(dst: *mut c_void, src: *const c_void) -> *mut c_char;
    fn zerokit_pin_memory(src: *const c_void, out: *mut *mut c_void) -> *mut c_char;
}

/// The context pinned allocations were made in; frees may run on any thread (libtorch's), which
/// must have it current.
static CONTEXT: OnceLock<usize> = OnceLock::new();

extern "C" fn release_pinned(ptr: *mut c_void) {
    use cudarc::driver::result as cu;
    // SAFETY: `ptr` came from cuMemHostAlloc in `pinned`, which set CONTEXT first; each storage
    // releases its pointer once.
    unsafe {
        if let Some(&ctx) = CONTEXT.get() {
            let _ = cu::ctx::set_current(ctx as cudarc::driver::sys::CUcontext);
        }
        if let Err(e) = cu::free_host(ptr) {
            tracing::warn!("returning pinned host memory failed: {e:?}");
        }
    }
}

/// A zeroed 1-D host tensor of `numel` elements of `kind`. With `pin` on a CUDA `device` it is
/// page-locked, so copies to and from that device overlap compute; if the driver refuses (the
/// locked-memory limit), or on CPU runs, it is ordinary memory and the reason is logged once.
pub fn host_buffer(numel: usize, kind: Kind, pin: bool, device: Device) -> Result<Tensor, TchError> {
    if let (true, Device::Cuda(ordinal)) = (pin, device) {
        match pinned(numel, kind, ordinal) {
            Ok(t) => return Ok(t),
            Err(e) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| tracing::warn!(
                    "pinned host memory refused ({e}): pageable memory instead, whose copies to and from the GPU wait for it"
                ));
            }
        }
    }
    Tensor::f_zeros([numel as i64], (kind, Device::Cpu))
}

fn pinned(numel: usize, kind: Kind, ordinal: usize) -> Result<Tensor, String> {
    use cudarc::driver::result as cu;
    let bytes = numel * kind.elt_size_in_bytes();
    let (_, ctx) = cuda_primary_context(ordinal)?;
    CONTEXT.get_or_init(|| ctx as usize);
    // CU_MEMHOSTALLOC_PORTABLE: page-locked for every context, libtorch's included.
    // SAFETY: a fresh allocation of `bytes` (at least one, the driver refuses zero).
    let ptr = unsafe { cu::malloc_host(bytes.max(1), 1) }
        .map_err(|e| format!("cuMemHostAlloc of {bytes} bytes failed: {e:?}"))?;
    // The driver does not zero it; every buffer starts as zeros like `Tensor::zeros`.
    // SAFETY: `ptr` points to `bytes` writable bytes just allocated.
    unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, bytes) };
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: the shim takes ownership of `ptr` (released through `release_pinned`) and writes a
    // new at::Tensor handle to `out` unless it returns an error.
    let like = Tensor::f_empty([0], (kind, Device::Cpu)).map_err(|e| e.to_string())?;
    let status = unsafe { zerokit_host_tensor(ptr, numel as i64, like.as_ptr().cast(), release_pinned, &mut out) };
    if let Err(e) = shim_result(status) {
        release_pinned(ptr);
        return Err(e);
    }
    // SAFETY: `out` is a heap at::Tensor handle, which tch takes over (and deletes on drop).
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// `dst.copy_(src)` without waiting for the device: between page-locked host memory and the
/// device the copy is queued on the current stream, so the host side may be read (or reused)
/// only after the stream is synchronized. Between two host tensors it is an ordinary copy.
pub fn copy_async(dst: &mut Tensor, src: &Tensor) -> Result<(), TchError> {
    // SAFETY: both handles are live tch tensors; the shim catches every C++ exception.
    let status = unsafe { zerokit_copy_async(dst.as_mut_ptr().cast(), src.as_ptr().cast()) };
    shim_result(status).map_err(TchError::Torch)
}

/// A host tensor on `device` without the host waiting: on a GPU it goes through page-locked
/// memory (libtorch's caching pinned allocator, which keeps the block until the copy has run)
/// and the copy is queued on the current stream, where a copy from pageable memory would hold
/// the host until the device has finished all it was given. Elsewhere the tensor itself.
pub fn to_device_async(t: &Tensor, device: Device) -> Result<Tensor, TchError> {
    if !device.is_cuda() {
        return t.f_to_device(device);
    }
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `t` is a live tch tensor; the shim catches every C++ exception and otherwise
    // writes a new at::Tensor handle to `out`.
    let status = unsafe { zerokit_pin_memory(t.as_ptr().cast(), &mut out) };
    shim_result(status).map_err(TchError::Torch)?;
    // SAFETY: `out` is a heap at::Tensor handle, which tch takes over (and deletes on drop).
    let pinned = unsafe { Tensor::from_ptr(out.cast()) };
    pinned.f_to_device_(device, pinned.kind(), true, false)
}

/// Copies between host and device on a stream of their own: moving reduced gradients into host
/// memory overlaps the backward that goes on producing the next ones (on the compute stream the
/// copies would stall it: 4 bytes a parameter over PCIe every step), and with parameter offload
/// the next block's parameters come up while the current one computes. Each copy is ordered after
/// the compute stream's work so far with an event, as the NCCL stream is; its source is kept
/// alive until the copy is done, then returned to libtorch's allocator.
pub struct CopyStream {
    ctx: cudarc::driver::sys::CUcontext,
    stream: cudarc::driver::sys::CUstream,
    /// Recorded on the compute stream before each copy.
    computed: cudarc::driver::sys::CUevent,
    /// Each queued copy's completion event and its source tensor.
    in_flight: std::collections::VecDeque<(cudarc::driver::sys::CUevent, Tensor)>,
    spare: Vec<cudarc::driver::sys::CUevent>,
}

/// A queued host-to-device copy's completion ([`CopyStream::to_device`]), to be handed back to
/// [`CopyStream::compute_waits`]. Only the copy stream makes one.
pub struct CopyDone(cudarc::driver::sys::CUevent);

/// Bytes of copy sources held at most: beyond it `copy` waits for the oldest copies, which keeps
/// the GPU memory they hold bounded when the link is slower than the backward.
const IN_FLIGHT_BYTES: usize = 2 << 30;

fn cuda_err(what: &str, e: cudarc::driver::DriverError) -> String {
    format!("{what} failed: {e:?}")
}

impl CopyStream {
    pub fn new(ordinal: usize) -> Result<CopyStream, String> {
        use cudarc::driver::result as cu;
        let (_, ctx) = cuda_primary_context(ordinal)?;
        let stream =
            cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(|e| cuda_err("cuStreamCreate", e))?;
        let computed = cu::event::create(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| cuda_err("cuEventCreate", e))?;
        Ok(CopyStream { ctx, stream, computed, in_flight: Default::default(), spare: Vec::new() })
    }

    /// Queues `dst <- src` (a contiguous device tensor into a contiguous host tensor of the same
    /// kind and length) after the work queued on the compute stream so far.
    pub fn copy(&mut self, dst: &Tensor, src: Tensor) -> Result<(), String> {
        self.reap(src.numel() * src.kind().elt_size_in_bytes())?;
        // `src` stays alive in `in_flight` until the copy's event completes; the host side is
        // read only after `wait`.
        let done = self.queue(dst, &src, true)?;
        self.in_flight.push_back((done, src));
        Ok(())
    }

    /// Queues `dst <- src`, a contiguous page-locked host tensor into a contiguous device tensor
    /// of the same kind and length, after the work queued on the compute stream so far (`dst`
    /// may be memory the compute stream used before). Returns the copy's completion event: the
    /// compute stream must wait on it ([`CopyStream::compute_waits`]) before it reads `dst` or
    /// frees it. `src` must not be written until then.
    pub fn to_device(&mut self, dst: &Tensor, src: &Tensor) -> Result<CopyDone, String> {
        self.queue(dst, src, false).map(CopyDone)
    }

    /// One copy on this stream, between device and host (`to_host`) or back, ordered after the
    /// compute stream's work so far; returns its completion event. The caller keeps both
    /// tensors alive (and the source unwritten) until the event completes.
    fn queue(&mut self, dst: &Tensor, src: &Tensor, to_host: bool) -> Result<cudarc::driver::sys::CUevent, String> {
        use cudarc::driver::{result as cu, sys};
        let (host, device) = if to_host { (dst, src) } else { (src, dst) };
        if !(host.device() == Device::Cpu && device.device().is_cuda() && dst.is_contiguous() && src.is_contiguous())
            || dst.kind() != src.kind()
            || dst.numel() != src.numel()
        {
            return Err(format!(
                "{} copy of {:?} {:?} on {:?} into {:?} {:?} on {:?}",
                if to_host { "device-to-host" } else { "host-to-device" },
                src.kind(),
                src.size(),
                src.device(),
                dst.kind(),
                dst.size(),
                dst.device()
            ));
        }
        let bytes = src.numel() * src.kind().elt_size_in_bytes();
        // SAFETY: the context, stream and events are live for `self`'s lifetime; `dst` and `src`
        // hold `bytes` bytes each on the sides checked above; the caller keeps them alive.
        unsafe {
            cu::ctx::set_current(self.ctx).map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
            cu::event::record(self.computed, cu::stream::null()).map_err(|e| cuda_err("cuEventRecord", e))?;
            cu::stream::wait_event(self.stream, self.computed, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(|e| cuda_err("cuStreamWaitEvent", e))?;
            let copied = if to_host {
                sys::cuMemcpyDtoHAsync_v2(dst.data_ptr(), src.data_ptr() as sys::CUdeviceptr, bytes, self.stream)
            } else {
                sys::cuMemcpyHtoDAsync_v2(dst.data_ptr() as sys::CUdeviceptr, src.data_ptr(), bytes, self.stream)
            };
            copied.result().map_err(|e| cuda_err("cuMemcpyAsync", e))?;
            let done = match self.spare.pop() {
                Some(e) => e,
                None => cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                    .map_err(|e| cuda_err("cuEventCreate", e))?,
            };
            cu::event::record(done, self.stream).map_err(|e| cuda_err("cuEventRecord", e))?;
            Ok(done)
        }
    }

    /// Orders the compute stream's later work after the copy `done` ([`CopyStream::to_device`]);
    /// the event is then free for another copy (a wait takes the event's state when it is queued).
    pub fn compute_waits(&mut self, done: CopyDone) -> Result<(), String> {
        use cudarc::driver::{result as cu, sys};
        // SAFETY: `done` can only come from this type's `to_device`: a live event, recorded on a
        // stream of this context.
        unsafe {
            cu::ctx::set_current(self.ctx).map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
            cu::stream::wait_event(cu::stream::null(), done.0, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(|e| cuda_err("cuStreamWaitEvent", e))?;
        }
        self.spare.push(done.0);
        Ok(())
    }

    /// Releases the sources of finished copies; waits for the oldest while the sources still
    /// held and `more` bytes would exceed IN_FLIGHT_BYTES.
    fn reap(&mut self, more: usize) -> Result<(), String> {
        use cudarc::driver::result as cu;
        let held = |q: &std::collections::VecDeque<(_, Tensor)>| {
            q.iter().map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum::<usize>()
        };
        while let Some((ev, _)) = self.in_flight.front() {
            // SAFETY: a live event of this stream.
            let done = unsafe { cu::event::query(*ev) }.is_ok();
            if !done {
                if held(&self.in_flight) + more <= IN_FLIGHT_BYTES {
                    break;
                }
                // SAFETY: as above.
                unsafe { cu::event::synchronize(*ev) }.map_err(|e| cuda_err("cuEventSynchronize", e))?;
            }
            let (ev, _src) = self.in_flight.pop_front().expect("front exists");
            self.spare.push(ev);
        }
        Ok(())
    }

    /// Waits until every queued copy has landed; then the host side may be read.
    pub fn wait(&mut self) -> Result<(), String> {
        // SAFETY: a live stream.
        unsafe { cudarc::driver::result::stream::synchronize(self.stream) }
            .map_err(|e| cuda_err("cuStreamSynchronize", e))?;
        self.spare.extend(self.in_flight.drain(..).map(|(ev, _)| ev));
        Ok(())
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        use cudarc::driver::result as cu;
        let _ = self.wait();
        // SAFETY: nothing is queued any more; each handle is destroyed once.
        unsafe {
            for ev in self.spare.drain(..).chain([self.computed]) {
                let _ = cu::event::destroy(ev);
            }
            let _ = cu::stream::destroy(self.stream);
        }
    }
}
