#!/usr/bin/env python
"""Writes real DeepSpeed ZeRO checkpoints of tiny GPT-2-shaped models, and beside each one
DeepSpeed's own consolidation of it (reference.safetensors), for tests/convert_deepspeed.rs, and
of its Adam moments (reference_moments.safetensors), for tests/deepspeed_resume.rs.

Each case trains a few steps with DeepSpeed itself (several processes, gloo) and saves with
engine.save_checkpoint, so the file layout and pickles are exactly what DeepSpeed writes. The
reference comes from deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint on the
saved files, so zerokit is compared with DeepSpeed's own reconstruction, not with a re-derivation.
The moments' reference is DeepSpeed's universal-checkpoint conversion (deepspeed.checkpoint.
ds_to_universal, which consolidates fp32 weights, exp_avg and exp_avg_sq per parameter).

Sizes are chosen so that partition padding is needed: the per-group element counts are not
multiples of 2 * world_size, and stage 3's per-parameter sizes are not multiples of world_size.

    # CPU, here (default): every case that DeepSpeed's CPU accelerator can run
    DS_ACCELERATOR=cpu .deps/py/bin/python tools/gen_deepspeed_fixtures.py
    # DeepSpeed continuing some of the saved runs one step (continued.safetensors beside them)
    DS_ACCELERATOR=cpu .deps/py/bin/python tools/gen_deepspeed_fixtures.py --continue
    # one GPU per process, for the cases the CPU accelerator cannot run
    .deps/py/bin/python tools/gen_deepspeed_fixtures.py --device cuda --only fp16
"""
import argparse
import json
import os
import shutil
import socket
import sys
import tempfile

# Cases --continue continues (no frozen parameter: zerokit trains every parameter).
CONTINUED = ["s1_fp16_w2", "s2_bf16_w4", "s3_bf16_w2"]

CASES = [
    # name, stage, dtype, world size, freeze wpe, parameter_alignment
    ("s1_fp16_w2", 1, "fp16", 2, False, False),
    ("s1_bf16_w4", 1, "bf16", 4, False, True),
    ("s2_fp16_w4", 2, "fp16", 4, True, False),
    ("s2_bf16_w2", 2, "bf16", 2, True, True),
    ("s2_bf16_w4", 2, "bf16", 4, False, False),
    ("s3_fp16_w2", 3, "fp16", 2, True, False),
    ("s3_bf16_w4", 3, "bf16", 4, True, False),
    ("s3_bf16_w2", 3, "bf16", 2, False, False),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    # Odd sizes everywhere so flat groups and per-parameter partitions need padding.
    cfg = GPT2Config(vocab_size=37, n_positions=12, n_embd=9, n_layer=2, n_head=3,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    # Persistent buffers of two dtypes, to exercise DeepSpeed's buffer_names path.
    model.register_buffer("zk_float_buffer", torch.linspace(-1, 1, 7))
    model.register_buffer("zk_int_buffer", torch.arange(5, dtype=torch.int64) * 3)
    return model


def worker(rank, world, port, case, out_root, device, steps, cont=False):
    import torch
    import torch.distributed
    name, stage, dtype, _, freeze, align = case
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    if device == "cuda":
        torch.cuda.set_device(rank)
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if device == "cpu" and dtype == "fp16":
        # The CPU accelerator reports fp16 as unsupported without oneDNN fp16; the tiny model's
        # fp16 ops run fine on CPU, and the checkpoint layout does not depend on the device.
        type(get_accelerator()).is_fp16_supported = lambda self: True
    if device == "cpu":
        # The shared-memory collective op is JIT-compiled C++; gloo alone is enough here.
        import deepspeed.comm.torch  # noqa: F401  (the attribute name is shadowed by torch itself)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")

    torch.manual_seed(1234)
    model = tiny_gpt2()
    if freeze:
        model.transformer.wpe.weight.requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "parameter_alignment": align},
        "fp16": {"enabled": dtype == "fp16", "initial_scale_power": 4},
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 1000,
    }
    if stage == 3:
        # Keep every parameter partitioned (no persistence threshold) so all go through the
        # fp32 flat groups, as in a large model.
        ds_config["zero_optimization"].update(stage3_param_persistence_threshold=0,
                                              stage3_max_live_parameters=0)
    if rank == 0:
        numels = [sum(p.numel() for p in grp["params"]) for grp in groups]
        sizes = [p.numel() for grp in groups for p in grp["params"]]
        # The point of these fixtures is padding: make sure the sizes force it.
        assert any(n % (2 * world) for n in numels), numels
        assert any(n % world for n in sizes), sizes
        print(name, "group numels", numels, flush=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    dev = engine.device
    if cont:
        continue_one_step(engine, rank, world, os.path.join(out_root, name))
        torch.distributed.destroy_process_group()
        return
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x = torch.randint(0, 37, (2, 9), generator=g).to(dev)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    ckpt = os.path.join(out_root, name)
    engine.save_checkpoint(ckpt, tag="global_step%d" % steps)
    torch.distributed.barrier()
    if rank == 0:
        write_reference(ckpt)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def continue_one_step(engine, rank, world, ckpt):
    """DeepSpeed's own continuation of a saved run: load_checkpoint (the tag `latest` names, with
    the optimizer state), one step on a fixed batch of 2 sequences of 9 tokens per rank, then
    rank 0 writes continued.safetensors: the global batch ("batch", ranks' rows in rank order),
    every parameter's fp32 master weights after the step ("weights/<name>", through
    safe_get_full_fp32_param, collective at stage 3), and in the metadata the mean loss of the
    step, the learning rate and the loss scale it used."""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import save_file
    engine.load_checkpoint(ckpt)
    step = engine.global_steps
    scale = engine.optimizer.cur_scale if hasattr(engine.optimizer, "cur_scale") else 1.0
    x = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1000 + rank)).to(engine.device)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    lr = engine.get_lr()[0]
    engine.step()
    assert engine.global_steps == step + 1 and engine.skipped_steps == 0, "the continued step was skipped"
    xs = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(xs, x)
    mean = loss.detach().float().clone()
    dist.all_reduce(mean)
    weights = {"weights/" + n: safe_get_full_fp32_param(p).detach().float().cpu().contiguous()
               for n, p in engine.module.named_parameters()}
    if rank == 0:
        meta = {"loss": repr(mean.item() / world), "lr": repr(float(lr)), "loss_scale": repr(float(scale)),
                "step": str(step)}
        save_file({"batch": torch.cat(xs).cpu(), **weights}, os.path.join(ckpt, "continued.safetensors"),
                  metadata=meta)
    dist.barrier()


def write_reference(ckpt):
    """DeepSpeed's consolidation of the saved checkpoint, as its zero_to_fp32 script converts it:
    get_fp32_state_dict_from_zero_checkpoint, then to_torch_tensor with the output dtype (fp32,
    and bf16 for the --dtype path). Tied names (lm_head.weight) are separate copies because
    safetensors cannot alias; the values are identical."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor
    from safetensors.torch import save_file
    for dtype, fname in ((torch.float32, "reference.safetensors"), (torch.bfloat16, "reference_bf16.safetensors")):
        lazy = get_fp32_state_dict_from_zero_checkpoint(ckpt, lazy_mode=True)
        sd = to_torch_tensor(lazy, dtype=dtype)
        out = {k: v.detach().clone().contiguous() for k, v in sd.items()}
        save_file(out, os.path.join(ckpt, fname), metadata={"names": json.dumps(list(sd.keys()))})
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        if os.path.exists(os.path.join(ckpt, script)):
            os.remove(os.path.join(ckpt, script))
    write_moment_reference(ckpt)


def write_moment_reference(ckpt):
    """DeepSpeed's universal-checkpoint conversion of the tag `latest` names, run as its command
    line runs it, then its per-parameter exp_avg and exp_avg_sq (trained parameters only: frozen
    ones have none) written flat as "<name>/exp_avg" and "<name>/exp_avg_sq", with Adam's step in the
    metadata. --inject_missing_state supplies the universal_checkpoint_info that only Megatron-style
    clients save (it writes into the output folder, not the input)."""
    import subprocess
    import torch
    from safetensors.torch import save_file
    with open(os.path.join(ckpt, "latest")) as f:
        tag = f.read().strip()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "universal")
        env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        os.path.join(ckpt, tag), "--output_folder", out, "--num_extract_workers", "1",
                        "--num_merge_workers", "1", "--inject_missing_state"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        tensors, steps = {}, set()
        zero = os.path.join(out, "zero")
        for name in sorted(os.listdir(zero)):
            d = os.path.join(zero, name)
            if not os.path.isdir(d):
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                f = os.path.join(d, key + ".pt")
                if os.path.exists(f):
                    # Stages 1-2 save {"param": tensor, ...} in the parameter's shape, stage 3 the
                    # bare tensor, flat: both are kept flat here.
                    t = torch.load(f, weights_only=False)
                    t = t["param"] if isinstance(t, dict) else t
                    tensors[name + "/" + key] = t.float().reshape(-1).contiguous()
            if os.path.exists(os.path.join(d, "step.pt")):
                steps.add(float(torch.load(os.path.join(d, "step.pt"), weights_only=False)))
        if not steps:
            # Stage 3's conversion keeps Adam's step only in the common optimizer state.
            common = torch.load(os.path.join(zero, "optimizer_state.pt"), weights_only=False)
            steps = {float(st["step"]) for st in common["optimizer_state_dict"]["state"].values()}
        assert len(steps) == 1, steps
        save_file(tensors, os.path.join(ckpt, "reference_moments.safetensors"),
                  metadata={"step": str(int(steps.pop()))})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "deepspeed"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--only", default="", help="substring filter on case names, e.g. fp16 or s3_")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--references-only", action="store_true",
                    help="recompute the reference files of existing checkpoints, without training")
    ap.add_argument("--continue", dest="cont", action="store_true",
                    help="continue the saved runs of CONTINUED one step (continued.safetensors)")
    args = ap.parse_args()
    if args.references_only:
        for case in CASES:
            dest = os.path.join(args.out, case[0])
            if os.path.isdir(dest) and (not args.only or args.only in case[0]):
                write_reference(dest)
        return
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.multiprocessing as mp
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for case in CASES:
        if args.only and args.only not in case[0]:
            continue
        if args.cont:
            if case[0] in CONTINUED:
                mp.spawn(worker, args=(case[3], free_port(), case, args.out, args.device, args.steps, True),
                         nprocs=case[3], join=True)
                print("continued", case[0], flush=True)
            continue
        world = case[3]
        dest = os.path.join(args.out, case[0])
        if os.path.exists(dest):
            shutil.rmtree(dest)
        try:
            mp.spawn(worker, args=(world, free_port(), case, args.out, args.device, args.steps),
                     nprocs=world, join=True)
            print("wrote", dest, flush=True)
        except Exception as e:  # keep going: report which combinations this device cannot run
            import traceback; traceback.print_exc(); print("FAILED", case[0], flush=True)
            shutil.rmtree(dest, ignore_errors=True)
            failed.append(case[0])
    if failed:
        print("not generated on", args.device, ":", " ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
