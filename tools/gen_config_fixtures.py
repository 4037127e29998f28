#!/usr/bin/env python3
"""Fixtures for tests/config.rs, from DeepSpeed's own code (the reference environment, .deps/py):

  deepspeed_batch.json   for DeepSpeed configs giving some of train_batch_size,
                         train_micro_batch_size_per_gpu and gradient_accumulation_steps, and world
                         sizes 1-8: the triple DeepSpeedConfig resolves, or that it refuses. Runs
                         DeepSpeedConfig._configure_train_batch_size itself on an object holding
                         just those fields (the rest of DeepSpeedConfig needs a process group).
  scheduler_defaults.json  the keyword defaults of WarmupLR, WarmupDecayLR and WarmupCosineLR, and
                         the rates WarmupLR and WarmupCosineLR take from the optimizer when a
                         config leaves them out.

    .deps/py/bin/python tools/gen_config_fixtures.py
"""
import inspect, itertools, json, os

import torch
import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime import lr_schedules

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "config")


def resolve(tb, mb, ga, world):
    cfg = DeepSpeedConfig.__new__(DeepSpeedConfig)
    cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps = tb, mb, ga
    cfg.world_size = world
    try:
        DeepSpeedConfig._configure_train_batch_size(cfg)
    except AssertionError as e:
        return {"error": str(e).splitlines()[0]}
    return {"train_batch_size": cfg.train_batch_size, "micro_batch": cfg.train_micro_batch_size_per_gpu,
            "accumulation": cfg.gradient_accumulation_steps}


def batch_cases():
    cases = []
    values = {"tb": [None, 12, 16, 24, 48], "mb": [None, 2, 3, 4], "ga": [None, 1, 2, 4]}
    for tb, mb, ga in itertools.product(values["tb"], values["mb"], values["ga"]):
        for world in (1, 2, 3, 4, 8):
            cases.append({"given": {"train_batch_size": tb, "train_micro_batch_size_per_gpu": mb,
                                    "gradient_accumulation_steps": ga}, "world": world,
                          "deepspeed": resolve(tb, mb, ga, world)})
    return cases


def scheduler_defaults():
    out = {}
    for cls in (lr_schedules.WarmupLR, lr_schedules.WarmupDecayLR, lr_schedules.WarmupCosineLR):
        sig = inspect.signature(cls.__init__).parameters
        out[cls.__name__] = {k: (None if v.default is inspect.Parameter.empty else v.default)
                             for k, v in sig.items() if k not in ("self", "optimizer", "last_batch_iteration")}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    warm = lr_schedules.WarmupLR(opt)
    out["WarmupLR_max_lr_from_optimizer_lr_3e-4"] = warm.max_lrs[0]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    cos = lr_schedules.WarmupCosineLR(opt, total_num_steps=10)
    out["WarmupCosineLR_org_lr_from_optimizer_lr_3e-4"] = cos.org_lrs[0]
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    meta = {"deepspeed": deepspeed.__version__, "torch": torch.__version__}
    with open(os.path.join(OUT, "deepspeed_batch.json"), "w") as f:  # one case a line
        f.write('{"deepspeed": %s, "torch": %s, "cases": [\n' % (json.dumps(meta["deepspeed"]), json.dumps(meta["torch"])))
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in batch_cases()))
        f.write("\n]}\n")
    with open(os.path.join(OUT, "scheduler_defaults.json"), "w") as f:
        json.dump({**meta, **scheduler_defaults()}, f, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
