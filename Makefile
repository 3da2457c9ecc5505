.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/visa demo

test:
	@bash scripts/setup.sh --with-browser
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/python -m pytest -q
