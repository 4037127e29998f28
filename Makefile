# zerokit: `make prepare train` runs the main job, `make test` the test suite.
SHELL := bash
CARGO ?= cargo
# Everything (binaries and tests) builds in the release profile so libtorch's bindings compile once.
export LIBTORCH := $(CURDIR)/.deps/libtorch
BIN := target/release

# Ranks for `make train`: one per visible GPU (1 on CPU).
NPROC ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | wc -l); [ "$$n" -gt 0 ] && echo $$n || echo 1)
CONFIG ?= configs/shakespeare.toml

.PHONY: all setup build prepare train test pyenv lint
all: build

setup:
	@bash tools/setup.sh

build: setup
	$(CARGO) build --release --bins

# Tokenize the shipped Shakespeare text into nanoGPT-compatible train.bin/val.bin.
prepare: build
	$(BIN)/prepare data/tinyshakespeare.txt --out out/shakespeare --force

# Train on the prepared data with the default configuration.
train: build
	$(BIN)/train $(CONFIG) --nproc-per-node $(NPROC)

# The Python reference environment is part of the suite: interop tests load zerokit's output in
# transformers.
test: setup pyenv
	$(CARGO) test --release

# Formatting (rustfmt.toml) and clippy, as left by every change.
lint: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings

# The Python reference environment for tools/ (fixture generators, peer benchmarks).
pyenv:
	@bash tools/pyenv.sh

# Tokenizer throughput against OpenAI's tiktoken at 1 and all threads (docs/prepare.md records it).
# BENCH_ARGS="--memory-gb 4" also measures peak memory on a generated 4 GB corpus.
.PHONY: bench-prepare
bench-prepare: build pyenv
	.deps/py/bin/python tools/bench_prepare.py --bin $(BIN)/prepare $(BENCH_ARGS)
