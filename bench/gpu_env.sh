# Environment for running zerokit binaries on the GPU machines (../shared/GPU.md): the machine's
# CUDA-enabled libtorch 2.11 replaces the CPU-linked one, and NCCL comes from the same venv.
TL=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
NCCL_DIR=$(dirname "$(find "$(dirname "$(dirname "$TL")")" -name 'libnccl.so*' | head -1)")
export LD_LIBRARY_PATH="$TL:$TL/../../nvidia/cu13/lib:$NCCL_DIR:${LD_LIBRARY_PATH:-}"
# NVLink multicast can take a shared host's GPUs down: keep it off everywhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# random_tokens DIR [VOCAB]: train.bin (4M) and val.bin (200K) of uniform token ids below VOCAB
# (GPT-2's 50257 unless given), fixed seed: the benchmarks' data, so that every peer sees the same
# distribution.
random_tokens() {
  python3 - "$1" "${2:-50257}" <<'PY'
import sys, os, numpy as np
d, vocab = sys.argv[1], int(sys.argv[2]); os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (("train", 4_000_000), ("val", 200_000)):
    rng.integers(0, vocab, n, dtype=np.uint16).tofile(f"{d}/{split}.bin")
PY
}

# install_deepspeed: DeepSpeed 0.19.8 and its pure-Python dependencies from the wheels carried in
# .carry/whl (GPU.md), into /tmp/site, without JIT-compiled ops; exports PYTHONPATH.
install_deepspeed() {
  if [ -d .carry/whl ] && ! PYTHONPATH=/tmp/site python3 -c 'import deepspeed' 2>/dev/null; then
    local build; build=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl
    (cd "$build" && tar xzf "$OLDPWD"/.carry/whl/deepspeed-*.tar.gz && cd deepspeed-* &&
      DS_BUILD_OPS=0 PYTHONPATH=/tmp/site python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$build/dsw" . &&
      python3 -m pip install -q --no-index --no-deps --target /tmp/site "$build"/dsw/*.whl)
    rm -rf "$build"
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

# with_peak CMD...: runs CMD while sampling GPU 0's used memory every 100 ms (nvidia-smi); sets
# PEAK (GiB) and RC. Needs $work (the calling script's scratch folder).
with_peak() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$work/mem" &
  local smi=$!
  "$@"; RC=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  PEAK=$(awk 'BEGIN{m=0}{if($1>m)m=$1}END{printf "%.2f", m/1024}' "$work/mem")
}

# install_hf: transformers and what it imports, from the wheels in .carry/whl-hf
# (tools/carry_hf_wheels.sh), into /tmp/site-hf when the machine's Python lacks it; exports
# PYTHONPATH, and PATH for the carried ninja.
install_hf() {
  if ! python3 -c 'import transformers' 2>/dev/null; then
    if [ ! -d .carry/whl-hf ]; then
      echo "transformers is not installed and .carry/whl-hf is missing (tools/carry_hf_wheels.sh)" >&2
      return 1
    fi
    [ -d /tmp/site-hf/transformers ] ||
      python3 -m pip install -q --no-index --no-deps --target /tmp/site-hf .carry/whl-hf/*.whl
    export PYTHONPATH=/tmp/site-hf${PYTHONPATH:+:$PYTHONPATH}
  fi
  command -v ninja >/dev/null || export PATH="$PATH:/tmp/site-hf/bin"
  python3 -c 'import transformers; print("transformers", transformers.__version__)' >&2
}
