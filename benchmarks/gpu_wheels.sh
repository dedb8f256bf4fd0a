#!/usr/bin/env bash
# Fetch, here (PyPI reachable), the wheels a GPU session needs beyond the H200 image: the distributions in
# benchmarks/gpu_wheels.txt at the versions .venv has, for CPython 3.12 on x86-64 (the machine's python3),
# into .whl/ (git-ignored). Then carry it: device run with carry [".whl"] and `bash benchmarks/gpu_session.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^#' benchmarks/gpu_wheels.txt | while read -r dist; do
  [ -n "$dist" ] || continue
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$dist==$version"
done
ls -l .whl
du -sh .whl
