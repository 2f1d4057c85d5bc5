#!/usr/bin/env bash
# Runs genarm's GPU check (check.py) from the bundle `./build.sh gpu-check` made.
#
#   scripts/gpu_check/run.sh            on the GPU machine: results into $OUT
#   scripts/gpu_check/run.sh --dry-run  here: tiny shapes, torch and genarm on the CPU,
#                                       WebGPU on lavapipe; results in target/gpu-check-dry/
# Other arguments go to check.py (--phases a,b  --budget-s S).
#
# The GPU machine has python3 with torch, transformers and peft, the NVIDIA driver and
# CUDA libraries, but no Rust, no network and maybe no Vulkan loader: the bundle brings
# the stripped genarm binary (xz-compressed) and the loader's .deb files.
set -euo pipefail
cd "$(dirname "$0")/../.."

BUNDLE=${GPU_CHECK_BUNDLE:-target/gpu-check}
DRY=0
ARGS=()
for a in "$@"; do
  if [ "$a" = --dry-run ]; then DRY=1; else ARGS+=("$a"); fi
done
[ -f "$BUNDLE/genarm.xz" ] || { echo "run.sh: no $BUNDLE/genarm.xz: run ./build.sh gpu-check first" >&2; exit 1; }

# wgpu opens libvulkan.so.1 at run time; unpack the carried loader only where the
# machine has none (unpacking over an installed one could replace a newer library).
vulkan_loader() {
  # (grep without -q: an early exit would fail ldconfig's write under pipefail)
  if ! ldconfig -p | grep 'libvulkan\.so\.1' >/dev/null; then
    local deb
    for deb in "$BUNDLE"/debs/*.deb; do
      [ -e "$deb" ] || { echo "run.sh: no libvulkan.so.1 and no .deb in $BUNDLE/debs" >&2; return 0; }
      dpkg -x "$deb" /
    done
    ldconfig
  fi
  # The NVIDIA driver's Vulkan ICD, where the machine mounts it outside the loader's
  # search path (as this workplace's GPU machines do).
  local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$icd" ]; then
    export VK_DRIVER_FILES=$icd
  fi
}

# cudarc loads libcublas, libcublasLt, libcurand and libnvrtc by name when genarm opens
# the CUDA device: put the toolkit's and the Python wheels' library folders on the path.
cuda_libraries() {
  local dirs
  dirs=$("$PY" - <<'PY'
import glob, os, site
found = set()
roots = [os.path.join(p, "nvidia") for p in site.getsitepackages()]
roots += ["/usr/local/cuda/lib64", "/usr/local/nvidia/lib64"]
for root in roots:
    for lib in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True):
        name = os.path.basename(lib)
        if name.startswith(("libcublas", "libcurand", "libnvrtc", "libcudart", "libcuda.so")):
            found.add(os.path.dirname(lib))
print(":".join(sorted(found)))
PY
)
  export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "CUDA library folders: ${dirs:-none found}" >&2
}

if [ "$DRY" = 1 ]; then
  PY=${GPU_CHECK_PYTHON:-target/gpu-check-venv/bin/python}
  [ -x "$PY" ] || { echo "run.sh: no $PY (./build.sh gpu-check --dry-run makes the venv)" >&2; exit 1; }
  OUT_DIR=${OUT:-target/gpu-check-dry/out}
  WORK=${GPU_CHECK_WORK:-target/gpu-check-dry/work}
  # Every dry run makes its models anew (the GPU run reuses what an earlier run on the
  # same warm machine left complete).
  rm -rf "$WORK" "$OUT_DIR"
  LIMIT=${GPU_CHECK_LIMIT_S:-1800}
  ARGS=(--dry-run --budget-s 1500 "${ARGS[@]}")
else
  PY=${GPU_CHECK_PYTHON:-python3}
  OUT_DIR=${OUT:?run.sh: \$OUT is not set (on the GPU machine the run tool sets it)}
  WORK=${GPU_CHECK_WORK:-/tmp/genarm-gpu-check}
  # The whole run in 8 minutes: check.py's own budget is 440 s, this is the backstop.
  LIMIT=${GPU_CHECK_LIMIT_S:-470}
  vulkan_loader
  cuda_libraries
  # candle's kernels are PTX that the driver compiles when a process first loads them;
  # a cache large enough to keep them spares every later genarm process that work.
  export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
fi
mkdir -p "$OUT_DIR" "$WORK"
# The binary travels xz-compressed; Python's lzma unpacks it where no xz is installed.
BIN="$WORK/genarm"
"$PY" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$BUNDLE/genarm.xz" "$BIN"
chmod +x "$BIN"
GENARM_BUILD=$(cat "$BUNDLE/genarm.build" 2>/dev/null || echo unknown)
export GENARM_BUILD
# No __pycache__ in the working tree (it would travel with the next run).
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
start=$(date +%s)
set +e
timeout "$LIMIT" "$PY" scripts/gpu_check/check.py --genarm "$BIN" --out "$OUT_DIR" \
  --work-dir "$WORK" "${ARGS[@]}"
rc=$?
set -e
echo "gpu check: exit $rc after $(($(date +%s) - start)) s; results in $OUT_DIR (gpu_check.json, gpu_check.md, gpu_check.log)"
exit "$rc"
