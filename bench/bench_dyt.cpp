// BM_DyT_*: fp32, RowMajor [rows, features], 1 and 2 threads, beside BM_LayerNorm_*,
// x uniform in [0, 1) (setRandom) and alpha 0.5: every packet takes tanh's cheap small
// range, as on normalized-scale activations.
// BM_DyTWide_*: the same with x uniform in [-4, 4]: |alpha x| up to 2, nearly every
// packet also needs tanh's exp half, the worst case of the data-dependent cost.
// BM_DyTEigen_*: the Eigen Tensor expressions a user would write without normkit, the
// in-ecosystem peer (Eigen's own vectorized tanh, ~5 ulp).
#include <normkit/normkit.hpp>

#include "common.hpp"

namespace {
using nkbench::Index;
using nkbench::RowTensor2;

// x in [0, 1) for the DyT rows, in [-4, 4] for the DyTWide rows.
void fill_x(RowTensor2& x, bool wide) {
  x.setRandom();
  if (wide) x = x * 8.0f - 4.0f;
}

void forward(benchmark::State& state, bool wide) {
  const Index rows = state.range(0), features = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  normkit::DyT<float> layer(features);
  RowTensor2 x(rows, features), y(rows, features);
  fill_x(x, wide);
  normkit::DyT<float>::Cache cache;
  nkbench::with_device(threads, [&](const auto& dev) {
    layer.forward(dev, x, y, cache);  // first touch of y and the cache outside the timing
    for (auto _ : state) {
      layer.forward(dev, x, y, cache);
      benchmark::DoNotOptimize(y.data());
      benchmark::ClobberMemory();
    }
  });
  state.counters["tanh_cached"] = cache.tanh.size() ? 1 : 0;
  nkbench::report(state, 8, rows * features, threads);
}

void backward(benchmark::State& state, bool wide) {
  const Index rows = state.range(0), features = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  normkit::DyT<float> layer(features);
  RowTensor2 x(rows, features), y(rows, features), dy(rows, features), dx(rows, features);
  fill_x(x, wide);
  dy.setRandom();
  normkit::DyT<float>::Cache cache;
  normkit::DyT<float>::Grads grads;
  layer.forward(x, y, cache);
  nkbench::with_device(threads, [&](const auto& dev) {
    layer.backward(dev, x, dy, cache, dx, grads);  // first touch of dx and the workspace
    for (auto _ : state) {
      layer.backward(dev, x, dy, cache, dx, grads);
      benchmark::DoNotOptimize(dx.data());
      benchmark::ClobberMemory();
    }
  });
  state.counters["tanh_cached"] = cache.tanh.size() ? 1 : 0;
  nkbench::report(state, 12, rows * features, threads);
}

void BM_DyT_Forward(benchmark::State& s) { forward(s, false); }
void BM_DyT_Backward(benchmark::State& s) { backward(s, false); }
void BM_DyTWide_Forward(benchmark::State& s) { forward(s, true); }
void BM_DyTWide_Backward(benchmark::State& s) { backward(s, true); }

// y = tanh(alpha x) * w + b, with w and b broadcast over the rows.
void BM_DyTEigen_Forward(benchmark::State& state) {
  const Index rows = state.range(0), features = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  RowTensor2 x(rows, features), y(rows, features);
  Eigen::Tensor<float, 1, Eigen::RowMajor> w(features), b(features);
  x.setRandom();
  w.setConstant(1.0f);
  b.setConstant(0.0f);
  const float alpha = 0.5f;
  const Eigen::array<Index, 2> row_shape{1, features}, bcast{rows, 1};
  nkbench::MapOf<2>&xm = x, &ym = y;
  nkbench::with_device(threads, [&](const auto& dev) {
    auto run = [&] {
      ym.device(dev) = (xm * alpha).tanh() * w.reshape(row_shape).broadcast(bcast) +
                      b.reshape(row_shape).broadcast(bcast);
    };
    run();
    for (auto _ : state) {
      run();
      benchmark::DoNotOptimize(y.data());
      benchmark::ClobberMemory();
    }
  });
  nkbench::report(state, 8, rows * features, threads);
}

// t = tanh(alpha x); dx = dy * w * alpha * (1 - t^2); dalpha = sum(dy * w * x * (1 - t^2));
// dweight = sum_rows(dy * t); dbias = sum_rows(dy).
void BM_DyTEigen_Backward(benchmark::State& state) {
  const Index rows = state.range(0), features = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  RowTensor2 x(rows, features), dy(rows, features), dx(rows, features), t(rows, features);
  Eigen::Tensor<float, 1, Eigen::RowMajor> w(features), dw(features), db(features);
  Eigen::Tensor<float, 0, Eigen::RowMajor> dalpha;
  x.setRandom();
  dy.setRandom();
  w.setConstant(1.0f);
  const float alpha = 0.5f;
  const Eigen::array<Index, 2> row_shape{1, features}, bcast{rows, 1};
  const Eigen::array<Index, 1> over_rows{0};
  // Plain TensorMaps in the expressions (their evaluators are Eigen's own).
  nkbench::MapOf<2>&xm = x, &dym = dy, &dxm = dx, &tm = t;
  nkbench::with_device(threads, [&](const auto& dev) {
    auto run = [&] {
      tm.device(dev) = (xm * alpha).tanh();
      const auto wb = w.reshape(row_shape).broadcast(bcast);
      const auto g = dym * wb * (tm.constant(1.0f) - tm.square());
      dxm.device(dev) = g * alpha;
      dalpha.device(dev) = (g * xm).sum();
      dw.device(dev) = (dym * tm).sum(over_rows);
      db.device(dev) = dym.sum(over_rows);
    };
    run();
    for (auto _ : state) {
      run();
      benchmark::DoNotOptimize(dx.data());
      benchmark::ClobberMemory();
    }
  });
  nkbench::report(state, 12, rows * features, threads);
}

BENCHMARK(BM_DyT_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_DyT_Backward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_DyTWide_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_DyTWide_Backward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_DyTEigen_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_DyTEigen_Backward)->Apply(nkbench::row_shapes);

}  // namespace
