// DyT as a literal drop-in for LayerNorm: one generic pre-norm residual block,
// out = x + norm(x) W, written once against the common surface (forward, backward,
// Cache, Grads, weight()) and instantiated unchanged with LayerNorm, RMSNorm and DyT.
// Its backward is checked against finite differences of its own loss, and a few SGD
// steps must lower that loss, for each of the three layers. The same surface takes
// every dense Eigen tensor a user may hold: Eigen::TensorFixedSize and maps of it too,
// and Eigen tensor expressions as inputs (evaluated first); and every layer's
// reset_parameters() brings it back to its initial state, as PyTorch's.
#include <normkit/normkit.hpp>

#include "test_support.hpp"

namespace {

using nktest::Index;
using nktest::error_of;
using Tensor2 = Eigen::Tensor<double, 2, Eigen::RowMajor>;
using Pair = Eigen::IndexPair<int>;

/// x + norm(x) W for x [tokens, F], W [F, F]; loss 0.5 |out - target|^2.
template <class Norm>
struct PreNormBlock {
  Norm norm;
  Tensor2 W;
  typename Norm::Cache cache;
  Tensor2 h;  // norm(x), kept for dW

  struct Grads {
    Tensor2 dW;
    typename Norm::Grads norm;
  };

  explicit PreNormBlock(Index F) : norm(F), W(F, F) {
    const auto w = nktest::random_vector(F * F, 40, -0.3, 0.3);
    std::copy(w.begin(), w.end(), W.data());
  }

  template <class Device>
  Tensor2 forward(const Device& dev, const Tensor2& x) {
    h = Tensor2(x.dimensions());
    norm.forward(dev, x, h, cache);
    const Eigen::array<Pair, 1> hw = {Pair(1, 0)};
    return x + h.contract(W, hw);
  }

  /// dx from dout; fills g.
  template <class Device>
  Tensor2 backward(const Device& dev, const Tensor2& x, const Tensor2& dout, Grads& g) {
    const Eigen::array<Pair, 1> tt = {Pair(0, 0)}, wt = {Pair(1, 1)};
    g.dW = h.contract(dout, tt);               // h^T dout
    const Tensor2 dh = dout.contract(W, wt);  // dout W^T
    Tensor2 dnorm(x.dimensions());
    norm.backward(dev, x, dh, cache, dnorm, g.norm);
    return dout + dnorm;
  }

  void step(const Grads& g, double lr) {
    W = W - g.dW * lr;
    norm.weight() = norm.weight() - g.norm.weight * lr;
  }
};

template <class Block>
double loss(Block& block, const Tensor2& x, const Tensor2& target) {
  const Tensor2 out = block.forward(Eigen::DefaultDevice(), x);
  const Eigen::Tensor<double, 0, Eigen::RowMajor> s = (out - target).square().sum();
  return 0.5 * s();
}

template <class Norm>
class DropInTest : public ::testing::Test {};
using Layers = ::testing::Types<normkit::LayerNorm<double>, normkit::RMSNorm<double>, normkit::DyT<double>>;
struct LayerNames {
  template <class N>
  static std::string GetName(int) {
    if (std::is_same_v<N, normkit::LayerNorm<double>>) return "LayerNorm";
    if (std::is_same_v<N, normkit::RMSNorm<double>>) return "RMSNorm";
    return "DyT";
  }
};
TYPED_TEST_SUITE(DropInTest, Layers, LayerNames);

Tensor2 random_tensor(Index rows, Index cols, unsigned seed) {
  Tensor2 t(rows, cols);
  const auto v = nktest::random_vector(rows * cols, seed);
  std::copy(v.begin(), v.end(), t.data());
  return t;
}

TYPED_TEST(DropInTest, BlockBackwardMatchesFiniteDifference) {
  const Index tokens = 5, F = 12;
  PreNormBlock<TypeParam> block(F);
  const Tensor2 x = random_tensor(tokens, F, 41), target = random_tensor(tokens, F, 42);
  typename PreNormBlock<TypeParam>::Grads g;
  const Tensor2 out = block.forward(Eigen::DefaultDevice(), x);
  const Tensor2 dx = block.backward(Eigen::DefaultDevice(), x, Tensor2(out - target), g);
  const double h = 1e-6;
  for (Index i = 0; i < x.size(); i += 7) {
    Tensor2 xp = x, xm = x;
    xp.data()[i] += h;
    xm.data()[i] -= h;
    const double fd = (loss(block, xp, target) - loss(block, xm, target)) / (2 * h);
    EXPECT_NEAR(dx.data()[i], fd, 1e-6 * (1 + std::fabs(fd))) << "dx at " << i;
  }
  for (Index i = 0; i < block.W.size(); i += 11) {
    const double keep = block.W.data()[i];
    block.W.data()[i] = keep + h;
    const double lp = loss(block, x, target);
    block.W.data()[i] = keep - h;
    const double lm = loss(block, x, target);
    block.W.data()[i] = keep;
    EXPECT_NEAR(g.dW.data()[i], (lp - lm) / (2 * h), 1e-6 * (1 + std::fabs(lp - lm) / h)) << "dW at " << i;
  }
  for (Index c = 0; c < F; c += 3) {
    auto& w = block.norm.weight();
    const double keep = w(c);
    w(c) = keep + h;
    const double lp = loss(block, x, target);
    w(c) = keep - h;
    const double lm = loss(block, x, target);
    w(c) = keep;
    EXPECT_NEAR(g.norm.weight(c), (lp - lm) / (2 * h), 1e-6 * (1 + std::fabs(lp - lm) / h))
        << "dweight at " << c;
  }
}

TYPED_TEST(DropInTest, TrainingLowersTheLossOnOneAndTwoThreads) {
  const Index tokens = 16, F = 24;
  const Tensor2 x = random_tensor(tokens, F, 43), target = random_tensor(tokens, F, 44);
  std::vector<double> final_loss;
  for (int threads : {1, 2}) {
    PreNormBlock<TypeParam> block(F);
    const double before = loss(block, x, target);
    nktest::on_threads(threads, [&](const auto& dev) {
      for (int step = 0; step < 30; ++step) {
        typename PreNormBlock<TypeParam>::Grads g;
        const Tensor2 out = block.forward(dev, x);
        block.backward(dev, x, Tensor2(out - target), g);
        block.step(g, 0.02);
      }
    });
    const double after = loss(block, x, target);
    EXPECT_LT(after, 0.5 * before) << threads << " threads";
    final_loss.push_back(after);
  }
  // The layer's part is bitwise thread-invariant; Eigen's contraction also is at this size.
  EXPECT_EQ(final_loss[0], final_loss[1]);
}

// ---- Fixed-size tensors: the same surface, the same bits as Eigen::Tensor. ----

template <class Layer>
Layer channels_last(Index features) {
  if constexpr (std::is_same_v<Layer, normkit::BatchNorm<float>>)
    return Layer(features, normkit::BatchNormOptions().channel_axis(-1));
  else
    return Layer(features);
}

template <class Dst, class Src>
void copy_into(Dst& dst, const Src& src) {
  std::copy(src.data(), src.data() + src.size(), dst.data());
}

template <class T>
std::vector<T> flat(const T* p, Index n) {
  return std::vector<T>(p, p + n);
}

/// Two training steps gave the same bits: y, dx and the weight gradient.
template <class A, class B, class Grads>
void expect_same_step(const A& y_a, const A& dx_a, const Grads& g_a, const B& y_b, const B& dx_b, const Grads& g_b) {
  const Index n = y_a.size();
  EXPECT_TRUE(nktest::bitwise_equal(flat(y_a.data(), n), flat(y_b.data(), n))) << "y";
  EXPECT_TRUE(nktest::bitwise_equal(flat(dx_a.data(), n), flat(dx_b.data(), n))) << "dx";
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(g_a.weight), nktest::values(g_b.weight))) << "dweight";
}

template <class Layer, int Layout>
void expect_fixed_size_matches_dynamic() {
  using Fixed = Eigen::TensorFixedSize<float, Eigen::Sizes<3, 5, 7>, Layout>;
  using Dynamic = Eigen::Tensor<float, 3, Layout>;
  const Index n = 3 * 5 * 7;
  Fixed x, dy, y, dx, y_map;
  const auto xv = nktest::random_vector(n, 45), dyv = nktest::random_vector(n, 46);
  std::copy(xv.begin(), xv.end(), x.data());
  std::copy(dyv.begin(), dyv.end(), dy.data());
  Dynamic xd(3, 5, 7), dyd(3, 5, 7), yd(3, 5, 7), dxd(3, 5, 7);
  copy_into(xd, x);
  copy_into(dyd, dy);

  Layer fixed_layer = channels_last<Layer>(7), dynamic_layer = channels_last<Layer>(7);
  typename Layer::Cache fixed_cache, dynamic_cache;
  typename Layer::Grads fixed_grads, dynamic_grads;
  fixed_layer.forward(x, y, fixed_cache);
  fixed_layer.backward(x, dy, fixed_cache, dx, fixed_grads);
  dynamic_layer.forward(xd, yd, dynamic_cache);
  dynamic_layer.backward(xd, dyd, dynamic_cache, dxd, dynamic_grads);
  expect_same_step(y, dx, fixed_grads, yd, dxd, dynamic_grads);
  EXPECT_TRUE(std::all_of(y.data(), y.data() + n, [](float v) { return v != 0 && std::isfinite(v); }));

  // Maps of fixed-size tensors (const input), on a thread pool, in inference.
  dynamic_layer.forward(xd, yd);
  const Eigen::TensorMap<const Fixed> x_map(x.data(), 3, 5, 7);
  Eigen::TensorMap<Fixed> out_map(y_map.data(), 3, 5, 7);
  nktest::on_threads(2, [&](const auto& dev) { dynamic_layer.forward(dev, x_map, out_map); });
  EXPECT_TRUE(nktest::bitwise_equal(flat(y_map.data(), n), flat(yd.data(), n))) << "y through maps";
}

template <class Layer>
class FixedSizeTest : public ::testing::Test {};
using FloatLayers = ::testing::Types<normkit::LayerNorm<float>, normkit::RMSNorm<float>, normkit::DyT<float>,
                                     normkit::BatchNorm<float>>;
struct FloatLayerNames {
  template <class L>
  static std::string GetName(int) {
    if (std::is_same_v<L, normkit::LayerNorm<float>>) return "LayerNorm";
    if (std::is_same_v<L, normkit::RMSNorm<float>>) return "RMSNorm";
    if (std::is_same_v<L, normkit::DyT<float>>) return "DyT";
    return "BatchNorm";
  }
};
TYPED_TEST_SUITE(FixedSizeTest, FloatLayers, FloatLayerNames);

TYPED_TEST(FixedSizeTest, FixedSizeTensorsAndTheirMapsGiveTheBitsOfTensors) {
  expect_fixed_size_matches_dynamic<TypeParam, Eigen::RowMajor>();
  expect_fixed_size_matches_dynamic<TypeParam, Eigen::ColMajor>();
}

TEST(FixedSizeTest, AWrongFixedShapeThrowsWithTheShape) {
  normkit::LayerNorm<float> ln(8);
  Eigen::TensorFixedSize<float, Eigen::Sizes<2, 6>, Eigen::RowMajor> x, y;
  x.setConstant(1.5f);
  y.setConstant(-3.0f);
  EXPECT_EQ(error_of([&] { ln.forward(x, y); }), "LayerNorm::forward: x has 6 features, expected 8 (x is [2, 6])");
  EXPECT_TRUE(nktest::all_equal(y.data(), y.size(), -3.0f));
}

// ---- Inputs may be Eigen tensor expressions (slices, reshapes, arithmetic), evaluated
// first; outputs are dense tensors. ----

template <class Layer, int Layout>
void expect_expressions_match_tensors() {
  using Tensor3 = Eigen::Tensor<float, 3, Layout>;
  using Dims = Eigen::array<Index, 3>;
  Tensor3 wide(3, 5, 14);
  Eigen::Tensor<float, 2, Layout> flat_dy(15, 7);
  const auto xv = nktest::random_vector(wide.size(), 47), dyv = nktest::random_vector(flat_dy.size(), 48);
  std::copy(xv.begin(), xv.end(), wide.data());
  std::copy(dyv.begin(), dyv.end(), flat_dy.data());
  const auto x_expr = wide.slice(Dims{{0, 0, 7}}, Dims{{3, 5, 7}});  // strided: not a map
  const auto dy_expr = flat_dy.reshape(Dims{{3, 5, 7}}) * 0.5f;
  const Tensor3 x = x_expr, dy = dy_expr;

  Layer expr_layer = channels_last<Layer>(7), tensor_layer = channels_last<Layer>(7);
  typename Layer::Cache expr_cache, tensor_cache;
  typename Layer::Grads expr_grads, tensor_grads;
  Tensor3 y_expr(3, 5, 7), dx_expr(3, 5, 7), y_infer(3, 5, 7), y(3, 5, 7), dx(3, 5, 7);
  expr_layer.forward(x_expr, y_expr, expr_cache);
  expr_layer.backward(x_expr, dy_expr, expr_cache, dx_expr, expr_grads);
  tensor_layer.forward(x, y, tensor_cache);
  tensor_layer.backward(x, dy, tensor_cache, dx, tensor_grads);
  const Index n = x.size();
  expect_same_step(y_expr, dx_expr, expr_grads, y, dx, tensor_grads);
  EXPECT_TRUE(std::all_of(dx.data(), dx.data() + n, [](float v) { return v != 0 && std::isfinite(v); }));

  // On a pool, inference, and in place: x's own storage as the output of an expression
  // of it (evaluated before y is written).
  tensor_layer.forward(x, y_infer);
  nktest::on_threads(2, [&](const auto& dev) {
    expr_layer.forward(dev, x_expr, y_expr);
    expr_layer.backward(dev, x_expr, dy_expr, expr_cache, dx_expr, expr_grads);
  });
  EXPECT_TRUE(nktest::bitwise_equal(flat(y_expr.data(), n), flat(y_infer.data(), n))) << "y on a pool";
  EXPECT_TRUE(nktest::bitwise_equal(flat(dx_expr.data(), n), flat(dx.data(), n))) << "dx on a pool";
  Tensor3 in_place = x;
  tensor_layer.forward(in_place * 1.0f, in_place);
  EXPECT_TRUE(nktest::bitwise_equal(flat(in_place.data(), n), flat(y_infer.data(), n))) << "in place";
}

template <class Layer>
class ExpressionInputTest : public ::testing::Test {};
TYPED_TEST_SUITE(ExpressionInputTest, FloatLayers, FloatLayerNames);

TYPED_TEST(ExpressionInputTest, ExpressionsGiveTheBitsOfTheirEvaluatedTensors) {
  expect_expressions_match_tensors<TypeParam, Eigen::RowMajor>();
  expect_expressions_match_tensors<TypeParam, Eigen::ColMajor>();
}

/// Whether layer.forward(x, y) is a call that compiles.
template <class Layer, class X, class Y, class = void>
struct can_forward : std::false_type {};
template <class Layer, class X, class Y>
struct can_forward<Layer, X, Y, std::void_t<decltype(std::declval<const Layer&>().forward(std::declval<X>(), std::declval<Y>()))>>
    : std::true_type {};

TEST(ExpressionInputTest, OutputsMustBeDenseTensors) {
  using T2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  using Sum = decltype(std::declval<T2&>() + std::declval<T2&>());
  static_assert(can_forward<normkit::LayerNorm<float>, Sum, T2&>::value, "an expression is an input");
  static_assert(!can_forward<normkit::LayerNorm<float>, T2&, Sum>::value, "an expression is no output");
  static_assert(!can_forward<normkit::DyT<float>, T2&, Sum>::value, "an expression is no output");
  SUCCEED();
}

TEST(ExpressionInputTest, AWrongShapeThrowsWithTheEvaluatedShape) {
  normkit::LayerNorm<float> ln(8);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(4, 8), y(4, 8);
  x.setConstant(1.5f);
  y.setConstant(-3.0f);
  EXPECT_EQ(error_of([&] { ln.forward(x.reshape(Eigen::array<Index, 2>{{8, 4}}), y); }),
            "LayerNorm::forward: x has 4 features, expected 8 (x is [8, 4])");
  EXPECT_TRUE(nktest::all_equal(y.data(), y.size(), -3.0f));
}

TEST(ExpressionInputTest, ExpressionsOfFixedSizeTensorsAndIntIndicesAreInputs) {
  Eigen::TensorFixedSize<float, Eigen::Sizes<3, 8>, Eigen::RowMajor> fixed, y_fixed;
  Eigen::Tensor<float, 2, Eigen::RowMajor, int> small(3, 8), y_small(3, 8);
  Eigen::Tensor<float, 2, Eigen::RowMajor> doubled(3, 8), y(3, 8);
  const auto xv = nktest::random_vector(24, 50);
  std::copy(xv.begin(), xv.end(), fixed.data());
  std::copy(xv.begin(), xv.end(), small.data());
  std::transform(xv.begin(), xv.end(), doubled.data(), [](double v) { return 2 * static_cast<float>(v); });
  const normkit::LayerNorm<float> ln(8);
  ln.forward(fixed * 2.f, y_fixed);  // the evaluator's dims are Sizes<3, 8> here
  ln.forward(small * 2.f, y_small);  // and DSizes<int, 2> here
  ln.forward(doubled, y);
  EXPECT_TRUE(nktest::bitwise_equal(flat(y_fixed.data(), 24), flat(y.data(), 24))) << "fixed-size";
  EXPECT_TRUE(nktest::bitwise_equal(flat(y_small.data(), 24), flat(y.data(), 24))) << "int indices";
}

template <class Half>
void expect_cast_is_input() {
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(6, 10);
  const auto xv = nktest::random_vector(x.size(), 49);
  std::copy(xv.begin(), xv.end(), x.data());
  const Eigen::Tensor<Half, 2, Eigen::RowMajor> xh = x.cast<Half>();
  Eigen::Tensor<Half, 2, Eigen::RowMajor> y_expr(6, 10), y_pool(6, 10), y(6, 10);
  const normkit::RMSNorm<Half> rms(10);
  rms.forward(x.cast<Half>(), y_expr);
  nktest::on_threads(2, [&](const auto& dev) { rms.forward(dev, x.cast<Half>(), y_pool); });
  rms.forward(xh, y);
  EXPECT_TRUE(nktest::bitwise_equal(flat(y_expr.data(), y.size()), flat(y.data(), y.size())));
  EXPECT_TRUE(nktest::bitwise_equal(flat(y_pool.data(), y.size()), flat(y.data(), y.size()))) << "on a pool";
}

// (bfloat16 goes through dense()'s one-thread path where GCC has bug 105593.)
TEST(ExpressionInputTest, ACastTo16BitsIsAnInputOfA16BitLayer) {
  expect_cast_is_input<Eigen::half>();
  expect_cast_is_input<Eigen::bfloat16>();
}

// ---- Empty owning outputs are sized to x, as PyTorch sizes an empty out= tensor. ----

template <class Layer>
class EmptyOutputTest : public ::testing::Test {};
TYPED_TEST_SUITE(EmptyOutputTest, FloatLayers, FloatLayerNames);

template <class Layer, int Layout>
void expect_empty_outputs_sized_like_x() {
  using Tensor = Eigen::Tensor<float, 3, Layout>;
  const Index n = Index{4} * 3 * 5;
  Tensor x(4, 3, 5), dy(4, 3, 5), y_sized(4, 3, 5), dx_sized(4, 3, 5);
  const auto xv = nktest::random_vector(n, 48), dyv = nktest::random_vector(n, 49);
  std::copy(xv.begin(), xv.end(), x.data());
  std::copy(dyv.begin(), dyv.end(), dy.data());
  Layer sized_layer = channels_last<Layer>(5), empty_layer = channels_last<Layer>(5);
  typename Layer::Cache sized_cache, empty_cache;
  typename Layer::Grads sized_grads, empty_grads;
  sized_layer.forward(x, y_sized, sized_cache);
  sized_layer.backward(x, dy, sized_cache, dx_sized, sized_grads);

  Tensor y, dx;  // default-constructed: no elements
  empty_layer.forward(x, y, empty_cache);
  empty_layer.backward(x, dy, empty_cache, dx, empty_grads);
  ASSERT_EQ(normkit::detail::dims_of(y), (std::vector<Index>{4, 3, 5}));
  ASSERT_EQ(normkit::detail::dims_of(dx), (std::vector<Index>{4, 3, 5}));
  EXPECT_TRUE(nktest::bitwise_equal(flat(y.data(), n), flat(y_sized.data(), n))) << "y";
  EXPECT_TRUE(nktest::bitwise_equal(flat(dx.data(), n), flat(dx_sized.data(), n))) << "dx";
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(empty_grads.weight), nktest::values(sized_grads.weight)));

  // Inference and a device, into an output of no elements but another shape.
  Tensor y_inference(0, 7, 2);
  nktest::on_threads(2, [&](const auto& dev) { sized_layer.forward(dev, x, y_inference); });
  sized_layer.forward(x, y_sized);
  ASSERT_EQ(normkit::detail::dims_of(y_inference), (std::vector<Index>{4, 3, 5}));
  EXPECT_TRUE(nktest::bitwise_equal(flat(y_inference.data(), n), flat(y_sized.data(), n))) << "y inference";
}

TYPED_TEST(EmptyOutputTest, EmptyOwningOutputsAreSizedLikeX) {
  expect_empty_outputs_sized_like_x<TypeParam, Eigen::RowMajor>();
  expect_empty_outputs_sized_like_x<TypeParam, Eigen::ColMajor>();
}

TYPED_TEST(EmptyOutputTest, RefusedCallsLeaveAnEmptyOutputEmpty) {
  using Layer = TypeParam;
  using Tensor = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  Layer layer = channels_last<Layer>(5);
  Tensor x(3, 5), wrong(3, 4), dy(3, 5), y, dx;
  x.setConstant(0.25f);
  dy.setConstant(1.0f);
  typename Layer::Cache cache;
  typename Layer::Grads grads;
  EXPECT_THROW(layer.forward(wrong, y, cache), normkit::Error);
  EXPECT_EQ(normkit::detail::dims_of(y), (std::vector<Index>{0, 0}));
  // backward without a filled cache is refused after dx passed its own check
  EXPECT_THROW(layer.backward(x, dy, cache, dx, grads), normkit::Error);
  EXPECT_EQ(normkit::detail::dims_of(dx), (std::vector<Index>{0, 0}));
  if constexpr (std::is_same_v<Layer, normkit::BatchNorm<float>>) {
    Tensor one_row(1, 5);
    one_row.setConstant(1.0f);
    EXPECT_THROW(layer.forward(one_row, y), normkit::Error);  // one value per channel
    EXPECT_EQ(normkit::detail::dims_of(y), (std::vector<Index>{0, 0}));
    // With a reducer that check comes after the reductions (here over one process).
    struct OneProcess : normkit::StatsReducer {
      void allreduce_sum(double*, Index) override {}
    };
    normkit::BatchNorm<float> synced(
        5, normkit::BatchNormOptions().channel_axis(-1).reducer(std::make_shared<OneProcess>()));
    EXPECT_THROW(synced.forward(one_row, y), normkit::Error);
    EXPECT_EQ(normkit::detail::dims_of(y), (std::vector<Index>{0, 0}));
    Tensor y_local(3, 5);
    x.setValues({{1, 2, 3, 4, 5}, {0, -1, 2, 7, 1}, {3, 3, 1, 0, 2}});
    layer.forward(x, y_local);
    synced.forward(x, y);
    ASSERT_EQ(normkit::detail::dims_of(y), (std::vector<Index>{3, 5}));
    EXPECT_TRUE(nktest::bitwise_equal(flat(y.data(), 15), flat(y_local.data(), 15)));
  }
}

TEST(EmptyOutputTest, OutputsWithElementsOrMapsOfAnotherShapeStillThrow) {
  normkit::LayerNorm<float> ln(4);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(2, 4), y(3, 4);
  x.setConstant(1.0f);
  y.setConstant(-2.0f);
  EXPECT_EQ(error_of([&] { ln.forward(x, y); }),
            "LayerNorm::forward: y is [3, 4], expected [2, 4] (the shape of x)");
  EXPECT_TRUE(nktest::all_equal(y.data(), y.size(), -2.0f));
  // A map cannot be resized: an empty one is refused with its shape.
  Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> empty_map(y.data(), 0, 4);
  EXPECT_EQ(error_of([&] { ln.forward(x, empty_map); }),
            "LayerNorm::forward: y is [0, 4], expected [2, 4] (the shape of x)");
}

// ---- reset_parameters(): the state of a new layer, as in PyTorch. ----

template <class Layer>
class ResetTest : public ::testing::Test {};
TYPED_TEST_SUITE(ResetTest, FloatLayers, FloatLayerNames);

TYPED_TEST(ResetTest, ResetParametersGivesTheOutputOfANewLayer) {
  using Layer = TypeParam;
  using Tensor = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  const Index rows = 6, F = 10;
  Tensor x(rows, F), y_new(rows, F), y_reset(rows, F), y_changed(rows, F);
  const auto xv = nktest::random_vector(rows * F, 47);
  std::copy(xv.begin(), xv.end(), x.data());
  Layer fresh = channels_last<Layer>(F), used = channels_last<Layer>(F);
  // Change every parameter (and BatchNorm's running statistics, through training steps).
  used.weight().setConstant(2.5f);
  if constexpr (!std::is_same_v<Layer, normkit::RMSNorm<float>>) used.bias().setConstant(-0.75f);
  if constexpr (std::is_same_v<Layer, normkit::DyT<float>>) used.alpha() = 1.75f;
  if constexpr (std::is_same_v<Layer, normkit::BatchNorm<float>>) {
    for (int step = 0; step < 3; ++step) used.forward(x, y_changed);
    EXPECT_EQ(used.num_batches_tracked(), 3);
    fresh.eval();
    used.eval();
  }
  fresh.forward(x, y_new);
  used.forward(x, y_changed);
  EXPECT_FALSE(nktest::bitwise_equal(flat(y_new.data(), rows * F), flat(y_changed.data(), rows * F)));

  used.reset_parameters();
  used.forward(x, y_reset);
  EXPECT_TRUE(nktest::bitwise_equal(flat(y_new.data(), rows * F), flat(y_reset.data(), rows * F)));
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(used.weight()), std::vector<float>(F, 1.0f)));
  if constexpr (!std::is_same_v<Layer, normkit::RMSNorm<float>>) {
    EXPECT_TRUE(nktest::bitwise_equal(nktest::values(used.bias()), std::vector<float>(F, 0.0f)));
  }
  if constexpr (std::is_same_v<Layer, normkit::DyT<float>>) {
    EXPECT_EQ(used.alpha(), 0.5f);
  }
  if constexpr (std::is_same_v<Layer, normkit::BatchNorm<float>>) {
    EXPECT_TRUE(nktest::bitwise_equal(nktest::values(used.running_mean()), std::vector<float>(F, 0.0f)));
    EXPECT_TRUE(nktest::bitwise_equal(nktest::values(used.running_var()), std::vector<float>(F, 1.0f)));
    EXPECT_EQ(used.num_batches_tracked(), 0);
  }
}

TEST(ResetTest, ResetParametersKeepsAnAlphaInitOtherThanTheDefault) {
  normkit::DyT<double> d(4, normkit::DyTOptions().alpha_init(0.2));
  d.alpha() = 3.0;
  d.reset_parameters();
  EXPECT_EQ(d.alpha(), 0.2);
}

TEST(ResetTest, BatchNormResetRunningStatsKeepsTheAffineParameters) {
  normkit::BatchNorm<float> bn(3);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(4, 3), y(4, 3);
  x.setValues({{1, 2, 3}, {4, 5, 6}, {7, 8, 10}, {0, -1, 2}});
  EXPECT_TRUE(bn.training());
  bn.forward(x, y);
  bn.weight().setConstant(2.0f);
  bn.reset_running_stats();
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(bn.running_mean()), std::vector<float>(3, 0.0f)));
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(bn.running_var()), std::vector<float>(3, 1.0f)));
  EXPECT_EQ(bn.num_batches_tracked(), 0);
  EXPECT_TRUE(nktest::bitwise_equal(nktest::values(bn.weight()), std::vector<float>(3, 2.0f)));
  bn.eval();
  EXPECT_FALSE(bn.training());
  bn.train();
  EXPECT_TRUE(bn.training());
}

}  // namespace
