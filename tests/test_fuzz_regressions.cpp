// Defects the fuzz target (tests/fuzz) found outside BatchNorm, each pinned here with the
// smallest input that shows it; the crashing inputs themselves are in tests/fuzz/corpus.
//
// 1. LayerNorm on a constant row with a tiny eps: the offset correction d = mean(x - m)
//    was computed as sum * fl(1/n), which leaves a residual of one ulp of x - m; with
//    eps at the smallest normal number rstd ~ 1/ulp and y came out as +-1 (times the
//    weight) instead of the bias. Every element of such a row must give y = b exactly
//    (x - mean = 0).
// 2. LayerNorm<double> on a row whose squares overflow double (|x| ~ 1e207) with a large
//    offset (spread 1e198): the long-double fallback formed x - mean in one piece and
//    lost the spread's leading digits (relative error 5e-10 in y).
#include <gtest/gtest.h>
#include <normkit/normkit.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "fuzz/reference_layers.hpp"

namespace {

using normkit::Index;

template <class T>
class ConstantRowTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(ConstantRowTest, Scalars);

template <class T, int Layout>
void check_constant_rows(Index rows, Index features, double value) {
  using Acc = normkit::detail::acc_t<T>;
  const double eps = static_cast<double>(std::numeric_limits<Acc>::min());  // the smallest eps allowed
  normkit::LayerNorm<T> layer({features}, normkit::LayerNormOptions().eps(eps));
  for (Index f = 0; f < features; ++f) {
    layer.weight()(f) = T(1.5f + 0.25f * static_cast<float>(f % 5));
    layer.bias()(f) = T(-0.5f + 0.125f * static_cast<float>(f % 7));
  }
  Eigen::Tensor<T, 2, Layout> x(rows, features), y(rows, features);
  x.setConstant(T(value));
  layer.forward(x, y);
  for (Index r = 0; r < rows; ++r)
    for (Index f = 0; f < features; ++f)
      ASSERT_EQ(static_cast<double>(y(r, f)), static_cast<double>(layer.bias()(f)))
          << "row " << r << " feature " << f << " of " << rows << "x" << features << ", x = " << value;
}

// The failing sizes (110 float, 49 double, 121 half) and the SIMD-tail grid.
TYPED_TEST(ConstantRowTest, LayerNormGivesTheBiasExactly) {
  for (Index features : {1, 2, 3, 7, 9, 17, 33, 49, 100, 110, 121})
    for (double value : {-4.0, -7.99658203125, 3.16796875, -6.62109375, 0.1, -9504.0}) {
      check_constant_rows<TypeParam, Eigen::RowMajor>(3, features, value);
      check_constant_rows<TypeParam, Eigen::ColMajor>(3, features, value);
    }
}

// Inputs of the fuzz case: 6 values near -1.08e207, one of them 5e197 away from the rest.
TEST(LayerNormWideRowTest, HugeOffsetRowMatchesTheReference) {
  const std::vector<double> xs = {-1.0802496466520738e+207, -1.0802496466013001e+207, -1.0802496466013001e+207,
                                  -1.0802496466013001e+207, -1.0802496466013001e+207, -1.0802496466013001e+207};
  const Index n = static_cast<Index>(xs.size());
  normkit::LayerNorm<double> layer({n}, normkit::LayerNormOptions().eps(1000).elementwise_affine(false));
  const nkref::Shape3 s{1, static_cast<long>(n), 1};
  std::vector<nkref::LD> xl(xs.begin(), xs.end()), dyl(xs.size());
  for (std::size_t i = 0; i < xs.size(); ++i) dyl[i] = 0.5L - 0.25L * static_cast<nkref::LD>(i);
  const nkref::Result want = nkref::normalize(true, true, xl, dyl, s, nkref::Params{{}, {}, 1000.0L});
  for (int layout = 0; layout < 2; ++layout) {
    Eigen::Tensor<double, 2, Eigen::RowMajor> xr(1, n), yr(1, n), dyr(1, n), dxr(1, n);
    for (Index i = 0; i < n; ++i) {
      xr(0, i) = xs[static_cast<std::size_t>(i)];
      dyr(0, i) = static_cast<double>(dyl[static_cast<std::size_t>(i)]);
    }
    normkit::LayerNorm<double>::Cache cache;
    normkit::LayerNorm<double>::Grads grads;
    if (layout == 0) {
      layer.forward(xr, yr, cache);
      layer.backward(xr, dyr, cache, dxr, grads);
    } else {  // the same row as a ColMajor [1, n] tensor: the strided kernels
      Eigen::Tensor<double, 2, Eigen::ColMajor> xc(1, n), yc(1, n), dyc(1, n), dxc(1, n);
      for (Index i = 0; i < n; ++i) xc(0, i) = xr(0, i), dyc(0, i) = dyr(0, i);
      layer.forward(xc, yc, cache);
      layer.backward(xc, dyc, cache, dxc, grads);
      for (Index i = 0; i < n; ++i) yr(0, i) = yc(0, i), dxr(0, i) = dxc(0, i);
    }
    // 64 unit roundoffs of the terms' magnitude, as in the fuzz target.
    const long double tol = 64 * std::ldexp(1.0L, -53);
    for (Index i = 0; i < n; ++i) {
      const std::size_t k = static_cast<std::size_t>(i);
      EXPECT_NEAR(yr(0, i), static_cast<double>(want.y[k]), static_cast<double>(tol * want.y_scale[k]))
          << "y[" << i << "], layout " << layout;
      EXPECT_NEAR(dxr(0, i), static_cast<double>(want.dx[k]), static_cast<double>(tol * want.dx_scale[k]))
          << "dx[" << i << "], layout " << layout;
    }
  }
}

}  // namespace
