# `make test` and `make demo` set everything up on a fresh machine: they create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# XLA on the CPU frees and re-allocates its large temporaries every step; glibc serves each with a fresh
# mmap, paid in 4 KiB page faults (a third of the demo's time). Huge pages for malloc cut the faults ~70x.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Two workers (pytest-xdist), a file each at a time: most tests wait on XLA compiling small programs.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not slow" tests

demo: $(STAMP)
	$(PY) -m train.demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo_out
