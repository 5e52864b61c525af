# heartseg: `make demo` runs the shipped model on the bundled example scan; `make test` runs the tests.
# Each creates its own virtual environment: the demo's holds only the lean runtime (no PyTorch).
PYTHON ?= python3
DEMO_VENV := .venv-demo
TEST_VENV := .venv
DATA ?= ../shared/data/Task02_Heart

.PHONY: demo test bench clean

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q --upgrade pip
	$(DEMO_VENV)/bin/pip install -q -e '.[cpu,viz]'
	touch $@

$(TEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --upgrade pip
	# PyTorch 2.13.0: on the project's machines pip takes its CPU wheel from local disk (a plain
	# `torch` would pull a multi-GB CUDA build); elsewhere add PyTorch's CPU index (see README.md).
	$(TEST_VENV)/bin/pip install -q torch==2.13.0
	$(TEST_VENV)/bin/pip install -q -e '.[cpu,train,dev]'
	touch $@

demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/heartseg-infer examples/la_029_crop.nii.gz -o demo-output --overwrite \
		--label examples/la_029_crop_label.nii.gz --overlay
	@echo "Wrote demo-output/la_029_crop_mask.nii.gz and demo-output/la_029_crop_overlay.png."
	@echo "Note: la_029 is a held-out case of fold 0. The shipped model is the fold-0 model: it never trained"
	@echo "on la_029, but its threshold was calibrated on fold 0's held-out cases, la_029 among them"
	@echo "(models/MODEL_CARD.md)."

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest -q

bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest benchmarks -q -m benchmark_suite --benchmark-only

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) demo-output .pytest_cache
