#!/usr/bin/env bash
# A zerokit checkpoint as the first release of format version 1 wrote it (commit 98b033a): rank
# files whose metadata holds only format, rank and parts, and a model.safetensors whose metadata
# holds only "format": "pt". Readers that learned to check more of a file's identity
# (world_size, zero_stage, step) must still read it: tests/run_checks.rs loads, resumes,
# converts, samples and verifies it.
#
#     tools/gen_zerokit_v1_fixture.sh PATH/TO/train-of-98b033a
#
# Writes tests/fixtures/zerokit/v1_s2_w2/ (2 CPU ranks, ZeRO-2, bf16, one save at step 2).
# The same run by another build and stage, as a fixture of its own (issue 12 restructured the
# engine and the checkpoint code: what the build before it saved must still load):
#
#     STAGE=1 tools/gen_zerokit_v1_fixture.sh PATH/TO/train-of-a04011c v1_s1_w2_a04011c
set -euo pipefail
train=${1:?usage: $0 TRAIN_BINARY (built from commit 98b033a) [FIXTURE_NAME]}
stage=${STAGE:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$repo/tests/fixtures/zerokit/${2:-v1_s2_w2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Pseudo-random ids below 96, as tests/common::random_tokens writes them.
python3 - "$work/data" <<'PY'
import os, struct, sys
d = sys.argv[1]
os.makedirs(d)
for split, n, s in [("train", 4000, 3), ("val", 2000, 5)]:
    out = bytearray()
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
        out += struct.pack("<H", (s >> 33) % 96)
    open(os.path.join(d, split + ".bin"), "wb").write(out)
PY
cat > "$work/config.toml" <<TOML
dataset = "$work/data"
out_dir = "$work/out"
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16
vocab_size = 96
batch_size = 2
zero_stage = $stage
dtype = "bf16"
device = "cpu"
max_iters = 2
eval_interval = 2
eval_iters = 1
always_save_checkpoint = true
learning_rate = 3e-3
warmup_iters = 1
lr_decay_iters = 2
min_lr = 3e-4
sample_tokens = 0
comm_timeout = 60
TOML
ZEROKIT_NO_CUDA=1 "$train" "$work/config.toml" --nproc-per-node 2 --master-port 29731
rm -rf "$out"
mkdir -p "$out"
cp "$work/out/latest" "$out/"
cp -r "$work/out/step_00000002" "$out/"
echo "wrote $out"
