#!/usr/bin/env bash
# The install paths a user takes without the Makefile: an sdist and a wheel made by
# `python -m build` (its isolated build environment has no torch, so neither carries a
# compiled extension), each installed with plain `pip install` into a fresh venv that has
# torch; then `python -m amdim_kernels` there, whose self-check must pass for cpp (the
# extension compiled on first use, in a cache of its own for each install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stamp() { date +%s; }

t0=$(stamp)
"$PY" -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
echo "install check: sdist and wheel built in $(( $(stamp) - t0 )) s: $(cd "$work/dist" && ls)"

t0=$(stamp)
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.14.1 > "$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
echo "install check: fresh venv with torch in $(( $(stamp) - t0 )) s"

export AMDIM_KERNELS_SKIP_CUDA_BUILD=1  # no GPU here: the CPU kernels are what the check can run
for dist in "$work"/dist/*.whl "$work"/dist/*.tar.gz; do
  name=$(basename "$dist")
  t0=$(stamp)
  "$work/venv/bin/pip" install -q "$dist" > "$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
  echo "install check: pip install $name in $(( $(stamp) - t0 )) s"
  t0=$(stamp)
  # outside the checkout, so that the installed package is the one imported; the venv not
  # activated and no other ninja on PATH, as a kernel or a cron job runs it
  (cd "$work" && PATH=/usr/bin:/bin AMDIM_KERNELS_CACHE="$work/cache-$name" "$work/venv/bin/python" -m amdim_kernels) \
    2>&1 | tee "$work/check.log"
  echo "install check: python -m amdim_kernels (first use: compile and self-check) in $(( $(stamp) - t0 )) s"
  grep -q "^  cpu  cpp       pass$" "$work/check.log" || { echo "install check: cpp did not pass after $name"; exit 1; }
  "$work/venv/bin/pip" uninstall -q -y amdim-kernels
done
echo "install check: passed"
