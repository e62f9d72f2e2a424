# `make run` and `make test` are the two commands a fresh machine needs; both create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
EXP ?= smoke

.PHONY: setup run test test-fast bench gpu-wheels clean-results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch/torchvision pinned as a pair: on the project's machines they install from local
	# files and run on the CPU (a newer torchvision beside torch 2.13 fails to import).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[slurm]"
	touch $(STAMP)

setup: $(STAMP)

WORKDIR ?= .
TARGETS ?=
# --config takes every word after it, so targets go first.
SNAKEMAKE_OPTS = --snakefile $(CURDIR)/Snakefile --directory $(WORKDIR) \
	--profile $(CURDIR)/workflow/profiles/local --cores $(CORES) --config experiments=[$(EXP)]

# The embedded default experiment, end to end. A killed run is recovered by running
# `make run` again, with no manual clean-up: a Snakemake killed with SIGKILL leaves its
# lock behind, which workflow/unlock_stale.sh releases unless a Snakemake still runs in
# WORKDIR, and --rerun-incomplete (in the profile) redoes the job that was cut short (its stage
# resumes from its own checkpoint).
run: setup
	@bash workflow/unlock_stale.sh $(WORKDIR) $(BIN)/snakemake $(SNAKEMAKE_OPTS)
	$(BIN)/snakemake $(TARGETS) $(SNAKEMAKE_OPTS)

test: setup
	$(BIN)/python -m pytest -ra

test-fast: setup
	$(BIN)/python -m pytest -ra -m "not slow"

bench: setup
	$(BIN)/python benchmarks/bench_tokenizer.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_sampling.py --depth-sweep
	$(BIN)/python benchmarks/bench_metrics.py

# What benchmarks/gpu_checks.py needs on the GPU machine beyond its own Python 3.12 (torch,
# numpy, yaml are there; dnd.config's jsonschema is not), at this venv's versions. The device
# command in benchmarks/RESULTS.md carries .whl/ and installs them.
GPU_WHEELS = jsonschema|jsonschema-specifications|referencing|rpds-py
gpu-wheels: setup
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl \
		$$($(BIN)/python -m pip freeze | grep -iE '^($(GPU_WHEELS))==')

clean-results:
	rm -rf results/$(EXP) reports/$(EXP)/report.html reports/$(EXP)/report.pdf
