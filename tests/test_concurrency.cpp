// Concurrent use of LayerNorm, RMSNorm, DyT and BatchNorm: many threads run inference (and backward with their own Grads) on one
// shared layer object, on their own DefaultDevice and on one shared ThreadPoolDevice,
// and every result is bitwise the single-threaded one. Built also under ThreadSanitizer
// (scripts/ci-sanitizers.sh), which turns any data race behind these calls into a failure.
//
// What is safe to call concurrently on one layer object:
//   - forward(x, y) and forward(x, y, cache) of LayerNorm, RMSNorm, DyT: const, no
//     mutable state; each thread passes its own y and cache.
//   - backward(...) of every layer: const; each thread passes its own dx and Grads (the
//     Grads hold the scratch memory).
//   - BatchNorm::forward in eval mode with track_running_stats: reads the running
//     statistics only.
// What is not: BatchNorm::forward in training mode (it updates running_mean,
// running_var and num_batches_tracked, and uses scratch inside the layer) or with
// track_running_stats(false) (batch statistics, same scratch); train()/eval() and any
// write to weight()/bias()/running_*() while other threads call the layer.
#include <normkit/normkit.hpp>

#include <atomic>
#include <chrono>
#include <thread>

#include "test_support.hpp"

namespace {

using nktest::Index;
using RM2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
using CM3 = Eigen::Tensor<float, 3, Eigen::ColMajor>;

constexpr int kThreads = 8;
constexpr int kIters = 12;
constexpr int kInputs = 4;

template <class Tensor>
bool same_bits(const Tensor& a, const Tensor& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

/// Runs body(thread, iteration, device) from kThreads threads at once; the device is
/// the shared pool device on odd iterations, a thread-local DefaultDevice on even ones.
template <class Body>
void hammer(const Eigen::ThreadPoolDevice& shared, Body body) {
  std::vector<std::thread> threads;
  std::atomic<int> ready{0};
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      ++ready;
      while (ready.load() < kThreads) std::this_thread::yield();  // start together
      Eigen::DefaultDevice own;
      for (int it = 0; it < kIters; ++it) {
        if (it % 2) body(t, it, shared);
        else body(t, it, own);
      }
    });
  for (auto& th : threads) th.join();
}

template <class Layer, class X>
void trailing_layer_case(Layer& layer, const std::vector<X>& xs, const std::vector<X>& dys) {
  Eigen::ThreadPool pool(4);
  Eigen::ThreadPoolDevice dev(&pool, 4);
  // Single-threaded references.
  std::vector<X> ys, dxs;
  std::vector<typename Layer::Grads> gs(xs.size());
  for (std::size_t i = 0; i < xs.size(); ++i) {
    X y = xs[i], dx = xs[i];
    typename Layer::Cache c;
    layer.forward(xs[i], y, c);
    layer.backward(xs[i], dys[i], c, dx, gs[i]);
    ys.push_back(y);
    dxs.push_back(dx);
  }
  std::atomic<int> mismatches{0};
  hammer(dev, [&](int t, int it, const auto& d) {
    const std::size_t i = static_cast<std::size_t>(t + it) % xs.size();
    X y = xs[i], yc = xs[i], dx = xs[i];
    y.setZero();
    layer.forward(d, xs[i], y);
    if (!same_bits(y, ys[i])) ++mismatches;
    typename Layer::Cache c;
    typename Layer::Grads g;
    layer.forward(d, xs[i], yc, c);
    layer.backward(d, xs[i], dys[i], c, dx, g);
    if (!same_bits(yc, ys[i]) || !same_bits(dx, dxs[i]) || !same_bits(g.weight, gs[i].weight)) ++mismatches;
  });
  EXPECT_EQ(mismatches.load(), 0);
}

std::vector<RM2> random_inputs(Index rows, Index F, unsigned seed) {
  std::vector<RM2> v;
  for (int i = 0; i < kInputs; ++i)
    v.push_back(nktest::make_tensor<float, 2, Eigen::RowMajor>({rows, F}, nktest::random_vector(rows * F, seed + i, -3, 3)));
  return v;
}

TEST(ConcurrencyTest, SharedLayerNormInferenceAndBackward) {
  normkit::LayerNorm<float> ln(96);
  ln.weight().setRandom();
  ln.bias().setRandom();
  trailing_layer_case(ln, random_inputs(200, 96, 1), random_inputs(200, 96, 11));
}

TEST(ConcurrencyTest, SharedRMSNormInferenceAndBackward) {
  normkit::RMSNorm<float> rms(96);
  rms.weight().setRandom();
  trailing_layer_case(rms, random_inputs(200, 96, 21), random_inputs(200, 96, 31));
}

TEST(ConcurrencyTest, SharedDyTInferenceAndBackward) {
  normkit::DyT<float> dyt(96);
  dyt.weight().setRandom();
  dyt.bias().setRandom();
  trailing_layer_case(dyt, random_inputs(200, 96, 81), random_inputs(200, 96, 91));
}

TEST(ConcurrencyTest, SharedLayerNormColMajor) {
  normkit::LayerNorm<float> ln(17);
  ln.weight().setRandom();
  std::vector<CM3> xs, dys;
  for (int i = 0; i < kInputs; ++i) {
    xs.push_back(nktest::make_tensor<float, 3, Eigen::ColMajor>({9, 70, 17}, nktest::random_vector(9 * 70 * 17, 40 + i)));
    dys.push_back(nktest::make_tensor<float, 3, Eigen::ColMajor>({9, 70, 17}, nktest::random_vector(9 * 70 * 17, 50 + i)));
  }
  trailing_layer_case(ln, xs, dys);
}

TEST(ConcurrencyTest, SharedBatchNormEvalInference) {
  normkit::BatchNorm<float> bn(24);
  bn.weight().setRandom();
  bn.bias().setRandom();
  bn.running_mean().setRandom();
  bn.running_var() = bn.running_var().constant(0.5f) + bn.running_var().random().abs();
  bn.eval();
  Eigen::ThreadPool pool(4);
  Eigen::ThreadPoolDevice dev(&pool, 4);
  using T4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  std::vector<T4> xs, dys, ys, dxs;
  std::vector<normkit::BatchNorm<float>::Grads> gs(kInputs);
  for (int i = 0; i < kInputs; ++i) {
    xs.push_back(nktest::make_tensor<float, 4, Eigen::RowMajor>({3, 24, 9, 11}, nktest::random_vector(3 * 24 * 99, 60 + i)));
    dys.push_back(nktest::make_tensor<float, 4, Eigen::RowMajor>({3, 24, 9, 11}, nktest::random_vector(3 * 24 * 99, 70 + i)));
    T4 y = xs.back(), dx = xs.back();
    normkit::BatchNorm<float>::Cache c;
    bn.forward(xs.back(), y, c);
    bn.backward(xs.back(), dys.back(), c, dx, gs[static_cast<std::size_t>(i)]);
    ys.push_back(y);
    dxs.push_back(dx);
  }
  const Eigen::Tensor<float, 1> rm = bn.running_mean(), rv = bn.running_var();
  std::atomic<int> mismatches{0};
  hammer(dev, [&](int t, int it, const auto& d) {
    const std::size_t i = static_cast<std::size_t>(t + it) % xs.size();
    T4 y = xs[i], dx = xs[i];
    normkit::BatchNorm<float>::Cache c;
    normkit::BatchNorm<float>::Grads g;
    bn.forward(d, xs[i], y, c);
    bn.backward(d, xs[i], dys[i], c, dx, g);
    if (!same_bits(y, ys[i]) || !same_bits(dx, dxs[i]) || !same_bits(g.weight, gs[i].weight) ||
        !same_bits(g.bias, gs[i].bias))
      ++mismatches;
  });
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_TRUE(same_bits(rm, bn.running_mean()));
  EXPECT_TRUE(same_bits(rv, bn.running_var()));
  EXPECT_EQ(bn.num_batches_tracked(), 0);
}

// normkit's parallel_for on a pool: every item exactly once, for item counts below, at
// and above the number of parts, and for any pool size.
TEST(ConcurrencyTest, ParallelForRunsEveryItemOnce) {
  for (int threads : {2, 3, 7}) {
    Eigen::ThreadPool pool(threads);
    Eigen::ThreadPoolDevice dev(&pool, threads);
    for (Index n : {Index(2), Index(5), Index(8), Index(29), Index(1000)}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      for (auto& h : hits) h = 0;
      std::atomic<int> calls{0};
      // bytes per item far above the inline limit: always through the pool
      normkit::detail::parallel_for(dev, n, 1e9, 1.0, [&](Index b, Index e) {
        ++calls;
        for (Index i = b; i < e; ++i) ++hits[static_cast<std::size_t>(i)];
      });
      for (Index i = 0; i < n; ++i) EXPECT_EQ(hits[static_cast<std::size_t>(i)].load(), 1) << "n " << n << " item " << i;
      EXPECT_LE(calls.load(), 4 * threads) << "n " << n;
    }
  }
}

// Calls back to back on devices over two pools, each device made anew at the same place
// on the stack (so a helper lingering after a call on one device sees the next device at
// the same address): every item runs exactly once, on the calling thread or on a thread
// of that device's own pool, never on the other pool's.
TEST(ConcurrencyTest, HelpersServeOnlyTheirOwnPool) {
  Eigen::ThreadPool pool_a(2), pool_b(3);
  const std::thread::id caller = std::this_thread::get_id();
  constexpr Index n = 64;
  for (int call = 0; call < 1000; ++call) {
    const bool a = (call / 3) % 2 == 0;  // three calls on one pool, then three on the other
    const Eigen::ThreadPoolDevice dev(a ? &pool_a : &pool_b, a ? 2 : 3);
    std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
    for (auto& h : hits) h = 0;
    std::atomic<int> foreign{0};
    normkit::detail::parallel_for(dev, n, 1e9, 1.0, [&](Index b, Index e) {
      if (std::this_thread::get_id() != caller && dev.currentThreadId() == -1) ++foreign;
      for (Index i = b; i < e; ++i) ++hits[static_cast<std::size_t>(i)];
    });
    ASSERT_EQ(foreign.load(), 0) << "call " << call;
    for (Index i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<std::size_t>(i)].load(), 1) << "call " << call;
  }
}

// A task scheduled on a pool whose only thread lingers runs while the caller keeps
// calling (here, until the task has run). A lingering helper returns to its pool at
// least every kLingerTurnMicros; on a busy machine it also leaves whenever the caller is
// preempted for longer than kLingerMicros, so this test checks the promise, not which
// of the two kept it.
TEST(ConcurrencyTest, LingeringHelpersLetOtherTasksRun) {
  Eigen::ThreadPool pool(1);
  const Eigen::ThreadPoolDevice dev(&pool, 2);
  auto call = [&] { normkit::detail::parallel_for(dev, 8, 1e9, 1.0, [](Index, Index) {}); };
  call();  // the pool's thread now lingers
  std::atomic<bool> ran{false};
  pool.Schedule([&] { ran = true; });
  const auto start = std::chrono::steady_clock::now();
  while (!ran.load() && std::chrono::steady_clock::now() - start < std::chrono::seconds(10)) call();
  EXPECT_TRUE(ran.load()) << "a task on the pool did not run within 10 s of back-to-back calls";
}

// A layer called from inside one of the pool's own tasks, on a device over that same
// pool, runs on that thread: it returns (no wait on tasks that cannot start), with the
// single-threaded bits. So does the evaluation of an expression input (Eigen's own
// executor would wait there): 4000x96 floats, enough for Eigen's cost model to split.
TEST(ConcurrencyTest, CallFromInsideThePoolRunsInline) {
  normkit::LayerNorm<float> ln(96);
  ln.weight().setRandom();
  const RM2 x = nktest::make_tensor<float, 2, Eigen::RowMajor>({4000, 96}, nktest::random_vector(4000 * 96, 5));
  RM2 want = x;
  ln.forward(x, want);
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice dev(&pool, 2);
  std::vector<RM2> got(4, x), got_expr(4, x);
  Eigen::Barrier done(4);
  for (int t = 0; t < 4; ++t)
    pool.Schedule([&, t] {
      ln.forward(dev, x, got[static_cast<std::size_t>(t)]);
      ln.forward(dev, x * 1.0f, got_expr[static_cast<std::size_t>(t)]);
      done.Notify();
    });
  done.Wait();
  for (const RM2& g : got) EXPECT_TRUE(same_bits(g, want));
  for (const RM2& g : got_expr) EXPECT_TRUE(same_bits(g, want)) << "expression input";
}

}  // namespace
