//! The ZeRO engine in process (tests/engine.rs, tests/llama.rs): ranks as threads over the CPU
//! backend, a deterministic global batch every rank draws its share of, the training loop as
//! `train` runs it, and comparisons of losses and weights.

use std::net::TcpListener;
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use zerokit::comm::{Collectives, ControlPlane, CpuComm, Rendezvous};
use zerokit::model::Model;
use zerokit::optim::AdamWConfig;
use zerokit::scaler::ScalerConfig;
use zerokit::zero::{Engine, EngineConfig};

/// Runs `f` on `n` ranks, each a thread with its own control plane and CPU collectives.
pub fn ranks<T: Send>(n: usize, f: impl Fn(Box<dyn Collectives>) -> T + Sync) -> Vec<T> {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                s.spawn(move || {
                    let rdv = Rendezvous {
                        rank,
                        world: n,
                        local_rank: rank,
                        local_world: n,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        timeout: Duration::from_secs(60),
                    };
                    f(Box::new(CpuComm::new(ControlPlane::connect(&rdv).unwrap())))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

pub fn engine_config(stage: u8, grad_accum: usize) -> EngineConfig {
    EngineConfig {
        stage,
        grad_accum,
        grad_clip: 1.0,
        activation_checkpointing: false,
        kind: Kind::Float,
        device: Device::Cpu,
        adamw: AdamWConfig { lr: 3e-3, ..AdamWConfig::default() },
        scaler: ScalerConfig::default(),
        profile: false,
        offload_optimizer: false,
        offload_params: false,
        pin_memory: false,
        prefetch_elems: 0,
        persistence_threshold: 0,
    }
}

pub const VOCAB: i64 = 64;
pub const SEQ: i64 = 8;
/// Sequences in each step's global batch.
pub const GLOBAL: usize = 12;

/// Token `t` of row `g` of step `step`: a pure function, so every rank draws the same global
/// batch without sharing a generator.
pub fn token(step: u64, g: usize, t: i64) -> i64 {
    // A learnable pattern: position and row decide the token up to a little noise.
    (mix(step, (g as u64) << 20 ^ t as u64) % 4) as i64 + (t * 7 + g as i64) % (VOCAB - 4)
}

/// SplitMix64's finaliser over (a, b): well-mixed bits from a pure function.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Rows `rows` of step `step`'s global batch: inputs and next-token targets.
pub fn batch(step: u64, rows: std::ops::Range<usize>) -> (Tensor, Tensor) {
    let seq = |g: usize| (0..=SEQ).map(|t| token(step, g, t)).collect::<Vec<_>>();
    let all: Vec<Vec<i64>> = rows.map(seq).collect();
    let b = all.len() as i64;
    let x: Vec<i64> = all.iter().flat_map(|s| s[..SEQ as usize].to_vec()).collect();
    let y: Vec<i64> = all.iter().flat_map(|s| s[1..].to_vec()).collect();
    (Tensor::from_slice(&x).view([b, SEQ]), Tensor::from_slice(&y).view([b, SEQ]))
}

/// Learning rate of the GPT-2 runs.
pub const LR: f64 = 3e-3;

/// Trains `steps` steps at `lr` on this rank's share of each global batch (micro-step m of rank
/// r takes rows ((m * world + r) * b ..), as `train` does); returns the step losses.
pub fn train<M: Model>(
    e: &mut Engine<M>,
    world: usize,
    rank: usize,
    accum: usize,
    steps: std::ops::Range<u64>,
    lr: f64,
) -> Vec<f64> {
    let b = GLOBAL / (world * accum);
    let mut losses = Vec::new();
    for step in steps {
        for m in 0..accum {
            let first = (m * world + rank) * b;
            let (x, y) = batch(step, first..first + b);
            e.forward_backward(&x, &y).unwrap();
        }
        losses.push(e.step(lr).unwrap().loss);
    }
    losses
}

/// The model's weights as every rank sees them (gathered at stage 3: collective).
pub fn weights<M: Model>(e: &mut Engine<M>) -> Vec<(String, Vec<f32>)> {
    e.gather_parameters(true)
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, Vec::<f32>::try_from(t.detach().view(-1)).unwrap()))
        .collect()
}

pub fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}: step {i}: {x} vs {y}");
    }
}

pub fn assert_weights_close(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: parameter count");
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!(n, m);
        let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= tol, "{what}: {n} differs by {worst}");
    }
}
