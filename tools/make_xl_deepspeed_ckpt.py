#!/usr/bin/env python
"""Writes a synthetic GPT-2 XL (1.56 B parameters) DeepSpeed ZeRO-2 fp16 checkpoint with 4 ranks,
for tools/bench_zero_to_fp32.py.

Training XL with DeepSpeed on a CPU box is out of reach, so the files are written with
torch.save, in exactly the structure DeepSpeed 0.19 saves: the pickled dicts are taken from a
real DeepSpeed checkpoint (tests/fixtures/deepspeed/s2_fp16_w4, written by DeepSpeed itself) and
only the tensors, shapes and sizes are replaced by XL's, partitioned and padded as stage 2 does
(each group padded to a multiple of 2 x world size, rank r saving its slice minus the padding).
Values are random. About 22 GB on disk.

    .deps/py/bin/python tools/make_xl_deepspeed_ckpt.py /tmp/xl_ckpt
"""
import argparse
import copy
import math
import os
from collections import OrderedDict

import torch

WORLD = 4
TAG = "global_step1000"


def xl_shapes():
    """GPT2LMHeadModel(n_embd=1600, n_layer=48, n_head=25).named_parameters(), in order (lm_head is
    tied to wte and not listed), written out so the GPU machines need no transformers; split into
    DeepSpeed's usual two groups (weight decay for matrices, none for vectors)."""
    d, v, ctx, layers = 1600, 50257, 1024, 48
    named = [("transformer.wte.weight", (v, d)), ("transformer.wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"transformer.h.{i}."
        named += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
                  (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
                  (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
                  (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
                  (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
                  (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,))]
    named += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    decay = [(n, s) for n, s in named if len(s) >= 2]
    no_decay = [(n, s) for n, s in named if len(s) < 2]
    return [decay, no_decay]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--template", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                       "deepspeed", "s2_fp16_w4", "global_step3"))
    args = ap.parse_args()
    torch.manual_seed(0)
    tdir = args.template
    tmodel = torch.load(os.path.join(tdir, "mp_rank_00_model_states.pt"), weights_only=False)
    toptim = torch.load(os.path.join(tdir, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), weights_only=False)
    groups = xl_shapes()
    dest = os.path.join(args.out, TAG)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(args.out, "latest"), "w") as f:
        f.write(TAG)

    align = 2 * WORLD
    numels = [sum(math.prod(s) for _, s in g) for g in groups]
    padded = [math.ceil(n / align) * align for n in numels]
    parts = [p // WORLD for p in padded]

    # Model states: fp16 module whose parameters are views of one flat buffer per group, as
    # DeepSpeed's flattened bit16 groups are.
    module = OrderedDict()
    for g, n in zip(groups, padded):
        flat = torch.empty(n, dtype=torch.float16).normal_(0, 0.02)
        off = 0
        for name, shape in g:
            k = math.prod(shape)
            module[name] = flat.narrow(0, off, k).view(shape)
            off += k
    module["lm_head.weight"] = module["transformer.wte.weight"]
    model = dict(tmodel)
    model["module"] = module
    model["buffer_names"] = []
    model["param_shapes"] = [OrderedDict((n, torch.Size(s)) for n, s in g) for g in groups]
    model["frozen_param_shapes"] = OrderedDict()
    model["frozen_param_fragments"] = OrderedDict()
    model["shared_params"] = {"lm_head.weight": "transformer.wte.weight"}
    model["dp_world_size"] = WORLD
    torch.save(model, os.path.join(dest, "mp_rank_00_model_states.pt"))
    del model, module

    frag_cls = type(next(iter(toptim["optimizer_state_dict"]["param_slice_mappings"][0].values())))
    for r in range(WORLD):
        osd = copy.copy(toptim["optimizer_state_dict"])
        fp32, paddings, slice_maps, state = [], [], [], {}
        for gi, (g, n, p) in enumerate(zip(groups, numels, parts)):
            lo, hi = r * p, min((r + 1) * p, n)
            lean = max(hi - lo, 0)
            pad = p - lean
            full = torch.empty(p, dtype=torch.float32).normal_(0, 0.02)
            fp32.append(full[:lean])
            paddings.append(pad)
            state[gi] = {"step": torch.tensor(1000.0),
                         "exp_avg": torch.empty(lean).normal_(0, 1e-3),
                         "exp_avg_sq": torch.empty(lean).uniform_(0, 1e-6)}
            m, off = OrderedDict(), 0
            for name, shape in g:
                k = math.prod(shape)
                s, e = max(off, lo), min(off + k, hi)
                if s < e:
                    m[name] = frag_cls(numel=e - s, start=s - lo)
                off += k
            slice_maps.append(m)
        base = copy.copy(osd["base_optimizer_state"])
        base["state"] = state
        base["param_groups"] = [dict(pg, params=[i]) for i, pg in enumerate(base["param_groups"][:len(groups)])]
        osd["base_optimizer_state"] = base
        osd["single_partition_of_fp32_groups"] = fp32
        osd["group_paddings"] = paddings
        osd["param_alignment_paddings"] = [[0] * len(g) for g in groups]
        osd["partition_count"] = [WORLD] * len(groups)
        osd["param_slice_mappings"] = slice_maps
        sd = {"optimizer_state_dict": osd, "ds_config": toptim["ds_config"], "ds_version": toptim["ds_version"]}
        torch.save(sd, os.path.join(dest, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        print("wrote rank", r, flush=True)
        del sd, osd, fp32, state


if __name__ == "__main__":
    main()
