# The two commands: `make demo` (main job: nnsam_demo) and `make test` (the full suite, what CI runs). Both create
# or refresh the virtual environment. `make quick`: the quick tier (pure helpers, small engine tests, < 2 min);
# `make lint`: flake8 (settings in setup.cfg). `make example` runs nnsam_refine on image/mask files.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo_output

.PHONY: demo example test quick lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nnsam_demo -o $(DEMO)

example: $(STAMP)
	$(PY) -m nnunet_sam.demo.refine_example $(DEMO)/example
	$(VENV)/bin/nnsam_refine -i $(DEMO)/example/imagesTr -m $(DEMO)/example/weak_masks \
		-o $(DEMO)/example/refined --gt $(DEMO)/example/labelsTr --overlays -device cpu

test: $(STAMP)
	nnUNet_n_proc_DA=1 nnUNet_def_n_proc=2 $(PY) -m pytest -q

quick: $(STAMP)
	nnUNet_n_proc_DA=1 nnUNet_def_n_proc=2 $(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m flake8

clean:
	rm -rf $(DEMO) .pytest_cache
