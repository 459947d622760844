# make install: .venv with imp (editable) and the test extra. llama-cpp-python compiles for the
# host CPU (x86 or ARM) on first install; pip caches the built wheel, so later installs are quick.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: install test bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# make bench: imp convert / imp ask speed and memory on a full-size synthetic Imp-3B (real shapes,
# random weights) against llama-cpp-python's Llava15ChatHandler and transformers float32.
# ~30 min on 2 cores (+5 min the first time: the model is written once to bench/cache/, ~17 GB).
# Results: bench/results/latest.md, latest.png and a raw JSON. Options: BENCH_ARGS="--runs 1 ...".
bench: install
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# The README's first command, on a picture shipped in the repo (samples/make_demo.py drew it).
demo: install
	$(VENV)/bin/imp ask samples/demo.jpg "What is in this picture?"

clean:
	rm -rf $(VENV) build *.egg-info
