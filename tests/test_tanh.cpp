// Fast checks of normkit::detail::ptanh_accurate / tanh_accurate (core/tanh.hpp):
// special values, saturation, per-lane NaN, scalar == packet lane bitwise, and sampled
// accuracy (<= 2 ulp). The exhaustive float sweep lives in test_tanh_exhaustive.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "test_support.hpp"  // first of the Eigen includes: it sets EIGEN_USE_THREADS
#include <normkit/core/tanh.hpp>

// Packet types as template arguments make GCC warn that their alignment attribute is
// ignored; Eigen's headers silence the same warning.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace {

using Eigen::internal::ploadu;
using Eigen::internal::pstoreu;
using normkit::detail::ptanh_accurate;
using normkit::detail::ptanh_accurate2;
using normkit::detail::ptanh_grad_from_tanh;
using normkit::detail::tanh_accurate;
using normkit::detail::tanh_grad_from_tanh;

template <class T>
using Packet = typename Eigen::internal::packet_traits<T>::type;

template <class T>
constexpr int kLanes = Eigen::internal::unpacket_traits<Packet<T>>::size;

// The exact value in the next wider type: double for float, long double for double.
template <class T>
using Wide = std::conditional_t<std::is_same_v<T, float>, double, long double>;

template <class T>
Wide<T> exact_tanh(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return std::tanh(static_cast<double>(x));
  } else {
    return tanhl(static_cast<long double>(x));
  }
}

// |result - exact| in units of the spacing of T at the exact value.
template <class T>
double ulp_error(T result, Wide<T> exact) {
  if (std::isnan(exact)) return std::isnan(result) ? 0.0 : std::numeric_limits<double>::infinity();
  int e = 0;
  std::frexp(std::fabs(exact), &e);
  const int digits = std::numeric_limits<T>::digits;
  const int min_e = std::numeric_limits<T>::min_exponent - digits;
  const Wide<T> ulp = std::ldexp(Wide<T>(1), std::max(e - digits, min_e));
  return static_cast<double>(std::fabs(static_cast<Wide<T>>(result) - exact) / ulp);
}

// Applies the packet version to a whole buffer (padded to full packets).
template <class T>
std::vector<T> packet_tanh(const std::vector<T>& x) {
  const int L = kLanes<T>;
  std::vector<T> in(x), out((x.size() + L - 1) / L * L);
  in.resize(out.size(), T(0));
  for (std::size_t i = 0; i < in.size(); i += L) {
    pstoreu(out.data() + i, ptanh_accurate(ploadu<Packet<T>>(in.data() + i)));
  }
  out.resize(x.size());
  return out;
}

// How a kernel handles a row: full packets, then the scalar version for the tail.
template <class T>
std::vector<T> row_tanh(const std::vector<T>& x) {
  const int L = kLanes<T>;
  std::vector<T> y(x.size());
  std::size_t i = 0;
  for (; i + L <= x.size(); i += L) {
    pstoreu(y.data() + i, ptanh_accurate(ploadu<Packet<T>>(x.data() + i)));
  }
  for (; i < x.size(); ++i) y[i] = tanh_accurate(x[i]);
  return y;
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
class TanhTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(TanhTest, Scalars, nktest::ScalarNames);

TYPED_TEST(TanhTest, ZeroKeepsItsSign) {
  using T = TypeParam;
  const auto y = packet_tanh<T>({T(0), -T(0)});
  EXPECT_TRUE(same_bits(y[0], T(0)));
  EXPECT_TRUE(same_bits(y[1], -T(0)));
  EXPECT_TRUE(same_bits(tanh_accurate(T(0)), T(0)));
  EXPECT_TRUE(same_bits(tanh_accurate(-T(0)), -T(0)));
}

TYPED_TEST(TanhTest, SaturatesToExactlyOne) {
  using T = TypeParam;
  using L = std::numeric_limits<T>;
  // Just past the point where tanh rounds to 1 (9.01 float, 19.06 double), the clamp
  // values, and everything up to infinity.
  const T start = std::is_same_v<T, float> ? T(9.02) : T(19.1);
  const T clamp = std::is_same_v<T, float> ? T(9.125) : T(19.5);
  std::vector<T> x = {start, clamp, T(20), T(50), T(88.8), T(100), T(710),
                      T(1e6), T(1e30), L::max(), L::infinity()};
  for (T v = start; v < T(40); v = std::nextafter(v, L::infinity()) + (v - start) / 64) x.push_back(v);
  const std::size_t n = x.size();
  for (std::size_t i = 0; i < n; ++i) x.push_back(-x[i]);
  const auto y = packet_tanh(x);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const T expected = x[i] > 0 ? T(1) : T(-1);
    EXPECT_EQ(y[i], expected) << "x = " << x[i];
    EXPECT_EQ(tanh_accurate(x[i]), expected) << "x = " << x[i];
  }
}

TYPED_TEST(TanhTest, TinyAndDenormalInputsReturnX) {
  using T = TypeParam;
  using L = std::numeric_limits<T>;
  // Below sqrt(eps)/4 the cubic term is under half an ulp, so tanh(x) rounds to x.
  const T limit = std::sqrt(L::epsilon()) / 4;
  std::vector<T> x = {L::denorm_min(), T(3) * L::denorm_min(), L::min() / 3, L::min(), T(1e-30), limit};
  for (T v = L::denorm_min(); v < limit; v *= v < L::min() ? T(2) : T(1.37)) x.push_back(v);
  const std::size_t n = x.size();
  for (std::size_t i = 0; i < n; ++i) x.push_back(-x[i]);
  const auto y = packet_tanh(x);
  for (std::size_t i = 0; i < x.size(); ++i) {
    EXPECT_TRUE(same_bits(y[i], x[i])) << "x = " << x[i] << ", tanh = " << y[i];
    EXPECT_TRUE(same_bits(tanh_accurate(x[i]), x[i])) << "x = " << x[i];
  }
}

TYPED_TEST(TanhTest, NanStaysInItsLane) {
  using T = TypeParam;
  const int L = kLanes<T>;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  const std::vector<T> others = {T(0.3), T(-2.5), inf, -inf, T(0), T(1e-3), T(-0.75), T(30)};
  for (int lane = 0; lane < L; ++lane) {
    std::vector<T> x(L);
    for (int i = 0; i < L; ++i) x[i] = i == lane ? (lane % 2 ? -nan : nan) : others[i % others.size()];
    const auto y = packet_tanh(x);
    for (int i = 0; i < L; ++i) {
      if (i == lane) {
        EXPECT_TRUE(std::isnan(y[i])) << "lane " << i;
      } else {
        EXPECT_TRUE(same_bits(y[i], tanh_accurate(x[i]))) << "lane " << i << " next to NaN in lane " << lane;
      }
    }
  }
  EXPECT_TRUE(std::isnan(tanh_accurate(nan)));
  EXPECT_TRUE(std::isnan(tanh_accurate(-nan)));
}

TYPED_TEST(TanhTest, IsExactlyOdd) {
  using T = TypeParam;
  std::mt19937_64 gen(7);
  std::uniform_real_distribution<T> u(-25, 25);
  std::vector<T> x(4096);
  for (auto& v : x) v = u(gen);
  std::vector<T> neg(x.size());
  std::transform(x.begin(), x.end(), neg.begin(), [](T v) { return -v; });
  const auto y = packet_tanh(x), yn = packet_tanh(neg);
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_TRUE(same_bits(yn[i], T(-y[i]))) << "x = " << x[i];
}

// Inputs spread over every binade and densely over the range where tanh bends.
template <class T>
std::vector<T> mixed_inputs(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  using Bits = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint64_t>;
  std::uniform_int_distribution<Bits> bits;
  std::uniform_real_distribution<T> dense(-20, 20);
  std::vector<T> x(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (i % 2 == 0) {
      x[i] = dense(gen);
    } else {
      Bits b = bits(gen);
      std::memcpy(&x[i], &b, sizeof(T));
    }
  }
  return x;
}

TYPED_TEST(TanhTest, ScalarMatchesPacketLaneBitwise) {
  using T = TypeParam;
  const auto x = mixed_inputs<T>(200000, 11);
  const auto y = packet_tanh(x);
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const T s = tanh_accurate(x[i]);
    if (!same_bits(s, y[i]) && !(std::isnan(s) && std::isnan(y[i]))) {
      if (++mismatches <= 5) ADD_FAILURE() << "x = " << x[i] << ": scalar " << s << ", packet " << y[i];
    }
  }
  EXPECT_EQ(mismatches, 0u);
}

TYPED_TEST(TanhTest, RowTailsMatchFullPackets) {
  using T = TypeParam;
  const int L = kLanes<T>;
  // Every row length from 1 to a few packets, so each tail length occurs.
  const auto pool = mixed_inputs<T>(static_cast<std::size_t>(4 * L + 1), 3);
  for (int n = 1; n <= 4 * L + 1; ++n) {
    std::vector<T> x(pool.begin() + (4 * L + 1 - n), pool.end());
    const auto row = row_tanh(x), full = packet_tanh(x);
    for (int i = 0; i < n; ++i) {
      EXPECT_TRUE(same_bits(row[i], full[i]) || (std::isnan(row[i]) && std::isnan(full[i])))
          << "row length " << n << ", element " << i << ", x = " << x[i];
    }
  }
}

// The two-packet form shares one branch: a pair with one large lane anywhere computes
// the exp half for all 2L lanes, which must change no lane's value.
TYPED_TEST(TanhTest, PairsMatchSinglePacketsBitwise) {
  using T = TypeParam;
  const int L = kLanes<T>;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> pool = {T(0), -T(0), T(1e-30), T(0.1), T(-0.3), T(0.55), T(0.6249), T(0.625),
                         T(-0.7), T(1), T(3), T(-9.5), T(40), nan};
  std::mt19937 gen(31);
  std::uniform_int_distribution<std::size_t> pick(0, pool.size() - 1);
  std::uniform_real_distribution<double> small(-0.6, 0.6);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<T> x(2 * L);
    // Mostly all-small pairs (the early exit), with a large value in a random lane or none.
    for (auto& v : x) v = static_cast<T>(small(gen));
    if (trial % 3 != 0) x[std::size_t(trial) % x.size()] = pool[pick(gen)];
    Packet<T> t0, t1;
    ptanh_accurate2(ploadu<Packet<T>>(x.data()), ploadu<Packet<T>>(x.data() + L), t0, t1);
    std::vector<T> y(2 * L);
    pstoreu(y.data(), t0);
    pstoreu(y.data() + L, t1);
    for (int i = 0; i < 2 * L; ++i) {
      const T want = tanh_accurate(x[std::size_t(i)]);
      if (std::isnan(want))
        EXPECT_TRUE(std::isnan(y[std::size_t(i)])) << "lane " << i;
      else
        EXPECT_TRUE(same_bits(y[std::size_t(i)], want)) << "x = " << x[std::size_t(i)] << ", lane " << i;
    }
  }
}

// The halves switch where |x| reaches small_limit: the code decides on x^2 as rounded
// (c^2 <= fl(x^2)), which must pick exactly the lanes c <= |x| (tanh.hpp). Checked on
// the 2000 values of each sign nearest c, one at a time and as pairs with the mask
// test that AVX-512 does in mask registers.
TYPED_TEST(TanhTest, HalvesSwitchExactlyAtTheLimit) {
  using T = TypeParam;
  using normkit::detail::ptanh_any_large;
  using normkit::detail::ptanh_use_large;
  const T c = normkit::detail::TanhConstants<T>::small_limit;
  const int L = kLanes<T>;
  std::vector<T> near;
  T lo = c, hi = c;
  for (int k = 0; k < 1000; ++k) {
    lo = std::nextafter(lo, T(0));
    near.insert(near.end(), {lo, hi, -lo, -hi});
    hi = std::nextafter(hi, T(1));
  }
  int large = 0;
  for (const T v : near) {
    const Packet<T> x = Eigen::internal::pset1<Packet<T>>(v);
    const Packet<T> s = Eigen::internal::pmul(x, x);
    const bool want = c <= std::fabs(v);
    large += want;
    EXPECT_EQ(Eigen::internal::predux_any(ptanh_use_large(s)), want) << "x = " << v;
    // The pair test: v in one lane of the second packet, small values elsewhere.
    std::vector<T> pair(2 * std::size_t(L), T(0.25));
    pair[std::size_t(L + L / 2)] = v;
    const Packet<T> s0 = Eigen::internal::pmul(ploadu<Packet<T>>(pair.data()),
                                               ploadu<Packet<T>>(pair.data()));
    const Packet<T> s1 = Eigen::internal::pmul(ploadu<Packet<T>>(pair.data() + L),
                                               ploadu<Packet<T>>(pair.data() + L));
    EXPECT_EQ(ptanh_any_large(s0, s1), want) << "x = " << v;
    EXPECT_EQ(ptanh_any_large(s1, s0), want) << "x = " << v;
  }
  EXPECT_EQ(large, 2000);  // c itself and the 999 above it, of each sign
}

TYPED_TEST(TanhTest, SampledErrorWithinTwoUlp) {
  using T = TypeParam;
  const auto x = mixed_inputs<T>(1000000, 5);
  const auto y = packet_tanh(x);
  double worst = 0;
  T worst_x = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double e = ulp_error(y[i], exact_tanh(x[i]));
    if (e > worst) {
      worst = e;
      worst_x = x[i];
    }
  }
  this->RecordProperty("max_ulp", std::to_string(worst));
  EXPECT_LE(worst, 2.0) << "at x = " << worst_x;
}

TYPED_TEST(TanhTest, GradFromTanhIsAccurate) {
  using T = TypeParam;
  const int L = kLanes<T>;
  std::mt19937_64 gen(9);
  std::uniform_real_distribution<T> u(-1, 1);
  std::vector<T> t(100000);
  for (auto& v : t) v = u(gen);
  t.insert(t.end(), {T(0), T(1), T(-1), std::nextafter(T(1), T(0)), T(0.5)});
  while (t.size() % L) t.push_back(T(0.25));
  double worst = 0;
  std::vector<T> g(t.size());
  for (std::size_t i = 0; i < t.size(); i += L) {
    pstoreu(g.data() + i, ptanh_grad_from_tanh(ploadu<Packet<T>>(t.data() + i)));
  }
  for (std::size_t i = 0; i < t.size(); ++i) {
    // (1 - t)(1 + t) in the wider type: both factors are exact there, so the only
    // error is the final rounding (1 - t*t would cancel for |t| near 1).
    const Wide<T> tw = t[i];
    worst = std::max(worst, ulp_error(g[i], (Wide<T>(1) - tw) * (Wide<T>(1) + tw)));
    EXPECT_TRUE(same_bits(g[i], tanh_grad_from_tanh(t[i]))) << "t = " << t[i];
  }
  EXPECT_EQ(tanh_grad_from_tanh(T(1)), T(0));
  EXPECT_EQ(tanh_grad_from_tanh(T(-1)), T(0));
  EXPECT_EQ(tanh_grad_from_tanh(T(0)), T(1));
  this->RecordProperty("max_ulp", std::to_string(worst));
  EXPECT_LE(worst, 1.5);
}

}  // namespace
