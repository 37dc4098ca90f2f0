# The two commands: `make demo` (main job) and `make test`. Both create/refresh the virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo_output

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nnunet_sam.demo.refine_example $(DEMO)/example
	$(VENV)/bin/nnsam_refine -i $(DEMO)/example/imagesTr -m $(DEMO)/example/weak_masks \
		-o $(DEMO)/example/refined --gt $(DEMO)/example/labelsTr --overlays -device cpu

test: $(STAMP)
	nnUNet_n_proc_DA=1 nnUNet_def_n_proc=2 $(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
