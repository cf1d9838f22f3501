# Tests of the accurate vectorized tanh (include/normkit/core/tanh.hpp).
# The exhaustive sweep (all 2^32 floats on 2 threads, 1e7 doubles) takes about a minute
# and a half at -O2 -march=native on 2 Zen 3 cores, well inside CTest's default
# 1500 s timeout; run it alone with `ctest -L exhaustive`.
normkit_add_test(test_tanh SOURCES test_tanh.cpp LABELS unit)
normkit_add_test(test_tanh_exhaustive SOURCES test_tanh_exhaustive.cpp LABELS exhaustive)
