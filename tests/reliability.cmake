# Reliability (issue 7): adversarial numerics and error-path state of every layer,
# concurrent use of one layer and one device, and the fuzz target's corpus replay.
normkit_add_test(test_adversarial SOURCES test_adversarial.cpp LABELS unit reliability)
normkit_add_test(test_concurrency SOURCES test_concurrency.cpp LABELS unit reliability concurrency)

# The fuzz target's decoder and checks run in every build, without clang: a plain
# program that replays the seed corpus and the first NORMKIT_FUZZ_REPLAY_INPUTS inputs of
# a fixed pseudo-random sequence (which hold the BatchNorm, DyT, LayerNorm and RMSNorm
# defects it found, now fixed; 600000 take ~30 s in a release build, and 1.5 million
# passed in session 7). A Debug build runs them ~25x slower, so the debug preset replays
# 100000. The asan preset builds no replay (NORMKIT_FUZZ_REPLAY off): CI's libFuzzer job
# runs the same target, corpus first, under ASan + UBSan, and its four translation units
# were a third of the sanitizer build's time.
option(NORMKIT_FUZZ_REPLAY "Build the fuzz target as a plain program and replay it as a test" ON)
set(NORMKIT_FUZZ_REPLAY_INPUTS 600000 CACHE STRING "Pseudo-random inputs FuzzLayersReplay runs after the corpus")
set(NORMKIT_FUZZ_SOURCES fuzz/fuzz_layers.cpp fuzz/fuzz_float.cpp fuzz/fuzz_double.cpp fuzz/fuzz_half.cpp
                         fuzz/fuzz_bfloat16.cpp)
if(NORMKIT_FUZZ_REPLAY)
  add_executable(fuzz_layers_replay ${NORMKIT_FUZZ_SOURCES})
  target_compile_definitions(fuzz_layers_replay PRIVATE NORMKIT_FUZZ_REPLAY)
  target_link_libraries(fuzz_layers_replay PRIVATE normkit::normkit normkit_dev_flags)
  add_test(NAME FuzzLayersReplay
           COMMAND fuzz_layers_replay ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/corpus --random ${NORMKIT_FUZZ_REPLAY_INPUTS})
  set_tests_properties(FuzzLayersReplay PROPERTIES LABELS "unit;reliability;fuzz")
endif()

# The libFuzzer target itself (clang): scripts/ci-sanitizers.sh runs it for a bounded time.
option(NORMKIT_BUILD_FUZZ "Build the libFuzzer target tests/fuzz/fuzz_layers.cpp (clang only)" OFF)
if(NORMKIT_BUILD_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "NORMKIT_BUILD_FUZZ needs clang (libFuzzer), not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  add_executable(fuzz_layers ${NORMKIT_FUZZ_SOURCES})
  target_link_libraries(fuzz_layers PRIVATE normkit::normkit normkit_dev_flags)
  # Line tables are all a sanitizer report needs; full -g costs build time for nothing.
  target_compile_options(fuzz_layers PRIVATE -gline-tables-only -fsanitize=fuzzer,address,undefined
                                             -fno-sanitize-recover=undefined)
  target_link_options(fuzz_layers PRIVATE -fsanitize=fuzzer,address,undefined)
endif()

# Defects the fuzzer found outside BatchNorm, pinned with their smallest inputs.
normkit_add_test(test_fuzz_regressions SOURCES test_fuzz_regressions.cpp LABELS unit reliability fuzz)
