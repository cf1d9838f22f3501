// Shared benchmark plumbing: devices, the memcpy roofline, and the counters every
// benchmark reports.
//
// Bytes are the minimum traffic (forward: read x, write y = 8 B/float; backward: read
// x and dy, write dx = 12 B/float). Every benchmark also reports `of_memcpy`: its
// bandwidth over that of memcpy on the same number of floats with the same number of
// threads, measured in this process, so the ratio survives a noisy shared machine.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define EIGEN_USE_THREADS
#include <unsupported/Eigen/CXX11/Tensor>
#include <normkit/core/tensor.hpp>

namespace nkbench {

using Index = Eigen::Index;

/// Where every benchmark buffer starts: this many bytes into a page of its own.
///
/// The distance between two buffers modulo 4 KiB decides how often a load from one
/// falsely waits on a store to the other (4K aliasing). With heap memory it changed from
/// one benchmark to the next (glibc serves big blocks from the heap once earlier ones
/// were freed), and with it the result: the same LayerNorm forward in cache measured 24
/// or 37 GB/s, glibc's memcpy (the roofline) 6 or 65 GB/s. Here every tensor of every
/// benchmark, normkit's and the peers', starts at the same offset into its first page,
/// as large tensors do in most programs (each in pages of its own), so all of them
/// meet the same layout.
inline constexpr std::size_t kPageOffset = 64;

/// n floats, zeroed, at kPageOffset bytes into fresh pages.
class PageBuffer {
 public:
  explicit PageBuffer(std::size_t n) : n_(n) {
    const std::size_t bytes = (n * sizeof(float) + kPageOffset + 4095) / 4096 * 4096;
    mem_.reset(static_cast<char*>(std::aligned_alloc(4096, bytes)));
    if (!mem_) throw std::bad_alloc();
    std::fill_n(data(), n, 0.0f);
  }
  float* data() const { return reinterpret_cast<float*>(mem_.get() + kPageOffset); }
  std::size_t size() const { return n_; }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> mem_;
  std::size_t n_ = 0;
};

template <int Rank>
using MapOf = Eigen::TensorMap<Eigen::Tensor<float, Rank, Eigen::RowMajor>>;

/// A row-major float tensor in a PageBuffer: an Eigen::TensorMap that owns its memory
/// (normkit takes it as the TensorMap it is, see the traits below).
template <int Rank>
class PageTensor : private PageBuffer, public MapOf<Rank> {
 public:
  template <class... I, class = std::enable_if_t<sizeof...(I) == Rank>>
  explicit PageTensor(I... dims)
      : PageBuffer(static_cast<std::size_t>((Index{1} * ... * static_cast<Index>(dims)))),
        MapOf<Rank>(PageBuffer::data(), static_cast<Index>(dims)...) {}
  explicit PageTensor(const std::array<Index, Rank>& d)
      : PageBuffer(static_cast<std::size_t>(product(d))), MapOf<Rank>(PageBuffer::data(), d) {}
  PageTensor(const PageTensor&) = delete;
  /// Copies the values (the shapes must match), as Eigen::TensorMap's assignment does.
  PageTensor& operator=(const PageTensor& other) {
    MapOf<Rank>::operator=(static_cast<const MapOf<Rank>&>(other));
    return *this;
  }
  using MapOf<Rank>::operator=;
  using MapOf<Rank>::data;
  using MapOf<Rank>::size;

 private:
  static Index product(const std::array<Index, Rank>& d) {
    Index p = 1;
    for (Index v : d) p *= v;
    return p;
  }
};

using RowTensor2 = PageTensor<2>;

/// One pool per thread count, alive for the whole run.
inline Eigen::ThreadPoolDevice& pool_device(int threads) {
  static std::mutex mu;
  static std::map<int, std::pair<std::unique_ptr<Eigen::ThreadPool>,
                                 std::unique_ptr<Eigen::ThreadPoolDevice>>> pools;
  std::lock_guard<std::mutex> lock(mu);
  auto& p = pools[threads];
  if (!p.first) {
    p.first = std::make_unique<Eigen::ThreadPool>(threads);
    p.second = std::make_unique<Eigen::ThreadPoolDevice>(p.first.get(), threads);
  }
  return *p.second;
}

/// Calls f(device): Eigen::DefaultDevice for one thread, a pool device otherwise.
template <class F>
void with_device(int threads, F&& f) {
  if (threads <= 1) {
    Eigen::DefaultDevice d;
    f(d);
  } else {
    f(pool_device(threads));
  }
}

/// memcpy of n floats split over `threads` threads, best of a few timed repetitions,
/// between buffers laid out as the benchmarks' tensors are (PageBuffer).
/// Measured anew for every benchmark, right after it, so that the ratio compares two
/// timings taken moments apart on a shared, noisy machine.
inline double memcpy_gbps(Index n, int threads) {
  PageBuffer src(static_cast<std::size_t>(n)), dst(static_cast<std::size_t>(n));
  std::fill_n(src.data(), n, 1.0f);
  auto copy = [&] {
    if (threads <= 1) {
      std::memcpy(dst.data(), src.data(), sizeof(float) * static_cast<std::size_t>(n));
      return;
    }
    Eigen::ThreadPoolDevice& dev = pool_device(threads);
    Eigen::Barrier barrier(static_cast<unsigned>(threads));
    const Index chunk = (n + threads - 1) / threads;
    for (int t = 0; t < threads; ++t) {
      dev.enqueueNoNotification([&, t] {
        const Index b = std::min(n, t * chunk), e = std::min(n, b + chunk);
        std::memcpy(dst.data() + b, src.data() + b, sizeof(float) * static_cast<std::size_t>(e - b));
        barrier.Notify();
      });
    }
    barrier.Wait();
  };
  copy();
  double best = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int rep = 0; rep < 1000; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    int inner = std::max<int>(1, static_cast<int>(2e6 / static_cast<double>(n)));
    for (int i = 0; i < inner; ++i) copy();
    benchmark::ClobberMemory();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 8.0 * static_cast<double>(n) * inner / s * 1e-9);
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > 0.15 &&
        rep >= 4)
      break;
  }
  return best;
}

/// Sets bytes processed and the GB/s and fraction-of-memcpy counters.
inline void report(benchmark::State& state, double bytes_per_float, Index n, int threads) {
  const double bytes = bytes_per_float * static_cast<double>(n);
  state.SetBytesProcessed(static_cast<int64_t>(bytes * static_cast<double>(state.iterations())));
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  const double roof = memcpy_gbps(n, threads);
  state.counters["memcpy_GB/s"] = roof;
  // A rate counter divides by the time, so this reads as (our GB/s) / (memcpy GB/s).
  state.counters["of_memcpy"] =
      benchmark::Counter(bytes * 1e-9 / roof, benchmark::Counter::kIsIterationInvariantRate);
}

/// The thread counts to measure: NORMKIT_BENCH_THREADS="1,2,16" (a comma list; "all"
/// or "max" is std::thread::hardware_concurrency()), default 1 and 2. An environment
/// variable rather than a flag because benchmarks register their Args before main runs.
inline const std::vector<int>& thread_list() {
  static const std::vector<int> list = [] {
    std::vector<int> out;
    const char* env = std::getenv("NORMKIT_BENCH_THREADS");
    std::string s = env && *env ? env : "1,2";
    std::size_t pos = 0;
    while (pos <= s.size()) {
      const std::size_t comma = std::min(s.find(',', pos), s.size());
      const std::string item = s.substr(pos, comma - pos);
      int t = 0;
      if (item == "all" || item == "max")
        t = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
      else if (!item.empty())
        t = std::atoi(item.c_str());
      if (t > 0 && std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
      pos = comma + 1;
    }
    if (out.empty()) out = {1, 2};
    return out;
  }();
  return list;
}

/// A peer's output checked against normkit's once, before timing, so that a misconfigured
/// call is never timed: max |peer - ref| / max(1, max |ref|) must stay under `tol`.
/// On a mismatch the benchmark is skipped with the difference in the error, and false
/// is returned (the caller then leaves before its timing loop). Parameter gradients
/// are long sums that peers accumulate in float (oneDNN 2.6's channels-last BatchNorm
/// is off by 2e-3 of max |dweight| where normkit is within 1e-6): check them with
/// kReductionTol; a misconfigured call is off by O(1) either way.
constexpr double kReductionTol = 1e-2;
inline bool check_peer(benchmark::State& state, const std::string& what, const float* peer,
                       const float* ref, Index n, double tol = 1e-3) {
  double diff = 0, scale = 1;
  for (Index i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(peer[i]) - static_cast<double>(ref[i]));
    diff = std::isnan(d) || d > diff ? d : diff;  // a NaN sticks
    scale = std::max(scale, std::abs(static_cast<double>(ref[i])));
  }
  const double rel = diff / scale;
  if (rel < tol) return true;
  state.SkipWithError((what + ": differs from normkit by " + std::to_string(rel) +
                       " (relative max abs diff), tolerance " + std::to_string(tol))
                          .c_str());
  return false;
}

/// Rows x features x threads, the shapes of DESIGN.md.
inline void row_shapes(benchmark::internal::Benchmark* b) {
  for (int threads : thread_list())
    for (auto rf : {std::pair<int, int>{128, 768}, {4096, 768}, {8192, 4096}})
      b->Args({rf.first, rf.second, threads});
  b->ArgNames({"rows", "features", "threads"});
  b->UseRealTime();
}

/// A BatchNorm shape: logical dims (RowMajor; N x C as [N, C, 1, 1]), channels first
/// (axis 1) or last (axis 3). The name is the benchmark's label, the one bench/compare.py prints.
struct BatchNormShape {
  const char* name;
  std::array<Index, 4> dims;
  bool channels_last;
  Index channels() const { return channels_last ? dims[3] : dims[1]; }
  Index size() const { return dims[0] * dims[1] * dims[2] * dims[3]; }
  bool rank2() const { return dims[2] == 1 && dims[3] == 1 && !channels_last; }
};

/// The BatchNorm shapes of normkit's and the peers' benchmarks, by the `shape` argument.
/// The last two are ResNet-50's late stages: runs of 196 and 49 floats per channel and
/// image, which normkit sums several at a time.
inline constexpr std::array<BatchNormShape, 5> kBatchNormShapes = {{
    {"32x64x56x56 NCHW", {32, 64, 56, 56}, false},
    {"32x56x56x64 NHWC", {32, 56, 56, 64}, true},
    {"256x512", {256, 512, 1, 1}, false},
    {"32x256x14x14 NCHW", {32, 256, 14, 14}, false},
    {"32x512x7x7 NCHW", {32, 512, 7, 7}, false},
}};

/// The shape of state's `shape` argument, its name the benchmark's label (what
/// bench/compare.py prints).
inline const BatchNormShape& batch_norm_shape(benchmark::State& state) {
  const BatchNormShape& shape = kBatchNormShapes.at(static_cast<std::size_t>(state.range(0)));
  state.SetLabel(shape.name);
  return shape;
}

/// {shape, threads}: every shape of kBatchNormShapes at every thread count.
inline void batch_norm_shapes(benchmark::internal::Benchmark* b) {
  for (int threads : thread_list())
    for (std::size_t s = 0; s < kBatchNormShapes.size(); ++s) b->Args({static_cast<std::int64_t>(s), threads});
  b->ArgNames({"shape", "threads"});
  b->UseRealTime();
}

}  // namespace nkbench

// normkit's layers take an nkbench::PageTensor as the TensorMap it derives from.
template <int Rank>
struct normkit::detail::tensor_traits<nkbench::PageTensor<Rank>>
    : normkit::detail::tensor_traits<nkbench::MapOf<Rank>> {};
