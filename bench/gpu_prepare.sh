#!/usr/bin/env bash
# `prepare` against OpenAI's tiktoken (issue 2) on a GPU machine's 16 cores (no GPU is used):
# the comparison at 1 to 16 threads on a CORPUS_MB corpus, then zerokit alone on SCALING_MB to
# show how the pipeline scales once the fixed start-up no longer dominates. tiktoken and regex
# come from .carry/whl; the GPT-2 rank files are taken from the prepare binary itself.
# Usage, from the repo root:  bash bench/gpu_prepare.sh
# Writes $OUT/prepare.json (or bench/results/prepare.json).
set -uo pipefail
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
source bench/gpu_env.sh  # prepare links libtorch like the other binaries
python3 -m pip install -q --no-index --no-deps --target /tmp/tk .carry/whl/tiktoken-*.whl .carry/whl/regex-*.whl
PYTHONPATH=/tmp/tk python3 tools/bench_prepare.py --bin .carry/bin/prepare --threads "${THREADS:-1,2,4,8,16}" \
  --corpus-mb "${CORPUS_MB:-128}" --scaling-mb "${SCALING_MB:-1024}" --repeat 2 --json "$OUTDIR/prepare.json"
