#!/usr/bin/env bash
# Issue 14's prefill on the lent GPU: ember's pp512, pp2048 and tg128 (7B-shaped Q4_0 from
# `ember synth`, all in VRAM) against llama.cpp CUDA's `llama-bench -p 512,2048 -n 128` built in
# the same call, plus the prefill products' own times and a check of the cooperative-matrix
# kernel against the portable one on this card.
#
# Run from the repository root on the device:
#   benches/device/gpu14.sh D PHASE...      PHASE: kernels pp coop nocoop llama sampled depth
# D, a carried folder, holds: ember (release binary, stripped), tok.gguf (a 1-layer `ember synth`
# of the default model: the tokenizer) and llama-cpp.sh; .lc/lcsrc.tar.xz (`llama-cpp.sh fetch
# .lc`) and .gl (the Vulkan loader) are carried too, as for hybrid_race.sh. After llama.cpp's
# build (~3.5 min, started first, in the background), the phases take about 2.5 minutes:
#   kernels  `ember bench --prefill-kernels -p 512`: every type's batched products of a 7B layer,
#            portable f32 and cooperative-matrix kernels, and the latter's difference from the
#            former (~1e-3 is f16 rounding; ~1 or inf is a broken kernel: then read `nocoop`)
#   pp       ember pp512 + tg128 and pp2048 (cooperative matrices where the card has them)
#   coop     the cooperative-matrix kernel's tiles (COOP_SHAPES, --tune coop=tokens:kb:ft): a
#            layer's Q4_0 products and their difference from the portable kernel, and pp512
#   nocoop   ember pp512 with --tune no-coop=1 (the portable tiled kernel)
#   llama    llama.cpp CUDA -p 512,2048 -n 128, all layers on the GPU
#   sampled  ember tg128 greedy and at --temp 0.8 (top-k 40, top-p 0.95, min-p 0.05: drawn on
#            the GPU, queued like greedy), alternating, twice each (~40 s; no llama.cpp).
#            Acceptance: sampled within 5% of greedy
#   depth    tg64 after 4000 tokens in the KV cache (`-d 4000`; the synthetic model's trained
#            context is 4096), ember then llama.cpp CUDA (~40 s after llama.cpp's build)
set -uo pipefail
D=$(realpath "$1"); shift
. benches/device/lib.sh; vulkan_setup
E=$D/ember; M=/tmp/models; mkdir -p $M
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$E devices 2>&1 | head -4

llama_cuda_start $D

# The model, made once per machine (the kernels phase needs none).
model() { [ -f $M/q4.gguf ] || { echo "== model"; date; $E synth --type q4_0 --tokenizer-from $D/tok.gguf -o $M/q4.gguf 2>&1 | tail -1; }; }
quiet() { grep -v -E "^ember: loaded|^$|^ggml_|^  Device|^build:|^llama_|^load|^print_info|^common_|^graph_|^sched_|^set_|^init|^system_info|^\.+$"; }

for phase in "$@"; do
  [ $SECONDS -gt ${DEADLINE:-999999} ] && { echo; echo "== $phase skipped: $SECONDS s elapsed"; continue; }
  echo; echo "== $phase"; date
  case $phase in
kernels) $E bench --prefill-kernels -p 512 2>&1 | quiet ;;
pp)
  model
  $E bench --backend gpu -m $M/q4.gguf -p 512 -n 128 -r ${REPS:-3} 2>&1 | quiet
  $E bench --backend gpu -m $M/q4.gguf -p 2048 -n 0 -r ${REPS:-3} 2>&1 | quiet
  ;;
coop)
  # The cooperative-matrix tile (--tune coop=tokens:kb:ft, src/gpu/tuning.rs's CoopShape): a
  # 7B layer's Q4_0 products per tile (their difference from the portable kernel must stay
  # ~1e-4, f16 rounding; ~1 or inf is a broken tile), then pp512 with each. COOP_SHAPES sets them.
  model
  for c in ${COOP_SHAPES:-64:2:2 128:2:4 128:2:2 64:1:4 32:1:2 128:1:4}; do
    echo "-- coop=$c"
    $E bench --prefill-kernels -p 512 --tune coop=$c 2>&1 | quiet | grep -iE "q4_0|error"
    $E bench --backend gpu -m $M/q4.gguf -p 512 -n 0 -r 2 --tune coop=$c 2>&1 | quiet | grep -E "pp512|rror"
  done
  ;;
nocoop) model; $E bench --backend gpu -m $M/q4.gguf -p 512 -n 0 -r ${REPS:-3} --tune no-coop=1 2>&1 | quiet ;;
llama)
  model; llama_cuda_wait
  $LB -m $M/q4.gguf -ngl 99 -p 512,2048 -n 128 -r ${REPS:-3} 2>&1 | quiet
  ;;
sampled)
  model
  for i in 1 2; do
    for t in 0 0.8; do
      echo "-- tg128 --temp $t"
      $E bench --backend gpu -m $M/q4.gguf -p 0 -n 128 -r ${REPS:-3} --temp $t 2>&1 | quiet | grep -E "^sampling|tg128"
    done
  done
  ;;
depth)
  model
  $E bench --backend gpu -m $M/q4.gguf -p 0 -n 64 -d 4000 -r ${REPS:-3} 2>&1 | quiet
  llama_cuda_wait
  $LB -m $M/q4.gguf -ngl 99 -p 0 -n 64 -d 4000 -r ${REPS:-3} 2>&1 | quiet
  ;;
*) echo "unknown phase $phase" ;;
esac; done
