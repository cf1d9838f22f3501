// Compiler workarounds shared by every normkit header.
#pragma once

// GCC before 12.3 warns "'__Y' may be used uninitialized" (-Wmaybe-uninitialized,
// -Wuninitialized) wherever one of its AVX-512 intrinsics is inlined: the intrinsics
// pass a deliberately uninitialized "don't care" operand (_mm512_undefined_ps and co),
// GCC bug 105593. With -march=native on an AVX-512 machine, Eigen's packet code in
// normkit's kernels gave thousands of these per build (and broke -Werror builds). Each
// normkit header turns the two warnings off for its own code, between
// NORMKIT_DIAGNOSTICS_BEGIN and NORMKIT_DIAGNOSTICS_END; the user's code is untouched.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__) && \
    (__GNUC__ < 12 || (__GNUC__ == 12 && __GNUC_MINOR__ < 3))
#define NORMKIT_DIAGNOSTICS_BEGIN                                   \
  _Pragma("GCC diagnostic push")                                    \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")       \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define NORMKIT_DIAGNOSTICS_END _Pragma("GCC diagnostic pop")
#else
#define NORMKIT_DIAGNOSTICS_BEGIN
#define NORMKIT_DIAGNOSTICS_END
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
