// Parallel execution over an Eigen device, and the fixed blocking that keeps results
// bitwise identical for any thread count.
//
// Reductions across work items (parameter gradients, batch statistics) are computed as
// one partial per *block*, where the blocks depend only on the shape, never on the
// number of threads; the partials are then combined in block order. Which thread runs
// a block changes nothing, so 1, 2, 3 or 7 threads give the same bits.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstddef>
#include <functional>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "config.hpp"
#include "tensor.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {
namespace detail {

inline int num_threads(const Eigen::DefaultDevice&) { return 1; }
inline int num_threads(const Eigen::ThreadPoolDevice& d) { return d.numThreads(); }

/// Below this much memory traffic (a few microseconds of work) a pool device runs the
/// work on the calling thread: handing a part to a helper and waiting for it costs more
/// than the helper would save. Measured on 2 cores, back to back calls, LayerNorm
/// forward of rows x 768 floats: at 8 rows (48 KiB of traffic) 1.3 us inline, 1.6 us on
/// 2 threads; at 16 rows 2.4 and 2.1; at 128 rows 19.7 and 10.5. A helper that the pool
/// has parked starts late, and the caller then runs the helper's parts itself (see
/// PoolRun). The blocking, and so every result, is the same either way. normkit's own
/// tests set it to 0, so that their small tensors still go through the pool.
#ifndef NORMKIT_INLINE_BYTES
#define NORMKIT_INLINE_BYTES 131072
#endif
inline constexpr double kInlineBytes = NORMKIT_INLINE_BYTES;

inline constexpr std::size_t kCacheLine = 64;

/// A pause in a spin-wait loop (lets the sibling hyperthread run).
inline void spin_pause() {
#if defined(__SSE2__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

/// Waits until `ready()` holds: spins briefly (the other threads of a call finish within
/// microseconds), then gives the core away between checks.
template <class Ready>
void wait_until(Ready&& ready) {
  for (int spin = 0; !ready(); ++spin) {
    if (spin < 4096)
      spin_pause();
    else
      std::this_thread::yield();
  }
}

/// Runs f(begin, end) over [0, n) on the device. `bytes` and `cycles` are the cost of
/// one item, used by Eigen to choose how finely to split.
template <class F>
void parallel_for(const Eigen::DefaultDevice&, Index n, double, double, F&& f) {
  if (n > 0) f(Index{0}, n);
}

/// The state a pool call shares with its helpers. It outlives the call (a helper the
/// pool starts late finds no part left and only touches this), and `body` is used only
/// by a helper that claimed a part, which the caller waits for.
///
/// Every participant (the caller is number 0, helpers number themselves as they start)
/// owns a contiguous run of parts and takes those first; then it takes what is left of
/// the others'. A thread so works on the same rows call after call, which stay in its
/// own L2 between calls when they fit: with parts claimed from one shared counter, the
/// helper of a two-thread call often got the caller's rows of the previous call and
/// read them across the cores.
struct PoolRun {
  struct alignas(kCacheLine) Share {
    std::atomic<Index> next{0};
    Index end = 0;
  };
  Index n = 0, parts = 0;
  IndexVector<Share> shares;  // one per participant
  std::atomic<Index> joined{1}, done{0};
  /// Lingering helpers (see Lingerers) that were handed this run and have not let go of it.
  std::atomic<int> holders{0};
  void (*call)(const void*, Index, Index) = nullptr;
  const void* body = nullptr;
  const Eigen::ThreadPoolDevice* device = nullptr;

  PoolRun(Index items, Index parts_, Index participants)
      : n(items), parts(parts_), shares(participants) {
    for (Index t = 0; t < participants; ++t) {
      shares[t].next.store(parts * t / participants, std::memory_order_relaxed);
      shares[t].end = parts * (t + 1) / participants;
    }
  }
  Index begin(Index p) const { return n * p / parts; }
  /// Runs participant `self`'s parts, then any part another has not claimed yet.
  void work(Index self) {
    const Index participants = static_cast<Index>(shares.size());
    for (Index i = 0; i < participants; ++i) {
      Share& share = shares[(self + i) % participants];
      if (share.next.load(std::memory_order_relaxed) >= share.end) continue;
      for (Index p; (p = share.next.fetch_add(1, std::memory_order_relaxed)) < share.end;) {
        call(body, begin(p), begin(p + 1));
        done.fetch_add(1, std::memory_order_release);
      }
    }
  }
  /// Joins as the next participant.
  void join() { work(joined.fetch_add(1, std::memory_order_relaxed)); }
};

/// How long a helper stays on its pool thread after its part of a call, waiting for the
/// next call on the same device (microseconds).
///
/// Why: a call that schedules its helper on an Eigen pool wakes a parked pool thread
/// even when another one is still spinning, idle, from the previous call. On a pool of
/// as many threads as cores, the caller, the helper and the woken thread then share the
/// cores, and one call in ten takes up to 4x its time: LayerNorm forward of 256x512
/// floats on 2 threads (pool of 2), 3000 calls back to back, measured a mean of 34 us
/// (median 20-23, 90th percentile 76-83). A helper that stays takes the next call's part
/// without the pool being asked, so no thread is woken for it: mean 20 us, p90 20. The
/// passes of one layer (BatchNorm's statistics, then its map) and a layer after another
/// so run back to back on the same threads; BatchNorm backward at 256x512 went from a
/// mean of 84-88 us to 55-56.
///
/// The cost: for this long after a call one pool thread per helper spins instead of
/// taking other tasks of the pool (the pool's other threads still do; Eigen's own
/// threads spin about as long after each task), and a helper that calls keep busy goes
/// back to its pool only every kLingerTurnMicros. 0 turns lingering off.
#ifndef NORMKIT_LINGER_US
#define NORMKIT_LINGER_US 50
#endif
inline constexpr int kLingerMicros = NORMKIT_LINGER_US;
/// The longest a helper serves calls in one go before it returns to its pool (see
/// Lingerers::linger).
inline constexpr int kLingerTurnMicros = 20 * kLingerMicros;

/// Slots where lingering helpers wait, process-wide. A slot holds 0 (free), the address
/// of a device with its low bit set (a helper waits there for a call on that device), or
/// a PoolRun* (a call handed to that helper). The caller hands over a run with one
/// compare-and-swap (waiting -> run) and takes it back unclaimed with another (run ->
/// waiting); the helper claims it with (run -> 0). Exactly one of the two succeeds.
class Lingerers {
 public:
  static constexpr int kSlots = 16;

  static std::uintptr_t key_of(const Eigen::ThreadPoolDevice& d) {
    return reinterpret_cast<std::uintptr_t>(&d) | 1u;
  }

  /// Hands `run` to up to `want` helpers waiting for calls on d's key; the slots used go
  /// to `used`, and the count is returned. Each counts in run->holders until it lets go.
  static int hand_over(std::uintptr_t key, PoolRun* run, int want, int* used) {
    int got = 0;
    for (int i = 0; i < kSlots && got < want; ++i) {
      std::atomic<std::uintptr_t>& s = slot(i);
      if (s.load(std::memory_order_relaxed) != key) continue;
      run->holders.fetch_add(1, std::memory_order_relaxed);
      std::uintptr_t expected = key;
      if (s.compare_exchange_strong(expected, reinterpret_cast<std::uintptr_t>(run), std::memory_order_acq_rel))
        used[got++] = i;
      else
        run->holders.fetch_sub(1, std::memory_order_relaxed);
    }
    return got;
  }

  /// After the caller's own work: takes back the hand-overs no helper has claimed, then
  /// waits until the helpers that claimed one let go of the run.
  static void take_back(std::uintptr_t key, PoolRun* run, const int* used, int count) {
    for (int i = 0; i < count; ++i) {
      std::uintptr_t expected = reinterpret_cast<std::uintptr_t>(run);
      if (slot(used[i]).compare_exchange_strong(expected, key, std::memory_order_acq_rel))
        run->holders.fetch_sub(1, std::memory_order_relaxed);
    }
    wait_until([&] { return run->holders.load(std::memory_order_acquire) == 0; });
  }

  /// Run by a helper on a pool thread after its part: waits in a free slot for calls on
  /// the device of `key` and joins them, until kLingerMicros pass without one, or
  /// kLingerTurnMicros since it began. The turn's limit hands the thread back to the pool
  /// now and then, so that the pool's other tasks run even while calls keep coming (a
  /// task that loads the next batch, scheduled on the pool whose threads all linger,
  /// would otherwise wait for as long as the training loop that waits for it). A run
  /// whose device is not served by this thread's pool (a device object destroyed, and
  /// another made at its address) is let go untouched, and the helper leaves.
  static void linger(std::uintptr_t key) {
    if (kLingerMicros <= 0) return;
    int i = 0;
    for (std::uintptr_t expected = 0;; ++i, expected = 0) {
      if (i == kSlots) return;  // every slot taken: leave
      if (slot(i).compare_exchange_strong(expected, key, std::memory_order_relaxed)) break;
    }
    std::atomic<std::uintptr_t>& s = slot(i);
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    auto last = start;
    for (unsigned spin = 1;; ++spin) {
      std::uintptr_t v = s.load(std::memory_order_acquire);
      if (v == key) {
        if (spin % 64 == 0 && Clock::now() - last > std::chrono::microseconds(kLingerMicros)) {
          if (s.compare_exchange_strong(v, 0, std::memory_order_relaxed)) return;
          continue;  // a run arrived meanwhile
        }
        spin_pause();
        continue;
      }
      if (!s.compare_exchange_strong(v, 0, std::memory_order_acquire)) continue;  // taken back
      PoolRun* run = reinterpret_cast<PoolRun*>(v);
      const bool ours = run->device->currentThreadId() != -1;
      if (ours) run->join();
      run->holders.fetch_sub(1, std::memory_order_release);
      last = Clock::now();
      std::uintptr_t free_slot = 0;
      if (!ours || last - start > std::chrono::microseconds(kLingerTurnMicros) ||
          !s.compare_exchange_strong(free_slot, key, std::memory_order_relaxed))
        return;
    }
  }

 private:
  static std::atomic<std::uintptr_t>& slot(int i) {
    static std::atomic<std::uintptr_t> slots[kSlots] = {};
    return slots[i];
  }
};

/// Parts per thread: a thread that the pool starts late, or that the system preempts,
/// leaves its share to the others instead of holding everyone up.
inline constexpr Index kPartsPerThread = 4;

template <class F>
void parallel_for(const Eigen::ThreadPoolDevice& d, Index n, double bytes, double,
                  F&& f) {
  if (n <= 0) return;
  const int threads = d.numThreads();
  // A call from one of the pool's own threads runs inline: waiting there for other
  // tasks of the same pool could wait forever.
  if (threads <= 1 || n == 1 || static_cast<double>(n) * bytes < kInlineBytes ||
      d.currentThreadId() != -1) {
    f(Index{0}, n);
    return;
  }
  // Contiguous parts run by the caller and by threads - 1 helpers, rather than Eigen's
  // parallelFor: there the caller sleeps on a condition variable while the pool runs
  // every block, two context switches per call that cost more than a tensor in cache
  // takes to normalize (LayerNorm backward of 128x768 floats was 2.3x slower on 2
  // threads than on 1). Which thread runs a part changes nothing in the results: the
  // blocking is the caller's, fixed by the shape. Helpers still lingering from an
  // earlier call on this device take their parts first; the pool is asked for the rest.
  const Index participants = std::min<Index>(n, threads);
  auto run = std::make_shared<PoolRun>(n, std::min<Index>(n, kPartsPerThread * participants), participants);
  run->call = [](const void* body, Index b, Index e) { (*static_cast<const std::decay_t<F>*>(body))(b, e); };
  run->body = &f;
  run->device = &d;
  const std::uintptr_t key = Lingerers::key_of(d);
  int used[Lingerers::kSlots];
  const int handed = Lingerers::hand_over(key, run.get(), static_cast<int>(participants - 1), used);
  for (Index t = 1 + handed; t < participants; ++t)
    d.enqueueNoNotification([run, key]() mutable {
      run->join();
      run.reset();
      Lingerers::linger(key);
    });
  run->work(0);
  // Wait for the parts the helpers claimed, then for the lingering helpers to let go.
  wait_until([&] { return run->done.load(std::memory_order_acquire) >= run->parts; });
  Lingerers::take_back(key, run.get(), used, handed);
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

/// The fewest rows of a row block in the backward passes whose parameter gradients are
/// summed per block (LayerNorm, RMSNorm and DyT in the row shape; one partial of 2 or 3
/// row lengths per block). The partials of the blocks a helper ran are read by the thread
/// that combines them, and the helper's next call writes them again: each of their lines
/// crosses the cores twice a call, on the helper's critical path (its stores wait for the
/// lines). With 16-row blocks the helper of a 2-thread backward of 128x768 floats
/// finished 2-5 us after the caller; mean of 20000 calls, 2 threads, 16 -> 64 rows: DyT
/// 19.1-19.3 -> 14.4-16.0 us, LayerNorm 19.9-21.2 -> 18.2-18.8; 1 thread unchanged. The
/// price: a tensor of fewer than 64 x threads rows keeps some threads idle in backward.
inline constexpr Index kBlockRows = 64;

/// Columns of block partials summed at once by sum_blocks: its sums stay in L1.
inline constexpr Index kSumColumns = 256;

/// out[j] = part[j] + part[stride + j] + ... over `blocks` rows of partials, for j in
/// [0, n), each column summed in block order from 0 (as a scalar loop over the blocks
/// would). The columns are independent, so the loop runs across them in vectors, without
/// the strided scalar walk that made the combine of LayerNorm backward's partials cost as
/// much as the rows at 256x512 on 2 threads. Callers pass column groups fixed by the
/// shape, never by the thread count: whether a column is summed in the vector loop or in
/// its scalar tail must not depend on it, since the two may order the operands of an add
/// differently, which changes which NaN payload survives. Never inlined, for the same
/// reason: one compiled copy serves every device (1 thread runs Eigen::DefaultDevice's
/// instantiation of the caller, and an inlined copy there may be vectorized otherwise).
template <class Acc>
EIGEN_DONT_INLINE void sum_blocks(const Acc* part, Index stride, Index blocks, Index n, Acc* out) {
  for (Index j = 0; j < n; ++j) out[j] = Acc(0);
  for (Index b = 0; b < blocks; ++b) {
    const Acc* __restrict p = part + b * stride;
    Acc* __restrict o = out;
    for (Index j = 0; j < n; ++j) o[j] += p[j];
  }
}

/// Allocates on cache-line boundaries, for scratch arrays that hot loops read and write
/// as packets: a packet then never straddles two lines. std::vector's 16-byte alignment
/// split every other AVX packet of DyT's per-position partials and cost its backward
/// a quarter of its speed at 8192x4096 (and LayerNorm's about as much).
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept { return false; }
};

template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

/// Per-channel parameters by position, in Acc: for inner == 1 the channel vector
/// converted, else each channel's value repeated `inner` times (DyT's row shape,
/// BatchNorm's column sums); `fill` everywhere when p is null, so that the hot loop has
/// one form (u * 1 + (-0) is u, bit for bit, signed zeros included).
template <class Acc, class T>
AlignedVector<Acc> expand_param(const T* p, Index C, Index inner, Acc fill) {
  AlignedVector<Acc> out(static_cast<std::size_t>(C * inner), fill);
  if (!p) return out;
  if (inner == 1) {  // the common case (tokens x features), as one vectorized conversion
    for (Index c = 0; c < C; ++c) out[static_cast<std::size_t>(c)] = static_cast<Acc>(p[c]);
    return out;
  }
  for (Index c = 0; c < C; ++c)
    std::fill(out.begin() + c * inner, out.begin() + (c + 1) * inner, static_cast<Acc>(p[c]));
  return out;
}

/// Scratch memory reused across calls (it lives in a layer's Grads), so that the hot
/// path does not allocate once the sizes are known. Cache-line aligned.
template <class Acc>
struct Workspace {
  AlignedVector<Acc> partial;
  Acc* get(std::size_t n) {
    if (partial.size() < n) partial.resize(n);
    return partial.data();
  }
};

}  // namespace detail
}  // namespace normkit

NORMKIT_CODE_END
