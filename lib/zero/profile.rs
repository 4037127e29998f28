//! Where a training step's time goes, when `ZEROKIT_PROFILE=1`: the device is synchronized at
//! each phase boundary and the wall time since the previous one recorded. The synchronizations
//! cost throughput, so this is off unless asked for; it answers "which phase to make faster".

use std::time::Instant;
use tch::Device;

pub struct PhaseTimer {
    device: Device,
    last: Option<Instant>,
    /// Milliseconds per phase since the last `take`, in first-seen order.
    phases: Vec<(&'static str, f64)>,
}

impl PhaseTimer {
    /// A timer when ZEROKIT_PROFILE is set (to anything but 0), else None.
    pub fn from_env(device: Device) -> Option<Self> {
        std::env::var("ZEROKIT_PROFILE").ok().filter(|v| v != "0").map(|_| PhaseTimer {
            device,
            last: None,
            phases: vec![],
        })
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Ends phase `name` (it began at the previous mark, or at the first mark of a step).
    pub fn mark(&mut self, name: &'static str) {
        self.sync();
        let now = Instant::now();
        if let Some(t) = self.last {
            let ms = (now - t).as_secs_f64() * 1e3;
            match self.phases.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => *v += ms,
                None => self.phases.push((name, ms)),
            }
        }
        self.last = Some(now);
    }

    /// The phases since the last call, as "name 12.3 ms, ...", and a fresh start.
    pub fn take(&mut self) -> String {
        let s = self.phases.iter().map(|(n, ms)| format!("{n} {ms:.1} ms")).collect::<Vec<_>>().join(", ");
        self.phases.clear();
        self.last = None;
        s
    }
}
