//! Memory estimates for training GPT-2 with ZeRO stages 0-3: per GPU (parameters, gradients,
//! optimizer state, activations, logits, communication buffers) and per node (CPU), with and
//! without offload, and the largest micro-batch that fits. docs/estimate.md derives every term.
//!
//! DeepSpeed's own model-state estimators (estimate_zero2_model_states_mem_needs and
//! estimate_zero3_model_states_mem_needs) are reproduced exactly in `deepspeed_zero2` and
//! `deepspeed_zero3`, and shown beside zerokit's figures.

use crate::formats::dtype::DType;
use crate::model::GptConfig;
use crate::units::{parse_size, SizeError};
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("unknown model preset '{0}' (expected gpt2, gpt2-medium, gpt2-large or gpt2-xl)")]
    UnknownPreset(String),
    #[error("invalid model shape: {0}")]
    Shape(String),
    #[error("invalid setup: {0}")]
    Setup(String),
    #[error(transparent)]
    BadSize(#[from] SizeError),
    #[error("JSON output: {0}")]
    Json(#[from] serde_json::Error),
}

const GIB: f64 = (1u64 << 30) as f64;

/// The dimensions that decide GPT-2's memory (transformers' GPT2Config names in comments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    pub n_layer: u64,
    pub n_head: u64,
    /// hidden size C (n_embd)
    pub n_embd: u64,
    /// V (vocab_size); the LM head is tied to the token embedding
    pub vocab_size: u64,
    /// maximum sequence length (n_positions)
    pub block_size: u64,
}

impl ModelShape {
    /// The shape of one of the model's presets ([`GptConfig::preset`]).
    pub fn preset(name: &str) -> Result<Self, MemoryError> {
        let c = GptConfig::preset(name).map_err(|_| MemoryError::UnknownPreset(name.to_string()))?;
        let n = |v: usize| v as u64;
        Ok(ModelShape {
            n_layer: n(c.n_layer),
            n_head: n(c.n_head),
            n_embd: n(c.n_embd),
            vocab_size: n(c.vocab_size),
            block_size: n(c.block_size),
        })
    }

    pub fn validate(&self) -> Result<(), MemoryError> {
        let s = self;
        if s.n_layer == 0 || s.n_head == 0 || s.n_embd == 0 || s.vocab_size == 0 || s.block_size == 0 {
            return Err(MemoryError::Shape(format!("every dimension must be positive: {s:?}")));
        }
        if s.n_embd % s.n_head != 0 {
            return Err(MemoryError::Shape(format!("n_embd {} is not a multiple of n_head {}", s.n_embd, s.n_head)));
        }
        Ok(())
    }

    /// Parameters of one block: ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj (weights and
    /// biases): 12 C^2 + 13 C.
    pub fn block_params(&self) -> u64 {
        let c = self.n_embd;
        12 * c * c + 13 * c
    }

    /// All parameters, the tied LM head counted once (as DeepSpeed's model_to_params does).
    pub fn num_params(&self) -> u64 {
        let c = self.n_embd;
        self.vocab_size * c + self.block_size * c + self.n_layer * self.block_params() + 2 * c
    }

    /// DeepSpeed's "largest layer": the most parameters held directly by one module
    /// (`parameters(recurse=False)`): the token embedding for every GPT-2 size.
    pub fn largest_layer_params(&self) -> u64 {
        let c = self.n_embd;
        [self.vocab_size * c, self.block_size * c, 4 * c * c + 4 * c, 3 * c * c + 3 * c].into_iter().max().unwrap_or(0)
    }
}

/// The precision a training set-up keeps its parameters and activations in (`--dtype`): a
/// choice of the estimate, named as DeepSpeed's configs name it; its tensors' element type is a
/// [`DType`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Fp16,
    Bf16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The element type of tensors stored in this precision.
    pub fn tensor_dtype(self) -> DType {
        match self {
            Dtype::Fp32 => DType::F32,
            Dtype::Fp16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
        }
    }

    pub fn bytes(self) -> u64 {
        self.tensor_dtype().size() as u64
    }
}

/// Where the optimizer state (and, at stage 3, the parameters) live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Offload {
    None,
    Optimizer,
    OptimizerAndParams,
}

/// Whether `train` can run this stage and offload today (stages 0-2, nothing offloaded).
pub fn trainable(stage: u8, offload: Offload) -> bool {
    stage <= 2 && offload == Offload::None
}

impl Offload {
    fn label(self) -> &'static str {
        match self {
            Offload::None => "none",
            Offload::Optimizer => "optimizer",
            Offload::OptimizerAndParams => "opt+params",
        }
    }
}

/// One training set-up to estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setup {
    pub model: ModelShape,
    pub gpus_per_node: u64,
    pub nodes: u64,
    pub dtype: Dtype,
    pub micro_batch: u64,
    pub seq_len: u64,
    pub activation_checkpointing: bool,
    /// Dropout > 0 saves a one-byte mask per element after the embedding and after each
    /// residual branch.
    pub dropout: bool,
    /// Gradient reduction bucket, in elements (DeepSpeed's reduce_bucket_size).
    pub bucket_elems: u64,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: u64,
}

impl Setup {
    pub fn validate(&self) -> Result<(), MemoryError> {
        self.model.validate()?;
        if self.gpus_per_node == 0 || self.nodes == 0 {
            return Err(MemoryError::Setup("gpus per node and nodes must be at least 1".into()));
        }
        if self.seq_len == 0 || self.seq_len > self.model.block_size {
            return Err(MemoryError::Setup(format!(
                "sequence length {} must be in 1..={} (the model's block size)",
                self.seq_len, self.model.block_size
            )));
        }
        if self.grad_accum == 0 {
            return Err(MemoryError::Setup("gradient accumulation steps must be at least 1".into()));
        }
        Ok(())
    }

    pub fn world_size(&self) -> u64 {
        self.gpus_per_node * self.nodes
    }
}

/// Bytes per GPU, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Breakdown {
    pub params: u64,
    pub grads: u64,
    /// fp32 master weights and both Adam moments
    pub optimizer: u64,
    pub activations: u64,
    pub logits: u64,
    pub comm: u64,
    /// CUDA kernel images loaded on first use and cuBLAS workspaces ([`CUDA_RUNTIME_BYTES`]).
    pub runtime: u64,
}

impl Breakdown {
    pub fn model_states(&self) -> u64 {
        self.params + self.grads + self.optimizer
    }

    pub fn total(&self) -> u64 {
        self.model_states() + self.activations + self.logits + self.comm + self.runtime
    }
}

/// DeepSpeed's estimator output for the same stage and offload (bytes; the GPU figure counts
/// parameters, gradients and optimizer state only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeepSpeedFigures {
    pub gpu: u64,
    pub cpu_per_node: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub stage: u8,
    pub offload: Offload,
    pub gpu: Breakdown,
    pub gpu_total: u64,
    pub cpu_per_node: u64,
    /// Largest micro-batch whose total fits the usable GPU memory (0: not even one sequence).
    pub max_micro_batch: u64,
    /// Whether `train` runs this stage and offload today ([`trainable`]); the others are plans.
    pub trainable: bool,
    /// None for stages 0 and 1, which DeepSpeed has no estimator for.
    pub deepspeed: Option<DeepSpeedFigures>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub setup: Setup,
    pub num_params: u64,
    pub largest_layer_params: u64,
    /// GPU memory the micro-batch search fits into (after the reserve).
    pub usable_gpu_memory: u64,
    pub rows: Vec<Row>,
}

/// The stage/offload combinations reported, in order.
pub const CONFIGS: [(u8, Offload); 8] = [
    (0, Offload::None),
    (1, Offload::None),
    (1, Offload::Optimizer),
    (2, Offload::None),
    (2, Offload::Optimizer),
    (3, Offload::None),
    (3, Offload::Optimizer),
    (3, Offload::OptimizerAndParams),
];

/// Activation bytes autograd keeps per transformer block for one micro-batch, with libtorch's
/// scaled_dot_product_attention (flash or memory-efficient: O(T), no T x T matrix).
/// In units of B*T*C elements of the compute dtype: ln_1 input 1, c_attn input 1, qkv 3
/// (saved by attention), attention output 1 (= c_proj input, the same storage), ln_2 input 1,
/// c_fc input 1, gelu input 4, mlp c_proj input 4: 16. Plus per token: two layer-norm
/// mean/rstd pairs (fp32) and the attention logsumexp (fp32, per head).
pub fn block_activation_bytes(s: &Setup) -> u64 {
    let (b, t, c, h) = (s.micro_batch, s.seq_len, s.model.n_embd, s.model.n_head);
    let e = s.dtype.bytes();
    let tokens = b * t;
    // flash attention (fp16/bf16) keeps logsumexp as [B, H, T]; the memory-efficient kernel
    // (what fp32 gets) pads T to a multiple of 32.
    let lse_t = if s.dtype == Dtype::Fp32 { t.div_ceil(32) * 32 } else { t };
    let mut bytes = 16 * tokens * c * e + 2 * 2 * tokens * 4 + b * h * lse_t * 4;
    if s.dropout {
        bytes += 2 * tokens * c; // attn and mlp residual dropout masks (bool)
    }
    bytes
}

/// Activations outside the blocks: token ids and positions kept by the embedding backward, ln_f
/// input and statistics, the LM head's input, the targets and total weight kept by nll_loss,
/// and the embedding dropout mask.
fn outer_activation_bytes(s: &Setup) -> u64 {
    let tokens = s.micro_batch * s.seq_len;
    let c = s.model.n_embd;
    let e = s.dtype.bytes();
    let mut bytes = tokens * 8 + s.seq_len * 8 + 2 * tokens * c * e + 2 * tokens * 4 + tokens * 8 + 4;
    if s.dropout {
        bytes += tokens * c;
    }
    bytes
}

/// Activations alive when backward starts. With checkpointing only each block's input is
/// kept, plus one block's activations while it is recomputed.
pub fn activation_bytes(s: &Setup) -> u64 {
    let block = block_activation_bytes(s);
    let outer = outer_activation_bytes(s);
    let l = s.model.n_layer;
    if s.activation_checkpointing {
        let block_input = s.micro_batch * s.seq_len * s.model.n_embd * s.dtype.bytes();
        l * block_input + block + outer
    } else {
        l * block + outer
    }
}

/// Tokens in one chunk of zerokit's head and loss (`Gpt::head_backward`): whole sequences,
/// about `model::HEAD_CHUNK_TOKENS`, at most the micro-batch.
pub fn head_chunk_tokens(s: &Setup) -> u64 {
    let per = (crate::model::HEAD_CHUNK_TOKENS as u64 / s.seq_len.max(1)).clamp(1, s.micro_batch.max(1));
    per * s.seq_len
}

/// The fp32 log-softmax of the logits that cross-entropy saves for backward, for one chunk.
pub fn loss_saved_bytes(s: &Setup) -> u64 {
    4 * head_chunk_tokens(s) * s.model.vocab_size
}

/// The loss's peak, reached as a chunk's backward starts: its logits in the compute dtype, the
/// saved fp32 log-softmax, nll_loss's dense fp32 gradient and the fp32 gradient of the logits
/// that log_softmax's backward produces from the two. zerokit runs the head chunk by chunk, so
/// one chunk's worth is alive at a time, not the micro-batch's B*T*V.
/// With more than one chunk, the token embedding's gradient is summed over chunks: the running
/// sum and the chunk's own gradient (2·e·V·C) are alive beside it.
pub fn logits_bytes(s: &Setup) -> u64 {
    let ctv = head_chunk_tokens(s) * s.model.vocab_size;
    let chunks = (s.micro_batch * s.seq_len).div_ceil(head_chunk_tokens(s));
    let wte_sum = if chunks > 1 { 2 * s.dtype.bytes() * s.model.vocab_size * s.model.n_embd } else { 0 };
    ctv * s.dtype.bytes() + loss_saved_bytes(s) + 2 * 4 * ctv + wte_sum
}

/// Device memory the CUDA runtime takes after the context exists, whatever the model: kernel
/// images that CUDA's lazy loading brings in as libtorch first uses them, and cuBLAS/cuBLASLt
/// workspaces. Measured as what `train` holds beyond every other term on an H200 with CUDA 13
/// and libtorch 2.11 (docs/estimate.md: 0.80-0.87 GiB at micro-batch 1 for 124M, 355M and 1.5B).
pub const CUDA_RUNTIME_BYTES: u64 = 800 << 20;

/// zerokit's per-GPU breakdown for one stage and offload choice.
pub fn gpu_breakdown(s: &Setup, stage: u8, offload: Offload) -> Breakdown {
    let psi = s.model.num_params();
    let lay = s.model.largest_layer_params();
    let d = s.world_size();
    let e = s.dtype.bytes();
    let part = |k: u64| k * psi / d;
    // Stages 0-2 are zerokit's engine: autograd's compute-dtype gradients live only until their
    // bucket is reduced into the fp32 gradient shard the optimizer reads (4 bytes/param/d), except
    // that stages 0-1 accumulate micro-batches in a full compute-dtype buffer. Stage 3 follows
    // DeepSpeed's accounting (train does not run it).
    let accum = if s.grad_accum > 1 { e * psi } else { 0 };
    let (params, grads, optimizer) = match (stage, offload) {
        (0, _) => (e * psi, 4 * psi + accum, 12 * psi),
        (1, Offload::None) => (e * psi, part(4) + accum, part(12)),
        // The full compute-dtype gradient still accumulates on the GPU; its fp32 shard and
        // the optimizer live on the CPU.
        (1, _) => (e * psi, e * psi, 0),
        (2, Offload::None) => (e * psi, part(4), part(12)),
        (2, _) => (e * psi, 0, 0),
        // Stage 3 gathers one layer's parameters (and reduces its gradients) at a time.
        (_, Offload::None) => (part(e) + e * lay, part(e + 4) + e * lay, part(12)),
        (_, Offload::Optimizer) => (part(e) + e * lay, e * lay, 0),
        (_, Offload::OptimizerAndParams) => (e * lay, e * lay, 0),
    };
    let comm = e * s.bucket_elems.min(psi);
    Breakdown {
        params,
        grads,
        optimizer,
        activations: activation_bytes(s),
        logits: logits_bytes(s),
        comm,
        runtime: CUDA_RUNTIME_BYTES,
    }
}

/// zerokit's CPU memory per node: the larger of start-up (each process materialises the fp32
/// model once; layer by layer at stage 3) and the offloaded state of the node's ranks.
pub fn cpu_per_node(s: &Setup, stage: u8, offload: Offload) -> u64 {
    let psi = s.model.num_params();
    let g = s.gpus_per_node;
    let d = s.world_size();
    let init = if stage == 3 { 4 * s.model.largest_layer_params() * g } else { 4 * psi * g };
    // fp32 master, two moments, fp32 gradient; the compute-dtype parameter shard too when
    // parameters are offloaded.
    let per_rank = match offload {
        Offload::None => 0,
        Offload::Optimizer => 16 * psi / d,
        Offload::OptimizerAndParams => (16 + s.dtype.bytes()) * psi / d,
    };
    init.max(per_rank * g)
}

/// DeepSpeed's estimate_zero2_model_states_mem_needs (stage_1_and_2.py): (cpu, gpu) bytes.
pub fn deepspeed_zero2(
    total_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    cpu_offload: bool,
    additional_buffer_factor: f64,
) -> (u64, u64) {
    let total_gpus = num_nodes * num_gpus_per_node;
    let (cpu, gpu) = if cpu_offload {
        let gpu = 2 * total_params;
        let cpu = (total_params * (4 * total_gpus).max(16)) as f64 * additional_buffer_factor;
        (cpu, gpu)
    } else {
        let gpu = 2 * total_params + py_int((18 * total_params) as f64 / total_gpus as f64);
        let cpu = (total_params * 4 * num_gpus_per_node) as f64 * additional_buffer_factor;
        (cpu, gpu)
    };
    (py_int(cpu), gpu)
}

/// DeepSpeed's estimate_zero3_model_states_mem_needs (stage3.py): (cpu, gpu,
/// largest_layer_memory) bytes.
#[allow(clippy::too_many_arguments)]
pub fn deepspeed_zero3(
    total_params: u64,
    largest_layer_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    cpu_offload: bool,
    cpu_offload_params: bool,
    zero_init: bool,
    additional_buffer_factor: f64,
) -> (u64, u64, u64) {
    let total_gpus = num_nodes * num_gpus_per_node;
    let gpus_factor = 1.0 / num_nodes as f64;
    let largest_layer_memory = 4 * largest_layer_params;
    let abf = additional_buffer_factor;
    // Python's max(int, float) * int keeps the int (exact) product when the int wins.
    let max_term = |k: f64| {
        let a = 4 * num_gpus_per_node;
        let b = k * gpus_factor;
        if a as f64 >= b {
            (total_params * a) as f64 * abf
        } else {
            total_params as f64 * b * abf
        }
    };
    let (cpu, gpu) = if cpu_offload {
        if cpu_offload_params {
            let cpu = if zero_init { (total_params * 18) as f64 * gpus_factor * abf } else { max_term(18.0) };
            (cpu, largest_layer_memory)
        } else {
            let gpu = largest_layer_memory + py_int((2 * total_params) as f64 / total_gpus as f64);
            let cpu = if zero_init { (total_params * 16) as f64 * gpus_factor * abf } else { max_term(16.0) };
            (cpu, gpu)
        }
    } else {
        let gpu = largest_layer_memory + py_int((18 * total_params) as f64 / total_gpus as f64);
        let cpu = if zero_init {
            (largest_layer_params * 4 * num_gpus_per_node) as f64 * abf
        } else {
            (total_params * 4 * num_gpus_per_node) as f64 * abf
        };
        (cpu, gpu)
    };
    (py_int(cpu), gpu, largest_layer_memory)
}

/// Python's int() of a non-negative float.
fn py_int(x: f64) -> u64 {
    x.trunc() as u64
}

/// What DeepSpeed's estimators say for a stage/offload (additional_buffer_factor 1.5 and
/// zero_init, their defaults); None where DeepSpeed has no estimator (stages 0 and 1).
pub fn deepspeed_figures(s: &Setup, stage: u8, offload: Offload) -> Option<DeepSpeedFigures> {
    let psi = s.model.num_params();
    let (g, n) = (s.gpus_per_node, s.nodes);
    let (cpu, gpu) = match stage {
        2 => deepspeed_zero2(psi, g, n, offload != Offload::None, 1.5),
        3 => {
            let (c, g, _) = deepspeed_zero3(
                psi,
                s.model.largest_layer_params(),
                g,
                n,
                offload != Offload::None,
                offload == Offload::OptimizerAndParams,
                true,
                1.5,
            );
            (c, g)
        }
        _ => return None,
    };
    Some(DeepSpeedFigures { gpu, cpu_per_node: cpu })
}

/// The largest micro-batch whose total fits `usable` bytes (every activation and logit term is
/// linear in the micro-batch).
fn max_micro_batch(s: &Setup, stage: u8, offload: Offload, usable: u64) -> u64 {
    // Memory grows with the micro-batch, though not linearly (the head's chunk stops growing at
    // HEAD_CHUNK_TOKENS): search the largest that fits.
    let fits = |b: u64| gpu_breakdown(&Setup { micro_batch: b, ..s.clone() }, stage, offload).total() <= usable;
    if !fits(1) {
        return 0;
    }
    let mut hi = 2;
    while fits(hi) {
        if hi >= 1 << 40 {
            return hi; // nothing per sample: any micro-batch fits
        }
        hi *= 2;
    }
    let mut lo = hi / 2; // fits(lo), !fits(hi)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Every stage and offload choice for one set-up. `usable_gpu_memory` is what the micro-batch
/// search may fill.
pub fn estimate(s: &Setup, usable_gpu_memory: u64) -> Result<Estimate, MemoryError> {
    s.validate()?;
    let rows = CONFIGS
        .iter()
        .map(|&(stage, offload)| {
            let gpu = gpu_breakdown(s, stage, offload);
            Row {
                stage,
                offload,
                gpu,
                gpu_total: gpu.total(),
                cpu_per_node: cpu_per_node(s, stage, offload),
                max_micro_batch: max_micro_batch(s, stage, offload, usable_gpu_memory),
                trainable: trainable(stage, offload),
                deepspeed: deepspeed_figures(s, stage, offload),
            }
        })
        .collect();
    Ok(Estimate {
        setup: s.clone(),
        num_params: s.model.num_params(),
        largest_layer_params: s.model.largest_layer_params(),
        usable_gpu_memory,
        rows,
    })
}

/// `ckpt estimate`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct EstimateArgs {
    /// Model preset: gpt2, gpt2-medium, gpt2-large or gpt2-xl (the flags below override it).
    #[arg(long, default_value = "gpt2")]
    pub model: String,
    #[arg(long)]
    pub n_layer: Option<u64>,
    #[arg(long)]
    pub n_head: Option<u64>,
    #[arg(long)]
    pub n_embd: Option<u64>,
    #[arg(long)]
    pub vocab_size: Option<u64>,
    /// Maximum sequence length of the model (n_positions).
    #[arg(long)]
    pub block_size: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub gpus_per_node: u64,
    #[arg(long, default_value_t = 1)]
    pub nodes: u64,
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    pub dtype: Dtype,
    #[arg(long, default_value_t = 8)]
    pub micro_batch: u64,
    /// Tokens per sequence (default: the model's block size).
    #[arg(long)]
    pub seq_len: Option<u64>,
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Count dropout masks (training with dropout > 0).
    #[arg(long)]
    pub dropout: bool,
    /// Gradient reduction bucket in elements (DeepSpeed's reduce_bucket_size default).
    #[arg(long, default_value_t = 500_000_000)]
    pub bucket_elems: u64,
    /// Micro-batches accumulated per optimizer step (gradient_accumulation_steps).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: u64,
    /// Memory of one GPU, for the largest micro-batch that fits.
    #[arg(long, default_value = "80GiB")]
    pub gpu_memory: String,
    /// Kept free on each GPU for the CUDA context, NCCL's buffers and allocator fragmentation.
    #[arg(long, default_value = "2GiB")]
    pub reserve: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl EstimateArgs {
    pub fn setup(&self) -> Result<Setup, MemoryError> {
        let mut m = ModelShape::preset(&self.model)?;
        m.n_layer = self.n_layer.unwrap_or(m.n_layer);
        m.n_head = self.n_head.unwrap_or(m.n_head);
        m.n_embd = self.n_embd.unwrap_or(m.n_embd);
        m.vocab_size = self.vocab_size.unwrap_or(m.vocab_size);
        m.block_size = self.block_size.unwrap_or(m.block_size);
        let s = Setup {
            model: m,
            gpus_per_node: self.gpus_per_node,
            nodes: self.nodes,
            dtype: self.dtype,
            micro_batch: self.micro_batch,
            seq_len: self.seq_len.unwrap_or(m.block_size),
            activation_checkpointing: self.activation_checkpointing,
            dropout: self.dropout,
            bucket_elems: self.bucket_elems,
            grad_accum: self.grad_accum,
        };
        s.validate()?;
        Ok(s)
    }
}

/// `ckpt estimate`: the report as text (a table, or JSON with `--json`).
pub fn run(args: &EstimateArgs) -> Result<String, MemoryError> {
    let s = args.setup()?;
    let gpu = parse_size(&args.gpu_memory)?;
    let reserve = parse_size(&args.reserve)?;
    let est = estimate(&s, gpu.saturating_sub(reserve))?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&est)? + "\n");
    }
    Ok(render(&est, &args.model, gpu))
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// The human-readable report.
pub fn render(est: &Estimate, model_name: &str, gpu_memory: u64) -> String {
    let s = &est.setup;
    let m = &s.model;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model  {model_name}: {} layers, {} heads, n_embd {}, vocab {}, block {}: {:.1}M parameters (largest layer {:.1}M)",
        m.n_layer,
        m.n_head,
        m.n_embd,
        m.vocab_size,
        m.block_size,
        est.num_params as f64 / 1e6,
        est.largest_layer_params as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "setup  {} node(s) x {} GPU(s), {}, micro-batch {}, sequence {}, activation checkpointing {}{}",
        s.nodes,
        s.gpus_per_node,
        s.dtype.name(),
        s.micro_batch,
        s.seq_len,
        if s.activation_checkpointing { "on" } else { "off" },
        if s.dropout { ", dropout masks" } else { "" }
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "GiB per GPU                                                                          max micro-batch   CPU GiB"
    );
    let _ = writeln!(
        out,
        "stage offload     params   grads   optim  activ  logits   comm   cuda    total   in {:>6.1} GiB       per node",
        gib(gpu_memory)
    );
    for r in &est.rows {
        let g = &r.gpu;
        let _ = writeln!(
            out,
            "{:>5} {:<10} {:>7.2} {:>7.2} {:>7.2} {:>6.2} {:>7.2} {:>6.2} {:>6.2} {:>8.2}   {:>15}   {:>8.2}",
            r.stage,
            r.offload.label(),
            gib(g.params),
            gib(g.grads),
            gib(g.optimizer),
            gib(g.activations),
            gib(g.logits),
            gib(g.comm),
            gib(g.runtime),
            gib(r.gpu_total),
            r.max_micro_batch,
            gib(r.cpu_per_node)
        );
        if !r.trainable {
            // The figure is real, the row is a plan: say so on the row itself.
            out.pop();
            out.push_str("   *\n");
        }
    }
    let _ =
        writeln!(out, "* estimate only: `train` runs stages 0-2 without offload; ZeRO-3 and offload are not in it yet");
    let _ = writeln!(out);
    let _ =
        writeln!(out, "DeepSpeed's estimators (params + grads + optimizer state only; buffer factor 1.5, zero_init):");
    let _ = writeln!(out, "stage offload     GPU GiB  CPU GiB/node   zerokit's params+grads+optim");
    for r in &est.rows {
        if let Some(ds) = r.deepspeed {
            let _ = writeln!(
                out,
                "{:>5} {:<10} {:>7.2} {:>13.2}   {:>7.2}",
                r.stage,
                r.offload.label(),
                gib(ds.gpu),
                gib(ds.cpu_per_node),
                gib(r.gpu.model_states())
            );
        }
    }
    let _ = writeln!(
        out,
        "\nmax micro-batch: the most sequences whose total fits {:.1} GiB (the GPU less --reserve). See docs/estimate.md.",
        gib(est.usable_gpu_memory)
    );
    out
}
