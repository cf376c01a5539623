# Two entry points on a fresh machine with python3 and make:
#   make serve   - build .venv, install everything, run the daemon (ARGS="--workers 2 ...")
#   make test    - same bootstrap, then the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SILERO_VERSION := 6.2.3
# Apt packages the tests use: espeak-ng generates speech when ../shared/audio is absent;
# libportaudio2 + ALSA plugins + jackd2 give sounddevice a real, file-fed, real-time
# capture device (see tests/alsa_device.py).
APT_PACKAGES := espeak-ng libportaudio2 libasound2-plugins jackd2
STAMP := $(VENV)/.installed-$(SILERO_VERSION)

.PHONY: install serve test bench lint clean system-deps

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	# The official wheel carries the model; --no-deps keeps torch out.
	$(BIN)/python -m pip install -q --no-deps silero-vad==$(SILERO_VERSION)
	$(BIN)/python -m engine.models.verify
	touch $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing apt packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "warning: missing apt packages:$$missing (some tests will be skipped)"; fi; \
	fi

serve: install
	$(BIN)/ringserve serve $(ARGS)

test: install
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/ringserve bench $(ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache *.egg-info
