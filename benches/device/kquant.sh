#!/usr/bin/env bash
# Issue 12's GPU bar on the lent GPU host: a 7B-shaped Q4_K_M model (`ember synth --type q4_k_m`:
# llama.cpp's mix of Q4_K, and Q6_K for output, and attn_v and ffn_down in the layers
# llama-quantize gives more bits) decoded by ember (--backend gpu: the weights stay Q4_K/Q6_K
# on the GPU) and by llama.cpp CUDA (`llama-bench -ngl 99 -p 0 -n 128`), alternately, in the
# same call; then ember's achieved weight-read bandwidth as a fraction of `ember bench
# --copy-bandwidth` (bytes read + written per second by a plain copy on the same card).
#
# Run from the repository root on the device:
#   benches/device/kquant.sh D
# D, a carried folder, holds: ember (release binary, stripped), tok.gguf (a 1-layer `ember synth`
# of the default model: the tokenizer llama.cpp needs) and llama-cpp.sh (shared/tools); the
# carried .lc/lcsrc.tar.xz (`llama-cpp.sh fetch .lc`) and .gl (the Vulkan loader) too, as for
# hybrid_race.sh. About 3.5 minutes of llama.cpp build (overlapping the synth), then ~2.5 minutes.
# NO_LLAMA=1 skips llama.cpp. Output: one log on stdout.
set -uo pipefail
D=$(realpath "$1"); shift
. benches/device/lib.sh; vulkan_setup
E=$D/ember; M=/tmp/models; mkdir -p $M
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
llama_cuda_start $D

echo "== model"; date
[ -f $M/q4km.gguf ] || $E synth --type q4_k_m --tokenizer-from $D/tok.gguf -o $M/q4km.gguf 2>&1 | tail -1
$E info $M/q4km.gguf 2>&1 | grep -E "Q4_K|Q6_K|converted" | head -5
date; llama_cuda_wait; date

echo; echo "== copy bandwidth"
$E bench --backend gpu --copy-bandwidth 2>&1 | grep -E "^device|^copy bandwidth" | tee /tmp/copy.txt
COPY=$(grep -oE "copy bandwidth: [0-9.]+" /tmp/copy.txt | grep -oE "[0-9.]+$")

for i in 1 2; do
  echo; echo "== ember --backend gpu, tg128 ($i)"
  $E bench -m $M/q4km.gguf --backend gpu -p 0 -n 128 -r ${REPS:-3} 2>&1 | grep -v "^ember: loaded\|^$" | tee /tmp/ember-$i.txt
  # Q4_K and Q6_K on the integer kernel (shaders/matmul_kq.wgsl, llama.cpp's 8-bit activations).
  echo; echo "== ember --backend gpu --gpu-precision q8, tg128 ($i)"
  $E bench -m $M/q4km.gguf --backend gpu --gpu-precision q8 -p 0 -n 128 -r ${REPS:-3} 2>&1 | grep -v "^ember: loaded\|^$" | tee /tmp/ember-q8-$i.txt
  [ "${NO_LLAMA:-0}" = 1 ] || { echo; echo "== llama.cpp CUDA -ngl 99, tg128 ($i)"; $LB -m $M/q4km.gguf -ngl 99 -p 0 -n 128 -r ${REPS:-3} 2>&1 | grep -E "^\|"; }
done

# The grouped types' decode kernel shapes (EMBER_MV_DEC=type=threads:rows:slots:prefetch; the
# default for Q4_K and Q6_K is 32:2:1:1, chosen for Q4_0 on an H200, never measured for these):
# SWEEP=0 skips.
[ "${SWEEP:-1}" = 1 ] && for v in 64:2:1:1 128:2:1:1 64:4:1:1 128:1:2:1; do
  echo; echo "== ember --backend gpu, tg128, --tune mv-dec=q4_k=$v,q6_k=$v"
  $E bench -m $M/q4km.gguf --backend gpu -p 0 -n 128 -r 2 --tune mv-dec=q4_k=$v,q6_k=$v 2>&1 | grep tg128
done
# The integer kernel's shapes (kq:rows per step:steps:prefetch:limbs; the q8 default is kq:8:4:0:1,
# taken from Q4_0, never measured for Q4_K/Q6_K). KQSWEEP=0 skips.
[ "${KQSWEEP:-1}" = 1 ] && for v in kq:4:4:0:1 kq:8:2:0:1 kq:8:4:1:1 kq:4:8:0:1 kq:8:4:0:3; do
  echo; echo "== ember --backend gpu --gpu-precision q8, tg128, --tune mv-dec=q4_k=$v,q6_k=$v"
  $E bench -m $M/q4km.gguf --backend gpu --gpu-precision q8 -p 0 -n 128 -r 2 --tune mv-dec=q4_k=$v,q6_k=$v 2>&1 | grep tg128
done

# Weight bytes read per decoded token: the file's tensors less the embedding table (one row is
# read); the KV cache's reads (at most 64 MiB at position 128) are left out.
SIZE=$(stat -c %s $M/q4km.gguf); EMB=$((4096 * 49152 * 144 / 256))
for i in 1 2; do
  TG=$(grep -E "^\|.*\| tg128 \|" /tmp/ember-$i.txt | awk -F'|' '{print $8}' | awk '{print $1}')
  [ -n "$TG" ] && [ -n "$COPY" ] && awk -v s=$SIZE -v e=$EMB -v tg=$TG -v c=$COPY 'BEGIN { bw = (s - e) * tg / 1e9; printf "ember run %s: %.1f t/s x %.2f GB = %.0f GB/s of weights, %.0f%% of the copy bandwidth (%.0f GB/s)\n", "'$i'", tg, (s - e) / 1e9, bw, 100 * bw / c, c }'
done
