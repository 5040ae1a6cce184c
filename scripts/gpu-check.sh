#!/usr/bin/env bash
# The ONE prepared script for the lent GPU machine (issue 20): set up from the carried bundle, check the
# imports, run bench/gpu.py, then sweeps/gpu-fmnist-width.yaml through Ray under a wall-clock budget, and
# leave everything in at most 8 files under $OUT. `--tiny` runs the same path on this CPU with tiny shapes.
#
#   device:  run(carry=[".gpu-bundle/part1"], timeout_s=600, command="bash scripts/gpu-check.sh")
#            (scripts/gpu-bundle.sh builds the bundle here and prints the exact calls)
#   here:    scripts/gpu-check.sh --tiny          # ~4 min on 2 cores; files in .gpu-out/
#
# Budgets (seconds from the start of this script; environment overrides):
#   GPU_CHECK_TOTAL_S  550 (--tiny 420)  everything, packing included: the run tool stops a command at 600
#   GPU_CHECK_BENCH_S  240 (--tiny 150)  bench/gpu.py (it stops starting sections 25 s before, and is killed at it)
#   the sweep gets what is left, less 40 s for packing; at its budget the launcher gets SIGINT (Ray Tune
#   saves the sweep; `bvit-sweep launch SPEC --resume` continues it), then SIGTERM 60 s later.
# Other knobs: BVIT_PY (the python to use), BVIT_GIT_SHA (recorded in the reports; the device's copy of
# the tree has no .git), GPU_CHECK_SKIP_BENCH=1, GPU_CHECK_SKIP_SWEEP=1, GPU_CHECK_SWEEP_S (cap the sweep).
#
# Files left in $OUT (the device tool returns at most 8, 16 MiB each, at most 2 folders down):
#   gpu-check.log     everything printed, with the timings of each stage
#   summary.md        the benchmark report, the sweep's trial table and frontier: read this first
#   results.tgz       results/gpu/, results/<sweep>/ (MLflow's SQLite store, no model artifacts) and
#                     runs/<sweep>/ without checkpoints: extract at the repo root
#   ray-logs.tgz      Ray's session logs (only when the sweep did not finish cleanly)
set -uo pipefail  # not -e: a failed stage is reported and the later ones still run; what exists is packed
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TINY=0
for a in "$@"; do
  case $a in
    --tiny) TINY=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $a (--tiny, --help)" >&2; exit 2 ;;
  esac
done
T0=$SECONDS
if ((TINY)); then TOTAL_S=${GPU_CHECK_TOTAL_S:-420} BENCH_S=${GPU_CHECK_BENCH_S:-150}
else TOTAL_S=${GPU_CHECK_TOTAL_S:-550} BENCH_S=${GPU_CHECK_BENCH_S:-240}; fi
OUT=${OUT:-$ROOT/.gpu-out}
mkdir -p "$OUT"
rm -f "$OUT"/gpu-check.log "$OUT"/summary.md "$OUT"/results.tgz "$OUT"/ray-logs.tgz
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
stage() { printf '\n==== [%4ds] %s\n' "$((SECONDS - T0))" "$*"; }
STATUS=()  # one line per stage, printed last
note() { STATUS+=("$*"); echo "gpu-check: $*"; }

SPEC=$ROOT/sweeps/gpu-fmnist-width.yaml
SWEEP=gpu-fmnist-width
if ((TINY)); then
  SWEEP=$SWEEP-smoke
  RUN_DIR=${GPU_CHECK_RUN_DIR:-${TMPDIR:-/tmp}/bvit-gpu-tiny}  # results/, runs/ and data/ of the tiny run
  rm -rf "$RUN_DIR/results" "$RUN_DIR/runs"
else
  RUN_DIR=$ROOT  # on the device: its copy of the tree
fi
mkdir -p "$RUN_DIR"
cd "$RUN_DIR" || exit 1

# ---- 1. the bundle -----------------------------------------------------------------------------------
stage "bundle"
WORK=${BVIT_GPU_WORK:-/tmp/bvit-gpu}
FMNIST_SRC=
manifest=$(ls "$ROOT"/.gpu-bundle/part*/MANIFEST 2>/dev/null | head -1)
if ((TINY)) && [[ ${GPU_CHECK_BUNDLE:-0} != 1 ]]; then
  manifest=  # --tiny uses this machine's environment unless told to test the bundle (GPU_CHECK_BUNDLE=1)
  rm -f "$WORK/.sha256"
fi
if [[ -n $manifest ]]; then
  sha=$(awk '$1 == "sha256" {print $2}' "$manifest")
  want=$(awk '$1 == "pieces" {print $2}' "$manifest")
  if [[ -f $WORK/.sha256 && $(cat "$WORK/.sha256") == "$sha" ]]; then
    echo "bundle $sha already unpacked in $WORK"
  else
    declare -A piece=()
    for f in "$ROOT"/.gpu-bundle/part*/bvit-gpu.tar.xz.* /tmp/bvit-gpu-parts/bvit-gpu.tar.xz.*; do
      [[ -f $f ]] && piece[$(basename "$f")]=$f
    done
    names=$(printf '%s\n' "${!piece[@]}" | grep . | sort)
    have=$(printf '%s\n' "${!piece[@]}" | grep -c . || true)
    if [[ $have -ne $want ]]; then
      note "bundle: FAILED: $have of $want pieces here ($(echo $names)); carry the missing part(s) first (scripts/gpu-bundle.sh prints the calls)"
    else
      rm -rf "$WORK" && mkdir -p "$WORK"
      for n in $names; do cat "${piece[$n]}"; done > "$WORK.tar.xz"
      got=$(sha256sum "$WORK.tar.xz" | cut -c1-64)
      if [[ $got != "$sha" ]]; then
        note "bundle: FAILED: sha256 $got != $sha (pieces from different builds?)"
      elif { command -v xz >/dev/null && tar -xJf "$WORK.tar.xz" -C "$WORK"; } \
          || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$WORK.tar.xz" "$WORK"; then
        echo "$sha" > "$WORK/.sha256"
        echo "bundle unpacked into $WORK at $((SECONDS - T0)) s: $(du -sm "$WORK" | cut -f1) MiB"
      else
        note "bundle: FAILED to unpack $WORK.tar.xz"
      fi
      rm -f "$WORK.tar.xz"
    fi
  fi
fi
if [[ -f $WORK/.sha256 ]]; then
  export PYTHONPATH=$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  export LD_LIBRARY_PATH=$WORK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  FMNIST_SRC=$WORK/fashion-mnist
  PY=${BVIT_PY:-python3}
  head -1 "$WORK/MANIFEST"
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  PY=${BVIT_PY:-$( [[ -x $ROOT/.venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python3)}
  echo "no bundle unpacked: using $PY as it is"
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 RAY_USAGE_STATS_ENABLED=0
bvs() { "$PY" -c 'import sys; sys.argv[0] = "bvit-sweep"; from orchestrator.cli import app; app()' "$@"; }

# ---- 2. the machine and the imports ------------------------------------------------------------------
stage "machine and imports"
echo "python: $(command -v "$PY") ($("$PY" --version 2>&1)); $(nproc) cores; $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,utilization.gpu --format=csv
"$PY" - <<'EOF'
import importlib, sys
mods = ["torch", "timm", "numpy", "numba", "pandas", "pydantic", "typer", "ray", "ray.tune", "mlflow", "ffcv",
        "bvit.models", "bvit.data", "orchestrator.launch"]
bad = []
for m in mods:
    try:
        mod = importlib.import_module(m)
        print(f"  ok   {m:22s} {getattr(mod, '__version__', '')}  {getattr(mod, '__file__', '')}")
    except Exception as e:  # noqa: BLE001
        bad.append(m)
        print(f"  FAIL {m:22s} {type(e).__name__}: {e}")
import torch
print(f"  cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
sys.exit(1 if bad else 0)
EOF
IMPORTS_OK=$?
((IMPORTS_OK == 0)) && note "imports: ok" || note "imports: FAILED (see the FAIL lines); the sweep is skipped"
ext=$(ls "$WORK"/site/ffcv/_libffcv*.so 2>/dev/null | head -1)
[[ -n $ext ]] && { ldd "$ext" | grep "not found" && note "ffcv: a native library is missing (ldd above)"; }
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if ((TINY)); then
  export RAY_OVERRIDE_RESOURCES='{"GPU": 1, "CPU": 8}'  # a CPU Ray node told it has a GPU: the spec's 0.25 GPUs schedule
elif ((NGPU > 0)); then
  export RAY_OVERRIDE_RESOURCES="{\"GPU\": $NGPU}"  # whatever Ray's own detection says
fi

# ---- 3. data -----------------------------------------------------------------------------------------
stage "data: Fashion-MNIST as FFCV files"
if ((TINY)) && [[ ! -e data/fashion-mnist/meta.json && -f $ROOT/data/fashion-mnist/meta.json ]]; then
  mkdir -p data && ln -sfn "$ROOT/data/fashion-mnist" data/fashion-mnist
fi
if [[ -f data/fashion-mnist/meta.json ]]; then
  echo "data/fashion-mnist is prepared"
else
  bvs data prepare fashion-mnist --out data/fashion-mnist --quiet ${FMNIST_SRC:+--source "$FMNIST_SRC"}
fi
[[ -f data/fashion-mnist/meta.json ]] && note "data: ok" || note "data: FAILED"

# ---- 4. the benchmark --------------------------------------------------------------------------------
stage "bench/gpu.py (budget ${BENCH_S} s)"
if [[ ${GPU_CHECK_SKIP_BENCH:-0} == 1 ]]; then
  note "bench: skipped (GPU_CHECK_SKIP_BENCH=1)"
else
  t=$SECONDS
  timeout -k 10 "$BENCH_S" "$PY" "$ROOT/bench/gpu.py" $( ((TINY)) && echo --tiny) --budget-s $((BENCH_S - 25)) \
    --data data/fashion-mnist --out results/gpu
  rc=$?
  note "bench: exit $rc after $((SECONDS - t)) s$( ((rc == 124 || rc == 137)) && echo ' (killed at its budget: the report keeps the finished sections)')"
fi

# ---- 5. the sweep ------------------------------------------------------------------------------------
left=$((TOTAL_S - (SECONDS - T0) - 40))
SWEEP_S=${GPU_CHECK_SWEEP_S:-$left}
((SWEEP_S > left)) && SWEEP_S=$left
stage "sweep $SWEEP through Ray (budget ${SWEEP_S} s)"
SWEEP_RC=
if [[ ${GPU_CHECK_SKIP_SWEEP:-0} == 1 ]]; then
  note "sweep: skipped (GPU_CHECK_SKIP_SWEEP=1)"
elif ((IMPORTS_OK != 0)); then
  note "sweep: skipped (imports failed)"
elif ((SWEEP_S < 60)); then
  note "sweep: skipped (only ${SWEEP_S} s left)"
else
  args=(launch "$SPEC")
  ((TINY)) && args+=(--smoke)
  [[ -d runs/$SWEEP ]] && args+=(--resume) && echo "runs/$SWEEP exists: resuming it"
  t=$SECONDS
  # A background job of a script starts with SIGINT ignored: give Python its KeyboardInterrupt handler back.
  "$PY" -c 'import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = "bvit-sweep"
from orchestrator.cli import app; app()' "${args[@]}" &
  pid=$!
  stopped=
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    if [[ -z $stopped ]] && ((SECONDS - t >= SWEEP_S)); then
      echo "gpu-check: the sweep's ${SWEEP_S} s are up: SIGINT to the launcher (Ray Tune saves the sweep)"
      kill -INT "$pid"; stopped=$SECONDS
    elif [[ -n $stopped ]] && ((SECONDS - stopped >= 60)); then
      echo "gpu-check: the launcher did not stop within 60 s of SIGINT: SIGTERM"
      kill -TERM "$pid"; sleep 5; kill -KILL "$pid" 2>/dev/null; break
    fi
  done
  wait "$pid"; SWEEP_RC=$?
  note "sweep: launcher exit $SWEEP_RC after $((SECONDS - t)) s$([[ -n $stopped ]] && echo ', stopped at its time budget')"
  stage "sweep status"
  bvs status "runs/$SWEEP"
fi

# ---- 6. pack -----------------------------------------------------------------------------------------
stage "pack into $OUT"
{
  echo "# gpu-check $( ((TINY)) && echo '--tiny ')$(date -u +%FT%TZ), git ${BVIT_GIT_SHA:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo
  for s in "${STATUS[@]}"; do echo "- $s"; done
  echo
  for f in results/gpu/*.md; do [[ -f $f ]] && { cat "$f"; echo; }; done
  if [[ -f results/$SWEEP/trials.csv ]]; then
    echo "## Sweep $SWEEP: trials (results/$SWEEP/trials.csv)"; echo; echo '```'
    "$PY" - "results/$SWEEP/trials.csv" <<'EOF'
import sys
import pandas as pd
t = pd.read_csv(sys.argv[1])
cols = [c for c in ("trial_id", "status", "arch", "width", "steps", "seed", "params", "final_test_top1", "epochs",
                    "wall_s", "error") if c in t.columns]
print(t["status"].value_counts().to_string() if "status" in t else "", end="\n\n")
print(t[cols].to_string(index=False, max_colwidth=60))
EOF
    echo '```'
  fi
  for f in results/$SWEEP/frontier.csv results/$SWEEP/*.md; do
    [[ -f $f ]] && { echo; echo "## $f"; echo; echo '```'; cat "$f"; echo '```'; }
  done
} > "$OUT/summary.md" 2>&1
tar -czf "$OUT/results.tgz" --exclude='*/mlflow/artifacts' --exclude='checkpoint_*' --exclude='*.pt' \
  $(ls -d results/gpu "results/$SWEEP" "runs/$SWEEP" 2>/dev/null) 2>/dev/null
if [[ -n $SWEEP_RC && $SWEEP_RC != 0 && -d /tmp/ray/session_latest/logs ]]; then
  tar -czf "$OUT/ray-logs.tgz" -C /tmp/ray/session_latest logs 2>/dev/null
  (($(stat -c %s "$OUT/ray-logs.tgz") > 15 * 1048576)) && rm -f "$OUT/ray-logs.tgz" \
    && tar -czf "$OUT/ray-logs.tgz" -C /tmp/ray/session_latest --wildcards 'logs/*.err' 2>/dev/null
fi
for f in "$OUT"/*; do
  (($(stat -c %s "$f") > 16 * 1048576)) && note "pack: $(basename "$f") is over 16 MiB and will not come back"
done
ls -l "$OUT"
stage "done"
printf '%s\n' "${STATUS[@]}"
cat "$OUT/summary.md" | head -60
echo "gpu-check: total $((SECONDS - T0)) s"
