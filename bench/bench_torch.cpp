// BM_Torch_*: the same layers through libtorch (Debian libtorch-dev, 1.13, CPU), fp32,
// with the same Args as normkit's rows, so that compare.py pairs them by name. Compiled
// in only when CMake finds Torch (cmake/NormkitPeers.cmake).
//
// What a PyTorch 1.13 C++ user gets: LayerNorm and BatchNorm are the native kernels
// (at::native_layer_norm[_backward], at::native_batch_norm[_backward]); RMSNorm and DyT
// have no kernel in 1.13, so they are the eager expressions a user writes, and their
// backward is autograd over that graph (only the backward is timed: the graph is built
// once and kept with retain_graph). Torch allocates its outputs on every call, as it
// does in a model; inputs are zero-copy views of normkit's buffers.
#include <normkit/normkit.hpp>

#include <torch/torch.h>

#include "common.hpp"

namespace {
using nkbench::Index;
using nkbench::RowTensor2;
constexpr double kEps = 1e-5;
constexpr double kRmsEps = 1e-6;

at::Tensor view(float* data, at::IntArrayRef sizes) { return at::from_blob(data, sizes, at::kFloat); }

/// A torch result as a contiguous row-major buffer in the given dim order, for checking.
at::Tensor dense(const at::Tensor& t) { return t.contiguous(); }

template <class F>
void time_call(benchmark::State& state, F&& call, double bytes_per_float, Index n, int threads) {
  for (auto _ : state) {
    auto out = call();
    benchmark::DoNotOptimize(out);
    benchmark::ClobberMemory();
  }
  nkbench::report(state, bytes_per_float, n, threads);
}

/// [rows, features] inputs, normkit's reference layer with random parameters, and the
/// torch thread count set.
template <class Layer>
struct RowSetup {
  Index rows, features;
  int threads;
  Layer layer;
  RowTensor2 x, y, dy, ref;
  template <class Options>
  RowSetup(const benchmark::State& state, const Options& options)
      : rows(state.range(0)), features(state.range(1)), threads(static_cast<int>(state.range(2))),
        layer(features, options), x(rows, features), y(rows, features), dy(rows, features), ref(rows, features) {
    at::set_num_threads(threads);
    x.setRandom();
    dy.setRandom();
    layer.weight().setRandom();
  }
  at::Tensor X() { return view(x.data(), {rows, features}); }
  at::Tensor dY() { return view(dy.data(), {rows, features}); }
  at::Tensor W() { return view(layer.weight().data(), {features}); }
};

// ---- LayerNorm: the native kernels.

void BM_Torch_LayerNorm_Forward(benchmark::State& state) {
  RowSetup<normkit::LayerNorm<float>> s(state, normkit::LayerNormOptions().eps(kEps));
  s.layer.bias().setRandom();
  s.layer.forward(s.x, s.ref);
  at::NoGradGuard no_grad;
  const at::Tensor X = s.X(), W = s.W(), B = view(s.layer.bias().data(), {s.features});
  auto call = [&] { return std::get<0>(at::native_layer_norm(X, {s.features}, W, B, kEps)); };
  if (!nkbench::check_peer(state, "torch native_layer_norm y", dense(call()).data_ptr<float>(), s.ref.data(),
                           s.x.size()))
    return;
  time_call(state, call, 8, s.x.size(), s.threads);
}

void BM_Torch_LayerNorm_Backward(benchmark::State& state) {
  RowSetup<normkit::LayerNorm<float>> s(state, normkit::LayerNormOptions().eps(kEps));
  s.layer.bias().setRandom();
  normkit::LayerNorm<float>::Cache cache;
  normkit::LayerNorm<float>::Grads grads;
  s.layer.forward(s.x, s.y, cache);
  s.layer.backward(s.x, s.dy, cache, s.ref, grads);
  at::NoGradGuard no_grad;
  const at::Tensor X = s.X(), dY = s.dY(), W = s.W(), B = view(s.layer.bias().data(), {s.features});
  const auto fwd = at::native_layer_norm(X, {s.features}, W, B, kEps);
  const at::Tensor mean = std::get<1>(fwd), rstd = std::get<2>(fwd);
  auto call = [&] { return at::native_layer_norm_backward(dY, X, {s.features}, mean, rstd, W, B, {true, true, true}); };
  const auto g = call();
  if (!nkbench::check_peer(state, "torch native_layer_norm_backward dx", dense(std::get<0>(g)).data_ptr<float>(),
                           s.ref.data(), s.x.size()) ||
      !nkbench::check_peer(state, "torch native_layer_norm_backward dweight",
                           dense(std::get<1>(g)).data_ptr<float>(), grads.weight.data(), s.features, nkbench::kReductionTol) ||
      !nkbench::check_peer(state, "torch native_layer_norm_backward dbias", dense(std::get<2>(g)).data_ptr<float>(),
                           grads.bias.data(), s.features, nkbench::kReductionTol))
    return;
  time_call(state, call, 12, s.x.size(), s.threads);
}

// ---- RMSNorm: the eager expression of a PyTorch 1.13 user (torch.nn.RMSNorm came in 2.4).

at::Tensor rms_norm(const at::Tensor& X, const at::Tensor& W) {
  return X * at::rsqrt(X.pow(2).mean(-1, true) + kRmsEps) * W;
}

void BM_Torch_RMSNorm_Forward(benchmark::State& state) {
  RowSetup<normkit::RMSNorm<float>> s(state, normkit::RMSNormOptions().eps(kRmsEps));
  s.layer.forward(s.x, s.ref);
  at::NoGradGuard no_grad;
  const at::Tensor X = s.X(), W = s.W();
  auto call = [&] { return rms_norm(X, W); };
  if (!nkbench::check_peer(state, "torch eager RMSNorm y", dense(call()).data_ptr<float>(), s.ref.data(), s.x.size()))
    return;
  time_call(state, call, 8, s.x.size(), s.threads);
}

void BM_Torch_RMSNorm_Backward(benchmark::State& state) {
  RowSetup<normkit::RMSNorm<float>> s(state, normkit::RMSNormOptions().eps(kRmsEps));
  normkit::RMSNorm<float>::Cache cache;
  normkit::RMSNorm<float>::Grads grads;
  s.layer.forward(s.x, s.y, cache);
  s.layer.backward(s.x, s.dy, cache, s.ref, grads);
  const at::Tensor X = s.X().detach().requires_grad_(true), W = s.W().detach().requires_grad_(true), dY = s.dY();
  const at::Tensor Y = rms_norm(X, W);
  auto call = [&] { return torch::autograd::grad({Y}, {X, W}, {dY}, /*retain_graph=*/true); };
  const auto g = call();
  if (!nkbench::check_peer(state, "torch autograd RMSNorm dx", dense(g[0]).data_ptr<float>(), s.ref.data(),
                           s.x.size()) ||
      !nkbench::check_peer(state, "torch autograd RMSNorm dweight", dense(g[1]).data_ptr<float>(),
                           grads.weight.data(), s.features, nkbench::kReductionTol))
    return;
  time_call(state, call, 12, s.x.size(), s.threads);
}

// ---- DyT: w * tanh(alpha * x) + b, eager, alpha a one-element parameter as in the paper.

at::Tensor dyt(const at::Tensor& X, const at::Tensor& alpha, const at::Tensor& W, const at::Tensor& B) {
  return W * at::tanh(alpha * X) + B;
}

struct DyTSetup {
  Index rows, features;
  int threads;
  RowTensor2 x, y, dy, ref;
  Eigen::Tensor<float, 1> w, b, dw_ref;
  float alpha = 0.7f;
  explicit DyTSetup(const benchmark::State& state)
      : rows(state.range(0)), features(state.range(1)), threads(static_cast<int>(state.range(2))),
        x(rows, features), y(rows, features), dy(rows, features), ref(rows, features), w(features), b(features),
        dw_ref(features) {
    at::set_num_threads(threads);
    x.setRandom();
    dy.setRandom();
    w.setRandom();
    b.setRandom();
  }
  /// ref = normkit's y (forward) or dx and dw_ref (backward), to check torch against.
  void reference(bool backward) {
    normkit::DyT<float> layer(features);
    layer.alpha() = alpha;
    layer.weight() = w;
    layer.bias() = b;
    typename normkit::DyT<float>::Cache cache;
    typename normkit::DyT<float>::Grads grads;
    layer.forward(x, y, cache);
    if (!backward) {
      ref = y;
      return;
    }
    layer.backward(x, dy, cache, ref, grads);
    dw_ref = grads.weight;
  }
};

void BM_Torch_DyT_Forward(benchmark::State& state) {
  DyTSetup s(state);
  s.reference(false);
  at::NoGradGuard no_grad;
  const at::Tensor X = view(s.x.data(), {s.rows, s.features}), A = at::full({1}, s.alpha),
                   W = view(s.w.data(), {s.features}), B = view(s.b.data(), {s.features});
  auto call = [&] { return dyt(X, A, W, B); };
  if (!nkbench::check_peer(state, "torch eager DyT y", dense(call()).data_ptr<float>(),
                           s.ref.data(), s.x.size()))
    return;
  time_call(state, call, 8, s.x.size(), s.threads);
}

void BM_Torch_DyT_Backward(benchmark::State& state) {
  DyTSetup s(state);
  s.reference(true);
  const at::Tensor X = view(s.x.data(), {s.rows, s.features}).detach().requires_grad_(true),
                   A = at::full({1}, s.alpha).requires_grad_(true),
                   W = view(s.w.data(), {s.features}).detach().requires_grad_(true),
                   B = view(s.b.data(), {s.features}).detach().requires_grad_(true),
                   dY = view(s.dy.data(), {s.rows, s.features});
  const at::Tensor Y = dyt(X, A, W, B);
  auto call = [&] { return torch::autograd::grad({Y}, {X, A, W, B}, {dY}, /*retain_graph=*/true); };
  const auto g = call();
  if (!nkbench::check_peer(state, "torch autograd DyT dx", dense(g[0]).data_ptr<float>(),
                           s.ref.data(), s.x.size()) ||
      !nkbench::check_peer(state, "torch autograd DyT dweight", dense(g[2]).data_ptr<float>(),
                           s.dw_ref.data(), s.features, nkbench::kReductionTol))
    return;
  time_call(state, call, 12, s.x.size(), s.threads);
}

// ---- BatchNorm: the native kernels; NHWC is a channels_last view, as torch stores it.

struct BatchNormSetup {
  int threads;
  const nkbench::BatchNormShape& shape;
  std::array<Index, 4> dims;  // normkit's logical dims (RowMajor)
  Index channels, n;
  normkit::BatchNorm<float> bn;
  nkbench::PageBuffer x, y, dy, ref;
  using Map = Eigen::TensorMap<Eigen::Tensor<float, 4, Eigen::RowMajor>>;

  explicit BatchNormSetup(benchmark::State& state)
      : threads(static_cast<int>(state.range(1))), shape(nkbench::batch_norm_shape(state)), dims(shape.dims),
        channels(shape.channels()), n(shape.size()),
        bn(channels, normkit::BatchNormOptions().eps(kEps).channel_axis(shape.channels_last ? -1 : 1)),
        x(static_cast<std::size_t>(n)), y(x.size()), dy(x.size()), ref(x.size()) {
    at::set_num_threads(threads);
    map(x).setRandom();
    map(dy).setRandom();
    bn.weight().setRandom();
    bn.bias().setRandom();
  }
  Map map(const nkbench::PageBuffer& v) const { return Map(v.data(), dims); }
  /// normkit's buffer as the N, C, ... tensor torch expects (channels_last for NHWC).
  at::Tensor nchw(const nkbench::PageBuffer& v) const {
    if (shape.rank2()) return view(v.data(), {dims[0], dims[1]});
    const at::Tensor t = view(v.data(), {dims[0], dims[1], dims[2], dims[3]});
    return shape.channels_last ? t.permute({0, 3, 1, 2}) : t;
  }
  /// A torch result back in normkit's memory order.
  at::Tensor to_normkit(const at::Tensor& t) const {
    return shape.channels_last ? t.permute({0, 2, 3, 1}).contiguous() : t.contiguous();
  }
  at::Tensor channel(Eigen::Tensor<float, 1>& v) const { return view(v.data(), {channels}); }
};

void BM_Torch_BatchNorm_TrainForward(benchmark::State& state) {
  BatchNormSetup s(state);
  normkit::BatchNorm<float>::Cache cache;
  s.bn.forward(s.map(s.x), s.map(s.ref), cache);
  at::NoGradGuard no_grad;
  const at::Tensor X = s.nchw(s.x), W = s.channel(s.bn.weight()), B = s.channel(s.bn.bias());
  at::Tensor rm = at::zeros({s.channels}), rv = at::ones({s.channels});
  auto call = [&] { return std::get<0>(at::native_batch_norm(X, W, B, rm, rv, true, 0.1, kEps)); };
  if (!nkbench::check_peer(state, "torch native_batch_norm (train) y", s.to_normkit(call()).data_ptr<float>(),
                           s.ref.data(), s.n))
    return;
  time_call(state, call, 8, s.n, s.threads);
}

void BM_Torch_BatchNorm_TrainBackward(benchmark::State& state) {
  BatchNormSetup s(state);
  normkit::BatchNorm<float>::Cache cache;
  normkit::BatchNorm<float>::Grads grads;
  s.bn.forward(s.map(s.x), s.map(s.y), cache);
  s.bn.backward(s.map(s.x), s.map(s.dy), cache, s.map(s.ref), grads);
  at::NoGradGuard no_grad;
  const at::Tensor X = s.nchw(s.x), dY = s.nchw(s.dy), W = s.channel(s.bn.weight()), B = s.channel(s.bn.bias());
  at::Tensor rm = at::zeros({s.channels}), rv = at::ones({s.channels});
  const auto fwd = at::native_batch_norm(X, W, B, rm, rv, true, 0.1, kEps);
  const at::Tensor save_mean = std::get<1>(fwd), save_invstd = std::get<2>(fwd);
  auto call = [&] {
    return at::native_batch_norm_backward(dY, X, W, rm, rv, save_mean, save_invstd, true, kEps, {true, true, true});
  };
  const auto g = call();
  if (!nkbench::check_peer(state, "torch native_batch_norm_backward dx",
                           s.to_normkit(std::get<0>(g)).data_ptr<float>(), s.ref.data(), s.n) ||
      !nkbench::check_peer(state, "torch native_batch_norm_backward dweight", dense(std::get<1>(g)).data_ptr<float>(),
                           grads.weight.data(), s.channels, nkbench::kReductionTol) ||
      !nkbench::check_peer(state, "torch native_batch_norm_backward dbias", dense(std::get<2>(g)).data_ptr<float>(),
                           grads.bias.data(), s.channels, nkbench::kReductionTol))
    return;
  time_call(state, call, 12, s.n, s.threads);
}

void BM_Torch_BatchNorm_EvalForward(benchmark::State& state) {
  BatchNormSetup s(state);
  s.bn.running_mean().setRandom();
  s.bn.running_var() = s.bn.running_var().random().abs() + 0.5f;
  s.bn.eval();
  s.bn.forward(s.map(s.x), s.map(s.ref));
  at::NoGradGuard no_grad;
  const at::Tensor X = s.nchw(s.x), W = s.channel(s.bn.weight()), B = s.channel(s.bn.bias()),
                   rm = s.channel(s.bn.running_mean()), rv = s.channel(s.bn.running_var());
  auto call = [&] { return std::get<0>(at::native_batch_norm(X, W, B, rm, rv, false, 0.1, kEps)); };
  if (!nkbench::check_peer(state, "torch native_batch_norm (eval) y", s.to_normkit(call()).data_ptr<float>(),
                           s.ref.data(), s.n))
    return;
  time_call(state, call, 8, s.n, s.threads);
}

BENCHMARK(BM_Torch_LayerNorm_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_Torch_LayerNorm_Backward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_Torch_RMSNorm_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_Torch_RMSNorm_Backward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_Torch_DyT_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_Torch_DyT_Backward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_Torch_BatchNorm_TrainForward)->Apply(nkbench::batch_norm_shapes);
BENCHMARK(BM_Torch_BatchNorm_TrainBackward)->Apply(nkbench::batch_norm_shapes);
BENCHMARK(BM_Torch_BatchNorm_EvalForward)->Apply(nkbench::batch_norm_shapes);

}  // namespace
