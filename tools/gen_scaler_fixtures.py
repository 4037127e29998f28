"""Reference fixtures for lib/scaler.rs (tests/scaler.rs): DeepSpeed's own DynamicLossScaler
(deepspeed.runtime.fp16.loss_scaler, as ZeRO stages 1-3 create it through CreateLossScaler)
driven by long pseudo-random overflow sequences (overflow more likely at high scales).

    DS_ACCELERATOR=cpu .deps/py/bin/python tools/gen_scaler_fixtures.py

Writes tests/fixtures/scaler/dynamic.json: per config, the overflow sequence (a string of 0/1),
and after every update_scale() call the scale, whether the step was skipped (DeepSpeed's engine
skips exactly the overflowing steps) and the remaining hysteresis; `error_at` is the step at
which DeepSpeed raised (overflow at the minimum scale), if it did.
"""
import json
import os
import random
import types

import deepspeed
from deepspeed.runtime.fp16 import loss_scaler as ls

# update_scale() asks deepspeed.comm for the rank only to decide whether to log; there is no
# process group here, so answer "rank 0" and leave the scaling logic untouched.
ls.dist = types.SimpleNamespace(get_rank=lambda: 0)

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "scaler")


def overflow_model(rng, p_spike):
    """Overflow when the scale exceeds a slowly drifting ceiling (the gradients' headroom), plus
    rare spikes and bursts at any scale: the decision depends on DeepSpeed's current scale, so
    the scale keeps moving both ways. The recorded sequence is then replayed as is."""
    state = {"log2_ceiling": 14.0, "burst": 0}

    def next_overflow(scale):
        state["log2_ceiling"] = min(30.0, max(6.0, state["log2_ceiling"] + rng.gauss(0.0, 0.08)))
        if state["burst"] > 0:
            state["burst"] -= 1
            return 1
        r = rng.random()
        if r < p_spike / 10:
            state["burst"] = rng.randint(1, 10)
            return 1
        if r < p_spike:
            return 1
        return int(scale > 2.0 ** state["log2_ceiling"])

    return next_overflow


def run(cfg, n, next_overflow):
    # The fp16 block -> DynamicLossScaler arguments, as DeepSpeedFP16Config.dynamic_loss_scale_args.
    scaler = ls.CreateLossScaler(
        dtype=ls.torch.half, static_loss_scale=1.0, dynamic_scaling=True,
        dynamic_loss_args={
            ls.INITIAL_LOSS_SCALE: 2 ** cfg["initial_scale_power"],
            ls.SCALE_WINDOW: cfg["loss_scale_window"],
            ls.DELAYED_SHIFT: cfg["hysteresis"],
            ls.CONSECUTIVE_HYSTERESIS: cfg["consecutive_hysteresis"],
            ls.MIN_LOSS_SCALE: cfg["min_loss_scale"],
        })
    seq, scales, skipped, hysteresis = [], [], [], []
    error_at = None
    for i in range(n):
        o = next_overflow(scaler.cur_scale)
        seq.append(o)
        try:
            scaler.update_scale(bool(o))
        except Exception as e:  # DeepSpeed raises a bare Exception at the minimum scale
            assert "minimum" in str(e), e
            error_at = i
            break
        scales.append(float(scaler.cur_scale))
        skipped.append(o)
        hysteresis.append(scaler.cur_hysteresis)
    return {"config": cfg, "overflow": "".join(map(str, seq)), "scale": scales,
            "skipped": "".join(map(str, skipped)), "hysteresis": hysteresis, "error_at": error_at}


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(1234)
    configs = [
        # DeepSpeed's defaults
        dict(initial_scale_power=16, loss_scale_window=1000, hysteresis=2, consecutive_hysteresis=False, min_loss_scale=1),
        dict(initial_scale_power=16, loss_scale_window=20, hysteresis=2, consecutive_hysteresis=False, min_loss_scale=1),
        dict(initial_scale_power=12, loss_scale_window=15, hysteresis=1, consecutive_hysteresis=False, min_loss_scale=1),
        dict(initial_scale_power=20, loss_scale_window=10, hysteresis=3, consecutive_hysteresis=True, min_loss_scale=1),
        dict(initial_scale_power=16, loss_scale_window=25, hysteresis=4, consecutive_hysteresis=False, min_loss_scale=8),
        dict(initial_scale_power=8, loss_scale_window=50, hysteresis=2, consecutive_hysteresis=True, min_loss_scale=0.25),
        dict(initial_scale_power=3, loss_scale_window=30, hysteresis=1, consecutive_hysteresis=False, min_loss_scale=0.5),
    ]
    cases = []
    for cfg in configs:
        n = 4000 if cfg["loss_scale_window"] == 1000 else 1500
        p_spike = 0.002 if cfg["loss_scale_window"] == 1000 else 0.01
        cases.append(run(cfg, n, overflow_model(rng, p_spike)))
    # A run that diverges: overflows most steps until DeepSpeed gives up at the minimum.
    diverging = dict(initial_scale_power=6, loss_scale_window=100, hysteresis=2, consecutive_hysteresis=False,
                     min_loss_scale=1)
    cases.append(run(diverging, 400, lambda scale: int(rng.random() < 0.8)))
    # A minimum that is not a power of two: the scale is clamped to it before the error.
    clamped = dict(initial_scale_power=5, loss_scale_window=4, hysteresis=1, consecutive_hysteresis=False,
                   min_loss_scale=3)
    cases.append(run(clamped, 400, lambda scale: int(rng.random() < 0.45)))
    with open(os.path.join(OUT, "dynamic.json"), "w") as f:
        json.dump({"deepspeed": deepspeed.__version__, "cases": cases}, f, separators=(",", ":"))
        f.write("\n")
    for c in cases:
        s = c["scale"]
        print(c["config"], "steps", len(s), "min", min(s), "max", max(s), "skips", c["skipped"].count("1"),
              "error_at", c["error_at"])


if __name__ == "__main__":
    main()
