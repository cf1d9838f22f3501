// Test helpers shared by the layer tests: tensors built from logical (row-major) data
// in either layout, rank dispatch, random data, ulp-aware comparisons.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#define EIGEN_USE_THREADS
#include <unsupported/Eigen/CXX11/Tensor>

#include <normkit/core/error.hpp>
#include <normkit/core/simd.hpp>

namespace nktest {

using Index = Eigen::Index;
using LD = long double;

/// Readable names for typed tests over scalar types (TYPED_TEST_SUITE's third argument).
struct ScalarNames {
  template <class T>
  static std::string GetName(int) {
    if constexpr (std::is_same_v<T, float>)
      return "float";
    else if constexpr (std::is_same_v<T, double>)
      return "double";
    else if constexpr (std::is_same_v<T, Eigen::half>)
      return "half";
    else
      return "bfloat16";
  }
};

/// The message of the normkit::Error that f() throws, or a line saying none was thrown.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const normkit::Error& e) {
    return e.what();
  }
  return "<no normkit::Error thrown>";
}

/// Whether p[0, n) all equal v (an output left untouched by a refused call).
inline bool all_equal(const float* p, Index n, float v) {
  for (Index i = 0; i < n; ++i)
    if (p[i] != v) return false;
  return true;
}

inline Index numel(const std::vector<Index>& d) {
  Index n = 1;
  for (Index v : d) n *= v;
  return n;
}

/// A tensor of layout L and logical dims `dims` whose values, read in row-major logical
/// order, are `data`.
template <class T, int R, int L, class S>
Eigen::Tensor<T, R, L> make_tensor(const std::vector<Index>& dims, const std::vector<S>& data) {
  std::array<Index, R> d{};
  for (int i = 0; i < R; ++i) d[i] = dims[i];
  Eigen::Tensor<T, R, Eigen::RowMajor> rm(d);
  for (Index i = 0; i < rm.size(); ++i) rm.data()[i] = static_cast<T>(data[static_cast<std::size_t>(i)]);
  if constexpr (L == Eigen::RowMajor) {
    return rm;
  } else {
    std::array<Index, R> rev{};
    for (int i = 0; i < R; ++i) rev[i] = R - 1 - i;
    Eigen::Tensor<T, R, Eigen::ColMajor> cm = rm.swap_layout().shuffle(rev);
    return cm;
  }
}

/// The values of t in row-major logical order.
template <class T, int R, int L>
std::vector<T> logical(const Eigen::Tensor<T, R, L>& t) {
  if constexpr (L == Eigen::RowMajor) {
    return std::vector<T>(t.data(), t.data() + t.size());
  } else {
    std::array<Index, R> rev{};
    for (int i = 0; i < R; ++i) rev[i] = R - 1 - i;
    Eigen::Tensor<T, R, Eigen::RowMajor> rm = t.swap_layout().shuffle(rev);
    return std::vector<T>(rm.data(), rm.data() + rm.size());
  }
}

/// Calls f(std::integral_constant<int, R>{}) for R = dims.size() in 1..4.
template <class F>
void with_rank(std::size_t rank, F&& f) {
  switch (rank) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: FAIL() << "rank " << rank << " not covered by with_rank";
  }
}

inline std::vector<double> random_vector(Index n, unsigned seed, double lo = -2, double hi = 2) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = dist(gen);
  return v;
}

/// Round-trips through T, so that references see exactly the values the layer sees.
template <class T>
std::vector<double> quantized(std::vector<double> v) {
  for (auto& e : v) e = static_cast<double>(static_cast<T>(e));
  return v;
}

/// Max |a - b| over elements, and where.
template <class A, class B>
std::pair<long double, std::size_t> max_abs_diff(const std::vector<A>& a, const std::vector<B>& b) {
  long double m = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const long double d = std::fabs(static_cast<long double>(a[i]) - static_cast<long double>(b[i]));
    if (d > m || std::isnan(static_cast<double>(d))) {
      m = d;
      at = i;
      if (std::isnan(static_cast<double>(d))) break;
    }
  }
  return {m, at};
}

/// Asserts every |got - want| <= atol + rtol * |want|; on failure prints the max abs diff.
template <class A, class B>
void expect_close(const std::vector<A>& got, const std::vector<B>& want, long double atol,
                  long double rtol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  long double worst = 0;
  std::size_t at = 0;
  bool ok = true;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const long double g = static_cast<long double>(got[i]), w = static_cast<long double>(want[i]);
    const long double d = std::fabs(g - w);
    const bool good = d <= atol + rtol * std::fabs(w);
    if (!good || std::isnan(static_cast<double>(d)) != std::isnan(static_cast<double>(w - w))) {
      if (ok || d > worst) {
        worst = d;
        at = i;
      }
      ok = false;
    }
  }
  const auto md = max_abs_diff(got, want);
  EXPECT_TRUE(ok) << what << ": element " << at << " got " << static_cast<double>(got[at])
                  << " want " << static_cast<double>(want[at]) << "; max abs diff "
                  << static_cast<double>(md.first) << " at " << md.second;
}

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  return a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
std::vector<T> values(const Eigen::Tensor<T, 1>& t) {
  return std::vector<T>(t.data(), t.data() + t.size());
}

/// Runs f(device) on Eigen::DefaultDevice for 1 thread, else a pool of `threads`.
template <class F>
void on_threads(int threads, F&& f) {
  if (threads == 1) {
    Eigen::DefaultDevice d;
    f(d);
  } else {
    Eigen::ThreadPool pool(threads);
    Eigen::ThreadPoolDevice d(&pool, threads);
    f(d);
  }
}

/// While alive, the last-level cache size that the streaming choice sees
/// (normkit::detail::simd::stream_output) is `bytes`: 0 makes every output of
/// kStreamBytes or more streamed, whatever the machine.
struct LlcBytes {
  std::size_t saved = normkit::detail::simd::llc_bytes();
  explicit LlcBytes(std::size_t bytes) { normkit::detail::simd::llc_bytes() = bytes; }
  ~LlcBytes() { normkit::detail::simd::llc_bytes() = saved; }
  LlcBytes(const LlcBytes&) = delete;
  LlcBytes& operator=(const LlcBytes&) = delete;
};

}  // namespace nktest
