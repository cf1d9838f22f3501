// DyT as a literal drop-in for LayerNorm: one generic pre-norm residual block,
// out = x + norm(x) W, written once against the common surface (forward, backward,
// Cache, Grads, weight()) and instantiated unchanged with LayerNorm, RMSNorm and DyT.
// Its backward is checked against finite differences of its own loss, and a few SGD
// steps must lower that loss, for each of the three layers.
#include <normkit/normkit.hpp>

#include "test_support.hpp"

namespace {

using nktest::Index;
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

}  // namespace
