// Thin layer over Eigen's packet math, so every kernel vectorizes for whatever ISA the
// user compiles for (SSE, AVX2, AVX-512, NEON) without intrinsics of our own.
//
// Storage types without packet arithmetic (Eigen::half, Eigen::bfloat16) are widened to
// the accumulation type on load and narrowed on store; the kernels themselves only ever
// compute in Acc (float or double).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__has_include)
#if __has_include(<unistd.h>)
#include <unistd.h>
#endif
#endif

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "config.hpp"
#include "tensor.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {
namespace detail {

/// Accumulation type: float for float/half/bfloat16 storage, double for double.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// A wider type for the rare rows whose sums overflow Acc.
template <class Acc>
using wide_t = std::conditional_t<std::is_same_v<Acc, float>, double, long double>;

template <class Acc>
using packet_t = typename Eigen::internal::packet_traits<Acc>::type;

template <class Acc>
inline constexpr Index packet_size = Eigen::internal::unpacket_traits<packet_t<Acc>>::size;

/// Whether x[0], x[stride], ... (n values) are all finite. No branch per value: |v| <=
/// max is false for inf and NaN, and the or of those runs in vectors, which matters
/// where it is the common case's check (DyT's per-channel sums, every backward); half and
/// bfloat16 are compared in Acc, where they are exact.
/// (A contiguous run has a loop of its own: with the stride unknown, GCC vectorized
/// neither.)
template <class T>
bool all_finite(const T* x, Index n, Index stride = 1) {
  using F = acc_t<T>;
  const auto bad = [](T v) {
    return static_cast<unsigned>(!(std::fabs(static_cast<F>(v)) <= std::numeric_limits<F>::max()));
  };
  unsigned any = 0;
  if (stride == 1)
    for (Index i = 0; i < n; ++i) any |= bad(x[i]);
  else
    for (Index i = 0; i < n; ++i) any |= bad(x[i * stride]);
  return any == 0;
}

/// on ? x : y for a loop that should vectorize. float and double as a blend of their
/// bits: written as a ternary, the compiler moves the (possibly trapping) arithmetic
/// that makes x and y into two branches, and the vectorizer does not take branches.
/// Other types (long double, which never vectorizes): the ternary.
template <class F>
F blend(bool on, F x, F y) {
  if constexpr (std::is_same_v<F, float> || std::is_same_v<F, double>) {
    using U = std::conditional_t<std::is_same_v<F, float>, std::uint32_t, std::uint64_t>;
    U bx, by;
    std::memcpy(&bx, &x, sizeof bx);
    std::memcpy(&by, &y, sizeof by);
    const U mask = U(0) - static_cast<U>(on);
    const U r = (bx & mask) | (by & ~mask);
    F out;
    std::memcpy(&out, &r, sizeof out);
    return out;
  } else {
    return on ? x : y;
  }
}

namespace simd {

using Eigen::internal::padd;
using Eigen::internal::pand;
using Eigen::internal::pandnot;
using Eigen::internal::pcmp_eq;
using Eigen::internal::pcmp_le;
using Eigen::internal::pdiv;
using Eigen::internal::pmadd;
using Eigen::internal::pmul;
using Eigen::internal::predux;
using Eigen::internal::predux_any;
using Eigen::internal::pselect;
using Eigen::internal::pset1;
using Eigen::internal::psub;
using Eigen::internal::ptrue;

template <class Acc>
EIGEN_STRONG_INLINE packet_t<Acc> zero() {
  return pset1<packet_t<Acc>>(Acc(0));
}

/// The lanes of v that are finite, as a mask (all ones or zero per lane): v - v is 0
/// there, NaN for an infinity or a NaN.
template <class P>
EIGEN_STRONG_INLINE P pisfinite(const P& v) {
  return pcmp_eq(psub(v, v), pset1<P>(0));
}

/// The mask (all ones or zero per lane) of a packet's first n lanes.
template <class P>
EIGEN_STRONG_INLINE P first_lanes(Index n) {
  using S = typename Eigen::internal::unpacket_traits<P>::type;
  return Eigen::internal::pcmp_lt(Eigen::internal::plset<P>(S(0)), pset1<P>(static_cast<S>(n)));
}

template <class Acc, class T>
EIGEN_STRONG_INLINE packet_t<Acc> load(const T* p) {
  using P = packet_t<Acc>;
  if constexpr (std::is_same_v<T, Acc>) {
    return Eigen::internal::ploadu<P>(p);
  } else {
    alignas(64) Acc tmp[packet_size<Acc>];
    for (Index i = 0; i < packet_size<Acc>; ++i) tmp[i] = static_cast<Acc>(p[i]);
    return Eigen::internal::pload<P>(tmp);
  }
}

template <class Acc, class T>
EIGEN_STRONG_INLINE void store(T* p, const packet_t<Acc>& v) {
  if constexpr (std::is_same_v<T, Acc>) {
    Eigen::internal::pstoreu(p, v);
  } else {
    alignas(64) Acc tmp[packet_size<Acc>];
    Eigen::internal::pstore(tmp, v);
    for (Index i = 0; i < packet_size<Acc>; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

#if defined(__AVX2__)
/// The mask of a partial packet of n lanes, as AVX2's masked loads and stores take it:
/// lanes of P's width, all ones below n, zero from n on.
template <class P>
EIGEN_STRONG_INLINE __m256i lane_mask(Index n) {
  static_assert(sizeof(P) == 32, "a 256-bit packet");
  if constexpr (sizeof(typename Eigen::internal::unpacket_traits<P>::type) == 4)
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  else
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(static_cast<long long>(n)), _mm256_setr_epi64x(0, 1, 2, 3));
}
#endif

/// Whether a partial packet of Acc read from or written to T takes one masked
/// instruction: T is Acc, and the ISA has masked loads and stores of the packet's width
/// (AVX-512; AVX2 for 256-bit packets); lanes from n on are then never touched, so no
/// fault past the end of an array either. Otherwise the lanes go one by one through an
/// array on the stack, and the packet load that follows the lane stores waits for them
/// (a store-forwarding stall): BatchNorm's map of 32x512x7x7 floats (rows of 49, a
/// partial packet each) spent a third of its time there.
template <class Acc, class T>
constexpr bool masked_tail() {
  if constexpr (!std::is_same_v<T, Acc>) {
    return false;
  } else {
    constexpr std::size_t bytes = sizeof(packet_t<Acc>);
#if defined(__AVX512F__)
    if (bytes == 64) return true;
#endif
#if defined(__AVX2__)
    if (bytes == 32) return true;
#endif
    (void)bytes;
    return false;
  }
}

/// The first n < packet_size elements, the other lanes 0.
template <class Acc, class T>
EIGEN_STRONG_INLINE packet_t<Acc> load_partial(const T* p, Index n) {
  using P = packet_t<Acc>;
  if constexpr (masked_tail<Acc, T>()) {
#if defined(__AVX512F__)
    if constexpr (sizeof(P) == 64) {
      if constexpr (std::is_same_v<Acc, float>)
        return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
      else
        return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
    }
#endif
#if defined(__AVX2__)
    if constexpr (sizeof(P) == 32) {
      if constexpr (std::is_same_v<Acc, float>)
        return _mm256_maskload_ps(p, lane_mask<P>(n));
      else
        return _mm256_maskload_pd(p, lane_mask<P>(n));
    }
#endif
  }
  alignas(64) Acc tmp[packet_size<Acc>];
  for (Index i = 0; i < packet_size<Acc>; ++i) tmp[i] = i < n ? static_cast<Acc>(p[i]) : Acc(0);
  return Eigen::internal::pload<P>(tmp);
}

template <class Acc, class T>
EIGEN_STRONG_INLINE void store_partial(T* p, const packet_t<Acc>& v, Index n) {
  if constexpr (masked_tail<Acc, T>()) {
#if defined(__AVX512F__)
    if constexpr (sizeof(packet_t<Acc>) == 64) {
      if constexpr (std::is_same_v<Acc, float>)
        _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
      else
        _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), v);
      return;
    }
#endif
#if defined(__AVX2__)
    if constexpr (sizeof(packet_t<Acc>) == 32) {
      if constexpr (std::is_same_v<Acc, float>)
        _mm256_maskstore_ps(p, lane_mask<packet_t<Acc>>(n), v);
      else
        _mm256_maskstore_pd(p, lane_mask<packet_t<Acc>>(n), v);
      return;
    }
#endif
  }
  alignas(64) Acc tmp[packet_size<Acc>];
  Eigen::internal::pstore(tmp, v);
  for (Index i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
}

/// The correctly rounded square root of each lane of a packet of float or double (the
/// sqrt instructions of SSE2, AVX and AVX-512). Not Eigen's psqrt: with EIGEN_FAST_MATH
/// (Eigen's default) its AVX-512 float and double versions are a reciprocal-square-root
/// estimate refined by Newton steps, a few ulp off, and NaN for +inf. Elsewhere, lane by
/// lane with std::sqrt.
template <class P>
EIGEN_STRONG_INLINE P psqrt_exact(const P& x) {
  using Acc = typename Eigen::internal::unpacket_traits<P>::type;
  static_assert(std::is_same_v<Acc, float> || std::is_same_v<Acc, double>, "float or double packets");
#if defined(__AVX512F__)
  if constexpr (sizeof(P) == 64) {
    if constexpr (std::is_same_v<Acc, float>)
      return _mm512_sqrt_ps(x);
    else
      return _mm512_sqrt_pd(x);
  }
#endif
#if defined(__AVX__)
  if constexpr (sizeof(P) == 32) {
    if constexpr (std::is_same_v<Acc, float>)
      return _mm256_sqrt_ps(x);
    else
      return _mm256_sqrt_pd(x);
  }
#endif
#if defined(__SSE2__)
  if constexpr (sizeof(P) == 16) {
    if constexpr (std::is_same_v<Acc, float>)
      return _mm_sqrt_ps(x);
    else
      return _mm_sqrt_pd(x);
  }
#endif
  constexpr std::size_t W = Eigen::internal::unpacket_traits<P>::size;
  alignas(64) Acc v[W];
  Eigen::internal::pstore(v, x);
  for (Acc& e : v) e = std::sqrt(e);
  return Eigen::internal::pload<P>(v);
}

/// r[i] = 1 / sqrt(v[i] + eps) for i < n: the same bits as that scalar expression (the
/// square root and the division are both correctly rounded), in packets where F has them.
template <class F>
void inv_sqrt_plus(const F* v, F eps, F* r, Index n) {
  Index i = 0;
  if constexpr (std::is_same_v<F, float> || std::is_same_v<F, double>) {
    using P = packet_t<F>;
    constexpr Index W = packet_size<F>;
    if constexpr (W > 1) {
      const P e = pset1<P>(eps), one = pset1<P>(F(1));
      for (; i + W <= n; i += W)
        Eigen::internal::pstoreu(r + i, pdiv(one, psqrt_exact(padd(Eigen::internal::ploadu<P>(v + i), e))));
    }
  }
  for (; i < n; ++i) r[i] = F(1) / std::sqrt(v[i] + eps);
}

/// Whether store_stream has a non-temporal store for the packets of T in this build
/// (float and double, x86: the packet's width in bytes 16 with SSE2, 32 with AVX, 64 with
/// AVX-512). Where it is false, no kernel asks for streaming. The one list of widths that
/// store_stream follows: an AVX-512 build once had no case of its own there and silently
/// wrote its "streamed" outputs with ordinary stores, a read-for-ownership per line
/// (LayerNorm forward 8192x4096 on one core ran 0.7x as fast as the AVX2 build).
template <class T>
inline constexpr bool can_stream_v =
    (std::is_same_v<T, float> || std::is_same_v<T, double>)&&(
#if defined(__AVX512F__)
        sizeof(packet_t<acc_t<T>>) == 64 ||
#endif
#if defined(__AVX__)
        sizeof(packet_t<acc_t<T>>) == 32 ||
#endif
#if defined(__SSE2__)
        sizeof(packet_t<acc_t<T>>) == 16 ||
#endif
        false);

/// Non-temporal store of a packet of float or double to `p`, aligned to the packet: large
/// outputs then bypass the cache instead of costing a read-for-ownership each line,
/// which is what separates ~67% from ~100% of memcpy bandwidth in DRAM. An ordinary
/// store where can_stream_v is false.
template <class Acc, class T>
EIGEN_STRONG_INLINE void store_stream(T* p, const packet_t<Acc>& v) {
  if constexpr (!std::is_same_v<T, Acc> || !can_stream_v<T>) {
    store<Acc>(p, v);
  } else if constexpr (sizeof(packet_t<Acc>) == 64) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>)
      _mm512_stream_ps(p, v);
    else
      _mm512_stream_pd(p, v);
#endif
  } else if constexpr (sizeof(packet_t<Acc>) == 32) {
#if defined(__AVX__)
    if constexpr (std::is_same_v<T, float>)
      _mm256_stream_ps(p, v);
    else
      _mm256_stream_pd(p, v);
#endif
  } else {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, float>)
      _mm_stream_ps(p, v);
    else
      _mm_stream_pd(p, v);
#endif
  }
}

/// Asks for the cache line of p[i] ahead of its use (into L2 and up). A prefetch never
/// faults, and the address is formed as an integer, so p[i] may lie past the end of
/// the buffer. The row kernels call it on the next row while
/// they write the current one, so that its reads overlap the writes instead of waiting
/// for them: a row is read from memory in a pass of its own, and the hardware
/// prefetchers stop at the end of that pass.
template <class T>
EIGEN_STRONG_INLINE void prefetch(const T* p, Index i) {
#if defined(__SSE2__)
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(i) * sizeof(T);
  _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T1);
#else
  (void)p;
  (void)i;
#endif
}

/// prefetch() of every 64-byte line of the `Count` elements at p + i: a loop that steps
/// by more than a line asks for each of them (two packets of float are one line with
/// AVX2, two with AVX-512).
template <Index Count, class T>
EIGEN_STRONG_INLINE void prefetch_span(const T* p, Index i) {
  constexpr Index per_line = std::max<Index>(1, Index(64) / Index(sizeof(T)));
  for (Index k = 0; k < Count; k += per_line) prefetch(p, i + k);
}

/// Orders the streaming stores of this thread before whatever follows.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/// Outputs of at least this many bytes are written with streaming (non-temporal) stores:
/// a store that misses the cache then does not first read the line it overwrites, and
/// the output does not push the input out of the last-level cache. The price is that
/// the output is not left in the cache for its reader, so smaller outputs, which may
/// stay there, are written normally.
///
/// 8 MiB: LayerNorm forward of 4096x768 floats (12 MiB per tensor), streamed against
/// not, alternating in one process on a 2-core Zen 3 VM (32 MiB L3 shared with other
/// tenants), took 0.56-0.60x the time at 1 thread and 0.68-0.72x at 2; RMSNorm forward
/// 0.65-0.80x, LayerNorm and RMSNorm backward 0.72-0.81x, DyT 0.89-1.07x. At 2048x768
/// (6 MiB) streaming won at 1 thread and lost at 2 (LayerNorm forward 0.70x and 1.27x
/// the time), and below that it lost (the tensors stay in the cache). Override with
/// -DNORMKIT_STREAM_BYTES=... (bytes of one output tensor) for a machine whose
/// last-level cache keeps more, or less.
#ifdef NORMKIT_STREAM_BYTES
#define NORMKIT_STREAM_BYTES_USER 1
#else
#define NORMKIT_STREAM_BYTES 8388608
#endif
inline constexpr std::size_t kStreamBytes = NORMKIT_STREAM_BYTES;

/// The last-level cache's size in bytes as the system reports it (0 where it does not),
/// or what a test sets.
inline std::size_t& llc_bytes() {
  static std::size_t bytes = [] {
    long b = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    b = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return b > 0 ? static_cast<std::size_t>(b) : std::size_t{0};
  }();
  return bytes;
}

/// Whether a pass that writes `elements` values of T and touches `tensors` tensors of
/// that size in all (inputs and output) writes with streaming stores: the output has
/// kStreamBytes or more, and the tensors together at least 1/16 of the last-level
/// cache (where the system reports it). The second condition changes nothing on a
/// 32 MiB L3 (2 MiB); on a Xeon whose L3 reports 480 MiB (30 MiB; a share of a large
/// host's cache), 4096x768 floats, streamed against not, best of 60, one process:
/// LayerNorm forward (two tensors, 24 MiB) took 1.19x the time streamed at 1 thread and
/// 1.21x at 2, DyT forward 1.08x and 1.06x, while backward (three tensors, 36 MiB) took
/// 0.87x and 0.90x (LayerNorm), 0.86x and 0.84x (DyT). With NORMKIT_STREAM_BYTES
/// defined by the user, that size alone decides.
template <class T>
inline bool stream_output(Index elements, int tensors) {
  const std::size_t bytes = static_cast<std::size_t>(elements) * sizeof(T);
  if (!can_stream_v<T> || bytes < kStreamBytes) return false;
#if defined(NORMKIT_STREAM_BYTES_USER)
  (void)tensors;
  return true;
#else
  return bytes * static_cast<std::size_t>(tensors) >= llc_bytes() / 16;
#endif
}

/// Elements to skip before `p` is aligned for a streaming store.
template <class Acc, class T>
inline Index misalignment(const T* p) {
  constexpr std::uintptr_t bytes = sizeof(Acc) * packet_size<Acc>;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p) % bytes;
  if (a == 0 || a % sizeof(T) != 0) return a == 0 ? 0 : -1;
  return static_cast<Index>((bytes - a) / sizeof(T));
}

/// Full packet when n == packet_size, else the first n lanes (zero-filled).
template <class Acc, class T>
EIGEN_STRONG_INLINE packet_t<Acc> load_n(const T* p, Index n) {
  return n == packet_size<Acc> ? load<Acc>(p) : load_partial<Acc>(p, n);
}

template <class Acc, class T>
EIGEN_STRONG_INLINE void store_n(T* p, const packet_t<Acc>& v, Index n, bool stream) {
  if (n != packet_size<Acc>)
    store_partial<Acc>(p, v, n);
  else if (stream)
    store_stream<Acc>(p, v);
  else
    store<Acc>(p, v);
}

}  // namespace simd

/// Applies f(i, count, stream) to [0, n) in packets: full packets get count ==
/// packet_size and the tail one partial call, so that every element goes through the
/// same packet arithmetic. With `stream` set, full packets are aligned for streaming
/// stores (a partial head first) and f is told so through its third argument, a
/// compile-time constant in each of the two loops: the loop body the compiler sees has
/// no branch on it. Always inlined: called out of line, f's captures are read through
/// references that every (may-alias) packet store forces the loop to reload.
template <class Acc, class T, class F>
EIGEN_ALWAYS_INLINE void for_each_packet(T* out, Index n, bool stream, F&& f) {
  constexpr Index W = packet_size<Acc>;
  Index i = 0;
  const Index head = stream ? simd::misalignment<Acc>(out) : -1;
  if (head >= 0) {
    if (head > 0) {
      i = head < n ? head : n;
      f(Index{0}, i, std::false_type{});
    }
    for (; i + W <= n; i += W) f(i, W, std::true_type{});
  } else {
    for (; i + W <= n; i += W) f(i, W, std::false_type{});
  }
  if (i < n) f(i, n - i, std::false_type{});
}

}  // namespace detail
}  // namespace normkit

NORMKIT_CODE_END
