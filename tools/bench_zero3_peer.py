#!/usr/bin/env python3
"""DeepSpeed's ZeRO-3 with CPU offload on a Llama, the peer of `train`'s stage 3 + offload_optimizer
(issue 16), on the same config.json, micro-batch, sequence and tokens:

    python3 tools/bench_zero3_peer.py --config CONFIG.json --batch 4 --seq 2048 --data DIR [--offload-param]

What a DeepSpeed user of transformers writes: LlamaForCausalLM (SDPA attention, use_cache off)
built under deepspeed.zero.Init, so parameters are partitioned in bf16 as they are created and no
whole fp32 copy is ever made on the host; gradient checkpointing of every decoder layer
(transformers' gradient_checkpointing_enable, non-reentrant); bf16; ZeRO stage 3 with
offload_optimizer {device: cpu, pin_memory: true} and DeepSpeed's defaults for the stage-3 buckets
(stage3_prefetch_bucket_size 5e7, stage3_param_persistence_threshold 1e5: zerokit's defaults
too); the optimizer named in the config ("AdamW", nanoGPT's hyper-parameters), which DeepSpeed
turns into DeepSpeedCPUAdam when the optimizer is offloaded (its cpu_adam op is JIT-compiled on
first use: build it before timing, see bench/gpu_offload.sh); clip 1.0. The loss is cross-entropy
of fp32 logits against `train`'s shifted targets (tools/bench_llama_peer.py).

One process, world size 1: the rendezvous variables get defaults here. Prints one JSON line (the
last line of stdout), or a line with "error". `--device cpu` (with DS_ACCELERATOR=cpu) and a tiny
config is a smoke test.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpt2_peer as bp  # noqa: E402
import bench_llama_peer as bl  # noqa: E402
import peer_gpt2 as pg  # noqa: E402


def init_weights(model, std):
    """transformers' Llama initialisation (normal(0, initializer_range) for matrices and the
    embedding, ones for the RMSNorm gains), applied one gathered parameter at a time: under
    zero.Init, transformers' own post_init sees only empty partitions."""
    import deepspeed
    for p in model.parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.fill_(1.0)


def ds_config(a):
    offload = {"device": "cpu", "pin_memory": a.pin_memory}
    zero = {"stage": 3, "offload_optimizer": offload, "overlap_comm": True, "contiguous_gradients": True,
            "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000}
    if a.offload_param:
        zero["offload_param"] = dict(offload)
    return {
        "train_micro_batch_size_per_gpu": a.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": pg.CLIP,
        "bf16": {"enabled": a.dtype == "bf16"},
        "fp16": {"enabled": a.dtype == "fp16", "loss_scale": 0, "initial_scale_power": pg.INIT_SCALE_POWER},
        "optimizer": {"type": "AdamW", "params": {"lr": pg.LR, "betas": list(pg.BETAS), "eps": pg.EPS,
                                                  "weight_decay": pg.WEIGHT_DECAY}},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def run(a):
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(bp.free_port()))
    import deepspeed
    from transformers import LlamaForCausalLM
    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pg.set_tf32()
    deepspeed.init_distributed()
    cfg = bl.load_config(a.config)
    conf = ds_config(a)
    dtype = pg.DTYPES[a.dtype]
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    with deepspeed.zero.Init(config_dict_or_path=conf, dtype=dtype):
        model = LlamaForCausalLM(cfg)
    init_weights(model, cfg.initializer_range)
    if a.checkpointing:
        # transformers 5.2x renamed it; the older name still works there, with a warning.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    net = bl.CausalLMLoss(model)
    # nanoGPT's groups, as zerokit and the PyTorch peers use: no weight decay on norms.
    params = list(net.parameters())
    groups = [{"params": [p for p in params if len(p.ds_shape) >= 2],
               "weight_decay": pg.WEIGHT_DECAY},
              {"params": [p for p in params if len(p.ds_shape) < 2], "weight_decay": 0.0}]
    engine, opt, _, _ = deepspeed.initialize(model=net, model_parameters=groups, config=conf)
    setup_s = time.perf_counter() - t0
    peer = pg.DeepSpeedPeer(engine)
    batches = pg.make_batches(a.warmup + a.steps, a.batch, a.seq, a.seed, 0, device, a.data)
    times, losses, skipped = pg.measure(peer, batches, a.warmup, device)
    cuda = device.type == "cuda"
    step_s = statistics.median(times)
    tok_s = a.batch * a.seq / step_s
    out = {
        "peer": "deepspeed-zero3", "model": a.name, "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "gpus": 1,
        "params": n, "layers": cfg.num_hidden_layers, "warmup": a.warmup, "steps": a.steps, "step_ms": step_s * 1e3,
        "step_ms_all": [t * 1e3 for t in times], "tokens_per_s": tok_s,
        "mfu": tok_s * bl.flops_per_token(cfg, n, a.seq) / pg.PEAK_FLOPS if cuda else None,
        "tflops_per_gpu": tok_s * bl.flops_per_token(cfg, n, a.seq) / 1e12,
        "setup_s": setup_s,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "loss": losses[-1].item(), "losses": losses.tolist(), "skipped_steps": int(skipped),
        "data": pg.data_text(a.data, a.seed),
        "settings": {
            "framework": f"DeepSpeed {deepspeed.__version__} ZeRO-3, PyTorch {torch.__version__}",
            "model": f"transformers LlamaForCausalLM ({a.config}) under deepspeed.zero.Init, attn_implementation="
                     f"{model.config._attn_implementation}, use_cache off",
            "optimizer": f"{type(getattr(opt, 'optimizer', opt)).__name__} (config optimizer AdamW, lr {pg.LR}, betas {pg.BETAS}, eps {pg.EPS}, "
                         f"weight decay {pg.WEIGHT_DECAY} on >=2-D params)",
            "activation_checkpointing": "transformers gradient_checkpointing_enable(use_reentrant=False)"
                                        if a.checkpointing else None,
            "zero_optimization": conf["zero_optimization"], "precision": a.dtype, "clip": pg.CLIP,
        },
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
    engine.destroy()
    import deepspeed.comm as dist
    dist.destroy_process_group()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_args(ap)
    ap.set_defaults(batch=4, warmup=2, steps=4)
    ap.add_argument("--offload-param", action="store_true", help="offload_param to the CPU as well")
    ap.add_argument("--no-pin-memory", dest="pin_memory", action="store_false")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                    help="without activation checkpointing (default: every decoder layer)")
    a = ap.parse_args()
    if not a.config:
        ap.error("--config is required")
    if a.steps < 1 or a.warmup < 0 or a.batch < 1:
        ap.error("--steps and --batch must be positive, --warmup not negative")
    try:
        line, rc = run(a), 0
    except Exception as e:
        line, rc = pg.error_line("deepspeed-zero3", argparse.Namespace(model=a.name, **{
            k: getattr(a, k) for k in ("dtype", "batch", "seq")}), e), 1
    print(json.dumps(line), flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
