# The two commands of the README. Both set up .venv first (idempotent: scripts/setup_env.sh).
PY := .venv/bin/python

.PHONY: env demo test
env:
	@bash scripts/setup_env.sh

demo: env
	$(PY) scripts/demo.py

test: env
	$(PY) -m pytest -q -ra
