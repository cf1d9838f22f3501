// Exhaustive accuracy of normkit::detail::ptanh_accurate (core/tanh.hpp):
//   float:  all 2^32 bit patterns against double std::tanh, and scalar == packet lane
//           bitwise for every one of them;
//   double: 1e7 points (log-uniform over the whole range, and dense in [-20, 20])
//           against long double tanhl.
// Error unit: |result - exact| / (spacing of the result type at the exact value).
// Two threads; about a minute and a half at -O2 -march=native on 2 Zen 3 cores.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

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
using normkit::detail::tanh_accurate;

constexpr int kThreads = 2;

struct Worst {
  double ulp = 0;
  double x = 0;
  double result = 0;
  long double exact = 0;
  std::uint64_t bad_nan = 0;       // NaN in and not NaN out, or the reverse
  std::uint64_t scalar_differs = 0;  // scalar and packet lane not bitwise equal

  void merge(const Worst& o) {
    if (o.ulp > ulp) {
      ulp = o.ulp;
      x = o.x;
      result = o.result;
      exact = o.exact;
    }
    bad_nan += o.bad_nan;
    scalar_differs += o.scalar_differs;
  }
};

double float_ulp_error(float r, double exact) {
  int e = 0;
  std::frexp(std::fabs(exact), &e);
  return std::fabs(static_cast<double>(r) - exact) / std::ldexp(1.0, std::max(e - 24, -149));
}

double double_ulp_error(double r, long double exact) {
  int e = 0;
  std::frexp(std::fabs(exact), &e);
  return static_cast<double>(std::fabs(static_cast<long double>(r) - exact) /
                             std::ldexp(1.0L, std::max(e - 53, -1074)));
}

void float_range(std::uint64_t begin, std::uint64_t end, Worst& w) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr int L = Eigen::internal::unpacket_traits<Packet>::size;
  float in[L], out[L];
  for (std::uint64_t b = begin; b < end; b += L) {
    for (int i = 0; i < L; ++i) {
      const auto bits = static_cast<std::uint32_t>(b + static_cast<std::uint64_t>(i));
      std::memcpy(&in[i], &bits, sizeof(float));
    }
    pstoreu(out, ptanh_accurate(ploadu<Packet>(in)));
    for (int i = 0; i < L; ++i) {
      const float s = tanh_accurate(in[i]);
      if (std::memcmp(&s, &out[i], sizeof(float)) != 0 && !(std::isnan(s) && std::isnan(out[i]))) {
        ++w.scalar_differs;
      }
      if (std::isnan(in[i]) || std::isnan(out[i])) {
        w.bad_nan += std::isnan(in[i]) != std::isnan(out[i]);
        continue;
      }
      const double exact = std::tanh(static_cast<double>(in[i]));
      const double e = float_ulp_error(out[i], exact);
      if (e > w.ulp) {
        w.ulp = e;
        w.x = in[i];
        w.result = out[i];
        w.exact = exact;
      }
    }
  }
}

void double_samples(std::uint64_t seed, std::size_t n, Worst& w) {
  using Packet = Eigen::internal::packet_traits<double>::type;
  constexpr int L = Eigen::internal::unpacket_traits<Packet>::size;
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dense(-20, 20);
  std::uniform_int_distribution<std::uint64_t> exponent(0, 2046), mantissa(0, (std::uint64_t(1) << 52) - 1),
      sign(0, 1);
  double in[L], out[L];
  for (std::size_t k = 0; k < n; k += L) {
    for (int i = 0; i < L; ++i) {
      if (i % 2 == 0) {
        in[i] = dense(gen);
      } else {
        // Uniform exponent field: log-uniform magnitudes, denormals to DBL_MAX.
        const std::uint64_t bits = sign(gen) << 63 | exponent(gen) << 52 | mantissa(gen);
        std::memcpy(&in[i], &bits, sizeof(double));
      }
    }
    pstoreu(out, ptanh_accurate(ploadu<Packet>(in)));
    for (int i = 0; i < L; ++i) {
      const double s = tanh_accurate(in[i]);
      if (std::memcmp(&s, &out[i], sizeof(double)) != 0) ++w.scalar_differs;
      const long double exact = tanhl(static_cast<long double>(in[i]));
      const double e = double_ulp_error(out[i], exact);
      if (e > w.ulp) {
        w.ulp = e;
        w.x = in[i];
        w.result = out[i];
        w.exact = exact;
      }
    }
  }
}

TEST(TanhExhaustiveTest, FloatAllBitPatternsWithinTwoUlp) {
  const std::uint64_t total = std::uint64_t(1) << 32;
  std::vector<Worst> part(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back(float_range, total / kThreads * t, total / kThreads * (t + 1), std::ref(part[t]));
  }
  for (auto& th : threads) th.join();
  Worst w;
  for (const auto& p : part) w.merge(p);
  std::printf("float tanh, all 2^32 inputs: max error %.4f ulp at x = %a (%.9g): got %.9g, exact %.17g\n", w.ulp,
              w.x, w.x, w.result, static_cast<double>(w.exact));
  RecordProperty("max_ulp", std::to_string(w.ulp));
  RecordProperty("max_ulp_at", std::to_string(w.x));
  EXPECT_LE(w.ulp, 2.0);
  EXPECT_EQ(w.bad_nan, 0u);
  EXPECT_EQ(w.scalar_differs, 0u);
}

TEST(TanhExhaustiveTest, DoubleSampledWithinTwoUlp) {
  const std::size_t total = 10000000;
  std::vector<Worst> part(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back(double_samples, 1234u + static_cast<unsigned>(t), total / kThreads, std::ref(part[t]));
  }
  for (auto& th : threads) th.join();
  Worst w;
  for (const auto& p : part) w.merge(p);
  std::printf("double tanh, 1e7 samples: max error %.4f ulp at x = %a (%.17g): got %.17g, exact %.21Lg\n", w.ulp,
              w.x, w.x, w.result, w.exact);
  RecordProperty("max_ulp", std::to_string(w.ulp));
  RecordProperty("max_ulp_at", std::to_string(w.x));
  EXPECT_LE(w.ulp, 2.0);
  EXPECT_EQ(w.scalar_differs, 0u);
}

}  // namespace
