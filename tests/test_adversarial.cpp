// Adversarial numerics for every layer, and the state after every error path.
//
// Numerics: each scenario runs a training forward and backward (and, for BatchNorm, an
// eval step) on inputs built to break naive kernels, in both layouts, and compares with
// the long-double reference in tests/fuzz/reference_layers.hpp. The tolerance is
// 64 unit roundoffs of the accumulation type times the magnitude of the terms the result
// is made of (the reference reports it), plus the rounding to the storage type: a bound
// that holds for a sound kernel however much the terms cancel, and that the classic
// failures (E[x^2] - E[x]^2, float sums of squares near FLT_MAX, eps lost in the
// conversion to float) miss by orders of magnitude.
//
// Errors: after every normkit::Error the outputs, the cache, the gradients and the layer
// (parameters, BatchNorm running statistics and num_batches_tracked) are bitwise what
// they were before the call.
#include <normkit/normkit.hpp>

#include <cfloat>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>

#include "fuzz/reference_layers.hpp"
#include "test_support.hpp"

namespace {

using nktest::Index;
using nktest::error_of;
using nkref::LD;

// ---- the layers behind one interface ----------------------------------------------------

template <class T>
struct LayerNormKind {
  using Layer = normkit::LayerNorm<T>;
  static constexpr int rank = 2;
  static constexpr bool batch_norm = false, dyt = false, has_bias = true;
  static Layer make(Index C, double eps) { return Layer(C, normkit::LayerNormOptions().eps(eps)); }
  static std::vector<Index> dims(const nkref::Shape3& s) { return {s.outer, s.C}; }
  static nkref::Result reference(const std::vector<LD>& x, const std::vector<LD>& dy, const nkref::Shape3& s,
                                 const nkref::Params& p) {
    return nkref::normalize(true, true, x, dy, s, p);
  }
};

template <class T>
struct RMSNormKind {
  using Layer = normkit::RMSNorm<T>;
  static constexpr int rank = 2;
  static constexpr bool batch_norm = false, dyt = false, has_bias = false;
  static Layer make(Index C, double eps) { return Layer(C, normkit::RMSNormOptions().eps(eps)); }
  static std::vector<Index> dims(const nkref::Shape3& s) { return {s.outer, s.C}; }
  static nkref::Result reference(const std::vector<LD>& x, const std::vector<LD>& dy, const nkref::Shape3& s,
                                 const nkref::Params& p) {
    nkref::Params q = p;
    q.b.clear();
    return nkref::normalize(false, true, x, dy, s, q);
  }
};

template <class T>
struct BatchNormKind {
  using Layer = normkit::BatchNorm<T>;
  static constexpr int rank = 3;
  static constexpr bool batch_norm = true, dyt = false, has_bias = true;
  static Layer make(Index C, double eps) { return Layer(C, normkit::BatchNormOptions().eps(eps)); }
  static std::vector<Index> dims(const nkref::Shape3& s) { return {s.outer, s.C, s.inner}; }
  static nkref::Result reference(const std::vector<LD>& x, const std::vector<LD>& dy, const nkref::Shape3& s,
                                 const nkref::Params& p) {
    return nkref::normalize(true, false, x, dy, s, p);
  }
};

template <class T>
struct DyTKind {
  using Layer = normkit::DyT<T>;
  static constexpr int rank = 2;
  static constexpr bool batch_norm = false, dyt = true, has_bias = true;
  static Layer make(Index C, double) { return Layer(C); }
  static std::vector<Index> dims(const nkref::Shape3& s) { return {s.outer, s.C}; }
  static nkref::Result reference(const std::vector<LD>& x, const std::vector<LD>& dy, const nkref::Shape3& s,
                                 const nkref::Params& p) {
    return nkref::dyt(x, dy, s, p);
  }
};

template <class K>
constexpr bool is_dyt_v = K::dyt;

template <template <class> class K>
struct KindOf {
  template <class T>
  using type = K<T>;
};


template <class T>
constexpr long double unit_roundoff() {
  if constexpr (std::is_same_v<T, double>)
    return std::ldexp(1.0L, -53);
  else if constexpr (std::is_same_v<T, float>)
    return std::ldexp(1.0L, -24);
  else if constexpr (std::is_same_v<T, Eigen::half>)
    return std::ldexp(1.0L, -11);
  else
    return std::ldexp(1.0L, -8);
}

template <class T>
long double denorm_min_of() {
  if constexpr (std::is_same_v<T, double>)
    return std::numeric_limits<double>::denorm_min();
  else if constexpr (std::is_same_v<T, float>)
    return std::numeric_limits<float>::denorm_min();
  else if constexpr (std::is_same_v<T, Eigen::half>)
    return std::ldexp(1.0L, -24);
  else
    return std::ldexp(1.0L, -133);
}

template <class T>
std::vector<double> as_doubles(const T* p, Index n) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = static_cast<double>(p[i]);
  return v;
}

std::vector<LD> as_ld(const std::vector<double>& v) { return std::vector<LD>(v.begin(), v.end()); }

/// |got - want| <= 64 (u_acc * scale + denorm_min(T)) + u_T * |want|, element by element:
/// with gradual underflow every operation may add an absolute error of denorm_min / 2.
template <class T>
void expect_within(const std::vector<double>& got, const std::vector<LD>& want, const std::vector<LD>& scale,
                   const std::string& what) {
  using Acc = normkit::detail::acc_t<T>;
  const long double tol = 64 * unit_roundoff<Acc>(), uT = unit_roundoff<T>(), tiny = 64 * denorm_min_of<T>();
  ASSERT_EQ(got.size(), want.size()) << what;
  std::size_t bad = 0, first = 0;
  long double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const long double d = std::fabs(static_cast<long double>(got[i]) - want[i]);
    const long double allowed = tol * scale[i] + uT * std::fabs(want[i]) + tiny;
    if (!(d <= allowed)) {
      if (!bad) first = i;
      ++bad;
      if (!(d <= worst)) worst = d;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements off; first at " << first
                     << " got " << got[first] << " want " << static_cast<double>(want[first]) << " allowed "
                     << static_cast<double>(tol * scale[first] + uT * std::fabs(want[first]) + tiny)
                     << "; max abs diff " << static_cast<double>(worst);
}

template <class T>
void set_param(Eigen::Tensor<T, 1>& p, const std::vector<double>& v) {
  for (Index i = 0; i < p.size(); ++i) p(i) = static_cast<T>(v[static_cast<std::size_t>(i)]);
}

/// One training forward + backward (and for BatchNorm an eval forward + backward with
/// the running statistics it produced), checked against the reference.
template <template <class> class KindT, class T, int L>
void check_case(const std::string& what, const nkref::Shape3& s, std::vector<double> xs, std::vector<double> dys,
                double eps, unsigned seed) {
  using K = KindT<T>;
  using Layer = typename K::Layer;
  constexpr int R = K::rank;
  const std::string tag = what + (L == Eigen::RowMajor ? " RowMajor" : " ColMajor");
  xs = nktest::quantized<T>(xs);
  dys = nktest::quantized<T>(dys);
  Layer layer = K::make(s.C, eps);
  const auto w = nktest::quantized<T>(nktest::random_vector(s.C, seed, 0.5, 1.5));
  const auto b = nktest::quantized<T>(nktest::random_vector(s.C, seed + 1, -1, 1));
  set_param(layer.weight(), w);
  nkref::Params p;
  p.w = as_ld(w);
  if constexpr (K::has_bias) {
    set_param(layer.bias(), b);
    p.b = as_ld(b);
  }
  p.eps = static_cast<LD>(eps);
  if constexpr (is_dyt_v<K>) {
    layer.alpha() = static_cast<T>(0.75);  // not the default 0.5: a wrong alpha shows
    p.alpha = static_cast<LD>(static_cast<double>(layer.alpha()));
  }
  const auto dims = K::dims(s);
  auto x = nktest::make_tensor<T, R, L>(dims, xs);
  auto dy = nktest::make_tensor<T, R, L>(dims, dys);
  Eigen::Tensor<T, R, L> y = x, dx = x;
  typename Layer::Cache cache;
  typename Layer::Grads grads;
  layer.forward(x, y, cache);
  layer.backward(x, dy, cache, dx, grads);
  const nkref::Result want = K::reference(as_ld(xs), as_ld(dys), s, p);
  auto ly = nktest::logical(y), ldx = nktest::logical(dx);
  expect_within<T>(as_doubles(ly.data(), y.size()), want.y, want.y_scale, tag + ": y");
  expect_within<T>(as_doubles(ldx.data(), dx.size()), want.dx, want.dx_scale, tag + ": dx");
  expect_within<T>(as_doubles(grads.weight.data(), grads.weight.size()), want.dw, want.dw_scale, tag + ": dweight");
  if constexpr (K::has_bias)
    expect_within<T>(as_doubles(grads.bias.data(), grads.bias.size()), want.db, want.db_scale, tag + ": dbias");
  if constexpr (is_dyt_v<K>)
    expect_within<T>({static_cast<double>(grads.alpha)}, {want.dalpha}, {want.dalpha_scale}, tag + ": dalpha");

  if constexpr (K::batch_norm) {
    std::vector<LD> rm(static_cast<std::size_t>(s.C), 0), rv(static_cast<std::size_t>(s.C), 1);
    nkref::running_update(want, s.outer * s.inner, 0.1L, 1, rm, rv);
    const std::vector<LD> zero(rm.size(), 0);
    EXPECT_EQ(layer.num_batches_tracked(), 1) << tag;
    // Storing the running statistics rounds them to T once; a variance beyond T's range
    // (values near FLT_MAX) is +inf in T, as in PyTorch.
    std::vector<LD> rv_in_t(rv.size());
    for (std::size_t c = 0; c < rv.size(); ++c) rv_in_t[c] = static_cast<LD>(static_cast<double>(layer.running_var()(static_cast<Index>(c))));
    std::vector<LD> rm_scale(rm.size()), rv_scale(rm.size());
    for (std::size_t c = 0; c < rm.size(); ++c) {
      rm_scale[c] = std::sqrt(want.var[c]) + std::fabs(want.mean[c]);  // the mean is good to u of its spread
      rv_scale[c] = rv[c];
    }
    expect_within<T>(as_doubles(layer.running_mean().data(), s.C), rm, rm_scale, tag + ": running_mean");
    bool finite_var = true;
    for (LD v : rv) finite_var = finite_var && std::isfinite(static_cast<double>(static_cast<T>(static_cast<double>(v))));
    if (finite_var) {
      expect_within<T>(as_doubles(layer.running_var().data(), s.C), rv, rv_scale, tag + ": running_var");
      // Eval: normalize with the stored running statistics, backward around them.
      layer.eval();
      layer.forward(x, y, cache);
      layer.backward(x, dy, cache, dx, grads);
      std::vector<LD> m_t(rm.size());
      for (std::size_t c = 0; c < rm.size(); ++c) m_t[c] = static_cast<LD>(static_cast<double>(layer.running_mean()(static_cast<Index>(c))));
      const nkref::Result ev = nkref::normalize(true, false, as_ld(xs), as_ld(dys), s, p, &m_t, &rv_in_t);
      ly = nktest::logical(y);
      ldx = nktest::logical(dx);
      expect_within<T>(as_doubles(ly.data(), y.size()), ev.y, ev.y_scale, tag + ": eval y");
      expect_within<T>(as_doubles(ldx.data(), dx.size()), ev.dx, ev.dx_scale, tag + ": eval dx");
      expect_within<T>(as_doubles(grads.weight.data(), s.C), ev.dw, ev.dw_scale, tag + ": eval dweight");
      expect_within<T>(as_doubles(grads.bias.data(), s.C), ev.db, ev.db_scale, tag + ": eval dbias");
    } else {
      for (Index c = 0; c < s.C; ++c) EXPECT_TRUE(std::isinf(static_cast<double>(layer.running_var()(c)))) << tag;
    }
  }
}

template <template <class> class KindT, class T>
void check_both_layouts(const std::string& what, const nkref::Shape3& s, const std::vector<double>& xs,
                        const std::vector<double>& dys, double eps, unsigned seed) {
  check_case<KindT, T, Eigen::RowMajor>(what, s, xs, dys, eps, seed);
  check_case<KindT, T, Eigen::ColMajor>(what, s, xs, dys, eps, seed);
}

/// Shapes: LayerNorm/RMSNorm rows x 37 features (not a multiple of any SIMD width) and
/// a row longer than a column tile; BatchNorm [N, C, S] with S below and above the
/// kernels' row-path threshold.
template <template <class> class KindT>
std::vector<nkref::Shape3> shapes() {
  if constexpr (KindT<float>::batch_norm)
    return {{4, 3, 9}, {3, 2, 70}, {33, 5, 1}};
  else
    return {{5, 37, 1}, {70, 3, 1}, {2, 130, 1}};
}

template <class K>
class AdversarialTest : public ::testing::Test {};

using Kinds = ::testing::Types<KindOf<LayerNormKind>, KindOf<RMSNormKind>, KindOf<BatchNormKind>, KindOf<DyTKind>>;
struct KindNames {
  template <class K>
  static std::string GetName(int) {
    using L = typename K::template type<float>::Layer;
    if constexpr (std::is_same_v<L, normkit::LayerNorm<float>>) return "LayerNorm";
    if constexpr (std::is_same_v<L, normkit::RMSNorm<float>>) return "RMSNorm";
    if constexpr (std::is_same_v<L, normkit::DyT<float>>) return "DyT";
    return "BatchNorm";
  }
};
TYPED_TEST_SUITE(AdversarialTest, Kinds, KindNames);

#define NK_KIND(TypeParam) TypeParam::template type

std::vector<double> offset_values(Index n, double offset, double spread, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(offset, spread);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = d(gen);
  return v;
}

TYPED_TEST(AdversarialTest, HugeOffsetTinySpread) {
  unsigned seed = 10;
  for (const auto& s : shapes<NK_KIND(TypeParam)>()) {
    // float: ulp(1e4) ~ 1e-3, so a spread of 0.1 keeps ~100 distinct values per row and
    // E[x^2] - E[x]^2 would lose every digit; double: the same at 1e12 and 1e-2.
    check_both_layouts<NK_KIND(TypeParam), float>("offset 1e4 spread 1e-1", s,
                                                 offset_values(s.size(), 1e4, 1e-1, seed), nktest::random_vector(s.size(), seed + 1),
                                                 1e-5, seed);
    check_both_layouts<NK_KIND(TypeParam), float>("offset -3e5 spread 1", s,
                                                 offset_values(s.size(), -3e5, 1, seed + 2), nktest::random_vector(s.size(), seed + 3),
                                                 1e-5, seed);
    if constexpr (!TypeParam::template type<double>::batch_norm)
      check_both_layouts<NK_KIND(TypeParam), double>("offset 1e12 spread 1e-2", s,
                                                    offset_values(s.size(), 1e12, 1e-2, seed + 4), nktest::random_vector(s.size(), seed + 5),
                                                    1e-5, seed);
    seed += 10;
  }
}

TYPED_TEST(AdversarialTest, ConstantRows) {
  unsigned seed = 30;
  for (const auto& s : shapes<NK_KIND(TypeParam)>()) {
    for (double c : {0.0, 1234.5, -3e-3, 7e20}) {
      const std::vector<double> xs(static_cast<std::size_t>(s.size()), c);
      const std::string what = "constant " + std::to_string(c);
      check_both_layouts<NK_KIND(TypeParam), float>(what, s, xs, nktest::random_vector(s.size(), seed), 1e-5, seed);
      check_both_layouts<NK_KIND(TypeParam), double>(what, s, xs, nktest::random_vector(s.size(), seed), 1e-5, seed);
      ++seed;
    }
  }
}

TYPED_TEST(AdversarialTest, SingleElement) {
  using K = typename TypeParam::template type<float>;
  if constexpr (K::batch_norm) {
    // One value per channel: an error in training (checked with the error paths below),
    // fine in eval. Two values per channel is the smallest training batch.
    check_both_layouts<NK_KIND(TypeParam), float>("two values", {2, 1, 1}, {3.0, -1.5}, {0.5, 2.0}, 1e-5, 40);
    check_both_layouts<NK_KIND(TypeParam), double>("two values", {1, 1, 2}, {1e-3, 2e-3}, {0.5, 2.0}, 1e-5, 40);
    normkit::BatchNorm<float> bn(1);
    bn.eval();
    Eigen::Tensor<float, 2, Eigen::RowMajor> x(1, 1), y(1, 1);
    x(0, 0) = 5.0f;
    bn.forward(x, y);
    EXPECT_NEAR(y(0, 0), 5.0 / std::sqrt(1.0 + 1e-5), 1e-6);
  } else {
    for (double v : {0.0, 3.0, -2e30, 1e-40}) {
      const std::string what = "single " + std::to_string(v);
      check_both_layouts<NK_KIND(TypeParam), float>(what, {1, 1, 1}, {v}, {0.75}, 1e-5, 41);
      check_both_layouts<NK_KIND(TypeParam), double>(what, {1, 1, 1}, {v}, {0.75}, 1e-5, 41);
      check_both_layouts<NK_KIND(TypeParam), float>(what + " in 3 rows", {3, 1, 1}, {v, -v, 1.0}, {0.75, 1, 2}, 1e-5, 42);
    }
  }
}

template <class T>
std::vector<double> near_max_values(Index n, unsigned seed) {
  // |x| in [max/4, max], both signs: every square and every sum of two overflows T.
  const double mx = static_cast<double>(Eigen::NumTraits<T>::highest());
  auto v = nktest::random_vector(n, seed, 0.25, 1.0);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] *= (i % 3 == 1 ? -mx : mx);
  return v;
}

TYPED_TEST(AdversarialTest, ValuesNearFloatMax) {
  unsigned seed = 50;
  for (const auto& s : shapes<NK_KIND(TypeParam)>()) {
    check_both_layouts<NK_KIND(TypeParam), float>("near FLT_MAX", s, near_max_values<float>(s.size(), seed),
                                                 nktest::random_vector(s.size(), seed + 1), 1e-5, seed);
    check_both_layouts<NK_KIND(TypeParam), double>("near DBL_MAX", s, near_max_values<double>(s.size(), seed),
                                                  nktest::random_vector(s.size(), seed + 1), 1e-5, seed);
    seed += 10;
  }
}

TYPED_TEST(AdversarialTest, DenormalInputs) {
  unsigned seed = 70;
  for (const auto& s : shapes<NK_KIND(TypeParam)>()) {
    auto xf = nktest::random_vector(s.size(), seed, -1, 1), xd = xf;
    for (auto& v : xf) v *= 1e-40;   // float subnormals (below 1.18e-38)
    for (auto& v : xd) v *= 1e-310;  // double subnormals (below 2.2e-308)
    check_both_layouts<NK_KIND(TypeParam), float>("float subnormals", s, xf, nktest::random_vector(s.size(), seed + 1), 1e-5, seed);
    check_both_layouts<NK_KIND(TypeParam), double>("double subnormals", s, xd, nktest::random_vector(s.size(), seed + 1), 1e-5, seed);
    // Subnormal spread around a normal offset, with an eps below the variance.
    check_both_layouts<NK_KIND(TypeParam), double>("subnormal dy", s, nktest::random_vector(s.size(), seed + 2),
                                                  xd, 1e-5, seed);
    seed += 10;
  }
}

TYPED_TEST(AdversarialTest, SmallestAllowedEps) {
  // eps must be a normal number of the accumulation type: its smallest allowed value is
  // FLT_MIN (float/half/bfloat16 layers) or DBL_MIN. Constant rows then have variance 0
  // and rstd = 1 / sqrt(eps), finite: y = bias, no NaN.
  if constexpr (is_dyt_v<typename TypeParam::template type<float>>) {
    GTEST_SKIP() << "DyT has no eps (no division anywhere)";
  } else {
  const double eps_f = std::numeric_limits<float>::min(), eps_d = std::numeric_limits<double>::min();
  unsigned seed = 90;
  for (const auto& s : shapes<NK_KIND(TypeParam)>()) {
    const std::vector<double> ones(static_cast<std::size_t>(s.size()), 1.0);
    check_both_layouts<NK_KIND(TypeParam), float>("eps FLT_MIN/DBL_MIN, constant", s, ones, nktest::random_vector(s.size(), seed), eps_f, seed);
    check_both_layouts<NK_KIND(TypeParam), double>("eps FLT_MIN/DBL_MIN, constant", s, ones, nktest::random_vector(s.size(), seed), eps_d, seed);
    check_both_layouts<NK_KIND(TypeParam), float>("eps FLT_MIN/DBL_MIN, random", s, nktest::random_vector(s.size(), seed + 1),
                                                 nktest::random_vector(s.size(), seed + 2), eps_f, seed);
    check_both_layouts<NK_KIND(TypeParam), double>("eps FLT_MIN/DBL_MIN, random", s, nktest::random_vector(s.size(), seed + 1),
                                                  nktest::random_vector(s.size(), seed + 2), eps_d, seed);
    seed += 10;
  }
  // Below that: refused at construction (a subnormal eps gave NaN on the ColMajor path).
  using K = typename TypeParam::template type<float>;
  const std::string name = K::batch_norm ? "BatchNorm" : std::is_same_v<typename K::Layer, normkit::RMSNorm<float>> ? "RMSNorm" : "LayerNorm";
  std::string msg;
  try {
    K::make(4, std::numeric_limits<float>::denorm_min());
  } catch (const normkit::Error& e) {
    msg = e.what();
  }
  EXPECT_EQ(msg, name + ": eps must be >= 1.17549435e-38 (the smallest normal float, the accumulation type), got 1.40129846e-45");
  EXPECT_NO_THROW(TypeParam::template type<Eigen::half>::make(4, eps_f));
  }
}

TYPED_TEST(AdversarialTest, ReducedPrecisionSumsBeyondTheFormat) {
  unsigned seed = 110;
  for (const auto& s : shapes<NK_KIND(TypeParam)>()) {
    // half: values up to 6e4 (max 65504); a row's sum and every square overflow half.
    auto xh = nktest::random_vector(s.size(), seed, 3e4, 6e4);
    for (std::size_t i = 0; i < xh.size(); i += 2) xh[i] = -xh[i] / 2;
    check_both_layouts<NK_KIND(TypeParam), Eigen::half>("half near max", s, xh, nktest::random_vector(s.size(), seed + 1),
                                                        1e-5, seed);
    // bfloat16 has float's range: near its max, the float sums overflow too.
    check_both_layouts<NK_KIND(TypeParam), Eigen::bfloat16>("bfloat16 near max", s, near_max_values<Eigen::bfloat16>(s.size(), seed),
                                                            nktest::random_vector(s.size(), seed + 1), 1e-5, seed);
    seed += 10;
  }
}

// The double version of the offset case, for BatchNorm on its own: the mean 1e12 is
// not held by one double to the precision of the spread (ulp 1.2e-4, 1% of it);
// BatchNorm adds the exact residual mean(x - m) computed around the rounded mean.
TEST(BatchNormAdversarialTest, DoubleHugeOffsetTinySpread) {
  unsigned seed = 14;
  for (const auto& s : shapes<BatchNormKind>()) {
    check_both_layouts<BatchNormKind, double>("offset 1e12 spread 1e-2", s, offset_values(s.size(), 1e12, 1e-2, seed),
                                             nktest::random_vector(s.size(), seed + 1), 1e-5, seed);
    seed += 10;
  }
}

// Double channels of small values with one outlier beyond sqrt(DBL_MAX) (found by the
// fuzzer): the sum of squared deviations overflows double while the statistics (std
// ~1e265) and every output are ordinary numbers. The overflowed sum must send the channel
// to the long-double moments; clamping the corrected sum q - a^2/n at 0 had turned its
// inf - inf into 0, and y came out as the bias. Channels-first and channels-last (the
// row and the column kernels), both layouts.
TEST(BatchNormAdversarialTest, DoubleOutlierBeyondSqrtMax) {
  unsigned seed = 40;
  for (const auto& s : shapes<BatchNormKind>()) {
    std::vector<double> xs = nktest::random_vector(s.size(), seed, -1, 1);
    for (long c = 0; c < s.C; ++c) {
      const double big = c % 2 ? -2.5e266 : 3e200 * static_cast<double>(c + 1);
      xs[s.at(c % s.outer, c, 0)] = big;
    }
    check_both_layouts<BatchNormKind, double>("outlier beyond sqrt(DBL_MAX)", s, xs,
                                             nktest::random_vector(s.size(), seed + 1), 1e-5, seed);
    seed += 10;
  }
}

// Channels of very different magnitudes in one tensor: near FLT_MAX, std 1e25 (rstd^2
// below the smallest float), an ordinary one, and a constant one whose weight pushes
// rstd * weight past FLT_MAX (y must still be its bias, not 0 * inf). The odd ones go through BatchNorm's long-double path, the rest through
// the vector kernels; in place (y = x, dx = dy and dx = x) and on 3 threads the results
// must be the same bits as out of place on one thread, and the values those of the
// long-double reference (checked channel by channel in the scenarios above).
TEST(BatchNormAdversarialTest, MixedRangeChannelsInPlaceAndThreaded) {
  for (int layout = 0; layout < 2; ++layout) {
    const Index N = 5, C = 4, S = 37;
    auto run = [&](auto tag) {
      constexpr int L = decltype(tag)::value;
      using Ten = Eigen::Tensor<float, 3, L>;
      Ten x(N, C, S), dy(N, C, S);
      const auto xs = nktest::random_vector(N * C * S, 7, -1, 1), gs = nktest::random_vector(N * C * S, 8);
      const double scale[C] = {3e38, 1e25, 1.0, 0.0};
      for (Index n = 0; n < N; ++n)
        for (Index c = 0; c < C; ++c)
          for (Index k = 0; k < S; ++k) {
            const std::size_t i = static_cast<std::size_t>((n * C + c) * S + k);
            x(n, c, k) = static_cast<float>(xs[i] * scale[c]);
            dy(n, c, k) = static_cast<float>(gs[i]);
          }
      normkit::BatchNorm<float> bn(C);
      bn.weight().setValues({0.5f, -2.0f, 1.5f, 3e37f});  // 3e37 / sqrt(eps) overflows float
      bn.bias().setValues({0.0f, 1.0f, -1.0f, 0.25f});
      normkit::BatchNorm<float> bn2 = bn;
      Ten y(N, C, S), dx(N, C, S);
      normkit::BatchNorm<float>::Cache cache, cache2;
      normkit::BatchNorm<float>::Grads g, g2;
      bn.forward(x, y, cache);
      bn.backward(x, dy, cache, dx, g);
      // Finite everywhere (dx of the last channel is weight * rstd * (dy - mean(dy)),
      // beyond FLT_MAX in earnest), and the constant channel is its bias.
      for (Index n = 0; n < N; ++n)
        for (Index c = 0; c < C; ++c)
          for (Index k = 0; k < S; ++k) {
            EXPECT_TRUE(std::isfinite(y(n, c, k))) << n << " " << c << " " << k;
            if (c < 3) {
              EXPECT_TRUE(std::isfinite(dx(n, c, k))) << n << " " << c << " " << k;
            }
            if (c == 3) {
              EXPECT_EQ(y(n, c, k), 0.25f);
            }
          }
      Eigen::ThreadPool pool(3);
      Eigen::ThreadPoolDevice dev(&pool, 3);
      Ten xy = x, gdx = dy, x2 = x;
      bn2.forward(dev, xy, xy, cache2);  // in place
      EXPECT_EQ(0, std::memcmp(xy.data(), y.data(), sizeof(float) * y.size()));
      bn2.backward(dev, x, gdx, cache2, gdx, g2);  // dx = dy
      EXPECT_EQ(0, std::memcmp(gdx.data(), dx.data(), sizeof(float) * dx.size()));
      bn2.backward(dev, x2, dy, cache2, x2, g2);  // dx = x
      EXPECT_EQ(0, std::memcmp(x2.data(), dx.data(), sizeof(float) * dx.size()));
      EXPECT_EQ(0, std::memcmp(g2.weight.data(), g.weight.data(), sizeof(float) * C));
      EXPECT_EQ(0, std::memcmp(bn2.running_var().data(), bn.running_var().data(), sizeof(float) * C));
      // Eval mode: the running statistics, the same paths.
      bn.eval();
      bn2.eval();
      bn.forward(x, y, cache);
      bn.backward(x, dy, cache, dx, g);
      xy = x;
      gdx = dy;
      bn2.forward(dev, xy, xy, cache2);
      bn2.backward(dev, x, gdx, cache2, gdx, g2);
      EXPECT_EQ(0, std::memcmp(xy.data(), y.data(), sizeof(float) * y.size()));
      EXPECT_EQ(0, std::memcmp(gdx.data(), dx.data(), sizeof(float) * dx.size()));
    };
    if (layout == 0)
      run(std::integral_constant<int, Eigen::RowMajor>());
    else
      run(std::integral_constant<int, Eigen::ColMajor>());
  }
}

// ---- error paths: exact message, and nothing written ---------------------------------------

/// The bytes of everything a call could write.
struct Snapshot {
  std::vector<std::vector<unsigned char>> parts;
  template <class P>
  void add_raw(const P* p, std::size_t n) {
    const auto* b = reinterpret_cast<const unsigned char*>(p);
    parts.emplace_back(b, b + n * sizeof(P));
  }
  template <class X>
  Snapshot& operator<<(const X& x) {
    if constexpr (std::is_arithmetic_v<X>)
      add_raw(&x, 1);
    else if constexpr (std::is_same_v<X, std::vector<Index>>)
      add_raw(x.data(), x.size());
    else
      add_raw(x.data(), static_cast<std::size_t>(x.size()));
    return *this;
  }
  bool operator==(const Snapshot& o) const { return parts == o.parts; }
};

/// f must throw normkit::Error with `msg` and leave `state()` bitwise unchanged.
template <class F, class S>
void expect_error_keeps_state(const std::string& msg, F&& f, S&& state) {
  const Snapshot before = state();
  EXPECT_EQ(error_of(f), msg);
  EXPECT_TRUE(before == state()) << "state changed by the failing call: " << msg;
}

template <class T, int R>
using RM = Eigen::Tensor<T, R, Eigen::RowMajor>;

/// The four forward overloads (plain, with cache, on a device, both).
template <class Layer, class X, class Y, class Cache>
std::vector<std::function<void()>> forward_calls(Layer& l, const X& x, Y& y, Cache& cache,
                                                 const Eigen::ThreadPoolDevice& dev) {
  return {[&] { l.forward(x, y); }, [&] { l.forward(x, y, cache); }, [&] { l.forward(dev, x, y); },
          [&] { l.forward(dev, x, y, cache); }};
}

template <class Layer, class X, class DY, class DX, class Cache, class Grads>
std::vector<std::function<void()>> backward_calls(const Layer& l, const X& x, const DY& dy, const Cache& cache,
                                                  DX& dx, Grads& g, const Eigen::ThreadPoolDevice& dev) {
  return {[&] { l.backward(x, dy, cache, dx, g); }, [&] { l.backward(dev, x, dy, cache, dx, g); }};
}

template <class Layer>
void trailing_error_paths(const std::string& name) {
  Eigen::ThreadPool pool(3);
  Eigen::ThreadPoolDevice dev(&pool, 3);
  Layer l(8);
  l.weight().setRandom();
  RM<float, 2> x(3, 8), y(3, 8), dy(3, 8), dx(3, 8);
  x.setRandom();
  dy.setRandom();
  typename Layer::Cache cache;
  typename Layer::Grads grads;
  l.forward(x, y, cache);  // cache and grads hold real values the failures must keep
  l.backward(x, dy, cache, dx, grads);
  y.setConstant(7);
  dx.setConstant(7);
  auto layer_state = [&](Snapshot s) {
    s << l.weight() << cache.rstd << cache.x_dims << grads.weight << grads.bias;
    if constexpr (std::is_same_v<Layer, normkit::LayerNorm<float>>) s << l.bias() << cache.mean;
    return s;
  };
  auto state = [&] { return layer_state(Snapshot() << y << dx); };

  RM<float, 2> x5(3, 5), y4(4, 8), x2(2, 8), dy2(2, 8), dx2(2, 8), dyb(3, 9);
  x5.setRandom();
  x2.setRandom();
  dy2.setRandom();
  for (auto& call : forward_calls(l, x5, y, cache, dev))
    expect_error_keeps_state(name + "::forward: x has 5 features, expected 8 (x is [3, 5])", call, state);
  for (auto& call : forward_calls(l, x, y4, cache, dev))
    expect_error_keeps_state(name + "::forward: y is [4, 8], expected [3, 8] (the shape of x)", call,
                             [&] { return layer_state(Snapshot() << y4); });
  std::vector<float> buf(25, 7.0f);
  Eigen::TensorMap<RM<float, 2>> xm(buf.data(), 3, 8), ym(buf.data() + 1, 3, 8);
  auto buf_state = [&] { return layer_state(Snapshot() << buf); };
  for (auto& call : forward_calls(l, xm, ym, cache, dev))
    expect_error_keeps_state(name + "::forward: y partially overlaps x (only y == x, in place, is supported)", call,
                             buf_state);

  Layer l2(std::vector<Index>{2, 8});
  RM<float, 1> v(8), vy(8);
  RM<float, 3> x3(3, 3, 8), y3(3, 3, 8);
  x3.setRandom();
  typename Layer::Cache c2 = cache;
  auto l2_state = [&] { return Snapshot() << vy << y3 << c2.rstd << c2.x_dims << l2.weight(); };
  for (auto& call : forward_calls(l2, v, vy, c2, dev))
    expect_error_keeps_state(name + "::forward: x has rank 1, expected rank >= 2 (normalized_shape is [2, 8])", call,
                             l2_state);
  for (auto& call : forward_calls(l2, x3, y3, c2, dev))
    expect_error_keeps_state(name + "::forward: x has trailing dims [3, 8], expected normalized_shape [2, 8] (x is [3, 3, 8])",
                             call, l2_state);

  typename Layer::Cache empty, tampered = cache;
  tampered.rstd.resize(2);
  for (auto& call : backward_calls(l, x, dyb, cache, dx, grads, dev))
    expect_error_keeps_state(name + "::backward: dy is [3, 9], expected [3, 8] (the shape of x)", call, state);
  for (auto& call : backward_calls(l, x, dy, cache, dyb, grads, dev))
    expect_error_keeps_state(name + "::backward: dx is [3, 9], expected [3, 8] (the shape of x)", call,
                             [&] { return layer_state(Snapshot() << dyb); });
  for (auto& call : backward_calls(l, x, dy, empty, dx, grads, dev))
    expect_error_keeps_state(name + "::backward: cache is empty, expected the cache filled by forward(x, y, cache)", call,
                             state);
  for (auto& call : backward_calls(l, x2, dy2, cache, dx2, grads, dev))
    expect_error_keeps_state(name + "::backward: cache is from x of shape [3, 8], but x is [2, 8]", call,
                             [&] { return layer_state(Snapshot() << dx2); });
  for (auto& call : backward_calls(l, x, dy, tampered, dx, grads, dev))
    expect_error_keeps_state(name + "::backward: cache holds 2 rows of statistics, expected 3", call, state);
  for (auto& call : backward_calls(l, x5, dyb, cache, dx, grads, dev))
    expect_error_keeps_state(name + "::backward: x has 5 features, expected 8 (x is [3, 5])", call, state);
  Eigen::TensorMap<RM<float, 2>> dxm(buf.data() + 1, 3, 8);
  for (auto& call : backward_calls(l, xm, dy, cache, dxm, grads, dev))
    expect_error_keeps_state(name + "::backward: dx partially overlaps x (only dx == x or dx == dy is supported)", call,
                             buf_state);
  for (auto& call : backward_calls(l, x, xm, cache, dxm, grads, dev))
    expect_error_keeps_state(name + "::backward: dx partially overlaps dy (only dx == x or dx == dy is supported)", call,
                             buf_state);
}

TEST(ErrorPathTest, LayerNormWritesNothingOnError) { trailing_error_paths<normkit::LayerNorm<float>>("LayerNorm"); }
TEST(ErrorPathTest, RMSNormWritesNothingOnError) { trailing_error_paths<normkit::RMSNorm<float>>("RMSNorm"); }

void batch_norm_error_paths(std::optional<double> momentum, bool training) {
  Eigen::ThreadPool pool(3);
  Eigen::ThreadPoolDevice dev(&pool, 3);
  normkit::BatchNorm<float> bn(4, normkit::BatchNormOptions().momentum(momentum));
  bn.weight().setRandom();
  bn.bias().setRandom();
  RM<float, 3> x(3, 4, 2), y(3, 4, 2), dy(3, 4, 2), dx(3, 4, 2);
  x.setRandom();
  dy.setRandom();
  normkit::BatchNorm<float>::Cache cache;
  normkit::BatchNorm<float>::Grads grads;
  bn.forward(x, y, cache);  // one real step: running stats, counter, cache, grads all non-trivial
  bn.backward(x, dy, cache, dx, grads);
  bn.train(training);
  y.setConstant(7);
  dx.setConstant(7);
  auto layer_state = [&](Snapshot s) {
    s << bn.weight() << bn.bias() << bn.running_mean() << bn.running_var() << bn.num_batches_tracked()
      << bn.is_training() << cache.mean << cache.invstd << cache.batch_stats << cache.count << cache.x_dims
      << grads.weight << grads.bias;
    return s;
  };
  auto state = [&] { return layer_state(Snapshot() << y << dx); };
  const std::string F = "BatchNorm::forward: ", B = "BatchNorm::backward: ";

  RM<float, 3> x5(3, 5, 2), y4(3, 4, 3), x2(2, 4, 2), dy2(2, 4, 2), dx2(2, 4, 2), dyb(3, 4, 3);
  x5.setRandom();
  x2.setRandom();
  dy2.setRandom();
  for (auto& call : forward_calls(bn, x5, y, cache, dev))
    expect_error_keeps_state(F + "x has 5 channels on axis 1, expected 4 (x is [3, 5, 2])", call, state);
  for (auto& call : forward_calls(bn, x, y4, cache, dev))
    expect_error_keeps_state(F + "y is [3, 4, 3], expected [3, 4, 2] (the shape of x)", call,
                             [&] { return layer_state(Snapshot() << y4); });
  RM<float, 1> v(4), vy(4);
  for (auto& call : forward_calls(bn, v, vy, cache, dev))
    expect_error_keeps_state(F + "x has rank 1, expected rank >= 2 (x is [4])", call,
                             [&] { return layer_state(Snapshot() << vy); });
  if (training) {
    RM<float, 2> x1(1, 4), y1(1, 4);
    RM<float, 4> x11(1, 4, 1, 1), y11(1, 4, 1, 1);
    x1.setRandom();
    x11.setRandom();
    y1.setConstant(7);
    y11.setConstant(7);
    for (auto& call : forward_calls(bn, x1, y1, cache, dev))
      expect_error_keeps_state(F + "expected more than 1 value per channel when training, got x of shape [1, 4]", call,
                               [&] { return layer_state(Snapshot() << y1); });
    for (auto& call : forward_calls(bn, x11, y11, cache, dev))
      expect_error_keeps_state(F + "expected more than 1 value per channel when training, got x of shape [1, 4, 1, 1]",
                               call, [&] { return layer_state(Snapshot() << y11); });
  }
  std::vector<float> buf(25, 7.0f);
  Eigen::TensorMap<RM<float, 3>> xm(buf.data(), 3, 4, 2), ym(buf.data() + 1, 3, 4, 2);
  auto buf_state = [&] { return layer_state(Snapshot() << buf); };
  for (auto& call : forward_calls(bn, xm, ym, cache, dev))
    expect_error_keeps_state(F + "y partially overlaps x (only y == x, in place, is supported)", call, buf_state);

  normkit::BatchNorm<float> axis3(4, normkit::BatchNormOptions().channel_axis(3));
  normkit::BatchNorm<float>::Cache c3 = cache;
  auto axis_state = [&] {
    return Snapshot() << y << axis3.running_mean() << axis3.running_var() << axis3.num_batches_tracked() << c3.mean
                      << c3.x_dims;
  };
  for (auto& call : forward_calls(axis3, x, y, c3, dev))
    expect_error_keeps_state(F + "channel_axis 3 is out of range for x of rank 3 (x is [3, 4, 2])", call, axis_state);

  normkit::BatchNorm<float>::Cache empty, tampered = cache;
  tampered.mean.resize(3);
  for (auto& call : backward_calls(bn, x, dyb, cache, dx, grads, dev))
    expect_error_keeps_state(B + "dy is [3, 4, 3], expected [3, 4, 2] (the shape of x)", call, state);
  for (auto& call : backward_calls(bn, x, dy, cache, dyb, grads, dev))
    expect_error_keeps_state(B + "dx is [3, 4, 3], expected [3, 4, 2] (the shape of x)", call,
                             [&] { return layer_state(Snapshot() << dyb); });
  for (auto& call : backward_calls(bn, x, dy, empty, dx, grads, dev))
    expect_error_keeps_state(B + "cache is empty, expected the cache filled by forward(x, y, cache)", call, state);
  for (auto& call : backward_calls(bn, x2, dy2, cache, dx2, grads, dev))
    expect_error_keeps_state(B + "cache is from x of shape [3, 4, 2], but x is [2, 4, 2]", call,
                             [&] { return layer_state(Snapshot() << dx2); });
  for (auto& call : backward_calls(bn, x, dy, tampered, dx, grads, dev))
    expect_error_keeps_state(B + "cache holds statistics of 3 channels, expected 4", call, state);
  for (auto& call : backward_calls(bn, x5, dy, cache, dx, grads, dev))
    expect_error_keeps_state(B + "x has 5 channels on axis 1, expected 4 (x is [3, 5, 2])", call, state);
  Eigen::TensorMap<RM<float, 3>> dxm(buf.data() + 1, 3, 4, 2);
  for (auto& call : backward_calls(bn, xm, dy, cache, dxm, grads, dev))
    expect_error_keeps_state(B + "dx partially overlaps x (only dx == x or dx == dy is supported)", call, buf_state);
  for (auto& call : backward_calls(bn, x, xm, cache, dxm, grads, dev))
    expect_error_keeps_state(B + "dx partially overlaps dy (only dx == x or dx == dy is supported)", call, buf_state);
}

TEST(ErrorPathTest, BatchNormTrainingWritesNothingOnError) { batch_norm_error_paths(0.1, true); }
TEST(ErrorPathTest, BatchNormCumulativeAverageWritesNothingOnError) { batch_norm_error_paths(std::nullopt, true); }
TEST(ErrorPathTest, BatchNormEvalWritesNothingOnError) { batch_norm_error_paths(0.1, false); }

TEST(ErrorPathTest, DyTWritesNothingOnError) {
  Eigen::ThreadPool pool(3);
  Eigen::ThreadPoolDevice dev(&pool, 3);
  normkit::DyT<float> l(8);
  l.weight().setRandom();
  l.bias().setRandom();
  RM<float, 2> x(3, 8), y(3, 8), dy(3, 8), dx(3, 8);
  x.setRandom();
  dy.setRandom();
  normkit::DyT<float>::Cache cache;
  normkit::DyT<float>::Grads grads;
  l.forward(x, y, cache);
  l.backward(x, dy, cache, dx, grads);
  y.setConstant(7);
  dx.setConstant(7);
  auto layer_state = [&](Snapshot s) {
    return s << l.alpha() << l.weight() << l.bias() << cache.tanh << cache.alpha << cache.x_dims << grads.alpha
             << grads.weight << grads.bias;
  };
  auto state = [&] { return layer_state(Snapshot() << y << dx); };
  const std::string F = "DyT::forward: ", B = "DyT::backward: ";
  RM<float, 2> x5(3, 5), y4(4, 8), x2(2, 8), dy2(2, 8), dx2(2, 8), dyb(3, 9);
  x5.setRandom();
  x2.setRandom();
  dy2.setRandom();
  for (auto& call : forward_calls(l, x5, y, cache, dev))
    expect_error_keeps_state(F + "x has 5 features, expected 8 (x is [3, 5])", call, state);
  for (auto& call : forward_calls(l, x, y4, cache, dev))
    expect_error_keeps_state(F + "y is [4, 8], expected [3, 8] (the shape of x)", call,
                             [&] { return layer_state(Snapshot() << y4); });
  std::vector<float> buf(25, 7.0f);
  Eigen::TensorMap<RM<float, 2>> xm(buf.data(), 3, 8), ym(buf.data() + 1, 3, 8);
  auto buf_state = [&] { return layer_state(Snapshot() << buf); };
  for (auto& call : forward_calls(l, xm, ym, cache, dev))
    expect_error_keeps_state(F + "y partially overlaps x (only y == x, in place, is supported)", call, buf_state);
  normkit::DyT<float> axis2(8, normkit::DyTOptions().channel_axis(2)), axis0(8, normkit::DyTOptions().channel_axis(0));
  normkit::DyT<float>::Cache c2 = cache;
  auto c2_state = [&] { return Snapshot() << y << c2.tanh << c2.x_dims; };
  for (auto& call : forward_calls(axis2, x, y, c2, dev))
    expect_error_keeps_state(F + "channel_axis 2 is out of range for x of rank 2 (x is [3, 8])", call, c2_state);
  for (auto& call : forward_calls(axis0, x, y, c2, dev))
    expect_error_keeps_state(F + "x has 3 channels on axis 0, expected 8 (x is [3, 8])", call, c2_state);

  normkit::DyT<float>::Cache empty, tampered = cache;
  tampered.tanh.resize(5);
  for (auto& call : backward_calls(l, x, dyb, cache, dx, grads, dev))
    expect_error_keeps_state(B + "dy is [3, 9], expected [3, 8] (the shape of x)", call, state);
  for (auto& call : backward_calls(l, x, dy, cache, dyb, grads, dev))
    expect_error_keeps_state(B + "dx is [3, 9], expected [3, 8] (the shape of x)", call,
                             [&] { return layer_state(Snapshot() << dyb); });
  for (auto& call : backward_calls(l, x, dy, empty, dx, grads, dev))
    expect_error_keeps_state(B + "cache is empty, expected the cache filled by forward(x, y, cache)", call, state);
  for (auto& call : backward_calls(l, x2, dy2, cache, dx2, grads, dev))
    expect_error_keeps_state(B + "cache is from x of shape [3, 8], but x is [2, 8]", call,
                             [&] { return layer_state(Snapshot() << dx2); });
  for (auto& call : backward_calls(l, x, dy, tampered, dx, grads, dev))
    expect_error_keeps_state(B + "cache holds 5 tanh values, expected 24 or none", call, state);
  Eigen::TensorMap<RM<float, 2>> dxm(buf.data() + 1, 3, 8);
  for (auto& call : backward_calls(l, xm, dy, cache, dxm, grads, dev))
    expect_error_keeps_state(B + "dx partially overlaps x (only dx == x or dx == dy is supported)", call, buf_state);
  for (auto& call : backward_calls(l, x, xm, cache, dxm, grads, dev))
    expect_error_keeps_state(B + "dx partially overlaps dy (only dx == x or dx == dy is supported)", call, buf_state);
}

}  // namespace
