// BM_BatchNorm_*: fp32, RowMajor, the shapes of nkbench::kBatchNormShapes (32x64x56x56
// as NCHW, channel axis 1, and as NHWC, channels-last, axis -1; 256x512 as N x C;
// 32x256x14x14 and 32x512x7x7 NCHW) at the thread counts of nkbench::thread_list.
// Bytes: forward 8 B/float (read x, write y), backward 12 B/float (read x and dy, write
// dx).
#include <normkit/normkit.hpp>

#include "common.hpp"

namespace {
using nkbench::Index;
using Tensor4 = nkbench::PageTensor<4>;
using Tensor2 = nkbench::PageTensor<2>;

/// Calls f(x, y, dy, dx, layer) with tensors of the shape `s` (rank 2 for N x C).
template <class F>
void with_shape(const nkbench::BatchNormShape& s, F&& f) {
  normkit::BatchNorm<float> bn(s.channels(), normkit::BatchNormOptions().channel_axis(s.channels_last ? -1 : 1));
  if (s.rank2()) {
    Tensor2 x(s.dims[0], s.dims[1]), y(s.dims[0], s.dims[1]), dy(s.dims[0], s.dims[1]), dx(s.dims[0], s.dims[1]);
    f(x, y, dy, dx, bn);
    return;
  }
  Tensor4 x(s.dims), y(s.dims), dy(s.dims), dx(s.dims);
  f(x, y, dy, dx, bn);
}

void BM_BatchNorm_TrainForward(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(1));
  Index n = 0;
  with_shape(nkbench::batch_norm_shape(state), [&](auto& x, auto& y, auto&, auto&, auto& bn) {
    x.setRandom();
    n = x.size();
    normkit::BatchNorm<float>::Cache cache;
    nkbench::with_device(threads, [&](const auto& dev) {
      bn.forward(dev, x, y, cache);  // first touch of y and the scratch outside the timing
      for (auto _ : state) {
        bn.forward(dev, x, y, cache);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      }
    });
  });
  nkbench::report(state, 8, n, threads);
}

void BM_BatchNorm_TrainBackward(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(1));
  Index n = 0;
  with_shape(nkbench::batch_norm_shape(state), [&](auto& x, auto& y, auto& dy, auto& dx, auto& bn) {
    x.setRandom();
    dy.setRandom();
    n = x.size();
    normkit::BatchNorm<float>::Cache cache;
    normkit::BatchNorm<float>::Grads grads;
    bn.forward(x, y, cache);
    nkbench::with_device(threads, [&](const auto& dev) {
      bn.backward(dev, x, dy, cache, dx, grads);  // first touch of dx and the workspace
      for (auto _ : state) {
        bn.backward(dev, x, dy, cache, dx, grads);
        benchmark::DoNotOptimize(dx.data());
        benchmark::ClobberMemory();
      }
    });
  });
  nkbench::report(state, 12, n, threads);
}

void BM_BatchNorm_EvalForward(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(1));
  Index n = 0;
  with_shape(nkbench::batch_norm_shape(state), [&](auto& x, auto& y, auto&, auto&, auto& bn) {
    x.setRandom();
    n = x.size();
    bn.eval();
    nkbench::with_device(threads, [&](const auto& dev) {
      bn.forward(dev, x, y);  // first touch of y
      for (auto _ : state) {
        bn.forward(dev, x, y);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      }
    });
  });
  nkbench::report(state, 8, n, threads);
}

BENCHMARK(BM_BatchNorm_TrainForward)->Apply(nkbench::batch_norm_shapes);
BENCHMARK(BM_BatchNorm_TrainBackward)->Apply(nkbench::batch_norm_shapes);
BENCHMARK(BM_BatchNorm_EvalForward)->Apply(nkbench::batch_norm_shapes);

}  // namespace
