// BM_BatchNorm_*: fp32, RowMajor. Shapes: 32x64x56x56 as NCHW (channel axis 1) and as
// NHWC (channels-last, axis -1), and 256x512 (N, C); 1 and 2 threads. Bytes: forward
// 8 B/float (read x, write y), backward 12 B/float (read x and dy, write dx).
#include <normkit/normkit.hpp>

#include "common.hpp"

namespace {
using nkbench::Index;
using Tensor4 = nkbench::PageTensor<4>;
using Tensor2 = nkbench::PageTensor<2>;

enum Shape { kNCHW = 0, kNHWC = 1, kNC = 2 };

/// Calls f(x, y, dy, dx, layer) with tensors of the shape `s`.
template <class F>
void with_shape(int s, F&& f) {
  if (s == kNC) {
    Tensor2 x(256, 512), y(256, 512), dy(256, 512), dx(256, 512);
    normkit::BatchNorm<float> bn(512);
    f(x, y, dy, dx, bn);
    return;
  }
  const std::array<Index, 4> d = s == kNCHW ? std::array<Index, 4>{32, 64, 56, 56} : std::array<Index, 4>{32, 56, 56, 64};
  Tensor4 x(d), y(d), dy(d), dx(d);
  normkit::BatchNorm<float> bn(64, normkit::BatchNormOptions().channel_axis(s == kNCHW ? 1 : -1));
  f(x, y, dy, dx, bn);
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int threads : {1, 2})
    for (int s : {kNCHW, kNHWC, kNC}) b->Args({s, threads});
  b->ArgNames({"shape(0=NCHW,1=NHWC,2=NC)", "threads"});
  b->UseRealTime();
}

void BM_BatchNorm_TrainForward(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(1));
  Index n = 0;
  with_shape(static_cast<int>(state.range(0)), [&](auto& x, auto& y, auto&, auto&, auto& bn) {
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
  with_shape(static_cast<int>(state.range(0)), [&](auto& x, auto& y, auto& dy, auto& dx, auto& bn) {
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
  with_shape(static_cast<int>(state.range(0)), [&](auto& x, auto& y, auto&, auto&, auto& bn) {
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

BENCHMARK(BM_BatchNorm_TrainForward)->Apply(shapes);
BENCHMARK(BM_BatchNorm_TrainBackward)->Apply(shapes);
BENCHMARK(BM_BatchNorm_EvalForward)->Apply(shapes);

}  // namespace
