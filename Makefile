# `make test` and `make demo` each build .venv from nothing on a fresh machine, then run.
# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PLVENV := .venv-patternlens
PLSTAMP := $(PLVENV)/.installed

.PHONY: test demo bench clean chromium lint patternlens-venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check -e ".[test,plots,train,sweep]"
	touch $(STAMP)

test: $(STAMP) chromium $(PLSTAMP)
	$(VPY) -m pytest tests -n 2 --dist loadfile

# pattern_lens 0.6 (the sweep's reference) needs transformer-lens<3, transformers<5 and numpy<2, which
# conflict with .venv: it gets its own venv, used by tests/test_sweep.py through subprocesses.
# datasets<4 / pyarrow<18: newer pyarrow wheels need numpy>=2.
$(PLSTAMP):
	$(PY) -m venv $(PLVENV)
	$(PLVENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PLVENV)/bin/python -m pip install -q --disable-pip-version-check pattern-lens==0.6.0 "transformer-lens<3" \
	  "transformers<5" "numpy<2" "datasets<4" "pyarrow<18"
	touch $(PLSTAMP)

patternlens-venv: $(PLSTAMP)

# The report's browser test needs Chromium: install it where we can (root with apt), else it skips.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: chromium not installed; the headless-browser test will skip"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxlens conversion tests benchmarks scripts examples

demo: $(STAMP)
	$(VENV)/bin/jaxlens demo --out demo_out

bench: $(STAMP)
	$(VPY) benchmarks/forward.py

clean:
	rm -rf $(VENV) demo_out
