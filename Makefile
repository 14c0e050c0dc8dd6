# The two commands a newcomer needs: `make demo` and `make test`. Both do their own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= localcluster,operator,train,merge,cli,dev
STAMP := $(VENV)/.installed-$(shell echo '$(EXTRAS)' | tr ',' '-')

.PHONY: help venv binaries up down env status demo lint unit cluster test generate clean \
	image-tools images images-lock images-reproduce test-images

help:
	@echo "make demo    bring up the local cluster and S3 server, run a job, then train and merge contributions"
	@echo "make test    lint, type-check, unit tests, then cluster tests (builds what it needs)"
	@echo "make up|down|env|status   drive the local cluster by hand"
	@echo "make generate   rewrite the CRD reference, the dashboard and the alerts (tools/)"
	@echo "make images     build the operator, trainer and merger OCI images into build/images"
	@echo "make test-images   the images in container mode: helm install, train, merge (before a release)"

# The virtual environment is rebuilt only when pyproject.toml changes; pip keeps its own cache.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

binaries: venv
	$(BIN)/medforge localcluster build

up: venv
	$(BIN)/medforge localcluster up

down: venv
	$(BIN)/medforge localcluster down

env: venv
	@$(BIN)/medforge localcluster env

status: venv
	$(BIN)/medforge localcluster status

demo: venv
	$(BIN)/python -m medforge_localcluster.demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Files kept in the repository but written by code (unit tests regenerate and compare).
generate: venv
	$(BIN)/python -m tools.crd_reference
	$(BIN)/python -m tools.monitoring

unit: venv
	$(BIN)/pytest -m unit -q

cluster: venv binaries
	$(BIN)/pytest -m cluster -q

# The Go binaries (about 17 minutes cold) need only the standard library to build, and only the
# cluster phase uses them: they build in the background, in a process group of their own, while
# the virtual environment is made and lint runs. The unit tests wait for them: beside a cold Go
# build, their model-training fixtures ran past their timeouts on two cores. A failure stops
# both.
BUILD_LOG := .build/binaries.log
test:
	@mkdir -p .build
	@setsid -w env PYTHONPATH=localcluster $(PYTHON) -m medforge_localcluster.binaries \
		> $(BUILD_LOG) 2>&1 & bg=$$!; \
	echo "building the cluster binaries in the background (log: $(BUILD_LOG))"; \
	$(MAKE) --no-print-directory lint; rc=$$?; \
	if [ $$rc -ne 0 ]; then kill -- -$$bg 2>/dev/null; wait $$bg; exit $$rc; fi; \
	if ! wait $$bg; then cat $(BUILD_LOG); exit 1; fi; \
	cat $(BUILD_LOG); \
	$(MAKE) --no-print-directory unit cluster

# The images are built without a container engine: mmdebstrap makes the Debian root
# filesystem, runc runs the containers of the image tests. Both are Debian packages.
image-tools:
	@missing=""; for t in mmdebstrap runc; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing from Debian's packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

images: venv image-tools
	$(BIN)/python -m tools.images.build

# Two clean builds from the lock, digests compared (IMAGES="operator" for one image).
images-reproduce: venv image-tools
	$(BIN)/python -m tools.images.reproduce $(IMAGES)

# Record new versions of the images' Debian packages and wheels (then commit tools/images/lock).
images-lock: venv image-tools
	$(BIN)/python -m tools.images.lock

# Slow (the ML images are about 3.3 GB each): not part of `make test`; run before a release.
test-images: images binaries
	$(BIN)/pytest -m images -q -s

clean:
	-$(BIN)/medforge localcluster down
	rm -rf $(VENV) .build .mypy_cache .ruff_cache .pytest_cache
