#!/usr/bin/env bash
# The reliability jobs of CI (issue 7), in about 10 minutes on 2 cores:
#   1. the whole test suite under AddressSanitizer + UndefinedBehaviorSanitizer (the
#      `asan` preset; the exhaustive tanh test is left to the release run);
#   2. the concurrency test under ThreadSanitizer;
#   3. the libFuzzer target (ASan + UBSan) for FUZZ_SECONDS (default 120) from the
#      seed corpus, reporting executions per second and in total;
#   4. clang-tidy (.clang-tidy) over the headers, with the fuzz target as the
#      translation unit: it instantiates every layer for every scalar type, rank 1-3,
#      both layouts, forward and backward, on both devices.
# Build directories: build/asan (the preset's), build/tsan, build/fuzz, build/tidy.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-2}"
FUZZ_SECONDS="${FUZZ_SECONDS:-120}"
# Which jobs to run (all by default). .ci/run runs "asan tsan" for now: the fuzzer finds a
# BatchNorm<double> mismatch beyond its tolerance within seconds and clang-tidy has not
# been verified clean in CI yet (issue 7 stays open for both).
STEPS=" ${STEPS:-asan tsan fuzz tidy} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

step() { printf '\n==== %s (%s)\n' "$1" "$(date +%T)"; }

if want asan; then
step "1/4 ASan + UBSan: build and run the test suite"
cmake --preset asan -DNORMKIT_BUILD_EXAMPLES=OFF
cmake --build --preset asan -j "$JOBS"
ASAN_OPTIONS="detect_leaks=1:strict_string_checks=1:check_initialization_order=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  ctest --preset asan -j "$JOBS" --label-exclude exhaustive

fi

if want tsan; then
step "2/4 TSan: concurrent use of one layer and one ThreadPoolDevice"
cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
  -DNORMKIT_BUILD_BENCH=OFF -DNORMKIT_BUILD_EXAMPLES=OFF
cmake --build build/tsan -j "$JOBS" --target test_concurrency
TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" build/tsan/tests/test_concurrency

fi

if want fuzz; then
step "3/4 libFuzzer: ${FUZZ_SECONDS} s from tests/fuzz/corpus"
cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DNORMKIT_BUILD_FUZZ=ON -DNORMKIT_BUILD_BENCH=OFF -DNORMKIT_BUILD_EXAMPLES=OFF
cmake --build build/fuzz -j "$JOBS" --target fuzz_layers
# New inputs go to a scratch corpus; the seeds in the repo stay as they are.
rm -rf build/fuzz/corpus && mkdir -p build/fuzz/corpus
log=build/fuzz/fuzz.log
set +e
ASAN_OPTIONS="detect_leaks=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  build/fuzz/tests/fuzz_layers -max_total_time="$FUZZ_SECONDS" -max_len=4096 -timeout=20 -rss_limit_mb=4096 \
  -print_final_stats=1 -artifact_prefix=build/fuzz/ build/fuzz/corpus tests/fuzz/corpus 2>&1 | tee "$log" | grep -E '^#[0-9]+ +(INITED|DONE|pulse)|ERROR|normkit fuzz|SUMMARY'
status=${PIPESTATUS[0]}
set -e
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
echo "fuzz: ${execs:-?} executions in ${FUZZ_SECONDS} s, ${rate:-?} exec/s, exit status $status"
if [ "$status" != 0 ]; then
  echo "fuzz: failure; the crashing input is in build/fuzz/ (crash-*), replay it with build/fuzz/tests/fuzz_layers <file>"
  exit 1
fi

fi

if want tidy; then
step "4/4 clang-tidy over include/normkit"
cmake -S . -B build/tidy -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DNORMKIT_BUILD_BENCH=OFF -DNORMKIT_BUILD_EXAMPLES=OFF >/dev/null
clang-tidy -p build/tidy --quiet --warnings-as-errors='*' tests/fuzz/fuzz_layers.cpp
echo "clang-tidy: clean"
fi
