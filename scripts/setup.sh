#!/usr/bin/env bash
# Idempotent set-up shared by every Makefile target: system packages, .venv, the project (editable, dev extras).
# A second run on a set-up machine takes a second or two: it checks dpkg and a stamp keyed on pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libopencv-dev libturbojpeg0-dev dataset-fashion-mnist pkg-config g++)  # what the project runs on (the image has them too)
# chromium: the browser tests/test_dashboard.py drives through Playwright (its real binary, no download).
TEST_APT_PACKAGES=(chromium)
VENV=.venv
PYTHON=${PYTHON:-python3}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${APT_PACKAGES[@]}" "${TEST_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: run as root:  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: Python 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"

stamp="$VENV/.bvit-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f $stamp ]]; then
  echo "setup: installing the project and its pinned dependencies into $VENV (a few minutes the first time)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c 'import torch, timm, ray, mlflow, ffcv, bvit, orchestrator' \
    || { echo "setup: the installed environment does not import; see pip's output above" >&2; exit 1; }
  rm -f "$VENV"/.bvit-installed-* && touch "$stamp"
fi
