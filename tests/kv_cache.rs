//! Sampling with the key/value cache against sampling without it, for every family: GPT-2, and
//! Llama and Gemma through the shared decoder (rope at each token's absolute position, GQA,
//! sliding-window layers, Gemma 2's soft-capping). Greedy tokens are equal with and without the
//! cache, and so are seeded draws; the cached last-position logits of every step agree with the
//! training forward's within 1e-5 (fp32), past a sliding window and up to the model's context
//! length, beyond which both crop as nanoGPT does. Against transformers: greedy tokens equal its
//! `generate(do_sample=False)` on the fixtures of tools/gen_llama_fixtures.py and
//! tools/gen_gemma_fixtures.py (generate.safetensors).

use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use zerokit::interop::hf_gemma::load_gemma;
use zerokit::interop::hf_llama::load_llama;
use zerokit::model::generate::generate;
use zerokit::model::kv_cache::KvCache;
use zerokit::model::{
    AnyModel, Decode, Gemma, GemmaConfig, Gpt, GptConfig, Llama, LlamaConfig, Model, ModelError, Sampling,
};

/// The bound on |cached - uncached| last-position logits, fp32, for logits of magnitude up to 1;
/// relative to the largest logit beyond. The two paths sum in other orders (a matrix product of
/// one row against one of T rows, attention over a cache against the fused causal kernel), which
/// costs a few fp32 ulps of the logits: measured up to 1.4e-5 absolute on logits of magnitude
/// 20-40 (an fp32 ulp there is 2-4e-6), below 6e-7 relative. A wrong position, mask or cached
/// key moves logits by far more than 1e-5 of their scale.
const LOGITS_TOL: f64 = 1e-5;

/// Every parameter far from its init (as the fixture scripts' `perturb`): norm gains around
/// `norm_center` (1, or 0 for Gemma's 1 + gain), small non-zero biases, the embeddings of std 0.5
/// and matrices of std 1/sqrt(fan_in), so that logits are far from uniform and no greedy choice
/// is a near tie.
fn perturb(model: &impl Model, norm_center: f64, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (name, mut p) in model.named_parameters() {
            let noise = Tensor::randn(p.size(), (Kind::Float, Device::Cpu));
            let v = if name.contains("norm") || name.contains(".ln_") {
                if name.ends_with(".bias") {
                    noise * 0.1
                } else {
                    noise * 0.2 + norm_center
                }
            } else if name.ends_with(".bias") {
                noise * 0.1
            } else if name.contains("embed") || name.contains("wte") || name.contains("wpe") {
                noise * 0.5
            } else {
                // GPT-2's Conv1D weights are [in, out], nn.Linear's [out, in]: either way the
                // smaller side is close enough to the fan-in for a scale.
                let fan_in = *p.size().iter().min().unwrap() as f64;
                noise / fan_in.sqrt()
            };
            p.copy_(&v);
        }
    });
}

fn prompt(b: i64, t: i64, vocab: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(vocab, [b, t], (Kind::Int64, Device::Cpu))
}

fn sampled(model: &impl Decode, prompt: &Tensor, s: Sampling, kv_cache: bool) -> Tensor {
    generate(model, prompt, &Sampling { kv_cache, ..s }).unwrap()
}

/// Greedy and seeded top-k sampling give the same tokens with and without the cache, and the
/// cache's logits at every step of the greedy sequence (prefill of the prompt, then one token at
/// a time up to the model's positions) equal the training forward's last position within
/// LOGITS_TOL; one more token than the positions is refused with an error.
fn assert_cache_matches(name: &str, model: &(impl Decode + Forward), prompt: &Tensor, new_tokens: usize) {
    let positions = model.context().positions as i64;
    let greedy = Sampling::new(new_tokens, 0.0, None, 0);
    let cached = sampled(model, prompt, greedy, true);
    let uncached = sampled(model, prompt, greedy, false);
    assert_eq!(cached.size()[1], prompt.size()[1] + new_tokens as i64);
    assert!(cached.equal(&uncached), "{name}: greedy with the cache {cached:?}\nwithout {uncached:?}");
    let drawn = Sampling::new(new_tokens, 0.9, Some(20), 11);
    let (a, b) = (sampled(model, prompt, drawn, true), sampled(model, prompt, drawn, false));
    assert!(a.equal(&b), "{name}: seeded draws with the cache {a:?}\nwithout {b:?}");

    let mut cache = model.new_cache();
    let t0 = prompt.size()[1];
    let steps = cached.size()[1].min(positions);
    let (mut worst, mut worst_abs) = (0.0f64, 0.0f64);
    for end in t0..=steps {
        let (logits, reference) = step_logits(model, &cached, &mut cache, end);
        let scale = reference.abs().max().double_value(&[]).max(1.0);
        let d = (logits - reference).abs().max().double_value(&[]);
        (worst, worst_abs) = (worst.max(d / scale), worst_abs.max(d));
        assert!(
            d <= LOGITS_TOL * scale,
            "{name}: after {end} tokens, max |cached - uncached logits| = {d:e}, largest logit {scale}"
        );
    }
    eprintln!(
        "{name}: {} cached steps, max |cached - uncached logits| = {worst_abs:.2e}, {worst:.2e} of the largest",
        steps - t0 + 1
    );
    assert_eq!(cache.len() as i64, steps);
    if steps == positions {
        let more = model.last_logits(&cached.narrow(1, 0, 1), Some(&mut cache));
        assert!(matches!(more, Err(ModelError::Generate(_))), "{name}: a cache beyond the positions was accepted");
    }
}

/// One step along `tokens`: the cache's last-position logits after feeding it the tokens up to
/// `end` it has not seen, and the training forward's on all `end` of them; fp32, on the host.
fn step_logits(model: &(impl Decode + Forward), tokens: &Tensor, cache: &mut KvCache, end: i64) -> (Tensor, Tensor) {
    let start = cache.len() as i64;
    let logits = tch::no_grad(|| model.last_logits(&tokens.narrow(1, start, end - start), Some(cache))).unwrap();
    let reference = tch::no_grad(|| model.forward(&tokens.narrow(1, 0, end))).select(1, -1);
    let host = |t: Tensor| t.to_kind(Kind::Float).to_device(Device::Cpu);
    (host(logits), host(reference))
}

/// The training forward, which the cache's logits are checked against.
trait Forward {
    fn forward(&self, idx: &Tensor) -> Tensor;
}

impl Forward for Gpt {
    fn forward(&self, idx: &Tensor) -> Tensor {
        Gpt::forward(self, idx)
    }
}

impl<C: zerokit::model::decoder::DecoderConfig> Forward for zerokit::model::decoder::Decoder<C> {
    fn forward(&self, idx: &Tensor) -> Tensor {
        zerokit::model::decoder::Decoder::forward(self, idx)
    }
}

impl Forward for AnyModel {
    fn forward(&self, idx: &Tensor) -> Tensor {
        AnyModel::forward(self, idx)
    }
}

#[test]
fn gpt2_tiny_cached_equals_uncached_within_and_beyond_the_block() {
    let cfg = GptConfig { n_layer: 2, n_head: 2, n_embd: 32, block_size: 16, vocab_size: 96 };
    let model = Gpt::new(&cfg, Device::Cpu, Kind::Float, 3).unwrap();
    perturb(&model, 1.0, 3);
    // 5 + 30 tokens: cached up to the block of 16, then cropped and re-encoded.
    assert_cache_matches("gpt2-tiny", &model, &prompt(2, 5, 96, 1), 30);
    // Through the family type `train sample` holds.
    assert_cache_matches("gpt2-tiny (AnyModel)", &AnyModel::from(model), &prompt(1, 3, 96, 2), 20);
}

#[test]
fn llama_tiny_cached_equals_uncached() {
    let cfg = LlamaConfig::preset("llama-tiny").unwrap();
    let model = Llama::new(&cfg, Device::Cpu, Kind::Float, 5).unwrap();
    perturb(&model, 1.0, 5);
    assert_cache_matches("llama-tiny", &model, &prompt(2, 6, cfg.vocab_size as i64, 3), 40);
    // 24 positions: the cache fills, then each token re-encodes the last 24.
    let short = LlamaConfig { max_position_embeddings: 24, ..cfg };
    let model = Llama::new(&short, Device::Cpu, Kind::Float, 6).unwrap();
    perturb(&model, 1.0, 6);
    assert_cache_matches("llama-tiny, 24 positions", &model, &prompt(1, 6, short.vocab_size as i64, 4), 30);
}

#[test]
fn gemma_tiny_cached_equals_uncached_past_the_sliding_window() {
    let cfg = GemmaConfig::preset("gemma-tiny").unwrap();
    assert_eq!(cfg.sliding_window, 64);
    let model = Gemma::new(&cfg, Device::Cpu, Kind::Float, 7).unwrap();
    perturb(&model, 0.0, 7);
    // 6 + 70 tokens: the local layers' window of 64 cuts from the 65th on.
    assert_cache_matches("gemma-tiny", &model, &prompt(2, 6, cfg.vocab_size as i64, 5), 70);
    // A window of 5 in 16 positions: windows cut within the prefill (a 9-token prompt) and each
    // step, and the context is cropped too.
    let short = GemmaConfig { sliding_window: 5, max_position_embeddings: 16, ..cfg };
    let model = Gemma::new(&short, Device::Cpu, Kind::Float, 8).unwrap();
    perturb(&model, 0.0, 8);
    assert_cache_matches("gemma-tiny, window 5, 16 positions", &model, &prompt(1, 9, short.vocab_size as i64, 6), 20);
}

fn fixture(family: &str, case: &str) -> (std::path::PathBuf, HashMap<String, Tensor>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(family).join(case);
    let gen = Tensor::read_safetensors(dir.join("generate.safetensors")).unwrap().into_iter().collect();
    (dir.join("model"), gen)
}

/// Greedy tokens with the cache (and without) equal transformers' generate(do_sample=False), and
/// the cache's logits the forward's.
fn assert_matches_transformers(name: &str, model: &(impl Decode + Forward), gen: &HashMap<String, Tensor>) {
    let (prompt, theirs) = (&gen["prompt"], &gen["generated"]);
    let new_tokens = (theirs.size()[1] - prompt.size()[1]) as usize;
    for kv_cache in [true, false] {
        let ours = sampled(model, prompt, Sampling::new(new_tokens, 0.0, None, 0), kv_cache);
        assert!(ours.equal(theirs), "{name} (cache {kv_cache}): greedy {ours:?}\ntransformers {theirs:?}");
    }
    assert_cache_matches(name, model, prompt, new_tokens);
}

#[test]
fn llama_greedy_equals_transformers_generate() {
    for case in ["gqa_llama3_tied", "untied_bias"] {
        let (dir, gen) = fixture("llama", case);
        let (model, _) = load_llama(&dir, Device::Cpu, Kind::Float).unwrap();
        assert_matches_transformers(case, &model, &gen);
    }
}

#[test]
fn gemma_greedy_equals_transformers_generate_past_the_sliding_window() {
    // Windows of 8 in 46 tokens; Gemma 2 soft-caps attention (the written-out path) and logits.
    for case in ["gemma2_softcap", "gemma3_qk_norm"] {
        let (dir, gen) = fixture("gemma", case);
        let (model, cfg) = load_gemma(&dir, Device::Cpu, Kind::Float).unwrap();
        assert!(gen["generated"].size()[1] > cfg.sliding_window as i64);
        assert_matches_transformers(case, &model, &gen);
    }
}

/// bf16 on a GPU, where `train sample` runs: along the cached greedy sequence, every step's
/// cached last-position logits agree with the training forward's within BF16_TOL of the largest
/// logit, and the cache's greedy choice is the forward's unless the forward's two best logits are
/// within twice that (a near tie that bf16 rounding may break either way). The two paths round
/// differently (one row against T rows in the products, attention over the cache against the
/// fused causal kernel): bf16 keeps 8 bits, 2^-8 = 0.4% of a value, over a few layers of sums.
const BF16_TOL: f64 = 3e-2;

fn assert_cache_close_in_bf16(name: &str, model: &(impl Decode + Forward), prompt: &Tensor, new_tokens: usize) {
    let greedy = Sampling::new(new_tokens, 0.0, None, 0);
    let cached = sampled(model, prompt, greedy, true);
    let t0 = prompt.size()[1];
    let steps = cached.size()[1].min(model.context().positions as i64);
    let mut cache = model.new_cache();
    let (mut worst, mut ties) = (0.0f64, 0);
    for end in t0..=steps {
        let (logits, reference) = step_logits(model, &cached, &mut cache, end);
        let scale = reference.abs().max().double_value(&[]).max(1.0);
        let d = (&logits - &reference).abs().max().double_value(&[]);
        worst = worst.max(d / scale);
        assert!(
            d <= BF16_TOL * scale,
            "{name}: after {end} tokens, max |cached - uncached| = {d:e}, largest logit {scale}"
        );
        if end < cached.size()[1] {
            let top2 = reference.topk(2, -1, true, true).0;
            for row in 0..cached.size()[0] {
                let chosen = cached.int64_value(&[row, end]);
                let gap = top2.double_value(&[row, 0]) - top2.double_value(&[row, 1]);
                if chosen != reference.get(row).argmax(0, false).int64_value(&[]) {
                    assert!(gap <= 2.0 * BF16_TOL * scale, "{name}: row {row}, token {end}: the cache chose {chosen} where the forward's best leads by {gap}");
                    ties += 1;
                }
            }
        }
    }
    eprintln!("{name} (bf16, CUDA): {} cached steps, max |cached - uncached| = {worst:.2e} of the largest logit, {ties} near ties decided otherwise", steps - t0 + 1);
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine"]
fn cached_sampling_in_bf16_on_cuda() {
    assert!(zerokit::device::load_cuda(), "no CUDA device");
    let (dev, bf16) = (Device::Cuda(0), Kind::BFloat16);
    let cfg = GptConfig { n_layer: 2, n_head: 2, n_embd: 64, block_size: 32, vocab_size: 96 };
    let model = Gpt::new(&cfg, dev, bf16, 3).unwrap();
    perturb(&model, 1.0, 3);
    assert_cache_close_in_bf16("gpt2-tiny", &model, &prompt(2, 5, 96, 1), 40);
    let cfg = LlamaConfig::preset("llama-tiny").unwrap();
    let model = Llama::new(&cfg, dev, bf16, 5).unwrap();
    perturb(&model, 1.0, 5);
    assert_cache_close_in_bf16("llama-tiny", &model, &prompt(2, 6, cfg.vocab_size as i64, 3), 60);
    let cfg = GemmaConfig { sliding_window: 16, ..GemmaConfig::preset("gemma-tiny").unwrap() };
    let model = Gemma::new(&cfg, dev, bf16, 7).unwrap();
    perturb(&model, 0.0, 7);
    assert_cache_close_in_bf16("gemma-tiny, window 16", &model, &prompt(2, 6, cfg.vocab_size as i64, 5), 60);
}
