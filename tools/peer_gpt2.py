"""The GPT-2, optimizer and training step that every PyTorch and DeepSpeed peer of `train` runs,
written once (tools/bench_gpt2_peer.py: one GPU; tools/bench_zero_peer.py: several).

The model is nanoGPT's GPT-2 (nn.Linear layers with biases, F.scaled_dot_product_attention with
is_causal, tanh GELU as GPT-2 and zerokit use, tied head, no dropout), vocab padded to 50304, and
its forward returns the loss from logits upcast to fp32, so that torch.compile sees the loss too.
Initialisation is GPT-2's (N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer)) from a
seeded generator on the training device, so runs on the same kind of device start from the same
weights. Batches are the ones `train` draws from the same train.bin (lib/data/dataset.rs), so every
contender sees the same tokens and the loss after the same steps can be compared.
"""
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 50304
GPT2_VOCAB = 50257  # random token ids are drawn below this, as bench/gpu_env.sh's random_tokens does
PEAK_FLOPS = 989e12  # H100/H200 dense bf16, the figure zerokit's MFU uses
PRESETS = {  # n_layer, n_head, n_embd
    "tiny": (2, 4, 64),
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 6e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
INIT_SCALE_POWER = 16  # first fp16 loss scale 2^16: GradScaler's, DeepSpeed's and zerokit's default
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_TEXT = ("nanoGPT-style GPT-2: nn.Linear with biases, scaled_dot_product_attention(is_causal=True), "
              "tanh GELU, tied head, no dropout, logits upcast to fp32 for the loss")


@dataclass
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 1024
    vocab_size: int = VOCAB


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        tr = self.transformer
        pos = torch.arange(idx.size(1), device=idx.device)
        x = tr.wte(idx) + tr.wpe(pos)
        for block in tr.h:
            x = block(x)
        logits = self.lm_head(tr.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    @torch.no_grad()
    def init_weights(self, seed):
        g = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        proj_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():  # the tied head is listed once, as wte
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, proj_std, generator=g)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif ".ln_" in name and name.endswith(".weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_model(preset, seq, device, seed):
    if preset not in PRESETS:
        raise ValueError(f"unknown model {preset!r}: expected one of {', '.join(PRESETS)}")
    n_layer, n_head, n_embd = PRESETS[preset]
    with torch.device(device):
        model = GPT(GPTConfig(n_layer, n_head, n_embd, block_size=seq))
    model.init_weights(seed)
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model):
    c = model.cfg
    return 6 * n_params(model) + 12 * c.n_layer * c.n_embd * c.block_size


def set_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def adamw(params, matrices, fused):
    """nanoGPT's AdamW: weight decay on matrices and embeddings, none on biases and gains.
    `matrices` holds the ids of the >= 2-D parameters, taken before any wrapping: FSDP keeps the
    parameter objects but swaps their data for flat 1-D shards."""
    params = list(params)
    groups = [{"params": [p for p in params if id(p) in matrices], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0}]
    # fused=None lets torch pick its default (foreach on CUDA).
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True if fused else None)


def optimizer_text(fused):
    kind = "fused" if fused else "foreach (torch's default)"
    return f"torch.optim.AdamW {kind}, lr {LR}, betas {BETAS}, eps {EPS}, weight decay {WEIGHT_DECAY} on >=2-D params"


def splitmix64(x):
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def window_start(seed, row, step, n_tokens, block):
    """Where `train` starts row `row` of step `step`'s global batch: TokenDataset::random_batch
    (seed, rank = row, index = step, one window), as lib/train.rs's train_batch calls it."""
    state = splitmix64(splitmix64(splitmix64(seed) ^ row) ^ step)
    r = splitmix64((state + 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
    return (r * (n_tokens - block)) >> 64


def token_file(data_dir):
    """DIR/train.bin memory-mapped, uint16 unless DIR/meta.json says uint32 (as `train` reads it)."""
    path = os.path.join(data_dir, "train.bin")
    dtype = np.uint16
    meta = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta):
        with open(meta) as f:
            name = json.load(f).get("dtype", "uint16")
        if name not in ("uint16", "uint32"):
            raise ValueError(f"{meta}: dtype {name!r}, expected uint16 or uint32")
        dtype = np.uint16 if name == "uint16" else np.uint32
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (--data expects a folder holding train.bin)")
    return np.memmap(path, dtype=dtype, mode="r")


def make_batches(count, batch, seq, seed, rank, device, data_dir=None):
    """The (x, y) of steps 0..count on this rank, already on the device so that the timed steps
    read no data. From train.bin: rows rank*batch.. of `train`'s global batch of each step (one
    micro-batch per step); without a file: torch.randint from a generator seeded by (seed, rank)."""
    out = []
    if data_dir:
        tokens = token_file(data_dir)
        if len(tokens) < seq + 1:
            raise ValueError(f"{data_dir}/train.bin: {len(tokens)} tokens, fewer than one window of {seq + 1}")
        for step in range(count):
            starts = [window_start(seed, rank * batch + r, step, len(tokens), seq) for r in range(batch)]
            w = torch.from_numpy(np.stack([tokens[s:s + seq + 1].astype(np.int64) for s in starts]))
            if int(w.max()) >= VOCAB:
                raise ValueError(f"{data_dir}/train.bin: token id {int(w.max())} is not below the vocab size {VOCAB}")
            out.append((w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)))
    else:
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        for _ in range(count):
            w = torch.randint(0, GPT2_VOCAB, (batch, seq + 1), generator=g)
            out.append((w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)))
    return out


def data_text(data_dir, seed):
    if data_dir:
        return f"{os.path.join(data_dir, 'train.bin')}: train's random windows (seed {seed})"
    return f"torch.randint over [0, {GPT2_VOCAB}) (seed {seed})"


class TorchPeer:
    """PyTorch's own mixed precision: fp32 weights, autocast to the compute dtype, GradScaler
    for fp16, clip, fused AdamW. `net` is the model, or DDP / FSDP / compiled wrappers of it."""

    def __init__(self, net, opt, dtype, device, clip, scaler_cls=None):
        self.net, self.opt, self.dtype, self.device = net, opt, dtype, device
        self.clip = clip
        fp16 = dtype == torch.float16
        self.scaler = (scaler_cls or torch.amp.GradScaler)(device.type, init_scale=2.0**INIT_SCALE_POWER, enabled=fp16)
        self._scale, self._skipped = (self.scaler.get_scale() if fp16 else None), 0

    def step(self, x, y):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.net(x, y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        self.clip(CLIP)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def skipped(self):
        # GradScaler lowers the scale exactly when it skips a step; read outside the timed step
        # (get_scale synchronizes).
        if self._scale is not None:
            s = self.scaler.get_scale()
            self._skipped += s < self._scale
            self._scale = s
        return self._skipped


class DeepSpeedPeer:
    def __init__(self, engine):
        self.engine = engine

    def step(self, x, y):
        loss = self.engine(x, y)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def skipped(self):
        return self.engine.skipped_steps


def deepspeed_config(batch, dtype):
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0, "initial_scale_power": INIT_SCALE_POWER},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
        "steps_per_print": 1 << 30,
    }


def make_peer(kind, model, dtype, device, batch, compile_mode="default", ds_fused_adamw=False):
    """The peer `kind` around `model` (built by build_model on `device`): (peer, settings), where
    settings states everything a reader needs to judge it. DDP, FSDP and DeepSpeed need the
    process group (or, for DeepSpeed, its environment variables) set up first."""
    cuda = device.type == "cuda"
    amp = dtype != torch.float32
    matrices = {id(p) for p in model.parameters() if p.dim() >= 2}
    settings = {"model": MODEL_TEXT, "tf32": torch.backends.cuda.matmul.allow_tf32, "clip": CLIP}
    if kind == "deepspeed":
        import deepspeed
        opt = adamw(model.parameters(), matrices, fused=ds_fused_adamw and cuda)
        cfg = deepspeed_config(batch, dtype)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        settings.update({
            "framework": f"DeepSpeed {deepspeed.__version__} ZeRO-2",
            "optimizer": optimizer_text(ds_fused_adamw and cuda) + " (passed in: nothing JIT-compiled)",
            "precision": {torch.float16: "fp16 weights, fp32 master weights, dynamic loss scale from 2^16",
                          torch.bfloat16: "bf16 weights, fp32 master weights",
                          torch.float32: "fp32"}[dtype],
            "zero_optimization": cfg["zero_optimization"],
            "autocast": None, "grad_scaler": "DeepSpeed's dynamic loss scaler" if dtype == torch.float16 else None,
            "compile": None,
        })
        return DeepSpeedPeer(engine), settings

    dname = str(dtype).removeprefix("torch.")
    scaler_cls = None
    clip = lambda c: torch.nn.utils.clip_grad_norm_(model.parameters(), c)
    if kind in ("eager", "compile"):
        net, wrapper = model, None
    elif kind in ("ddp", "ddp-compile"):
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True)
        wrapper = "DistributedDataParallel (25 MiB buckets, gradient_as_bucket_view)"
    elif kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        mp = MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype) if amp else None
        net = FSDP(model, sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, auto_wrap_policy=ModuleWrapPolicy({Block}),
                   mixed_precision=mp, device_id=device if cuda else None, use_orig_params=True)
        scaler_cls, clip = ShardedGradScaler, net.clip_grad_norm_
        wrapper = "FSDP SHARD_GRAD_OP, one unit per block, use_orig_params" + (f", MixedPrecision {dname}" if amp else "")
    else:
        raise ValueError(f"unknown peer {kind!r}")
    # After wrapping, as FSDP requires; it keeps the parameter objects (use_orig_params). Fused
    # AdamW runs on CPU too, so the smoke tests take the same path.
    opt = adamw(net.parameters(), matrices, fused=True)
    if kind.endswith("compile"):
        net = torch.compile(net, mode=None if compile_mode == "default" else compile_mode)
    settings.update({
        "framework": f"PyTorch {torch.__version__}" + (f", {wrapper}" if wrapper else ""),
        "optimizer": optimizer_text(True),
        "precision": "fp32 weights and optimizer state" + (f", autocast {dname}" if amp else ""),
        "autocast": dname if amp else None,
        "grad_scaler": (f"{(scaler_cls or torch.amp.GradScaler).__name__} from 2^{INIT_SCALE_POWER}"
                        if dtype == torch.float16 else None),
        "compile": f"torch.compile(mode={compile_mode})" if kind.endswith("compile") else None,
    })
    return TorchPeer(net, opt, dtype, device, clip, scaler_cls), settings


def measure(peer, batches, warmup, device):
    """Runs every batch through peer.step; the first `warmup` steps are not timed. Returns the
    step times in seconds (timed steps only), the losses of all steps and the skipped steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        sync()
        t = time.perf_counter()
        loss = peer.step(x, y)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.float())
        skipped = peer.skipped()
    return times, torch.stack(losses), skipped


def result(kind, args, model, world, step_s, losses, skipped, peak_alloc, peak_reserved, settings, device):
    tok_s = world * args.batch * args.seq / step_s
    return {
        "peer": kind, "model": args.model, "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "gpus": world,
        "params": n_params(model), "warmup": args.warmup, "steps": args.steps, "step_ms": step_s * 1e3,
        "tokens_per_s": tok_s, "mfu": tok_s / world * flops_per_token(model) / PEAK_FLOPS if device.type == "cuda" else None,
        "peak_allocated_gib": peak_alloc, "peak_reserved_gib": peak_reserved,
        "loss": losses[-1], "losses": losses, "skipped_steps": int(skipped),
        "data": data_text(args.data, args.seed), "settings": settings,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def add_common_args(ap, default_model):
    ap.add_argument("--model", default=default_model, choices=list(PRESETS))
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per GPU")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed steps after the warm-up")
    ap.add_argument("--data", help="folder with train.bin (bench/gpu_env.sh random_tokens): train's batches")
    ap.add_argument("--seed", type=int, default=1337, help="init and data seed (train's default seed is 1337)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke tests only")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled peers")
    ap.add_argument("--ds-fused-adamw", action="store_true",
                    help="DeepSpeed with fused torch AdamW (default: torch's default AdamW, as ../shared/GPU.md ran it)")


def error_line(kind, args, e):
    import traceback
    traceback.print_exc()
    msg = f"{type(e).__name__}: {e}".strip()
    return {"peer": kind, "model": args.model, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
            "error": msg.splitlines()[0][:400] if msg else type(e).__name__}

