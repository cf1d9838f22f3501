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
// 3. LayerNorm<float> ColMajor (the strided column kernels), 1320 equal features: the
//    backward's sum(g) ran down the features in one running sum, 110 ulp off, so that
//    dx = rstd * (g - mean(g)) was 6e-6 where it is 0 (replay input 146695).
// 4. BatchNorm<float> with batch statistics and dy near FLT_MAX: the backward map
//    ((x - m) * a + dy) * k + b overflowed in its inner sum although dx is 0.1
//    (replay input 8471).
// 6. RMSNorm<double> ColMajor (column kernels): sum(g * (x - m)) underflowed with
//    subnormal weights and x ~ 1e-27, where sum(g * xhat) does not (input 183254); the
//    first fix, which took rstd out of that sum, left dx = rstd * (g - xhat * mean(g xhat))
//    to overflow in the difference with dy near -DBL_MAX where dx is ~1e306 (input 3345):
//    DyNearDoubleMax fails on that intermediate form, SubnormalWeightsTinyValues before.
// 5. BatchNorm<double> eval backward with a subnormal weight * rstd (the long-double
//    path): it read the running mean, and a NaN running mean gave NaN dx, although eval
//    dx = dy * weight * rstd does not involve it (replay input 157031).
// 7. BatchNorm<float> backward with batch statistics, dy ~ 1e-42 and a spread of 5e-5:
//    sum(dy * (x - m)) underflowed in float (each product ~ 4e-47), so mean(dy * xhat) was
//    lost and dx came out as rstd * (dy - mean(dy)) ~ 1.7e-38 where it is 0 (replay input
//    296698). The backward sums are now of dy * xhat, xhat = (x - m) * rstd.
// 8. BatchNorm<double> with batch statistics, a channel in long double (subnormal weight)
//    with a large offset (7 values near 7.03e13, std 1.8e7, eps 1000): its backward sums
//    were taken around the long-double mean without the correction the vector path makes
//    for the mean's rounding, so dweight = sum(dy * xhat) came out as -2.6e-12 where it
//    is 0 (dy = -4 everywhere; tolerance 3.4e-13). Replay inputs 299505 (seed 1) and
//    271059 (seed 4), found with fuzz_layers_replay --seed.
// 9. RMSNorm<float> ColMajor backward with rows whose sums overflow (the double
//    fallback, row_backward_wide) and NaN/Inf inputs: GCC -O3 vectorized the fallback's
//    loop behind a runtime overlap check, and the vector and scalar versions passed on
//    NaNs of different signs, so dx written next to dy (scalar) and dx elsewhere
//    (vector) differed in the sign of a NaN (input 12977 of --seed 6, seen as "dx
//    differs between 1 and 3 threads"). The fallbacks are now scalar code
//    (NORMKIT_SCALAR_CODE, core/config.hpp).
#include <gtest/gtest.h>
#include <normkit/normkit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "fuzz/reference_layers.hpp"
#include "test_support.hpp"

namespace {

using normkit::Index;

template <class T>
class ConstantRowTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(ConstantRowTest, Scalars, nktest::ScalarNames);

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
  normkit::LayerNorm<double> layer(n, normkit::LayerNormOptions().eps(1000).elementwise_affine(false));
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

// 64 unit roundoffs of the accumulation type times the terms' magnitude, plus the
// rounding of the result to T, plus 64 subnormal steps times how much the operations
// after a subnormal intermediate amplify its rounding: the fuzz target's criterion.
template <class Acc>
void expect_like_fuzz(const char* what, const std::vector<double>& got, const std::vector<nkref::LD>& want,
                      const std::vector<nkref::LD>& scale, const std::vector<nkref::LD>& amp) {
  const long double u = std::numeric_limits<Acc>::epsilon() / 2;
  const long double tiny = 64 * static_cast<long double>(std::numeric_limits<Acc>::denorm_min());
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const long double allowed = 64 * u * scale[i] + u * std::fabs(want[i]) + tiny * amp[i];
    EXPECT_LE(std::fabs(got[i] - want[i]), allowed)
        << what << "[" << i << "] = " << got[i] << ", reference " << static_cast<double>(want[i]);
  }
}

TEST(LayerNormColumnTest, EqualFeaturesGiveZeroDx) {
  // The fuzz case: ColMajor [10, 12, 11] normalized over all three dims, x = dy = -4,
  // weight 6.8999, bias large, eps 1000.
  const Index a = 10, b = 12, c = 11;
  normkit::LayerNorm<float> layer({a, b, c}, normkit::LayerNormOptions().eps(1000));
  layer.weight().setConstant(6.89990234375f);
  layer.bias().setConstant(-8.79e12f);
  Eigen::Tensor<float, 3, Eigen::ColMajor> x(a, b, c), y(a, b, c), dy(a, b, c), dx(a, b, c);
  x.setConstant(-4.0f);
  dy.setConstant(-4.0f);
  normkit::LayerNorm<float>::Cache cache;
  normkit::LayerNorm<float>::Grads grads;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);
  // dx = rstd * (g - mean(g) - xhat * mean(g xhat)) with g constant and xhat = 0: 0; the
  // fuzz target allows 64 u * rstd * |g| (3.3e-6; it was 6.2e-6).
  const double scale = 6.89990234375 * 4 / std::sqrt(1000.0);
  const double allowed = 64 * std::ldexp(1.0, -24) * scale;
  for (Index k = 0; k < x.size(); ++k) ASSERT_LE(std::fabs(dx.data()[k]), allowed) << "dx[" << k << "]";
}

TEST(BatchNormOverflowTest, DyNearFloatMaxBatchStatistics) {
  const std::vector<float> xs = {1.94580078125f, 0.57421875f, 2.187744140625f, -1.7266845703125f, -3.8907470703125f,
                                 -1.3785400390625f, -2.515380859375f, 1.9471435546875f, -3.3848876953125f,
                                 -0.5545654296875f, -0.1956787109375f, -0.8382568359375f, -3.927001953125f,
                                 3.4437255859375f, 2.48583984375f, 3.79736328125f, -3.4384765625f, 2.549560546875f,
                                 -3.5955810546875f, -0.0908203125f, -1.1827392578125f, 3.039306640625f,
                                 2.23486328125f, -2.5916748046875f, 3.7362060546875f, -2.192626953125f,
                                 -3.549072265625f, 2.86083984375f, -1.865966796875f, -2.2723388671875f,
                                 3.1822509765625f, -3.8297119140625f, -3.5648193359375f, -1.60205078125f,
                                 -2.891357421875f, -2.8131103515625f};
  const std::vector<float> head = {-1.2543549736727956e+38f, 1.4572699349043367e+38f, -2.1920836849121375e+38f,
                                   1.6258118909323772e+38f,  3.2911890839267898e+38f, -3.9939144900548694e+37f,
                                   1.3570586055346145e+38f,  -8.4167127006247155e+37f, 8.8258651860170198e+37f,
                                   1.002009346348003e+38f,   -1.2091819910035426e+38f, 1.6617425851934382e+38f,
                                   -2.0296686391771681e+38f, 1.3909123810522616e+38f, 1.7637191940830142e+38f,
                                   -2.4798407261061136e+37f, -1.8898920077454105e+38f, 2.9544167096822209e+38f,
                                   -1.7585268972244794e+38f, -1.3596547539638819e+38f};
  std::vector<float> dys(xs.size(), -std::numeric_limits<float>::max());
  std::copy(head.begin(), head.end(), dys.begin());
  // [4, 9, 1] with the channel last: one channel of 36 values; eval without running
  // statistics uses the batch's, as PyTorch does.
  normkit::BatchNorm<float> bn(1, normkit::BatchNormOptions().eps(1000).affine(false).track_running_stats(false).channel_axis(2));
  bn.eval();
  Eigen::Tensor<float, 3, Eigen::RowMajor> x(4, 9, 1), y(4, 9, 1), dy(4, 9, 1), dx(4, 9, 1);
  std::copy(xs.begin(), xs.end(), x.data());
  std::copy(dys.begin(), dys.end(), dy.data());
  normkit::BatchNorm<float>::Cache cache;
  normkit::BatchNorm<float>::Grads grads;
  bn.forward(x, y, cache);
  bn.backward(x, dy, cache, dx, grads);
  const nkref::Shape3 s{36, 1, 1};
  const std::vector<nkref::LD> xl(xs.begin(), xs.end()), dyl(dys.begin(), dys.end());
  nkref::Params p;
  p.eps = 1000;
  const nkref::Result want = nkref::normalize(true, false, xl, dyl, s, p);
  expect_like_fuzz<float>("dx", std::vector<double>(dx.data(), dx.data() + dx.size()), want.dx, want.dx_scale,
                          want.dx_amp);
}

TEST(BatchNormOverflowTest, EvalDxIgnoresANaNRunningMean) {
  // Channel 1: running mean NaN, weight subnormal (weight * rstd is computed in long
  // double); eval dx = dy * weight / sqrt(running_var + eps) must not see the mean.
  normkit::BatchNorm<double> bn(2, normkit::BatchNormOptions().eps(1e-300));
  bn.weight()(0) = 2.0;
  bn.weight()(1) = 1.6057133489840513e-321;
  bn.running_mean()(0) = 0.5;
  bn.running_mean()(1) = std::numeric_limits<double>::quiet_NaN();
  bn.running_var()(0) = 2.0;
  bn.running_var()(1) = 1.6322021484375;
  bn.eval();
  Eigen::Tensor<double, 2, Eigen::RowMajor> x(7, 2), y(7, 2), dy(7, 2), dx(7, 2);
  for (Index r = 0; r < 7; ++r) {
    x(r, 0) = 0.25 * static_cast<double>(r) - 1;
    x(r, 1) = 1e3 * static_cast<double>(r);
    dy(r, 0) = dy(r, 1) = -4;
  }
  normkit::BatchNorm<double>::Cache cache;
  normkit::BatchNorm<double>::Grads grads;
  bn.forward(x, y, cache);
  bn.backward(x, dy, cache, dx, grads);
  const long double k1 = 1.6057133489840513e-321L / std::sqrt(1.6322021484375L + 1e-300L);
  const double want1 = static_cast<double>(-4 * k1), want0 = static_cast<double>(-4 * 2.0L / std::sqrt(2.0L + 1e-300L));
  for (Index r = 0; r < 7; ++r) {
    EXPECT_NEAR(dx(r, 0), want0, 4 * std::numeric_limits<double>::epsilon()) << "row " << r;
    ASSERT_TRUE(std::isfinite(dx(r, 1))) << "row " << r;
    EXPECT_NEAR(dx(r, 1), want1, 2 * std::numeric_limits<double>::denorm_min()) << "row " << r;
  }
}

// Channel 1 goes through long double (weight * rstd is subnormal) and has a large offset;
// channel 0 is the same values with weight 1 (the vector path). Training mode and eval
// without running statistics (both batch statistics); both layouts.
template <int Layout>
void check_offset_wide_channel(bool train) {
  const double xs[7] = {70300075032576, 70300024700928, 70300024700928, 70300024700928,
                        70300024700928, 70300024700928, 70300024700928};
  normkit::BatchNorm<double> bn(2, normkit::BatchNormOptions().eps(1000).track_running_stats(false));
  bn.weight()(0) = 1;
  bn.weight()(1) = 2.7618269602525682e-321;
  bn.bias()(0) = bn.bias()(1) = 0.5;
  if (!train) bn.eval();
  Eigen::Tensor<double, 2, Layout> x(7, 2), y(7, 2), dy(7, 2), dx(7, 2);
  std::vector<nkref::LD> xl(14), dyl(14, -4.0L);
  for (Index r = 0; r < 7; ++r)
    for (Index c = 0; c < 2; ++c) {
      x(r, c) = xs[r];
      dy(r, c) = -4;
      xl[static_cast<std::size_t>(2 * r + c)] = xs[r];
    }
  normkit::BatchNorm<double>::Cache cache;
  normkit::BatchNorm<double>::Grads grads;
  bn.forward(x, y, cache);
  bn.backward(x, dy, cache, dx, grads);
  nkref::Params p;
  p.eps = 1000;
  p.w = {1.0L, 2.7618269602525682e-321L};
  p.b = {0.5L, 0.5L};
  const nkref::Result want = nkref::normalize(true, false, xl, dyl, nkref::Shape3{7, 2, 1}, p);
  const std::string where = std::string(train ? "training" : "eval, batch statistics") +
                            (Layout == Eigen::RowMajor ? ", RowMajor" : ", ColMajor");
  expect_like_fuzz<double>(("dweight, " + where).c_str(), {grads.weight(0), grads.weight(1)}, want.dw,
                           want.dw_scale, want.dw_amp);
  EXPECT_EQ(grads.weight(0), 0.0) << where;  // dy is constant: sum(dy * xhat) = -4 sum(xhat) = 0
  EXPECT_EQ(grads.weight(1), grads.weight(0)) << where;
  std::vector<double> got(14);
  for (Index r = 0; r < 7; ++r)
    for (Index c = 0; c < 2; ++c) got[static_cast<std::size_t>(2 * r + c)] = dx(r, c);
  expect_like_fuzz<double>(("dx, " + where).c_str(), got, want.dx, want.dx_scale, want.dx_amp);
}

TEST(BatchNormWideChannelTest, LargeOffsetGivesZeroDweight) {
  for (bool train : {true, false}) {
    check_offset_wide_channel<Eigen::RowMajor>(train);
    check_offset_wide_channel<Eigen::ColMajor>(train);
  }
}

TEST(RMSNormColumnTest, NanSignDoesNotDependOnWhereDxIs) {
  // Memory order of the [4, 1, 4] ColMajor tensors (rows of 4 features, k = 1).
  const std::uint32_t xb[16] = {0x7f122d7f, 0x9e633000, 0x0f3c3400, 0x80000007, 0x7f0625ff, 0x7f38e57f,
                                0x404e2c00, 0xff800000, 0xbf7e3000, 0x3f487800, 0xff800000, 0x00000000,
                                0xc0636c00, 0x405a1400, 0xc0207400, 0x80000003};
  const std::uint32_t db[16] = {0x00000000, 0xbf96d000, 0x7fc00000, 0xbe834000, 0x80000002, 0xff800000,
                                0x80000001, 0x7f800000, 0x40144200, 0xbec2e000, 0x7fc00000, 0x7f800000,
                                0x7fc00000, 0x80000003, 0x7f800000, 0x7fc00000};
  using Map = Eigen::TensorMap<Eigen::Tensor<float, 3, Eigen::ColMajor>>;
  std::vector<float> x(16), dy_dx(32, -7.25f), dx_far(16 + 1024, -7.25f);
  std::memcpy(x.data(), xb, sizeof xb);
  std::memcpy(dy_dx.data(), db, sizeof db);
  normkit::RMSNorm<float> layer(4, normkit::RMSNormOptions().eps(1000));
  const float w[4] = {1.0075335958495435e-42f, -1.1098283837452551e-42f, 4.0077136079689768e-43f,
                      -1.049572549779288e-42f};
  for (Index i = 0; i < 4; ++i) layer.weight()(i) = w[i];
  Map xm(x.data(), 4, 1, 4), dy(dy_dx.data(), 4, 1, 4);
  Map dx_near(dy_dx.data() + 16, 4, 1, 4), dx_away(dx_far.data() + 512, 4, 1, 4);
  Eigen::Tensor<float, 3, Eigen::ColMajor> y(4, 1, 4);
  normkit::RMSNorm<float>::Cache cache;
  normkit::RMSNorm<float>::Grads grads;
  layer.forward(xm, y, cache);
  layer.backward(xm, dy, cache, dx_near, grads);
  layer.backward(xm, dy, cache, dx_away, grads);
  for (Index i = 0; i < 16; ++i) {
    std::uint32_t a = 0, b = 0;
    std::memcpy(&a, dx_near.data() + i, 4);
    std::memcpy(&b, dx_away.data() + i, 4);
    EXPECT_EQ(a, b) << "dx at memory index " << i << ": " << dx_near.data()[i] << " next to dy, " << dx_away.data()[i]
                    << " elsewhere";
  }
}

// RMSNorm<double> over the last dim of a ColMajor [rows, F] tensor against the reference,
// with the fuzz target's criterion; the same rows RowMajor (the row kernels) too.
void check_rms_rows(const std::vector<double>& xs, const std::vector<double>& dys, Index F, double eps,
                    const std::vector<double>& w) {
  const Index rows = static_cast<Index>(xs.size()) / F;
  normkit::RMSNorm<double> layer(F, normkit::RMSNormOptions().eps(eps).elementwise_affine(!w.empty()));
  for (Index f = 0; f < static_cast<Index>(w.size()); ++f) layer.weight()(f) = w[static_cast<std::size_t>(f)];
  const nkref::Shape3 s{static_cast<long>(rows), static_cast<long>(F), 1};
  nkref::Params p;
  p.eps = eps;
  p.w.assign(w.begin(), w.end());
  const std::vector<nkref::LD> xl(xs.begin(), xs.end()), dyl(dys.begin(), dys.end());
  const nkref::Result want = nkref::normalize(false, true, xl, dyl, s, p);
  auto run = [&](auto layout_tag) {
    constexpr int L = decltype(layout_tag)::value;
    Eigen::Tensor<double, 2, L> x(rows, F), y(rows, F), dy(rows, F), dx(rows, F);
    for (Index r = 0; r < rows; ++r)
      for (Index f = 0; f < F; ++f) {
        x(r, f) = xs[static_cast<std::size_t>(r * F + f)];
        dy(r, f) = dys[static_cast<std::size_t>(r * F + f)];
      }
    normkit::RMSNorm<double>::Cache cache;
    normkit::RMSNorm<double>::Grads grads;
    layer.forward(x, y, cache);
    layer.backward(x, dy, cache, dx, grads);
    std::vector<double> got;
    for (Index r = 0; r < rows; ++r)
      for (Index f = 0; f < F; ++f) got.push_back(dx(r, f));
    expect_like_fuzz<double>(L == Eigen::RowMajor ? "dx RowMajor" : "dx ColMajor", got, want.dx, want.dx_scale,
                             want.dx_amp);
  };
  run(std::integral_constant<int, Eigen::ColMajor>{});
  run(std::integral_constant<int, Eigen::RowMajor>{});
}

TEST(RMSNormColumnTest, DyNearDoubleMax) {
  const Index rows = 10, F = 11;
  std::vector<double> xs, dys;
  for (Index k = 0; k < rows * F; ++k) {
    xs.push_back(-4 + 8 * std::fmod(0.6180339887498949 * static_cast<double>(k + 1), 1.0));
    dys.push_back(k % 9 == 4 ? 0.5 * std::numeric_limits<double>::max() : -std::numeric_limits<double>::max());
  }
  check_rms_rows(xs, dys, F, 1000, {});
}

TEST(RMSNormColumnTest, SubnormalWeightsTinyValues) {
  const std::vector<double> row = {-1.1519795564000276e-27, 2.5417630543532515e-224, 0, 0, 0};
  const std::vector<double> w = {-4.1452107686080585e-321, 1.719348447527538e-321, 1.3833838083554903e-322,
                                 7.5592043813710721e-322, -3.0730883171325535e-321};
  std::vector<double> xs, dys;
  for (int r = 0; r < 3; ++r) {
    xs.insert(xs.end(), row.begin(), row.end());
    dys.insert(dys.end(), row.size(), -4.0);
  }
  check_rms_rows(xs, dys, 5, std::numeric_limits<double>::min(), w);
}

// Two values per channel: dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)) is 0 up to
// eps / var (xhat = -+1), whatever dy is. Column path ([2, 1], channel last) and row path
// ([1, 1, 64], the pair repeated).
TEST(BatchNormUnderflowTest, TinyDyTinySpreadGivesZeroDx) {
  const float x0 = 2.0002694129943848f, x1 = 2.0003702640533447f;
  const float g0 = 8.1975960163001799e-43f, g1 = -8.8562062945328439e-43f;
  for (Index inner : {Index(1), Index(64)}) {
    const Index outer = inner == 1 ? 2 : 1, n = outer * inner;
    Eigen::Tensor<float, 3, Eigen::RowMajor> x(outer, 1, inner), y(outer, 1, inner), dy(outer, 1, inner),
        dx(outer, 1, inner);
    for (Index i = 0; i < n; ++i) {
      x.data()[i] = i % 2 ? x1 : x0;
      dy.data()[i] = i % 2 ? g1 : g0;
    }
    normkit::BatchNorm<float> bn(1, normkit::BatchNormOptions().eps(1e-30).affine(false));
    normkit::BatchNorm<float>::Cache cache;
    normkit::BatchNorm<float>::Grads grads;
    bn.forward(x, y, cache);
    bn.backward(x, dy, cache, dx, grads);
    const nkref::Shape3 s{n, 1, 1};
    const std::vector<nkref::LD> xl(x.data(), x.data() + n), dyl(dy.data(), dy.data() + n);
    nkref::Params p;
    p.eps = 1e-30L;
    const nkref::Result want = nkref::normalize(true, false, xl, dyl, s, p);
    expect_like_fuzz<float>(("dx, inner " + std::to_string(inner)).c_str(), std::vector<double>(dx.data(), dx.data() + n),
                            want.dx, want.dx_scale, want.dx_amp);
    for (Index i = 0; i < n; ++i) EXPECT_LT(std::fabs(dx.data()[i]), 1e-39f) << "inner " << inner << ", dx[" << i << "]";
  }
}

}  // namespace
