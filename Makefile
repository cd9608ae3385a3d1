# Set-up is two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench alpha-study clean ui e2e-deps fuzz

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

# The interop tests record each check in INTEROP_RESULTS (started empty, so the results are this
# run's); tests/test_interop_table.py then checks docs/lora-formats.md's table against them, so it
# runs after the rest of the suite.
INTEROP_RESULTS ?= $(CURDIR)/.cache/interop-results.json
TEST_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 AITK_E2E_REQUIRED=1 AITK_INTEROP_RESULTS=$(INTEROP_RESULTS)

# pytest-xdist: one worker per core (at most 4), each test file on one worker (module fixtures are
# built once); each worker trains on one thread (OMP_NUM_THREADS=1).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP) ui e2e-deps
	rm -f $(INTEROP_RESULTS)
	$(TEST_ENV) $(PY) -m pytest tests --ignore=tests/test_interop_table.py -n $(TEST_WORKERS) --dist loadfile -rs
	$(TEST_ENV) $(PY) -m pytest tests/test_interop_table.py

# Property-based fuzzing (tests/test_fuzz_*.py) with ten times the examples `make test` runs, drawn
# at random each time (make test's are derandomized); a failure prints the blob that replays it.
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 AITK_FUZZ_SCALE=10 $(PY) -m pytest tests/test_fuzz_jobfiles.py tests/test_fuzz_datasets.py tests/test_fuzz_api.py

# The web app (ui/: React + TypeScript + Vite), built into ui/dist, which `aitk ui` serves. Rebuilt
# only when a source, package.json or package-lock.json is newer than the last build (stamp files).
# Needs Node.js >= 20.19 and npm; dependencies come from package-lock.json (`npm ci`).
NPM ?= npm
UI_SOURCES := $(shell find ui/src -type f 2>/dev/null) ui/index.html ui/tsconfig.json ui/vite.config.ts
UI_MODULES := ui/node_modules/.aitk-installed
UI_STAMP := ui/dist/.aitk-built

ui: $(UI_STAMP)

$(UI_MODULES): ui/package.json ui/package-lock.json
	@command -v $(NPM) >/dev/null 2>&1 || { echo "npm not found: install Node.js 20.19 or newer to build the web app (ui/)"; exit 1; }
	cd ui && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

$(UI_STAMP): $(UI_MODULES) $(UI_SOURCES)
	cd ui && $(NPM) run build --silent
	touch $@

# What the browser tests (tests/e2e) need besides the venv (playwright is in requirements.txt):
# Debian's chromium, installed only when no chromium is on the PATH.
e2e-deps: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests (tests/e2e)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q chromium >/dev/null || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/overhead.py
	HF_HUB_OFFLINE=1 $(PY) bench/data.py
	HF_HUB_OFFLINE=1 $(PY) bench/ui_metrics.py

# Not part of `bench` or `test`: about 20 minutes on 2 CPU cores (200 tiny jobs through `aitk ui`'s
# worker: complete, stop, kill -9 of a run, of the worker, server restarts, deletes, two at once).
.PHONY: soak
soak: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/soak.py --jobs 200

# Not part of `bench`: about 8 minutes on 2 CPU cores (10 training runs of 900 steps).
alpha-study: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) bench/alpha_study.py

clean:
	rm -rf $(VENV) output .cache ui/dist ui/node_modules

# Not part of `bench` or `test`: needs a CUDA GPU. Real-size SD 1.5, SDXL, FLUX.1 dev and WAN 2.2
# (random init, no download) at each memory setting: s/step, MFU, peak memory beside the plan.
# Budgeted to end within 9 minutes (--max-seconds 540); writes bench/results/gpu_bench.{json,md} (docs/memory.md, "GPU benchmark").
.PHONY: bench-gpu
bench-gpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/gpu.py

# The CUDA image of aitk with the web UI (docker/Dockerfile; run it with docker/compose.yaml, or as a
# RunPod template: docs/cloud.md). Needs a docker daemon and the network; not part of `make test`,
# whose tests/test_docker.py lints the files and builds the image only where a daemon can pull.
# DOCKER_BUILD_ARGS, e.g. "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128".
DOCKER ?= docker
DOCKER_IMAGE ?= aitk:latest
DOCKER_BUILD_ARGS ?=
.PHONY: docker
docker:
	$(DOCKER) build -f docker/Dockerfile -t $(DOCKER_IMAGE) $(DOCKER_BUILD_ARGS) .
