#!/usr/bin/env bash
# Set up this checkout on a fresh machine: system packages (installed with apt-get on
# Debian/Ubuntu, as root or with sudo; named elsewhere), a virtual environment in .venv, and the
# Python requirements.
#   bash scripts/setup.sh          # what the three commands need
#   bash scripts/setup.sh --dev    # plus test tools: espeak-ng, Chromium, pytest, Playwright
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; [ "${1:-}" = "--dev" ] && dev=1

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
  echo "error: no Python at $python; set PYTHON=/path/to/python3.11 (3.11.4 or newer)" >&2
  exit 2
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11, 4))'; then
  echo "error: Python 3.11.4 or newer is needed (found $("$python" -V 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

pkgs=(ffmpeg)
[ $dev = 1 ] && pkgs+=(espeak-ng chromium chromium-driver)
# Debian and Ubuntu ship venv's pip bootstrap apart from Python (python3.X-venv)
"$python" -c "import ensurepip" 2>/dev/null || pkgs+=("python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
# a package whose program is on PATH is there, however it was installed (Homebrew on macOS has no dpkg)
program() { case $1 in chromium-driver) echo chromedriver ;; *-venv) echo "" ;; *) echo "$1" ;; esac; }
missing=()
for p in "${pkgs[@]}"; do
  prog=$(program "$p")
  if [ -n "$prog" ] && command -v "$prog" >/dev/null; then continue; fi
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing system packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    brew=""
    for p in "${missing[@]}"; do prog=$(program "$p"); if [ -n "$prog" ]; then brew+=" $prog"; fi; done
    echo "please install: ${missing[*]} (no apt-get on this machine: install them with its package" \
         "manager${brew:+, e.g. brew install$brew})" >&2
  fi
fi

if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "installing pip into .venv (made without it, or by a venv that could not finish)"
  .venv/bin/python -m ensurepip --upgrade >/dev/null || {
    echo "error: .venv has no pip and ensurepip cannot add one: install python3-venv (Debian/Ubuntu) or remove .venv" >&2
    exit 2
  }
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# Without a GPU take the CPU build of torch; a CUDA machine gets the default build. A torch older
# than transformers needs (2.6) is replaced.
if ! .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__ < '2.6.0')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "torch>=2.6"
  else
    # PyPI's plain torch is the CUDA build (gigabytes of CUDA libraries): the CPU index first,
    # retried once per request, so that a machine that cannot reach it moves on in seconds
    .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 \
        --index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 15 \
      || .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  fi
fi
req=requirements.txt; [ $dev = 1 ] && req=requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
