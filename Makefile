# Set-up is two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench alpha-study clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	# bitsandbytes (adamw8bit) stays out of site-packages: diffusers imports it at start-up when
	# installed (about 1 s). The tests take it from here; users who want adamw8bit pip install it.
	# torchao (model.quantize) likewise: diffusers imports it at start-up when installed (~0.45 s).
	$(PY) -m pip install -q --no-deps --target $(VENV)/extras bitsandbytes==0.50.2 torchao==0.18.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/aitk demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/overhead.py
	HF_HUB_OFFLINE=1 $(PY) bench/data.py
	HF_HUB_OFFLINE=1 $(PY) bench/ui_metrics.py

# Not part of `bench`: about 8 minutes on 2 CPU cores (10 training runs of 900 steps).
alpha-study: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) bench/alpha_study.py

clean:
	rm -rf $(VENV) output .cache
