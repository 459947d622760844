# make install: .venv with imp (editable) and the test extra. llama-cpp-python compiles for the
# host CPU (x86 or ARM) on first install; pip caches the built wheel, so later installs are quick.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: install test test-arm bench soak demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# make test-arm: imp on aarch64 under emulation (qemu-user), at the CPU feature levels in ARM_LEVELS
# (default neon,i8mm; "all" adds dotprod). The first run sets the machine up into .arm/ (needs root:
# apt-get, binfmt_misc, chroot; ~10 minutes: an arm64 Debian root, llama.cpp cross-compiled, wheels),
# later runs reuse it. tests/arm/arm_suite.py says what is checked.
ARM_LEVELS ?= neon,i8mm
test-arm: install
	PYTHON=$(abspath $(VENV))/bin/python tests/arm/setup.sh
	ARM_LEVELS=$(ARM_LEVELS) $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/arm/arm_suite.py $(PYTEST_ARGS)

# make bench: imp on full-size synthetic Imp models (real shapes, random weights): the 3B at 384 and
# 196 px, the 4B (Phi-3) and 2B (Qwen1.5) at 384 px (--families phi2,phi3,qwen2):
# a second question about an image in a new process (prompt cache) against the first, and against
# llama.cpp's own llama-mtmd-cli (built once from the llama-cpp-python sdist into bench/cache/).
# The first run writes the models to bench/cache/ (~7-11 GB each, a few minutes each) and builds the CLI.
# Results: bench/results/latest.md and a raw JSON. Options: BENCH_ARGS="--runs 1 --skip llava,...".
bench: install
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/mtmd_cli_check.py
	$(MAKE) soak

# make soak: imp serve under several clients for >= 10 min and >= 1000 requests on the tiny model
# (bench/soak.py: errors, time to first token, RSS / open files / threads), then 10 min on the
# full-size 196-px model when bench/cache holds it. Reports: bench/results/soak-*.json.
FULL_SOAK_MODEL := bench/cache/imp-synth-196/gguf/imp-synth-196-Q4_K_M.gguf
soak: install
	$(VENV)/bin/python bench/soak.py --json bench/results/soak-tiny.json $(SOAK_ARGS)
	test ! -f $(FULL_SOAK_MODEL) || $(VENV)/bin/python bench/soak.py --model $(FULL_SOAK_MODEL) \
		--minutes 10 --requests 30 --clients 2 --json bench/results/soak-full.json

# The README's first command, on a picture shipped in the repo (samples/make_demo.py drew it).
demo: install
	$(VENV)/bin/imp ask samples/demo.jpg "What is in this picture?"

clean:
	rm -rf $(VENV) build *.egg-info .arm
