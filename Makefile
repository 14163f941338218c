# Two commands, each self-sufficient: `make demo` and `make test` create (or reuse) .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (for the parity tests and the PyTorch baseline only). Installed before the
# project so that the `test` extra's `torch>=2.1` is already satisfied and pip never pulls a
# multi-GB CUDA build. On a GPU machine set TORCH_SPEC to whatever torch you want.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.distil_jax-installed
WORKDIR ?= runs/demo

.PHONY: demo test env clean-demo

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# The offline demo: trains a small teacher on the Python standard library's docstrings (cached by
# its recipe in ~/.cache/distil_jax, or $DISTIL_JAX_CACHE), then distills a student from it with
# the reference objective and prints a table.
demo: $(STAMP)
	$(VENV)/bin/python -m distil_jax.train --config configs/tiny.py --workdir $(WORKDIR) \
		|| { echo "(a demo from an older distil_jax? 'make clean-demo' starts it afresh)"; exit 1; }

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto --dist loadfile

clean-demo:
	rm -rf $(WORKDIR)
