#!/usr/bin/env bash
# The one command a session with a lent GPU runs first (docs/gpu.md, "Running the GPU checks"):
# installs the carried wheels offline, reports the card, commit and packages, runs the CUDA-only
# tests, then the GPU benchmarks, each stage under its own time limit inside one overall budget,
# and prints a summary. Every log and JSON goes to $OUT (7 files at most), which the device tool
# brings back.
#
#   here:        bash bench/fetch_gpu_wheels.sh                      # once: gpu_wheels/ (~8 MiB)
#   device run:  MOHGE_COMMIT=<hash> bash bench/gpu_checks.sh         # carry ["gpu_wheels"], timeout_s 540
#
# Options:
#   --only LIST      stages to run, comma-separated, of: tests,gpu,moe,moe-compiled (default: all)
#   --skip LIST      stages to leave out
#   --budget S       seconds for the whole script, install included (default 450); a stage gets
#                    min(its own limit, what is left) and is skipped when under 45 s are left
#   --dry-run        print the environment's commit/digest and each stage's command; run nothing
#   --install-only   install the wheels and the package, print the environment report, stop
#                    (also the check here: in a throwaway python3.12 venv, PYTHON=that python)
#   --wheels DIR     the wheel folder (default gpu_wheels)
# Environment: PYTHON (default python3), OUT (default runs/gpu_checks), MOHGE_COMMIT (the commit,
# where the copy has no .git), GPU_STEPS (bench_gpu.py --steps, default 20), MOE_COMPILED_PATHS
# (bench_moe.py --paths of the compiled rows, default grouped; ragged,grouped for both).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
ALL_STAGES="tests gpu moe moe-compiled"
ONLY="$ALL_STAGES" SKIP="" BUDGET=450 DRY=0 INSTALL_ONLY=0 WHEELS=gpu_wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=${2//,/ }; shift 2 ;;
    --skip) SKIP=${2//,/ }; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    --wheels) WHEELS=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_checks.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for s in $ONLY $SKIP; do
  case " $ALL_STAGES " in *" $s "*) ;; *) echo "gpu_checks.sh: unknown stage '$s' in --only/--skip; stages: $ALL_STAGES" >&2; exit 2 ;; esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_checks.sh: --budget wants whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/runs/gpu_checks}
GPU_STEPS=${GPU_STEPS:-20}
MOE_COMPILED_PATHS=${MOE_COMPILED_PATHS:-grouped}
"$PY" -c "import sys" 2>/dev/null || { echo "gpu_checks.sh: PYTHON=$PY does not run; set PYTHON to a python3" >&2; exit 2; }
mkdir -p "$OUT"
STAGES_TSV=$(mktemp /tmp/gpu_checks_stages.XXXXXX)  # outside $OUT: the tool brings back 8 files at most
export PYTHONUNBUFFERED=1
START=$(date +%s)
if COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT+uncommitted"
else
  COMMIT=${MOHGE_COMMIT:-unknown (no .git here: pass MOHGE_COMMIT=<hash>)}
fi

wanted() { case " $ONLY " in *" $1 "*) case " $SKIP " in *" $1 "*) return 1 ;; esac; return 0 ;; esac; return 1; }

# run_stage NAME LIMIT CMD...: runs CMD under min(LIMIT, budget left), records status and seconds.
run_stage() {
  local name=$1 limit=$2 left t0 rc status
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  echo
  echo "== stage $name (limit ${limit}s): $(printf '%q ' "$@")"
  if [ "$DRY" = 1 ]; then printf '%s\t%s\t%s\t%s\n' "$name" "dry-run" "-" "$limit" >> "$STAGES_TSV"; return 0; fi
  if [ "$limit" -lt 45 ]; then
    echo "   skipped: ${left}s of the ${BUDGET}s budget left"
    printf '%s\t%s\t%s\t%s\n' "$name" "SKIPPED" "0" "$limit" >> "$STAGES_TSV"
    return 0
  fi
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=TIMEOUT ;; *) status="FAILED-rc$rc" ;; esac
  echo "== stage $name: $status in $(($(date +%s) - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$limit" >> "$STAGES_TSV"
  return $rc
}

install() {
  echo "== install: wheels from $WHEELS, then the package (offline)"
  if [ ! -d "$WHEELS" ] || ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "   !! no wheels in $WHEELS: run 'bash bench/fetch_gpu_wheels.sh' in the session's checkout and"
    echo "      name it in the run call's carry; going on with what the python has"
  else
    if [ -f "$WHEELS/SHA256SUMS" ] && ! (cd "$WHEELS" && sha256sum --quiet -c SHA256SUMS); then
      echo "   !! $WHEELS/SHA256SUMS does not match: the wheels were truncated or changed; re-fetch"
    fi
    if ! timeout 180 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
         --find-links "$WHEELS" "$WHEELS"/*.whl; then
      echo "   pip into $("$PY" -c 'import sys; print(sys.prefix)') failed: installing to /tmp/gpu_site instead"
      timeout 180 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
        --upgrade --target /tmp/gpu_site "$WHEELS"/*.whl && export PYTHONPATH="/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  # The package: editable install (console scripts too); else a namespace folder of links on PYTHONPATH.
  local origin want="$ROOT/model/__init__.py"
  timeout 180 "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --disable-pip-version-check \
    -e . >/tmp/gpu_checks_editable.log 2>&1 || { echo "   editable install failed (last lines):"; tail -3 /tmp/gpu_checks_editable.log; }
  origin=$("$PY" -c 'import importlib.util as u; s = u.find_spec("mohge.model"); print(s.origin if s else "")' 2>/dev/null)
  if [ "$origin" != "$want" ]; then
    echo "   mohge.model resolves to '${origin:-nothing}', not $want: using links in /tmp/mohge_ns on PYTHONPATH"
    rm -rf /tmp/mohge_ns && mkdir -p /tmp/mohge_ns/mohge
    for f in model parallel data train launch configs; do ln -s "$ROOT/$f" "/tmp/mohge_ns/mohge/$f"; done
    export PYTHONPATH="/tmp/mohge_ns${PYTHONPATH:+:$PYTHONPATH}"
    origin=$("$PY" -c 'import importlib.util as u; s = u.find_spec("mohge.model"); print(s.origin if s else "")' 2>/dev/null)
  fi
  echo "   mohge.model -> ${origin:-NOT FOUND}"
}

main() {
  local rc
  echo "== gpu_checks.sh $(date -u +%FT%TZ), commit $COMMIT, stages: $(for s in $ALL_STAGES; do wanted "$s" && printf '%s ' "$s"; done)"
  echo "   python: $PY, OUT: $OUT, budget ${BUDGET}s"
  if [ "$DRY" = 1 ]; then
    echo "   tree digest: $("$PY" bench/gpu_report.py digest)  (gpu_report.py env prints it there: same digest, same code)"
    echo "== install (not run): pip install --no-index --no-deps --find-links $WHEELS $WHEELS/*.whl; pip install --no-index --no-deps --no-build-isolation -e ."
  else
    install
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
    else
      echo "   no nvidia-smi on this machine"
    fi
    echo "== environment"
    timeout 180 "$PY" bench/gpu_report.py env --commit "$COMMIT" --json "$OUT/env.json"
  fi
  [ "$INSTALL_ONLY" = 1 ] && return 0

  if wanted tests; then
    # Files that mention CUDA or a GPU; the plugin keeps the tests whose skip markers name one.
    local files
    files=$(grep -l -i -E "cuda|gpu" tests/test_*.py | tr '\n' ' ')
    # shellcheck disable=SC2086  # files: one word per test file
    run_stage tests 120 env PYTHONPATH="$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -rs -m "" \
      -p pytest_gpu_only --timeout 100 --junitxml="$OUT/tests.xml" $files
  fi
  if wanted gpu; then
    # 0.75B models: grouped GEMM table, throughput (bf16, fp8, fp8 experts), 200-step stability.
    run_stage gpu 240 "$PY" bench/bench_gpu.py --steps "$GPU_STEPS" --out "$OUT/bench_gpu.json"
    rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ]; then
      # A crash (the unmeasured fp8-experts path is the likeliest) loses the JSON: once more without it.
      run_stage gpu-no-fp8-experts 180 "$PY" bench/bench_gpu.py --steps "$GPU_STEPS" --no-fp8-experts \
        --out "$OUT/bench_gpu.json"
    fi
  fi
  if wanted moe; then
    # One MoE layer and one block, MoHGE vs homogeneous MoE, eager: loop/ragged(Triton)/grouped.
    run_stage moe 120 "$PY" bench/bench_moe.py --device cuda --no-compile --out "$OUT/bench_moe.json"
  fi
  if wanted moe-compiled; then
    # torch.compile'd layer rows only: each compile takes tens of seconds, and the table is printed
    # only at the end, so by default just the grouped path (what `auto` picks on CUDA).
    run_stage moe-compiled 150 "$PY" bench/bench_moe.py --device cuda --only-compiled --modules layer \
      --paths "$MOE_COMPILED_PATHS" --no-loss --repeats 10 --out "$OUT/bench_moe_compiled.json"
  fi

  echo
  echo "== summary ($(($(date +%s) - START))s of ${BUDGET}s)"
  "$PY" bench/gpu_report.py summary "$OUT" --stages "$STAGES_TSV"
  ! cut -f2 "$STAGES_TSV" | grep -q -v -x -E "ok|dry-run"  # status 1 when a stage failed or was skipped
}

main 2>&1 | tee "$OUT/gpu_checks.log"
status=${PIPESTATUS[0]}
rm -f "$STAGES_TSV"
exit "$status"
