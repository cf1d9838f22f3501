// DyT: a typed suite over {float, double} x {RowMajor, ColMajor}, each run over a grid
// of shapes and channel axes, plus half/bfloat16, saturation, NaN, threading, the
// cache policy, the alpha-init helper and the exact error messages.
#include <normkit/normkit.hpp>

#include <cfloat>
#include <cstring>
#include <limits>

#include "test_support.hpp"

namespace {

using nktest::Index;
using nktest::LD;

// ---- the long-double reference, written from the formulas --------------------------

struct Geometry {
  std::vector<Index> dims;
  int axis;  // as given to the options (may be negative)
  std::size_t ax() const { return static_cast<std::size_t>(axis < 0 ? axis + int(dims.size()) : axis); }
  Index channels() const { return dims[ax()]; }
  Index after() const {
    Index a = 1;
    for (std::size_t i = ax() + 1; i < dims.size(); ++i) a *= dims[i];
    return a;
  }
  /// Channel of the element at row-major logical index i.
  std::size_t channel(std::size_t i) const {
    return static_cast<std::size_t>((static_cast<Index>(i) / after()) % channels());
  }
  std::string str() const {
    return normkit::detail::shape_str(dims) + " axis " + std::to_string(axis);
  }
};

struct Params {
  double alpha = 0.5;
  std::vector<double> w, b;  // empty: absent
};

struct RefOut {
  std::vector<LD> y, dx, dw, db;
  LD dalpha = 0;
};

RefOut reference(const Geometry& g, const std::vector<double>& x, const std::vector<double>& dy,
                 const Params& p) {
  RefOut r;
  const std::size_t C = static_cast<std::size_t>(g.channels());
  r.y.resize(x.size());
  r.dx.resize(x.size());
  r.dw.assign(C, 0);
  r.db.assign(C, 0);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const std::size_t c = g.channel(i);
    const LD w = p.w.empty() ? 1.0L : p.w[c], b = p.b.empty() ? 0.0L : p.b[c];
    const LD a = p.alpha, u = std::tanh(a * static_cast<LD>(x[i]));
    r.y[i] = w * u + b;
    if (dy.empty()) continue;
    const LD s = 1 - u * u;
    r.dx[i] = dy[i] * w * a * s;
    r.dalpha += dy[i] * w * x[i] * s;
    r.dw[c] += dy[i] * u;
    r.db[c] += dy[i];
  }
  return r;
}

// ---- running the layer on logical data --------------------------------------------

template <class T>
struct LayerOut {
  std::vector<T> y, dx, dw, db;
  T dalpha{};
  bool cached_tanh = false;
};

template <class T>
normkit::DyT<T> make_layer(const Geometry& g, const Params& p) {
  normkit::DyT<T> layer(g.channels(), normkit::DyTOptions()
                                          .alpha_init(p.alpha)
                                          .elementwise_affine(!p.w.empty())
                                          .bias(!p.b.empty())
                                          .channel_axis(g.axis));
  for (std::size_t c = 0; c < p.w.size(); ++c) layer.weight()(Index(c)) = static_cast<T>(p.w[c]);
  for (std::size_t c = 0; c < p.b.size(); ++c) layer.bias()(Index(c)) = static_cast<T>(p.b[c]);
  return layer;
}

template <class T, int L>
LayerOut<T> run(const Geometry& g, const std::vector<double>& xs, const std::vector<double>& dys,
                const Params& p, int threads = 1) {
  LayerOut<T> out;
  auto layer = make_layer<T>(g, p);
  nktest::with_rank(g.dims.size(), [&](auto rank) {
    constexpr int R = decltype(rank)::value;
    auto x = nktest::make_tensor<T, R, L>(g.dims, xs);
    auto dy = nktest::make_tensor<T, R, L>(g.dims, dys);
    decltype(x) y(x.dimensions()), dx(x.dimensions());
    typename normkit::DyT<T>::Cache cache;
    typename normkit::DyT<T>::Grads grads;
    nktest::on_threads(threads, [&](const auto& dev) {
      layer.forward(dev, x, y, cache);
      layer.backward(dev, x, dy, cache, dx, grads);
    });
    out.y = nktest::logical(y);
    out.dx = nktest::logical(dx);
    out.dw = nktest::values(grads.weight);
    out.db = nktest::values(grads.bias);
    out.dalpha = grads.alpha;
    out.cached_tanh = cache.tanh.size() != 0;
  });
  return out;
}

template <class T>
Params random_params(Index C, unsigned seed, bool affine = true, bool bias = true) {
  Params p;
  p.alpha = static_cast<double>(static_cast<T>(0.8));
  if (affine) p.w = nktest::quantized<T>(nktest::random_vector(C, seed, 0.5, 1.5));
  if (affine && bias) p.b = nktest::quantized<T>(nktest::random_vector(C, seed + 1));
  return p;
}

// Ranks 1-4, sizes 1, odd, below and across a SIMD vector; channel axis last, first
// (1) and in the middle. In RowMajor, axis -1 takes the row path, axis 1 with a large
// inner the run path; ColMajor swaps them, so both layouts cover both paths.
const std::vector<Geometry> kGrid = {
    {{1}, -1},        {{7}, -1},          {{1, 1}, -1},      {{3, 5}, -1},     {{2, 9}, -1},
    {{4, 17}, -1},    {{5, 33}, -1},      {{3, 100}, -1},    {{70, 3}, -1},    {{100, 3}, -1},
    {{2, 3, 7}, -1},  {{2, 3, 7}, 1},     {{2, 5, 3, 3}, 1}, {{2, 3, 70}, 1},  {{3, 4, 2, 9}, 2},
    {{2, 2, 67}, 1},  {{1, 1, 1, 1}, 1},  {{2, 1300}, -1},   {{9, 33, 1}, 1},  {{1, 7, 65}, 1},
};

template <class T>
constexpr double tol() {
  return std::is_same_v<T, float> ? 2e-6 : 4e-15;
}

template <class TL>
class DyTTest : public ::testing::Test {};

template <class T, int L>
struct Cfg {
  using Scalar = T;
  static constexpr int layout = L;
};
using Configs = ::testing::Types<Cfg<float, Eigen::RowMajor>, Cfg<float, Eigen::ColMajor>,
                                 Cfg<double, Eigen::RowMajor>, Cfg<double, Eigen::ColMajor>>;
struct CfgNames {
  template <class C>
  static std::string GetName(int) {
    return std::string(std::is_same_v<typename C::Scalar, float> ? "Float" : "Double") +
           (C::layout == Eigen::RowMajor ? "RowMajor" : "ColMajor");
  }
};
TYPED_TEST_SUITE(DyTTest, Configs, CfgNames);

TYPED_TEST(DyTTest, ForwardMatchesLongDoubleReference) {
  using T = typename TypeParam::Scalar;
  for (const Geometry& g : kGrid) {
    for (int variant = 0; variant < 3; ++variant) {  // affine + bias, weight only, none
      const Index n = nktest::numel(g.dims);
      const Params p = random_params<T>(g.channels(), 3, variant < 2, variant == 0);
      // Wide enough to reach both halves of tanh and its saturation.
      const auto xs = nktest::quantized<T>(nktest::random_vector(n, 4, -15, 15));
      const auto got = run<T, TypeParam::layout>(g, xs, xs, p);
      const auto want = reference(g, xs, {}, p);
      nktest::expect_close(got.y, want.y, tol<T>() * 2, tol<T>(),
                           "y, " + g.str() + " variant " + std::to_string(variant));
    }
  }
}

TYPED_TEST(DyTTest, BackwardMatchesLongDoubleReference) {
  using T = typename TypeParam::Scalar;
  for (const Geometry& g : kGrid) {
    for (int variant = 0; variant < 3; ++variant) {
      const Index n = nktest::numel(g.dims);
      const Params p = random_params<T>(g.channels(), 5, variant < 2, variant == 0);
      const auto xs = nktest::quantized<T>(nktest::random_vector(n, 6, -3, 3));
      const auto dys = nktest::quantized<T>(nktest::random_vector(n, 7));
      const auto got = run<T, TypeParam::layout>(g, xs, dys, p);
      const auto want = reference(g, xs, dys, p);
      const std::string where = g.str() + " variant " + std::to_string(variant);
      // 1 - u^2 inherits tanh's absolute error (2 ulp of 1) relative to its own size,
      // at most 1/(1 - tanh(2.4)^2) ~ 30 here.
      nktest::expect_close(got.dx, want.dx, tol<T>() * 60, tol<T>() * 60, "dx, " + where);
      const LD count = static_cast<LD>(n / g.channels());
      if (variant < 2) {
        nktest::expect_close(got.dw, want.dw, tol<T>() * 4 * (1 + count), tol<T>(), "dweight, " + where);
      } else {
        EXPECT_EQ(got.dw.size(), 0u) << where;
      }
      if (variant == 0)
        nktest::expect_close(got.db, want.db, tol<T>() * 4 * (1 + count), tol<T>(), "dbias, " + where);
      else
        EXPECT_EQ(got.db.size(), 0u) << where;
      nktest::expect_close(std::vector<T>{got.dalpha}, std::vector<LD>{want.dalpha},
                           tol<T>() * 60 * (1 + static_cast<LD>(n)), tol<T>() * 60, "dalpha, " + where);
    }
  }
}

// Central differences in double of L = sum(y * r) for dx, dalpha, dweight, dbias.
TYPED_TEST(DyTTest, BackwardMatchesFiniteDifference) {
  using T = typename TypeParam::Scalar;
  if constexpr (std::is_same_v<T, double>) {
    constexpr int L = TypeParam::layout;
    for (const Geometry& g : kGrid) {
      const Index n = nktest::numel(g.dims);
      if (n > 300) continue;
      Params p = random_params<double>(g.channels(), 8);
      p.alpha = 0.7;
      const auto xs = nktest::random_vector(n, 9, -3, 3);
      const auto rs = nktest::random_vector(n, 10);
      const auto got = run<double, L>(g, xs, rs, p);
      auto loss = [&](const std::vector<double>& xv, const Params& pv) {
        const auto y = run<double, L>(g, xv, xv, pv).y;
        LD s = 0;
        for (std::size_t i = 0; i < y.size(); ++i) s += static_cast<LD>(y[i]) * rs[i];
        return s;
      };
      const double h = 1e-6;
      std::vector<double> fd_dx(xs.size());
      for (std::size_t i = 0; i < xs.size(); ++i) {
        auto xp = xs, xm = xs;
        xp[i] += h;
        xm[i] -= h;
        fd_dx[i] = static_cast<double>((loss(xp, p) - loss(xm, p)) / (2 * h));
      }
      const std::string where = g.str();
      nktest::expect_close(got.dx, fd_dx, 1e-8, 1e-7, "dx vs FD, " + where);
      auto fd_vec = [&](std::vector<double> Params::*member) {
        std::vector<double> d((p.*member).size());
        for (std::size_t c = 0; c < d.size(); ++c) {
          Params pp = p, pm = p;
          (pp.*member)[c] += h;
          (pm.*member)[c] -= h;
          d[c] = static_cast<double>((loss(xs, pp) - loss(xs, pm)) / (2 * h));
        }
        return d;
      };
      const double atol = 1e-8 * static_cast<double>(n);
      nktest::expect_close(got.dw, fd_vec(&Params::w), atol, 1e-7, "dweight vs FD, " + where);
      nktest::expect_close(got.db, fd_vec(&Params::b), atol, 1e-7, "dbias vs FD, " + where);
      Params pp = p, pm = p;
      pp.alpha += h;
      pm.alpha -= h;
      const double fd_alpha = static_cast<double>((loss(xs, pp) - loss(xs, pm)) / (2 * h));
      nktest::expect_close(std::vector<double>{got.dalpha}, std::vector<double>{fd_alpha}, atol, 1e-7,
                           "dalpha vs FD, " + where);
    }
  }
}

TYPED_TEST(DyTTest, ThreadCountsGiveBitwiseEqualResults) {
  using T = typename TypeParam::Scalar;
  // Several row blocks and column tiles (row path), several run segments (run path).
  const std::vector<Geometry> shapes = {
      {{67, 40}, -1}, {{5, 2500}, -1}, {{3, 5, 200}, 1}, {{2, 3, 9000}, 1}, {{300, 7}, -1}};
  for (const Geometry& g : shapes) {
    const Index n = nktest::numel(g.dims);
    const Params p = random_params<T>(g.channels(), 11);
    const auto xs = nktest::quantized<T>(nktest::random_vector(n, 12, -3, 3));
    const auto dys = nktest::quantized<T>(nktest::random_vector(n, 13));
    const auto one = run<T, TypeParam::layout>(g, xs, dys, p, 1);
    for (int threads : {2, 3, 7}) {
      const auto many = run<T, TypeParam::layout>(g, xs, dys, p, threads);
      const std::string where = g.str() + " threads " + std::to_string(threads);
      EXPECT_TRUE(nktest::bitwise_equal(one.y, many.y)) << "y, " << where;
      EXPECT_TRUE(nktest::bitwise_equal(one.dx, many.dx)) << "dx, " << where;
      EXPECT_TRUE(nktest::bitwise_equal(one.dw, many.dw)) << "dweight, " << where;
      EXPECT_TRUE(nktest::bitwise_equal(one.db, many.db)) << "dbias, " << where;
      EXPECT_TRUE(nktest::bitwise_equal(std::vector<T>{one.dalpha}, std::vector<T>{many.dalpha}))
          << "dalpha, " << where;
    }
  }
}

TYPED_TEST(DyTTest, BothLayoutsGiveTheSameNumbers) {
  using T = typename TypeParam::Scalar;
  for (const Geometry& g : kGrid) {
    const Index n = nktest::numel(g.dims);
    const Params p = random_params<T>(g.channels(), 14);
    const auto xs = nktest::quantized<T>(nktest::random_vector(n, 15, -3, 3));
    const auto dys = nktest::quantized<T>(nktest::random_vector(n, 16));
    const auto a = run<T, Eigen::RowMajor>(g, xs, dys, p);
    const auto b = run<T, Eigen::ColMajor>(g, xs, dys, p);
    // Elementwise outputs do not depend on the layout at all.
    EXPECT_TRUE(nktest::bitwise_equal(a.y, b.y)) << g.str();
    EXPECT_TRUE(nktest::bitwise_equal(a.dx, b.dx)) << g.str();
    // The sums run in another order: equal to rounding.
    const LD count = static_cast<LD>(n / g.channels());
    nktest::expect_close(a.dw, b.dw, tol<T>() * 4 * (1 + count), tol<T>(), "dweight " + g.str());
    nktest::expect_close(a.db, b.db, tol<T>() * 4 * (1 + count), tol<T>(), "dbias " + g.str());
  }
}

TYPED_TEST(DyTTest, SaturatesToExactlyOneWithFiniteGradients) {
  using T = typename TypeParam::Scalar;
  constexpr int L = TypeParam::layout;
  const double big = static_cast<double>(std::numeric_limits<T>::max());
  const std::vector<double> xs = {big, -big, 1e30, -1e30, 40, -40, 1e4, -1e4, 100, -100};
  const Geometry g{{2, 5}, -1};
  for (double alpha : {0.5, 1.0, 1e30}) {
    Params p;
    p.alpha = alpha;
    p.w.assign(5, 1.0);
    p.b.assign(5, 0.0);
    const auto out = run<T, L>(g, xs, std::vector<double>(10, 1.0), p);
    for (std::size_t i = 0; i < xs.size(); ++i) {
      EXPECT_EQ(out.y[i], xs[i] > 0 ? T(1) : T(-1)) << "x " << xs[i] << " alpha " << alpha;
      EXPECT_EQ(out.dx[i], T(0)) << "x " << xs[i] << " alpha " << alpha;
    }
    EXPECT_EQ(out.dalpha, T(0)) << "alpha " << alpha;
    for (T v : out.dw) EXPECT_EQ(v, T(0));  // tanh = +1 and -1 on each channel, dy = 1
  }
}

TYPED_TEST(DyTTest, NanStaysInItsOwnElement) {
  using T = typename TypeParam::Scalar;
  constexpr int L = TypeParam::layout;
  const Geometry g{{4, 19}, -1};
  const Params p = random_params<T>(19, 17);
  auto xs = nktest::quantized<T>(nktest::random_vector(76, 18));
  const auto dys = nktest::quantized<T>(nktest::random_vector(76, 19));
  const auto clean = run<T, L>(g, xs, dys, p);
  xs[25] = std::numeric_limits<double>::quiet_NaN();
  const auto dirty = run<T, L>(g, xs, dys, p);
  for (std::size_t i = 0; i < xs.size(); ++i) {
    if (i == 25) {
      EXPECT_TRUE(std::isnan(static_cast<double>(dirty.y[i])));
      EXPECT_TRUE(std::isnan(static_cast<double>(dirty.dx[i])));
    } else {
      EXPECT_EQ(dirty.y[i], clean.y[i]) << i;
      EXPECT_EQ(dirty.dx[i], clean.dx[i]) << i;
    }
  }
  // The parameter sums of channel 25 % 19 include the NaN; the others do not.
  for (std::size_t c = 0; c < 19; ++c) {
    if (c == 6) continue;
    EXPECT_EQ(dirty.dw[c], clean.dw[c]) << c;
    EXPECT_EQ(dirty.db[c], clean.db[c]) << c;
  }
}

TYPED_TEST(DyTTest, InPlaceForwardAndBackward) {
  using T = typename TypeParam::Scalar;
  constexpr int L = TypeParam::layout;
  const std::vector<Index> dims = {5, 3, 11};
  const auto xs = nktest::quantized<T>(nktest::random_vector(165, 20, -3, 3));
  const auto dys = nktest::quantized<T>(nktest::random_vector(165, 21));
  const Params p = random_params<T>(3, 22);
  const auto layer = make_layer<T>({dims, 1}, p);
  auto x = nktest::make_tensor<T, 3, L>(dims, xs);
  auto dy = nktest::make_tensor<T, 3, L>(dims, dys);
  Eigen::Tensor<T, 3, L> y(x.dimensions()), dx(x.dimensions());
  typename normkit::DyT<T>::Cache cache;
  typename normkit::DyT<T>::Grads grads, grads2;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);
  auto dy2 = dy;
  layer.backward(x, dy2, cache, dy2, grads2);  // dx == dy
  EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(dx), nktest::logical(dy2)));
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(grads.weight), nktest::values(grads2.weight)));
  EXPECT_EQ(grads.alpha, grads2.alpha);
  auto x2 = x;
  layer.backward(x2, dy, cache, x2, grads2);  // dx == x
  EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(dx), nktest::logical(x2)));
  EXPECT_EQ(grads.alpha, grads2.alpha);
  auto x3 = x;
  layer.forward(x3, x3);  // y == x
  EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(y), nktest::logical(x3)));
}

TYPED_TEST(DyTTest, GradientsAreOverwrittenNotAccumulated) {
  using T = typename TypeParam::Scalar;
  constexpr int L = TypeParam::layout;
  const std::vector<Index> dims = {6, 13};
  const auto layer = make_layer<T>({dims, -1}, random_params<T>(13, 23));
  auto x = nktest::make_tensor<T, 2, L>(dims, nktest::random_vector(78, 24));
  auto dy = nktest::make_tensor<T, 2, L>(dims, nktest::random_vector(78, 25));
  Eigen::Tensor<T, 2, L> y(x.dimensions()), dx(x.dimensions());
  typename normkit::DyT<T>::Cache cache;
  typename normkit::DyT<T>::Grads grads;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);
  const auto w1 = nktest::values(grads.weight), b1 = nktest::values(grads.bias);
  const T a1 = grads.alpha;
  layer.backward(x, dy, cache, dx, grads);
  EXPECT_TRUE(nktest::bitwise_equal(w1, nktest::values(grads.weight)));
  EXPECT_TRUE(nktest::bitwise_equal(b1, nktest::values(grads.bias)));
  EXPECT_EQ(a1, grads.alpha);
}

TYPED_TEST(DyTTest, EmptyTensorIsANoOpWithZeroGradients) {
  using T = typename TypeParam::Scalar;
  constexpr int L = TypeParam::layout;
  normkit::DyT<T> layer(5);
  Eigen::Tensor<T, 2, L> x(0, 5), y(0, 5), dx(0, 5);
  typename normkit::DyT<T>::Cache cache;
  typename normkit::DyT<T>::Grads grads;
  grads.alpha = T(3);
  layer.forward(x, y, cache);
  layer.backward(x, x, cache, dx, grads);
  EXPECT_EQ(grads.alpha, T(0));
  ASSERT_EQ(grads.weight.size(), 5);
  ASSERT_EQ(grads.bias.size(), 5);
  for (Index c = 0; c < 5; ++c) {
    EXPECT_EQ(grads.weight(c), T(0));
    EXPECT_EQ(grads.bias(c), T(0));
  }
  // A sum without terms is 0 even for an infinite weight (found by the fuzzer: 0 * inf).
  layer.weight()(2) = T(std::numeric_limits<float>::infinity());
  layer.backward(x, x, cache, dx, grads);
  EXPECT_EQ(grads.alpha, T(0));
}

// weight * alpha beyond float's range (3e38 * 10) or below double's normal range
// (1e-321 * 1e-3) while dx itself is an ordinary number (found by the fuzzer): the
// channel's dx is computed in the wider type, in place too.
TEST(DyTTest, WeightTimesAlphaOutOfRange) {
  auto check = [](auto tag, double w0, double alpha, double dy0) {
    using T = decltype(tag);
    normkit::DyT<T> layer(2);
    layer.alpha() = static_cast<T>(alpha);
    layer.weight().setValues({static_cast<T>(w0), T(1)});
    Eigen::Tensor<T, 2, Eigen::RowMajor> x(3, 2), y(3, 2), dy(3, 2), dx(3, 2);
    x.setValues({{T(0.01), T(0.5)}, {T(-0.02), T(1)}, {T(0.003), T(2)}});
    dy.setValues({{static_cast<T>(dy0), T(1)}, {static_cast<T>(-dy0), T(1)}, {static_cast<T>(dy0 / 2), T(1)}});
    typename normkit::DyT<T>::Cache cache;
    typename normkit::DyT<T>::Grads grads;
    layer.forward(x, y, cache);
    layer.backward(x, dy, cache, dx, grads);
    for (Index r = 0; r < 3; ++r) {
      const long double t = std::tanh(static_cast<long double>(alpha) * static_cast<long double>(x(r, 0)));
      const long double want = static_cast<long double>(dy(r, 0)) * static_cast<long double>(layer.weight()(0)) *
                               static_cast<long double>(static_cast<T>(alpha)) * (1 - t * t);
      ASSERT_TRUE(std::isfinite(want));
      EXPECT_NEAR(static_cast<double>(dx(r, 0)), static_cast<double>(want), 4 * std::numeric_limits<T>::epsilon() * std::fabs(static_cast<double>(want)))
          << r;
    }
    Eigen::Tensor<T, 2, Eigen::RowMajor> inplace = dy;
    layer.backward(x, inplace, cache, inplace, grads);  // dx = dy
    EXPECT_EQ(0, std::memcmp(inplace.data(), dx.data(), sizeof(T) * 6));
  };
  check(float{}, 3e38, 10, 1e-39);     // k = 3e39: inf in float
  check(double{}, 1e-321, 1e-3, 1e83);  // k = 1e-324: 0 in double
}

TYPED_TEST(DyTTest, CachedAndRecomputedTanhGiveTheSameBits) {
  using T = typename TypeParam::Scalar;
  constexpr int L = TypeParam::layout;
  // Rows of widths that end in a strip of two packets, one packet and a partial one
  // (53), only a partial one (7, 1), several row blocks (37 and 40 rows), short inner
  // runs expanded to rows (17x3x7 on axis 1), and long runs (3x4x80).
  for (const Geometry& g : {Geometry{{37, 21}, -1}, Geometry{{37, 53}, -1}, Geometry{{40, 7}, -1},
                            Geometry{{33, 1}, -1}, Geometry{{17, 3, 7}, 1}, Geometry{{3, 4, 80}, 1}}) {
    const Index n = nktest::numel(g.dims);
    const auto layer = make_layer<T>(g, random_params<T>(g.channels(), 26));
    nktest::with_rank(g.dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      auto x = nktest::make_tensor<T, R, L>(g.dims, nktest::random_vector(n, 27, -4, 4));
      auto dy = nktest::make_tensor<T, R, L>(g.dims, nktest::random_vector(n, 28));
      decltype(x) y(x.dimensions()), dx1(x.dimensions()), dx2(x.dimensions());
      typename normkit::DyT<T>::Cache cache;
      typename normkit::DyT<T>::Grads g1, g2;
      layer.forward(x, y, cache);
      ASSERT_EQ(cache.tanh.size(), n) << "small inputs keep tanh";
      layer.backward(x, dy, cache, dx1, g1);
      auto bare = cache;
      bare.tanh.resize(0);
      layer.backward(x, dy, bare, dx2, g2);
      EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(dx1), nktest::logical(dx2))) << g.str();
      EXPECT_TRUE(nktest::bitwise_equal(nktest::values(g1.weight), nktest::values(g2.weight)));
      EXPECT_TRUE(nktest::bitwise_equal(nktest::values(g1.bias), nktest::values(g2.bias)));
      EXPECT_EQ(g1.alpha, g2.alpha);
    });
  }
}

TEST(DyTTest, LargeInputsKeepNoTanhInTheCache) {
  const Index cols = 1024, rows = Index(normkit::DyT<float>::kCacheTanhBytes / sizeof(float) / cols) + 1;
  normkit::DyT<float> layer(cols);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(rows, cols), y(rows, cols), dy(rows, cols), dx(rows, cols);
  x.setRandom();
  dy.setRandom();
  normkit::DyT<float>::Cache cache;
  normkit::DyT<float>::Grads grads;
  layer.forward(x, y, cache);
  EXPECT_EQ(cache.tanh.size(), 0);
  layer.backward(x, dy, cache, dx, grads);
  // Spot-check dx against the reference on the first and last rows.
  for (Index r : {Index(0), rows - 1})
    for (Index c = 0; c < cols; c += 97) {
      const LD u = std::tanh(0.5L * x(r, c));
      EXPECT_NEAR(dx(r, c), static_cast<double>(dy(r, c) * 0.5L * (1 - u * u)), 1e-6);
    }
}

// Outputs of kStreamBytes (8 MiB) and more are written with streaming stores (rows
// misaligned here: 1029 columns), and no tanh is cached: every element must still get
// exactly the bits of the cached, cache-resident path, which a few of its rows run alone
// give.
TEST(DyTTest, StreamedOutputsMatchTheInCachePathBitwise) {
  using Tensor2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  const nktest::LlcBytes any_cache(0);  // streamed on every machine
  const Index cols = 1029;
  const Index rows = Index(normkit::detail::simd::kStreamBytes / sizeof(float) / cols) + 2;
  const Params p = random_params<float>(cols, 41);
  const auto layer = make_layer<float>({{rows, cols}, -1}, p);
  Tensor2 x(rows, cols), y(rows, cols), dy(rows, cols), dx(rows, cols);
  x.setRandom();
  dy.setRandom();
  x = x * 6.0f - 3.0f;  // both halves of the tanh
  typename normkit::DyT<float>::Cache cache;
  typename normkit::DyT<float>::Grads grads;
  layer.forward(x, y, cache);
  ASSERT_EQ(cache.tanh.size(), 0);
  layer.backward(x, dy, cache, dx, grads);
  for (Index r0 : {Index(0), rows / 2 + 1, rows - 3}) {
    const Eigen::array<Index, 2> off{r0, 0}, ext{3, cols};
    Tensor2 xs = x.slice(off, ext), dys = dy.slice(off, ext), ys(3, cols), dxs(3, cols);
    typename normkit::DyT<float>::Cache c;
    typename normkit::DyT<float>::Grads g;
    layer.forward(xs, ys, c);
    ASSERT_EQ(c.tanh.size(), 3 * cols);
    layer.backward(xs, dys, c, dxs, g);
    Tensor2 yb = y.slice(off, ext), dxb = dx.slice(off, ext);
    EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(ys), nktest::logical(yb))) << "y, row " << r0;
    EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(dxs), nktest::logical(dxb))) << "dx, row " << r0;
  }
}

// Without a weight or a bias the output is the tanh itself, bit for bit (signed zeros
// included); with a weight only, one rounding of tanh * weight.
TEST(DyTTest, MissingParametersChangeNoBits) {
  for (bool affine : {false, true}) {
    for (const Geometry& g : {Geometry{{5, 19}, -1}, Geometry{{2, 3, 70}, 1}}) {
      const Index n = nktest::numel(g.dims);
      Params p = random_params<float>(g.channels(), 43, affine, false);
      p.alpha = 0.75;
      const auto layer = make_layer<float>(g, p);
      std::vector<double> xs = nktest::random_vector(n, 44, -3, 3);
      xs[0] = -0.0;
      xs[1] = 0.0;
      nktest::with_rank(g.dims.size(), [&](auto rank) {
        constexpr int R = decltype(rank)::value;
        auto x = nktest::make_tensor<float, R, Eigen::RowMajor>(g.dims, xs);
        decltype(x) y(x.dimensions());
        layer.forward(x, y);
        const std::vector<float> xv = nktest::logical(x), yv = nktest::logical(y);
        for (std::size_t i = 0; i < xv.size(); ++i) {
          const float u = normkit::detail::tanh_accurate(0.75f * xv[i]);
          const float want = affine ? u * static_cast<float>(p.w[g.channel(i)]) : u;
          ASSERT_EQ(std::memcmp(&yv[i], &want, sizeof(float)), 0)
              << "x = " << xv[i] << ", y = " << yv[i] << ", expected " << want << ", " << g.str();
        }
      });
    }
  }
}

TEST(DyTTest, BackwardUsesTheAlphaOfItsForward) {
  normkit::DyT<double> layer(4);
  Eigen::Tensor<double, 2, Eigen::RowMajor> x(3, 4), y(3, 4), dy(3, 4), dx(3, 4), dx2(3, 4);
  x.setRandom();
  dy.setRandom();
  normkit::DyT<double>::Cache cache;
  normkit::DyT<double>::Grads g1, g2;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, g1);
  layer.alpha() = 2.0;  // an optimizer step between forward and backward
  layer.backward(x, dy, cache, dx2, g2);
  EXPECT_TRUE(nktest::bitwise_equal(std::vector<double>(dx.data(), dx.data() + 12),
                                    std::vector<double>(dx2.data(), dx2.data() + 12)));
  EXPECT_EQ(g1.alpha, g2.alpha);
}

TEST(DyTTest, OptionsAndDefaults) {
  normkit::DyT<float> d(768);
  EXPECT_EQ(d.alpha(), 0.5f);
  EXPECT_EQ(d.channels(), 768);
  EXPECT_EQ(d.channel_axis(), -1);
  ASSERT_EQ(d.weight().size(), 768);
  ASSERT_EQ(d.bias().size(), 768);
  EXPECT_EQ(d.weight()(5), 1.0f);
  EXPECT_EQ(d.bias()(5), 0.0f);
  d.alpha() = 2.0f;  // mutable reference
  EXPECT_EQ(d.alpha(), 2.0f);

  normkit::DyT<float> llama(64, normkit::DyT<float>::Options().alpha_init(0.8).bias(false));
  EXPECT_EQ(llama.alpha(), 0.8f);
  EXPECT_EQ(llama.weight().size(), 64);
  EXPECT_EQ(llama.bias().size(), 0);
  EXPECT_FALSE(llama.has_bias());

  normkit::DyT<double> bare(8, normkit::DyTOptions().elementwise_affine(false).channel_axis(1));
  EXPECT_EQ(bare.weight().size(), 0);
  // affine() is another name for elementwise_affine(), as in LayerNorm's options.
  normkit::DyT<float> bare2(8, normkit::DyTOptions().affine(false));
  EXPECT_EQ(bare2.weight().size(), 0);
  EXPECT_EQ(bare2.bias().size(), 0);
  EXPECT_FALSE(normkit::DyTOptions().affine(false).elementwise_affine());
  EXPECT_TRUE(normkit::DyTOptions().affine());
  EXPECT_EQ(bare.bias().size(), 0);
  EXPECT_EQ(bare.channel_axis(), 1);
}

template <class H>
void reduced_precision_case(double unit) {
  // Storage in H, arithmetic in float: outputs within half a unit of H of the float
  // layer's results on the same (H-representable) inputs.
  for (const Geometry& g : {Geometry{{9, 33}, -1}, Geometry{{2, 5, 70}, 1}}) {
    const Index n = nktest::numel(g.dims);
    const Params p = random_params<H>(g.channels(), 30);
    const auto xs = nktest::quantized<H>(nktest::random_vector(n, 31, -3, 3));
    const auto dys = nktest::quantized<H>(nktest::random_vector(n, 32));
    const auto h = run<H, Eigen::RowMajor>(g, xs, dys, p, 2);
    const auto want = reference(g, xs, dys, p);
    auto d = [](const std::vector<H>& v) {
      std::vector<double> out;
      for (H e : v) out.push_back(static_cast<double>(static_cast<float>(e)));
      return out;
    };
    nktest::expect_close(d(h.y), want.y, unit, unit, "y " + g.str());
    nktest::expect_close(d(h.dx), want.dx, unit * 4, unit, "dx " + g.str());
    nktest::expect_close(d(h.dw), want.dw, unit * 4, unit, "dweight " + g.str());
    nktest::expect_close(d(h.db), want.db, unit * 4, unit, "dbias " + g.str());
    nktest::expect_close(d({h.dalpha}), std::vector<LD>{want.dalpha}, unit * 16, unit,
                         "dalpha " + g.str());
    // Same bits for any thread count.
    const auto one = run<H, Eigen::RowMajor>(g, xs, dys, p, 1);
    EXPECT_TRUE(nktest::bitwise_equal(one.y, h.y));
    EXPECT_TRUE(nktest::bitwise_equal(one.dw, h.dw));
  }
}

TEST(DyTTest, HalfStorageWithinHalfRounding) { reduced_precision_case<Eigen::half>(std::ldexp(1.0, -10)); }
TEST(DyTTest, BFloat16StorageWithinBFloat16Rounding) {
  reduced_precision_case<Eigen::bfloat16>(std::ldexp(1.0, -7));
}

TEST(DyTTest, AcceptsTensorMaps) {
  normkit::DyT<float> layer(6);
  std::vector<float> xs(18), ys(18, 0), dys(18, 1), dxs(18);
  for (std::size_t i = 0; i < xs.size(); ++i) xs[i] = 0.25f * static_cast<float>(i) - 2;
  using Map = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
  using CMap = Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>>;
  CMap x(xs.data(), 3, 6), dy(dys.data(), 3, 6);
  Map y(ys.data(), 3, 6), dx(dxs.data(), 3, 6);
  normkit::DyT<float>::Cache cache;
  normkit::DyT<float>::Grads grads;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);
  for (std::size_t i = 0; i < xs.size(); ++i)
    EXPECT_NEAR(ys[i], std::tanh(0.5 * xs[i]), 2e-7) << i;
}

// ---- the alpha initialization of the paper -----------------------------------------

TEST(DyTTest, AlphaInitHelperReturnsThePaperTables) {
  using normkit::DyTPosition;
  using normkit::dyt_alpha_init_llm;
  // Table 11 (by width) and Table 10 (LLaMA 7B/13B/34B/70B: widths 4096/5120/8192/8192).
  const struct {
    Index width;
    double attention, other;
  } table[] = {{1024, 1.0, 1.0}, {2048, 1.0, 0.5}, {4096, 0.8, 0.2}, {5120, 0.6, 0.15}, {8192, 0.2, 0.05}};
  for (const auto& row : table) {
    EXPECT_EQ(dyt_alpha_init_llm(row.width, DyTPosition::Attention), row.attention) << row.width;
    EXPECT_EQ(dyt_alpha_init_llm(row.width, DyTPosition::Other), row.other) << row.width;
  }
  // Beyond the table: its ends.
  EXPECT_EQ(dyt_alpha_init_llm(512, DyTPosition::Attention), 1.0);
  EXPECT_EQ(dyt_alpha_init_llm(1, DyTPosition::Other), 1.0);
  EXPECT_EQ(dyt_alpha_init_llm(16384, DyTPosition::Attention), 0.2);
  EXPECT_EQ(dyt_alpha_init_llm(16384, DyTPosition::Other), 0.05);
  // Between: geometric interpolation in log(width), e.g. halfway (in log) from 2048 to
  // 4096 is sqrt(1.0 * 0.8) and sqrt(0.5 * 0.2).
  const Index mid = static_cast<Index>(std::llround(2048 * std::sqrt(2.0)));
  EXPECT_NEAR(dyt_alpha_init_llm(mid, DyTPosition::Attention), std::sqrt(0.8), 1e-4);
  EXPECT_NEAR(dyt_alpha_init_llm(mid, DyTPosition::Other), std::sqrt(0.1), 1e-4);
  // Monotone non-increasing in the width.
  double prev_a = 2, prev_o = 2;
  for (Index w = 256; w <= 20000; w += 64) {
    const double a = dyt_alpha_init_llm(w, DyTPosition::Attention);
    const double o = dyt_alpha_init_llm(w, DyTPosition::Other);
    EXPECT_LE(a, prev_a) << w;
    EXPECT_LE(o, prev_o) << w;
    EXPECT_LE(o, a) << w;
    prev_a = a;
    prev_o = o;
  }
}

// ---- errors: exact messages, outputs untouched -------------------------------------

template <class F>
void expect_error(F&& f, const std::string& message) {
  try {
    f();
    ADD_FAILURE() << "no error, expected: " << message;
  } catch (const normkit::Error& e) {
    EXPECT_EQ(std::string(e.what()), message);
  }
}

TEST(DyTTest, ForwardErrorsNameFunctionArgumentExpectedAndActual) {
  using T2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  normkit::DyT<float> d(768);
  T2 x(8, 512), y(8, 512);
  x.setConstant(1);
  y.setConstant(42);
  normkit::DyT<float>::Cache cache;
  expect_error([&] { d.forward(x, y, cache); },
               "DyT::forward: x has 512 features, expected 768 (x is [8, 512])");
  EXPECT_TRUE(cache.empty());

  normkit::DyT<float> cf(4, normkit::DyTOptions().channel_axis(1));
  Eigen::Tensor<float, 3, Eigen::RowMajor> x3(2, 5, 3), y3(2, 5, 3);
  y3.setConstant(42);
  expect_error([&] { cf.forward(x3, y3); },
               "DyT::forward: x has 5 channels on axis 1, expected 4 (x is [2, 5, 3])");
  Eigen::Tensor<float, 1, Eigen::RowMajor> x1(4), y1(4);
  y1.setConstant(42);
  expect_error([&] { cf.forward(x1, y1); },
               "DyT::forward: channel_axis 1 is out of range for x of rank 1 (x is [4])");
  normkit::DyT<float> neg(4, normkit::DyTOptions().channel_axis(-3));
  Eigen::Tensor<float, 2, Eigen::RowMajor> x2(3, 4), y2(2, 4), y2ok(3, 4);
  y2.setConstant(42);
  y2ok.setConstant(42);
  expect_error([&] { neg.forward(x2, y2ok); },
               "DyT::forward: channel_axis -3 is out of range for x of rank 2 (x is [3, 4])");
  normkit::DyT<float> d4(4);
  expect_error([&] { d4.forward(x2, y2); }, "DyT::forward: y is [2, 4], expected [3, 4] (the shape of x)");

  std::vector<float> buf(13, 42.0f);
  Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> xm(buf.data(), 3, 4), ym(buf.data() + 1, 3, 4);
  expect_error([&] { d4.forward(xm, ym); },
               "DyT::forward: y partially overlaps x (only y == x, in place, is supported)");

  for (Index i = 0; i < y.size(); ++i) ASSERT_EQ(y.data()[i], 42.0f);
  for (Index i = 0; i < y3.size(); ++i) ASSERT_EQ(y3.data()[i], 42.0f);
  for (Index i = 0; i < y1.size(); ++i) ASSERT_EQ(y1.data()[i], 42.0f);
  for (Index i = 0; i < y2.size(); ++i) ASSERT_EQ(y2.data()[i], 42.0f);
  for (Index i = 0; i < y2ok.size(); ++i) ASSERT_EQ(y2ok.data()[i], 42.0f);
  for (float v : buf) ASSERT_EQ(v, 42.0f);
}

TEST(DyTTest, BackwardErrors) {
  using T2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  normkit::DyT<float> d(4);
  T2 x(3, 4), y(3, 4), dy(3, 4), dx(3, 4), other(2, 4), dx_bad(3, 5);
  x.setConstant(1);
  dy.setConstant(1);
  dx.setConstant(42);
  normkit::DyT<float>::Cache cache, empty;
  normkit::DyT<float>::Grads grads;
  grads.alpha = 7;
  d.forward(x, y, cache);
  expect_error([&] { d.backward(x, dy, empty, dx, grads); },
               "DyT::backward: cache is empty, expected the cache filled by forward(x, y, cache)");
  normkit::DyT<float>::Cache from_other;
  T2 oy(2, 4);
  other.setConstant(1);
  d.forward(other, oy, from_other);
  expect_error([&] { d.backward(x, dy, from_other, dx, grads); },
               "DyT::backward: cache is from x of shape [2, 4], but x is [3, 4]");
  expect_error([&] { d.backward(x, other, cache, dx, grads); },
               "DyT::backward: dy is [2, 4], expected [3, 4] (the shape of x)");
  expect_error([&] { d.backward(x, dy, cache, dx_bad, grads); },
               "DyT::backward: dx is [3, 5], expected [3, 4] (the shape of x)");
  expect_error([&] { d.backward(other, other, cache, oy, grads); },
               "DyT::backward: cache is from x of shape [3, 4], but x is [2, 4]");
  auto broken = cache;
  broken.tanh.resize(5);
  expect_error([&] { d.backward(x, dy, broken, dx, grads); },
               "DyT::backward: cache holds 5 tanh values, expected 12 or none");
  std::vector<float> buf(13, 1.0f);
  Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> xm(buf.data(), 3, 4), dxm(buf.data() + 1, 3, 4);
  expect_error([&] { d.backward(xm, dy, cache, dxm, grads); },
               "DyT::backward: dx partially overlaps x (only dx == x or dx == dy is supported)");
  expect_error([&] { d.backward(x, xm, cache, dxm, grads); },
               "DyT::backward: dx partially overlaps dy (only dx == x or dx == dy is supported)");
  for (Index i = 0; i < dx.size(); ++i) ASSERT_EQ(dx.data()[i], 42.0f);
  for (float v : buf) ASSERT_EQ(v, 1.0f);
  EXPECT_EQ(grads.alpha, 7.0f);
  EXPECT_EQ(grads.weight.size(), 0);
}

TEST(DyTTest, ConstructorAndHelperErrors) {
  expect_error([] { normkit::DyT<float> d(-1); }, "DyT: channels must be >= 0, got -1");
  expect_error([] { normkit::DyT<float> d(4, normkit::DyTOptions().alpha_init(std::nan(""))); },
               "DyT: alpha_init must be finite, got nan");
  expect_error([] { normkit::DyT<float> d(4, normkit::DyTOptions().alpha_init(INFINITY)); },
               "DyT: alpha_init must be finite, got inf");
  expect_error([] { normkit::dyt_alpha_init_llm(0, normkit::DyTPosition::Other); },
               "dyt_alpha_init_llm: width must be > 0, got 0");
}

}  // namespace
