# zerokit: `make prepare train` runs the main job, `make test` the test suite.
SHELL := bash
CARGO ?= cargo
# Everything (binaries and tests) builds in the release profile so libtorch's bindings compile once.
export LIBTORCH := $(CURDIR)/.deps/libtorch
BIN := target/release

.PHONY: all setup build prepare train test pyenv
all: build

setup:
	@bash tools/setup.sh

build: setup
	$(CARGO) build --release --bins

# Tokenize the shipped Shakespeare text into nanoGPT-compatible train.bin/val.bin.
prepare: build
	$(BIN)/prepare data/tinyshakespeare.txt --out out/shakespeare --force

test: setup
	$(CARGO) test --release

# The Python reference environment for tools/ (fixture generators, peer benchmarks).
pyenv:
	@bash tools/pyenv.sh

# Tokenizer throughput against OpenAI's tiktoken at 1 and all threads (docs/prepare.md records it).
# BENCH_ARGS="--memory-gb 4" also measures peak memory on a generated 4 GB corpus.
.PHONY: bench-prepare
bench-prepare: build pyenv
	.deps/py/bin/python tools/bench_prepare.py --bin $(BIN)/prepare $(BENCH_ARGS)
