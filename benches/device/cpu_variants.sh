#!/bin/bash
# One device call (issue 10, CPU decode at 16 threads): llama.cpp's CPU build (llama-bench only)
# in the background while `ember synth` writes the 7B-shaped ReLU Q4_0 model; then a stream-read
# bandwidth test; then rounds of llama.cpp and ember variants (EMBER_CPU_* tuning) alternately.
# Usage (repo root on the device): benches/device/cpu_variants.sh D, where D holds ember (release,
# stripped) and tok.gguf; .lc/lcsrc.tar.xz is carried. Not yet run (no device machine came, 2026-12-06).
D=$(realpath "$1"); L=$OUT/log.txt
T0=$SECONDS; el() { echo $((SECONDS - T0)); }
{ lscpu; nproc; cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag; free -g; } > $OUT/host.txt 2>&1
mkdir -p /tmp/lc && tar xJf .lc/lcsrc.tar.xz -C /tmp/lc
(cd /tmp/lc/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > /tmp/lc_cmake.log 2>&1 && cmake --build build -j 16 --target llama-bench > /tmp/lc_build.log 2>&1; echo "llama.cpp build rc $? at $(el) s" >> $L) &
gcc -O3 -march=native -pthread -o /tmp/stream $(dirname "$0")/stream_read.c >> $L 2>&1
$D/ember synth --act relu -o /tmp/7b.gguf --tokenizer-from $D/tok.gguf >> $L 2>&1
echo "synth done at $(el) s" >> $L
wait
tail -2 /tmp/lc_build.log >> $L
for h in 1 0; do /tmp/stream 16 4096 $h >> $L 2>&1; done
/tmp/stream 8 4096 1 >> $L 2>&1
LB=/tmp/lc/llama.cpp/build/bin/llama-bench
ember() { echo "== ember $1 at $(el) s" >> $L; shift; env EMBER_CPU_TIMES=1 "$@" $D/ember bench -m /tmp/7b.gguf --backend cpu -p 0 -n 32 -r 2 -t 16 2>&1 | grep -v "^$\|^| ---\|^| model\|^context" >> $L; }
llama() { echo "== llama.cpp at $(el) s" >> $L; $LB -m /tmp/7b.gguf -ngl 0 -nopo 1 -t 16 -p 0 -n 32 -r 2 2>&1 | grep "tg32" >> $L; }
for i in 1 2 3 4; do
  [ $(el) -gt 300 ] && break
  echo "### round $i at $(el) s" >> $L
  llama
  ember default
  ember no-huge EMBER_CPU_HUGE=0
  ember parts4 EMBER_CPU_PARTS=4
  [ $(el) -gt 320 ] && break
  ember pf0 EMBER_CPU_PREFETCH=0
  ember pf4k EMBER_CPU_PREFETCH=4096
  ember pf64k EMBER_CPU_PREFETCH=65536
  ember parts2-pf4k EMBER_CPU_PARTS=2 EMBER_CPU_PREFETCH=4096
  llama
done
echo "end at $(el) s" >> $L
cat $L
