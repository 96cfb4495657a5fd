# Two entry points for newcomers (see README): `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Qt under a virtual X server: xvfb plus the xcb/EGL/GL libraries PyQt5 loads.
SYSTEM_PACKAGES := xvfb xauth libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri libdbus-1-3 libfontconfig1 \
	libxkbcommon0 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
	libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxcb-xkb1

.PHONY: run test lint venv system-deps clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[testing]"
	touch $@

system-deps:
	@if ! command -v xvfb-run >/dev/null || ! ldconfig -p | grep -q libxcb-cursor; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(SYSTEM_PACKAGES); fi

# napari with the sample and the plugin when there is a display; otherwise the CLI on the sample.
run: venv
	@if [ -n "$$DISPLAY$$WAYLAND_DISPLAY" ]; then \
		$(VENV)/bin/napari sample_data/synthetic_nuclei.tif --with napari-nuclei-unet "Segment nuclei"; \
	else \
		$(VENV)/bin/nuclei-unet segment sample_data/synthetic_nuclei.tif --out results --rle-csv results/nuclei.csv && \
		$(VENV)/bin/nuclei-unet evaluate --truth sample_data/synthetic_nuclei_labels.csv --pred results/nuclei.csv; \
	fi

# The project's ruff config (pyproject.toml): lint, then the formatter's check; both before the tests.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: system-deps venv lint
	xvfb-run -a -s "-screen 0 1280x1024x24" $(PY) -m pytest

clean:
	rm -rf $(VENV) build dist results .pytest_cache
