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
	$(BIN)/prepare data/tinyshakespeare.txt --out data/shakespeare --force

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

# Coverage-guided fuzzing (docs/fuzzing.md): each cargo-fuzz target for FUZZ_SECS seconds, one
# job (the cores are shared), from the committed corpus fuzz/corpus/<target>, keeping what it
# finds in target/fuzz-corpus/<target>; a crash or a broken oracle stops it and leaves the input
# in fuzz/artifacts/<target>. The suite's own bounded run is tests/fuzz.rs (ZEROKIT_FUZZ_SECS).
# cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP lets the stable toolchain take them.
FUZZ_SECS ?= 60
FUZZ_TARGETS ?= torch_zip torch_pickle deepspeed safetensors manifest
FUZZ := env -u CARGO_TARGET_DIR RUSTC_BOOTSTRAP=1 $(CARGO) fuzz
.PHONY: fuzz
fuzz: setup
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; \
	  $(FUZZ) run -s none --codegen-units 16 $$t target/fuzz-corpus/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECS) -timeout=10 \
	    -rss_limit_mb=2048 -jobs=1 -workers=1 -print_final_stats=1 || exit 1; \
	  cat fuzz-0.log; rm -f fuzz-0.log; \
	  if ls fuzz/artifacts/$$t/* >/dev/null 2>&1; then echo "fuzz $$t: failing inputs in fuzz/artifacts/$$t"; exit 1; fi; \
	done
