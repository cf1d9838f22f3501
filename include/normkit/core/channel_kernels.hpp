// Per-channel kernels over the canonical view [outer, C, inner] (see tensor.hpp): the
// statistics of BatchNorm's forward, the per-channel sums of its backward, and the
// per-channel affine map both passes end with.
//
//   moments    (n, mean, M2) per channel over outer x inner values, in double
//   grad sums  A = sum(x - m), B = sum(dy), Cc = sum(dy * (x - m)) per channel, in double
//   map        out = (x - m) * a + b,  or with dy: out = ((x - m) * a + dy) * k + b,
//              m, a, b, k per channel
//
// Two memory shapes:
// - row path (inner >= kRowPathMin: NCHW, NCL, ColMajor channels-last): every (o, c) is
//   a contiguous row of `inner` values, cut into segments of at most kSeg; rows of at
//   most kShortRun are summed kRunsAtOnce at a time, their latencies overlapped;
// - column path (inner small: channels-last, (N, C)): a row-major [outer, C * inner]
//   matrix reduced over its rows, in chunks of up to kChunkRows rows and tiles of columns.
// Numerics: each segment (L1) and chunk (L2) is small enough to stay in cache, so its
// moments are two-pass there (a shifted sum for the mean, then sum(d) and sum(d^2) around it, the
// corrected two-pass algorithm) in Acc; the pieces are merged in double with Chan's
// formula. Never E[x^2] - E[x]^2. Pieces and their merge order depend on the shape
// only, never on the thread count, so every result is bitwise identical for any
// number of threads. A float piece whose sums overflow although its inputs are finite
// is redone in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "norm_kernels.hpp"
#include "parallel.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {
namespace detail {

/// Count, mean and sum of squared deviations of a set of values.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

/// A corrected sum of squares q - a^2/n clamped at 0 against rounding, NaN kept: an
/// overflowed sum (inf - inf) must stay non-finite so that the caller redoes the channel
/// in a wider type; std::max(0.0, NaN) would turn it into a silent 0.
template <class F>
F nonnegative(F v) {
  return v < F(0) ? F(0) : v;
}

/// Chan et al.'s pairwise update: a becomes the moments of a's values and b's.
EIGEN_DONT_INLINE inline void merge(Moments& a, const Moments& b) {
  if (b.n == 0) return;
  if (a.n == 0) {
    a = b;
    return;
  }
  const double n = a.n + b.n, delta = b.mean - a.mean;
  a.mean += delta * (b.n / n);
  a.m2 += b.m2 + delta * delta * (a.n * b.n / n);
  a.n = n;
}

inline constexpr Index kRowPathMin = 32;  // shorter rows go through the column path
inline constexpr Index kSeg = 2048;       // 8 KiB of float: both passes in L1
inline constexpr Index kChunkRows = 128;  // column path: rows per chunk
inline constexpr Index kRowsAtOnce = 4;   // column path: rows per load/store of the partial sums
inline constexpr Index kColGroup = 512;   // column path: columns per work item (2 KiB rows of float read whole)
// Column path, moments: packets per tile, as many independent accumulator chains as the
// 16 vector registers of AVX2 hold (shift + 2 sums each).
inline constexpr Index kMomentPackets = 4;
// Column path: how far ahead of its reads a moments loop asks for lines, in bytes (whole
// rows; see column_ahead).
inline constexpr Index kColumnAhead = 8192;

struct ChannelView {
  Index outer = 1, C = 1, inner = 1;
  Index size() const { return outer * C * inner; }
  Index count() const { return outer * inner; }  // values per channel
  bool row_path() const { return inner >= kRowPathMin; }
  Index segs() const { return (inner + kSeg - 1) / kSeg; }
  Index cols() const { return C * inner; }
};

inline ChannelView channel_view(const std::vector<Index>& dims, bool row_major, std::size_t axis) {
  const Block3 b = block3(dims, row_major, axis, axis + 1);
  return ChannelView{b.outer, b.mid, b.inner};
}

/// Channels [begin, end) of a view. The row path runs its passes over a range of
/// channels as well as over all of them, so that a caller can take the channels a
/// group at a time, each group's second pass reading what its first left in cache.
/// Every per-channel result is the same either way (the pieces of a channel and their
/// order do not depend on the range). The column path takes all channels only.
struct ChannelRange {
  Index begin = 0, end = 0;
  Index size() const { return end - begin; }
  bool contains(Index c) const { return c >= begin && c < end; }
  /// The range's runs (row path: one channel of one outer index each) in (outer,
  /// channel) order: the channel of the k-th, and the offset of its first value.
  Index channel_of(Index k) const { return begin + k % size(); }
  Index run_offset(const ChannelView& v, Index k) const {
    return ((k / size()) * v.C + channel_of(k)) * v.inner;
  }
};

inline ChannelRange all_channels(const ChannelView& v) { return {0, v.C}; }

#ifndef NORMKIT_GROUP_BYTES
#define NORMKIT_GROUP_BYTES 524288
#endif
/// Input per group (and per thread) of two passes run a group of channels at a time:
/// NORMKIT_GROUP_BYTES, or what a test sets (to compare groups of one channel with one
/// group of all).
inline double& group_bytes() {
  static double bytes = NORMKIT_GROUP_BYTES;
  return bytes;
}

/// Channels per group where a caller runs two passes over the row path a group at a
/// time: about group_bytes() of the first pass's input per thread, so that the second
/// pass finds it in cache, and on a pool at least twice the inline limit, so that the
/// threads still share each pass. Results do not depend on it.
template <class Dev>
Index group_channels(const Dev& dev, const ChannelView& v, double bytes_per_value) {
  const int threads = num_threads(dev);
  const double per_channel = std::max(1.0, static_cast<double>(v.count()) * bytes_per_value);
  const double target = threads > 1 ? std::max(group_bytes() * threads, 2 * kInlineBytes) : group_bytes();
  return static_cast<Index>(std::clamp(target / per_channel, 1.0, static_cast<double>(std::max<Index>(v.C, 1))));
}

/// Runs body(device, range, concurrent) over every channel of a row-path view, a group of
/// channels (group_channels) per call. On a pool with channels enough for every thread,
/// the groups themselves run in parallel, each on one thread (both passes of a group then
/// stay in that thread's cache, with no wait between them), and `concurrent` is true: the
/// body must not share scratch with other calls. Otherwise one group after another, each
/// pass shared by the pool's threads. The groups change no result (see ChannelRange).
template <class Dev, class Body>
void for_each_channel_group(const Dev& dev, const ChannelView& v, double bytes_per_value, Body&& body) {
  const int threads = num_threads(dev);
  const Index group = group_channels(dev, v, bytes_per_value);
  if (threads > 1 && group < v.C && v.C >= Index{2} * threads) {
    const Eigen::DefaultDevice one;
    const Index per_call = group_channels(one, v, bytes_per_value);
    const double bytes = 2 * bytes_per_value * static_cast<double>(v.count());
    parallel_for(dev, v.C, bytes, bytes, [&](Index c0, Index c1) {
      for (Index c = c0; c < c1; c += per_call) body(one, ChannelRange{c, std::min(c1, c + per_call)}, true);
    });
    return;
  }
  for (Index c0 = 0; c0 < v.C; c0 += group) body(dev, ChannelRange{c0, std::min(v.C, c0 + group)}, false);
}

/// Rows per chunk of the column path: the chunk's columns of a work item (at most
/// kColGroup of them) over that many rows stay in L2 (256 KiB) between the two passes
/// of tile_moments, which read them again right after chunk_means.
template <class T>
Index chunk_rows(const ChannelView& v) {
  const Index row_bytes = std::min(v.cols(), kColGroup) * static_cast<Index>(sizeof(T));
  return std::clamp<Index>((Index(256) << 10) / std::max<Index>(row_bytes, 1), 16, kChunkRows);
}

/// The distance, in elements of a matrix with leading dimension ld, at which the chunk
/// loops of the column moments prefetch: whole rows, about kColumnAhead bytes. They read 4
/// rows at a time across the columns, then the next 4: the hardware prefetchers alone
/// kept too few lines in flight: the moments of 32x56x56x64 channels-last (rows of
/// 256 B, 1 thread) took 1.32-1.66 ms in four runs, 1.13-1.18 with this (8 KiB ahead;
/// 1 KiB: 1.31-1.39).
/// Prefetches never fault, so the distance may run past the block or the tensor.
template <class T>
Index column_ahead(Index ld) {
  const Index row_bytes = std::max<Index>(1, ld * Index(sizeof(T)));
  return (kColumnAhead + row_bytes - 1) / row_bytes * ld;
}

/// Whether the packet of Acc at element e is the one that prefetches for its 64 bytes of
/// T: of packets stepping through a run from any start, one per line (every one where a
/// line holds a packet or less).
template <class Acc, class T>
constexpr bool line_step(Index e) {
  return e % std::max<Index>(1, 64 / Index(sizeof(T))) < packet_size<Acc>;
}

/// Column-path row blocks: a fixed number for the shape, at most 2^18 / cols of them so
/// that the per-(block, column) partials stay a few MiB.
inline Blocking column_blocking(const ChannelView& v) {
  const Index cap = std::max<Index>(1, std::min<Index>(64, (Index(1) << 18) / std::max<Index>(v.cols(), 1)));
  return fixed_blocking(v.outer, kChunkRows, cap);
}

// ---- moments ---------------------------------------------------------------------

/// The moments of n values from the sums of their deviations d = x - m: sd = sum(d),
/// sd2 = sum(d^2) (the corrected two-pass sum of squares). Never inlined: one compiled
/// copy for every kernel that sums a segment.
template <class Acc>
EIGEN_DONT_INLINE Moments corrected_moments(Index n, Acc m, Acc sd, Acc sd2) {
  const double dn = static_cast<double>(n), a = sd, d = a / dn;
  return Moments{dn, static_cast<double>(m) + d, nonnegative(double(sd2) - a * d)};
}

/// Moments of a contiguous segment (n >= 1), two-pass in Acc.
template <class Acc, class T>
EIGEN_DONT_INLINE Moments segment_moments(const T* x, Index n) {
  const Acc s = static_cast<Acc>(x[0]);
  const Acc m = s + row_sum<true>(x, n, s) / static_cast<Acc>(n);
  Acc sd, sd2;
  sum_d_d2<true>(x, n, m, sd, sd2);  // the run is in L1 by now; prefetch the next
  if constexpr (std::is_same_v<Acc, float>) {
    if (!(std::isfinite(sd) && std::isfinite(sd2)) && all_finite(x, n))
      return segment_moments<double>(x, n);
  }
  return corrected_moments(n, m, sd, sd2);
}

/// Row path: rows (runs) of at most kShortRun values are summed in pieces of a channel's
/// runs, kRunsAtOnce channels at a time (runs_moments, runs_grad_sums); longer ones a
/// segment of kSeg at a time.
inline constexpr Index kShortRun = 512;
inline constexpr Index kRunsAtOnce = 4;
static_assert(kShortRun <= kSeg, "a short run fits in a piece");

/// The pieces of each channel on the short-run path: its runs (one per outer index,
/// v.inner values each, v.C * v.inner apart) `runs` at a time, at most kSeg values a
/// piece, as even as they go; `count` pieces a channel. A piece is summed as one: its
/// two passes in L1, one horizontal reduction each. A run at a time (runs of 49 in
/// 32x512x7x7, a reduction, a division and a merge every 49 values) the moments took
/// 70% of BatchNorm's forward.
struct ShortPieces {
  Index runs = 1, count = 1;
  explicit ShortPieces(const ChannelView& v) {
    const Index most = std::max<Index>(1, kSeg / std::max<Index>(v.inner, 1)), outer = std::max<Index>(v.outer, 1);
    count = (outer + most - 1) / most;
    runs = (outer + count - 1) / count;
    count = (outer + runs - 1) / runs;
  }
  /// The runs of piece p (the last may have fewer).
  Index runs_of(Index p, const ChannelView& v) const { return std::min(runs, v.outer - p * runs); }
  /// The first value of piece p of channel c.
  Index offset(Index p, Index c, const ChannelView& v) const { return (p * runs * v.C + c) * v.inner; }
};

/// Short-run path: body(std::integral_constant<Index, G>, p, c0) for piece p of the G
/// channels c0 .. c0 + G - 1, over every piece of the channels of cr, spread over dev:
/// G = kRunsAtOnce, and G = 1 for each channel of a last, short group. `streams`: how
/// many arrays of T a piece reads.
template <class T, class Dev, class Body>
void for_each_piece_group(const Dev& dev, const ChannelView& v, ChannelRange cr, const ShortPieces& sp,
                          double streams, Body&& body) {
  const Index groups = (cr.size() + kRunsAtOnce - 1) / kRunsAtOnce;
  const double len = double(kRunsAtOnce * sp.runs * v.inner);
  parallel_for(dev, sp.count * groups, streams * len * double(sizeof(T)), 3.0 * len, [&](Index i0, Index i1) {
    for (Index i = i0; i < i1; ++i) {
      const Index p = i / groups, c0 = cr.begin + (i % groups) * kRunsAtOnce;
      if (cr.end - c0 >= kRunsAtOnce)
        body(std::integral_constant<Index, kRunsAtOnce>{}, p, c0);
      else
        for (Index c = c0; c < cr.end; ++c) body(std::integral_constant<Index, 1>{}, p, c);
    }
  });
}

/// Whether k runs of n values, ld apart from x on, are all finite.
template <class T>
bool runs_finite(const T* x, Index n, Index k, Index ld) {
  for (Index q = 0; q < k; ++q)
    if (!all_finite(x + q * ld, n)) return false;
  return true;
}

/// The moments of G pieces, each k runs of n values ld apart from x[g] on (n >= 1),
/// two-pass around the first value, with the pieces' sums interleaved: a piece alone is
/// a chain of latencies (its sums, their horizontal reductions, the division for the
/// mean, the second pass, two more reductions), which four at once overlap. A run's
/// last n % W values are a masked packet. Each piece's arithmetic is that of the piece
/// alone (G = 1), whatever its neighbours: the group a piece falls in does not change its
/// bits. BatchNorm training forward, float, 1 thread, AVX-512 Xeon, medians: four runs at
/// a time against one, ColMajor [128, 768] (768 runs of 128) 38 us -> 28, [64, 1024] 70 ->
/// 28; pieces of a channel's runs against a run a piece (three runs each, alternating),
/// NCHW 32x512x7x7 0.49-0.50 ms -> 0.29-0.35 (backward 0.53-0.57 -> 0.46), 32x256x14x14
/// 0.73-0.76 -> 0.63-0.65 (backward 0.90-0.93 -> 0.85-0.86), 8x64x16x16 25 us -> 20; but
/// ColMajor [128, 768] 27.6 -> 29.4-30.1 with GCC 12 (the same loops, one trip of the run
/// loop; clang 14: 31 -> 27.5).
template <Index G, class Acc, class T>
EIGEN_DONT_INLINE void runs_moments(const T* const* x, Index n, Index k, Index ld, Moments* out) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  constexpr std::size_t NG = G;  // array bounds (unsigned)
  const Index full = n / W * W, tail = n - full;
  const P keep = first_lanes<P>(tail);
  Acc m[NG];
  P ps[NG], a[NG], b[NG];
  for (Index g = 0; g < G; ++g) {
    m[g] = static_cast<Acc>(x[g][0]);
    ps[g] = pset1<P>(m[g]);
    a[g] = b[g] = zero<Acc>();
  }
  for (Index q = 0; q < k; ++q) {
    const Index o = q * ld;
    Index i = 0;
    for (; i + 2 * W <= full; i += 2 * W)
      for (Index g = 0; g < G; ++g) {
        a[g] = padd(a[g], psub(load<Acc>(x[g] + o + i), ps[g]));
        b[g] = padd(b[g], psub(load<Acc>(x[g] + o + i + W), ps[g]));
      }
    if (i < full)
      for (Index g = 0; g < G; ++g) a[g] = padd(a[g], psub(load<Acc>(x[g] + o + i), ps[g]));
    if (tail)
      for (Index g = 0; g < G; ++g) b[g] = padd(b[g], pand(psub(load_partial<Acc>(x[g] + o + full, tail), ps[g]), keep));
  }
  for (Index g = 0; g < G; ++g) {
    m[g] += predux(padd(a[g], b[g])) / static_cast<Acc>(n * k);
    ps[g] = pset1<P>(m[g]);
    a[g] = b[g] = zero<Acc>();
  }
  for (Index q = 0; q < k; ++q) {
    const Index o = q * ld;
    for (Index i = 0; i < full; i += W)
      for (Index g = 0; g < G; ++g) {
        const P d = psub(load<Acc>(x[g] + o + i), ps[g]);
        a[g] = padd(a[g], d);
        b[g] = pmadd(d, d, b[g]);
      }
    if (tail)
      for (Index g = 0; g < G; ++g) {
        const P d = pand(psub(load_partial<Acc>(x[g] + o + full, tail), ps[g]), keep);
        a[g] = padd(a[g], d);
        b[g] = pmadd(d, d, b[g]);
      }
  }
  for (Index g = 0; g < G; ++g) {
    const Acc sd = predux(a[g]), sd2 = predux(b[g]);
    if constexpr (std::is_same_v<Acc, float>) {
      if (!(std::isfinite(sd) && std::isfinite(sd2)) && runs_finite(x[g], n, k, ld)) {
        runs_moments<1, double>(x + g, n, k, ld, out + g);
        continue;
      }
    }
    out[g] = corrected_moments(n * k, m[g], sd, sd2);
  }
}

/// One strided column of nr values in double (the overflow fallback of a tile).
template <class T>
Moments column_moments_wide(const T* x, Index ld, Index nr) {
  double m = 0, sd = 0, sd2 = 0;
  for (Index r = 0; r < nr; ++r) m += static_cast<double>(x[r * ld]);
  m /= static_cast<double>(nr);
  for (Index r = 0; r < nr; ++r) {
    const double d = static_cast<double>(x[r * ld]) - m;
    sd += d;
    sd2 += d * d;
  }
  return Moments{double(nr), m + sd / double(nr), nonnegative(sd2 - sd * sd / double(nr))};
}

/// The means of nc <= kColGroup columns over nr rows of a row-major matrix with leading
/// dimension ld, shifted by the first row: mean[c] = x[0][c] + sum(x[r][c] - x[0][c]) / nr.
/// Row after row, so that memory is read in order (the first touch of the chunk);
/// per-column partial sums live in L1, loaded and stored once per kRowsAtOnce rows
/// (added in row order: the same sums as one row at a time).
template <class Acc, class T>
EIGEN_DONT_INLINE void chunk_means(const T* x, Index ld, Index nr, Index nc, Acc* mean) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  alignas(64) Acc s[kColGroup] = {}, a[kColGroup] = {};
  const Index ahead = column_ahead<T>(ld);
  for (Index j = 0; j < nc; ++j) s[j] = static_cast<Acc>(x[j]);
  for (Index r = 1; r < nr; r += kRowsAtOnce) {
    const Index rows = std::min(kRowsAtOnce, nr - r);
    const T* xr = x + r * ld;
    for (Index j = 0; j < nc; j += W) {
      const Index cnt = std::min(W, nc - j);
      const P sj = Eigen::internal::pload<P>(s + j);
      P aj = Eigen::internal::pload<P>(a + j);
      for (Index q = 0; q < rows; ++q) {
        if (line_step<Acc, T>(j)) prefetch(xr, q * ld + j + ahead);
        aj = padd(aj, psub(load_n<Acc>(xr + q * ld + j, cnt), sj));
      }
      Eigen::internal::pstore(a + j, aj);
    }
  }
  const Acc inv = Acc(1) / static_cast<Acc>(nr);
  for (Index j = 0; j < nc; ++j) mean[j] = s[j] + a[j] * inv;
}

/// Moments of nc <= kMomentPackets * W columns over nr rows around their chunk means
/// (chunk_means): cmean[c], cm2[c], the corrected two-pass sums. The chunk is in cache.
template <class Acc, class T>
EIGEN_DONT_INLINE void tile_moments(const T* x, Index ld, Index nr, Index nc, const Acc* mean, double* cmean, double* cm2) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>, K = kMomentPackets;
  const Index np = (nc + W - 1) / W;
  auto cnt = [&](Index k) { return k + 1 < np ? W : nc - k * W; };
  P s[K], a[K], q[K];
  for (Index k = 0; k < np; ++k) {
    s[k] = load_n<Acc>(mean + k * W, cnt(k));
    a[k] = zero<Acc>();
    q[k] = zero<Acc>();
  }
  if (np == K && nc == K * W) {  // the common case: accumulators in registers (unrolled at -O2 too)
    for (Index r = 0; r < nr; ++r)
#pragma GCC unroll 4
      for (Index k = 0; k < K; ++k) {
        const P d = psub(load<Acc>(x + r * ld + k * W), s[k]);
        a[k] = padd(a[k], d);
        q[k] = pmadd(d, d, q[k]);
      }
  } else {
    for (Index r = 0; r < nr; ++r)
      for (Index k = 0; k < np; ++k) {
        const P d = psub(load_n<Acc>(x + r * ld + k * W, cnt(k)), s[k]);
        a[k] = padd(a[k], d);
        q[k] = pmadd(d, d, q[k]);
      }
  }
  alignas(64) Acc ms[std::size_t(K * W)], as[std::size_t(K * W)], qs[std::size_t(K * W)];
  for (Index k = 0; k < np; ++k) {
    Eigen::internal::pstore(ms + k * W, s[k]);
    Eigen::internal::pstore(as + k * W, a[k]);
    Eigen::internal::pstore(qs + k * W, q[k]);
  }
  const double inv_n = 1.0 / static_cast<double>(nr);
  for (Index c = 0; c < nc; ++c) {
    if (std::is_same_v<Acc, float> && !(std::isfinite(as[c]) && std::isfinite(qs[c])) &&
        all_finite(x + c, nr, ld)) {
      const Moments w = column_moments_wide(x + c, ld, nr);
      cmean[c] = w.mean;
      cm2[c] = w.m2;
    } else {
      const double sa = as[c];
      cmean[c] = static_cast<double>(ms[c]) + sa * inv_n;
      cm2[c] = nonnegative(double(qs[c]) - sa * sa * inv_n);
    }
  }
}

/// Column path: rows of at most this many packets of Acc keep their per-column sums in
/// registers (chunk_moments_narrow): 8 x 2 accumulators, the 16 vector registers of AVX2.
inline constexpr Index kRegisterPackets = 8;

/// chunk_moments' sums for nc <= kRegisterPackets * W columns, the sums of each packet of
/// columns in registers for the whole chunk, stored once at its end into a[], q[]: the
/// same additions in the same (row) order as the loop through L1 partials, so the same
/// bits, without a load and a store of the partials every kRowsAtOnce rows. Channels-last
/// with 64 channels of float (rows of 256 B), moments of 32x56x56x64, median of 40
/// alternating with the L1 loop, AVX-512 Xeon: 1.19-1.21 ms against 1.26-1.28 at 1
/// thread, 0.62-0.65 against 0.68-0.73 at 2 (an AVX2 build there: 1.09 against
/// 1.22-1.26; a plain sum of the same floats: 0.95-1.07).
template <class Acc, class T>
EIGEN_DONT_INLINE void chunk_moments_narrow(const T* x, Index ld, Index nr, Index nc, const Acc* shift, Acc* a,
                                            Acc* q) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>, K = kRegisterPackets;
  const Index np = (nc + W - 1) / W, last = nc - (np - 1) * W;
  P sa[K], sq[K], sh[K];
#pragma GCC unroll 8
  for (Index k = 0; k < K; ++k) {
    sa[k] = zero<Acc>();
    sq[k] = zero<Acc>();
    sh[k] = k < np ? load_n<Acc>(shift + k * W, k + 1 < np ? W : last) : zero<Acc>();
  }
  for (Index r = 0; r < nr; ++r) {
    const T* xr = x + r * ld;
#pragma GCC unroll 8
    for (Index k = 0; k < K; ++k) {
      if (k < np) {
        const P d = psub(load_n<Acc>(xr + k * W, k + 1 < np ? W : last), sh[k]);
        sa[k] = padd(sa[k], d);
        sq[k] = pmadd(d, d, sq[k]);
      }
    }
  }
#pragma GCC unroll 8
  for (Index k = 0; k < K; ++k) {
    if (k < np) {
      Eigen::internal::pstore(a + k * W, sa[k]);
      Eigen::internal::pstore(q + k * W, sq[k]);
    }
  }
}

/// The chunk's moments in one pass, for every chunk of a block but the first: sums of
/// d = x - shift and of d^2 (shift: the block's previous chunk means), row after row as
/// chunk_means reads them, so that summing overlaps the first touch of the chunk instead
/// of following it. cmean, cm2 as tile_moments gives them. One pass is as accurate as two
/// only while the shift is near the mean: returns false, with the chunk still in L2 for
/// the caller's two passes, where sum(d^2) > kOnePassSlack * M2 for some column (see
/// norm_kernels.hpp) or a sum is not finite.
template <class Acc, class T>
EIGEN_DONT_INLINE bool chunk_moments(const T* x, Index ld, Index nr, Index nc, const Acc* shift, double* cmean,
                                     double* cm2) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  alignas(64) Acc a[kColGroup] = {}, q[kColGroup] = {};
  if (nc <= kRegisterPackets * W) {
    chunk_moments_narrow<Acc>(x, ld, nr, nc, shift, a, q);
  } else {
    const Index ahead = column_ahead<T>(ld);
    for (Index r = 0; r < nr; r += kRowsAtOnce) {
      const Index rows = std::min(kRowsAtOnce, nr - r);
      const T* xr = x + r * ld;
      for (Index j = 0; j < nc; j += W) {
        const Index cnt = std::min(W, nc - j);
        const P sj = load_n<Acc>(shift + j, cnt);
        P aj = Eigen::internal::pload<P>(a + j), qj = Eigen::internal::pload<P>(q + j);
        for (Index k = 0; k < rows; ++k) {
          if (line_step<Acc, T>(j)) prefetch(xr, k * ld + j + ahead);
          const P d = psub(load_n<Acc>(xr + k * ld + j, cnt), sj);
          aj = padd(aj, d);
          qj = pmadd(d, d, qj);
        }
        Eigen::internal::pstore(a + j, aj);
        Eigen::internal::pstore(q + j, qj);
      }
    }
  }
  const double inv_n = 1.0 / static_cast<double>(nr);
  for (Index c = 0; c < nc; ++c) {
    const double sa = a[c], sq = q[c], m2 = sq - sa * sa * inv_n;
    if (!(sq <= kOnePassSlack * m2) && sq != 0) return false;  // also NaN and Inf
    cmean[c] = static_cast<double>(shift[c]) + sa * inv_n;
    cm2[c] = m2;
  }
  return true;
}

/// A chunk's moments (nb rows; cmean, cm2 per column) merged into its block's (na rows
/// so far), Chan's update in structure of arrays: the weights are the same for every
/// column, so it vectorizes.
/// The double arithmetic of the statistics (here, merge, tile_moments, ...) lives in
/// functions that are never inlined: one copy of it, and of the FMA contractions the
/// compiler chose in it, serves every device type, so that any thread count gives the
/// same bits.
EIGEN_DONT_INLINE inline void merge_chunk(double na, double nb, Index nc, const double* cmean, const double* cm2,
                                          double* bmean, double* bm2) {
  if (na == 0) {
    std::copy(cmean, cmean + nc, bmean);
    std::copy(cm2, cm2 + nc, bm2);
    return;
  }
  const double f = nb / (na + nb), g = na * nb / (na + nb);
  for (Index j = 0; j < nc; ++j) {
    const double delta = cmean[j] - bmean[j];
    bmean[j] += delta * f;
    bm2[j] += cm2[j] + delta * delta * g;
  }
}

/// Per-channel moments of x, out[C] (row path: the channels of cr only, the others
/// untouched). `work` is scratch reused across calls.
template <class T, class Dev>
void channel_moments(const Dev& dev, const T* x, const ChannelView& v, IndexVector<Moments>& work,
                     Moments* out, ChannelRange cr) {
  using Acc = acc_t<T>;
  constexpr Index W = packet_size<Acc>;
  std::fill(out + cr.begin, out + cr.end, Moments{});
  if (v.size() == 0) return;
  const ShortPieces sp(v);
  const Index nch = cr.size();
  const bool short_runs = v.row_path() && v.inner <= kShortRun;
  if (short_runs) {  // pieces of runs, kRunsAtOnce channels at a time
    work.resize(sp.count * nch);
    for_each_piece_group<T>(dev, v, cr, sp, 1.0, [&](auto group, Index p, Index c0) {
      constexpr Index G = decltype(group)::value;
      const T* first[std::size_t(G)];
      for (Index g = 0; g < G; ++g) first[g] = x + sp.offset(p, c0 + g, v);
      runs_moments<G, Acc>(first, v.inner, sp.runs_of(p, v), v.cols(), work.data() + p * nch + c0 - cr.begin);
    });
  } else if (v.row_path()) {  // segments of at most kSeg
    const Index segs = v.segs(), items = v.outer * nch * segs;
    work.resize(items);
    const Index len = std::min(v.inner, kSeg);
    parallel_for(dev, items, double(len) * double(sizeof(T)), 3.0 * double(len), [&](Index i0, Index i1) {
      for (Index i = i0; i < i1; ++i) {
        const Index row = i / segs, sg = i % segs;
        const Index n = std::min(kSeg, v.inner - sg * kSeg);
        const Index off = cr.run_offset(v, row) + sg * kSeg;
        work[i] = segment_moments<Acc>(x + off, n);
      }
    });
  }
  if (v.row_path()) {
    // Each channel's pieces in (piece or outer, segment) order, the channels the inner
    // loop, so that merges that follow each other (each a chain of double divisions,
    // multiplies and adds) are independent: one channel after another, the merges of
    // 32x512x7x7 (32 pieces a channel when a piece was a run) took 13% of its forward,
    // this way 6%.
    const Index along = short_runs ? sp.count : v.outer, segs = short_runs ? 1 : v.segs();
    for (Index o = 0; o < along; ++o)
      for (Index c = cr.begin; c < cr.end; ++c)
        for (Index sg = 0; sg < segs; ++sg)
          merge(out[c], work[(o * nch + c - cr.begin) * segs + sg]);
    return;
  }
  eigen_assert(cr.begin == 0 && cr.end == v.C && "the column path takes all channels");
  const Index cols = v.cols(), groups = (cols + kColGroup - 1) / kColGroup;
  const Blocking bl = column_blocking(v);
  work.resize(bl.blocks * cols);
  const Index crows = chunk_rows<T>(v);
  const double elems = double(bl.per_block * std::min(cols, kColGroup));
  parallel_for(dev, bl.blocks * groups, elems * sizeof(T), 4.0 * elems, [&](Index i0, Index i1) {
    // Chunk moments merged into the block's, structure of arrays so that the merge (the
    // same weights for every column) vectorizes.
    double bmean[kColGroup], bm2[kColGroup], cmean[kColGroup], cm2[kColGroup];
    alignas(64) Acc shift[kColGroup];
    for (Index i = i0; i < i1; ++i) {
      const Index b = i / groups, j0 = (i % groups) * kColGroup, nc = std::min(kColGroup, cols - j0);
      double n = 0;
      for (Index r0 = bl.begin(b); r0 < bl.end(b); r0 += crows) {
        const Index nr = std::min(crows, bl.end(b) - r0);
        const T* xc = x + r0 * cols + j0;
        if (n == 0 || !chunk_moments<Acc>(xc, cols, nr, nc, shift, cmean, cm2)) {
          chunk_means<Acc>(xc, cols, nr, nc, shift);
          for (Index t = 0; t < nc; t += kMomentPackets * W)
            tile_moments<Acc>(xc + t, cols, nr, std::min(kMomentPackets * W, nc - t), shift + t, cmean + t, cm2 + t);
        }
        merge_chunk(n, static_cast<double>(nr), nc, cmean, cm2, bmean, bm2);
        n += static_cast<double>(nr);
        for (Index j = 0; j < nc; ++j) shift[j] = static_cast<Acc>(cmean[j]);  // the next chunk's
      }
      Moments* o = work.data() + b * cols + j0;
      for (Index j = 0; j < nc; ++j) o[j] = Moments{n, bmean[j], bm2[j]};
    }
  });
  if (bl.blocks == 1 && v.inner == 1) {  // a column a channel, each a block's moments (n > 0): merge copies
    std::copy_n(work.data(), v.C, out);
    return;
  }
  for (Index c = 0; c < v.C; ++c)
    for (Index b = 0; b < bl.blocks; ++b)
      for (Index i = 0; i < v.inner; ++i) merge(out[c], work[b * cols + c * v.inner + i]);
}

template <class T, class Dev>
void channel_moments(const Dev& dev, const T* x, const ChannelView& v, IndexVector<Moments>& work,
                     Moments* out) {
  channel_moments(dev, x, v, work, out, all_channels(v));
}

// ---- backward sums ----------------------------------------------------------------

/// A = sum(d), B = sum(dy), Cc = sum(dy * d) with d = (x - m) * r over G pieces, each k
/// runs of n values ld apart from x[g] (and dy[g]) on, with m[g], r[g]; abc[3 * g + {0,
/// 1, 2}]. In Acc, U packet accumulators per sum and piece; a run's last n % W values
/// are a masked packet. The backward passes r = rstd, so that d is xhat (of order 1):
/// dy * (x - m) would underflow where dy and the spread are both small (dy ~ 1e-42, std
/// ~ 1e-5 in float) and lose what dy * xhat keeps. SelfDy: dy is d itself, so that Cc =
/// sum(d^2) (dy unused).
/// G > 1 interleaves the pieces' sums, as runs_moments does; each piece's arithmetic is
/// that of the piece alone (G = 1, the same U).
template <Index G, Index U, class Acc, bool SelfDy, class T>
EIGEN_DONT_INLINE void runs_grad_sums(const T* const* x, const T* const* dy, Index n, Index k, Index ld,
                                      const Acc* m, const Acc* r, double* abc) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  constexpr std::size_t NG = G, NU = U;  // array bounds (unsigned)
  const Index full = n / W * W, tail = n - full;
  const P keep = first_lanes<P>(tail);
  P pm[NG], pr[NG], a[NG][NU], b[NG][NU], c[NG][NU];
  for (Index g = 0; g < G; ++g) {
    pm[g] = pset1<P>(m[g]);
    pr[g] = pset1<P>(r[g]);
    for (Index u = 0; u < U; ++u) a[g][u] = b[g][u] = c[g][u] = zero<Acc>();
  }
  const auto add = [&](Index g, Index u, const P& d, const P& dg) {
    a[g][u] = padd(a[g][u], d);
    b[g][u] = padd(b[g][u], dg);
    c[g][u] = pmadd(dg, d, c[g][u]);
  };
  for (Index q = 0; q < k; ++q) {
    const Index o = q * ld;
    Index i = 0;
    for (; i + U * W <= n; i += U * W)
      for (Index g = 0; g < G; ++g)
        for (Index u = 0; u < U; ++u) {
          const P d = pmul(psub(load<Acc>(x[g] + o + i + u * W), pm[g]), pr[g]);
          add(g, u, d, SelfDy ? d : load<Acc>(dy[g] + o + i + u * W));
        }
    for (; i < full; i += W)
      for (Index g = 0; g < G; ++g) {
        const P d = pmul(psub(load<Acc>(x[g] + o + i), pm[g]), pr[g]);
        add(g, 0, d, SelfDy ? d : load<Acc>(dy[g] + o + i));
      }
    if (tail)
      for (Index g = 0; g < G; ++g) {
        const P d = pand(pmul(psub(load_partial<Acc>(x[g] + o + full, tail), pm[g]), pr[g]), keep);
        add(g, 0, d, SelfDy ? d : load_partial<Acc>(dy[g] + o + full, tail));
      }
  }
  for (Index g = 0; g < G; ++g) {
    const Acc A = predux(tree_sum<U>(a[g])), B = predux(tree_sum<U>(b[g])), C = predux(tree_sum<U>(c[g]));
    double* o = abc + 3 * g;
    if constexpr (std::is_same_v<Acc, float>) {
      if (!(std::isfinite(A) && std::isfinite(B) && std::isfinite(C)) && runs_finite(x[g], n, k, ld) &&
          (SelfDy || runs_finite(dy[g], n, k, ld)) && std::isfinite(m[g]) && std::isfinite(r[g])) {
        const double md = m[g], rd = r[g];
        runs_grad_sums<1, U, double, SelfDy>(x + g, SelfDy ? nullptr : dy + g, n, k, ld, &md, &rd, o);
        continue;
      }
    }
    o[0] = A;
    o[1] = B;
    o[2] = C;
  }
}

/// The same over nc <= kColGroup columns of nr rows (leading dimension ld), added into
/// abc[3 * c + {0, 1, 2}]; m and r are per column. Row after row, so that memory is read in
/// order; the per-column partial sums live in L1, loaded and stored once per
/// kRowsAtOnce rows (added in row order: the same sums as one row at a time).
template <class Acc, bool SelfDy, class T>
EIGEN_DONT_INLINE void chunk_grad_sums(const T* x, const T* dy, Index ld, Index nr, Index nc, const Acc* m,
                                       const Acc* rs, double* abc) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  alignas(64) Acc as[kColGroup] = {}, bs[kColGroup] = {}, cs[kColGroup] = {};
  for (Index r = 0; r < nr; r += kRowsAtOnce) {
    const Index rows = std::min(kRowsAtOnce, nr - r);
    const T* xr = x + r * ld;
    const T* gr = SelfDy ? nullptr : dy + r * ld;
    for (Index j = 0; j < nc; j += W) {
      const Index cnt = std::min(W, nc - j);
      const P mj = load_n<Acc>(m + j, cnt), rj = load_n<Acc>(rs + j, cnt);
      P a = Eigen::internal::pload<P>(as + j), b = Eigen::internal::pload<P>(bs + j),
        c = Eigen::internal::pload<P>(cs + j);
      for (Index q = 0; q < rows; ++q) {
        const P d = pmul(psub(load_n<Acc>(xr + q * ld + j, cnt), mj), rj);
        const P g = SelfDy ? d : load_n<Acc>(gr + q * ld + j, cnt);
        a = padd(a, d);
        b = padd(b, g);
        c = pmadd(g, d, c);
      }
      Eigen::internal::pstore(as + j, a);
      Eigen::internal::pstore(bs + j, b);
      Eigen::internal::pstore(cs + j, c);
    }
  }
  for (Index j = 0; j < nc; ++j) {
    double* o = abc + 3 * j;
    if (std::is_same_v<Acc, float> && !(std::isfinite(as[j]) && std::isfinite(bs[j]) && std::isfinite(cs[j])) &&
        all_finite(x + j, nr, ld) && (SelfDy || all_finite(dy + j, nr, ld)) && std::isfinite(m[j]) &&
        std::isfinite(rs[j])) {
      for (Index i = 0; i < nr; ++i) {
        const double d = (static_cast<double>(x[i * ld + j]) - static_cast<double>(m[j])) * static_cast<double>(rs[j]);
        const double g = SelfDy ? d : static_cast<double>(dy[i * ld + j]);
        o[0] += d;
        o[1] += g;
        o[2] += g * d;
      }
    } else {
      o[0] += as[j];
      o[1] += bs[j];
      o[2] += cs[j];
    }
  }
}

/// a[c], b[c], cc[c] += the sums of one block's columns of channel c (p: three per
/// column, in column order). Never inlined: one copy for every device, so that NaNs of
/// either sign combine in the same operand order for any thread count (the vectorized
/// loop may order them otherwise than a scalar one).
EIGEN_DONT_INLINE inline void add_block_sums(const double* __restrict p, Index C, Index inner, double* __restrict a,
                           double* __restrict b, double* __restrict cc) {
  if (inner == 1) {
    for (Index c = 0; c < C; ++c) {
      a[c] += p[3 * c];
      b[c] += p[3 * c + 1];
      cc[c] += p[3 * c + 2];
    }
    return;
  }
  for (Index c = 0; c < C; ++c)
    for (Index i = 0; i < inner; ++i) {
      const double* q = p + 3 * (c * inner + i);
      a[c] += q[0];
      b[c] += q[1];
      cc[c] += q[2];
    }
}

/// Per-channel A, B, Cc of d = (x - m) * r, m[C] and r[C] per channel (r null: 1):
/// out[3 * C] as A[C], B[C], Cc[C]. SelfDy (dy null): B = A and Cc = sum(d^2), the
/// moments around m.
/// Row path: the channels of `cr` only (out of the others untouched).
template <class T, class Acc, bool SelfDy = false, class Dev>
void channel_grad_sums(const Dev& dev, const T* x, const T* dy, const Acc* m, const Acc* r, const ChannelView& v,
                       std::vector<double>& work, double* out, ChannelRange cr) {
  for (int q = 0; q < 3; ++q) std::fill(out + q * v.C + cr.begin, out + q * v.C + cr.end, 0.0);
  if (v.size() == 0) return;
  const ShortPieces sp(v);
  const Index nch = cr.size();
  const bool short_runs = v.row_path() && v.inner <= kShortRun;
  if (short_runs) {  // pieces of runs, kRunsAtOnce channels at a time
    work.resize(static_cast<std::size_t>(3 * sp.count * nch));
    for_each_piece_group<T>(dev, v, cr, sp, 2.0, [&](auto group, Index p, Index c0) {
      constexpr Index G = decltype(group)::value;
      const T* xs[std::size_t(G)];
      const T* gs[std::size_t(G)] = {};
      Acc rs[std::size_t(G)];
      for (Index g = 0; g < G; ++g) {
        const Index off = sp.offset(p, c0 + g, v);
        xs[g] = x + off;
        if (!SelfDy) gs[g] = dy + off;
        rs[g] = r ? r[c0 + g] : Acc(1);
      }
      runs_grad_sums<G, 1, Acc, SelfDy>(xs, gs, v.inner, sp.runs_of(p, v), v.cols(), m + c0, rs,
                                        work.data() + 3 * (p * nch + c0 - cr.begin));
    });
  } else if (v.row_path()) {  // segments of at most kSeg
    const Index segs = v.segs(), items = v.outer * nch * segs;
    work.resize(static_cast<std::size_t>(3 * items));
    const Index len = std::min(v.inner, kSeg);
    parallel_for(dev, items, 2.0 * double(len) * double(sizeof(T)), 3.0 * double(len), [&](Index i0, Index i1) {
      for (Index i = i0; i < i1; ++i) {
        const Index row = i / segs, sg = i % segs, c = cr.channel_of(row);
        const Index off = cr.run_offset(v, row) + sg * kSeg;
        const T* xs = x + off;
        const T* gs = SelfDy ? nullptr : dy + off;
        const Acc rc = r ? r[c] : Acc(1);
        runs_grad_sums<1, 2, Acc, SelfDy>(&xs, &gs, std::min(kSeg, v.inner - sg * kSeg), 1, 0, m + c, &rc,
                                          work.data() + 3 * i);
      }
    });
  }
  if (v.row_path()) {  // each channel's pieces in (piece or outer, segment) order
    const Index along = short_runs ? sp.count : v.outer, segs = short_runs ? 1 : v.segs();
    for (Index c = cr.begin; c < cr.end; ++c)
      for (Index o = 0; o < along; ++o)
        for (Index sg = 0; sg < segs; ++sg) {
          const double* p = work.data() + 3 * ((o * nch + c - cr.begin) * segs + sg);
          for (int q = 0; q < 3; ++q) out[q * v.C + c] += p[q];
        }
    return;
  }
  eigen_assert(cr.begin == 0 && cr.end == v.C && "the column path takes all channels");
  const Index cols = v.cols(), groups = (cols + kColGroup - 1) / kColGroup;
  const Blocking bl = column_blocking(v);
  work.resize(static_cast<std::size_t>(3 * bl.blocks * cols));
  // Each column's shift and scale.
  const AlignedVector<Acc> mcol = expand_param<Acc>(m, v.C, v.inner, Acc(0)),
                           rcol = expand_param<Acc>(r, v.C, v.inner, Acc(1));
  const double elems = double(bl.per_block * std::min(cols, kColGroup));
  parallel_for(dev, bl.blocks * groups, 2 * elems * sizeof(T), 4.0 * elems, [&](Index i0, Index i1) {
    for (Index i = i0; i < i1; ++i) {
      const Index b = i / groups, j0 = (i % groups) * kColGroup, nc = std::min(kColGroup, cols - j0);
      double* o = work.data() + 3 * (b * cols + j0);
      std::fill(o, o + 3 * nc, 0.0);
      for (Index r0 = bl.begin(b); r0 < bl.end(b); r0 += kChunkRows) {
        const Index nr = std::min(kChunkRows, bl.end(b) - r0);
        chunk_grad_sums<Acc, SelfDy>(x + r0 * cols + j0, SelfDy ? nullptr : dy + r0 * cols + j0, cols, nr, nc,
                                     mcol.data() + j0, rcol.data() + j0, o);
      }
    }
  });
  // Each channel's sums in block order, its columns in order within a block (the same
  // additions for any thread count); with one column a channel, a loop that vectorizes.
  for (Index b = 0; b < bl.blocks; ++b)
    add_block_sums(work.data() + 3 * b * cols, v.C, v.inner, out, out + v.C, out + 2 * v.C);
}

template <class T, class Acc, bool SelfDy = false, class Dev>
void channel_grad_sums(const Dev& dev, const T* x, const T* dy, const Acc* m, const Acc* r, const ChannelView& v,
                       std::vector<double>& work, double* out) {
  channel_grad_sums<T, Acc, SelfDy>(dev, x, dy, m, r, v, work, out, all_channels(v));
}

// ---- channels in long double ------------------------------------------------------
// The rare channels whose values or coefficients leave the accumulation type's range
// (values near its maximum, a standard deviation beyond 1e19 in float) are normalized
// one value at a time in long double; the vector passes write 0 there, and the values
// are copied in after them (so that an output aliasing an input reads no value twice).

/// A channel normalized in long double, with its statistics.
struct WideChannel {
  Index channel = 0;
  long double mean = 0, invstd = 0;
};

/// f(k) for the memory index k of every value of channel c, in a fixed order.
template <class F>
void for_each_in_channel(const ChannelView& v, Index c, F&& f) {
  for (Index o = 0; o < v.outer; ++o) {
    const Index base = (o * v.C + c) * v.inner;
    for (Index i = 0; i < v.inner; ++i) f(base + i);
  }
}

/// The values of the listed channels, v.count() each in channel order, into out.
template <class T>
void scatter_channels(const T* values, const ChannelView& v, const std::vector<WideChannel>& channels, T* out) {
  std::size_t j = 0;
  for (const WideChannel& w : channels) for_each_in_channel(v, w.channel, [&](Index k) { out[k] = values[j++]; });
}

/// Mean and biased variance of channel c in long double, two-pass: for double channels
/// whose moments overflowed although every value is finite (|x| near DBL_MAX).
template <class T>
void exact_channel_moments(const T* x, const ChannelView& v, Index c, long double& mean, long double& var) {
  const long double n = static_cast<long double>(v.count());
  long double s = 0, d = 0, d2 = 0;
  for_each_in_channel(v, c, [&](Index k) { s += static_cast<long double>(static_cast<double>(x[k])); });
  mean = s / n;
  for_each_in_channel(v, c, [&](Index k) {
    const long double e = static_cast<long double>(static_cast<double>(x[k])) - mean;
    d += e;
    d2 += e * e;
  });
  mean += d / n;
  var = nonnegative(d2 - d * d / n) / n;
}

// ---- the per-channel affine map ---------------------------------------------------

/// Per-channel coefficients of out = (x - m) * a + b, or with dy of
/// out = ((x - m) * a + dy * g) * k + b. The second form is BatchNorm's training
/// backward dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)) with k = weight * rstd and
/// a = -rstd * mean(dy * xhat): no coefficient holds rstd^2, which leaves the float
/// range (std > 1e19) long before the result does. g lets a channel with |k| <= 1 fold
/// k into a and g (k = 1), so that the inner sum cannot overflow where the result does
/// not (dy near FLT_MAX scaled down by k).
template <class Acc>
struct ChannelMap {
  const Acc* m;
  const Acc* a;
  const Acc* b;
  const Acc* k;  // null: no dy term
  const Acc* g;  // the dy coefficient; used with k
};

/// One run of a row-path channel: out = (x - m) * a + b, or ((x - m) * a + dy * g) * k + b.
/// A function of its own with everything by value: the stores go through may-alias
/// vector types, and a loop that reads its pointers and constants through a lambda's
/// references reloads them after every store. Never inlined: one copy of the code for
/// every device type, so that even the sign of a NaN (which operand an FMA passes on)
/// is the same for any thread count.
template <bool HasDy, class Acc, class T>
EIGEN_DONT_INLINE void run_map(const T* x, const T* dy, T* out, Index n, Acc m, Acc a, Acc b, Acc k, Acc g,
             bool stream) {
  using namespace simd;
  using P = packet_t<Acc>;
  const P pm = pset1<P>(m), pa = pset1<P>(a), pb = pset1<P>(b), pk = pset1<P>(k),
          pg = pset1<P>(g);
  for_each_packet<Acc>(out, n, stream, [&](Index j, Index cnt, auto st) NORMKIT_INLINE_LAMBDA {
    const P d = psub(load_n<Acc>(x + j, cnt), pm);
    if constexpr (HasDy) {
      const P t = pmadd(d, pa, pmul(load_n<Acc>(dy + j, cnt), pg));
      store_n<Acc>(out + j, pmadd(t, pk, pb), cnt, st);
    } else {
      store_n<Acc>(out + j, pmadd(d, pa, pb), cnt, st);
    }
  });
}

/// One contiguous chunk of the column path, n elements starting at column 0: element e
/// takes the coefficients of its column, repeated in cm..cg so that a packet starting
/// at any column reads them contiguously. By value and never inlined, as run_map.
/// Asks for the lines of x and dy `next` elements away (the chunk that comes after this
/// one, the previous in memory) as it goes: the prefetchers stop at the end of a chunk
/// and wait for the next one's first misses: at 32x56x56x64 channels-last, 1 thread,
/// this map took 2.02 ms, with the prefetch 1.51 (best of 8 runs each).
template <bool HasDy, class Acc, class T>
EIGEN_DONT_INLINE void chunk_map(const T* x, const T* dy, T* out, Index n, Index cols, const Acc* cm,
               const Acc* ca, const Acc* cb, const Acc* ck, const Acc* cg, bool stream, Index next) {
  using namespace simd;
  using P = packet_t<Acc>;
  Index j = 0;  // the column of element e
  for_each_packet<Acc>(out, n, stream, [&](Index e, Index cnt, auto st) NORMKIT_INLINE_LAMBDA {
    if (line_step<Acc, T>(e)) {
      prefetch(x, e + next);
      if constexpr (HasDy) prefetch(dy, e + next);
    }
    const P d = psub(load_n<Acc>(x + e, cnt), load_n<Acc>(cm + j, cnt));
    if constexpr (HasDy) {
      const P t = pmadd(d, load_n<Acc>(ca + j, cnt),
                        pmul(load_n<Acc>(dy + e, cnt), load_n<Acc>(cg + j, cnt)));
      store_n<Acc>(out + e, pmadd(t, load_n<Acc>(ck + j, cnt), load_n<Acc>(cb + j, cnt)), cnt, st);
    } else {
      store_n<Acc>(out + e, pmadd(d, load_n<Acc>(ca + j, cnt), load_n<Acc>(cb + j, cnt)), cnt, st);
    }
    for (j += cnt; j >= cols;) j -= cols;
  });
}

/// out = (x - m) * a + b, or ((x - m) * a + dy * g) * k + b, over the whole tensor; out may
/// alias x or dy.
/// (x - m) first, not x * a + (b - m * a): with a large offset, x * a would round away
/// the spread that the normalization is for. Rows go last to first: the statistics
/// pass that usually precedes read them first to last, so the last ones are the ones
/// still in the last-level cache.
/// Row path: the channels of `cr` only. Streaming stores where the whole tensor is
/// large, whatever the range (a range's output is not read again either).
template <class T, class Acc, class Dev>
void channel_map(const Dev& dev, const T* x, const T* dy, T* out, const ChannelView& v, ChannelMap<Acc> p,
                 ChannelRange cr) {
  using namespace simd;
  if (v.size() == 0) return;
  const bool has_dy = dy != nullptr;
  const bool stream = stream_output<T>(v.size(), has_dy ? 3 : 2);
  const double bytes = (has_dy ? 3.0 : 2.0) * sizeof(T);
  if (v.row_path()) {
    const Index nch = cr.size(), rows = v.outer * nch;
    parallel_for(dev, rows, bytes * double(v.inner), 3.0 * double(v.inner), [&](Index r0, Index r1) {
      for (Index i = r0; i < r1; ++i) {
        const Index r = rows - 1 - i, c = cr.channel_of(r), off = cr.run_offset(v, r);
        const Acc k = has_dy ? p.k[c] : Acc(0), g = has_dy ? p.g[c] : Acc(0);
        if (has_dy)
          run_map<true>(x + off, dy + off, out + off, v.inner, p.m[c], p.a[c], p.b[c], k, g, stream);
        else
          run_map<false>(x + off, dy, out + off, v.inner, p.m[c], p.a[c], p.b[c], k, g, stream);
      }
      if (stream) stream_fence();
    });
    return;
  }
  eigen_assert(cr.begin == 0 && cr.end == v.C && "the column path takes all channels");
  // Column path: a chunk of rows of the [outer, C * inner] matrix is one contiguous run,
  // processed as such (streaming stores aligned once per chunk, never a partial store
  // into a streamed line). The coefficients are repeated per column, over cols + W - 1
  // entries, so that a packet starting at any column reads them contiguously (chunk_map
  // starts packets at columns 0 to cols - 1). Without dy only m, a, b are read.
  constexpr Index W = packet_size<Acc>;
  // Every array starts packet-aligned: a load that splits two cache lines costs two.
  const Index cols = v.cols(), len = cols + W - 1;
  const Index stride = (len + W - 1) / W * W;
  const Index arrays = has_dy ? 5 : 3;
  AlignedVector<Acc> coef(static_cast<std::size_t>(arrays * stride));
  Acc* const cm = coef.data();
  Acc* const ca = cm + stride;
  Acc* const cb = ca + stride;
  Acc* const ck = has_dy ? cb + stride : nullptr;
  Acc* const cg = has_dy ? ck + stride : nullptr;
  const Acc* const src[5] = {p.m, p.a, p.b, p.k, p.g};
  Acc* const dst[5] = {cm, ca, cb, ck, cg};
  for (Index q = 0; q < arrays; ++q) {
    if (v.inner == 1) {  // column j holds channel j % C: whole copies (cols = C)
      for (Index j = 0; j < len; j += cols)
        std::copy_n(src[q], std::min(cols, len - j), dst[q] + j);
    } else {  // column j holds channel (j % cols) / inner
      for (Index j = 0, c = 0, i = 0; j < len; ++j) {
        dst[q][j] = src[q][c];
        if (++i == v.inner) {
          i = 0;
          if (++c == v.C) c = 0;
        }
      }
    }
  }
  // Items of about 32 KiB of x (whole rows): elementwise, so any split gives the same
  // values, and a fine one lets the threads of a pool share a tensor in cache evenly.
  const Index mrows = std::clamp<Index>((Index(32) << 10) / (cols * Index(sizeof(T))), 1, kChunkRows);
  const Index chunks = (v.outer + mrows - 1) / mrows;
  parallel_for(dev, chunks, bytes * double(cols * mrows), 3.0 * double(cols * mrows), [&](Index c0, Index c1) {
    for (Index i = c0; i < c1; ++i) {
      const Index r0 = (chunks - 1 - i) * mrows, off = r0 * cols;
      const Index n = std::min(mrows, v.outer - r0) * cols;
      const Index next = -mrows * cols;  // chunk i + 1
      if (has_dy)
        chunk_map<true>(x + off, dy + off, out + off, n, cols, cm, ca, cb, ck, cg, stream, next);
      else
        chunk_map<false>(x + off, dy, out + off, n, cols, cm, ca, cb, ck, cg, stream, next);
    }
    if (stream) stream_fence();
  });
}

template <class T, class Acc, class Dev>
void channel_map(const Dev& dev, const T* x, const T* dy, T* out, const ChannelView& v, ChannelMap<Acc> p) {
  channel_map<T, Acc>(dev, x, dy, out, v, p, all_channels(v));
}

}  // namespace detail
}  // namespace normkit

NORMKIT_CODE_END
