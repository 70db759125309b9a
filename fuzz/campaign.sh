#!/bin/sh
# One fuzz campaign, as FUZZING.md reports them: run from the repository root after
# `cargo +nightly fuzz build -s none` (in fuzz/) and writing the seed corpora (FUZZING.md).
#
#   fuzz/campaign.sh TARGET SECONDS [MAX_LEN]
#
# At the lowest priority (it takes only idle CPU; NICE=N sets another, e.g. -10 to give the
# campaign a core of a busy machine), in fork mode so that a crash, time-out or
# out-of-memory is recorded under fuzz/artifacts/TARGET/ and the campaign goes on; it ends by
# itself after SECONDS. The log goes to fuzz/logs/TARGET.log, ending with the CPU time used.
set -eu
target=$1
seconds=$2
max_len=${3:-65536}
bin=fuzz/target/x86_64-unknown-linux-gnu/release/$target
mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target" fuzz/logs
exec /usr/bin/time -f "campaign $target: cpu user %U s, sys %S s, wall %e s, max rss %M KiB" \
    nice -n "${NICE:-19}" "$bin" -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len="$max_len" \
    -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 \
    "fuzz/corpus/$target" > "fuzz/logs/$target.log" 2>&1
