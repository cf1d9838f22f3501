// Parallel execution over an Eigen device, and the fixed blocking that keeps results
// bitwise identical for any thread count.
//
// Reductions across work items (parameter gradients, batch statistics) are computed as
// one partial per *block*, where the blocks depend only on the shape, never on the
// number of threads; the partials are then combined in block order. Which thread runs
// a block changes nothing, so 1, 2, 3 or 7 threads give the same bits.
#pragma once

#include <algorithm>
#include <functional>
#include <vector>

#include "tensor.hpp"

namespace normkit {
namespace detail {

inline int num_threads(const Eigen::DefaultDevice&) { return 1; }
inline int num_threads(const Eigen::ThreadPoolDevice& d) { return d.numThreads(); }

/// Below this much memory traffic (a few tens of microseconds of work) a pool device
/// runs the work on the calling thread: waking the pool's sleeping threads and waiting
/// for them costs more than they would save (measured on 2 cores: LayerNorm forward of
/// 128x768 floats at 19 GB/s on 2 threads, 36 GB/s on the caller alone). The blocking,
/// and so every result, is the same either way. normkit's own tests set it to 0, so
/// that their small tensors still go through the pool.
#ifndef NORMKIT_INLINE_BYTES
#define NORMKIT_INLINE_BYTES 1048576
#endif
inline constexpr double kInlineBytes = NORMKIT_INLINE_BYTES;

/// Runs f(begin, end) over [0, n) on the device. `bytes` and `cycles` are the cost of
/// one item, used by Eigen to choose how finely to split.
template <class F>
void parallel_for(const Eigen::DefaultDevice&, Index n, double, double, F&& f) {
  if (n > 0) f(Index{0}, n);
}

template <class F>
void parallel_for(const Eigen::ThreadPoolDevice& d, Index n, double bytes, double cycles,
                  F&& f) {
  if (n <= 0) return;
  if (d.numThreads() <= 1 || n == 1 || static_cast<double>(n) * bytes < kInlineBytes) {
    f(Index{0}, n);
    return;
  }
  d.parallelFor(n, Eigen::TensorOpCost(bytes, 0, cycles),
                std::function<void(Index, Index)>(std::forward<F>(f)));
}

/// Items split into blocks of a size fixed by the item count alone.
struct Blocking {
  Index items = 0, per_block = 1, blocks = 0;
  Index begin(Index b) const { return b * per_block; }
  Index end(Index b) const { return std::min(items, (b + 1) * per_block); }
};

/// At most `max_blocks` blocks of at least `min_per_block` items: enough blocks to
/// feed many threads, few enough that the per-block partials stay small next to the
/// data they summarize.
inline Blocking fixed_blocking(Index items, Index min_per_block, Index max_blocks = 64) {
  Blocking b;
  b.items = items;
  if (items <= 0) return b;
  b.per_block = std::max(min_per_block, (items + max_blocks - 1) / max_blocks);
  b.blocks = (items + b.per_block - 1) / b.per_block;
  return b;
}

/// Scratch memory reused across calls (it lives in a layer's Grads), so that the hot
/// path does not allocate once the sizes are known.
template <class Acc>
struct Workspace {
  std::vector<Acc> partial;
  Acc* get(std::size_t n) {
    if (partial.size() < n) partial.resize(n);
    return partial.data();
  }
};

}  // namespace detail
}  // namespace normkit
