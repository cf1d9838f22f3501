// simd.hpp's square roots: psqrt_exact must give the correctly rounded square root in
// every lane (Eigen's psqrt does not on AVX-512: an estimate refined by Newton steps),
// and inv_sqrt_plus the same bits as the scalar 1 / sqrt(v + eps) it replaces. The
// scalar helpers of branch-free loops: blend picks its operand bit for bit (signed zeros,
// NaN payloads), all_finite finds one non-finite value at any place, contiguous or
// strided. Partial packets read and write only their lanes.
#include "test_support.hpp"

#include <normkit/core/simd.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

using normkit::Index;

/// Values across the whole range: random bit patterns of non-negative finite numbers
/// (subnormals included), and the edges: 0, the smallest subnormal and normal, 1, the
/// largest finite value, +inf.
template <class F>
std::vector<F> test_values(std::size_t n) {
  using Bits = std::conditional_t<sizeof(F) == 4, std::uint32_t, std::uint64_t>;
  std::vector<F> v = {F(0), std::numeric_limits<F>::denorm_min(), std::numeric_limits<F>::min(), F(1),
                      std::numeric_limits<F>::max(), std::numeric_limits<F>::infinity()};
  std::mt19937_64 gen(7);
  while (v.size() < n) {
    const Bits b = static_cast<Bits>(gen()) & (~Bits(0) >> 1);  // sign bit clear
    F f;
    std::memcpy(&f, &b, sizeof f);
    if (std::isfinite(f)) v.push_back(f);
  }
  return v;
}

template <class F>
bool same_bits(F a, F b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

template <class F>
class SimdSqrt : public ::testing::Test {};
using Floats = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SimdSqrt, Floats, nktest::ScalarNames);

TYPED_TEST(SimdSqrt, PsqrtExactIsTheCorrectlyRoundedSquareRootInEveryLane) {
  using F = TypeParam;
  using P = normkit::detail::packet_t<F>;
  constexpr Index W = normkit::detail::packet_size<F>;
  const std::vector<F> v = test_values<F>(100000 / W * W);
  alignas(64) F out[W];
  for (std::size_t i = 0; i + W <= v.size(); i += W) {
    Eigen::internal::pstore(out, normkit::detail::simd::psqrt_exact(Eigen::internal::ploadu<P>(v.data() + i)));
    for (Index l = 0; l < W; ++l)
      ASSERT_TRUE(same_bits(out[l], std::sqrt(v[i + l])))
          << "sqrt(" << v[i + l] << "): got " << out[l] << ", want " << std::sqrt(v[i + l]);
  }
}

TYPED_TEST(SimdSqrt, InvSqrtPlusMatchesTheScalarExpression) {
  using F = TypeParam;
  const std::vector<F> v = test_values<F>(10007);  // not a multiple of any packet: a tail
  for (F eps : {F(1e-5), std::numeric_limits<F>::epsilon(), std::numeric_limits<F>::min()}) {
    std::vector<F> r(v.size());
    normkit::detail::simd::inv_sqrt_plus(v.data(), eps, r.data(), static_cast<Index>(v.size()));
    for (std::size_t i = 0; i < v.size(); ++i)
      ASSERT_TRUE(same_bits(r[i], F(1) / std::sqrt(v[i] + eps))) << "1 / sqrt(" << v[i] << " + " << eps << ")";
  }
}

/// Values whose bits a select must keep: signed zeros, NaNs of either sign with a
/// payload, infinities, subnormals, the largest finite value.
template <class F>
std::vector<F> special_values() {
  using Bits = std::conditional_t<sizeof(F) == 4, std::uint32_t, std::uint64_t>;
  std::vector<F> v = {F(0), -F(0), F(1.5), -F(2.25), std::numeric_limits<F>::denorm_min(),
                      std::numeric_limits<F>::max(), std::numeric_limits<F>::infinity(),
                      -std::numeric_limits<F>::infinity()};
  const F nan = std::numeric_limits<F>::quiet_NaN();
  Bits bits;
  std::memcpy(&bits, &nan, sizeof bits);
  for (Bits extra : {Bits(0), Bits(5), Bits(1) << (sizeof(F) * 8 - 1)}) {  // payload, sign
    const Bits b = bits | extra;
    F f;
    std::memcpy(&f, &b, sizeof f);
    v.push_back(f);
  }
  return v;
}

template <class F>
class SimdHelpers : public ::testing::Test {};
TYPED_TEST_SUITE(SimdHelpers, Floats, nktest::ScalarNames);

TYPED_TEST(SimdHelpers, BlendKeepsTheChosenOperandBitForBit) {
  using F = TypeParam;
  const std::vector<F> v = special_values<F>();
  for (F x : v)
    for (F y : v) {
      EXPECT_TRUE(same_bits(normkit::detail::blend(true, x, y), x)) << x << " or " << y;
      EXPECT_TRUE(same_bits(normkit::detail::blend(false, x, y), y)) << x << " or " << y;
    }
}

TEST(SimdHelpers, LongDoubleBlendIsTheTernary) {
  const long double x = -0.0L, y = 3.0L;
  EXPECT_TRUE(std::signbit(normkit::detail::blend(true, x, y)));
  EXPECT_EQ(normkit::detail::blend(true, x, y), 0.0L);
  EXPECT_EQ(normkit::detail::blend(false, x, y), 3.0L);
  EXPECT_TRUE(std::isnan(normkit::detail::blend(true, std::numeric_limits<long double>::quiet_NaN(), y)));
}

TYPED_TEST(SimdHelpers, AllFiniteFindsOneNonFiniteValueAnywhere) {
  using F = TypeParam;
  for (Index stride : {Index(1), Index(3)})
    for (Index n = 0; n <= 40; ++n) {  // lengths around every packet size, and their tails
      std::vector<F> x(static_cast<std::size_t>(n * stride), F(1));
      if (n > 0) {
        x.front() = std::numeric_limits<F>::max();
        x.back() = -std::numeric_limits<F>::denorm_min();
      }
      EXPECT_TRUE(normkit::detail::all_finite(x.data(), n, stride)) << "n " << n << " stride " << stride;
      for (F bad : {std::numeric_limits<F>::infinity(), -std::numeric_limits<F>::infinity(),
                    std::numeric_limits<F>::quiet_NaN(), -std::numeric_limits<F>::quiet_NaN()})
        for (Index i = 0; i < n * stride; ++i) {
          const F keep = x[static_cast<std::size_t>(i)];
          x[static_cast<std::size_t>(i)] = bad;
          // Only the values at multiples of the stride are looked at.
          EXPECT_EQ(normkit::detail::all_finite(x.data(), n, stride), i % stride != 0)
              << bad << " at " << i << " of n " << n << " stride " << stride;
          x[static_cast<std::size_t>(i)] = keep;
        }
    }
}

// A partial packet (the tail of a row, the last lanes of a tensor): load_partial reads
// the first n values bit for bit (NaN payloads, signed zeros) and zero-fills the other
// lanes; store_partial writes the first n lanes and nothing past them. Each n sits at
// the very end of an array of its own size, so that a lane read or written past it is
// outside the allocation (which AddressSanitizer reports: masked loads and stores touch
// only their lanes).
TYPED_TEST(SimdHelpers, PartialPacketsTouchOnlyTheirLanes) {
  using F = TypeParam;
  using normkit::detail::simd::load_partial;
  using normkit::detail::simd::store_partial;
  constexpr Index W = normkit::detail::packet_size<F>;
  const std::vector<F> v = special_values<F>();
  const F sentinel = F(-7.5);
  for (Index n = 1; n < W; ++n)
    for (std::size_t start = 0; start < v.size(); ++start) {
      std::vector<F> in(static_cast<std::size_t>(n));
      for (std::size_t i = 0; i < in.size(); ++i) in[i] = v[(start + i) % v.size()];
      alignas(64) F lanes[W];
      Eigen::internal::pstore(lanes, load_partial<F>(in.data(), n));
      for (Index l = 0; l < W; ++l) {
        const F want = l < n ? in[static_cast<std::size_t>(l)] : F(0);
        ASSERT_TRUE(same_bits(lanes[l], want)) << "load, n " << n << ", lane " << l << ": got " << lanes[l];
      }
      std::vector<F> out(static_cast<std::size_t>(n) + 3, sentinel);
      for (Index l = 0; l < W; ++l) lanes[l] = l < n ? in[static_cast<std::size_t>(l)] : F(1);
      store_partial<F>(out.data() + 3, Eigen::internal::pload<normkit::detail::packet_t<F>>(lanes), n);
      for (std::size_t i = 0; i < out.size(); ++i) {
        const F want = i < 3 ? sentinel : in[i - 3];
        ASSERT_TRUE(same_bits(out[i], want)) << "store, n " << n << ", element " << i << ": got " << out[i];
      }
    }
}

// first_lanes(n) keeps lanes [0, n) of a packet under pand and zeroes the others, for
// every n a packet holds (0 and W included), whatever the lanes held: NaN, infinities.
TYPED_TEST(SimdHelpers, FirstLanesMaskKeepsExactlyTheFirstN) {
  using F = TypeParam;
  using P = normkit::detail::packet_t<F>;
  constexpr Index W = normkit::detail::packet_size<F>;
  const std::vector<F> v = special_values<F>();
  for (Index n = 0; n <= W; ++n)
    for (std::size_t start = 0; start < v.size(); ++start) {
      alignas(64) F lanes[W];
      for (Index l = 0; l < W; ++l) lanes[l] = v[(start + static_cast<std::size_t>(l)) % v.size()];
      const P kept = Eigen::internal::pand(Eigen::internal::pload<P>(lanes), normkit::detail::simd::first_lanes<P>(n));
      alignas(64) F got[W];
      Eigen::internal::pstore(got, kept);
      for (Index l = 0; l < W; ++l) {
        const F want = l < n ? lanes[l] : F(0);
        ASSERT_TRUE(same_bits(got[l], want)) << "n " << n << ", lane " << l << ": got " << got[l];
      }
    }
}

}  // namespace
