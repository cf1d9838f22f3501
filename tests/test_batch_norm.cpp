// BatchNorm: a typed suite over {float, double} x {RowMajor, ColMajor} against a
// long-double scalar reference written from the formulas, finite differences in double
// (train and eval mode), thread counts, running statistics over several steps, numerics,
// half/bfloat16, synchronized statistics through an in-process reducer, and errors.
#include <normkit/normkit.hpp>

#include <condition_variable>
#include <limits>
#include <mutex>
#include <thread>

#include "test_support.hpp"

namespace {

using nktest::Index;
using nktest::all_equal;
using nktest::error_of;
using nktest::LD;
using Vec = std::vector<double>;

// ---- the reference: logical (row-major) data viewed as [P, C, Q] around the axis ------

struct Geo {
  long P = 1, C = 1, Q = 1;
  long n() const { return P * Q; }
  std::size_t at(long p, long c, long q) const { return static_cast<std::size_t>((p * C + c) * Q + q); }
};

Geo geo_of(const std::vector<Index>& dims, int axis) {
  const int rank = static_cast<int>(dims.size());
  if (axis < 0) axis += rank;
  Geo g;
  g.C = dims[static_cast<std::size_t>(axis)];
  for (int i = 0; i < axis; ++i) g.P *= dims[static_cast<std::size_t>(i)];
  for (int i = axis + 1; i < rank; ++i) g.Q *= dims[static_cast<std::size_t>(i)];
  return g;
}

struct RefStats {
  std::vector<LD> mean, var;  // var biased
};

RefStats ref_batch_stats(const Vec& x, const Geo& g) {
  RefStats s;
  s.mean.assign(static_cast<std::size_t>(g.C), 0);
  s.var.assign(static_cast<std::size_t>(g.C), 0);
  for (long c = 0; c < g.C; ++c) {
    LD m = 0;
    for (long p = 0; p < g.P; ++p)
      for (long q = 0; q < g.Q; ++q) m += x[g.at(p, c, q)];
    m /= g.n();
    LD v = 0;
    for (long p = 0; p < g.P; ++p)
      for (long q = 0; q < g.Q; ++q) v += (x[g.at(p, c, q)] - m) * (x[g.at(p, c, q)] - m);
    s.mean[static_cast<std::size_t>(c)] = m;
    s.var[static_cast<std::size_t>(c)] = v / g.n();
  }
  return s;
}

/// y = (x - mean) / sqrt(var + eps) * w + b with the given per-channel statistics.
std::vector<LD> ref_normalize(const Vec& x, const Geo& g, const RefStats& s, LD eps, const Vec* w,
                              const Vec* b) {
  std::vector<LD> y(x.size());
  for (long p = 0; p < g.P; ++p)
    for (long c = 0; c < g.C; ++c) {
      const std::size_t k = static_cast<std::size_t>(c);
      const LD r = 1.0L / std::sqrt(s.var[k] + eps);
      for (long q = 0; q < g.Q; ++q) {
        LD v = (x[g.at(p, c, q)] - s.mean[k]) * r;
        if (w) v *= (*w)[k];
        if (b) v += (*b)[k];
        y[g.at(p, c, q)] = v;
      }
    }
  return y;
}

struct RefGrads {
  std::vector<LD> dx, dweight, dbias;
};

/// batch: dx = w * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)); eval: dx = w * rstd * dy.
RefGrads ref_backward(bool batch, const Vec& x, const Vec& dy, const Geo& g, const RefStats& s, LD eps,
                      const Vec* w) {
  RefGrads r;
  r.dx.assign(x.size(), 0);
  r.dweight.assign(static_cast<std::size_t>(g.C), 0);
  r.dbias.assign(static_cast<std::size_t>(g.C), 0);
  for (long c = 0; c < g.C; ++c) {
    const std::size_t k = static_cast<std::size_t>(c);
    const LD rs = 1.0L / std::sqrt(s.var[k] + eps), wc = w ? (*w)[k] : 1.0L;
    LD sdy = 0, sdyx = 0;
    for (long p = 0; p < g.P; ++p)
      for (long q = 0; q < g.Q; ++q) {
        const std::size_t i = g.at(p, c, q);
        sdy += dy[i];
        sdyx += dy[i] * (x[i] - s.mean[k]) * rs;
      }
    r.dweight[k] = sdyx;
    r.dbias[k] = sdy;
    for (long p = 0; p < g.P; ++p)
      for (long q = 0; q < g.Q; ++q) {
        const std::size_t i = g.at(p, c, q);
        const LD xh = (x[i] - s.mean[k]) * rs;
        r.dx[i] = batch ? wc * rs * (dy[i] - sdy / g.n() - xh * sdyx / g.n()) : wc * rs * dy[i];
      }
  }
  return r;
}

/// One step of PyTorch's running-statistics update (f = momentum, or 1 / steps).
void ref_update(std::vector<LD>& rm, std::vector<LD>& rv, const RefStats& s, long n, LD f) {
  for (std::size_t c = 0; c < rm.size(); ++c) {
    rm[c] = (1 - f) * rm[c] + f * s.mean[c];
    rv[c] = (1 - f) * rv[c] + f * s.var[c] * n / (n - 1);
  }
}

// ---- helpers ------------------------------------------------------------------------

/// Calls f(std::integral_constant<int, R>{}) for R = rank in 2..5.
template <class F>
void with_rank(std::size_t rank, F&& f) {
  switch (rank) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: FAIL() << "rank " << rank << " not covered";
  }
}

template <class T>
Vec values_of(const Eigen::Tensor<T, 1>& p) {
  Vec v(static_cast<std::size_t>(p.size()));
  for (Index i = 0; i < p.size(); ++i) v[static_cast<std::size_t>(i)] = static_cast<double>(p(i));
  return v;
}

template <class T>
void set_values(Eigen::Tensor<T, 1>& p, const Vec& v) {
  for (Index i = 0; i < p.size(); ++i) p(i) = static_cast<T>(v[static_cast<std::size_t>(i)]);
}

template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

LD max_abs(const std::vector<LD>& v) {
  LD m = 1;
  for (LD e : v) m = std::max(m, std::fabs(e));
  return m;
}

template <class T, int L>
struct Cfg {
  using Scalar = T;
  static constexpr int layout = L;
  static constexpr double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
};

template <class C>
class BatchNormTest : public ::testing::Test {};

using Configs = ::testing::Types<Cfg<float, Eigen::RowMajor>, Cfg<float, Eigen::ColMajor>,
                                 Cfg<double, Eigen::RowMajor>, Cfg<double, Eigen::ColMajor>>;

struct CfgNames {
  template <class C>
  static std::string GetName(int) {
    return std::string(std::is_same_v<typename C::Scalar, float> ? "Float" : "Double") +
           (C::layout == Eigen::RowMajor ? "RowMajor" : "ColMajor");
  }
};
TYPED_TEST_SUITE(BatchNormTest, Configs, CfgNames);

// Shapes and channel axes: (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W), channels-last,
// other axes; sizes 1, odd, below a SIMD vector, rows long enough for the row path (>= 32)
// and for more than one segment (> 2048), more rows than one column chunk (64).
struct Case {
  std::vector<Index> dims;
  int axis;
};
const std::vector<Case> kGrid = {
    {{2, 3}, 1},          {{5, 1}, 1},         {{3, 7}, 1},           {{9, 4}, 1},
    {{17, 3}, 1},         {{100, 5}, 1},       {{130, 9}, 1},         {{2, 3, 7}, 1},
    {{3, 5, 33}, 1},      {{1, 2, 40}, 1},     {{2, 4, 100}, 1},      {{1, 3, 2}, 1},
    {{2, 3, 4, 5}, 1},    {{3, 2, 9, 7}, 1},   {{2, 3, 17, 3}, 1},    {{2, 5, 3, 3}, 3},
    {{4, 3, 3, 17}, -1},  {{3, 4, 5}, 2},      {{7, 2, 3}, 0},        {{2, 3, 2, 2, 3}, 1},
    {{2, 2, 3, 3, 4}, -1}, {{2, 2, 2100}, 1},  {{70, 2, 3}, 1},
    // short rows summed a channel's piece at a time: three runs a piece (small enough for
    // the finite differences); two pieces a channel, of four runs and three, with four
    // channels summed at once and one alone
    {{3, 1, 40}, 1},      {{7, 5, 401}, 1},
    // (N, C) wider than one column-path work item (512) with row chunks not a multiple
    // of the 4 rows summed at once
    {{261, 530}, 1},
};

std::string where_of(const Case& c) {
  return "shape " + normkit::detail::shape_str(c.dims) + " axis " + std::to_string(c.axis);
}

template <class T>
normkit::BatchNorm<T> make_layer(const Case& c, const Geo& g, double eps = 1e-5) {
  normkit::BatchNorm<T> bn(g.C, normkit::BatchNormOptions().eps(eps).channel_axis(c.axis));
  set_values(bn.weight(), nktest::quantized<T>(nktest::random_vector(g.C, 11, 0.5, 1.5)));
  set_values(bn.bias(), nktest::quantized<T>(nktest::random_vector(g.C, 12)));
  return bn;
}

TYPED_TEST(BatchNormTest, TrainForwardMatchesLongDoubleReference) {
  using C = TypeParam;
  using T = typename C::Scalar;
  for (const Case& c : kGrid) {
    with_rank(c.dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      const Geo g = geo_of(c.dims, c.axis);
      auto bn = make_layer<T>(c, g);
      const Vec w = values_of(bn.weight()), b = values_of(bn.bias());
      const Vec xs = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 13, -1, 3));
      auto x = nktest::make_tensor<T, R, C::layout>(c.dims, xs);
      decltype(x) y(x.dimensions());
      typename normkit::BatchNorm<T>::Cache cache;
      bn.forward(x, y, cache);
      const RefStats s = ref_batch_stats(xs, g);
      const std::string where = where_of(c);
      nktest::expect_close(nktest::logical(y), ref_normalize(xs, g, s, 1e-5L, &w, &b), C::tol * 4, C::tol,
                           "y, " + where);
      std::vector<LD> rstd(s.var.size());
      for (std::size_t k = 0; k < rstd.size(); ++k) rstd[k] = 1.0L / std::sqrt(s.var[k] + 1e-5L);
      nktest::expect_close(nktest::values(cache.mean), s.mean, C::tol, C::tol, "mean, " + where);
      nktest::expect_close(nktest::values(cache.invstd), rstd, 0, C::tol, "invstd, " + where);
      std::vector<LD> rm(s.mean.size(), 0), rv(s.mean.size(), 1);
      ref_update(rm, rv, s, g.n(), 0.1L);
      nktest::expect_close(nktest::values(bn.running_mean()), rm, C::tol, C::tol, "running_mean, " + where);
      nktest::expect_close(nktest::values(bn.running_var()), rv, C::tol, C::tol, "running_var, " + where);
      EXPECT_EQ(bn.num_batches_tracked(), 1);
      EXPECT_TRUE(cache.batch_stats);

      // forward(x, y) without a cache normalizes with the batch statistics too (and
      // updates the running statistics once more, as a PyTorch module call does).
      decltype(x) y2(x.dimensions());
      bn.forward(x, y2);
      EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(y), nktest::logical(y2))) << where;
      EXPECT_EQ(bn.num_batches_tracked(), 2);
    });
  }
}

TYPED_TEST(BatchNormTest, TrainBackwardMatchesLongDoubleReference) {
  using C = TypeParam;
  using T = typename C::Scalar;
  for (const Case& c : kGrid) {
    with_rank(c.dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      const Geo g = geo_of(c.dims, c.axis);
      auto bn = make_layer<T>(c, g);
      const Vec w = values_of(bn.weight());
      const Vec xs = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 22));
      const Vec dys = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 23));
      auto x = nktest::make_tensor<T, R, C::layout>(c.dims, xs);
      auto dy = nktest::make_tensor<T, R, C::layout>(c.dims, dys);
      decltype(x) y(x.dimensions()), dx(x.dimensions());
      typename normkit::BatchNorm<T>::Cache cache;
      typename normkit::BatchNorm<T>::Grads grads;
      bn.forward(x, y, cache);
      bn.backward(x, dy, cache, dx, grads);
      const RefGrads want = ref_backward(true, xs, dys, g, ref_batch_stats(xs, g), 1e-5L, &w);
      const std::string where = where_of(c);
      nktest::expect_close(nktest::logical(dx), want.dx, C::tol * 8 * max_abs(want.dx), C::tol, "dx, " + where);
      nktest::expect_close(nktest::values(grads.weight), want.dweight, C::tol * 8 * max_abs(want.dweight), C::tol,
                           "dweight, " + where);
      nktest::expect_close(nktest::values(grads.bias), want.dbias, C::tol * 8 * max_abs(want.dbias), C::tol,
                           "dbias, " + where);
    });
  }
}

TYPED_TEST(BatchNormTest, EvalForwardAndBackwardMatchLongDoubleReference) {
  using C = TypeParam;
  using T = typename C::Scalar;
  for (const Case& c : kGrid) {
    with_rank(c.dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      const Geo g = geo_of(c.dims, c.axis);
      auto bn = make_layer<T>(c, g);
      set_values(bn.running_mean(), nktest::quantized<T>(nktest::random_vector(g.C, 31)));
      set_values(bn.running_var(), nktest::quantized<T>(nktest::random_vector(g.C, 32, 0.2, 3)));
      bn.eval();
      EXPECT_FALSE(bn.is_training());
      const Vec w = values_of(bn.weight()), b = values_of(bn.bias());
      RefStats s;
      for (double v : values_of(bn.running_mean())) s.mean.push_back(v);
      for (double v : values_of(bn.running_var())) s.var.push_back(v);
      const Vec xs = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 33));
      const Vec dys = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 34));
      auto x = nktest::make_tensor<T, R, C::layout>(c.dims, xs);
      auto dy = nktest::make_tensor<T, R, C::layout>(c.dims, dys);
      decltype(x) y(x.dimensions()), dx(x.dimensions());
      typename normkit::BatchNorm<T>::Cache cache;
      typename normkit::BatchNorm<T>::Grads grads;
      bn.forward(x, y, cache);
      bn.backward(x, dy, cache, dx, grads);
      const std::string where = where_of(c);
      nktest::expect_close(nktest::logical(y), ref_normalize(xs, g, s, 1e-5L, &w, &b), C::tol * 4, C::tol,
                           "y, " + where);
      const RefGrads want = ref_backward(false, xs, dys, g, s, 1e-5L, &w);
      nktest::expect_close(nktest::logical(dx), want.dx, C::tol * 8 * max_abs(want.dx), C::tol, "dx, " + where);
      nktest::expect_close(nktest::values(grads.weight), want.dweight, C::tol * 8 * max_abs(want.dweight), C::tol,
                           "dweight, " + where);
      nktest::expect_close(nktest::values(grads.bias), want.dbias, C::tol * 8 * max_abs(want.dbias), C::tol,
                           "dbias, " + where);
      EXPECT_EQ(bn.num_batches_tracked(), 0) << "eval must not touch the running statistics";
      EXPECT_FALSE(cache.batch_stats);
    });
  }
}

// Central differences in double of L = sum(y * r), in training mode (through the batch
// statistics) and in eval mode, for dx, dweight and dbias.
TYPED_TEST(BatchNormTest, BackwardMatchesFiniteDifference) {
  using C = TypeParam;
  if constexpr (std::is_same_v<typename C::Scalar, double>) {
    for (bool training : {true, false}) {
      for (const Case& c : kGrid) {
        const Geo g = geo_of(c.dims, c.axis);
        if (g.P * g.C * g.Q > 130) continue;
        with_rank(c.dims.size(), [&](auto rank) {
          constexpr int R = decltype(rank)::value;
          auto bn = make_layer<double>(c, g, 1e-3);
          set_values(bn.running_mean(), nktest::random_vector(g.C, 35));
          set_values(bn.running_var(), nktest::random_vector(g.C, 36, 0.2, 3));
          bn.train(training);
          const Vec xs = nktest::random_vector(g.P * g.C * g.Q, 37);
          const Vec rs = nktest::random_vector(g.P * g.C * g.Q, 38);
          auto x = nktest::make_tensor<double, R, C::layout>(c.dims, xs);
          auto r = nktest::make_tensor<double, R, C::layout>(c.dims, rs);
          decltype(x) y(x.dimensions()), dx(x.dimensions());
          normkit::BatchNorm<double>::Cache cache;
          normkit::BatchNorm<double>::Grads grads;
          bn.forward(x, y, cache);
          bn.backward(x, r, cache, dx, grads);
          auto loss = [&](const Vec& xv) {
            auto xt = nktest::make_tensor<double, R, C::layout>(c.dims, xv);
            decltype(xt) yt(xt.dimensions());
            bn.forward(xt, yt);
            const auto yl = nktest::logical(yt);
            LD s = 0;
            for (std::size_t i = 0; i < yl.size(); ++i) s += static_cast<LD>(yl[i]) * rs[i];
            return s;
          };
          const double h = 1e-6;
          Vec fd(xs.size());
          for (std::size_t i = 0; i < xs.size(); ++i) {
            Vec xp = xs, xm = xs;
            xp[i] += h;
            xm[i] -= h;
            fd[i] = static_cast<double>((loss(xp) - loss(xm)) / (2 * h));
          }
          const std::string where = where_of(c) + (training ? " train" : " eval");
          nktest::expect_close(nktest::logical(dx), fd, 2e-6, 1e-6, "dx vs FD, " + where);
          auto param_fd = [&](Eigen::Tensor<double, 1>& p) {
            Vec out(static_cast<std::size_t>(p.size()));
            for (Index i = 0; i < p.size(); ++i) {
              const double keep = p(i);
              p(i) = keep + h;
              const LD lp = loss(xs);
              p(i) = keep - h;
              const LD lm = loss(xs);
              p(i) = keep;
              out[static_cast<std::size_t>(i)] = static_cast<double>((lp - lm) / (2 * h));
            }
            return out;
          };
          nktest::expect_close(nktest::values(grads.weight), param_fd(bn.weight()), 2e-6, 1e-6, "dweight vs FD, " + where);
          nktest::expect_close(nktest::values(grads.bias), param_fd(bn.bias()), 2e-6, 1e-6, "dbias vs FD, " + where);
        });
      }
    }
  }
}

TYPED_TEST(BatchNormTest, ThreadCountsGiveBitwiseEqualResults) {
  using C = TypeParam;
  using T = typename C::Scalar;
  using Acc = typename normkit::BatchNorm<T>::Acc;
  // Row path with several segments, NCHW, column path with several blocks, channels-last.
  for (const Case& c : {Case{{3, 4, 5000}, 1}, Case{{8, 16, 9, 9}, 1}, Case{{9, 6, 300}, 1}, Case{{4000, 19}, 1},
                        Case{{50, 7, 7, 24}, -1}, Case{{1030, 530}, 1}, Case{{20000, 5}, 1}}) {
    with_rank(c.dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      const Geo g = geo_of(c.dims, c.axis);
      const Index n = g.P * g.C * g.Q;
      auto x = nktest::make_tensor<T, R, C::layout>(c.dims, nktest::random_vector(n, 41));
      auto dy = nktest::make_tensor<T, R, C::layout>(c.dims, nktest::random_vector(n, 42));
      for (bool training : {true, false}) {
        std::vector<T> y1, dx1, dw1, db1, rm1, rv1;
        std::vector<Acc> m1, s1;
        for (int threads : {1, 2, 3, 7}) {
          auto bn = make_layer<T>(c, g);
          bn.train(training);
          nktest::on_threads(threads, [&](const auto& dev) {
            decltype(x) y(x.dimensions()), dx(x.dimensions());
            typename normkit::BatchNorm<T>::Cache cache;
            typename normkit::BatchNorm<T>::Grads grads;
            bn.forward(dev, x, y, cache);
            bn.backward(dev, x, dy, cache, dx, grads);
            if (threads == 1) {
              y1 = nktest::logical(y);
              dx1 = nktest::logical(dx);
              dw1 = nktest::values(grads.weight);
              db1 = nktest::values(grads.bias);
              rm1 = nktest::values(bn.running_mean());
              rv1 = nktest::values(bn.running_var());
              m1 = nktest::values(cache.mean);
              s1 = nktest::values(cache.invstd);
              return;
            }
            const std::string where = where_of(c) + ", " + std::to_string(threads) + " threads" +
                                      (training ? ", train" : ", eval");
            EXPECT_TRUE(nktest::bitwise_equal(y1, nktest::logical(y))) << "y, " << where;
            EXPECT_TRUE(nktest::bitwise_equal(dx1, nktest::logical(dx))) << "dx, " << where;
            EXPECT_TRUE(nktest::bitwise_equal(dw1, nktest::values(grads.weight))) << "dweight, " << where;
            EXPECT_TRUE(nktest::bitwise_equal(db1, nktest::values(grads.bias))) << "dbias, " << where;
            EXPECT_TRUE(nktest::bitwise_equal(rm1, nktest::values(bn.running_mean()))) << where;
            EXPECT_TRUE(nktest::bitwise_equal(rv1, nktest::values(bn.running_var()))) << where;
            EXPECT_TRUE(nktest::bitwise_equal(m1, nktest::values(cache.mean))) << where;
            EXPECT_TRUE(nktest::bitwise_equal(s1, nktest::values(cache.invstd))) << where;
          });
        }
      }
    });
  }
}

/// Sets the input bytes per channel group of BatchNorm's row path for its lifetime.
struct GroupBytes {
  double saved = normkit::detail::group_bytes();
  explicit GroupBytes(double bytes) { normkit::detail::group_bytes() = bytes; }
  ~GroupBytes() { normkit::detail::group_bytes() = saved; }
};

// Without a reducer, the row path (NCHW) runs statistics and map a group of channels at
// a time (this binary is built with NORMKIT_GROUP_BYTES=1: groups of one channel), and on
// a pool with at least 2 channels per thread the groups run in parallel. Each channel's
// results must be the same bits in groups of one channel as in one group of all, in
// training and in eval mode, on one thread and on pools of 2 and 3.
TYPED_TEST(BatchNormTest, ChannelGroupsGiveTheBitsOfOneGroup) {
  using C = TypeParam;
  using T = typename C::Scalar;
  using Acc = typename normkit::BatchNorm<T>::Acc;
  // Row path in row-major layout, then in column-major (the first dims are the rows).
  for (const Case& c : {Case{{3, 5, 33}, 1}, Case{{2, 4, 7, 9}, 1}, Case{{2, 3, 2100}, 1}, Case{{3, 6, 40}, 1},
                        Case{{9, 6, 300}, 1},
                        Case{{2, 3, 5, 40}, 2}, Case{{40, 4, 3}, 1}, Case{{33, 3, 2, 2}, 1}, Case{{5, 7, 9, 2}, 2}}) {
    with_rank(c.dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      const Geo g = geo_of(c.dims, c.axis);
      const Index n = g.P * g.C * g.Q;
      auto x = nktest::make_tensor<T, R, C::layout>(c.dims, nktest::random_vector(n, 47, -1, 3));
      auto dy = nktest::make_tensor<T, R, C::layout>(c.dims, nktest::random_vector(n, 48));
      for (bool training : {true, false})
        for (int threads : {1, 2, 3}) {
          auto grouped = make_layer<T>(c, g), whole = make_layer<T>(c, g);
          for (auto* bn : {&grouped, &whole}) {
            set_values(bn->running_mean(), nktest::random_vector(g.C, 49));
            set_values(bn->running_var(), nktest::random_vector(g.C, 50, 0.2, 3));
            bn->train(training);
          }
          std::vector<T> y[2], dx[2], dw[2], db[2], rm[2], rv[2];
          std::vector<Acc> m[2], s[2];
          nktest::on_threads(threads, [&](const auto& dev) {
            int k = 0;
            for (auto* bn : {&grouped, &whole}) {
              const GroupBytes bytes(bn == &grouped ? 1.0 : 1e300);
              decltype(x) yk(x.dimensions()), dxk(x.dimensions());
              typename normkit::BatchNorm<T>::Cache cache;
              typename normkit::BatchNorm<T>::Grads grads;
              bn->forward(dev, x, yk, cache);
              bn->backward(dev, x, dy, cache, dxk, grads);
              y[k] = nktest::logical(yk);
              dx[k] = nktest::logical(dxk);
              dw[k] = nktest::values(grads.weight);
              db[k] = nktest::values(grads.bias);
              rm[k] = nktest::values(bn->running_mean());
              rv[k] = nktest::values(bn->running_var());
              m[k] = nktest::values(cache.mean);
              s[k] = nktest::values(cache.invstd);
              ++k;
            }
          });
          const std::string where =
              where_of(c) + ", " + std::to_string(threads) + " threads" + (training ? ", train" : ", eval");
          EXPECT_TRUE(nktest::bitwise_equal(y[0], y[1])) << "y, " << where;
          EXPECT_TRUE(nktest::bitwise_equal(dx[0], dx[1])) << "dx, " << where;
          EXPECT_TRUE(nktest::bitwise_equal(dw[0], dw[1])) << "dweight, " << where;
          EXPECT_TRUE(nktest::bitwise_equal(db[0], db[1])) << "dbias, " << where;
          EXPECT_TRUE(nktest::bitwise_equal(rm[0], rm[1])) << "running_mean, " << where;
          EXPECT_TRUE(nktest::bitwise_equal(rv[0], rv[1])) << "running_var, " << where;
          EXPECT_TRUE(nktest::bitwise_equal(m[0], m[1])) << "mean, " << where;
          EXPECT_TRUE(nktest::bitwise_equal(s[0], s[1])) << "invstd, " << where;
          EXPECT_FALSE(y[0].empty());
        }
    });
  }
}

// Several training steps with different batches, then eval: momentum 0.1, 0, 1 and the
// cumulative average (momentum std::nullopt).
TYPED_TEST(BatchNormTest, RunningStatisticsOverSeveralSteps) {
  using C = TypeParam;
  using T = typename C::Scalar;
  const Case c{{4, 3, 5, 2}, 1};
  const Geo g = geo_of(c.dims, c.axis);
  for (std::optional<double> momentum : {std::optional<double>(0.1), std::optional<double>(0.0),
                                         std::optional<double>(1.0), std::optional<double>()}) {
    normkit::BatchNorm<T> bn(g.C, normkit::BatchNormOptions().momentum(momentum));
    std::vector<LD> rm(static_cast<std::size_t>(g.C), 0), rv(static_cast<std::size_t>(g.C), 1);
    for (int step = 1; step <= 5; ++step) {
      const Vec xs = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 50 + step, -step, 2 * step));
      auto x = nktest::make_tensor<T, 4, C::layout>(c.dims, xs);
      decltype(x) y(x.dimensions());
      bn.forward(x, y);
      ref_update(rm, rv, ref_batch_stats(xs, g), g.n(), momentum ? LD(*momentum) : 1.0L / step);
      const std::string where = "step " + std::to_string(step) + " momentum " +
                                (momentum ? std::to_string(*momentum) : std::string("none"));
      nktest::expect_close(nktest::values(bn.running_mean()), rm, C::tol * 4, C::tol * 4, "running_mean, " + where);
      nktest::expect_close(nktest::values(bn.running_var()), rv, C::tol * 4, C::tol * 4, "running_var, " + where);
      EXPECT_EQ(bn.num_batches_tracked(), step);
    }
    // Eval normalizes with the running statistics.
    bn.eval();
    const Vec xs = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 60));
    auto x = nktest::make_tensor<T, 4, C::layout>(c.dims, xs);
    decltype(x) y(x.dimensions());
    bn.forward(x, y);
    RefStats s;
    for (double v : values_of(bn.running_mean())) s.mean.push_back(v);
    for (double v : values_of(bn.running_var())) s.var.push_back(v);
    nktest::expect_close(nktest::logical(y), ref_normalize(xs, g, s, 1e-5L, nullptr, nullptr), C::tol * 4, C::tol,
                         "eval y");
    EXPECT_EQ(bn.num_batches_tracked(), 5);
  }
}

TYPED_TEST(BatchNormTest, WithoutRunningStatsEvalUsesBatchStatistics) {
  using C = TypeParam;
  using T = typename C::Scalar;
  const Case c{{6, 4, 7}, 1};
  const Geo g = geo_of(c.dims, c.axis);
  normkit::BatchNorm<T> bn(4, normkit::BatchNormOptions().track_running_stats(false).affine(false));
  EXPECT_EQ(bn.running_mean().size(), 0);
  EXPECT_EQ(bn.running_var().size(), 0);
  EXPECT_EQ(bn.weight().size(), 0);
  EXPECT_EQ(bn.bias().size(), 0);
  const Vec xs = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 61));
  const Vec dys = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 62));
  auto x = nktest::make_tensor<T, 3, C::layout>(c.dims, xs);
  auto dy = nktest::make_tensor<T, 3, C::layout>(c.dims, dys);
  const RefStats s = ref_batch_stats(xs, g);
  const RefGrads want = ref_backward(true, xs, dys, g, s, 1e-5L, nullptr);
  for (bool training : {true, false}) {
    bn.train(training);
    decltype(x) y(x.dimensions()), dx(x.dimensions());
    typename normkit::BatchNorm<T>::Cache cache;
    typename normkit::BatchNorm<T>::Grads grads;
    bn.forward(x, y, cache);
    bn.backward(x, dy, cache, dx, grads);
    nktest::expect_close(nktest::logical(y), ref_normalize(xs, g, s, 1e-5L, nullptr, nullptr), C::tol * 4, C::tol, "y");
    nktest::expect_close(nktest::logical(dx), want.dx, C::tol * 8 * max_abs(want.dx), C::tol, "dx");
    EXPECT_EQ(grads.weight.size(), 0);
    EXPECT_EQ(grads.bias.size(), 0);
    EXPECT_EQ(bn.num_batches_tracked(), 0);
  }
}

TYPED_TEST(BatchNormTest, InPlaceForwardAndBackward) {
  using C = TypeParam;
  using T = typename C::Scalar;
  for (const Case& c : {Case{{3, 5, 40}, 1}, Case{{20, 3, 3}, -1}}) {
    const Geo g = geo_of(c.dims, c.axis);
    const Vec xs = nktest::random_vector(g.P * g.C * g.Q, 71), dys = nktest::random_vector(g.P * g.C * g.Q, 72);
    auto x = nktest::make_tensor<T, 3, C::layout>(c.dims, xs);
    auto dy = nktest::make_tensor<T, 3, C::layout>(c.dims, dys);
    auto bn1 = make_layer<T>(c, g), bn2 = make_layer<T>(c, g);
    decltype(x) y(x.dimensions()), dx(x.dimensions());
    typename normkit::BatchNorm<T>::Cache cache, cache2;
    typename normkit::BatchNorm<T>::Grads grads, grads2;
    bn1.forward(x, y, cache);
    bn1.backward(x, dy, cache, dx, grads);
    auto xi = x;
    bn2.forward(xi, xi, cache2);
    EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(y), nktest::logical(xi))) << "y == x";
    auto dyi = dy;
    bn2.backward(x, dyi, cache2, dyi, grads2);
    EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(dx), nktest::logical(dyi))) << "dx == dy";
    auto xj = x;
    bn2.backward(xj, dy, cache2, xj, grads2);
    EXPECT_TRUE(nktest::bitwise_equal(nktest::logical(dx), nktest::logical(xj))) << "dx == x";
    EXPECT_TRUE(nktest::bitwise_equal(nktest::values(grads.weight), nktest::values(grads2.weight)));
  }
}

TYPED_TEST(BatchNormTest, GradientsAreOverwrittenNotAccumulated) {
  using C = TypeParam;
  using T = typename C::Scalar;
  const Case c{{5, 3, 4}, 1};
  const Geo g = geo_of(c.dims, c.axis);
  auto bn = make_layer<T>(c, g);
  auto x = nktest::make_tensor<T, 3, C::layout>(c.dims, nktest::random_vector(60, 73));
  auto dy = nktest::make_tensor<T, 3, C::layout>(c.dims, nktest::random_vector(60, 74));
  decltype(x) y(x.dimensions()), dx(x.dimensions());
  typename normkit::BatchNorm<T>::Cache cache;
  typename normkit::BatchNorm<T>::Grads grads;
  bn.forward(x, y, cache);
  bn.backward(x, dy, cache, dx, grads);
  const auto dw = nktest::values(grads.weight), db = nktest::values(grads.bias);
  bn.backward(x, dy, cache, dx, grads);
  EXPECT_TRUE(nktest::bitwise_equal(dw, nktest::values(grads.weight)));
  EXPECT_TRUE(nktest::bitwise_equal(db, nktest::values(grads.bias)));
}

TYPED_TEST(BatchNormTest, ChannelsLastEqualsChannelsFirst) {
  using C = TypeParam;
  using T = typename C::Scalar;
  // The same logical values as [N, C, H, W] (axis 1) and permuted to [N, H, W, C] (axis -1).
  const long N = 3, Ch = 5, H = 4, Wd = 6;
  const Vec xs = nktest::random_vector(N * Ch * H * Wd, 75), dys = nktest::random_vector(N * Ch * H * Wd, 76);
  Vec xl(xs.size()), dyl(xs.size());
  for (long n = 0; n < N; ++n)
    for (long c = 0; c < Ch; ++c)
      for (long h = 0; h < H; ++h)
        for (long w = 0; w < Wd; ++w) {
          const std::size_t f = static_cast<std::size_t>(((n * Ch + c) * H + h) * Wd + w);
          const std::size_t l = static_cast<std::size_t>(((n * H + h) * Wd + w) * Ch + c);
          xl[l] = xs[f];
          dyl[l] = dys[f];
        }
  normkit::BatchNorm<T> first(Ch), last(Ch, normkit::BatchNormOptions().channel_axis(-1));
  auto xf = nktest::make_tensor<T, 4, C::layout>({N, Ch, H, Wd}, xs);
  auto dyf = nktest::make_tensor<T, 4, C::layout>({N, Ch, H, Wd}, dys);
  auto xt = nktest::make_tensor<T, 4, C::layout>({N, H, Wd, Ch}, xl);
  auto dyt = nktest::make_tensor<T, 4, C::layout>({N, H, Wd, Ch}, dyl);
  decltype(xf) yf(xf.dimensions()), dxf(xf.dimensions());
  decltype(xt) yt(xt.dimensions()), dxt(xt.dimensions());
  typename normkit::BatchNorm<T>::Cache cf, ct;
  typename normkit::BatchNorm<T>::Grads gf, gt;
  first.forward(xf, yf, cf);
  last.forward(xt, yt, ct);
  first.backward(xf, dyf, cf, dxf, gf);
  last.backward(xt, dyt, ct, dxt, gt);
  const auto yfl = nktest::logical(yf), dxfl = nktest::logical(dxf);
  std::vector<T> yperm(yfl.size()), dxperm(yfl.size());
  for (long n = 0; n < N; ++n)
    for (long c = 0; c < Ch; ++c)
      for (long h = 0; h < H; ++h)
        for (long w = 0; w < Wd; ++w) {
          const std::size_t f = static_cast<std::size_t>(((n * Ch + c) * H + h) * Wd + w);
          const std::size_t l = static_cast<std::size_t>(((n * H + h) * Wd + w) * Ch + c);
          yperm[l] = yfl[f];
          dxperm[l] = dxfl[f];
        }
  nktest::expect_close(nktest::logical(yt), yperm, C::tol * 4, C::tol, "y");
  nktest::expect_close(nktest::logical(dxt), dxperm, C::tol * 8, C::tol, "dx");
  nktest::expect_close(nktest::values(gt.weight), nktest::values(gf.weight), C::tol * 64, C::tol, "dweight");
  nktest::expect_close(nktest::values(last.running_var()), nktest::values(first.running_var()), C::tol, C::tol,
                       "running_var");
}

TYPED_TEST(BatchNormTest, FoldGivesTheEvalAffineMap) {
  using C = TypeParam;
  using T = typename C::Scalar;
  const Case c{{4, 6, 3}, 1};
  const Geo g = geo_of(c.dims, c.axis);
  auto bn = make_layer<T>(c, g);
  set_values(bn.running_mean(), nktest::quantized<T>(nktest::random_vector(6, 81)));
  set_values(bn.running_var(), nktest::quantized<T>(nktest::random_vector(6, 82, 0.2, 3)));
  const auto f = bn.fold();
  ASSERT_EQ(f.scale.size(), 6);
  ASSERT_EQ(f.shift.size(), 6);
  const Vec w = values_of(bn.weight()), b = values_of(bn.bias()), rm = values_of(bn.running_mean()),
            rv = values_of(bn.running_var());
  std::vector<LD> scale(6), shift(6);
  for (std::size_t k = 0; k < 6; ++k) {
    scale[k] = w[k] / std::sqrt(LD(rv[k]) + 1e-5L);
    shift[k] = b[k] - rm[k] * scale[k];
  }
  nktest::expect_close(nktest::values(f.scale), scale, C::tol, C::tol, "scale");
  nktest::expect_close(nktest::values(f.shift), shift, C::tol, C::tol, "shift");
  // x * scale + shift is what eval forward computes.
  bn.eval();
  const Vec xs = nktest::quantized<T>(nktest::random_vector(g.P * g.C * g.Q, 83));
  auto x = nktest::make_tensor<T, 3, C::layout>(c.dims, xs);
  decltype(x) y(x.dimensions());
  bn.forward(x, y);
  std::vector<LD> want(xs.size());
  for (long p = 0; p < g.P; ++p)
    for (long ch = 0; ch < g.C; ++ch)
      for (long q = 0; q < g.Q; ++q) {
        const std::size_t i = g.at(p, ch, q), k = static_cast<std::size_t>(ch);
        want[i] = xs[i] * static_cast<LD>(f.scale(ch)) + static_cast<LD>(f.shift(ch));
        (void)k;
      }
  nktest::expect_close(nktest::logical(y), want, C::tol * 8, C::tol, "eval y vs folded");
}

TYPED_TEST(BatchNormTest, EmptyTensorIsANoOp) {
  using C = TypeParam;
  using T = typename C::Scalar;
  normkit::BatchNorm<T> bn(3);
  Eigen::Tensor<T, 3, C::layout> x(0, 3, 4), y(0, 3, 4), dx(0, 3, 4);
  typename normkit::BatchNorm<T>::Cache cache;
  typename normkit::BatchNorm<T>::Grads grads;
  bn.forward(x, y, cache);
  EXPECT_EQ(bn.num_batches_tracked(), 0);
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(bn.running_var()), std::vector<T>(3, T(1))));
  bn.backward(x, x, cache, dx, grads);
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(grads.weight), std::vector<T>(3, T(0))));
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(grads.bias), std::vector<T>(3, T(0))));
}

TYPED_TEST(BatchNormTest, AcceptsTensorMaps) {
  using C = TypeParam;
  using T = typename C::Scalar;
  normkit::BatchNorm<T> bn(5), bn2(5);
  auto x = nktest::make_tensor<T, 3, C::layout>({4, 5, 3}, nktest::random_vector(60, 84));
  decltype(x) y(x.dimensions());
  bn.forward(x, y);
  std::vector<T> out(60);
  Eigen::TensorMap<const Eigen::Tensor<T, 3, C::layout>> xm(x.data(), 4, 5, 3);
  bn2.forward(xm, Eigen::TensorMap<Eigen::Tensor<T, 3, C::layout>>(out.data(), 4, 5, 3));
  EXPECT_TRUE(nktest::bitwise_equal(std::vector<T>(y.data(), y.data() + 60), out));
}

// ---- numerics ------------------------------------------------------------------------

/// What one float training step of bn (forward, then backward) gives over x and dy of
/// logical dims `dims` in layout L (both given in row-major logical order), in the same
/// order.
struct FloatStep {
  std::vector<float> y, dx, dweight, dbias;
};

template <int L>
FloatStep float_train_step(normkit::BatchNorm<float>& bn, const std::vector<Index>& dims, const Vec& xs,
                           const Vec& dys) {
  FloatStep out;
  with_rank(dims.size(), [&](auto rank) {
    constexpr int R = decltype(rank)::value;
    const auto x = nktest::make_tensor<float, R, L>(dims, xs);
    const auto dy = nktest::make_tensor<float, R, L>(dims, dys);
    std::remove_const_t<decltype(x)> y(x.dimensions()), dx(x.dimensions());
    normkit::BatchNorm<float>::Cache cache;
    normkit::BatchNorm<float>::Grads grads;
    bn.forward(x, y, cache);
    bn.backward(x, dy, cache, dx, grads);
    out = {nktest::logical(y), nktest::logical(dx), nktest::values(grads.weight), nktest::values(grads.bias)};
  });
  return out;
}

// Mean 1e4, std 0.1 per channel: float must normalize to within float rounding of the
// spread, in training (batch statistics) and eval (running statistics) mode.
template <int L>
void large_offset_case(const std::vector<Index>& dims, int axis) {
  const Geo g = geo_of(dims, axis);
  Vec xs = nktest::random_vector(g.P * g.C * g.Q, 91, -0.17, 0.17);
  for (long p = 0; p < g.P; ++p)
    for (long c = 0; c < g.C; ++c)
      for (long q = 0; q < g.Q; ++q) xs[g.at(p, c, q)] += 1e4 + 100.0 * c;
  xs = nktest::quantized<float>(xs);
  const Vec dys = nktest::quantized<float>(nktest::random_vector(g.P * g.C * g.Q, 92));
  normkit::BatchNorm<float> bn(g.C, normkit::BatchNormOptions().channel_axis(axis).momentum(1.0));
  const FloatStep got = float_train_step<L>(bn, dims, xs, dys);
  const RefStats s = ref_batch_stats(xs, g);
  nktest::expect_close(got.y, ref_normalize(xs, g, s, 1e-5L, nullptr, nullptr), 1e-4, 0, "train y");
  const RefGrads want = ref_backward(true, xs, dys, g, s, 1e-5L, nullptr);
  nktest::expect_close(got.dx, want.dx, 1e-4 * max_abs(want.dx), 0, "train dx");
  nktest::expect_close(got.dweight, want.dweight, 1e-4 * max_abs(want.dweight), 0, "dweight");
}

TEST(BatchNormNumericsTest, LargeOffsetNormalizesAccuratelyRowPath) {
  large_offset_case<Eigen::RowMajor>({4, 3, 600}, 1);
  large_offset_case<Eigen::ColMajor>({300, 3, 4}, 1);
}
TEST(BatchNormNumericsTest, LargeOffsetNormalizesAccuratelyColumnPath) {
  large_offset_case<Eigen::RowMajor>({500, 2, 2, 5}, -1);
  large_offset_case<Eigen::ColMajor>({5, 4, 300}, 1);
}

// More rows than 64 blocks of one chunk (128 rows) each: a block's later chunks are summed
// in one pass around the means of the chunk before, and go back to two passes where the
// data drift away from those means. Channels: plain, offset 1e4 with spread 0.1, a tiny
// spread, and (with drift) level jumps every 700 rows and a slow swing larger than the
// spread, so that some chunks take one pass and some two. RowMajor [20000, 4] with axis 1 is
// the column path, where the one-pass sums live; ColMajor makes the channel the outer axis
// (the row path) and checks the same data through the other kernels.
TEST(BatchNormNumericsTest, ChunksSummedInOnePassStayAccurate) {
  for (bool drift : {false, true}) {
    const std::vector<Index> dims{20000, 4};
    const Geo g = geo_of(dims, 1);
    Vec xs = nktest::random_vector(g.P * g.C * g.Q, 97);
    for (long p = 0; p < g.P; ++p) {
      xs[g.at(p, 1, 0)] = 1e4 + 0.1 * xs[g.at(p, 1, 0)];
      xs[g.at(p, 2, 0)] = 1.0 + 1e-3 * xs[g.at(p, 2, 0)];
      if (drift) {
        xs[g.at(p, 0, 0)] += (p / 700) % 2 ? 3.0 : -2.0;
        xs[g.at(p, 1, 0)] += std::sin(p / 300.0);
        xs[g.at(p, 3, 0)] += 1e3 * ((p / 2000) % 3);
      }
    }
    xs = nktest::quantized<float>(xs);
    const Vec dys = nktest::quantized<float>(nktest::random_vector(g.P * g.C * g.Q, 98));
    for (int layout = 0; layout < 2; ++layout) {
      normkit::BatchNorm<float> bn(g.C);
      Vec y, dx, dw;
      std::vector<float> rstd, mean;
      auto run = [&](auto x, auto dy) {
        decltype(x) yt(x.dimensions()), dxt(x.dimensions());
        normkit::BatchNorm<float>::Cache cache;
        normkit::BatchNorm<float>::Grads grads;
        bn.forward(x, yt, cache);
        bn.backward(x, dy, cache, dxt, grads);
        for (float v : nktest::logical(yt)) y.push_back(v);
        for (float v : nktest::logical(dxt)) dx.push_back(v);
        for (float v : nktest::values(grads.weight)) dw.push_back(v);
        mean = nktest::values(cache.mean);
        rstd = nktest::values(cache.invstd);
      };
      if (layout == 0)
        run(nktest::make_tensor<float, 2, Eigen::RowMajor>(dims, xs), nktest::make_tensor<float, 2, Eigen::RowMajor>(dims, dys));
      else
        run(nktest::make_tensor<float, 2, Eigen::ColMajor>(dims, xs), nktest::make_tensor<float, 2, Eigen::ColMajor>(dims, dys));
      const std::string where = std::string(drift ? "drifting" : "stationary") + (layout ? ", ColMajor" : ", RowMajor");
      const RefStats s = ref_batch_stats(xs, g);
      std::vector<LD> want_rstd;
      for (LD v : s.var) want_rstd.push_back(1.0L / std::sqrt(v + 1e-5L));
      nktest::expect_close(rstd, want_rstd, 0, 1e-5, "invstd, " + where);
      nktest::expect_close(mean, s.mean, 1e-6, 1e-6, "mean, " + where);
      nktest::expect_close(y, ref_normalize(xs, g, s, 1e-5L, nullptr, nullptr), 1e-4, 1e-5, "y, " + where);
      const RefGrads want = ref_backward(true, xs, dys, g, s, 1e-5L, nullptr);
      nktest::expect_close(dx, want.dx, 1e-4 * max_abs(want.dx), 1e-5, "dx, " + where);
      nktest::expect_close(dw, want.dweight, 1e-4 * max_abs(want.dweight), 1e-5, "dweight, " + where);
    }
  }
}

// An outlier as the first value of a channel must not spoil its variance (a shift by
// the first value alone, without a second pass, would cancel here).
TEST(BatchNormNumericsTest, OutlierFirstValueDoesNotSpoilTheVariance) {
  for (int path = 0; path < 2; ++path) {
    const std::vector<Index> dims = path ? std::vector<Index>{200, 3} : std::vector<Index>{2, 3, 100};
    const Geo g = geo_of(dims, 1);
    Vec xs = nktest::quantized<float>(nktest::random_vector(g.P * g.C * g.Q, 93));
    for (long c = 0; c < g.C; ++c) xs[g.at(0, c, 0)] = 3e4;
    normkit::BatchNorm<float> bn(g.C);
    with_rank(dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      auto x = nktest::make_tensor<float, R, Eigen::RowMajor>(dims, xs);
      decltype(x) y(x.dimensions());
      normkit::BatchNorm<float>::Cache cache;
      bn.forward(x, y, cache);
      const RefStats s = ref_batch_stats(xs, g);
      std::vector<LD> rstd;
      for (LD v : s.var) rstd.push_back(1.0L / std::sqrt(v + 1e-5L));
      nktest::expect_close(nktest::values(cache.invstd), rstd, 0, 1e-5, "invstd");
      nktest::expect_close(nktest::logical(y), ref_normalize(xs, g, s, 1e-5L, nullptr, nullptr), 1e-5, 1e-5, "y");
    });
  }
}

TEST(BatchNormNumericsTest, HugeFiniteValuesDoNotOverflow) {
  for (const std::vector<Index>& dims : {std::vector<Index>{2, 3, 50}, std::vector<Index>{40, 3}}) {
    const Geo g = geo_of(dims, 1);
    Vec xs = nktest::random_vector(g.P * g.C * g.Q, 94);
    for (auto& v : xs) v = static_cast<double>(static_cast<float>(v * 1e30));
    // dy of order 1 times xhat of order 1: dweight fits in float, dx ~ 1 / 1e30.
    const Vec dys = nktest::quantized<float>(nktest::random_vector(g.P * g.C * g.Q, 95));
    normkit::BatchNorm<float> bn(g.C);
    const FloatStep got = float_train_step<Eigen::RowMajor>(bn, dims, xs, dys);
    const RefStats s = ref_batch_stats(xs, g);
    nktest::expect_close(got.y, ref_normalize(xs, g, s, 1e-5L, nullptr, nullptr), 1e-4, 1e-4, "y");
    const RefGrads want = ref_backward(true, xs, dys, g, s, 1e-5L, nullptr);
    nktest::expect_close(got.dweight, want.dweight, 1e-4 * max_abs(want.dweight), 1e-4, "dweight");
    for (float v : got.dx) EXPECT_TRUE(std::isfinite(v));
  }
}

// A sum of dy past FLT_MAX while dx is not: dy in [0.5, 1] x 1e37, 50 values a row and
// 100 a channel (sum(dy) ~ 7.5e38), x of order 1, on the row path (2, 5, 50: a piece of
// two runs a channel, four channels summed as a group and one alone) and the column path
// (100, 3). Such sums are
// redone in double, and a channel whose coefficients still leave float goes through long
// double; either way dx and dweight stay finite and match the long-double reference
// (dbias, the sum itself, is +inf in float). With the redo in double switched off the
// long-double path alone still passes this: it checks the results, not which path.
TEST(BatchNormNumericsTest, SumsOfDyPastFloatLeaveDxFinite) {
  for (const std::vector<Index>& dims : {std::vector<Index>{2, 5, 50}, std::vector<Index>{100, 3}}) {
    const Geo g = geo_of(dims, 1);
    const Vec xs = nktest::quantized<float>(nktest::random_vector(g.P * g.C * g.Q, 101));
    Vec dys = nktest::random_vector(g.P * g.C * g.Q, 102, 0.5, 1.0);
    for (double& v : dys) v *= 1e37;
    dys = nktest::quantized<float>(dys);
    normkit::BatchNorm<float> bn(g.C);
    const FloatStep got = float_train_step<Eigen::RowMajor>(bn, dims, xs, dys);
    const std::string where = "shape " + normkit::detail::shape_str(dims);
    const RefGrads want = ref_backward(true, xs, dys, g, ref_batch_stats(xs, g), 1e-5L, nullptr);
    nktest::expect_close(got.dx, want.dx, 1e-4 * max_abs(want.dx), 0, "dx, " + where);
    nktest::expect_close(got.dweight, want.dweight, 1e-4 * max_abs(want.dweight), 0, "dweight, " + where);
    for (float v : got.dbias) EXPECT_EQ(v, std::numeric_limits<float>::infinity()) << where;
  }
}

TEST(BatchNormNumericsTest, NanStaysInItsChannel) {
  for (const Case& c : {Case{{3, 4, 40}, 1}, Case{{30, 4}, 1}}) {
    const Geo g = geo_of(c.dims, c.axis);
    Vec xs = nktest::random_vector(g.P * g.C * g.Q, 96);
    xs[g.at(1, 2, 0)] = std::numeric_limits<double>::quiet_NaN();
    normkit::BatchNorm<float> bn(g.C);
    with_rank(c.dims.size(), [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      auto x = nktest::make_tensor<float, R, Eigen::RowMajor>(c.dims, xs);
      decltype(x) y(x.dimensions());
      bn.forward(x, y);
      const auto yl = nktest::logical(y);
      for (long p = 0; p < g.P; ++p)
        for (long ch = 0; ch < g.C; ++ch)
          for (long q = 0; q < g.Q; ++q)
            EXPECT_EQ(std::isnan(yl[g.at(p, ch, q)]), ch == 2) << where_of(c);
      for (long ch = 0; ch < g.C; ++ch) EXPECT_EQ(std::isnan(bn.running_mean()(ch)), ch == 2);
    });
  }
}

template <class H>
void reduced_precision_case(double ulp) {
  const Case c{{4, 3, 37}, 1};
  const Geo g = geo_of(c.dims, c.axis);
  const Vec xs = nktest::quantized<H>(nktest::random_vector(g.P * g.C * g.Q, 97));
  const Vec dys = nktest::quantized<H>(nktest::random_vector(g.P * g.C * g.Q, 98));
  normkit::BatchNorm<H> bh(3);
  normkit::BatchNorm<float> bf(3);
  auto xh = nktest::make_tensor<H, 3, Eigen::RowMajor>(c.dims, xs);
  auto dyh = nktest::make_tensor<H, 3, Eigen::RowMajor>(c.dims, dys);
  auto xf = nktest::make_tensor<float, 3, Eigen::RowMajor>(c.dims, xs);
  auto dyf = nktest::make_tensor<float, 3, Eigen::RowMajor>(c.dims, dys);
  decltype(xh) yh(xh.dimensions()), dxh(xh.dimensions());
  decltype(xf) yf(xf.dimensions()), dxf(xf.dimensions());
  typename normkit::BatchNorm<H>::Cache ch;
  typename normkit::BatchNorm<H>::Grads gh;
  normkit::BatchNorm<float>::Cache cf;
  normkit::BatchNorm<float>::Grads gf;
  bh.forward(xh, yh, ch);
  bf.forward(xf, yf, cf);
  bh.backward(xh, dyh, ch, dxh, gh);
  bf.backward(xf, dyf, cf, dxf, gf);
  // Statistics in float: the only difference is the final rounding to H.
  nktest::expect_close(as_double(nktest::logical(yh)), as_double(nktest::logical(yf)), ulp * 4, ulp, "y");
  nktest::expect_close(as_double(nktest::logical(dxh)), as_double(nktest::logical(dxf)), ulp * 4, ulp, "dx");
  nktest::expect_close(as_double(nktest::values(ch.invstd)), as_double(nktest::values(cf.invstd)), 0, 1e-6, "invstd");
}

TEST(BatchNormNumericsTest, HalfStorageWithinHalfRoundingOfFloat) { reduced_precision_case<Eigen::half>(std::ldexp(1.0, -10)); }
TEST(BatchNormNumericsTest, BFloat16StorageWithinBFloat16RoundingOfFloat) {
  reduced_precision_case<Eigen::bfloat16>(std::ldexp(1.0, -7));
}

// ---- synchronized statistics, with threads standing in for processes ----------------

/// A StatsReducer over `ranks` threads of this process: every call waits for all of
/// them and returns the sum, added in rank order.
class ThreadReducerGroup {
 public:
  explicit ThreadReducerGroup(int ranks) : ranks_(ranks), parts_(static_cast<std::size_t>(ranks)) {}

  class Member : public normkit::StatsReducer {
   public:
    Member(ThreadReducerGroup* g, int rank) : g_(g), rank_(rank) {}
    void allreduce_sum(double* data, Index n) override { g_->reduce(rank_, data, n); }

   private:
    ThreadReducerGroup* g_;
    int rank_;
  };

 private:
  void reduce(int rank, double* data, Index n) {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = generation_;
    parts_[static_cast<std::size_t>(rank)].assign(data, data + n);
    if (++arrived_ == ranks_) {
      result_.assign(static_cast<std::size_t>(n), 0.0);
      for (const auto& p : parts_)
        for (std::size_t i = 0; i < p.size(); ++i) result_[i] += p[i];
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
    std::copy(result_.begin(), result_.begin() + n, data);
    // Nobody may start the next reduction before everyone has read this result.
    if (++read_ == ranks_) {
      read_ = 0;
      ++read_generation_;
      cv_.notify_all();
    } else {
      const long rg = read_generation_;
      cv_.wait(lock, [&] { return read_generation_ != rg; });
    }
  }

  int ranks_;
  std::vector<std::vector<double>> parts_;
  std::vector<double> result_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0, read_ = 0;
  long generation_ = 0, read_generation_ = 0;
};

/// Splits a [N, C, L] batch unevenly (N = sum of `split`, a part may be empty) over
/// threads with synchronized BatchNorm; every part must get the full-batch result.
template <int L>
void synchronized_case(const std::vector<long>& split, long C, long Lx, int axis) {
  long N = 0;
  for (long s : split) N += s;
  const int ranks = static_cast<int>(split.size());
  auto dims_of = [&](long n) { return axis == 1 ? std::vector<Index>{n, C, Lx} : std::vector<Index>{n, Lx, C}; };
  const Vec xs = nktest::random_vector(N * C * Lx, 101, -1, 3), dys = nktest::random_vector(N * C * Lx, 102);
  // The whole batch in one process.
  normkit::BatchNorm<double> full(C, normkit::BatchNormOptions().channel_axis(axis));
  set_values(full.weight(), nktest::random_vector(C, 103, 0.5, 1.5));
  auto x = nktest::make_tensor<double, 3, L>(dims_of(N), xs);
  auto dy = nktest::make_tensor<double, 3, L>(dims_of(N), dys);
  decltype(x) y(x.dimensions()), dx(x.dimensions());
  normkit::BatchNorm<double>::Cache cache;
  normkit::BatchNorm<double>::Grads grads;
  for (int step = 0; step < 2; ++step) full.forward(x, y, cache);
  full.backward(x, dy, cache, dx, grads);
  const auto yl = nktest::logical(y), dxl = nktest::logical(dx);

  ThreadReducerGroup group(ranks);
  std::vector<std::thread> threads;
  std::vector<std::string> failures(static_cast<std::size_t>(ranks));
  long first = 0;
  for (int r = 0; r < ranks; ++r) {
    const long n0 = first, nr = split[static_cast<std::size_t>(r)];
    first += nr;
    threads.emplace_back([&, r, n0, nr] {
      auto red = std::make_shared<ThreadReducerGroup::Member>(&group, r);
      normkit::BatchNorm<double> bn(C, normkit::BatchNormOptions().channel_axis(axis).reducer(red));
      bn.weight() = full.weight();
      const auto begin = xs.begin() + n0 * C * Lx, end = begin + nr * C * Lx;
      const auto dbegin = dys.begin() + n0 * C * Lx;
      auto xr = nktest::make_tensor<double, 3, L>(dims_of(nr), Vec(begin, end));
      auto dyr = nktest::make_tensor<double, 3, L>(dims_of(nr), Vec(dbegin, dbegin + nr * C * Lx));
      decltype(xr) yr(xr.dimensions()), dxr(xr.dimensions());
      normkit::BatchNorm<double>::Cache cr;
      normkit::BatchNorm<double>::Grads gr;
      for (int step = 0; step < 2; ++step) bn.forward(xr, yr, cr);
      bn.backward(xr, dyr, cr, dxr, gr);
      auto check = [&](const std::vector<double>& got, const std::vector<double>& want, const char* what) {
        for (std::size_t i = 0; i < got.size(); ++i)
          if (!(std::fabs(got[i] - want[i]) <= 1e-12 * (1 + std::fabs(want[i]))))
            failures[static_cast<std::size_t>(r)] += std::string(what) + " differs at " + std::to_string(i) + "; ";
      };
      const auto ylr = nktest::logical(yr), dxlr = nktest::logical(dxr);
      check(ylr, Vec(yl.begin() + n0 * C * Lx, yl.begin() + (n0 + nr) * C * Lx), "y");
      check(dxlr, Vec(dxl.begin() + n0 * C * Lx, dxl.begin() + (n0 + nr) * C * Lx), "dx");
      check(nktest::values(gr.weight), nktest::values(grads.weight), "dweight");
      check(nktest::values(gr.bias), nktest::values(grads.bias), "dbias");
      check(nktest::values(bn.running_mean()), nktest::values(full.running_mean()), "running_mean");
      check(nktest::values(bn.running_var()), nktest::values(full.running_var()), "running_var");
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < ranks; ++r) EXPECT_EQ(failures[static_cast<std::size_t>(r)], "") << "rank " << r;
}

// The short-run path sums a channel's runs a piece at a time: the pieces must take
// every run once, in order, at most kSeg values each (one run where a run is longer),
// as few pieces as that allows, all but the last the same size.
TEST(BatchNormKernelsTest, ShortPiecesTakeEveryRunOnce) {
  using normkit::detail::kSeg;
  for (Index outer : {1, 2, 3, 7, 31, 32, 33, 41, 42, 100, 257, 1000})
    for (Index inner : {32, 33, 49, 196, 400, 401, 512}) {
      const normkit::detail::ChannelView v{outer, 3, inner};
      const normkit::detail::ShortPieces sp(v);
      const Index most = std::max<Index>(1, kSeg / inner);
      EXPECT_EQ(sp.count, (outer + most - 1) / most) << outer << " x " << inner;
      Index taken = 0;
      for (Index p = 0; p < sp.count; ++p) {
        const Index k = sp.runs_of(p, v);
        EXPECT_GE(k, 1) << outer << " x " << inner << ", piece " << p;
        EXPECT_LE(k, most) << outer << " x " << inner << ", piece " << p;
        if (p + 1 < sp.count) {
          EXPECT_EQ(k, sp.runs) << outer << " x " << inner << ", piece " << p;
        }
        EXPECT_EQ(sp.offset(p, 2, v), (taken * 3 + 2) * inner) << outer << " x " << inner << ", piece " << p;
        taken += k;
      }
      EXPECT_EQ(taken, outer) << outer << " x " << inner;
    }
}

TEST(BatchNormSyncTest, UnevenSplitOverThreadsEqualsFullBatch) {
  synchronized_case<Eigen::RowMajor>({3, 1, 5}, 4, 40, 1);
  synchronized_case<Eigen::ColMajor>({3, 1, 5}, 4, 40, 1);
  synchronized_case<Eigen::RowMajor>({2, 7}, 5, 3, -1);
  synchronized_case<Eigen::RowMajor>({0, 4, 2}, 3, 5, 1);  // an empty part
}

TEST(BatchNormSyncTest, OneValuePerChannelOverAllProcessesIsAnError) {
  // Two processes with one value per channel each: 2 values in all, which is fine; the
  // error is about the global count.
  ThreadReducerGroup group(2);
  std::vector<std::string> errors(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      auto red = std::make_shared<ThreadReducerGroup::Member>(&group, r);
      normkit::BatchNorm<float> bn(3, normkit::BatchNormOptions().reducer(red));
      Eigen::Tensor<float, 2, Eigen::RowMajor> x(r == 0 ? 1 : 0, 3), y(r == 0 ? 1 : 0, 3);
      x.setRandom();
      try {
        bn.forward(x, y);
      } catch (const normkit::Error& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors[0], "BatchNorm::forward: expected more than 1 value per channel when training, got x of shape [1, 3]");
  EXPECT_EQ(errors[1], "BatchNorm::forward: expected more than 1 value per channel when training, got x of shape [0, 3]");
}

// ---- options and errors: exact messages, outputs untouched ---------------------------

TEST(BatchNormTest, OptionsAndDefaults) {
  normkit::BatchNorm<float> bn(64);
  EXPECT_TRUE(bn.is_training());
  EXPECT_EQ(bn.eps(), 1e-5);
  ASSERT_TRUE(bn.momentum().has_value());
  EXPECT_EQ(*bn.momentum(), 0.1);
  EXPECT_TRUE(bn.affine());
  EXPECT_TRUE(bn.track_running_stats());
  EXPECT_EQ(bn.channel_axis(), 1);
  EXPECT_EQ(bn.num_batches_tracked(), 0);
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(bn.weight()), std::vector<float>(64, 1.0f)));
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(bn.bias()), std::vector<float>(64, 0.0f)));
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(bn.running_mean()), std::vector<float>(64, 0.0f)));
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(bn.running_var()), std::vector<float>(64, 1.0f)));
  bn.eval();
  EXPECT_FALSE(bn.is_training());
  bn.train();
  EXPECT_TRUE(bn.is_training());
  bn.train(false);
  EXPECT_FALSE(bn.is_training());
  normkit::BatchNorm<double> cma(8, normkit::BatchNorm<double>::Options().momentum(std::nullopt).eps(1e-3));
  EXPECT_FALSE(cma.momentum().has_value());
  EXPECT_EQ(cma.eps(), 1e-3);
}

TEST(BatchNormTest, OptionErrors) {
  using O = normkit::BatchNormOptions;
  EXPECT_EQ(error_of([] { normkit::BatchNorm<float>(4, O().momentum(1.5)); }),
            "BatchNorm: momentum must be in [0, 1] (or std::nullopt for a cumulative average), got 1.5");
  EXPECT_EQ(error_of([] { normkit::BatchNorm<float>(4, O().momentum(-0.1)); }),
            "BatchNorm: momentum must be in [0, 1] (or std::nullopt for a cumulative average), got -0.1");
  EXPECT_EQ(error_of([] { normkit::BatchNorm<float>(4, O().momentum(std::nan(""))); }),
            "BatchNorm: momentum must be in [0, 1] (or std::nullopt for a cumulative average), got nan");
  EXPECT_EQ(error_of([] { normkit::BatchNorm<float>(4, O().eps(0)); }),
            "BatchNorm: eps must be a finite number > 0, got 0");
  EXPECT_EQ(error_of([] { normkit::BatchNorm<float>(4, O().eps(std::nan(""))); }),
            "BatchNorm: eps must be a finite number > 0, got nan");
  EXPECT_EQ(error_of([] { normkit::BatchNorm<float>(-2); }), "BatchNorm: num_features must be >= 0, got -2");
  normkit::BatchNorm<float> nostats(4, O().track_running_stats(false));
  EXPECT_EQ(error_of([&] { nostats.fold(); }),
            "BatchNorm::fold: track_running_stats is off, so eval mode normalizes with batch statistics and is "
            "no fixed per-channel affine map");
}

TEST(BatchNormTest, ForwardErrors) {
  normkit::BatchNorm<float> bn(64);
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(8, 32, 5, 5), y(8, 32, 5, 5);
  x.setRandom();
  y.setConstant(7);
  EXPECT_EQ(error_of([&] { bn.forward(x, y); }),
            "BatchNorm::forward: x has 32 channels on axis 1, expected 64 (x is [8, 32, 5, 5])");
  EXPECT_TRUE(all_equal(y.data(), y.size(), 7));

  Eigen::Tensor<float, 2, Eigen::RowMajor> x1(1, 64), y1(1, 64);
  x1.setRandom();
  y1.setConstant(7);
  EXPECT_EQ(error_of([&] { bn.forward(x1, y1); }),
            "BatchNorm::forward: expected more than 1 value per channel when training, got x of shape [1, 64]");
  EXPECT_TRUE(all_equal(y1.data(), y1.size(), 7));
  EXPECT_EQ(bn.num_batches_tracked(), 0);
  EXPECT_TRUE(all_equal(bn.running_var().data(), 64, 1.0f));
  bn.eval();  // one value per channel is fine in eval mode
  bn.forward(x1, y1);
  bn.train();

  Eigen::Tensor<float, 3, Eigen::RowMajor> x3(2, 64, 3), y3(2, 64, 4);
  x3.setRandom();
  y3.setConstant(7);
  EXPECT_EQ(error_of([&] { bn.forward(x3, y3); }),
            "BatchNorm::forward: y is [2, 64, 4], expected [2, 64, 3] (the shape of x)");
  EXPECT_TRUE(all_equal(y3.data(), y3.size(), 7));

  Eigen::Tensor<float, 1> v(64), vy(64);
  EXPECT_EQ(error_of([&] { bn.forward(v, vy); }), "BatchNorm::forward: x has rank 1, expected rank >= 2 (x is [64])");

  normkit::BatchNorm<float> bad_axis(64, normkit::BatchNormOptions().channel_axis(3));
  EXPECT_EQ(error_of([&] { bad_axis.forward(x3, y3); }),
            "BatchNorm::forward: channel_axis 3 is out of range for x of rank 3 (x is [2, 64, 3])");
  normkit::BatchNorm<float> bad_neg(64, normkit::BatchNormOptions().channel_axis(-4));
  EXPECT_EQ(error_of([&] { bad_neg.forward(x3, y3); }),
            "BatchNorm::forward: channel_axis -4 is out of range for x of rank 3 (x is [2, 64, 3])");
  EXPECT_TRUE(all_equal(y3.data(), y3.size(), 7));

  std::vector<float> buf(2 * 64 * 3 + 1, 7.0f);
  Eigen::TensorMap<Eigen::Tensor<float, 3, Eigen::RowMajor>> xm(buf.data(), 2, 64, 3), ym(buf.data() + 1, 2, 64, 3);
  EXPECT_EQ(error_of([&] { bn.forward(xm, ym); }),
            "BatchNorm::forward: y partially overlaps x (only y == x, in place, is supported)");
  EXPECT_TRUE(all_equal(buf.data(), static_cast<Index>(buf.size()), 7));
  EXPECT_EQ(bn.num_batches_tracked(), 0);
}

TEST(BatchNormTest, BackwardErrors) {
  normkit::BatchNorm<float> bn(4);
  Eigen::Tensor<float, 3, Eigen::RowMajor> x(3, 4, 5), y(3, 4, 5), dy(3, 4, 5), dx(3, 4, 5), dyb(3, 4, 6);
  Eigen::Tensor<float, 3, Eigen::RowMajor> x2(2, 4, 5), dx2(2, 4, 5), dy2(2, 4, 5);
  x.setRandom();
  dy.setRandom();
  x2.setRandom();
  dy2.setRandom();
  dx.setConstant(7);
  dx2.setConstant(7);
  normkit::BatchNorm<float>::Cache cache, empty;
  normkit::BatchNorm<float>::Grads grads;
  bn.forward(x, y, cache);
  EXPECT_EQ(error_of([&] { bn.backward(x, dyb, cache, dx, grads); }),
            "BatchNorm::backward: dy is [3, 4, 6], expected [3, 4, 5] (the shape of x)");
  EXPECT_EQ(error_of([&] { bn.backward(x, dy, cache, dyb, grads); }),
            "BatchNorm::backward: dx is [3, 4, 6], expected [3, 4, 5] (the shape of x)");
  EXPECT_EQ(error_of([&] { bn.backward(x, dy, empty, dx, grads); }),
            "BatchNorm::backward: cache is empty, expected the cache filled by forward(x, y, cache)");
  EXPECT_EQ(error_of([&] { bn.backward(x2, dy2, cache, dx2, grads); }),
            "BatchNorm::backward: cache is from x of shape [3, 4, 5], but x is [2, 4, 5]");
  EXPECT_TRUE(all_equal(dx.data(), dx.size(), 7));
  EXPECT_TRUE(all_equal(dx2.data(), dx2.size(), 7));
  std::vector<float> buf(61, 7.0f);
  Eigen::TensorMap<Eigen::Tensor<float, 3, Eigen::RowMajor>> dxm(buf.data() + 1, 3, 4, 5);
  Eigen::TensorMap<Eigen::Tensor<float, 3, Eigen::RowMajor>> xm(buf.data(), 3, 4, 5);
  EXPECT_EQ(error_of([&] { bn.backward(xm, dy, cache, dxm, grads); }),
            "BatchNorm::backward: dx partially overlaps x (only dx == x or dx == dy is supported)");
  EXPECT_EQ(error_of([&] { bn.backward(x, xm, cache, dxm, grads); }),
            "BatchNorm::backward: dx partially overlaps dy (only dx == x or dx == dy is supported)");
  EXPECT_TRUE(all_equal(buf.data(), 61, 7));
}

// Outputs of kStreamBytes (8 MiB) and more are written with streaming stores where the
// tensors fill 1/16 of the last-level cache (simd::stream_output). The same BatchNorm on
// the same 8 MiB tensor, once with every large output streamed (a cache size of 0) and
// once with none (a cache of 2^60 bytes), must give the same bits: y, dx, the parameter
// gradients and the running statistics, for the row path (NCHW, rows of 419^2 floats,
// so misaligned), the column path (NC, 1031 channels) and channels-last, on 1 and 2
// threads.
TEST(BatchNormTest, StreamedOutputsMatchTheInCachePathBitwise) {
  using Tensor4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  const Index n_min = Index(normkit::detail::simd::kStreamBytes / sizeof(float));
  struct Case {
    std::array<Index, 4> dims;
    int axis;
  };
  for (const Case& c : {Case{{4, 3, 419, 419}, 1}, Case{{2053, 1031, 1, 1}, 1}, Case{{2, 101, 101, 103}, 3}}) {
    Tensor4 x(c.dims), dy(c.dims);
    ASSERT_GE(x.size(), n_min);
    x.setRandom();
    dy.setRandom();
    const Index C = c.dims[static_cast<std::size_t>(c.axis)];
    for (int threads : {1, 2}) {
      SCOPED_TRACE("dims " + std::to_string(c.dims[0]) + "x" + std::to_string(c.dims[1]) + "x" +
                   std::to_string(c.dims[2]) + "x" + std::to_string(c.dims[3]) + ", " + std::to_string(threads) +
                   " threads");
      struct Out {
        std::vector<float> y, dx, y_eval, dw, db, rm, rv;
      };
      auto run = [&](std::size_t llc) {
        const nktest::LlcBytes cache_size(llc);
        normkit::BatchNorm<float> bn(C, normkit::BatchNormOptions().channel_axis(c.axis));
        bn.weight().setConstant(1.5f);
        bn.bias().setConstant(-0.25f);
        Tensor4 y(c.dims), dx(c.dims), y_eval(c.dims);
        normkit::BatchNorm<float>::Cache cache;
        normkit::BatchNorm<float>::Grads grads;
        nktest::on_threads(threads, [&](const auto& dev) {
          bn.forward(dev, x, y, cache);
          bn.backward(dev, x, dy, cache, dx, grads);
          bn.eval();
          bn.forward(dev, x, y_eval);
        });
        return Out{nktest::logical(y), nktest::logical(dx), nktest::logical(y_eval), nktest::values(grads.weight),
                   nktest::values(grads.bias), nktest::values(bn.running_mean()), nktest::values(bn.running_var())};
      };
      const Out streamed = run(0), cached = run(std::size_t(1) << 60);
      EXPECT_TRUE(nktest::bitwise_equal(streamed.y, cached.y)) << "y";
      EXPECT_TRUE(nktest::bitwise_equal(streamed.dx, cached.dx)) << "dx";
      EXPECT_TRUE(nktest::bitwise_equal(streamed.y_eval, cached.y_eval)) << "y (eval)";
      EXPECT_TRUE(nktest::bitwise_equal(streamed.dw, cached.dw)) << "dweight";
      EXPECT_TRUE(nktest::bitwise_equal(streamed.db, cached.db)) << "dbias";
      EXPECT_TRUE(nktest::bitwise_equal(streamed.rm, cached.rm)) << "running_mean";
      EXPECT_TRUE(nktest::bitwise_equal(streamed.rv, cached.rv)) << "running_var";
    }
  }
}

}  // namespace
