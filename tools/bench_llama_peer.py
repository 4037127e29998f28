#!/usr/bin/env python3
"""One-GPU PyTorch peers of `train` on a Llama (issue 15): transformers' LlamaForCausalLM with SDPA
attention on the same shape, batch, sequence and tokens as zerokit.

    python3 tools/bench_llama_peer.py --write-config CONFIG.json --estimate EST.json
    python3 tools/bench_llama_peer.py --mode eager|compile --config CONFIG.json --batch 8 --seq 2048 --data DIR

--write-config turns zerokit's own shape of a preset (`ckpt estimate --json`'s setup.model, which
uses transformers' LlamaConfig names) into a transformers config.json, so zerokit (`model =
CONFIG.json`), `ckpt estimate` and these peers all read one file: the shapes cannot drift apart.

The peers: fp32 weights, autocast bf16 (PyTorch's standard mixed precision, as the GPT-2 peers of
tools/peer_gpt2.py run: zerokit keeps bf16 weights with an fp32 master copy instead, the same bytes
per parameter in optimizer state), TF32 on, fused torch.optim.AdamW with nanoGPT's groups and
hyper-parameters, clip 1.0, the loss from logits upcast to fp32 (transformers' own loss does the
same), use_cache off. compile wraps model and loss in torch.compile. Batches are `train`'s windows
of the same train.bin. Prints one JSON line (the last line of stdout), or a line with "error".
`--device cpu` with a tiny config is a smoke test.
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_gpt2 as pg  # noqa: E402

# Keys of zerokit's LlamaConfig that are not transformers' (zerokit adds its family's name).
ZEROKIT_ONLY = ("family",)


def hf_config_from_estimate(estimate_json):
    """A transformers config.json (dict) from `ckpt estimate --json`'s setup.model."""
    with open(estimate_json) as f:
        m = dict(json.load(f)["setup"]["model"])
    if m.get("family") != "llama":
        raise ValueError(f"{estimate_json}: setup.model.family is {m.get('family')!r}, expected 'llama'")
    for k in ZEROKIT_ONLY:
        m.pop(k, None)
    if m.get("rope_scaling"):
        m["rope_scaling"] = dict(m["rope_scaling"], rope_type="llama3")
    m.update({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
              "attention_dropout": 0.0, "use_cache": False, "torch_dtype": "bfloat16"})
    return m


def load_config(path, attn="sdpa"):
    from transformers import LlamaConfig
    cfg = LlamaConfig.from_json_file(path)
    cfg.use_cache = False  # no KV cache while training
    cfg._attn_implementation = attn
    return cfg


def n_params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(cfg, n, seq):
    """zerokit's MFU numerator (lib/model/family.rs): 6N + 12·L·(heads·head_dim)·T."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq


class CausalLMLoss(nn.Module):
    """Model and loss in one module (so torch.compile sees the loss): `train`'s (x, y) pairs are
    already shifted, so the loss is plain cross-entropy of fp32 logits against y."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def build_llama(cfg, device, seed, dtype=torch.float32):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.train()
    return model


def run(a):
    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pg.set_tf32()
    cfg = load_config(a.config)
    model = build_llama(cfg, device, a.seed)
    matrices = {id(p) for p in model.parameters() if p.dim() >= 2}
    net = CausalLMLoss(model)
    opt = pg.adamw(model.parameters(), matrices, fused=True)
    if a.mode == "compile":
        net = torch.compile(net, mode=None if a.compile_mode == "default" else a.compile_mode)
    dtype = pg.DTYPES[a.dtype]
    clip = lambda c: torch.nn.utils.clip_grad_norm_(model.parameters(), c)  # noqa: E731
    peer = pg.TorchPeer(net, opt, dtype, device, clip)
    batches = pg.make_batches(a.warmup + a.steps, a.batch, a.seq, a.seed, 0, device, a.data)
    times, losses, skipped = pg.measure(peer, batches, a.warmup, device)
    cuda = device.type == "cuda"
    step_s = statistics.median(times)
    tok_s = a.batch * a.seq / step_s
    n = n_params(model)
    import transformers
    return {
        "peer": f"pytorch-{a.mode}", "model": a.name, "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "gpus": 1,
        "params": n, "warmup": a.warmup, "steps": a.steps, "step_ms": step_s * 1e3, "tokens_per_s": tok_s,
        "mfu": tok_s * flops_per_token(cfg, n, a.seq) / pg.PEAK_FLOPS if cuda else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "loss": losses[-1].item(), "losses": losses.tolist(), "skipped_steps": int(skipped),
        "data": pg.data_text(a.data, a.seed),
        "settings": {
            "framework": f"PyTorch {torch.__version__}, transformers {transformers.__version__}",
            "model": f"transformers LlamaForCausalLM ({a.config}), attn_implementation="
                     f"{model.config._attn_implementation}, use_cache off, "
                     "loss: cross-entropy of fp32 logits",
            "precision": f"fp32 weights and optimizer state, autocast {a.dtype}",
            "optimizer": pg.optimizer_text(True), "clip": pg.CLIP,
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "compile": f"torch.compile(mode={a.compile_mode})" if a.mode == "compile" else None,
        },
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
    }


def add_args(ap):
    ap.add_argument("--config", help="transformers config.json of the model (from --write-config)")
    ap.add_argument("--name", default="llama", help="the model's name in the output (e.g. llama-3.2-1b)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed steps after the warm-up")
    ap.add_argument("--data", help="folder with train.bin (bench/gpu_env.sh random_tokens): train's batches")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke tests only")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--write-config", metavar="OUT", help="write a config.json from --estimate and exit")
    ap.add_argument("--estimate", help="`ckpt estimate --json` output whose setup.model is the shape")
    add_args(ap)
    a = ap.parse_args()
    if a.write_config:
        if not a.estimate:
            ap.error("--write-config needs --estimate")
        cfg = hf_config_from_estimate(a.estimate)
        tmp = a.write_config + ".tmp"
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, a.write_config)
        return
    if not a.config:
        ap.error("--config is required")
    if a.steps < 1 or a.warmup < 0 or a.batch < 1:
        ap.error("--steps and --batch must be positive, --warmup not negative")
    try:
        line, rc = run(a), 0
    except Exception as e:
        line, rc = pg.error_line(f"pytorch-{a.mode}", argparse.Namespace(model=a.name, **{
            k: getattr(a, k) for k in ("dtype", "batch", "seq")}), e), 1
    print(json.dumps(line), flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
