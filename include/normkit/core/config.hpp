// Compiler workarounds shared by every normkit header.
#pragma once

// Each normkit header puts its own code (never an #include) between NORMKIT_CODE_BEGIN
// and NORMKIT_CODE_END, which set, for that code only, what follows; the user's code is
// untouched.
//
// Warnings. GCC before 12.3 warns "'__Y' may be used uninitialized"
// (-Wmaybe-uninitialized, -Wuninitialized) wherever one of its AVX-512 intrinsics is
// inlined: the intrinsics pass a deliberately uninitialized "don't care" operand
// (_mm512_undefined_ps and co), GCC bug 105593. With -march=native on an AVX-512
// machine, Eigen's packet code in normkit's kernels gave thousands of these per build
// (and broke -Werror builds). The two warnings are off in normkit's code.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__) && \
    (__GNUC__ < 12 || (__GNUC__ == 12 && __GNUC_MINOR__ < 3))
#define NORMKIT_WARNINGS_PUSH_                                \
  _Pragma("GCC diagnostic push")                              \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define NORMKIT_WARNINGS_POP_ _Pragma("GCC diagnostic pop")
#define NORMKIT_GCC_PR105593_ 1
#else
#define NORMKIT_WARNINGS_PUSH_
#define NORMKIT_WARNINGS_POP_
#endif

// Optimization. GCC at -O2 (CMake's RelWithDebInfo, most distributions' packages, Bazel's
// opt) does not unroll the kernels' short loops over arrays of packet accumulators, and
// then keeps the accumulators in memory, not in registers: the 1-thread time of
// 128x768 floats, GCC 12 with -march=native on the AVX-512 Xeon, mean of 20000 calls,
// -O2 against -O3: LayerNorm forward 16.4 against 10.5 us, backward 38.7 against 23.1,
// RMSNorm forward 12.8 against 9.4, DyT forward 18.7 against 12.4, BatchNorm training
// forward 41.0 against 26.7. So in a program optimized at all (-O1 and up; not -O0 or
// -Os), GCC compiles normkit's code at -O3, through its optimize pragma:
// the speed the benchmarks measure is the speed every -O2 and -O3 build gets (with the
// pragma, -O2 measured as -O3 on every layer). At -O1 (and -Og) it costs instead: GCC then inlines
// little into functions of another level (LayerNorm forward 32 us against 17 without
// the pragma); no GCC macro tells -O1 from -O2, so define NORMKIT_NO_O3 there
// (or anywhere) to leave the level to the build. Clang's -O2 unrolls as its -O3 does,
// and is left alone.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER) && defined(__OPTIMIZE__) && \
    !defined(__OPTIMIZE_SIZE__) && !defined(__NO_INLINE__) && !defined(NORMKIT_NO_O3)
#define NORMKIT_OPTIMIZE_PUSH_ _Pragma("GCC push_options") _Pragma("GCC optimize(\"O3\")")
#define NORMKIT_OPTIMIZE_POP_ _Pragma("GCC pop_options")
#else
#define NORMKIT_OPTIMIZE_PUSH_
#define NORMKIT_OPTIMIZE_POP_
#endif

#define NORMKIT_CODE_BEGIN NORMKIT_OPTIMIZE_PUSH_ NORMKIT_WARNINGS_PUSH_
#define NORMKIT_CODE_END NORMKIT_WARNINGS_POP_ NORMKIT_OPTIMIZE_POP_

// NORMKIT_INLINE_LAMBDA on a lambda that a kernel's loop calls once per packet (the
// bodies for_each_packet runs): inlined whatever the compiler's heuristics. Clang 14 did
// not inline them (for_each_packet calls each from up to three places), and then kept the
// values they read in memory, read again after every packet store (which may alias
// anything): BatchNorm training forward of 128x768 floats, 1 thread, median of 20000
// calls, took 34.6-35.2 us with clang against 23.9 with GCC, and 26.4-26.8 with this
// (backward 36.9-38.2 -> 28.9-29.5, GCC 27.6-28.5). GCC inlines them anyway.
// Only inside a function compiled once for every device (EIGEN_DONT_INLINE, not
// templated on the device: BatchNorm's run_map and chunk_map, LayerNorm's and RMSNorm's
// rows_backward): inlined into code that is instantiated per device, the packet code is
// compiled once per device, and two copies may order an FMA's operands differently,
// which changes which NaN survives. On DyT's backward the fuzz replay caught exactly
// that (dweight -nan on 1 thread, nan on 2, GCC 12 -O3).
#if defined(__GNUC__) || defined(__clang__)
#define NORMKIT_INLINE_LAMBDA __attribute__((always_inline))
#else
#define NORMKIT_INLINE_LAMBDA
#endif

// NORMKIT_SCALAR_CODE on a function: its loops run one element at a time, as written,
// whatever the addresses. Left to itself, an optimizing compiler vectorizes plain loops
// behind runtime checks (do the outputs overlap the inputs within a vector? is the
// store aligned?) and runs scalar code for the rest; the two may take the sign of a NaN
// from different operands (which one an FMA passes on depends on its form), so the
// same inputs in other buffers gave a NaN of the other sign (the ColMajor RMSNorm
// backward's overflow fallback, GCC -O3: fuzz replay input 12977 of --seed 6). For the
// rare fallback paths only, where speed does not matter. GCC through the optimize
// attribute; clang's vectorizer is off for a loop with NORMKIT_SCALAR_LOOP before it.
#if defined(__GNUC__) && !defined(__clang__)
#define NORMKIT_SCALAR_CODE __attribute__((optimize("no-tree-vectorize")))
#else
#define NORMKIT_SCALAR_CODE
#endif
#if defined(__clang__)
#define NORMKIT_SCALAR_LOOP _Pragma("clang loop vectorize(disable) interleave(disable)")
#else
#define NORMKIT_SCALAR_LOOP
#endif
