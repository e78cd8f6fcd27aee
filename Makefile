# Shortcuts for dev.py, which needs nothing but Python (the README's Quick start uses it directly).
PYTHON ?= python3

.PHONY: up test lint bench soak clean

up:
	$(PYTHON) dev.py up $(SPEC)

test:
	$(PYTHON) dev.py test $(PYTEST_ARGS)

lint:
	$(PYTHON) dev.py lint

bench:
	$(PYTHON) dev.py bench

soak:
	$(PYTHON) dev.py soak $(N)

clean:
	rm -rf .venv *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
