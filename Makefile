# `make serve` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
HOST ?= 127.0.0.1

.PHONY: serve test install-serve install-test install-browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per extras set: re-installs when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(PY)
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

test: install-test install-browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) model-repository test-artifacts
