# `make serve` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
HOST ?= 127.0.0.1

.PHONY: serve test install-serve install-test install-browser install-redis clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The exporter needs torch only to trace models on the CPU. PyTorch's CPU-only index has wheels of a few
# hundred MB; the default index has the CUDA build (torch + NVIDIA libraries + triton, about 6 GB
# installed). Use the CPU index when it answers within seconds; otherwise (offline mirrors, no route
# to it) fall back to whatever torch the default index has. TORCH_INDEX= (empty) skips the attempt.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PINS := $(shell sed -n 's/^ *"\(torch\(vision\)\?==[^"]*\)",.*/\1/p' pyproject.toml | sort -u)

$(VENV)/.torch: pyproject.toml | $(PY)
	@if [ -n "$(TORCH_INDEX)" ] && $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
		echo "installing CPU-only $(TORCH_PINS) from $(TORCH_INDEX)"; \
		$(PY) -m pip install --quiet --timeout 10 --retries 0 --index-url $(TORCH_INDEX) $(TORCH_PINS) \
			|| echo "CPU-only torch failed to install: falling back to the default index"; \
	else \
		echo "$(or $(TORCH_INDEX),the CPU-only torch index) is not reachable: torch comes from the default index"; \
	fi
	touch $@

# One stamp per extras set: re-installs when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch | $(PY)
	$(PY) -m pip install --quiet -e '.[$(subst +,$(comma),$*)]'
	touch $@

comma := ,

install-serve: $(VENV)/.installed-export
install-test: $(VENV)/.installed-export+test

# Exports the default (pretrained) model if the repository lacks it, then serves on $(HOST):$(PORT).
serve: install-serve
	$(PY) -m saikyo models export efficientnet_lite0 --weights imagenet --if-missing
	$(PY) -m saikyo serve --host $(HOST) --port $(PORT)

# The browser tests drive Debian's chromium (Playwright's own browser download needs the internet).
# Installed here when missing and we are root; otherwise those tests skip and say why.
install-browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
			|| echo "could not install chromium: the browser tests will skip"; \
	fi

# The Ray head-restart test keeps the cluster's state in Redis (GCS fault tolerance): Debian's redis-server,
# installed here when missing and we are root; otherwise that test skips and says why. Nothing starts it
# as a service: the test runs its own on loopback.
install-redis:
	@if ! command -v redis-server >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing redis-server for the Ray head-restart test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
			|| echo "could not install redis-server: the head-restart test will skip"; \
	fi

test: install-test install-browser install-redis
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) model-repository test-artifacts
