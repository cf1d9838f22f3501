#!/usr/bin/env bash
# The reliability jobs of CI (issue 7), in about 12 minutes on 2 cores:
#   1. the whole test suite under AddressSanitizer + UndefinedBehaviorSanitizer (the
#      `asan` preset; the exhaustive tanh test is left to the release run, the fuzz
#      target's replay to step 4, the compile-only header_warnings to step 3), built
#      with the default compiler (GCC);
#   2. the same with clang (`asan-clang`): the release suite is GCC's, so this is where
#      every test is also compiled and run by the other compiler (about 2 minutes);
#   3. the concurrency test under ThreadSanitizer, and in the same clang build the
#      header_warnings target (the headers under -Wconversion -Wsign-conversion ...
#      -Werror; the release build compiles it with GCC);
#   4. the libFuzzer target (ASan + UBSan) for FUZZ_SECONDS (default 120) from the
#      seed corpus, reporting executions per second and in total;
#   5. clang-tidy (.clang-tidy) over the headers, with the fuzz target's translation
#      units: they instantiate every layer for every scalar type, rank 1-3, both
#      layouts, forward and backward, on both devices (run alongside the fuzzer).
# Build directories: build/asan (the preset's), build/asan-clang, build/tsan, build/fuzz,
# build/tidy.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-2}"
FUZZ_SECONDS="${FUZZ_SECONDS:-120}"
# Which jobs to run (all by default, as .ci/run does).
STEPS=" ${STEPS:-asan asan-clang tsan fuzz tidy} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

step() { printf '\n==== %s (%s)\n' "$1" "$(date +%T)"; }

if want asan; then
step "1/5 ASan + UBSan: build and run the test suite"
cmake --preset asan -DNORMKIT_BUILD_EXAMPLES=OFF
cmake --build --preset asan -j "$JOBS"
ASAN_OPTIONS="detect_leaks=1:strict_string_checks=1:check_initialization_order=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  ctest --preset asan -j "$JOBS" --label-exclude exhaustive

fi

if want asan-clang; then
step "2/5 ASan + UBSan with clang: build and run the test suite"
cmake --preset asan -B build/asan-clang -DCMAKE_CXX_COMPILER=clang++ -DNORMKIT_BUILD_EXAMPLES=OFF
cmake --build build/asan-clang -j "$JOBS"
ASAN_OPTIONS="detect_leaks=1:strict_string_checks=1:check_initialization_order=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  ctest --test-dir build/asan-clang -j "$JOBS" --label-exclude exhaustive --output-on-failure --no-tests=error

fi

if want tsan; then
step "3/5 TSan: concurrent use of one layer and one ThreadPoolDevice; header_warnings (and _mpi) with clang"
cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
  -DNORMKIT_BUILD_BENCH=OFF -DNORMKIT_PEERS=OFF -DNORMKIT_BUILD_EXAMPLES=OFF
# header_warnings_mpi (mpi.hpp under the same warnings) exists where MPI was found.
warn_targets="header_warnings"
if ninja -C build/tsan -t targets all 2>/dev/null | grep -q '^header_warnings_mpi:'; then
  warn_targets="$warn_targets header_warnings_mpi"
fi
cmake --build build/tsan -j "$JOBS" --target test_concurrency $warn_targets
TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" build/tsan/tests/test_concurrency

fi

# clang-tidy (.clang-tidy) over the headers, through the fuzz target's translation units:
# one per scalar type, each instantiating every layer for ranks 1-3, both layouts,
# forward and backward, on both devices. It needs one core for a few minutes, so with the
# fuzzer it runs in the background, on the core the fuzzer (one process) leaves free.
tidy_pid=
if want tidy; then
step "5/5 clang-tidy over include/normkit (started; its result is printed at the end)"
cmake -S . -B build/tidy -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DNORMKIT_BUILD_BENCH=OFF -DNORMKIT_PEERS=OFF -DNORMKIT_BUILD_EXAMPLES=OFF >/dev/null
tidy_jobs=1
want fuzz || tidy_jobs="$JOBS"
( start=$SECONDS status=0
  printf '%s\n' tests/fuzz/fuzz_*.cpp | xargs -P "$tidy_jobs" -n 1 \
    clang-tidy -p build/tidy --quiet --warnings-as-errors='*' >build/tidy/tidy.log 2>&1 || status=$?
  echo "clang-tidy: exit status $status after $((SECONDS - start)) s" >>build/tidy/tidy.log
  exit $status ) &
tidy_pid=$!
fi

fuzz_status=0
if want fuzz; then
step "4/5 libFuzzer: ${FUZZ_SECONDS} s from tests/fuzz/corpus"
# -O1: the target instantiates all layers x 4 types x 3 ranks x 2 layouts x 2 devices
# under ASan + UBSan + coverage; -O2 costs much more build time than it gains in exec/s.
cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O1" \
  -DCMAKE_CXX_COMPILER=clang++ \
  -DNORMKIT_BUILD_FUZZ=ON -DNORMKIT_BUILD_BENCH=OFF -DNORMKIT_PEERS=OFF -DNORMKIT_BUILD_EXAMPLES=OFF
start=$SECONDS
cmake --build build/fuzz -j "$JOBS" --target fuzz_layers
echo "fuzz: built in $((SECONDS - start)) s"
# New inputs go to a scratch corpus; the seeds in the repo stay as they are.
rm -rf build/fuzz/corpus && mkdir -p build/fuzz/corpus
log=build/fuzz/fuzz.log
set +e
ASAN_OPTIONS="detect_leaks=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  build/fuzz/tests/fuzz_layers -max_total_time="$FUZZ_SECONDS" -max_len=4096 -timeout=20 -rss_limit_mb=4096 \
  -print_final_stats=1 -artifact_prefix=build/fuzz/ build/fuzz/corpus tests/fuzz/corpus >"$log" 2>&1
fuzz_status=$?
set -e
grep -E '^#[0-9]+ +(INITED|DONE|pulse)|ERROR|normkit fuzz|  case:|  input:|SUMMARY' "$log" || true
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
echo "fuzz: ${execs:-?} executions in ${FUZZ_SECONDS} s, ${rate:-?} exec/s, exit status $fuzz_status"
if [ "$fuzz_status" != 0 ]; then
  echo "fuzz: failure; the input is in build/fuzz/ (crash-*), replay it with build/fuzz/tests/fuzz_layers <file>"
  tail -n 60 "$log"
fi
fi

tidy_status=0
if [ -n "$tidy_pid" ]; then
  wait "$tidy_pid" || tidy_status=$?
  cat build/tidy/tidy.log
  if [ "$tidy_status" = 0 ]; then echo "clang-tidy: clean"; else echo "clang-tidy: findings above"; fi
fi
[ "$fuzz_status" = 0 ] && [ "$tidy_status" = 0 ]
