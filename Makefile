# Thin verbs; each bootstraps .venv when needed. CI calls `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast lint format docs docs-serve bench clean \
	wheelhouse wheelhouse-full image image-full

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: install
	$(BIN)/digitflow serve

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks docs/hooks
	$(BIN)/ruff format --check src tests benchmarks docs/hooks
	$(BIN)/mypy

format: install
	$(BIN)/ruff format src tests benchmarks docs/hooks
	$(BIN)/ruff check --fix src tests benchmarks docs/hooks

# The docs site (mkdocs.yml, docs/): strict, so a broken link, a page missing from the nav or a
# setting without a description fails the build. Offline: no web fonts, no fetching plugin.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: install
	$(BIN)/python -m benchmarks.run

# Container images: every wheel is collected on the host with the host's own pip settings, pinned
# to the versions the tests ran with, so the image build needs no index (air-gapped clusters too).
# `image` (slim): serving and pulling only, no torch and no full MLflow; it serves the model.onnx
# that `digitflow train` / `digitflow export` log beside model.pt. `image-full`: with the `train`
# extra, so it also serves a bare model.pt (exported at start) and can train.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= digitflow:$(VERSION)
IMAGE_FULL ?= digitflow:$(VERSION)-full
BASE_IMAGE ?= python:3.11-slim
WHEELHOUSE := build/wheelhouse
GIT_REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
DOCKER ?= docker
# Wheels stamped with the last commit's time, so the same source gives the same bytes (and layers).
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 315532800)
export SOURCE_DATE_EPOCH

# $(call collect,<folder>,<requirement>): the requirement's wheels into <folder>/deps, digitflow's
# own wheel into <folder>/app (its own layer: a code change leaves the deps layer cached).
define collect
rm -rf $(1)
mkdir -p $(1)/deps $(1)/app
$(BIN)/python -m pip freeze --exclude-editable > $(1)/constraints.txt
$(BIN)/python -m pip wheel --quiet --wheel-dir $(1)/deps --constraint $(1)/constraints.txt '$(2)'
mv $(1)/deps/digitflow-*.whl $(1)/app/
endef

wheelhouse: install
	$(call collect,$(WHEELHOUSE)/slim,.)

wheelhouse-full: install
	$(call collect,$(WHEELHOUSE)/full,.[train])

DOCKER_BUILD = $(DOCKER) build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(VERSION) \
	--build-arg GIT_REVISION=$(GIT_REVISION)

image: wheelhouse
	$(DOCKER_BUILD) --build-arg WHEELHOUSE=$(WHEELHOUSE)/slim --tag $(IMAGE) .

image-full: wheelhouse-full
	$(DOCKER_BUILD) --build-arg WHEELHOUSE=$(WHEELHOUSE)/full --tag $(IMAGE_FULL) .

clean:
	rm -rf $(VENV) build site .pytest_cache .ruff_cache .mypy_cache
