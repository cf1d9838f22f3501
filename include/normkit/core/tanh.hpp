// Accurate, vectorized tanh for float and double on Eigen packets (used by DyT).
//
// Method (derivation and error analysis: docs/derivations/tanh.md):
//   |x| <  c   : tanh(x) = x + x^3 P(x^2), P a minimax polynomial (relative error)
//                of degree 4 with c = 5/8 (float) / 12 with c = 3/4 (double).
//   |x| >= c   : tanh(|x|) = 1 - 2 / (exp(2|x|) + 1), with our own exp:
//                exp(2a) = 2^k exp(2r), a = k ln2/2 + r, |r| <= ln2/4, exp(2r) a
//                minimax polynomial of degree 6 (float) / 11 (double); |x| is clamped
//                to 9.125 (float) / 19.5 (double), beyond which tanh rounds to 1.
//   Both halves are computed for every lane and blended, the large one only when some
//   lane of the packet (or packet pair) needs it. The small half runs on the signed x (it
//   is odd); the large one on |x|, its sign restored with a bit op.
// Measured max error (g++ 12, AVX2+FMA and AVX-512): float 1.37 ulp over all 2^32 inputs
// (vs double std::tanh; the 2-ulp budget buys one FMA less than the 1.05-ulp degree-5
// version); double 1.03 ulp over 1e7 samples (vs long double tanhl).
// -ffast-math is not supported: it may drop NaN/inf handling or fold the
// round-to-integer trick (y + 1.5*2^23) - 1.5*2^23.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include <unsupported/Eigen/CXX11/Tensor>

#include "config.hpp"

NORMKIT_CODE_BEGIN

// Templates over __m256 & co. make GCC warn that the vector alignment attribute is
// ignored in the template argument; Eigen silences the same warning in its own headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace normkit {
namespace detail {

template <class Scalar>
struct TanhConstants;

// Coefficients come from a Remez exchange in 60-digit arithmetic (mpmath), rounded to
// the target type; docs/derivations/tanh.md has the script's intervals and errors.
template <>
struct TanhConstants<float> {
  // Above 5/8, tanh >= 0.555 and q = 2/(exp(2|x|)+1) <= 0.445: an ulp of q is at most
  // an ulp of tanh, and a relative error of exp enters q scaled by qe/(e+1) <= 0.25.
  // Measured max: 1.54 ulp at 9/16 and 1.37 at 5/8 with degree 4; 1.05 at 3/4 with
  // degree 5. 5/8 spends the 2-ulp budget on speed: one FMA less on every packet.
  static constexpr float small_limit = 0.625f;
  // tanh(x) rounds to 1.0f for x > 9.01; clamping keeps exp(2x) finite.
  static constexpr float saturate = 9.125f;
  static constexpr float two_over_ln2 = 0x1.715476p+1f;
  // Adding 1.5*2^23 rounds to an integer and leaves it in the low mantissa bits.
  static constexpr float round_magic = 0x1.8p+23f;
  // ln2/2 = hi + lo, hi with 8 significant bits so k*hi is exact for every k we use.
  static constexpr float ln2_half_hi = 0x1.63p-2f;
  static constexpr float ln2_half_lo = -0x1.bd0106p-14f;
  static constexpr int mantissa_bits = 23;
  // tanh(x) = x + x^3 * sum odd[i] x^(2i), |x| <= 5/8; relative error of the sum 1.3e-7.
  static constexpr std::array<float, 5> odd = {-0x1.555552p-2f, 0x1.110e1ep-3f, -0x1.b925a2p-5f,
                                               0x1.58054cp-6f, -0x1.8f91b4p-8f};
  // exp(2r) = sum exp2r[i] r^i, |r| <= ln2/4; relative error 9.4e-9.
  static constexpr std::array<float, 7> exp2r = {
      1.0f, 2.0f, 2.0f, 0x1.5554dep+0f, 0x1.5555bap-1f, 0x1.120b1cp-2f, 0x1.6c69f2p-4f};
};

template <>
struct TanhConstants<double> {
  static constexpr double small_limit = 0.75;
  // tanh(x) rounds to 1.0 for x > 19.06.
  static constexpr double saturate = 19.5;
  static constexpr double two_over_ln2 = 0x1.71547652b82fep+1;
  static constexpr double round_magic = 0x1.8p+52;
  // fdlibm's ln2_hi (32 significant bits) halved, so k*hi is exact.
  static constexpr double ln2_half_hi = 0x1.62e42feep-2;
  static constexpr double ln2_half_lo = 0x1.a39ef35793c76p-34;
  static constexpr int mantissa_bits = 52;
  // Relative error of the sum 3.4e-17 on |x| <= 3/4.
  static constexpr std::array<double, 13> odd = {
      -0x1.5555555555555p-2,  0x1.111111111101fp-3,  -0x1.ba1ba1ba0403dp-5,
      0x1.664f487b7dc02p-6,   -0x1.226e34346778dp-7, 0x1.d6d397ce4d486p-9,
      -0x1.7d9fddbaa4477p-10, 0x1.35328405387dbp-11, -0x1.f351ee5704b60p-13,
      0x1.8b4e2e5815cc3p-14,  -0x1.215e2c01e67abp-15, 0x1.512bada74c5bdp-17,
      -0x1.b87f7058f952bp-20};
  // Relative error 1.6e-17 on |r| <= ln2/4.
  static constexpr std::array<double, 12> exp2r = {
      1.0,                   2.0,                   0x1.0000000000001p+1, 0x1.555555555554dp+0,
      0x1.5555555553d82p-1, 0x1.1111111114484p-2,  0x1.6c16c1788179cp-4, 0x1.a01a018c32e01p-6,
      0x1.a019b930c5874p-8, 0x1.71de5a3c12be8p-10, 0x1.28915f399dfacp-12, 0x1.aeaaf5ab0e0e3p-15};
};

template <class Packet, class Scalar, std::size_t N, std::size_t... I>
EIGEN_STRONG_INLINE Packet phorner_impl(const Packet& x, const std::array<Scalar, N>& c,
                                        std::index_sequence<I...>) {
  using Eigen::internal::pmadd;
  using Eigen::internal::pset1;
  Packet acc = pset1<Packet>(c[N - 1]);
  ((acc = pmadd(acc, x, pset1<Packet>(c[N - 2 - I]))), ...);
  return acc;
}

// Horner, unrolled at compile time: the loop over independent packets in the caller
// already gives the out-of-order core enough parallelism, so Estrin would only add ops.
template <class Packet, class Scalar, std::size_t N>
EIGEN_STRONG_INLINE Packet phorner(const Packet& x, const std::array<Scalar, N>& c) {
  return phorner_impl(x, c, std::make_index_sequence<N - 1>{});
}

template <class Packet, class = void>
struct HasMatchingIntegerPacket : std::false_type {};

template <class Packet>
struct HasMatchingIntegerPacket<
    Packet, std::void_t<typename Eigen::internal::unpacket_traits<Packet>::integer_packet>> {
  using PacketI = typename Eigen::internal::unpacket_traits<Packet>::integer_packet;
  static constexpr bool value =
      int(Eigen::internal::unpacket_traits<PacketI>::size) ==
          int(Eigen::internal::unpacket_traits<Packet>::size) &&
      sizeof(typename Eigen::internal::unpacket_traits<PacketI>::type) ==
          sizeof(typename Eigen::internal::unpacket_traits<Packet>::type);
};

// p * 2^k for p in [0.7, 1.5] and the small k >= 0 used here (at most 57), where
// kmagic = k + round_magic.
// Adding k to the exponent field is exact and costs a shift and an integer add; the
// shift also drops round_magic's own bits. Eigen's pldexp handles every exponent
// range and costs 10-20 ops, so it is only the fallback (scalar builds, and double
// packets without 64-bit integer lanes in Eigen).
template <class Packet>
EIGEN_STRONG_INLINE Packet pscale_pow2(const Packet& p, [[maybe_unused]] const Packet& kmagic,
                                       [[maybe_unused]] const Packet& k) {
  using Scalar = typename Eigen::internal::unpacket_traits<Packet>::type;
  if constexpr (HasMatchingIntegerPacket<Packet>::value) {
    using Eigen::internal::preinterpret;
    using PacketI = typename Eigen::internal::unpacket_traits<Packet>::integer_packet;
    const PacketI kbits = Eigen::internal::plogical_shift_left<TanhConstants<Scalar>::mantissa_bits>(
        preinterpret<PacketI>(kmagic));
    return preinterpret<Packet>(Eigen::internal::padd(preinterpret<PacketI>(p), kbits));
  } else {
    return Eigen::internal::pldexp(p, k);
  }
}

// Eigen 3.4 has no 64-bit integer packets on x86, so the double versions use intrinsics.
#if defined(EIGEN_VECTORIZE_SSE2)
EIGEN_STRONG_INLINE Eigen::internal::Packet2d pscale_pow2(const Eigen::internal::Packet2d& p,
                                                          const Eigen::internal::Packet2d& kmagic,
                                                          const Eigen::internal::Packet2d&) {
  const __m128i kbits = _mm_slli_epi64(_mm_castpd_si128(kmagic), 52);
  return _mm_castsi128_pd(_mm_add_epi64(_mm_castpd_si128(p), kbits));
}
#endif
#if defined(EIGEN_VECTORIZE_AVX2)
EIGEN_STRONG_INLINE Eigen::internal::Packet4d pscale_pow2(const Eigen::internal::Packet4d& p,
                                                          const Eigen::internal::Packet4d& kmagic,
                                                          const Eigen::internal::Packet4d&) {
  const __m256i kbits = _mm256_slli_epi64(_mm256_castpd_si256(kmagic), 52);
  return _mm256_castsi256_pd(_mm256_add_epi64(_mm256_castpd_si256(p), kbits));
}
#endif
#if defined(EIGEN_VECTORIZE_AVX512)
EIGEN_STRONG_INLINE Eigen::internal::Packet8d pscale_pow2(const Eigen::internal::Packet8d& p,
                                                          const Eigen::internal::Packet8d& kmagic,
                                                          const Eigen::internal::Packet8d&) {
  const __m512i kbits = _mm512_slli_epi64(_mm512_castpd_si512(kmagic), 52);
  return _mm512_castsi512_pd(_mm512_add_epi64(_mm512_castpd_si512(p), kbits));
}
#endif

// The small-range half: x + x^3 P(x^2) for |x| < small_limit, on the signed x: the
// polynomial is odd, and round-to-nearest is symmetric, so for x != 0 this is bitwise
// the value on |x| with x's sign. x = -0 alone would come out +0 (-0 plus the +0 that
// x^3 P(0) is there): or-ing x's sign bit back in fixes it and changes no other value,
// as x + x^3 P already has x's sign. Two ops (one vpternlog with AVX-512) instead of
// the three that abs, sign and or cost. Also returns x^2 in `s`, which use_large
// compares. Tiny and denormal x give x^2 = 0 and so exactly x; NaN stays NaN.
template <class Packet>
EIGEN_STRONG_INLINE Packet ptanh_small(const Packet& x, Packet& s) {
  using namespace Eigen::internal;
  using Scalar = typename unpacket_traits<Packet>::type;
  using C = TanhConstants<Scalar>;
  s = pmul(x, x);
  const Packet x3 = pmul(x, s);
  return por(pmadd(x3, phorner(s, C::odd), x), pand(x, pset1<Packet>(-Scalar(0))));
}

// The large-range half: 1 - 2/(exp(2a) + 1) for a = |x| >= small_limit (any a >= 0 gives
// a finite result; NaN lanes give garbage that the caller discards).
template <class Packet>
EIGEN_STRONG_INLINE Packet ptanh_large(const Packet& a) {
  using namespace Eigen::internal;
  using Scalar = typename unpacket_traits<Packet>::type;
  using C = TanhConstants<Scalar>;
  // e = exp(2y) = 2^k exp(2r) with y = k ln2/2 + r.
  const Packet y = pmin(a, pset1<Packet>(C::saturate));
  const Packet kmagic = pmadd(y, pset1<Packet>(C::two_over_ln2), pset1<Packet>(C::round_magic));
  const Packet k = psub(kmagic, pset1<Packet>(C::round_magic));
  Packet r = pmadd(k, pset1<Packet>(-C::ln2_half_hi), y);
  r = pmadd(k, pset1<Packet>(-C::ln2_half_lo), r);
  const Packet e = pscale_pow2(phorner(r, C::exp2r), kmagic, k);
  const Packet one = pset1<Packet>(Scalar(1));
  return psub(one, pdiv(pset1<Packet>(Scalar(2)), padd(e, one)));
}

// Lanes that need the large half, from s = x^2 as ptanh_small rounded it: |x| >= c
// exactly where fl(x^2) >= c^2 (c^2 is exact, fl is monotonic, and the largest value
// below c squares to 2.5 ulps below c^2 in float, 1.5 in double, which round to at least
// one below). NaN fails the comparison and takes the small half, which returns it
// unchanged.
template <class Packet>
EIGEN_STRONG_INLINE Packet ptanh_use_large(const Packet& s) {
  using namespace Eigen::internal;
  using C = TanhConstants<typename unpacket_traits<Packet>::type>;
  return pcmp_le(pset1<Packet>(C::small_limit * C::small_limit), s);
}

#if defined(EIGEN_VECTORIZE_AVX512)
// a <= b lane by lane into a mask register (false for NaN), for ptanh_any_large.
EIGEN_STRONG_INLINE __mmask16 pcmp_le_mask(const Eigen::internal::Packet16f& a,
                                           const Eigen::internal::Packet16f& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ);
}
EIGEN_STRONG_INLINE __mmask16 pcmp_le_mask(const Eigen::internal::Packet8d& a,
                                           const Eigen::internal::Packet8d& b) {
  return _mm512_cmp_pd_mask(a, b, _CMP_LE_OQ);
}
#endif

// Whether any lane of s0 or s1 needs the large half: predux_any(por(use_large(s0),
// use_large(s1))), which AVX-512 does in three mask ops (two compares into mask
// registers and one test) instead of seven (Eigen's compare widens each mask to a
// vector first).
template <class Packet>
EIGEN_STRONG_INLINE bool ptanh_any_large(const Packet& s0, const Packet& s1) {
  using namespace Eigen::internal;
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<Packet, Packet16f> || std::is_same_v<Packet, Packet8d>) {
    using C = TanhConstants<typename unpacket_traits<Packet>::type>;
    const Packet c2 = pset1<Packet>(C::small_limit * C::small_limit);
    return !_mm512_kortestz(pcmp_le_mask(c2, s0), pcmp_le_mask(c2, s1));
  }
#endif
  return predux_any(por(ptanh_use_large(s0), ptanh_use_large(s1)));
}

// The large half with x's sign: a = |x|, and the sign bit put back with an or.
template <class Packet>
EIGEN_STRONG_INLINE Packet ptanh_large_signed(const Packet& x) {
  using namespace Eigen::internal;
  const Packet a = pabs(x);
  return por(ptanh_large(a), pxor(x, a));
}

template <class Packet>
EIGEN_STRONG_INLINE void ptanh_check_type() {
  using Scalar = typename Eigen::internal::unpacket_traits<Packet>::type;
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "ptanh_accurate: float or double packets only");
}

// tanh on every lane of a float or double packet (or on a plain float/double).
//
// Cost per packet, counting each packet op once (float / double):
//   small x (signed): x^2, Horner, x^3, final fma, sign of -0
//                                           1 + 4 + 1 + 1 + 2 = 9 / 1 + 12 + 1 + 1 + 2 = 17
//   compare, any-lane test                  2 / 2 (1.5 per packet of a pair with AVX-512)
//   large |x| (only if a lane needs it): abs, clamp, round (2), reduce (2), Horner,
//   2^k (2), +1, div, 1-q, sign (2), blend  1 + 1 + 2 + 2 + 6 + 2 + 3 + 2 + 1 = 20 / 25
// Why this shape: a single rational approximation over the whole range (Eigen's
// ptanh) is cheaper but cannot reach 2 ulp near 0 and near 1 at once. The polynomial
// gives full relative accuracy near 0; 1 - 2/(e+1) gives it near 1, where the error of
// q = 2/(e+1) shrinks in the result. One formula for every lane,
// tanh = E/(E+2) with E = expm1(2|x|), would drop the blend and the branch at ~21 ops,
// but its three roundings in a row measured 2.4 ulp (float) and 2.5 (double) below 0.35.
// Each lane's value never depends on its neighbours: the large half is skipped when
// no lane needs it (DyT's alpha * x is mostly small on normalized-scale inputs), which
// changes no value. Measured on Zen 3 (one thread, in cache): the small half alone about
// 0.2 ns per float, both halves 0.6 ns (FMA-bound: ~19 mul/FMA per packet plus the
// division), double 2.2 ns (Eigen: scalar std::tanh, 15 ns). Taking the small half on
// the signed x (no abs and sign ops unless the large half runs) and the any-lane test
// in mask registers made DyT's forward loop in L1 (y = w tanh(alpha x) + b, one Xeon
// core with AVX-512, small half only) 0.137 ns per float instead of 0.164, 0.373
// instead of 0.389 with both halves.
template <class Packet>
EIGEN_STRONG_INLINE Packet ptanh_accurate(const Packet& x) {
  using namespace Eigen::internal;
  ptanh_check_type<Packet>();
  Packet s;
  const Packet t_small = ptanh_small(x, s);
  const Packet use_large = ptanh_use_large(s);
  if (!predux_any(use_large)) return t_small;
  return pselect(use_large, ptanh_large_signed(x), t_small);
}

// Two packets at once, each lane bitwise equal to ptanh_accurate: the kernels' loops run
// two independent packets per iteration for instruction-level parallelism, and one
// branch decides for both whether the large half is needed.
template <class Packet>
EIGEN_STRONG_INLINE void ptanh_accurate2(const Packet& x0, const Packet& x1, Packet& t0,
                                         Packet& t1) {
  using namespace Eigen::internal;
  ptanh_check_type<Packet>();
  Packet s0, s1;
  t0 = ptanh_small(x0, s0);
  t1 = ptanh_small(x1, s1);
  if (!ptanh_any_large(s0, s1)) return;
  t0 = pselect(ptanh_use_large(s0), ptanh_large_signed(x0), t0);
  t1 = pselect(ptanh_use_large(s1), ptanh_large_signed(x1), t1);
}

// The smallest packet of the same family (Packet8f -> Packet4f): scalar calls run the
// exact same instruction sequence on one lane, so tails match packet lanes bitwise.
template <class Packet, class Half = typename Eigen::internal::unpacket_traits<Packet>::half>
struct SmallestPacket {
  using type = typename SmallestPacket<Half>::type;
};
template <class Packet>
struct SmallestPacket<Packet, Packet> {
  using type = Packet;
};

template <class Scalar>
EIGEN_STRONG_INLINE Scalar tanh_accurate_scalar(Scalar x) {
  using Packet =
      typename SmallestPacket<typename Eigen::internal::packet_traits<Scalar>::type>::type;
  return Eigen::internal::pfirst(ptanh_accurate(Eigen::internal::pset1<Packet>(x)));
}

// Bitwise equal to one lane of ptanh_accurate on the widest packet; for row tails.
inline float tanh_accurate(float x) { return tanh_accurate_scalar(x); }
inline double tanh_accurate(double x) { return tanh_accurate_scalar(x); }

// d tanh/dx = 1 - t^2 from t = tanh(x). With FMA, pmadd(-t, t, 1) rounds the exact
// 1 - t^2 once (0.5 ulp, one op). Without FMA, 1 - t*t would cancel catastrophically
// as |t| -> 1, so use (1 - t)(1 + t): 1 - t is exact for |t| >= 0.5 (Sterbenz), which
// leaves two roundings, about 1 ulp. Either way the relative error inherited from t
// itself, 2|t| * err(t) / (1 - t^2), dominates near saturation.
template <class Packet>
EIGEN_STRONG_INLINE Packet ptanh_grad_from_tanh(const Packet& t) {
  using namespace Eigen::internal;
  using Scalar = typename unpacket_traits<Packet>::type;
  const Packet one = pset1<Packet>(Scalar(1));
#if defined(EIGEN_VECTORIZE_FMA)
  return pmadd(pnegate(t), t, one);
#else
  return pmul(psub(one, t), padd(one, t));
#endif
}

inline float tanh_grad_from_tanh(float t) {
  using Packet = SmallestPacket<Eigen::internal::packet_traits<float>::type>::type;
  return Eigen::internal::pfirst(ptanh_grad_from_tanh(Eigen::internal::pset1<Packet>(t)));
}
inline double tanh_grad_from_tanh(double t) {
  using Packet = SmallestPacket<Eigen::internal::packet_traits<double>::type>::type;
  return Eigen::internal::pfirst(ptanh_grad_from_tanh(Eigen::internal::pset1<Packet>(t)));
}

}  // namespace detail
}  // namespace normkit

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

NORMKIT_CODE_END
