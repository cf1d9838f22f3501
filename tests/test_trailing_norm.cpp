// LayerNorm and RMSNorm: one typed suite over {LayerNorm, RMSNorm} x {float, double} x
// {RowMajor, ColMajor}, plus the half/bfloat16, numerics, threading and error tests.
#include <normkit/normkit.hpp>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "reference_norm.hpp"
#include "test_support.hpp"

namespace {

using nktest::Index;
using nktest::all_equal;
using nktest::error_of;
using nktest::LD;

template <bool Center, class T, int L>
struct Cfg {
  using Scalar = T;
  static constexpr bool center = Center;
  static constexpr int layout = L;
  using Layer = std::conditional_t<Center, normkit::LayerNorm<T>, normkit::RMSNorm<T>>;
  static Layer make(std::vector<Index> shape, double eps, bool affine = true) {
    if constexpr (Center)
      return Layer(std::move(shape), normkit::LayerNormOptions().eps(eps).elementwise_affine(affine));
    else
      return Layer(std::move(shape), normkit::RMSNormOptions().eps(eps).elementwise_affine(affine));
  }
  static constexpr double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
};

template <class C>
class TrailingNormTest : public ::testing::Test {};

using Configs = ::testing::Types<Cfg<true, float, Eigen::RowMajor>, Cfg<true, float, Eigen::ColMajor>,
                                 Cfg<true, double, Eigen::RowMajor>, Cfg<true, double, Eigen::ColMajor>,
                                 Cfg<false, float, Eigen::RowMajor>, Cfg<false, float, Eigen::ColMajor>,
                                 Cfg<false, double, Eigen::RowMajor>,
                                 Cfg<false, double, Eigen::ColMajor>>;

struct CfgNames {
  template <class C>
  static std::string GetName(int) {
    return std::string(C::center ? "LayerNorm" : "RMSNorm") +
           (std::is_same_v<typename C::Scalar, float> ? "Float" : "Double") +
           (C::layout == Eigen::RowMajor ? "RowMajor" : "ColMajor");
  }
};
TYPED_TEST_SUITE(TrailingNormTest, Configs, CfgNames);

// Shapes: (dims, number of trailing normalized dims). Ranks 1-4; sizes 1, odd, below a
// SIMD vector, not multiples of it, and more rows than one column tile (64).
struct Case {
  std::vector<Index> dims;
  std::size_t k;
};
const std::vector<Case> kGrid = {
    {{1}, 1},        {{7}, 1},          {{1, 1}, 1},        {{3, 5}, 1},       {{2, 9}, 1},
    {{4, 17}, 1},    {{5, 33}, 1},      {{3, 100}, 1},      {{70, 3}, 1},      {{2, 3, 7}, 1},
    {{2, 3, 7}, 2},  {{2, 2, 3, 5}, 2}, {{3, 2, 2, 9}, 3},  {{1, 1, 1, 1}, 4}, {{131, 8}, 1},
};

std::vector<Index> tail(const std::vector<Index>& d, std::size_t k) {
  return std::vector<Index>(d.end() - static_cast<std::ptrdiff_t>(k), d.end());
}

template <class T>
std::vector<double> param_values(const Eigen::Tensor<T, 1>& p) {
  std::vector<double> v(static_cast<std::size_t>(p.size()));
  for (Index i = 0; i < p.size(); ++i) v[static_cast<std::size_t>(i)] = static_cast<double>(p(i));
  return v;
}

template <class T>
void set_param(Eigen::Tensor<T, 1>& p, const std::vector<double>& v) {
  for (Index i = 0; i < p.size(); ++i) p(i) = static_cast<T>(v[static_cast<std::size_t>(i)]);
}

TYPED_TEST(TrailingNormTest, ForwardMatchesLongDoubleReference) {
  using C = TypeParam;
  using T = typename C::Scalar;
  for (const Case& c : kGrid) {
    nktest::with_rank(c.dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      auto layer = C::make(tail(c.dims, c.k), 1e-5);
      const Index F = layer.features(), rows = nktest::numel(c.dims) / F;
      set_param(layer.weight(), nktest::quantized<T>(nktest::random_vector(F, 11, 0.5, 1.5)));
      const auto w = param_values(layer.weight());
      std::vector<double> b;
      if constexpr (C::center) {
        set_param(layer.bias(), nktest::quantized<T>(nktest::random_vector(F, 12)));
        b = param_values(layer.bias());
      }
      const auto xs = nktest::quantized<T>(nktest::random_vector(rows * F, 13));
      auto x = nktest::make_tensor<T, R, C::layout>(c.dims, xs);
      decltype(x) y(x.dimensions());
      typename C::Layer::Cache cache;
      layer.forward(x, y, cache);
      const auto want = nktest::ref::norm_forward(C::center, xs, rows, F, 1e-5L, &w,
                                                  C::center ? &b : nullptr);
      const std::string where = "shape " + normkit::detail::shape_str(c.dims) + " k=" + std::to_string(c.k);
      nktest::expect_close(nktest::logical(y), want.y, C::tol * 4, C::tol, "y, " + where);
      nktest::expect_close(nktest::values(cache.rstd), want.rstd, 0, C::tol, "rstd, " + where);
      if constexpr (C::center)
        nktest::expect_close(nktest::values(cache.mean), want.mean, C::tol, C::tol, "mean, " + where);

      // Inference forward gives the same bits as the training forward.
      decltype(x) y2(x.dimensions());
      layer.forward(x, y2);
      EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(y), nktest::logical(y2))) << where;
    });
  }
}

TYPED_TEST(TrailingNormTest, BackwardMatchesLongDoubleReference) {
  using C = TypeParam;
  using T = typename C::Scalar;
  for (const Case& c : kGrid) {
    nktest::with_rank(c.dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      auto layer = C::make(tail(c.dims, c.k), 1e-5);
      const Index F = layer.features(), rows = nktest::numel(c.dims) / F;
      set_param(layer.weight(), nktest::quantized<T>(nktest::random_vector(F, 21, 0.5, 1.5)));
      const auto w = param_values(layer.weight());
      const auto xs = nktest::quantized<T>(nktest::random_vector(rows * F, 22));
      const auto dys = nktest::quantized<T>(nktest::random_vector(rows * F, 23));
      auto x = nktest::make_tensor<T, R, C::layout>(c.dims, xs);
      auto dy = nktest::make_tensor<T, R, C::layout>(c.dims, dys);
      decltype(x) y(x.dimensions()), dx(x.dimensions());
      typename C::Layer::Cache cache;
      typename C::Layer::Grads grads;
      layer.forward(x, y, cache);
      layer.backward(x, dy, cache, dx, grads);
      const auto want = nktest::ref::norm_backward(C::center, xs, dys, rows, F, 1e-5L, &w);
      const std::string where = "shape " + normkit::detail::shape_str(c.dims) + " k=" + std::to_string(c.k);
      // dx scales with rstd, which is large for nearly constant rows: compare relative to
      // the largest reference value.
      LD scale = 1;
      for (LD v : want.dx) scale = std::max(scale, std::fabs(v));
      nktest::expect_close(nktest::logical(dx), want.dx, C::tol * 8 * scale, C::tol, "dx, " + where);
      LD wscale = 1;
      for (LD v : want.dweight) wscale = std::max(wscale, std::fabs(v));
      nktest::expect_close(nktest::values(grads.weight), want.dweight, C::tol * 8 * wscale, C::tol,
                           "dweight, " + where);
      if constexpr (C::center)
        nktest::expect_close(nktest::values(grads.bias), want.dbias, C::tol * 8 * rows, C::tol,
                             "dbias, " + where);
      else
        EXPECT_EQ(grads.bias.size(), 0);
    });
  }
}

// Central differences in double of L = sum(y * r): dL/dx, dL/dweight, dL/dbias.
TYPED_TEST(TrailingNormTest, BackwardMatchesFiniteDifference) {
  using C = TypeParam;
  if constexpr (std::is_same_v<typename C::Scalar, double>) {
    for (const Case& c : kGrid) {
      if (nktest::numel(c.dims) > 120) continue;
      nktest::with_rank(c.dims.size(), [&](auto rank) {
        constexpr int R = decltype(rank)::value;
        auto layer = C::make(tail(c.dims, c.k), 1e-3);
        const Index F = layer.features(), rows = nktest::numel(c.dims) / F;
        set_param(layer.weight(), nktest::random_vector(F, 31, 0.5, 1.5));
        if constexpr (C::center) set_param(layer.bias(), nktest::random_vector(F, 32));
        auto xs = nktest::random_vector(rows * F, 33);
        const auto rs = nktest::random_vector(rows * F, 34);
        auto x = nktest::make_tensor<double, R, C::layout>(c.dims, xs);
        auto r = nktest::make_tensor<double, R, C::layout>(c.dims, rs);
        decltype(x) y(x.dimensions()), dx(x.dimensions());
        typename C::Layer::Cache cache;
        typename C::Layer::Grads grads;
        layer.forward(x, y, cache);
        layer.backward(x, r, cache, dx, grads);
        auto loss = [&](const std::vector<double>& xv) {
          auto xt = nktest::make_tensor<double, R, C::layout>(c.dims, xv);
          decltype(xt) yt(xt.dimensions());
          layer.forward(xt, yt);
          const auto yl = nktest::logical(yt);
          LD s = 0;
          for (std::size_t i = 0; i < yl.size(); ++i) s += static_cast<LD>(yl[i]) * rs[i];
          return s;
        };
        const double h = 1e-6;
        std::vector<double> fd_dx(xs.size());
        for (std::size_t i = 0; i < xs.size(); ++i) {
          auto xp = xs, xm = xs;
          xp[i] += h;
          xm[i] -= h;
          fd_dx[i] = static_cast<double>((loss(xp) - loss(xm)) / (2 * h));
        }
        const std::string where = "shape " + normkit::detail::shape_str(c.dims);
        nktest::expect_close(nktest::logical(dx), fd_dx, 2e-6, 1e-6, "dx vs FD, " + where);
        auto param_fd = [&](Eigen::Tensor<double, 1>& p) {
          std::vector<double> g(static_cast<std::size_t>(p.size()));
          for (Index i = 0; i < p.size(); ++i) {
            const double keep = p(i);
            p(i) = keep + h;
            const LD lp = loss(xs);
            p(i) = keep - h;
            const LD lm = loss(xs);
            p(i) = keep;
            g[static_cast<std::size_t>(i)] = static_cast<double>((lp - lm) / (2 * h));
          }
          return g;
        };
        nktest::expect_close(nktest::values(grads.weight), param_fd(layer.weight()), 2e-6, 1e-6,
                             "dweight vs FD, " + where);
        if constexpr (C::center)
          nktest::expect_close(nktest::values(grads.bias), param_fd(layer.bias()), 2e-6, 1e-6,
                               "dbias vs FD, " + where);
      });
    }
  }
}

TYPED_TEST(TrailingNormTest, ThreadCountsGiveBitwiseEqualResults) {
  using C = TypeParam;
  using T = typename C::Scalar;
  for (const std::vector<Index>& dims : {std::vector<Index>{300, 37}, std::vector<Index>{3, 67, 40},
                                         std::vector<Index>{1000, 9}}) {
    nktest::with_rank(dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      auto layer = C::make({dims.back()}, 1e-5);
      const Index F = dims.back(), n = nktest::numel(dims);
      set_param(layer.weight(), nktest::random_vector(F, 41, 0.5, 1.5));
      auto x = nktest::make_tensor<T, R, C::layout>(dims, nktest::random_vector(n, 42));
      auto dy = nktest::make_tensor<T, R, C::layout>(dims, nktest::random_vector(n, 43));
      std::vector<T> y1, dx1, dw1, db1, rstd1;
      for (int threads : {1, 2, 3, 7}) {
        nktest::on_threads(threads, [&](const auto& dev) {
          decltype(x) y(x.dimensions()), dx(x.dimensions());
          typename C::Layer::Cache cache;
          typename C::Layer::Grads grads;
          layer.forward(dev, x, y, cache);
          layer.backward(dev, x, dy, cache, dx, grads);
          std::vector<T> rs(cache.rstd.data(), cache.rstd.data() + cache.rstd.size());
          if (threads == 1) {
            y1 = nktest::logical(y);
            dx1 = nktest::logical(dx);
            dw1 = nktest::values(grads.weight);
            db1 = nktest::values(grads.bias);
            rstd1 = rs;
            return;
          }
          EXPECT_TRUE(nktest::bitwise_equal(y1, nktest::logical(y))) << threads << " threads";
          EXPECT_TRUE(nktest::bitwise_equal(dx1, nktest::logical(dx))) << threads << " threads";
          EXPECT_TRUE(nktest::bitwise_equal(dw1, nktest::values(grads.weight))) << threads << " threads";
          EXPECT_TRUE(nktest::bitwise_equal(db1, nktest::values(grads.bias))) << threads << " threads";
          EXPECT_TRUE(nktest::bitwise_equal(rstd1, rs)) << threads << " threads";
        });
      }
    });
  }
}

TYPED_TEST(TrailingNormTest, NanAndInfStayInTheirRow) {
  using C = TypeParam;
  using T = typename C::Scalar;
  const std::vector<Index> dims{5, 19};
  auto layer = C::make({19}, 1e-5);
  auto xs = nktest::random_vector(5 * 19, 51);
  auto clean = nktest::make_tensor<T, 2, C::layout>(dims, xs);
  xs[1 * 19 + 4] = std::numeric_limits<double>::quiet_NaN();
  xs[3 * 19 + 18] = std::numeric_limits<double>::infinity();
  auto dirty = nktest::make_tensor<T, 2, C::layout>(dims, xs);
  decltype(clean) y0(5, 19), y1(5, 19);
  layer.forward(clean, y0);
  layer.forward(dirty, y1);
  const auto a = nktest::logical(y0), b = nktest::logical(y1);
  for (Index r = 0; r < 5; ++r)
    for (Index j = 0; j < 19; ++j) {
      const std::size_t k = static_cast<std::size_t>(r * 19 + j);
      // The NaN poisons its row's statistics. Inf does too for LayerNorm (inf - inf);
      // RMSNorm's rstd becomes 0, so as in PyTorch the row is 0 but the Inf lane (NaN).
      if (r == 1 || (r == 3 && (C::center || j == 18))) {
        EXPECT_FALSE(std::isfinite(static_cast<double>(b[k]))) << r << "," << j;
      } else if (r != 3) {
        EXPECT_EQ(a[k], b[k]) << r << "," << j;
      }
    }
}

TYPED_TEST(TrailingNormTest, GradientsAreOverwrittenNotAccumulated) {
  using C = TypeParam;
  using T = typename C::Scalar;
  auto layer = C::make({6}, 1e-5);
  auto x = nktest::make_tensor<T, 2, C::layout>({4, 6}, nktest::random_vector(24, 61));
  auto dy = nktest::make_tensor<T, 2, C::layout>({4, 6}, nktest::random_vector(24, 62));
  decltype(x) y(4, 6), dx(4, 6);
  typename C::Layer::Cache cache;
  typename C::Layer::Grads grads;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);
  const auto once = nktest::values(grads.weight);
  layer.backward(x, dy, cache, dx, grads);
  EXPECT_TRUE(nktest::bitwise_equal(once, nktest::values(grads.weight)));
}

TYPED_TEST(TrailingNormTest, InPlaceForwardAndBackward) {
  using C = TypeParam;
  using T = typename C::Scalar;
  auto layer = C::make({13}, 1e-5);
  set_param(layer.weight(), nktest::random_vector(13, 71, 0.5, 1.5));
  auto x = nktest::make_tensor<T, 2, C::layout>({9, 13}, nktest::random_vector(117, 72));
  auto dy = nktest::make_tensor<T, 2, C::layout>({9, 13}, nktest::random_vector(117, 73));
  decltype(x) y(9, 13), dx(9, 13);
  typename C::Layer::Cache cache;
  typename C::Layer::Grads grads;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);
  decltype(x) dy_inplace = dy;
  layer.backward(x, dy, cache, dy_inplace, grads);  // dx written over a copy of dy...
  EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(dx), nktest::logical(dy_inplace)));
  decltype(x) d2 = dy;
  layer.backward(x, d2, cache, d2, grads);  // ... and over dy itself
  EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(dx), nktest::logical(d2)));
  decltype(x) x2 = x;
  layer.forward(x2, x2);
  EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(y), nktest::logical(x2)));
}

TYPED_TEST(TrailingNormTest, EmptyTensorIsANoOp) {
  using C = TypeParam;
  using T = typename C::Scalar;
  auto layer = C::make({8}, 1e-5);
  Eigen::Tensor<T, 2, C::layout> x(0, 8), y(0, 8), dy(0, 8), dx(0, 8);
  typename C::Layer::Cache cache;
  typename C::Layer::Grads grads;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);
  ASSERT_EQ(grads.weight.size(), 8);
  for (Index i = 0; i < 8; ++i) EXPECT_EQ(grads.weight(i), T(0));
}

TYPED_TEST(TrailingNormTest, ScaleInvariance) {
  using C = TypeParam;
  if constexpr (std::is_same_v<typename C::Scalar, double>) {
    auto layer = C::make({33}, 1e-14);
    const auto xs = nktest::random_vector(7 * 33, 81);
    std::vector<double> scaled = xs;
    for (auto& v : scaled) v *= 3.25;
    auto x = nktest::make_tensor<double, 2, C::layout>({7, 33}, xs);
    auto xa = nktest::make_tensor<double, 2, C::layout>({7, 33}, scaled);
    decltype(x) y(7, 33), ya(7, 33);
    layer.forward(x, y);
    layer.forward(xa, ya);
    nktest::expect_close(nktest::logical(ya), nktest::logical(y), 1e-10, 1e-10, "norm(a x) vs norm(x)");
  }
}

TYPED_TEST(TrailingNormTest, BothLayoutsGiveTheSameNumbers) {
  using C = TypeParam;
  using T = typename C::Scalar;
  const std::vector<Index> dims{3, 5, 21};
  auto layer = C::make({5, 21}, 1e-5);
  set_param(layer.weight(), nktest::random_vector(105, 91, 0.5, 1.5));
  const auto xs = nktest::random_vector(315, 92), dys = nktest::random_vector(315, 93);
  auto xr = nktest::make_tensor<T, 3, Eigen::RowMajor>(dims, xs);
  auto xc = nktest::make_tensor<T, 3, Eigen::ColMajor>(dims, xs);
  auto dyr = nktest::make_tensor<T, 3, Eigen::RowMajor>(dims, dys);
  auto dyc = nktest::make_tensor<T, 3, Eigen::ColMajor>(dims, dys);
  decltype(xr) yr(xr.dimensions()), dxr(xr.dimensions());
  decltype(xc) yc(xc.dimensions()), dxc(xc.dimensions());
  typename C::Layer::Cache cr, cc;
  typename C::Layer::Grads gr, gc;
  layer.forward(xr, yr, cr);
  layer.forward(xc, yc, cc);
  layer.backward(xr, dyr, cr, dxr, gr);
  layer.backward(xc, dyc, cc, dxc, gc);
  nktest::expect_close(nktest::logical(yc), nktest::logical(yr), C::tol, C::tol, "y");
  nktest::expect_close(nktest::logical(dxc), nktest::logical(dxr), C::tol * 10, C::tol, "dx");
  nktest::expect_close(nktest::values(gc.weight), nktest::values(gr.weight), C::tol * 10, C::tol, "dweight");
  nktest::expect_close(nktest::values(cc.rstd), nktest::values(cr.rstd), 0, C::tol, "rstd");
}

TYPED_TEST(TrailingNormTest, AcceptsTensorMaps) {
  using C = TypeParam;
  using T = typename C::Scalar;
  auto layer = C::make({11}, 1e-5);
  auto x = nktest::make_tensor<T, 2, C::layout>({4, 11}, nktest::random_vector(44, 95));
  decltype(x) y(4, 11);
  layer.forward(x, y);
  std::vector<T> out(44);
  Eigen::TensorMap<const Eigen::Tensor<T, 2, C::layout>> xm(x.data(), 4, 11);
  layer.forward(xm, Eigen::TensorMap<Eigen::Tensor<T, 2, C::layout>>(out.data(), 4, 11));
  EXPECT_TRUE(nktest::bitwise_equal(std::vector<T>(y.data(), y.data() + 44), out));
}

// ---- LayerNorm-specific properties and numerics ---------------------------------------

TEST(LayerNormTest, ShiftInvariance) {
  normkit::LayerNorm<double> ln(40, normkit::LayerNormOptions().eps(1e-12));
  const auto xs = nktest::random_vector(6 * 40, 101);
  auto shifted = xs;
  for (auto& v : shifted) v += 123.5;
  auto x = nktest::make_tensor<double, 2, Eigen::RowMajor>({6, 40}, xs);
  auto xc = nktest::make_tensor<double, 2, Eigen::RowMajor>({6, 40}, shifted);
  Eigen::Tensor<double, 2, Eigen::RowMajor> y(6, 40), yc(6, 40);
  ln.forward(x, y);
  ln.forward(xc, yc);
  nktest::expect_close(nktest::logical(yc), nktest::logical(y), 1e-10, 1e-10, "LN(x + c) vs LN(x)");
}

TEST(LayerNormTest, UnaffineRowsHaveMeanZeroAndUnitVariance) {
  normkit::LayerNorm<float> ln(300, normkit::LayerNormOptions().elementwise_affine(false));
  EXPECT_EQ(ln.weight().size(), 0);
  EXPECT_EQ(ln.bias().size(), 0);
  auto x = nktest::make_tensor<float, 2, Eigen::RowMajor>({4, 300}, nktest::random_vector(1200, 102, -5, 9));
  Eigen::Tensor<float, 2, Eigen::RowMajor> y(4, 300);
  ln.forward(x, y);
  for (Index r = 0; r < 4; ++r) {
    double m = 0, v = 0;
    for (Index j = 0; j < 300; ++j) m += y(r, j);
    m /= 300;
    for (Index j = 0; j < 300; ++j) v += (y(r, j) - m) * (y(r, j) - m);
    v /= 300;
    EXPECT_NEAR(m, 0.0, 1e-6);
    EXPECT_NEAR(v, 1.0, 1e-4);
  }
}

// mean 1e4, std 0.1 in float: the mean of such a row is not even representable to the
// needed precision in float, and E[x^2] - E[x]^2 would lose every digit.
template <int L>
void large_offset_case() {
  const Index rows = 16, F = 768;
  std::mt19937 gen(7);
  std::normal_distribution<double> dist(1e4, 0.1);
  std::vector<double> xs(static_cast<std::size_t>(rows * F));
  for (auto& v : xs) v = static_cast<double>(static_cast<float>(dist(gen)));
  normkit::LayerNorm<float> ln(F);
  auto x = nktest::make_tensor<float, 2, L>({rows, F}, xs);
  Eigen::Tensor<float, 2, L> y(rows, F), dx(rows, F);
  normkit::LayerNorm<float>::Cache cache;
  ln.forward(x, y, cache);
  const auto want = nktest::ref::norm_forward(true, xs, rows, F, 1e-5L, nullptr, nullptr);
  nktest::expect_close(nktest::logical(y), want.y, 1e-3, 0, "large-offset rows");
  // Backward too: dx of sum(y * dy) against the long-double closed form.
  const auto dys = nktest::random_vector(rows * F, 8);
  auto dy = nktest::make_tensor<float, 2, L>({rows, F}, dys);
  normkit::LayerNorm<float>::Grads g;
  ln.backward(x, dy, cache, dx, g);
  const auto wantb = nktest::ref::norm_backward(true, xs, dys, rows, F, 1e-5L, nullptr);
  LD scale = 0;
  for (LD v : wantb.dx) scale = std::max(scale, std::fabs(v));
  nktest::expect_close(nktest::logical(dx), wantb.dx, 1e-3 * scale, 0, "large-offset dx");
}

TEST(LayerNormTest, LargeOffsetRowsNormalizeAccuratelyRowMajor) { large_offset_case<Eigen::RowMajor>(); }
TEST(LayerNormTest, LargeOffsetRowsNormalizeAccuratelyColMajor) { large_offset_case<Eigen::ColMajor>(); }

// Row statistics are summed in one pass around a shift (the mean of the row's first
// packet) where that is as accurate as two passes, else in two passes. Rows of both
// kinds, near zero and at 1e4 (the careful path that keeps the mean as two numbers):
// every y within 8 ulp of max(1, the row's largest |y|) of the long-double result on
// the same float inputs. The budget: rows whose mean is within 4 standard deviations of
// zero are normalized as fma(x, rstd, -mean * rstd), and mean * rstd (up to 4) rounds
// to 2 ulp of 1; the rounding of the mean itself costs as much again, then rstd's
// and the fma's. Measured: contiguous rows at most 3.7 (the ramp, F 1000); ColMajor
// (strided columns, one pass around the mean of a column's first 32 values, else three
// more; always (x - s - d) * rstd, never the fma) 4.5 (the outlier head, F 1000).
// kMixed: the kinds in turn, row by row, so that a ColMajor tile holds columns of either
// path. The floor of 1: a row of one element, whose variance is 0, normalizes to 0
// within that.
template <int L>
void one_pass_rows_case(Index F) {
  const Index rows = 64;
  enum Kind { kStationary, kOffsetMean, kOutlierHead, kRamp, kLargeOffset, kLargeOffsetHead, kMixed };
  for (int kind = kStationary; kind <= kMixed; ++kind) {
    std::mt19937 gen(static_cast<unsigned>(kind + 17));
    std::normal_distribution<double> n01(0, 1);
    std::vector<double> xs(static_cast<std::size_t>(rows * F));
    for (Index r = 0; r < rows; ++r)
      for (Index j = 0; j < F; ++j) {
        const double z = n01(gen), head = j < 8 ? 1.0 : 0.0;  // the first packet
        const int k = kind == kMixed ? static_cast<int>(r % kMixed) : kind;
        double v = z;
        if (k == kOffsetMean) v = 3 + z;
        if (k == kOutlierHead) v = z + 50 * head;  // shift 50 std from the mean: two passes
        if (k == kRamp) v = 0.01 * static_cast<double>(j) + 0.001 * z;  // drifts: two passes
        if (k == kLargeOffset) v = 1e4 + 0.1 * z;
        if (k == kLargeOffsetHead) v = 1e4 + 0.1 * z + head;
        xs[static_cast<std::size_t>(r * F + j)] = static_cast<double>(static_cast<float>(v));
      }
    normkit::LayerNorm<float> ln(F);
    auto x = nktest::make_tensor<float, 2, L>({rows, F}, xs);
    Eigen::Tensor<float, 2, L> y(rows, F);
    ln.forward(x, y);
    const auto got = nktest::logical(y);
    const auto want = nktest::ref::norm_forward(true, xs, rows, F, 1e-5L, nullptr, nullptr);
    LD worst = 0;
    for (Index r = 0; r < rows; ++r) {
      LD ymax = 0;
      for (Index j = 0; j < F; ++j) ymax = std::max(ymax, std::fabs(want.y[static_cast<std::size_t>(r * F + j)]));
      const LD ulp = std::max(ymax, LD(1)) * std::numeric_limits<float>::epsilon();
      for (Index j = 0; j < F; ++j) {
        const std::size_t k = static_cast<std::size_t>(r * F + j);
        worst = std::max(worst, std::fabs(static_cast<LD>(got[k]) - want.y[k]) / ulp);
      }
    }
    EXPECT_LE(worst, 8.0L) << "F " << F << " kind " << kind;
  }
}

TEST(LayerNormTest, RowsSummedInOneOrTwoPassesStayWithinEightUlp) {
  for (Index F : {1, 5, 8, 13, 768, 1000}) {
    one_pass_rows_case<Eigen::RowMajor>(F);
    one_pass_rows_case<Eigen::ColMajor>(F);
  }
}

// A ColMajor tensor is normalized a tile of 64 logical rows (its columns in memory) at a
// time, each row taking one pass or two more of its own (see one_pass_rows_case): a row's
// y, mean and rstd are the same bits whichever rows share its tile. Here the even rows
// stay (one pass) and the odd ones are one-pass rows in `a` and rows that need the
// second passes in `b` (a ramp; from 768 features also a head 50 std away, which shorter
// rows absorb); 70 rows: a full tile and a partial one.
TEST(LayerNormTest, ColMajorRowsDoNotDependOnTheirTileNeighbours) {
  using Tensor2C = Eigen::Tensor<float, 2, Eigen::ColMajor>;
  const Index rows = 70;
  for (Index F : {1, 5, 100, 768}) {
    std::mt19937 gen(static_cast<unsigned>(F));
    std::normal_distribution<float> n01(0, 1);
    Tensor2C a(rows, F), b(rows, F), ya(rows, F), yb(rows, F);
    for (Index r = 0; r < rows; ++r)
      for (Index j = 0; j < F; ++j) {
        const float z = n01(gen);
        a(r, j) = r % 4 == 0 ? 1e4f + 0.1f * z : z;
        b(r, j) = a(r, j);
        if (r % 4 == 1 || (r % 4 == 3 && F < 768))
          b(r, j) = 0.01f * static_cast<float>(j) + 0.001f * z;
        else if (r % 4 == 3)
          b(r, j) = z + (j < 8 ? 50.f : 0.f);
      }
    normkit::LayerNorm<float> ln(F);
    normkit::LayerNorm<float>::Cache ca, cb;
    ln.forward(a, ya, ca);
    ln.forward(b, yb, cb);
    for (Index r = 0; r < rows; r += 2) {
      for (Index j = 0; j < F; ++j)
        ASSERT_EQ(0, std::memcmp(&ya(r, j), &yb(r, j), sizeof(float)))
            << "F " << F << ", row " << r << ", feature " << j << ": " << ya(r, j) << " vs " << yb(r, j);
      EXPECT_EQ(0, std::memcmp(&ca.mean(r), &cb.mean(r), sizeof(float))) << "F " << F << ", mean of row " << r;
      EXPECT_EQ(0, std::memcmp(&ca.rstd(r), &cb.rstd(r), sizeof(float))) << "F " << F << ", rstd of row " << r;
    }
  }
}

TEST(LayerNormTest, ConstantRowsGiveFiniteOutput) {
  normkit::LayerNorm<float> ln(37);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(3, 37), y(3, 37), dx(3, 37), dy(3, 37);
  x.setConstant(1234.5f);
  dy.setConstant(0.25f);
  normkit::LayerNorm<float>::Cache cache;
  normkit::LayerNorm<float>::Grads g;
  ln.forward(x, y, cache);
  ln.backward(x, dy, cache, dx, g);
  for (Index i = 0; i < y.size(); ++i) {
    EXPECT_EQ(y.data()[i], 0.0f);  // (x - mean) is exactly 0, bias is 0
    EXPECT_TRUE(std::isfinite(dx.data()[i]));
  }
}

// Large outputs are meant to bypass the cache: on x86 every packet width the build can
// have (SSE2, AVX, AVX-512) has a non-temporal store for float and double. An AVX-512
// build once fell back to ordinary stores without a sign but its speed.
template <class T>
void stream_store_case() {
  namespace nd = normkit::detail;
  constexpr Index W = nd::packet_size<T>;
#if defined(__SSE2__)
  EXPECT_TRUE(nd::simd::can_stream_v<T>) << "packet of " << sizeof(nd::packet_t<T>) << " bytes";
#endif
  alignas(64) T in[W], out[W];
  for (Index i = 0; i < W; ++i) in[i] = static_cast<T>(i) * T(0.5) - T(3);
  nd::simd::store_stream<T>(out, Eigen::internal::pload<nd::packet_t<T>>(in));
  nd::simd::stream_fence();
  for (Index i = 0; i < W; ++i) EXPECT_EQ(out[i], in[i]) << "lane " << i;
}

TEST(SimdTest, StreamingStoresExistForTheCompiledPacketWidth) {
  stream_store_case<float>();
  stream_store_case<double>();
  EXPECT_FALSE(normkit::detail::simd::can_stream_v<Eigen::bfloat16>);
}

// Streamed: outputs of kStreamBytes and more whose tensors together fill at least 1/16 of
// the last-level cache (where the system reports one).
TEST(SimdTest, StreamingNeedsLargeOutputsAndTensorsLargeForTheCache) {
  namespace ns = normkit::detail::simd;
  const Index at = Index(ns::kStreamBytes / sizeof(float));  // an output of kStreamBytes
  {
    const nktest::LlcBytes unknown(0);
    EXPECT_FALSE(ns::stream_output<float>(at - 1, 3));
    EXPECT_EQ(ns::stream_output<float>(at, 2), ns::can_stream_v<float>);
    EXPECT_FALSE(ns::stream_output<Eigen::bfloat16>(4 * at, 3));
  }
  {
    const nktest::LlcBytes llc(std::size_t(48) * ns::kStreamBytes);  // 1/16: 3 outputs
    EXPECT_FALSE(ns::stream_output<float>(at, 2));
    EXPECT_EQ(ns::stream_output<float>(at, 3), ns::can_stream_v<float>);
    EXPECT_EQ(ns::stream_output<double>(at / 2 * 3, 2), ns::can_stream_v<double>);
  }
}

// Outputs of kStreamBytes (8 MiB) and more are written with streaming stores (rows
// misaligned here: 1029 columns). Every row must still get exactly the bits that it gets
// in a tensor of three rows, which is written with plain stores.
template <class Layer>
void streamed_rows_case(Layer layer) {
  using Tensor2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  const nktest::LlcBytes any_cache(0);  // streamed on every machine
  const Index cols = layer.weight().size();
  const Index rows = Index(normkit::detail::simd::kStreamBytes / sizeof(float) / cols) + 2;
  ASSERT_GE(static_cast<std::size_t>(rows * cols) * sizeof(float), normkit::detail::simd::kStreamBytes);
  Tensor2 x(rows, cols), y(rows, cols), dy(rows, cols), dx(rows, cols);
  x.setRandom();
  dy.setRandom();
  typename Layer::Cache cache;
  typename Layer::Grads grads;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);
  for (Index r0 : {Index(0), rows / 2 + 1, rows - 3}) {
    const Eigen::array<Index, 2> off{r0, 0}, ext{3, cols};
    Tensor2 xs = x.slice(off, ext), dys = dy.slice(off, ext), ys(3, cols), dxs(3, cols);
    typename Layer::Cache c;
    typename Layer::Grads g;
    layer.forward(xs, ys, c);
    layer.backward(xs, dys, c, dxs, g);
    Tensor2 yb = y.slice(off, ext), dxb = dx.slice(off, ext);
    EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(ys), nktest::logical(yb))) << "y, row " << r0;
    EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(dxs), nktest::logical(dxb))) << "dx, row " << r0;
  }
}

TEST(LayerNormTest, StreamedOutputsMatchTheInCachePathBitwise) {
  normkit::LayerNorm<float> ln(1029);
  ln.weight().setRandom();
  ln.bias().setRandom();
  streamed_rows_case(ln);
}

TEST(RMSNormTest, StreamedOutputsMatchTheInCachePathBitwise) {
  normkit::RMSNorm<float> rms(1029);
  rms.weight().setRandom();
  streamed_rows_case(rms);
}

// LayerNorm and RMSNorm forward of a tensor of up to kOverlapBytes (4 MiB) sums each row in the loop
// that writes the row before it (rows_forward_overlapped); a larger one goes row by row.
// Rows of every kind (one pass, two passes, a large offset, constant, NaN, inf, sums that
// overflow, denormals) must get the same bits either way, on any number of threads
// (which rows start and end a part).
template <bool Center, class T>
void overlapped_rows_case(Index cols) {
  using Layer = std::conditional_t<Center, normkit::LayerNorm<T>, normkit::RMSNorm<T>>;
  using Tensor2 = Eigen::Tensor<T, 2, Eigen::RowMajor>;
  const std::vector<double> rnd = nktest::random_vector(cols, 7);
  std::vector<std::vector<double>> kinds(9, std::vector<double>(static_cast<std::size_t>(cols)));
  for (std::size_t j = 0; j < rnd.size(); ++j) {
    const double jj = static_cast<double>(j);
    kinds[0][j] = rnd[j];                          // one pass
    kinds[1][j] = 1e4 + 0.1 * rnd[j];              // large offset (bfloat16: constant)
    kinds[2][j] = 100 * jj + rnd[j];               // drifting: two passes
    kinds[3][j] = 3;                               // constant
    kinds[4][j] = j == rnd.size() / 2 ? NAN : rnd[j];
    kinds[5][j] = j == 0 ? -INFINITY : rnd[j];
    kinds[6][j] = (j % 2 ? 0.9 : -0.8) * double(std::numeric_limits<T>::max());  // sums overflow
    kinds[7][j] = 0;
    kinds[8][j] = 1e-42 * rnd[j];                  // denormal in float
  }
  const Index nk = Index(kinds.size());
  Layer ln(cols);
  for (Index j = 0; j < cols; ++j) {
    ln.weight()(j) = static_cast<T>(0.5 + 0.1 * static_cast<double>(j % 7));
    if constexpr (Center) ln.bias()(j) = static_cast<T>(0.01 * static_cast<double>(j % 5) - 0.02);
  }
  auto fill = [&](Tensor2& x, Index r0) {
    for (Index k = 0; k < nk; ++k)
      for (Index j = 0; j < cols; ++j) x(r0 + k, j) = static_cast<T>(kinds[std::size_t(k)][std::size_t(j)]);
  };
  // Row by row: a tensor over kOverlapBytes (and under kStreamBytes, so y is stored alike).
  const Index big_rows = Index(normkit::detail::kOverlapBytes / sizeof(T) / std::size_t(cols)) + 1;
  ASSERT_GT(std::size_t(big_rows * cols) * sizeof(T), normkit::detail::kOverlapBytes);
  ASSERT_LT(std::size_t(big_rows * cols) * sizeof(T), normkit::detail::simd::kStreamBytes);
  Tensor2 xb(big_rows, cols), yb(big_rows, cols);
  const std::vector<double> fillv = nktest::random_vector(big_rows * cols, 8);
  for (Index i = 0; i < big_rows * cols; ++i) xb.data()[i] = static_cast<T>(fillv[std::size_t(i)]);
  fill(xb, 0);
  fill(xb, big_rows - nk);
  typename Layer::Cache cb;
  ln.forward(xb, yb, cb);
  // Overlapped: the same rows twice in a row, so every kind is both a part's first row
  // and a row whose sums came from the previous row's loop, then 3 rows of the fill.
  Tensor2 xs(2 * nk + 3, cols);
  fill(xs, 0);
  fill(xs, nk);
  for (Index r = 2 * nk; r < 2 * nk + 3; ++r)
    for (Index j = 0; j < cols; ++j) xs(r, j) = xb(r, j);
  for (int threads : {1, 2, 3, 7}) {
    nktest::on_threads(threads, [&](const auto& dev) {
      Tensor2 ys(xs.dimensions());
      typename Layer::Cache cs;
      ln.forward(dev, xs, ys, cs);
      for (Index r = 0; r < xs.dimension(0); ++r) {
        const Index rb = r < 2 * nk ? r % nk : r;  // the same row in xb
        for (Index j = 0; j < cols; ++j)
          ASSERT_EQ(0, std::memcmp(&ys(r, j), &yb(rb, j), sizeof(T)))
              << threads << " threads, row kind " << rb << ", column " << j << ": "
              << double(ys(r, j)) << " vs " << double(yb(rb, j));
        if constexpr (Center) {
          EXPECT_EQ(0, std::memcmp(&cs.mean(r), &cb.mean(rb), sizeof(cs.mean(r)))) << "mean, row " << r;
        }
        EXPECT_EQ(0, std::memcmp(&cs.rstd(r), &cb.rstd(rb), sizeof(cs.rstd(r)))) << "rstd, row " << r;
      }
    });
  }
}

TEST(LayerNormTest, OverlappedRowsGiveTheBitsOfRowByRow) {
  for (Index cols : {1, 5, 8, 37, 771}) {
    overlapped_rows_case<true, float>(cols);
    overlapped_rows_case<true, double>(cols);
    overlapped_rows_case<true, Eigen::bfloat16>(cols);
  }
}

TEST(RMSNormTest, OverlappedRowsGiveTheBitsOfRowByRow) {
  for (Index cols : {1, 5, 8, 37, 771}) {
    overlapped_rows_case<false, float>(cols);
    overlapped_rows_case<false, double>(cols);
    overlapped_rows_case<false, Eigen::bfloat16>(cols);
  }
}

// Backward of tensors in cache takes rows two at a time where it can (rows_backward:
// one pass 2 for both, the parameter partials loaded and stored once), and row by row
// otherwise (streamed dx, no parameters, a row with a large offset, sums that are not
// finite). dx, dweight and dbias must get the same bits either way, whatever row a row
// is paired with (each kind below meets each other kind's neighbours at an even and at
// an odd start). A row with a NaN or an inf makes every column of dweight NaN, so the
// rows go twice: every kind, and the finite kinds only (for dweight and dbias).
template <bool Center, class T>
void paired_rows_backward_case(Index cols, bool finite_only) {
  using Layer = std::conditional_t<Center, normkit::LayerNorm<T>, normkit::RMSNorm<T>>;
  using Acc = normkit::detail::acc_t<T>;
  using Tensor2 = Eigen::Tensor<T, 2, Eigen::RowMajor>;
  const std::vector<double> rnd = nktest::random_vector(cols, 17), rnd2 = nktest::random_vector(cols, 19);
  std::vector<std::vector<double>> kinds(9, std::vector<double>(static_cast<std::size_t>(cols)));
  for (std::size_t j = 0; j < rnd.size(); ++j) {
    kinds[0][j] = rnd[j];                          // fast
    kinds[1][j] = 0.5 * rnd2[j] - 0.25;            // fast
    kinds[2][j] = 1e4 + 0.1 * rnd[j];              // large offset: not a fast row
    kinds[3][j] = 2 * rnd2[j] + 1;                 // fast
    kinds[4][j] = 3;                               // constant
    kinds[5][j] = j == rnd.size() / 2 ? NAN : rnd[j];
    kinds[6][j] = j == 0 ? -INFINITY : rnd[j];
    kinds[7][j] = (j % 2 ? 0.9 : -0.8) * double(std::numeric_limits<T>::max());  // sums overflow
    kinds[8][j] = 1e-42 * rnd[j];                  // denormal in float
  }
  if (finite_only) kinds.erase(kinds.begin() + 5, kinds.begin() + 7);
  const Index nk = Index(kinds.size()), rows = 3 * nk + 1;
  Tensor2 x(rows, cols), dy(rows, cols), y(rows, cols);
  const std::vector<double> g = nktest::random_vector(rows * cols, 18);
  for (Index i = 0; i < rows * cols; ++i) dy.data()[i] = static_cast<T>(g[std::size_t(i)]);
  for (Index r = 0; r < rows; ++r) {  // the kinds, again at an odd start, then again
    const Index k = r < nk ? r : r < 2 * nk + 1 ? (r - nk + nk - 1) % nk : r - 2 * nk - 1;
    for (Index j = 0; j < cols; ++j) x(r, j) = static_cast<T>(kinds[std::size_t(k)][std::size_t(j)]);
  }
  Layer ln(cols);
  for (Index j = 0; j < cols; ++j) ln.weight()(j) = static_cast<T>(0.5 + 0.1 * static_cast<double>(j % 7));
  typename Layer::Cache cache;
  ln.forward(x, y, cache);
  const Acc* mean = nullptr;
  if constexpr (Center) mean = cache.mean.data();
  struct Out {
    Tensor2 dx;
    std::vector<Acc> dw, db;
  };
  auto run = [&](Index at_once) {  // rows_backward on at_once rows per call
    Out o{Tensor2(rows, cols), std::vector<Acc>(std::size_t(cols)), std::vector<Acc>(std::size_t(cols))};
    for (Index r = 0; r < rows; r += at_once) {
      const Index off = r * cols;
      normkit::detail::rows_backward<Center, true>(x.data() + off, dy.data() + off, o.dx.data() + off,
                                                   std::min(at_once, rows - r), cols, Center ? mean + r : nullptr,
                                                   cache.rstd.data() + r, ln.weight().data(), o.dw.data(),
                                                   o.db.data(), false);
    }
    return o;
  };
  const Out one = run(1), two = run(rows);
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < cols; ++j)
      ASSERT_EQ(0, std::memcmp(&one.dx(r, j), &two.dx(r, j), sizeof(T)))
          << cols << " columns, dx, row " << r << ", column " << j << ": " << double(one.dx(r, j)) << " vs " << double(two.dx(r, j));
  for (std::size_t j = 0; j < std::size_t(cols); ++j) {
    if (finite_only) {
      ASSERT_TRUE(std::isfinite(two.dw[j]) && std::isfinite(two.db[j])) << "column " << j;
    }
    EXPECT_EQ(0, std::memcmp(&one.dw[j], &two.dw[j], sizeof(Acc))) << "dweight " << j;
    EXPECT_EQ(0, std::memcmp(&one.db[j], &two.db[j], sizeof(Acc))) << "dbias " << j;
  }
}

template <bool Center>
void paired_rows_backward_cases() {
  for (Index cols : {1, 5, 8, 37, 771})
    for (bool finite_only : {false, true}) {
      paired_rows_backward_case<Center, float>(cols, finite_only);
      paired_rows_backward_case<Center, double>(cols, finite_only);
      paired_rows_backward_case<Center, Eigen::bfloat16>(cols, finite_only);
    }
}

TEST(LayerNormTest, PairedBackwardRowsGiveTheBitsOfRowByRow) { paired_rows_backward_cases<true>(); }

TEST(RMSNormTest, PairedBackwardRowsGiveTheBitsOfRowByRow) { paired_rows_backward_cases<false>(); }

TEST(LayerNormTest, HugeFiniteValuesDoNotOverflow) {
  // Squares of 1e30 overflow float; the row falls back to a wider type.
  normkit::LayerNorm<float> ln(10);
  normkit::RMSNorm<float> rms(10);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(2, 10), y(2, 10), yr(2, 10);
  for (Index j = 0; j < 10; ++j) {
    x(0, j) = (j % 2 ? 1.0f : -1.0f) * 3e38f;
    x(1, j) = static_cast<float>(j) * 1e30f;
  }
  ln.forward(x, y);
  rms.forward(x, yr);
  for (Index j = 0; j < 10; ++j) {
    EXPECT_NEAR(y(0, j), j % 2 ? 1.0f : -1.0f, 1e-5f);
    EXPECT_NEAR(yr(0, j), j % 2 ? 1.0f : -1.0f, 1e-5f);
    EXPECT_NEAR(y(1, j), (j - 4.5) / std::sqrt(8.25), 1e-5);
  }
}

TEST(LayerNormTest, MultiDimNormalizedShapeUsesRowMajorParameterOrder) {
  // weight(i * 5 + j) scales x[..., i, j] in both layouts.
  normkit::LayerNorm<double> ln({3, 5}, normkit::LayerNormOptions().eps(1e-5));
  for (Index i = 0; i < 15; ++i) ln.weight()(i) = 1.0 + i;
  const auto xs = nktest::random_vector(2 * 15, 111);
  auto xr = nktest::make_tensor<double, 3, Eigen::RowMajor>({2, 3, 5}, xs);
  auto xc = nktest::make_tensor<double, 3, Eigen::ColMajor>({2, 3, 5}, xs);
  Eigen::Tensor<double, 3, Eigen::RowMajor> yr(2, 3, 5);
  Eigen::Tensor<double, 3, Eigen::ColMajor> yc(2, 3, 5);
  ln.forward(xr, yr);
  ln.forward(xc, yc);
  std::vector<double> w(15);
  for (Index i = 0; i < 15; ++i) w[static_cast<std::size_t>(i)] = 1.0 + i;
  const std::vector<double> b(15, 0.0);
  const auto want = nktest::ref::norm_forward(true, xs, 2, 15, 1e-5L, &w, &b);
  nktest::expect_close(nktest::logical(yr), want.y, 1e-12, 1e-12, "RowMajor");
  nktest::expect_close(nktest::logical(yc), want.y, 1e-12, 1e-12, "ColMajor");
}

TEST(LayerNormTest, OptionsAndDefaults) {
  normkit::LayerNorm<float> ln(768);
  EXPECT_EQ(ln.eps(), 1e-5);
  EXPECT_TRUE(ln.elementwise_affine());
  EXPECT_TRUE(ln.has_bias());
  ASSERT_EQ(ln.weight().size(), 768);
  ASSERT_EQ(ln.bias().size(), 768);
  EXPECT_EQ(ln.weight()(5), 1.0f);
  EXPECT_EQ(ln.bias()(5), 0.0f);
  normkit::LayerNorm<float> nb(8, normkit::LayerNormOptions().bias(false).eps(1e-6));
  EXPECT_EQ(nb.bias().size(), 0);
  EXPECT_EQ(nb.weight().size(), 8);
  EXPECT_EQ(nb.eps(), 1e-6);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(2, 8), y(2, 8), dx(2, 8);
  x.setRandom();
  normkit::LayerNorm<float>::Cache c;
  normkit::LayerNorm<float>::Grads g;
  nb.forward(x, y, c);
  nb.backward(x, x, c, dx, g);
  EXPECT_EQ(g.weight.size(), 8);
  EXPECT_EQ(g.bias.size(), 0);
}

TEST(RMSNormTest, DefaultEpsIsMachineEpsilonOfT) {
  EXPECT_EQ(normkit::RMSNorm<float>(8).eps(), static_cast<double>(FLT_EPSILON));
  EXPECT_EQ(normkit::RMSNorm<double>(8).eps(), DBL_EPSILON);
  EXPECT_EQ(normkit::RMSNorm<Eigen::half>(8).eps(), 0.0009765625);
  EXPECT_EQ(normkit::RMSNorm<Eigen::bfloat16>(8).eps(), 0.0078125);
  EXPECT_EQ(normkit::RMSNorm<float>(8, normkit::RMSNormOptions().eps(1e-6)).eps(), 1e-6);
}

TEST(RMSNormTest, ZeroRowsGiveZeros) {
  normkit::RMSNorm<float> rms(9);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(2, 9), y(2, 9);
  x.setZero();
  rms.forward(x, y);
  for (Index i = 0; i < y.size(); ++i) EXPECT_EQ(y.data()[i], 0.0f);
}

// ---- half / bfloat16 storage -----------------------------------------------------------

template <class H>
void reduced_precision_case(double ulp) {
  const Index rows = 7, F = 45;
  normkit::LayerNorm<H> lh(F);
  normkit::LayerNorm<float> lf(F);
  const auto w = nktest::quantized<H>(nktest::random_vector(F, 121, 0.5, 1.5));
  set_param(lh.weight(), w);
  set_param(lf.weight(), w);
  const auto xs = nktest::quantized<H>(nktest::random_vector(rows * F, 122));
  const auto dys = nktest::quantized<H>(nktest::random_vector(rows * F, 123));
  auto xh = nktest::make_tensor<H, 2, Eigen::RowMajor>({rows, F}, xs);
  auto dyh = nktest::make_tensor<H, 2, Eigen::RowMajor>({rows, F}, dys);
  auto xf = nktest::make_tensor<float, 2, Eigen::RowMajor>({rows, F}, xs);
  auto dyf = nktest::make_tensor<float, 2, Eigen::RowMajor>({rows, F}, dys);
  Eigen::Tensor<H, 2, Eigen::RowMajor> yh(rows, F), dxh(rows, F);
  Eigen::Tensor<float, 2, Eigen::RowMajor> yf(rows, F), dxf(rows, F);
  typename normkit::LayerNorm<H>::Cache ch;
  typename normkit::LayerNorm<H>::Grads gh;
  normkit::LayerNorm<float>::Cache cf;
  normkit::LayerNorm<float>::Grads gf;
  lh.forward(xh, yh, ch);
  lf.forward(xf, yf, cf);
  lh.backward(xh, dyh, ch, dxh, gh);
  lf.backward(xf, dyf, cf, dxf, gf);
  // Accumulation is in float either way: the results are the float ones, rounded once.
  auto within_rounding = [&](const auto& got, const auto& want, const char* what) {
    for (Index i = 0; i < want.size(); ++i) {
      const double g = static_cast<double>(got.data()[i]), f = want.data()[i];
      EXPECT_LE(std::fabs(g - f), 0.5 * ulp * std::fabs(f) + 1e-7) << what << " at " << i;
    }
  };
  within_rounding(yh, yf, "y");
  within_rounding(dxh, dxf, "dx");
  within_rounding(gh.weight, gf.weight, "dweight");
  within_rounding(gh.bias, gf.bias, "dbias");
}

TEST(LayerNormTest, HalfStorageWithinHalfRoundingOfFloat) { reduced_precision_case<Eigen::half>(std::ldexp(1.0, -10)); }
TEST(LayerNormTest, BFloat16StorageWithinBFloat16RoundingOfFloat) {
  reduced_precision_case<Eigen::bfloat16>(std::ldexp(1.0, -7));
}

// ---- errors: exact messages, outputs untouched -------------------------------------------

TEST(LayerNormTest, ErrorsNameFunctionArgumentExpectedAndActual) {
  normkit::LayerNorm<float> ln(768);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(8, 512), y(8, 512);
  x.setRandom();
  y.setConstant(7);
  EXPECT_EQ(error_of([&] { ln.forward(x, y); }),
            "LayerNorm::forward: x has 512 features, expected 768 (x is [8, 512])");
  EXPECT_TRUE(all_equal(y.data(), y.size(), 7));

  Eigen::Tensor<float, 2, Eigen::RowMajor> x2(8, 768), y2(8, 767), y3(8, 768);
  x2.setRandom();
  y2.setConstant(7);
  EXPECT_EQ(error_of([&] { ln.forward(x2, y2); }),
            "LayerNorm::forward: y is [8, 767], expected [8, 768] (the shape of x)");
  EXPECT_TRUE(all_equal(y2.data(), y2.size(), 7));

  normkit::LayerNorm<float> ln2({3, 4});
  Eigen::Tensor<float, 1> v(4), vy(4);
  EXPECT_EQ(error_of([&] { ln2.forward(v, vy); }),
            "LayerNorm::forward: x has rank 1, expected rank >= 2 (normalized_shape is [3, 4])");
  Eigen::Tensor<float, 3, Eigen::RowMajor> t(2, 3, 5), ty(2, 3, 5);
  EXPECT_EQ(error_of([&] { ln2.forward(t, ty); }),
            "LayerNorm::forward: x has trailing dims [3, 5], expected normalized_shape [3, 4] (x is [2, 3, 5])");

  std::vector<float> buf(8 * 768 + 1, 7.0f);
  Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> xm(buf.data(), 8, 768), ym(buf.data() + 1, 8, 768);
  EXPECT_EQ(error_of([&] { ln.forward(xm, ym); }),
            "LayerNorm::forward: y partially overlaps x (only y == x, in place, is supported)");
  EXPECT_TRUE(all_equal(buf.data(), static_cast<Index>(buf.size()), 7));
}

TEST(LayerNormTest, BackwardErrors) {
  normkit::LayerNorm<float> ln(8);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(3, 8), y(3, 8), dy(3, 8), dx(3, 8), dyb(4, 8);
  x.setRandom();
  dy.setRandom();
  dx.setConstant(7);
  normkit::LayerNorm<float>::Cache empty, cache, other;
  normkit::LayerNorm<float>::Grads g;
  EXPECT_EQ(error_of([&] { ln.backward(x, dy, empty, dx, g); }),
            "LayerNorm::backward: cache is empty, expected the cache filled by forward(x, y, cache)");
  ln.forward(x, y, cache);
  EXPECT_EQ(error_of([&] { ln.backward(x, dyb, cache, dx, g); }),
            "LayerNorm::backward: dy is [4, 8], expected [3, 8] (the shape of x)");
  Eigen::Tensor<float, 2, Eigen::RowMajor> x4(4, 8), y4(4, 8);
  x4.setRandom();
  ln.forward(x4, y4, other);
  EXPECT_EQ(error_of([&] { ln.backward(x, dy, other, dx, g); }),
            "LayerNorm::backward: cache is from x of shape [4, 8], but x is [3, 8]");
  EXPECT_TRUE(all_equal(dx.data(), dx.size(), 7));
  EXPECT_EQ(g.weight.size(), 0);  // untouched too

  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice dev(&pool, 2);
  EXPECT_EQ(error_of([&] { ln.backward(dev, x, dyb, cache, dx, g); }),
            "LayerNorm::backward: dy is [4, 8], expected [3, 8] (the shape of x)");
  EXPECT_TRUE(all_equal(dx.data(), dx.size(), 7));
}

TEST(LayerNormTest, ConstructorErrors) {
  EXPECT_EQ(error_of([] { normkit::LayerNorm<float>(8, normkit::LayerNormOptions().eps(0)); }),
            "LayerNorm: eps must be a finite number > 0, got 0");
  EXPECT_EQ(error_of([] { normkit::LayerNorm<float>(8, normkit::LayerNormOptions().eps(-1e-5)); }),
            "LayerNorm: eps must be a finite number > 0, got -1e-05");
  EXPECT_EQ(error_of([] { normkit::LayerNorm<float>(8, normkit::LayerNormOptions().eps(std::nan(""))); }),
            "LayerNorm: eps must be a finite number > 0, got nan");
  EXPECT_EQ(error_of([] { normkit::RMSNorm<float>(8, normkit::RMSNormOptions().eps(-1)); }),
            "RMSNorm: eps must be a finite number > 0, got -1");
  EXPECT_EQ(error_of([] { normkit::LayerNorm<float>(-3); }),
            "LayerNorm: normalized_shape [-3] has a negative dim");
  EXPECT_EQ(error_of([] { normkit::RMSNorm<float>(std::vector<Index>{}); }),
            "RMSNorm: normalized_shape is empty, expected at least one dim");
  // normkit::Error is a std::invalid_argument.
  EXPECT_THROW(normkit::LayerNorm<float>(8, normkit::LayerNormOptions().eps(0)), std::invalid_argument);
}

TEST(RMSNormTest, ErrorMessagesNameTheLayer) {
  normkit::RMSNorm<double> rms(16);
  Eigen::Tensor<double, 3> x(2, 3, 15), y(2, 3, 15);
  EXPECT_EQ(error_of([&] { rms.forward(x, y); }),
            "RMSNorm::forward: x has 15 features, expected 16 (x is [2, 3, 15])");
}

}  // namespace

TEST(LayerNormTest, AffineOptionIsElementwiseAffine) {
  // affine() is BatchNorm's name for the same switch; both spellings give the same layer.
  normkit::LayerNorm<float> a(8, normkit::LayerNormOptions().affine(false));
  normkit::LayerNorm<float> b(8, normkit::LayerNormOptions().elementwise_affine(false));
  EXPECT_EQ(a.weight().size(), 0);
  EXPECT_EQ(b.weight().size(), 0);
  EXPECT_FALSE(normkit::LayerNormOptions().affine(false).elementwise_affine());
  normkit::RMSNorm<float> r(8, normkit::RMSNormOptions().affine(false));
  EXPECT_EQ(r.weight().size(), 0);
  EXPECT_TRUE(normkit::RMSNormOptions().affine());
}
