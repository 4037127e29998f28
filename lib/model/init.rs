//! Seeded initialisation shared by the models: every parameter drawn in fp32 on the host by a
//! counter-based generator, so that a seed gives the same model on CPU and CUDA, in any kind and
//! with any number of threads.

use super::ParamSpec;
use tch::{Device, Kind, TchError, Tensor};

/// How one parameter starts.
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// Every parameter of `specs`, in order, initialised as `init_of` says, as `kind` on `device`.
/// Parameter `index` of `specs` draws from its own stream of `seed`, so its values depend only on
/// (seed, index, shape).
pub fn init_params(
    specs: &[ParamSpec],
    seed: u64,
    device: Device,
    kind: Kind,
    init_of: impl Fn(&ParamSpec) -> Init,
) -> Result<Vec<(String, Tensor)>, TchError> {
    let total: usize = specs.iter().map(ParamSpec::numel).sum();
    let pb = crate::logging::progress_bar(total as u64, "init {bar:40} {percent}% {eta}");
    let mut named = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        // Made in their shape, not viewed into it: a view keeps its base tensor alive in its
        // autograd metadata, so when the engine re-points the parameters at its own buffers
        // (`set_data`), the model's fp32 host copy would stay allocated for the whole run.
        let shape = spec.shape.as_slice();
        let host = match init_of(spec) {
            Init::Normal(std) => {
                let mut v = vec![0f32; spec.numel()];
                fill_normal(&mut v, std, stream_key(seed, index as u64));
                // SAFETY: the bytes of a live f32 slice, read for the copy only.
                let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4) };
                Tensor::f_from_data_size(bytes, shape, Kind::Float)?
            }
            Init::Zeros => Tensor::f_zeros(shape, (Kind::Float, Device::Cpu))?,
            Init::Ones => Tensor::f_ones(shape, (Kind::Float, Device::Cpu))?,
        };
        let t = host.f_to_kind(kind)?.f_to_device(device)?;
        named.push((spec.name.clone(), t));
        pb.inc(spec.numel() as u64);
    }
    pb.finish_and_clear();
    Ok(named)
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed generator whose n-th output is a pure
/// function of (seed, n), which lets initialisation fill chunks in parallel deterministically.
pub(crate) struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The stream of parameter `index` for a model seed: distinct, decorrelated per parameter.
fn stream_key(seed: u64, index: u64) -> u64 {
    mix64(seed ^ mix64(index.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)))
}

/// Fills `out` with N(0, std) by Box-Muller on the SplitMix64 stream `key`: element pair p uses
/// outputs 2p and 2p+1 of the stream, so chunks are filled in parallel with identical results.
fn fill_normal(out: &mut [f32], std: f64, key: u64) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16; // even, so chunks start on pair boundaries
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
        let mut rng = SplitMix64::new(key.wrapping_add(((ci * CHUNK) as u64).wrapping_mul(GOLDEN_GAMMA)));
        for pair in chunk.chunks_mut(2) {
            // u1 in (0, 1] keeps ln finite.
            let u1 = ((rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
            let u2 = rng.next_f64();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
            pair[0] = (r * c) as f32;
            if pair.len() > 1 {
                pair[1] = (r * s) as f32;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_fill_is_chunk_independent_and_normal() {
        let n = (1 << 16) * 3 + 5;
        let mut a = vec![0f32; n];
        fill_normal(&mut a, 0.02, stream_key(7, 3));
        // The same stream element by element, without chunking.
        let mut rng = SplitMix64::new(stream_key(7, 3));
        for p in 0..n.div_ceil(2) {
            let u1 = ((rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
            let u2 = rng.next_f64();
            let r = (-2.0 * u1.ln()).sqrt() * 0.02;
            assert_eq!(a[2 * p], (r * (std::f64::consts::TAU * u2).cos()) as f32);
        }
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 2e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
    }
}
