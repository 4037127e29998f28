//! A watchdog for asynchronous collectives. NCCL work runs on the GPU: if a peer dies or hangs
//! mid-collective, this rank's kernels spin and its host thread blocks in the next CUDA sync,
//! where no socket timeout can reach it. The engine calls the communicator at every bucket and
//! step, and each call beats the watchdog; if no beat comes for the timeout, `on_expire` runs on
//! the watchdog's thread (for NCCL: say so, naming this rank, and end the process).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct Watchdog {
    start: Instant,
    /// Milliseconds since `start` at the last beat.
    last: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching; `on_expire` gets the time since the last beat.
    pub fn start(timeout: Duration, on_expire: impl FnOnce(Duration) + Send + 'static) -> Self {
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (last.clone(), stop.clone());
        // Poll often enough to fire within about 10% of the timeout.
        let poll = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let handle = std::thread::Builder::new()
            .name("zerokit-watchdog".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    std::thread::sleep(poll);
                    let idle = start.elapsed().saturating_sub(Duration::from_millis(l.load(Ordering::Acquire)));
                    if idle > timeout && !s.load(Ordering::Acquire) {
                        on_expire(idle);
                        return;
                    }
                }
            })
            .expect("spawning the watchdog thread");
        Watchdog { start, last, stop, handle: Some(handle) }
    }

    /// Records progress.
    pub fn beat(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Release);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn beats_keep_it_quiet_and_silence_fires_it_once() {
        let (tx, rx) = mpsc::channel();
        let w = Watchdog::start(Duration::from_millis(300), move |idle| tx.send(idle).unwrap());
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(60));
            w.beat();
        }
        assert!(rx.try_recv().is_err(), "fired although beats came every 60 ms");
        let idle = rx.recv_timeout(Duration::from_secs(5)).expect("fires after 300 ms of silence");
        assert!(idle > Duration::from_millis(300) && idle < Duration::from_secs(2), "{idle:?}");
        drop(w);
        assert!(rx.try_recv().is_err(), "fires once");
    }

    #[test]
    fn dropping_it_stops_it() {
        let (tx, rx) = mpsc::channel::<Duration>();
        drop(Watchdog::start(Duration::from_millis(50), move |i| tx.send(i).unwrap()));
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    }
}
