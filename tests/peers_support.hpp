// Shared by the peer tests (test_peers_*.cpp): the same inputs for normkit and a peer,
// and the comparison of their outputs.
//
// Tolerance: each library is within a few ulp of the exact result, relative to the size
// of the terms an output is computed from (NormScales: rows with a variance below eps,
// or a single value, make x - mean a small difference of large numbers); the two may
// differ by the sum. kUlps units of epsilon(T) times that size: against both peers, in
// float and double, every comparison passes at 4 and some fail at 1; kUlps leaves 4x for
// other compilers and reduction orders. A semantic difference is far larger: eps 1% off
// (LayerNorm, BatchNorm) or 10% off (RMSNorm), momentum 0.1001 for 0.1, alpha 1e-4 off,
// each fails.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "test_support.hpp"

namespace nkpeers {

using nktest::Index;

inline constexpr double kUlps = 16;

template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

/// The spacing of T at 1, torch.finfo(dtype).eps: the next T after 1, minus 1. Not
/// std::numeric_limits<Eigen::half>::epsilon(), which Eigen 3.4 gives as 2^-13 (half's
/// is 2^-10).
template <class T>
double epsilon_of() {
  using Bits = std::conditional_t<sizeof(T) == 2, std::uint16_t,
                                  std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>;
  static_assert(sizeof(T) == sizeof(Bits));
  const T one(1);
  Bits u;
  std::memcpy(&u, static_cast<const void*>(&one), sizeof u);
  ++u;
  T next;
  std::memcpy(static_cast<void*>(&next), &u, sizeof u);
  return static_cast<double>(next) - 1;
}

/// What normkit computes T in, and torch with it: float for the 16-bit storage types
/// (half, bfloat16), T otherwise.
template <class T>
using compute_t = std::conditional_t<(sizeof(T) < sizeof(float)), float, T>;

/// Every |got - want| <= kUlps * epsilon(compute_t<T>) * scale, plus for a 16-bit T
/// epsilon(T) * |want| (normkit's result rounded to T: at most half that): `scale` is the
/// size of the terms an output is computed from (see NormScales), at least 1 in
/// magnitude of the output.
template <class T>
void expect_agree(const std::vector<double>& got, const std::vector<double>& want, double scale,
                  const std::string& what) {
  for (double w : want) scale = std::max(scale, std::abs(w));
  const double narrow = sizeof(T) < sizeof(float) ? epsilon_of<T>() : 0;
  nktest::expect_close(got, want, kUlps * epsilon_of<compute_t<T>>() * scale, narrow, what);
}

template <class T>
void expect_agree(const std::vector<double>& got, const std::vector<double>& want, const std::string& what) {
  expect_agree<T>(got, want, 1.0, what);
}

/// The scale of each output of a normalization over groups (LayerNorm/RMSNorm rows,
/// BatchNorm channels), computed in double from the inputs: what a rounding error of
/// epsilon in a term moves the output by. With xhat = (x - mean) * rstd, g = dy * w and
/// c = max (|x| + |mean|) * rstd (the size of xhat's terms: |xhat| where var >> eps, up
/// to |x| / sqrt(eps) where the variance is below eps, or a row has one value):
///   y = w * xhat + b                                   |w| c + |b|
///   dx = rstd (g - mean(g) - xhat mean(g xhat))        rstd |g| (2 + 2 c^2)
///   dweight = sum dy xhat, dbias = sum dy              sum |dy| c, sum |dy|
struct NormScales {
  double y = 1, dx = 1, dweight = 1, dbias = 1;
};

/// `group_of(i)`, `param_of(i)`: element i's group and parameter (weight) index; the
/// statistics are (mean, var) per group from the batch (`stats` empty) or given (eval).
template <class GroupOf, class ParamOf>
NormScales norm_scales(const std::vector<double>& x, const std::vector<double>& dy, const std::vector<double>& w,
                       const std::vector<double>& b, Index groups, GroupOf group_of, ParamOf param_of, bool center,
                       double eps, std::vector<std::pair<double, double>> stats = {}) {
  const std::size_t G = static_cast<std::size_t>(groups);
  if (stats.empty()) {
    std::vector<double> sum(G), count(G), sq(G);
    for (std::size_t i = 0; i < x.size(); ++i) {
      sum[group_of(i)] += x[i];
      count[group_of(i)] += 1;
    }
    for (std::size_t k = 0; k < G; ++k) sum[k] = center ? sum[k] / count[k] : 0;
    for (std::size_t i = 0; i < x.size(); ++i) sq[group_of(i)] += (x[i] - sum[group_of(i)]) * (x[i] - sum[group_of(i)]);
    for (std::size_t k = 0; k < G; ++k) stats.emplace_back(sum[k], sq[k] / count[k]);
  }
  std::vector<double> c(G), rstd(G);
  for (std::size_t k = 0; k < G; ++k) rstd[k] = 1 / std::sqrt(stats[k].second + eps);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const std::size_t k = group_of(i);
    c[k] = std::max(c[k], (std::abs(x[i]) + std::abs(stats[k].first)) * rstd[k]);
  }
  const double wmax = w.empty() ? 1 : *std::max_element(w.begin(), w.end(), [](double p, double q) { return std::abs(p) < std::abs(q); });
  NormScales s;
  std::vector<double> dw(w.empty() ? 1 : w.size()), db(dw.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const std::size_t k = group_of(i), p = w.empty() ? 0 : param_of(i);
    const double g = std::abs(dy[i] * (w.empty() ? 1 : w[p]));
    s.y = std::max(s.y, std::abs(wmax) * c[k] + (b.empty() ? 0 : std::abs(b[p])));
    s.dx = std::max(s.dx, rstd[k] * g * (2 + 2 * c[k] * c[k]));
    dw[p] += std::abs(dy[i]) * c[k];
    db[p] += std::abs(dy[i]);
  }
  s.dweight = *std::max_element(dw.begin(), dw.end());
  s.dbias = *std::max_element(db.begin(), db.end());
  return s;
}

template <class T>
std::vector<double> values(const Eigen::Tensor<T, 1>& t) {
  return std::vector<double>(t.data(), t.data() + t.size());
}

template <class T>
void set_values(Eigen::Tensor<T, 1>& t, const std::vector<double>& v) {
  ASSERT_EQ(static_cast<std::size_t>(t.size()), v.size());
  for (Index i = 0; i < t.size(); ++i) t(i) = static_cast<T>(v[static_cast<std::size_t>(i)]);
}

inline std::string dims_str(const std::vector<Index>& d) {
  std::string s = "[";
  for (std::size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

/// Inputs of one case: x, dy in [-2, 2] times `scale`, rounded to T.
template <class T>
struct Inputs {
  std::vector<double> x, dy;
  Inputs(Index n, unsigned seed, double scale) {
    x = nktest::random_vector(n, seed);
    dy = nktest::random_vector(n, seed + 1);
    for (double& v : x) v *= scale;
    x = nktest::quantized<T>(x);
    dy = nktest::quantized<T>(dy);
  }
};

inline constexpr double kScales[] = {1.0, 1e-3};

}  // namespace nkpeers
