# The two commands a new user runs (see README.md):
#   make demo   set up .venv, then run the whole pipeline on the built-in dataset (CPU, minutes)
#   make test   set up .venv, then run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.virtex-d2-installed
PYTEST_ARGS ?=

.PHONY: setup test-deps test demo lint clean-demo

setup: $(STAMP)

# Re-run the (idempotent) setup whenever what it installs changes.
$(STAMP): setup.py scripts/setup_env.sh scripts/apt_install.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

# System packages the tests need beyond Python: headless Chromium opens the attention page; a
# one-node Slurm runs the `slurm` tests (tests/engine/test_cluster_launch.py). Where Slurm cannot
# be installed (not root, no apt-get) those tests are skipped, saying why; as root with apt-get a
# failure to start it stops here.
test-deps:
	bash scripts/apt_install.sh chromium sh -c 'command -v chromium || command -v chromium-browser'
	bash scripts/slurm/local_cluster.sh start || { [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; }

test: setup test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff check pretrain detectron2_ext virtex_d2 tools tests

clean-demo:
	rm -rf outputs/demo datasets/builtin
