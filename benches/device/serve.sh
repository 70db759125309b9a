#!/usr/bin/env bash
# Issue 11's parallel decoding on the lent GPU host: aggregate tg of 8 sequences decoding
# together against one (`ember bench --parallel`, the decode step `ember serve --parallel 8`
# runs), on the 7B-shaped Q4_0 `ember synth` model, GPU and CPU, with llama.cpp's
# llama-batched-bench (CUDA build) in the same call where it is built.
#
# Run from the repository root on the device:
#   benches/device/serve.sh D [PHASE...]      PHASE: gpu cpu single llama (default: gpu cpu)
# D, a carried folder, holds ember (release binary) and tok.gguf (a 1-layer `ember synth` of the
# default model: its tokenizer), as for hybrid_race.sh. Phase llama needs llama.cpp's CUDA build
# (lib.sh: built here, ~3.5 min, unless an earlier script built it or it was carried).
# Expected run: ~3-4 minutes (the synth model ~1 min, each bench ~20-40 s); phase gpu alone
# ~2.5 minutes after the model.
set -uo pipefail
D=$(realpath "$1"); shift
[ $# -eq 0 ] && set -- gpu cpu
. benches/device/lib.sh; vulkan_setup
E=$D/ember; M=/tmp/models; mkdir -p $M
T=${THREADS:-16}; N=${NGEN:-32}; R=${REPS:-2}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
git log -1 --format='ember commit %h' 2>/dev/null

echo "== model"; date
[ -f $M/q4.gguf ] || $E synth --type q4_0 --tokenizer-from $D/tok.gguf -o $M/q4.gguf 2>&1 | tail -1
date
for phase in "$@"; do
  case $phase in
gpu)
  # tg32 (one sequence, the GPU's queued greedy decode), then 1 and 8 sequences through
  # decode_batch (greedy on the host, as the server samples). The GPU batches the 8
  # (engine::gpu_batch: each step's products over all rows, then one RoPE and one attention
  # dispatch per layer for every row against its own cache), so the x8 row's tokens/s against
  # the x1 row (and against tg32, the queued single stream) is the acceptance's ratio (>= 4x).
  # Then the 8 with
  # other shapes of the few-token matvec (--tune mv-batch=threads:rows; default 64:2 on the
  # blocks kernel; batch_mv.sh compares more), to tell which the default should be.
  for P in 1 8; do
    echo; echo "== GPU, --parallel $P"
    $E bench -m $M/q4.gguf --backend gpu -c 256 -p 0 -n $N -r $R --parallel $P 2>&1 | grep -E "^\||^ember: GPU|context"
  done
  for MV in ${MV_SHAPES-128:2 128:8 64:8}; do
    echo; echo "== GPU, --parallel 8, --tune mv-batch=$MV"
    $E bench -m $M/q4.gguf --backend gpu -c 256 -p 0 -n $N -r $R --parallel 8 --tune mv-batch=$MV 2>&1 | grep -E "x8"
  done
  ;;
cpu)
  # The CPU batches: weights read once per step for all 8.
  for P in 1 8; do
    echo; echo "== CPU, $T threads, --parallel $P"
    $E bench -m $M/q4.gguf --backend cpu -t $T -c 256 -p 0 -n 16 -r 1 --parallel $P 2>&1 | grep -E "^\||context"
  done
  ;;
single)
  # One stream through the server against `ember run` (issue 11: within 5%), GPU, the same
  # prompt, greedy, 128 tokens, alternating: `ember run`'s "generation ... t/s" against the
  # server's own "generated N at X t/s" for each request (the same span), and the client's
  # time to first text (benches/device/sse_client.py). A server of 1 slot and one of 8 (a
  # request alone in a multi-slot session decodes in the backend's own loop, as `run` does).
  PROMPT="The history of the Roman Empire began"
  for SP in 1 8; do
    echo; echo "== GPU, one stream, ember serve --parallel $SP against ember run"
    $E serve -m $M/q4.gguf --backend gpu --parallel $SP -c 512 --port 8091 > /tmp/serve.log 2>&1 &
    SPID=$!
    for w in $(seq 120); do
      (exec 3<>/dev/tcp/127.0.0.1/8091) 2>/dev/null && break
      sleep 1; kill -0 $SPID 2>/dev/null || break
    done
    for i in $(seq ${REPS:-3}); do
      $E run -m $M/q4.gguf --backend gpu -c 512 -p "$PROMPT" -n 128 --temp 0 2>&1 > /dev/null | grep -E "generation" | sed 's/^/run:    /'
      if command -v python3 > /dev/null; then python3 benches/device/sse_client.py 8091 "$PROMPT" 128
      else curl -sN 127.0.0.1:8091/v1/completions -d "{\"prompt\":\"$PROMPT\",\"max_tokens\":128,\"temperature\":0,\"stream\":true}" > /dev/null; fi
      sleep 0.5; grep -E "generated" /tmp/serve.log | tail -1 | sed 's/^/serve:  /'
    done
    kill $SPID; wait $SPID 2>/dev/null
  done
  ;;
llama)
  llama_cuda_start $D; llama_cuda_wait
  echo; echo "== llama.cpp llama-batched-bench, all layers on the GPU, 1 and 8 sequences"
  $LBB -m $M/q4.gguf -ngl 99 -c 4096 -npp 1 -ntg $N -npl 1,8 2>&1 | grep -E "^\||PP|TG"
  ;;
*) echo "unknown phase $phase" ;;
  esac
done
date
