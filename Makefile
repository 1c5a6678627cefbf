# Two commands on a fresh machine: `make run` and `make test`. Each builds the venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch goes in first and pinned: the CPU wheel is on disk, an unpinned torch pulls a CUDA build.
TORCH  ?= torch==2.13.0
MODEL  ?= Qwen/Qwen3-0.6B
ARGS   ?=
JOBS   ?= auto

.PHONY: run test venv bench clean testdeps

$(STAMP): pyproject.toml
	@command -v gcc >/dev/null || { echo "gcc is needed to build fastecdsa (py-libp2p)"; exit 1; }
	@if [ ! -e /usr/include/gmp.h ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing libgmp-dev (py-libp2p builds fastecdsa against it)"; \
		apt-get update -qq && apt-get install -y -qq libgmp-dev >/dev/null; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,mlx]"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/shardmesh run --model $(MODEL) $(ARGS)

# The web UI tests drive a real Chromium, the mDNS test runs inside a network namespace
# (`ip netns`); as root on Debian/Ubuntu both are installed here, elsewhere those tests
# skip and say why.
testdeps:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		pkgs=""; \
		command -v chromedriver >/dev/null || pkgs="$$pkgs chromium chromium-driver"; \
		command -v ip >/dev/null || pkgs="$$pkgs iproute2"; \
		if [ -n "$$pkgs" ]; then echo "installing$$pkgs (web UI and mDNS tests)"; \
			apt-get update -qq && apt-get install -y -qq $$pkgs >/dev/null; fi; fi

test: $(STAMP) testdeps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadfile -q $(ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/shardmesh bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
