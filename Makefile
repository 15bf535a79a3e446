# The two Quick start commands (README): `make train` and `make test`.
# Both install what they need into the active Python and build the C++ ops (so the first
# training step does not); neither replaces an installed torch.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: setup train test

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e ".[test]"
	@echo "building hetmem's C++ ops (once, ~20 s; cached for later runs)..."
	@$(PYTHON) -m hetmem env --build > /dev/null

train: setup
	$(PYTHON) -m hetmem train

test: setup
	$(PYTHON) -m pytest -q
