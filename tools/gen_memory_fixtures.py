"""Reference fixtures for lib/memory.rs (tests/memory.rs): DeepSpeed's own model-state memory
estimators over a grid of model sizes and cluster shapes, and the activation bytes libtorch's
autograd really saves in a small GPT-2 forward (saved_tensors.json) and in a small Llama forward
(saved_tensors_llama.json; alone with --llama-only, which needs no DeepSpeed).

    DS_ACCELERATOR=cpu .deps/py/bin/python tools/gen_memory_fixtures.py [--llama-only]

Writes tests/fixtures/memory/deepspeed.json with the parameter counts of transformers' GPT-2
presets and of zerokit's Llama presets (total and DeepSpeed's largest layer, through
model_to_params, the counting estimate_zero3_model_states_mem_needs_all_live does), and the
(cpu, gpu) bytes of
estimate_zero2_model_states_mem_needs and the (cpu, gpu, largest_layer_memory) bytes of
estimate_zero3_model_states_mem_needs, for every combination of their arguments below.
"""
import itertools
import json
import os
import sys

import deepspeed
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "memory")

PRESETS = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
           "gpt2-xl": (48, 25, 1600)}
# Round and odd sizes and a 175B model, beside the GPT-2 presets.
OTHER_MODELS = [(1000000007, 12345679), (7000000000, 262144000), (175000000000, 1207959552), (3, 1)]
GPUS_PER_NODE = [1, 3, 4, 8]
NODES = [1, 2, 16]
# DeepSpeed's default, and 1.0: the bare model states, which zerokit's host figures are
# compared with.
FACTORS = [1.5, 1.0]
# zerokit's Llama presets (lib/model/llama.rs): hidden, intermediate, layers, heads, kv heads,
# head_dim, vocabulary, tied head.
LLAMA_PRESETS = {"llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256, True),
                 "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128, 128256, True),
                 "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256, False),
                 "llama-tiny": (64, 176, 2, 4, 2, 16, 50304, True)}


def gpt2_counts():
    """(total, largest layer) of transformers' GPT2LMHeadModel built on the meta device (no
    memory). The largest layer is DeepSpeed's own model_to_params; its total dedupes tied
    parameters by data_ptr(), which is 0 for every meta tensor, so the total counts
    model.parameters() (which yields a tied parameter once) instead."""
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import GPT2Config, GPT2LMHeadModel

    out = {}
    for name, (n_layer, n_head, n_embd) in PRESETS.items():
        cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, n_positions=1024)
        with torch.device("meta"):
            model = GPT2LMHeadModel(cfg)
        total = sum(p.numel() for p in model.parameters())
        out[name] = (total, model_to_params(model)[1])
    return out


def llama_counts():
    """gpt2_counts for transformers' LlamaForCausalLM at zerokit's Llama presets."""
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for name, (c, f, layers, heads, kv, d, v, tied) in LLAMA_PRESETS.items():
        cfg = LlamaConfig(hidden_size=c, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, head_dim=d, vocab_size=v, tie_word_embeddings=tied)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        total = sum(p.numel() for p in model.parameters())
        out[name] = (total, model_to_params(model)[1])
    return out


def activated_linear():
    """bias + gelu(pre) @ W keeping pre, as lib/kernels/ops.cpp's ActivatedLinear does for GPT-2's
    MLP projection (gelu recomputed in backward)."""
    import torch
    import torch.nn.functional as F

    class ActivatedLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pre, w, b):
            ctx.save_for_backward(pre, w)
            return F.linear(F.gelu(pre, approximate="tanh"), w, b)

        @staticmethod
        def backward(ctx, grad):
            pre, w = ctx.saved_tensors
            with torch.enable_grad():
                p = pre.detach().requires_grad_()
                a = F.gelu(p, approximate="tanh")
            grad_a = grad @ w
            (grad_pre,) = torch.autograd.grad(a, p, grad_a)
            g2 = grad.reshape(-1, grad.shape[-1])
            return grad_pre, g2.t() @ a.detach().reshape(-1, a.shape[-1]), g2.sum(0)

    return ActivatedLinear.apply


def measure_saved(n_layer, n_head, n_embd, vocab, batch, seq, dtype):
    """Bytes autograd saves for backward in one forward of a GPT-2 written the way zerokit's
    tch model is (layer_norm, linear, scaled_dot_product_attention, the MLP projection on its tanh
    GELU keeping only the pre-activation, tied LM head, cross-entropy on fp32 logits), counted by storage through saved_tensors_hooks, parameters
    excluded. Runs on CPU, where SDPA is the flash kernel (O(T) memory, like CUDA's)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    C, H = n_embd, n_head

    def mk(*shape):
        return (torch.randn(*shape) * 0.02).to(dtype).requires_grad_()

    wte, wpe = mk(vocab, C), mk(1024, C)
    blocks = [[mk(C), mk(C), mk(3 * C, C), mk(3 * C), mk(C, C), mk(C), mk(C), mk(C), mk(4 * C, C), mk(4 * C),
               mk(C, 4 * C), mk(C)] for _ in range(n_layer)]
    lnf = [mk(C), mk(C)]
    params = {p.untyped_storage().data_ptr() for p in [wte, wpe, *lnf] + [p for b in blocks for p in b]}
    idx = torch.randint(0, vocab, (batch, seq))
    targets = torch.randint(0, vocab, (batch, seq))
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    B, T = batch, seq
    act_linear = activated_linear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = F.embedding(idx, wte) + F.embedding(torch.arange(T), wpe)
        for (l1w, l1b, aw, ab, pw, pb, l2w, l2b, fw, fb, p2w, p2b) in blocks:
            h = F.layer_norm(x, (C,), l1w, l1b)
            q, k, v = F.linear(h, aw, ab).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + F.linear(y.transpose(1, 2).contiguous().view(B, T, C), pw, pb)
            h = F.layer_norm(x, (C,), l2w, l2b)
            x = x + act_linear(F.linear(h, fw, fb), p2w, p2b)
        x = F.layer_norm(x, (C,), *lnf)
        logits = F.linear(x, wte)
        loss = F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))
    return sum(saved.values())


def measure_saved_llama(n_layer, n_head, n_kv, head_dim, n_embd, ffn, vocab, batch, seq, dtype, gemma=None):
    """measure_saved for a Llama written the way lib/model/decoder.rs writes it: RMSNorm in fp32
    cast back, rotary embeddings (cos/sin per block, rotate_half by cat), grouped-query
    scaled_dot_product_attention (enable_gqa), SwiGLU through an autograd function keeping gate and
    up (lib/kernels/ops.cpp), an untied head, cross-entropy on fp32
    logits. With `gemma` (a dict: qk_norm, attn_softcap, window, layer_types), the decoder as it
    runs Gemma: the embedding times sqrt(C) in the compute dtype, RMSNorm scaling by (1 + gain) in
    fp32, norms after attention and after the MLP, GeGLU, QK-norm, attention written out with
    soft-capping (k and v repeated, scores soft-capped, masked, softmax in fp32) or SDPA with a
    sliding-window mask on local layers. The head has no soft-cap here: zerokit's head runs
    chunk by chunk outside autograd, and the estimate counts it apart (logits_bytes)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    C, H, KV, D = n_embd, n_head, n_kv, head_dim

    def mk(*shape):
        return (torch.randn(*shape) * 0.02).to(dtype).requires_grad_()

    def rms(x, w):
        h = x.float()
        h = h * (h.pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt()
        if gemma:
            return (h * (w.float() + 1.0)).to(x.dtype)
        return w * h.to(x.dtype)

    class GatedProduct(torch.autograd.Function):
        """act(gate) * up keeping gate and up, as lib/kernels/ops.cpp does (act recomputed)."""

        @staticmethod
        def forward(ctx, gate, up, act):
            ctx.save_for_backward(gate, up)
            ctx.act = act
            return act(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            with torch.enable_grad():
                g = gate.detach().requires_grad_()
                a = ctx.act(g)
            (grad_gate,) = torch.autograd.grad(a, g, grad * up)
            return grad_gate, grad * a.detach(), None

    def gelu_tanh(x):
        return F.gelu(x, approximate="tanh")

    def rope(x, cos, sin):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    def sliding(window):
        i, j = torch.arange(seq).unsqueeze(1), torch.arange(seq).unsqueeze(0)
        return (i - j >= 0) & (i - j < window)

    def attention(q, k, v, window):
        scale = D ** -0.5
        if gemma and gemma["attn_softcap"]:
            cap = gemma["attn_softcap"]
            if KV != H:
                k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
            scores = torch.tanh(q @ k.transpose(2, 3) * scale / cap) * cap
            allowed = sliding(window) if window and window < seq else torch.ones(seq, seq, dtype=torch.bool).tril()
            scores = scores.masked_fill(allowed.logical_not(), float("-inf"))
            return scores.softmax(-1, dtype=torch.float).to(q.dtype) @ v
        mask = sliding(window) if window and window < seq else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=KV != H)

    n_norms = 4 if gemma else 2
    qk = 2 if gemma and gemma["qk_norm"] else 0
    embed, head, norm = mk(vocab, C), mk(vocab, C), mk(C)
    layers = [[mk(H * D, C), mk(KV * D, C), mk(KV * D, C), mk(C, H * D), mk(ffn, C), mk(ffn, C), mk(C, ffn)]
              + [mk(C) for _ in range(n_norms)] + [mk(D) for _ in range(qk)] for _ in range(n_layer)]
    params = {p.untyped_storage().data_ptr() for p in [embed, head, norm] + [p for l in layers for p in l]}
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    idx = torch.randint(0, vocab, (batch, seq))
    targets = torch.randint(0, vocab, (batch, seq))
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    B, T = batch, seq
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = F.embedding(idx, embed)
        if gemma:
            x = x * torch.tensor(C ** 0.5).to(dtype)
        for i, (qw, kw, vw, ow, gw, uw, dw, *norms) in enumerate(layers):
            window = gemma["window"] if gemma and gemma["layer_types"][i] == "sliding_attention" else None
            freqs = torch.arange(T).float().unsqueeze(-1) * inv_freq
            emb = torch.cat((freqs, freqs), -1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            h = rms(x, norms[0])
            q, k, v = (F.linear(h, w).view(B, T, -1, D).transpose(1, 2) for w in (qw, kw, vw))
            if qk:
                q, k = rms(q, norms[n_norms]), rms(k, norms[n_norms + 1])
            y = attention(rope(q, cos, sin), rope(k, cos, sin), v, window)
            a = F.linear(y.transpose(1, 2).contiguous().reshape(B, T, -1), ow)
            if gemma:
                x = x + rms(a, norms[1])
                h = rms(x, norms[2])
                m = F.linear(GatedProduct.apply(F.linear(h, gw), F.linear(h, uw), gelu_tanh), dw)
                x = x + rms(m, norms[3])
            else:
                x = x + a
                h = rms(x, norms[1])
                x = x + F.linear(GatedProduct.apply(F.linear(h, gw), F.linear(h, uw), F.silu), dw)
        logits = F.linear(rms(x, norm), head)
        loss = F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))
    return sum(saved.values())


def gemma_cases():
    """Gemma 2-like (soft-capped attention, local layers first, window 16 < T) and Gemma 3-like
    (QK-norm, SDPA with a sliding-window mask on local layers) measurements."""
    import torch
    cases = []
    for (L, H, KV, D, C, Fd, V, B, T, softcap, qk, window, period) in [
            (3, 4, 2, 16, 64, 128, 500, 2, 64, 50.0, False, 16, 2),
            (4, 4, 2, 16, 64, 128, 500, 2, 64, None, True, 16, 3),
            (2, 4, 4, 32, 96, 192, 300, 1, 32, None, True, 64, 2)]:
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(L)]
        gemma = {"qk_norm": qk, "attn_softcap": softcap, "window": window, "layer_types": types}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            cases.append({"n_layer": L, "n_head": H, "n_kv_head": KV, "head_dim": D, "n_embd": C, "ffn": Fd,
                          "vocab_size": V, "micro_batch": B, "seq_len": T, "dtype": name,
                          "attn_softcap": softcap, "qk_norm": qk, "sliding_window": window, "layer_types": types,
                          "saved_bytes": measure_saved_llama(L, H, KV, D, C, Fd, V, B, T, dtype, gemma)})
    return {"torch": torch.__version__, "cases": cases}


def llama_cases():
    import torch
    cases = []
    for (L, H, KV, D, C, Fd, V, B, T) in [(2, 4, 2, 16, 64, 176, 500, 2, 64), (1, 4, 4, 24, 64, 96, 257, 1, 32),
                                         (3, 6, 2, 32, 192, 512, 1000, 3, 96)]:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            cases.append({"n_layer": L, "n_head": H, "n_kv_head": KV, "head_dim": D, "n_embd": C, "ffn": Fd,
                          "vocab_size": V, "micro_batch": B, "seq_len": T, "dtype": name,
                          "saved_bytes": measure_saved_llama(L, H, KV, D, C, Fd, V, B, T, dtype)})
    return {"torch": torch.__version__, "cases": cases}


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "saved_tensors_llama.json"), "w") as f:
        json.dump(llama_cases(), f, indent=1)
        f.write("\n")
    with open(os.path.join(OUT, "saved_tensors_gemma.json"), "w") as f:
        json.dump(gemma_cases(), f, indent=1)
        f.write("\n")
    if "--llama-only" in sys.argv:
        return
    presets = gpt2_counts()
    llamas = llama_counts()
    models = list(presets.values()) + OTHER_MODELS
    zero2, zero3 = [], []
    for (total, largest), g, n, abf in itertools.product(models, GPUS_PER_NODE, NODES, FACTORS):
        for off in (True, False):
            cpu, gpu = estimate_zero2_model_states_mem_needs(total, g, n, off, abf)
            zero2.append([total, g, n, off, abf, cpu, gpu])
        for off, off_params, zinit in itertools.product((True, False), repeat=3):
            cpu, gpu, lay = estimate_zero3_model_states_mem_needs(total, largest, g, n, off, off_params, zinit, abf)
            zero3.append([total, largest, g, n, off, off_params, zinit, abf, cpu, gpu, lay])
    import torch
    saved = []
    for (L, H, C, V, B, T) in [(2, 4, 96, 500, 2, 64), (3, 6, 192, 1000, 3, 96), (1, 2, 64, 257, 1, 32)]:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            saved.append({"n_layer": L, "n_head": H, "n_embd": C, "vocab_size": V, "micro_batch": B, "seq_len": T,
                          "dtype": name, "saved_bytes": measure_saved(L, H, C, V, B, T, dtype)})
    with open(os.path.join(OUT, "saved_tensors.json"), "w") as f:
        json.dump({"torch": torch.__version__, "cases": saved}, f, indent=1)
        f.write("\n")
    with open(os.path.join(OUT, "deepspeed.json"), "w") as f:
        json.dump({"deepspeed": deepspeed.__version__,
                   "gpt2_presets": {k: list(v) for k, v in presets.items()},
                   "llama_presets": {k: list(v) for k, v in llamas.items()},
                   "zero2_columns": "total_params, gpus_per_node, nodes, cpu_offload, buffer_factor, cpu, gpu",
                   "zero3_columns": "total_params, largest_layer_params, gpus_per_node, nodes, cpu_offload, "
                                    "cpu_offload_params, zero_init, buffer_factor, cpu, gpu, largest_layer_memory",
                   "zero2": zero2, "zero3": zero3}, f, separators=(",", ":"))
        f.write("\n")
    print(len(zero2), len(zero3))


if __name__ == "__main__":
    main()
