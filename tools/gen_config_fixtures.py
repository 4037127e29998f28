"""Reference fixtures for lib/config.rs (tests/config.rs), from DeepSpeed's own configuration,
optimizer and scheduler code, and nanoGPT's get_lr.

    DS_ACCELERATOR=cpu .deps/py/bin/python tools/gen_config_fixtures.py

Writes tests/fixtures/config/:
  batch.json      DeepSpeed JSON batch keys (every subset of train_batch_size,
                  train_micro_batch_size_per_gpu, gradient_accumulation_steps; consistent,
                  inconsistent, non-divisible, zero, negative, fractional) x world sizes 1, 2, 3,
                  4, 8: the triple deepspeed.runtime.config.DeepSpeedConfig resolves, or the
                  exception it raises.
  mapping.json    full DeepSpeed configs: what DeepSpeedConfig parses (fp16 and bf16 blocks,
                  gradient clipping, ZeRO stage) and the hyper-parameters of the optimizer that
                  DeepSpeed's engine builds from the "optimizer" block (its defaults included);
                  configs DeepSpeed refuses, with its message.
  schedules.json  the learning rate of every optimizer step under WarmupLR (log, linear),
                  WarmupDecayLR and WarmupCosineLR, built from a config's "scheduler" block by
                  DeepSpeed's engine code on the optimizer it builds; nanoGPT's get_lr for TOML
                  configs. Floats as IEEE-754 bits.

How DeepSpeed's code is run without a cluster: DeepSpeedConfig asks deepspeed.comm for the rank
and the world size; that module attribute is replaced by one that answers (0, world), so the
whole constructor (parsing, batch resolution, sanity checks) runs unchanged for any world size.
The engine methods that build the optimizer and the scheduler are called on a stand-in engine
that answers the config queries from that DeepSpeedConfig; FusedAdam's CUDA kernel loader is
stubbed (the constructor's argument handling and defaults run; no step is taken).
"""
import json
import os
import struct
import types

import torch

import deepspeed
from deepspeed.runtime import config as ds_config
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine

# nanoGPT train.py's get_lr, as the optimizer fixtures write it out.
from gen_optim_fixtures import nanogpt_get_lr
from deepspeed.ops.adam import fused_adam

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "config")
WORLDS = [1, 2, 3, 4, 8]


def bits(x):
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


def ds_parse(cfg, world):
    ds_config.dist = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda *a, **k: world)
    return DeepSpeedConfig(cfg)


# FusedAdam loads its CUDA kernel at construction; the kernel is only used by step().
fused_adam.FusedAdamBuilder = lambda: types.SimpleNamespace(
    load=lambda: types.SimpleNamespace(multi_tensor_adam=None))


def stand_in_engine(c):
    """Just enough of DeepSpeedEngine for _configure_basic_optimizer and _scheduler_from_config."""
    e = types.SimpleNamespace(
        optimizer_name=lambda: c.optimizer_name,
        optimizer_params=lambda: c.optimizer_params,
        scheduler_name=lambda: c.scheduler_name,
        scheduler_params=lambda: c.scheduler_params or {},
        zero_use_cpu_optimizer=lambda: False,
        zenflow=False,
    )
    e.get_optimizer_configuration = lambda *a, **k: DeepSpeedEngine.get_optimizer_configuration(e, *a, **k)
    return e


def ds_optimizer(c, client_lr):
    """The optimizer DeepSpeed's engine trains with: built from the "optimizer" block, or the
    client's (here torch.optim.AdamW at client_lr, as nanoGPT passes its own)."""
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    if c.optimizer_name is None:
        return torch.optim.AdamW(params, lr=client_lr)
    return DeepSpeedEngine._configure_basic_optimizer(stand_in_engine(c), params)


def batch_fixture():
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    triples = [
        # (train_batch_size, micro, accumulation); None: not given
        (None, None, None), (None, None, 2),
        (8, None, None), (24, None, None), (12, None, None), (7, None, None), (1, None, None),
        (None, 4, None), (None, 1, None),
        (32, 4, None), (24, 2, None), (10, 3, None), (8, 16, None), (48, 3, None),
        (32, None, 2), (24, None, 3), (12, None, 4), (8, None, 3), (64, None, 8),
        (None, 4, 2), (None, 1, 8), (None, 3, 5),
        (32, 4, 2), (24, 4, 2), (16, 2, 4), (48, 3, 2), (64, 4, 2), (12, 2, 3),
        # Values DeepSpeed rejects (or, for 8.0, accepts as 8).
        (0, None, None), (None, 0, None), (8, None, 0), (-8, None, None), (8.5, None, None),
        (8.0, None, None), (16, 2.5, None),
    ]
    cases = []
    for t in triples:
        cfg = {k: v for k, v in zip(keys, t) if v is not None}
        for w in WORLDS:
            case = {"config": cfg, "world": w}
            try:
                c = ds_parse(cfg, w)
                got = (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps)
                assert all(float(x) == int(x) for x in got), got
                case["resolved"] = [int(x) for x in got]
            except (AssertionError, ZeroDivisionError, ValueError, TypeError) as e:
                case["error"] = f"{type(e).__name__}: {e}"
            cases.append(case)
    return cases


FULL = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_clipping": 0.5,
    "steps_per_print": 25,
    "wall_clock_breakdown": False,
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_scatter": True, "allgather_partitions": True,
                          "reduce_bucket_size": 50000000, "allgather_bucket_size": 50000000},
    "fp16": {"enabled": True, "auto_cast": False, "loss_scale": 0, "initial_scale_power": 12,
             "loss_scale_window": 500, "hysteresis": 3, "consecutive_hysteresis": True,
             "min_loss_scale": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.85, 0.98], "eps": 1e-6,
                                              "weight_decay": 0.05}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 1000, "warmup_min_lr": 0,
                                                      "warmup_max_lr": 3e-4, "warmup_num_steps": 50,
                                                      "warmup_type": "linear"}},
}

MAPPING = [
    ("full_fp16_stage2", FULL, 4),
    ("bf16_static_stage1", {
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                 "weight_decay": 0.1}},
    }, 2),
    ("fp16_static_scale", {
        "train_batch_size": 32, "gradient_accumulation_steps": 4,
        "fp16": {"enabled": True, "loss_scale": 1024.0},
    }, 8),
    # The optimizer's own defaults where the block leaves parameters out.
    ("fused_adamw_defaults", {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {}}}, 1),
    ("fused_adam_lr_only", {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": 2e-4}}}, 1),
    ("torch_adamw_defaults", {"train_batch_size": 8,
                              "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}, 1),
    ("adamw_mode_false_is_still_adamw", {"train_batch_size": 8,
                                         "optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}}, 1),
    # No fp16/bf16 block: fp32. No gradient_clipping: none. No zero_optimization: stage 0.
    ("bare", {"train_micro_batch_size_per_gpu": 2}, 3),
    ("fp16_disabled", {"train_batch_size": 8, "fp16": {"enabled": False, "loss_scale": 0}}, 1),
]

REFUSED = [
    ("fp16_and_bf16", {"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}}),
]


def mapping_fixture():
    out = []
    for name, cfg, world in MAPPING:
        c = ds_parse(cfg, world)
        f = c.float16_config
        rec = {
            "name": name, "config": cfg, "world": world,
            "batch": [c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps],
            "zero_stage": int(c.zero_optimization_stage),
            "gradient_clipping": float(c.gradient_clipping),
            "steps_per_print": c.steps_per_print,
            "fp16": {"enabled": f.enabled, "loss_scale": float(f.loss_scale),
                     "initial_scale_power": f.initial_scale_power, "loss_scale_window": f.loss_scale_window,
                     "hysteresis": f.hysteresis, "consecutive_hysteresis": f.consecutive_hysteresis,
                     "min_loss_scale": float(f.min_loss_scale)},
            "bf16": c.bfloat16_config.enabled,
        }
        if c.optimizer_name is not None:
            opt = ds_optimizer(c, None)
            g = opt.param_groups[0]
            decoupled = isinstance(opt, torch.optim.AdamW) or bool(getattr(opt, "adam_w_mode", 0))
            rec["optimizer"] = {"class": type(opt).__name__, "adamw": decoupled, "lr": float(g["lr"]),
                                "betas": [float(b) for b in g["betas"]], "eps": float(g["eps"]),
                                "weight_decay": float(g["weight_decay"])}
        out.append(rec)
    refused = []
    for name, cfg in REFUSED:
        try:
            ds_parse(cfg, 1)
        except (AssertionError, ValueError) as e:
            refused.append({"name": name, "config": cfg, "error": f"{type(e).__name__}: {e}"})
        else:
            raise SystemExit(f"DeepSpeed accepted {name}")
    return out, refused


def ds_schedule_case(name, sched, steps, optimizer=None, client_lr=None):
    cfg = {"train_batch_size": 8, "scheduler": sched}
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    c = ds_parse(cfg, 1)
    opt = ds_optimizer(c, client_lr)
    s = DeepSpeedEngine._scheduler_from_config(stand_in_engine(c), opt)
    # DeepSpeed's step numbering: the constructor sets the rate of the first optimizer step
    # (last_batch_iteration = -1); the engine calls scheduler.step() after every applied step,
    # so optimizer step k (0-based) runs at the rate set by the k-th scheduler.step().
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps - 1):
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    case = {"name": name, "config": cfg, "lrs": [bits(x) for x in lrs]}
    if client_lr is not None:
        case["client_lr"] = bits(client_lr)
    return case


def schedules_fixture():
    adamw = lambda lr: {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "weight_decay": 0.1}}
    ds = []
    for wt in ("log", "linear"):
        ds.append(ds_schedule_case(f"warmup_{wt}", {"type": "WarmupLR", "params": {
            "warmup_min_lr": 1e-5, "warmup_max_lr": 6e-4, "warmup_num_steps": 40, "warmup_type": wt}}, 80,
            adamw(6e-4)))
        ds.append(ds_schedule_case(f"warmup_{wt}_one_step", {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 1, "warmup_type": wt}}, 10,
            adamw(1e-3)))
        ds.append(ds_schedule_case(f"warmup_decay_{wt}", {"type": "WarmupDecayLR", "params": {
            "total_num_steps": 120, "warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 30,
            "warmup_type": wt}}, 140, adamw(1e-3)))
        ds.append(ds_schedule_case(f"warmup_decay_{wt}_short", {"type": "WarmupDecayLR", "params": {
            "total_num_steps": 20, "warmup_min_lr": 2e-5, "warmup_max_lr": 5e-4, "warmup_num_steps": 40,
            "warmup_type": wt}}, 60, adamw(5e-4)))
        ds.append(ds_schedule_case(f"warmup_cosine_{wt}", {"type": "WarmupCosineLR", "params": {
            "total_num_steps": 150, "warmup_min_ratio": 0.05, "warmup_num_steps": 25, "cos_min_ratio": 0.1,
            "warmup_type": wt}}, 170, adamw(6e-4)))
        ds.append(ds_schedule_case(f"warmup_cosine_{wt}_short", {"type": "WarmupCosineLR", "params": {
            "total_num_steps": 10, "warmup_min_ratio": 0.0, "warmup_num_steps": 15, "cos_min_ratio": 0.0,
            "warmup_type": wt}}, 30, adamw(2e-3)))
    # DeepSpeed's defaults for the parameters a "scheduler" block leaves out; WarmupLR's peak and
    # WarmupCosineLR's base are the optimizer's rate (the block's, its default, or the client's).
    ds.append(ds_schedule_case("warmup_defaults_optimizer_lr", {"type": "WarmupLR", "params": {}}, 1100,
                               adamw(4e-4)))
    ds.append(ds_schedule_case("warmup_defaults_client_lr", {"type": "WarmupLR", "params": {
        "warmup_num_steps": 10}}, 20, None, client_lr=7e-4))
    ds.append(ds_schedule_case("warmup_defaults_fused_adam_lr", {"type": "WarmupLR"}, 30,
                               {"type": "AdamW", "params": {}}))
    ds.append(ds_schedule_case("warmup_decay_defaults", {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 1500}}, 1600, adamw(3e-4)))
    ds.append(ds_schedule_case("warmup_cosine_defaults", {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 1300}}, 1400, adamw(6e-4)))
    ds.append(ds_schedule_case("warmup_cosine_client_lr", {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 40, "warmup_num_steps": 8, "warmup_type": "linear"}}, 50, None, client_lr=1.5e-3))

    nano = []
    for (w, d, lr, mn, n) in [(30, 300, 2e-3, 2e-4, 320), (100, 2000, 6e-4, 6e-5, 2100), (0, 50, 1e-3, 0.0, 60),
                              (10, 10, 1e-3, 1e-4, 30)]:
        toml = (f"learning_rate = {lr!r}\nmin_lr = {mn!r}\nwarmup_iters = {w}\nlr_decay_iters = {d}\n"
                f"decay_lr = true\n")
        its = [i for i in range(n) if not (w == d and i == w)]  # nanoGPT divides by zero there
        nano.append({"toml": toml, "its": its, "lrs": [bits(nanogpt_get_lr(i, w, d, lr, mn)) for i in its]})
    nano.append({"toml": "learning_rate = 0.0015\ndecay_lr = false\n", "its": list(range(20)),
                 "lrs": [bits(0.0015)] * 20})
    return ds, nano


def main():
    os.makedirs(OUT, exist_ok=True)
    meta = {"deepspeed": deepspeed.__version__, "torch": torch.__version__}

    def write(name, doc):
        with open(os.path.join(OUT, name), "w") as f:
            json.dump({**meta, **doc}, f, separators=(",", ":"))
            f.write("\n")

    write("batch.json", {"cases": batch_fixture()})
    mapped, refused = mapping_fixture()
    write("mapping.json", {"mapped": mapped, "refused": refused})
    ds, nano = schedules_fixture()
    write("schedules.json", {"deepspeed_schedules": ds, "nanogpt": nano})


if __name__ == "__main__":
    main()
