#!/usr/bin/env bash
# Run HERE (the project's CPU machine, with network), once, before a device call: everything the lent GPU
# machine lacks for scripts/gpu-check.sh, packed into .gpu-bundle/ (git-ignored) in carry-sized parts.
#
#   scripts/gpu-bundle.sh            # builds .gpu-bundle/part1[/part2], prints sizes and the device run calls
#   PART_MIB=50 scripts/gpu-bundle.sh
#
# The device (nvidia-h200, see /work/.library/device/): Python 3.12 at /opt/torch/.venv with torch, timm,
# numpy, numba, pandas, matplotlib, opencv-python-headless ...; no network, no pip index, no apt. Missing
# there: ray, mlflow(-skinny), pydantic, jsonschema, ffcv (no wheel on PyPI), FFCV's native libraries
# (Debian's libopencv_core/imgproc 4.6, libturbojpeg and what they link) and Fashion-MNIST. So:
#   site/  cp312 wheels unpacked with `pip install --target` (what `pip install --no-index --target` does
#          there, done here once); ray pruned of what a local Tune run never loads (Java jars, the
#          dashboard's web client, RLlib, Serve, LLM) and its binaries stripped; ffcv built here from its
#          sdist with python3.12 against Debian's OpenCV 4.6 (what `scripts/setup.sh` installs);
#          timm/typer/rich/click at the project's pins, so the device runs the versions the tests ran.
#   lib/   the .so files ffcv's extension needs beyond glibc/libstdc++ (ldd-checked to resolve from lib/).
#   fashion-mnist/  the four IDX files, uncompressed (xz packs them better than their gzip); only the first
#          FMNIST_TRAIN (default 20,000) training images, so the whole bundle fits one call.
# One tar.xz, split into parts of at most PART_MIB (default 58 MiB; a call carries 64 MiB with the tree):
# today it is ~56 MiB, so one part and ONE device call.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/.gpu-bundle
BUILD=$OUT/build
PART_MIB=${PART_MIB:-58}  # a call carries 64 MiB in all: one part + the working tree (~1.3 MiB) + margin
FMNIST_TRAIN=${FMNIST_TRAIN:-20000}  # training images carried (60000: all, but then the bundle needs 2 calls)
XZ_LEVEL=${XZ_LEVEL:-6}
PY312=${PY312:-$(command -v python3.12 || true)}
"${PY312:-false}" --version >/dev/null 2>&1 || PY312=/root/.pyenv/versions/3.12.1/bin/python3.12
"$PY312" --version >/dev/null 2>&1 || { echo "gpu-bundle: need a python3.12 here (PY312=...) to build the cp312 ffcv wheel" >&2; exit 1; }
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
[[ -f $FMNIST/train-images-idx3-ubyte.gz ]] || { echo "gpu-bundle: no Fashion-MNIST at $FMNIST (apt-get install dataset-fashion-mnist; scripts/setup.sh does)" >&2; exit 1; }
grep -qx '/.gpu-bundle/' .gitignore || { echo "gpu-bundle: .gitignore must ignore /.gpu-bundle/" >&2; exit 1; }

# Pins: pyproject.toml's, and for the rest the versions `scripts/setup.sh` resolved together (pip freeze).
WHEELS=(
  ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  tensorboardX==2.6.5
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 sqlparse==0.6.1
  cachetools==7.3.3 importlib_metadata==9.1.0 python-dotenv==1.2.4 opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2
  databricks-sdk==0.167.0 google-auth==2.63.0 pyasn1==0.6.5 pyasn1_modules==0.4.2
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  terminaltables==3.1.10
  timm==1.0.31 typer==0.29.2 rich==15.0.0 click==8.5.1
)
BUILT=(ffcv==1.0.2 assertpy==1.1 fastargs==1.2.0)  # no wheels on PyPI: built here from their sdists
PLATFORMS=(--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

t0=$SECONDS
rm -rf "$BUILD" "$OUT"/part*
mkdir -p "$BUILD/whl" "$BUILD/pkg/site" "$BUILD/pkg/lib" "$BUILD/pkg/fashion-mnist"
echo "gpu-bundle: downloading ${#WHEELS[@]} cp312 wheels"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$BUILD/whl" "${WHEELS[@]}" 2>&1 | { grep -v "is ignored: it is neither" || true; }
echo "gpu-bundle: building ${BUILT[*]} with $PY312 ($("$PY312" --version 2>&1))"
"$PY312" -m pip wheel -q --disable-pip-version-check --no-deps -w "$BUILD/whl" "${BUILT[@]}" 2>&1 \
  | grep -v "is ignored: it is neither" || true
n=$(ls "$BUILD"/whl/*.whl | wc -l) want=$((${#WHEELS[@]} + ${#BUILT[@]}))
[[ $n -eq $want ]] || { echo "gpu-bundle: expected $want wheels, got $n" >&2; exit 1; }

echo "gpu-bundle: installing them into site/ (pip install --no-index --no-deps --target, for cp312)"
"$PY312" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$BUILD/pkg/site" \
  "$BUILD"/whl/*.whl 2>&1 | grep -v "is ignored: it is neither" || true
S=$BUILD/pkg/site
rm -rf "$S/ray/jars" "$S/ray/dashboard/client" "$S/ray/rllib" "$S/ray/serve" "$S/ray/llm" "$S/bin"
find "$S" -name __pycache__ -prune -exec rm -rf {} +
find "$S/ray" -type f \( -name "*.so" -o -perm -u+x \) -exec sh -c 'file -b "$1" | grep -q ELF && strip --strip-unneeded "$1"' _ {} \;

echo "gpu-bundle: native libraries of ffcv's extension"
EXT=$(ls "$S"/ffcv/_libffcv*.so)
SYSTEM='^(linux-vdso|ld-linux|libc\.so|libm\.so|libstdc\+\+|libgcc_s|libpthread|libdl|librt)'
for lib in $(ldd "$EXT" | awk '/=>/ {print $1}'); do
  [[ $lib =~ $SYSTEM ]] || cp -L "$(ldd "$EXT" | awk -v l="$lib" '$1 == l {print $3}')" "$BUILD/pkg/lib/$lib"
done
missing=$(LD_LIBRARY_PATH=$BUILD/pkg/lib ldd "$EXT" | awk '/=>/ {print $1, $3}' \
  | grep -Ev "$SYSTEM" | grep -v " $BUILD/pkg/lib/" || true)
[[ -z $missing ]] || { echo "gpu-bundle: resolved outside lib/: $missing" >&2; exit 1; }

echo "gpu-bundle: Fashion-MNIST: the first $FMNIST_TRAIN training images (the sweep reads the first 10,000), all 10,000 test"
python3 - "$FMNIST" "$BUILD/pkg/fashion-mnist" "$FMNIST_TRAIN" <<'EOF'
import gzip, struct, sys
from pathlib import Path
src, dst, n_train = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
    raw = gzip.decompress((src / f"{name}.gz").read_bytes())
    ndim = raw[3]
    dims = list(struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]))
    keep = min(dims[0], n_train) if name.startswith("train") else dims[0]  # IDX: magic, dims, then items
    item = 1
    for d in dims[1:]:
        item *= d
    head = raw[:4] + struct.pack(f">{ndim}I", keep, *dims[1:])
    (dst / name).write_bytes(head + raw[4 + 4 * ndim:4 + 4 * ndim + keep * item])
EOF
{ echo "built $(date -u +%FT%TZ) from git $(git rev-parse --short HEAD 2>/dev/null || echo '?') by scripts/gpu-bundle.sh"
  (cd "$BUILD/whl" && ls -1 *.whl); } > "$BUILD/pkg/MANIFEST"

echo "gpu-bundle: packing (xz -$XZ_LEVEL, 2 threads; minutes)"
ARCHIVE=$BUILD/bvit-gpu.tar.xz
tar -C "$BUILD/pkg" -cf - . | xz -T2 "-$XZ_LEVEL" > "$ARCHIVE"
split -b "${PART_MIB}M" -d -a 2 "$ARCHIVE" "$BUILD/bvit-gpu.tar.xz."
pieces=("$BUILD"/bvit-gpu.tar.xz.[0-9][0-9])
sha=$(sha256sum "$ARCHIVE" | cut -c1-64)
for i in "${!pieces[@]}"; do
  d=$OUT/part$((i + 1)); mkdir -p "$d"; mv "${pieces[$i]}" "$d/"
  printf 'sha256 %s\npieces %d\n' "$sha" "${#pieces[@]}" > "$d/MANIFEST"
done
rm -f "$ARCHIVE"
nparts=${#pieces[@]}

tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo
echo "gpu-bundle: done in $((SECONDS - t0)) s"
echo "  unpacked: site/ $(du -sm "$BUILD/pkg/site" | cut -f1) MiB (ray $(du -sm "$S/ray" | cut -f1) MiB), lib/ $(du -sm "$BUILD/pkg/lib" | cut -f1) MiB, fashion-mnist/ $(du -sm "$BUILD/pkg/fashion-mnist" | cut -f1) MiB"
echo "  working tree that travels with every call: $(mib "$tree_bytes") tracked + $(mib "${untracked:-0}") untracked"
for d in "$OUT"/part*; do
  b=$(du -cb "$d" | tail -1 | cut -f1)
  echo "  $d: $(mib "$b"); a call carrying it sends $(mib $((b + tree_bytes + ${untracked:-0}))) of the 64 MiB allowed"
  ((b + tree_bytes + ${untracked:-0} < 63 * 1048576)) || echo "  WARNING: over 63 MiB with the tree: lower PART_MIB" >&2
done
echo
sha_short=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "The device calls (tool 'run'), with BVIT_GIT_SHA = this checkout's HEAD ($sha_short; commit first):"
if [[ $nparts -eq 1 ]]; then
  echo "  run(carry=[\".gpu-bundle/part1\"], timeout_s=600, command=\"BVIT_GIT_SHA=$sha_short bash scripts/gpu-check.sh\")"
else
  for ((i = 1; i < nparts; i++)); do
    echo "  run(carry=[\".gpu-bundle/part$i\"], timeout_s=60, command=\"mkdir -p /tmp/bvit-gpu-parts && cp .gpu-bundle/part$i/bvit-gpu.tar.xz.* /tmp/bvit-gpu-parts/ && ls -l /tmp/bvit-gpu-parts\")"
  done
  echo "  run(carry=[\".gpu-bundle/part$nparts\"], timeout_s=600, command=\"BVIT_GIT_SHA=$sha_short bash scripts/gpu-check.sh\")"
  echo "  -- back to back: the machine stays warm only 30 s after a call; gpu-check.sh says which piece is missing"
fi
