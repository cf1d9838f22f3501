// simd.hpp's square roots: psqrt_exact must give the correctly rounded square root in
// every lane (Eigen's psqrt does not on AVX-512: an estimate refined by Newton steps),
// and inv_sqrt_plus the same bits as the scalar 1 / sqrt(v + eps) it replaces.
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
TYPED_TEST_SUITE(SimdSqrt, Floats);

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

}  // namespace
