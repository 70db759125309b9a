#!/usr/bin/env bash
# Issue 10's race on the lent GPU host: ember's CPU-only decode, dense layer offload and the
# hot/cold hybrid against llama.cpp (CUDA build, same call, same machine), with the driver's
# memory (nvidia-smi, sampled every 100 ms) next to ember's own count.
#
# Run from the repository root on the device:
#   benches/device/hybrid_race.sh D PHASE...      PHASE: cpu cpuonly cpuvar offload hybrid rates long race4k variants hprofile coldbench stream
# D, a carried folder, holds: ember (release binary, stripped), tok.gguf (a 1-layer `ember synth`
# of the default model: the tokenizer llama.cpp needs), relu-0..30.profile.gguf and
# relu-30..60.profile.gguf (`ember profile` of SmolLM2-135M-ReLU on english_heldout windows 0..30
# and 30..60: the first places hot neurons, the second is drawn from), and llama-cpp.sh;
# .lc/lcsrc.tar.xz (`llama-cpp.sh fetch .lc`) and .gl (the Vulkan loader) are carried too.
# One model serves both engines: a 7B-shaped ReLU Q4_0 `ember synth` (llama.cpp runs it as a
# plain llama; the FFN's activation does not change its speed), and its PowerInfer conversion
# (transposed Q4_0 down) for the hybrid. Output: one log on stdout; each measured run is
# followed by "driver peak: X MiB over idle".
set -uo pipefail
D=$(realpath "$1"); shift
. benches/device/lib.sh; vulkan_setup
E=$D/ember; M=/tmp/models; mkdir -p $M
T=${THREADS:-16}; B=${BUDGET:-2.2}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)|L3"

# NO_LLAMA=1 skips llama.cpp (when device time is short; its rows are then missing).
llama_cuda_start $D
# LCCPU=1 also builds a CPU-only llama.cpp (the CPU yardstick), alongside, for phase cpuonly.
rm -f /tmp/lc-cpu-build.txt; [ "${LCCPU:-0}" = 1 ] || echo built > /tmp/lc-cpu-build.txt
[ "${LCCPU:-0}" = 1 ] && (mkdir -p /tmp/lcc-cpu && tar xJf .lc/lcsrc.tar.xz -C /tmp/lcc-cpu &&
 cd /tmp/lcc-cpu/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF > /tmp/lc-cpu-build.txt 2>&1 &&
 cmake --build build -j 8 --target llama-bench >> /tmp/lc-cpu-build.txt 2>&1; echo built >> /tmp/lc-cpu-build.txt) &
LBC=/tmp/lcc-cpu/llama.cpp/build/bin/llama-bench

echo "== models"; date
# A warm machine keeps the models of an earlier call.
[ -f $M/relu.gguf ] || $E synth --type q4_0 --act relu --tokenizer-from $D/tok.gguf -o $M/relu.gguf 2>&1 | tail -1
[ -f $M/relu-pi.gguf ] || $E convert -m $M/relu.gguf --powerinfer --down-t-type q4_0 -o $M/relu-pi.gguf 2>&1 | tail -1
date; llama_cuda_wait; until grep -q built /tmp/lc-cpu-build.txt; do sleep 2; done; date

IDLE=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
echo "driver idle: $IDLE MiB"
# measure NAME CMD...: runs CMD with nvidia-smi sampling, prints its output and the driver's peak.
measure() {
  local name=$1; shift
  echo; echo "== $name"; echo "\$ $*"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/smi.txt &
  local S=$!
  "$@" 2>&1 | grep -v -E "^ember: loaded|^$|^ggml_|^  Device|^build:|^llama_|^load|^print_info|^common_|^graph_|^sched_|^set_|^init|^system_info|^\.+$"
  kill $S; wait $S 2>/dev/null
  echo "driver peak: $(( $(sort -n /tmp/smi.txt | tail -1) - IDLE )) MiB over idle"
}
SIM="--ffn predict --simulate-activity $D/relu-30..60.profile.gguf --act-profile $D/relu-0..30.profile.gguf"

# DEADLINE=S skips the phases that would start after S seconds (a call has a fixed limit).
for phase in "$@"; do
  [ $SECONDS -gt ${DEADLINE:-999999} ] && { echo; echo "== $phase skipped: $SECONDS s elapsed"; continue; }
  case $phase in
cpu)
  measure "ember CPU only, $T threads" $E bench -m $M/relu.gguf --backend cpu -t $T -p 0 -n 32 -r ${REPS:-2}
  measure "llama.cpp CPU only, $T threads" $LB -m $M/relu.gguf -ngl 0 -nopo 1 -t $T -p 0 -n 32 -r ${REPS:-2}
  ;;
cpuonly)
  # The CPU yardstick proper: llama.cpp built without CUDA (LCCPU=1), alternating with ember.
  for i in 1 2; do
    measure "ember CPU only, $T threads ($i)" $E bench -m $M/relu.gguf --backend cpu -t $T -p 0 -n 32 -r ${REPS:-2}
    measure "llama.cpp CPU-only build, $T threads ($i)" $LBC -m $M/relu.gguf -t $T -p 0 -n 32 -r ${REPS:-2}
  done
  ;;
cpuvar)
  # ember's CPU tuning variants (EMBER_CPU_*: prefetch distance in bytes, huge pages off).
  for v in EMBER_CPU_PREFETCH=4096 EMBER_CPU_PREFETCH=65536 EMBER_CPU_HUGE=0; do
    measure "ember CPU only, $T threads, $v" env $v $E bench -m $M/relu.gguf --backend cpu -t $T -p 0 -n 32 -r ${REPS:-2}
  done
  measure "llama.cpp CPU only, $T threads (again)" $LB -m $M/relu.gguf -ngl 0 -nopo 1 -t $T -p 0 -n 32 -r ${REPS:-2}
  ;;
offload)
  measure "ember dense offload, --vram-budget $B" $E bench -m $M/relu.gguf -t $T --vram-budget $B -p 16 -n 64 -r ${REPS:-2}
  [ "${NO_LLAMA:-0}" = 1 ] || for n in ${OFFLOAD_NGL:-12 14 16}; do measure "llama.cpp -ngl $n" $LB -m $M/relu.gguf -ngl $n -t $T -p 16 -n 64 -r ${REPS:-2}; done
  ;;
hybrid)
  measure "ember hybrid $B GiB, charged predictor (recall 0.99, precision 0.3)" \
    $E bench -m $M/relu-pi.gguf $SIM --vram-budget $B -t $T -p 16 -n 64 -r ${REPS:-2}
  measure "ember hybrid $B GiB, free perfect predictor: UPPER BOUND" \
    $E bench -m $M/relu-pi.gguf $SIM --simulate-predictor perfect --vram-budget $B -t $T -p 0 -n 64 -r ${REPS:-2}
  ;;
rates)
  # The acceptance setting (-c 4096, a 512-token prompt) with the profile scaled to 25%, 10% and
  # 5% mean activity: what PowerInfer's sparser models would get. llama.cpp's rows (race4k) are
  # the same whatever the activity.
  for r in ${RATES:-25% 10% 5%}; do
    measure "ember hybrid $B GiB, charged predictor, profile scaled to $r mean activity, -c 4096 tg64 after 512" \
      $E bench -m $M/relu-pi.gguf $SIM --kv-depth 544 --simulate-predictor recall=0.99,precision=0.3,rate=$r --vram-budget $B -t $T -c 4096 -p 0 -n 64 -d 512 -r 1
  done
  ;;
long)
  measure "ember hybrid ${LONG_BUDGET:-4.4} GiB, charged predictor, -c 4096, pp512" \
    $E bench -m $M/relu-pi.gguf $SIM --vram-budget ${LONG_BUDGET:-4.4} -t $T -c 4096 -p 512 -n 32 -r 1
  measure "llama.cpp -ngl ${LONG_NGL:-24}, pp512 tg32" $LB -m $M/relu.gguf -ngl ${LONG_NGL:-24} -t $T -p 512 -n 32 -r ${REPS:-2}
  ;;
stream)
  # Batched hybrid prefill at the acceptance setting: a 512-token batch's cold neurons streamed
  # to the GPU (--stream-min-batch 32, the default) against computed on the CPU (0), alternating;
  # the bench's "hybrid prefill" line splits the time (CPU cold neurons, CPU attention, upload:
  # packing on the CPU and waiting for a slot, i.e. the GPU copying and computing). llama.cpp's
  # pp512 in the same call for the ratio.
  for v in 32 0 32; do
    measure "ember hybrid $B GiB, charged predictor, -c 4096 -p 512, --stream-min-batch $v" \
      $E bench -m $M/relu-pi.gguf $SIM --vram-budget $B -t $T -c 4096 -p 512 -n 8 -r 2 --stream-min-batch $v
  done
  [ "${NO_LLAMA:-0}" = 1 ] || measure "llama.cpp -ngl ${STREAM_NGL:-8}, -c 4096 -npp 512 -ntg 8" $LBB -m $M/relu.gguf -ngl ${STREAM_NGL:-8} -t $T -c 4096 -npp 512 -ntg 8 -npl 1
  ;;
coldbench)
  # The CPU half alone, on the whole 32-layer model (its o weights and caches, ~590 MB, do not
  # fit the host's L3 as a 4-layer model's did): the host-attention half of a token at depth
  # 544 (examples/host_attention_bench, carried as D/host_attention_bench), with equal shares
  # and with the hybrid's parts from a counter; the cold neurons (examples/cold_ffn_bench, D/
  # cold_ffn_bench) at the race's placement (36% hot), gathered against the dense cold gate.
  for a in "" "parts=4"; do $D/host_attention_bench $M/relu.gguf $(( T - 2 )) 544 $a | tail -1; done
  for c in 77.4 40; do $D/cold_ffn_bench $M/relu-pi.gguf $(( T - 2 )) 36 $c 24.2 | tail -3; done
  ;;
variants)
  # The acceptance setting's tg (as race4k) for variants of the hybrid's decode, alternating
  # with llama.cpp -ngl ${VARIANTS_NGL:-10} for ${VARIANTS_ROUNDS:-2} rounds. A variant is
  # "default" or comma-separated --tune KEY=VALUE pairs (hybrid-upload=0: queue.write_buffer
  # instead of upload slots; hybrid-submit=thread or main: a third thread or the main thread
  # submits the hot neurons instead of a team member) and t=N
  # (N threads instead of T); the variants of round i are VARIANTS_i, else VARIANTS.
  K="--kv-depth 544"
  for i in $(seq ${VARIANTS_ROUNDS:-2}); do
    v=VARIANTS_$i
    for m in ${!v:-${VARIANTS:-default}}; do
      tune=(); t=$T
      [ "$m" = default ] || for kv in ${m//,/ }; do case $kv in t=*) t=${kv#t=} ;; *) tune+=(--tune "$kv") ;; esac; done
      measure "ember hybrid $B GiB, charged predictor, -c 4096 tg64 after 512, $m ($i)" \
        $E bench -m $M/relu-pi.gguf $SIM $K --vram-budget $B -t $t -c 4096 -p 0 -n 64 -d 512 -r ${REPS:-2} "${tune[@]}"
    done
    [ "${NO_LLAMA:-0}" = 1 ] || measure "llama.cpp -ngl ${VARIANTS_NGL:-10}, -c 4096 -npp 512 -ntg 64 ($i)" $LBB -m $M/relu.gguf -ngl ${VARIANTS_NGL:-10} -t $T -c 4096 -npp 512 -ntg 64 -npl 1
  done
  ;;
hprofile)
  # Where a hybrid token's GPU time goes (timestamp queries per pass), at the race's setting.
  measure "ember hybrid $B GiB, charged predictor, -c 4096, GPU profile of one token" \
    $E bench -m $M/relu-pi.gguf $SIM --vram-budget $B -t $T -c 4096 -p 0 -n 64 -r 1 --profile
  ;;
race4k)
  # The acceptance setting: -c 4096, a 512-token prompt, the budget B; llama.cpp at several
  # -ngl to bracket ember's driver peak (the same driver-measured memory). llama-batched-bench
  # generates after its prompt, so ember's tg runs at -d 512 (its pp512 from an empty cache),
  # both with the placement for that workload (--kv-depth 544: 512 + half of 64).
  K="--kv-depth 544"
  measure "ember hybrid $B GiB, charged predictor (recall 0.99, precision 0.3), -c 4096 pp512" \
    $E bench -m $M/relu-pi.gguf $SIM $K --vram-budget $B -t $T -c 4096 -p 512 -n 0 -r ${REPS:-2}
  [ "${SKIP_TG4K:-0}" = 1 ] || measure "ember hybrid $B GiB, charged predictor (recall 0.99, precision 0.3), -c 4096 tg64 after 512" \
    $E bench -m $M/relu-pi.gguf $SIM $K --vram-budget $B -t $T -c 4096 -p 0 -n 64 -d 512 -r ${REPS:-2}
  measure "ember hybrid $B GiB, free perfect predictor, -c 4096 tg64 after 512: UPPER BOUND" \
    $E bench -m $M/relu-pi.gguf $SIM $K --simulate-predictor perfect --vram-budget $B -t $T -c 4096 -p 0 -n 64 -d 512 -r 1
  [ "${SKIP_OFFLOAD4K:-0}" = 1 ] || measure "ember dense offload $B GiB, -c 4096 tg64 after 512" \
    $E bench -m $M/relu.gguf --vram-budget $B -t $T -c 4096 -p 0 -n 64 -d 512 -r 1
  [ "${NO_LLAMA:-0}" = 1 ] || for n in ${RACE_NGL-6 8 10 12}; do
    measure "llama.cpp -ngl $n, -c 4096 -npp 512 -ntg 64" $LBB -m $M/relu.gguf -ngl $n -t $T -c 4096 -npp 512 -ntg 64 -npl 1
  done
  ;;
esac; done
