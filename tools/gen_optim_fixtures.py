"""Reference fixtures for lib/optim.rs (tests/optim.rs), from PyTorch and DeepSpeed.

    DS_ACCELERATOR=cpu .deps/py/bin/python tools/gen_optim_fixtures.py

Writes tests/fixtures/optim/:
  adamw_<case>.safetensors  torch.optim.AdamW (foreach=False, fused=False: the single-tensor
                            path, and fused=True: the CPU fused kernel) on a few small
                            parameters of mixed dims, nanoGPT's decay grouping, several steps
                            at learning rates from a schedule. Metadata: shapes, lrs, config.
  clip.safetensors          torch.nn.utils.clip_grad_norm_ on the same kind of parameters.
  schedules.json            learning rate per step of nanoGPT's get_lr and of DeepSpeed's
                            WarmupLR / WarmupDecayLR / WarmupCosineLR (floats as IEEE-754 bits).
"""
import json
import math
import os
import struct

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "optim")
SHAPES = [(7, 5), (13,), (4, 9), (300,), (20, 33), (17, 8), (1,), (3, 4, 2)]


def bits(x):
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


def nanogpt_get_lr(it, warmup_iters, lr_decay_iters, learning_rate, min_lr):
    # nanoGPT train.py, verbatim logic.
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def nanogpt_linear_lr(it, warmup_iters, lr_decay_iters, learning_rate, min_lr):
    # zerokit's linear variant: nanoGPT's warm-up, then a straight line to min_lr.
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + (1.0 - decay_ratio) * (learning_rate - min_lr)


def adamw_case(name, seed, steps, lrs, betas, eps, weight_decay):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    grads = []
    for k in range(steps):
        step_grads = []
        for i, s in enumerate(SHAPES):
            x = torch.randn(s, generator=g) * (10.0 ** (i % 3 - 2))
            if k == 1 and i == 3:
                x[::7] = 0.0  # exercises the eps-dominated denominator
            step_grads.append(x)
        grads.append(step_grads)
    tensors = {f"init.{i}": t.contiguous() for i, t in enumerate(init)}
    for k in range(steps):
        for i, t in enumerate(grads[k]):
            tensors[f"grad.{k}.{i}"] = t.contiguous()
    for impl, kwargs in (("single", dict(foreach=False, fused=False)), ("fused", dict(fused=True))):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lrs[0], betas=betas, eps=eps, **kwargs)
        for k in range(steps):
            for p, gr in zip(params, grads[k]):
                p.grad = gr.clone()
            for group in opt.param_groups:
                group["lr"] = lrs[k]
            opt.step()
            if impl == "single" or k == steps - 1:
                for i, p in enumerate(params):
                    tensors[f"{impl}.param.{k}.{i}"] = p.detach().clone().contiguous()
        for i, p in enumerate(params):
            st = opt.state[p]
            tensors[f"{impl}.exp_avg.{i}"] = st["exp_avg"].clone().contiguous()
            tensors[f"{impl}.exp_avg_sq.{i}"] = st["exp_avg_sq"].clone().contiguous()
    meta = {
        "shapes": json.dumps([list(s) for s in SHAPES]),
        "steps": str(steps),
        "lrs": json.dumps([bits(x) for x in lrs]),
        "betas": json.dumps([bits(betas[0]), bits(betas[1])]),
        "eps": str(bits(eps)),
        "weight_decay": str(bits(weight_decay)),
        "torch": torch.__version__,
        # For the record: torch's CPU AdamW rounds an ulp differently from one host to another
        # (even at the same capability), so tests/optim.rs checks 1e-6 and reports bit equality.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    save_file(tensors, os.path.join(OUT, f"adamw_{name}.safetensors"), metadata=meta)


def clip_fixture():
    g = torch.Generator().manual_seed(7)
    tensors = {}
    cases = []
    for c, (scale, max_norm) in enumerate([(1.0, 1.0), (1e-3, 1.0), (30.0, 0.5), (1.0, 1e6)]):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        for i, p in enumerate(params):
            p.grad = torch.randn(SHAPES[i], generator=g) * scale
            tensors[f"case.{c}.grad.{i}"] = p.grad.clone().contiguous()
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        for i, p in enumerate(params):
            tensors[f"case.{c}.clipped.{i}"] = p.grad.clone().contiguous()
        cases.append({"max_norm": bits(max_norm), "total_norm": bits(total.item())})
    save_file(tensors, os.path.join(OUT, "clip.safetensors"),
              metadata={"shapes": json.dumps([list(s) for s in SHAPES]), "cases": json.dumps(cases),
                        "torch": torch.__version__})


def deepspeed_lrs(make, steps):
    """The lr each optimizer step runs at: the constructor sets the first, DeepSpeed's engine
    calls scheduler.step() after every applied step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    sched = make(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    return lrs


def schedules_fixture():
    from deepspeed.runtime import lr_schedules as ds

    out = []
    for (w, d, lr, mn) in [(10, 100, 6e-4, 6e-5), (0, 50, 1e-3, 0.0), (2000, 600000, 6e-4, 6e-5), (5, 5, 1e-3, 1e-4)]:
        n = min(d + 20, 3000) if d < 1000 else 0
        its = list(range(n)) if n else [0, 1, 1999, 2000, 2001, 300000, 599999, 600000, 600001, 700000]
        if w == d:  # nanoGPT itself divides by zero at it == warmup_iters == lr_decay_iters
            its = [i for i in its if i != w]
        params = {"warmup_iters": w, "lr_decay_iters": d, "max_lr": bits(lr), "min_lr": bits(mn)}
        out.append({"type": "NanoGpt", "decay": "cosine", **params, "its": its,
                    "lrs": [bits(nanogpt_get_lr(i, w, d, lr, mn)) for i in its]})
        out.append({"type": "NanoGpt", "decay": "linear", **params, "its": its,
                    "lrs": [bits(nanogpt_linear_lr(i, w, d, lr, mn)) for i in its]})
        out.append({"type": "NanoGpt", "decay": "constant", **params, "its": its,
                    "lrs": [bits(lr) for _ in its]})
    steps = 160
    for wt in ("log", "linear"):
        for (mn, mx, wn) in [(0.0, 1e-3, 50), (1e-5, 3e-4, 1), (2e-4, 1e-3, 7)]:
            lrs = deepspeed_lrs(lambda o: ds.WarmupLR(o, warmup_min_lr=mn, warmup_max_lr=mx,
                                                       warmup_num_steps=wn, warmup_type=wt), steps)
            out.append({"type": "WarmupLR", "warmup_min_lr": bits(mn), "warmup_max_lr": bits(mx),
                        "warmup_num_steps": wn, "warmup_type": wt, "lrs": [bits(x) for x in lrs]})
        for (total, mn, mx, wn) in [(120, 0.0, 1e-3, 30), (100, 1e-5, 6e-4, 1), (20, 0.0, 1e-3, 40)]:
            lrs = deepspeed_lrs(lambda o: ds.WarmupDecayLR(o, total_num_steps=total, warmup_min_lr=mn,
                                                            warmup_max_lr=mx, warmup_num_steps=wn,
                                                            warmup_type=wt), steps)
            out.append({"type": "WarmupDecayLR", "total_num_steps": total, "warmup_min_lr": bits(mn),
                        "warmup_max_lr": bits(mx), "warmup_num_steps": wn, "warmup_type": wt,
                        "lrs": [bits(x) for x in lrs]})
        for (total, wmr, wn, cmr) in [(120, 0.0, 30, 1e-4), (100, 0.1, 1, 0.1), (20, 0.05, 40, 0.0)]:
            lrs = deepspeed_lrs(lambda o: ds.WarmupCosineLR(o, total_num_steps=total, warmup_min_ratio=wmr,
                                                             warmup_num_steps=wn, cos_min_ratio=cmr,
                                                             warmup_type=wt), steps)
            out.append({"type": "WarmupCosineLR", "lr": bits(0.02), "total_num_steps": total,
                        "warmup_min_ratio": bits(wmr), "warmup_num_steps": wn, "cos_min_ratio": bits(cmr),
                        "warmup_type": wt, "lrs": [bits(x) for x in lrs]})
    import deepspeed
    with open(os.path.join(OUT, "schedules.json"), "w") as f:
        json.dump({"deepspeed": deepspeed.__version__, "schedules": out}, f, separators=(",", ":"))
        f.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    lrs_a = [nanogpt_get_lr(i, 3, 10, 1e-2, 1e-3) for i in range(12)]
    adamw_case("nanogpt", seed=0, steps=12, lrs=lrs_a, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    lrs_b = [3e-3 * (0.7 ** i) for i in range(6)]
    adamw_case("betas", seed=1, steps=6, lrs=lrs_b, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.01)
    clip_fixture()
    schedules_fixture()


if __name__ == "__main__":
    main()
