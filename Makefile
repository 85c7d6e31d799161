# Entry points: `make serve` (sets up .venv, serves the default model on 127.0.0.1:8000, OpenAI-compatible),
# `make generate` (prints a continuation from the default model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve generate test setup clean

$(STAMP): requirements.lock requirements-test.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(PY) -m dsv4jax.serve --host 127.0.0.1 --port 8000

generate: $(STAMP)
	$(PY) -m dsv4jax.generate --prompt "def fibonacci(n):" --max-new-tokens 32

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests  # two workers, a test file per worker at a time (module fixtures)

clean:
	rm -rf $(VENV)
