# make install   create .venv, install pinned requirements, build Horovod (cached)
# make test      install if needed, run the whole test suite
# make demo      install if needed, run the whole pipeline on the mini benchmark
# make bench     install if needed, measure speed, write BENCHMARKS.md
# make gpu-check on a GPU machine: the gpu tests (CUDA = CPU) and a timing of each stage, one table, < 5 min
.PHONY: install test demo bench gpu-check clean-venv

VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

install:
	bash scripts/install.sh
	@touch $(INSTALLED)

# re-run the (idempotent, fast when done) installer whenever the environment is
# missing or the requirements or installer changed
$(INSTALLED): requirements.txt scripts/install.sh
	bash scripts/install.sh
	@touch $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest -q tests

demo: $(INSTALLED)
	$(PY) demo/run_demo.py --out demo_output

bench: $(INSTALLED)
	$(PY) bench/run_bench.py --out BENCHMARKS.md --json bench/results.json

# @: the script's own output only (one line where there is no GPU)
gpu-check: $(INSTALLED)
	@$(PY) bench/gpu_check.py

clean-venv:
	rm -rf $(VENV)
