//! Where a training step's time goes (`profile = true`): the device is synchronized at each phase
//! boundary and the wall time since the previous boundary recorded, then averaged over the steps
//! of a log interval. The synchronizations cost throughput, so this is off unless asked for; it
//! answers "which phase to make faster".

use std::time::Instant;
use tch::Device;

pub struct PhaseTimer {
    device: Device,
    last: Option<Instant>,
    /// Milliseconds per phase since the last report, in first-seen order.
    phases: Vec<(&'static str, f64)>,
    steps: u64,
}

impl PhaseTimer {
    pub fn new(device: Device) -> Self {
        PhaseTimer { device, last: None, phases: vec![], steps: 0 }
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Ends phase `name`, which began at the previous mark. The first mark after a restart only
    /// starts the clock.
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

    /// One optimizer step ended.
    pub fn end_step(&mut self) {
        self.steps += 1;
    }

    /// Stops the clock until the next mark: what runs in between (an evaluation, a checkpoint)
    /// is not a phase of the step.
    pub fn pause(&mut self) {
        self.last = None;
    }

    /// The mean time per step of each phase since the last report, as "over N steps: data 1.2
    /// ms, forward 12.3 ms, ..., step 45.6 ms", and a fresh start; None before any step.
    pub fn report(&mut self) -> Option<String> {
        if self.steps == 0 {
            return None;
        }
        let n = self.steps as f64;
        let total: f64 = self.phases.iter().map(|(_, ms)| ms).sum::<f64>() / n;
        let parts: Vec<String> = self.phases.iter().map(|(p, ms)| format!("{p} {:.1} ms", ms / n)).collect();
        let s = format!("over {} steps: {}; step {total:.1} ms", self.steps, parts.join(", "));
        self.phases.clear();
        self.steps = 0;
        Some(s)
    }
}
