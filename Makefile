# The two commands a newcomer runs (as root, on Debian 12): `make demo` and `make test`.
# Both install what they need first (lab/setup.sh is idempotent).
PY := .venv/bin/python
SHELL := /bin/bash

.PHONY: setup test unit integration demo lint lab-up lab-down bench clean

setup:
	@bash lab/setup.sh

test: setup
	$(PY) -m pytest -q tests

unit: setup
	$(PY) -m pytest -q tests -m "not integration"

integration: setup
	$(PY) -m pytest -q tests -m integration

demo: setup
	$(PY) -m lab.demo_resolver

lint: setup
	.venv/bin/ruff check resolver autosp lab tests bench
	.venv/bin/mypy resolver autosp

lab-up: setup
	$(PY) -m lab up

lab-down: setup
	$(PY) -m lab down

clean:
	-$(PY) -m lab down
	rm -rf .venv .lab
