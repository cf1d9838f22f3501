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
