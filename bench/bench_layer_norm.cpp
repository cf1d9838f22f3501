// BM_LayerNorm_* and BM_RMSNorm_*: fp32, RowMajor [rows, features], 1 and 2 threads.
#include <normkit/normkit.hpp>

#include "common.hpp"

namespace {
using nkbench::Index;

template <class Layer>
void forward(benchmark::State& state) {
  const Index rows = state.range(0), features = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  Layer layer(features);
  nkbench::RowTensor2 x(rows, features), y(rows, features);
  x.setRandom();
  typename Layer::Cache cache;
  nkbench::with_device(threads, [&](const auto& dev) {
    layer.forward(dev, x, y, cache);  // first touch of y outside the timing
    for (auto _ : state) {
      layer.forward(dev, x, y, cache);
      benchmark::DoNotOptimize(y.data());
      benchmark::ClobberMemory();
    }
  });
  nkbench::report(state, 8, rows * features, threads);
}

template <class Layer>
void backward(benchmark::State& state) {
  const Index rows = state.range(0), features = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  Layer layer(features);
  nkbench::RowTensor2 x(rows, features), y(rows, features), dy(rows, features), dx(rows, features);
  x.setRandom();
  dy.setRandom();
  typename Layer::Cache cache;
  typename Layer::Grads grads;
  layer.forward(x, y, cache);
  nkbench::with_device(threads, [&](const auto& dev) {
    layer.backward(dev, x, dy, cache, dx, grads);  // first touch of dx and the workspace
    for (auto _ : state) {
      layer.backward(dev, x, dy, cache, dx, grads);
      benchmark::DoNotOptimize(dx.data());
      benchmark::ClobberMemory();
    }
  });
  nkbench::report(state, 12, rows * features, threads);
}



void BM_LayerNorm_Forward(benchmark::State& s) { forward<normkit::LayerNorm<float>>(s); }
void BM_LayerNorm_Backward(benchmark::State& s) { backward<normkit::LayerNorm<float>>(s); }
void BM_RMSNorm_Forward(benchmark::State& s) { forward<normkit::RMSNorm<float>>(s); }
void BM_RMSNorm_Backward(benchmark::State& s) { backward<normkit::RMSNorm<float>>(s); }

BENCHMARK(BM_LayerNorm_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_LayerNorm_Backward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_RMSNorm_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_RMSNorm_Backward)->Apply(nkbench::row_shapes);

}  // namespace
