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

.PHONY: run test venv bench soak clean testdeps internet-demo

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

# The web UI tests drive a real Chromium, the mDNS and emulated-internet tests run inside
# network namespaces (`ip netns`, `iptables` NAT), the interop tests run a js-libp2p peer
# on Node.js (18.18 or later; Debian 12's apt package is 18.20); as root on Debian/Ubuntu
# all of them are installed here, elsewhere those tests skip and say why.
testdeps:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		pkgs=""; \
		command -v chromedriver >/dev/null || pkgs="$$pkgs chromium chromium-driver"; \
		command -v ip >/dev/null || pkgs="$$pkgs iproute2"; \
		command -v iptables >/dev/null || pkgs="$$pkgs iptables"; \
		{ command -v node && command -v npm; } >/dev/null || pkgs="$$pkgs nodejs npm"; \
		if [ -n "$$pkgs" ]; then echo "installing$$pkgs (web UI, namespace and interop tests)"; \
			apt-get update -qq && apt-get install -y -qq $$pkgs >/dev/null; fi; fi

# The interop peer's npm packages, exactly as interop/package-lock.json locks them.
# After testdeps (which may install npm), but testdeps alone does not make them stale.
interop/node_modules: interop/package.json interop/package-lock.json | testdeps
	@if command -v npm >/dev/null; then \
		echo "installing the interop peer's npm packages (npm ci)"; \
		cd interop && npm ci --no-audit --no-fund --loglevel=error && touch node_modules; \
	else echo "npm not found: the js-libp2p interop tests will skip"; fi

# The import rules first (pyproject.toml, [tool.importlinter]): a broken door fails the run.
test: $(STAMP) testdeps interop/node_modules
	$(BIN)/lint-imports --no-cache
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadfile -q $(ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/shardmesh bench $(ARGS)

# A public node, a node at home behind a NAT and a gateway in a second home, on an
# emulated internet of network namespaces (as root): see shardmesh/tools/internet_demo.py
# (DEMO_MODEL=PATH for another model than a cached tiny Llama).
internet-demo: $(STAMP) testdeps
	$(BIN)/python -m shardmesh.tools.internet_demo $(DEMO_MODEL)

# A churning swarm on loopback under steady traffic, every answer checked (not part of
# `make test`): SOAK_MINUTES long (default 20). See shardmesh/tools/soak.py.
SOAK_MINUTES ?= 20
soak: $(STAMP)
	HF_HUB_OFFLINE=1 SOAK_MINUTES=$(SOAK_MINUTES) $(BIN)/python -m shardmesh.tools.soak

clean:
	rm -rf $(VENV) .pytest_cache interop/node_modules
