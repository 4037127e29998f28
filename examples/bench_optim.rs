//! GPU micro-benchmarks of the optimizer step and of op launches from Rust, which the step-time
//! analysis in docs/benchmarks.md rests on. On a GPU machine (LD_LIBRARY_PATH as in
//! bench/gpu_env.sh): `cargo run --release --example bench_optim`, or carry the built example.
//! Prints figures; on a machine without CUDA it says so and exits 1.

use tch::{Device, Kind, Tensor};
use zerokit::optim::{local_grad_norm_sq, AdamW, AdamWConfig, Segment};

fn main() {
    if !zerokit::device::load_cuda() {
        eprintln!("bench_optim: no CUDA device (libtorch_cuda.so not loadable or no GPU)");
        std::process::exit(1);
    }
    bench_adamw_step_gpt2_xl_quarter_shard();
    bench_op_launch_overhead();
}

/// Times one AdamW step on a GPT-2 XL shard of one of 4 ranks (1557.6M / 4 elements) on the
/// GPU.
fn bench_adamw_step_gpt2_xl_quarter_shard() {
    let dev = Device::Cuda(0);
    let n = 1_557_611_200usize / 4;
    // GPT-2 XL-like alternation of decaying matrices and non-decaying vectors.
    let mut segments = Vec::new();
    let mut o = 0;
    while o < n {
        let len = (10_240_000).min(n - o);
        segments.push(Segment { start: o, len, decay: true });
        o += len;
        let len = 6_400.min(n - o);
        segments.push(Segment { start: o, len, decay: false });
        o += len;
    }
    let mut opt = AdamW::new(n, segments, AdamWConfig::default(), dev).unwrap();
    let mut p = Tensor::randn([n as i64], (Kind::Float, dev));
    let g = Tensor::randn([n as i64], (Kind::Float, dev));
    // Reading one element back waits for the stream: a sync that does not depend on how
    // libtorch_cuda was loaded.
    let sync = |t: &Tensor| t.double_value(&[0]);
    for _ in 0..3 {
        opt.step(&mut p, &g, 6e-4).unwrap();
    }
    sync(&p);
    let iters = 20;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        opt.step(&mut p, &g, 6e-4).unwrap();
    }
    sync(&p);
    let ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
    // A fused kernel's floor: read p, g, m, v and write p, m, v once.
    let gbs = 28.0 * n as f64 / (ms * 1e-3) / 1e9;
    println!("AdamW step on {n} elements: {ms:.2} ms ({gbs:.0} GB/s of fused-kernel-equivalent traffic)");
    let launch = std::time::Instant::now();
    for _ in 0..iters {
        opt.step(&mut p, &g, 6e-4).unwrap();
    }
    let launch_ms = launch.elapsed().as_secs_f64() * 1e3 / iters as f64;
    sync(&p);
    println!("  host time to launch one step: {launch_ms:.2} ms");
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        let s = local_grad_norm_sq(&g).unwrap();
        let _ = s.double_value(&[]);
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
    println!("local_grad_norm_sq (with host read) on {n} elements: {ms:.2} ms");
}

/// Host cost of one libtorch op launched from Rust on the GPU (to read the step's timings).
fn bench_op_launch_overhead() {
    for n in [1i64, 1 << 24] {
        let mut t = Tensor::zeros([n], (Kind::Float, Device::Cuda(0)));
        let _ = t.double_value(&[0]);
        let t0 = std::time::Instant::now();
        for _ in 0..1000 {
            let _ = t.f_add_scalar_(1.0).unwrap();
        }
        let launch = t0.elapsed().as_secs_f64() * 1e3;
        let _ = t.double_value(&[0]);
        let done = t0.elapsed().as_secs_f64() * 1e3;
        println!("1000 add_scalar_ on {n} elements: launched in {launch:.2} ms, done in {done:.2} ms");
    }
}
