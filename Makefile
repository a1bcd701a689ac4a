# Two set-up commands: `make demo` runs the default pipeline, `make test` runs lint + tests.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

export HF_HUB_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test lint ui flow serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, from this machine's local wheels (never uv/poetry: several GB of downloads)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	# torchattacks pins an old requests that conflicts with prefect/mlflow/dvc; its code needs none of it
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1
	# robustbench's model zoo (a backbone source); its own pins clash with timm/open_clip, and it
	# must come after torchattacks, whose wheel carries an old robustbench copy
	$(BIN)/python -m pip install -q --no-deps robustbench==1.1.1 geotorch==0.4.0 torchdiffeq==0.2.5 \
		gdown==5.1.0 beautifulsoup4==4.15.0 soupsieve==4.1.2
	touch $(STAMP)

install: $(STAMP)
	@# headless Chromium for the MLflow UI test (tests/test_mlflow_ui.py); Playwright drives this
	@# executable, no browser is downloaded. Skipped when present; as root (CI) apt installs it.
	@command -v chromium >/dev/null || if [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "chromium is missing: sudo apt-get install -y chromium (else the MLflow UI test skips)"; fi

demo: install
	vpt-robust data
	vpt-robust repro
	vpt-robust show

test: install
	ruff check .
	ruff format --check .
	pytest

ui: install
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

flow: install
	python -m flows.pipeline

serve: install
	vpt-robust serve

clean:
	rm -rf outputs metrics mlflow.db mlartifacts
