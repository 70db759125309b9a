#!/usr/bin/env bash
# Issue 11's batched GPU decode on the lent GPU host: the few-token matvec (matmul_dec.wgsl's
# dvt_main: the decode kernel's slots, each weight read once per step for up to 16 sequences)
# measured as the aggregate tg of P sequences through GpuBatch::step (`ember bench --parallel P`)
# against one sequence's queued decode (tg32), on the 7B-shaped Q4_0 `ember synth` model.
# The acceptance: tg32 x8 >= 4 x tg32.
#
# Run from the repository root on the device:
#   benches/device/batch_mv.sh D [PHASE...]     PHASE: scale profile kernels shapes llama
#                                                (default: scale profile kernels shapes)
# D, a carried folder, holds ember (release binary) and tok.gguf (a 1-layer `ember synth` of the
# default model: its tokenizer), as for serve.sh and hybrid_race.sh. Phase llama needs
# llama.cpp's CUDA build (lib.sh: built here, ~3.5 min, unless an earlier script built it).
# Expected run: the model ~1 min unless /tmp/models/q4.gguf is there from an earlier call, then
# ~5-15 s per bench (22 of them) and ~2 min of kernel table: ~5-7 minutes in all. DEADLINE=S
# skips the phases that would start after S seconds (shapes comes last for that reason).
#
#   scale    tg32 and tg32 xP for P = 2, 4, 8, 16 (the default kernel: groups of up to 16 tokens,
#            64 threads x 2 rows, groups of up to 8, prefetch); then the same at --gpu-precision
#            q8, whose batched products run the integer few-token kernel (matmul_kq_tok.wgsl:
#            8-bit activations quantised once per workgroup for 32 rows, groups of up to 8
#            tokens) and whose tg32 is the one-token integer kernel's: the acceptance's ratio at q8
#   profile  P = 8 with --profile: the batched step's per-dispatch times and GB/s (matmul rows),
#            and its wall time per step on the host clock (the rest of 1 / (t/s) is the host's)
#   kernels  `ember bench --batch-kernels`: a 7B layer's products at 1, 2, 4, 8, 16 tokens for
#            Q4_0, Q4_1, Q8_0, F16, each checked against the tiled kernel (the column must be
#            ~1e-6, as on lavapipe; a driver that miscompiles the kernel shows ~1 or inf),
#            weight GB/s, and 32 layers' products as an upper bound of the aggregate t/s; for
#            Q4_0 and Q4_1 also the integer kernel's rows ("integer kq NR:RG[:PF[:THREADS]]") at
#            2, 4, 8, 16 tokens for registers and workgroup-memory shapes (its column is 8-bit
#            activations' ~1e-2, not ~1e-6)
#   shapes   P = 8 with other shapes (--tune mv-batch=threads:rows, MV_SHAPES), the earlier units
#            kernel (mv-batch-kernel=units, the 124 t/s of 1b515c4), P = 16 in two groups of 8
#            (mv-batch-nt=8); EXTRA=1 adds P = 8 without prefetch (mv-batch-pf=0). Then the
#            integer kernel at --gpu-precision q8, P = 8, per KQ_SHAPES (mv-batch-kq=nr:rg[:pf
#            [:threads]]: rows per step, steps per workgroup, prefetch, threads > 0 staging the
#            activations in workgroup memory), P = 16 as one group of 16 (mv-batch-nt=16), and
#            q8 with the blocks few-token kernel (mv-batch-kernel=blocks: f32 activations, the
#            same one-token kernel) for the comparison at equal tg32
#   llama    llama.cpp's llama-batched-bench (CUDA), all layers on the GPU, 1, 2, 4, 8 and 16
#            sequences (its S_TG t/s at each is the aggregate to compare with tg32 xP)
set -uo pipefail
D=$(realpath "$1"); shift
[ $# -eq 0 ] && set -- scale profile kernels shapes
. benches/device/lib.sh; vulkan_setup
E=$D/ember; M=/tmp/models; mkdir -p $M
N=${NGEN:-32}; R=${REPS:-1}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
git log -1 --format='ember commit %h' 2>/dev/null

echo "== model"; date
[ -f $M/q4.gguf ] || $E synth --type q4_0 --tokenizer-from $D/tok.gguf -o $M/q4.gguf 2>&1 | tail -1
date
# bench P [ARGS...]: tg32 and tg32 xP (its table rows), -c 256, ARGS added.
bench() {
  local p=$1; shift
  echo; echo "== GPU, --parallel $p $*"
  $E bench -m $M/q4.gguf --backend gpu -c 256 -p 0 -n $N -r $R --parallel $p "$@" 2>&1 | grep -E "^\| .*tg|^ember: GPU|^error|rror:"
}
for phase in "$@"; do
  [ $SECONDS -gt ${DEADLINE:-999999} ] && { echo; echo "== $phase skipped: $SECONDS s elapsed"; continue; }
  case $phase in
scale)
  for P in 2 4 8 16; do bench $P; done
  for P in 2 4 8 16; do bench $P --gpu-precision q8; done
  ;;
profile)
  # The batched step's table comes first (after "the batched step of 8 sequences"), then the
  # one-token decode's; both printed whole.
  echo; echo "== GPU, --parallel 8 --profile"
  $E bench -m $M/q4.gguf --backend gpu -c 256 -p 0 -n $N -r $R --parallel 8 --profile 2>&1 | grep -v -E "^ember: loaded|^$"
  ;;
kernels)
  echo; echo "== ember bench --batch-kernels"
  $E bench --backend gpu --batch-kernels 2>&1 | grep -v -E "^$"
  ;;
shapes)
  for MV in ${MV_SHAPES-32:4 128:4 64:8}; do bench 8 --tune mv-batch=$MV; done
  bench 8 --tune mv-batch-kernel=units
  bench 16 --tune mv-batch-nt=8
  [ "${EXTRA:-0}" = 1 ] && bench 8 --tune mv-batch-pf=0
  for KQ in ${KQ_SHAPES-2:16 4:8 2:16:1 1:32 2:8:0:64 4:4:0:64}; do bench 8 --gpu-precision q8 --tune mv-batch-kq=$KQ; done
  bench 16 --gpu-precision q8 --tune mv-batch-nt=16
  bench 8 --gpu-precision q8 --tune mv-batch-kernel=blocks
  ;;
llama)
  llama_cuda_start $D; llama_cuda_wait
  echo; echo "== llama.cpp llama-batched-bench, all layers on the GPU, 1, 2, 4, 8 and 16 sequences"
  $LBB -m $M/q4.gguf -ngl 99 -c 4096 -npp 1 -ntg $N -npl 1,2,4,8,16 2>&1 | grep -E "^\||PP|TG"
  ;;
*) echo "unknown phase $phase" ;;
  esac
done
date
