// Elementwise maps with per-channel parameters over the canonical view [outer, C, inner]
// (see tensor.hpp): DyT, and any layer of the form
//
//   forward   u = f(p * x),   y = u * scale[c] + shift[c]
//   backward  s = f'(p * x)   (the map gives it from u: DyT's 1 - u^2)
//             dx = dy * s * k[c]                 k[c] = scale[c] * p, from the caller
//             dscale[c] = sum dy * u,  dshift[c] = sum dy,  dpc[c] = sum dy * s * x
//             (dp = sum_c scale[c] * dpc[c]: the scalar's gradient is a per-channel
//             reduction too, folded by the caller; no per-element multiply by scale)
//
// f is a packet functor (`value(x)` = f(p x), `slope(u)` = f'(p x)). With f the
// identity and p = 1 this is BatchNorm's eval-mode affine map.
//
// Two memory shapes:
// - rows (inner == 1: channels-last; or a short inner, whose parameters are expanded
//   to one per position): every outer slice is a contiguous row of L = C * inner
//   values with position-dependent parameters. Work items are (row block, column
//   tile); backward keeps three partials per position and row block, combined in
//   block order. With tanh cached (small tensors) a block goes down its rows a strip
//   of two packets at a time, the strip's partials in registers; otherwise row by row,
//   the partials updated once per row (they stay in L1/L2 next to the streaming data).
// - runs (inner >= kRunMin: channels-first, ColMajor channels-last): every (o, c) is
//   a contiguous run with constant parameters, cut into segments of kRunSeg; backward
//   reduces each segment to three scalars, combined per channel in segment order.
// Items depend on the shape only, never on the thread count, so every gradient is
// bitwise identical for any number of threads. Every element, tails included, goes
// through the same packet arithmetic, so y and dx do not depend on the position of an
// element in its packet either.
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "config.hpp"
#include "parallel.hpp"
#include "simd.hpp"
#include "tanh.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {
namespace detail {

inline constexpr Index kRunMin = 64;          // shorter inner runs use the row shape
inline constexpr Index kRunSeg = 8192;        // run segment: one work item
inline constexpr Index kExpandMax = 1 << 16;  // longest expanded row (C * inner)
// Prefetch distances in bytes of the streaming loops (see forward_stretch, backward_stretch).
inline constexpr Index kForwardAhead = 16384;  // a row of 4096 floats: as far as LayerNorm's pass 2 asks
inline constexpr Index kBackwardAhead = 1024;  // 4 KiB measured slower on Zen 3 and the Xeon
inline constexpr Index kRowTile = 16384;      // row shape: columns per work item (whole rows: page-long runs for the prefetcher)
/// Rows one strip of backward_strips_cached runs down at a time: with more, its strided
/// walk has more lines in flight than the prefetchers follow (DyT backward of 512x768
/// floats 1.4x slower in 64-row strips).
inline constexpr Index kStripRows = 16;

/// u = tanh(p x) and du/d(p x) = 1 - u^2 (DyT).
template <class Acc>
struct TanhMap {
  using P = packet_t<Acc>;
  P p;
  explicit TanhMap(Acc alpha) : p(simd::pset1<P>(alpha)) {}
  EIGEN_STRONG_INLINE P value(const P& x) const { return ptanh_accurate(simd::pmul(p, x)); }
  /// Two packets, each lane bitwise equal to value().
  EIGEN_STRONG_INLINE void value2(const P& x0, const P& x1, P& u0, P& u1) const {
    ptanh_accurate2(simd::pmul(p, x0), simd::pmul(p, x1), u0, u1);
  }
  EIGEN_STRONG_INLINE P slope(const P& u) const { return ptanh_grad_from_tanh(u); }
};

inline bool use_rows(const Block3& v) {
  return v.inner == 1 || (v.inner < kRunMin && v.mid * v.inner <= kExpandMax);
}

/// Work item `it` of the run shape: segment `seg` of run `run` (the (outer, channel) pair,
/// channel `c`), kept by counting up, not by three divisions per item (a run of 128
/// floats is a few dozen cycles of work; a 64-bit division alone is 15 or more).
struct RunCursor {
  Index run, seg, c, segs, C;
  RunCursor(Index it, Index segs_, Index C_)
      : run(it / segs_), seg(it % segs_), c(run % C_), segs(segs_), C(C_) {}
  void next() {
    if (++seg < segs) return;
    seg = 0;
    ++run;
    if (++c == C) c = 0;
  }
};

/// y = f(p x) * s + b over one contiguous stretch of n elements, with s, b per position
/// (PerPos; else *s and *b for all), and u = f(p x) into `u` when WithU. Packets go in
/// pairs: the tanh is a chain of ~10 dependent FMAs, and two independent chains keep both
/// FMA pipes busy; one branch per pair decides whether the tanh needs its exp half. The
/// loop runs two pairs per iteration (DyT forward 8192x4096 streamed, one Xeon core with
/// AVX-512, best of 10 in three alternating runs: 2.3-4.5% less time than one pair).
/// Stream: y is aligned and written with non-temporal stores, and every line of x is asked
/// for kForwardAhead bytes ahead: with the tanh between the loads, the hardware prefetchers
/// alone kept too few in flight (same shape and core: 18.4-19.0 ms without, 10.8-14.3 with
/// 4 KiB, 1 KiB 16.0-16.8; 16 KiB against 4 KiB, alternating: faster in 4 of 4 pairs at 1
/// thread, by 2-9%, and 2 of 4 at 2). The tail goes through the same arithmetic as partial
/// packets. Always inlined, as forward_row: called out of line from run_forward (runs of
/// 128 floats, ColMajor DyT forward 128x768, 1 thread, medians), clang 14 took 21 us to
/// GCC's 12; inlined, 12 and 10-11. Same bits either way.
template <class Acc, bool WithU, bool Stream, bool PerPos, class T, class Map>
EIGEN_ALWAYS_INLINE void forward_stretch(const T* x, T* y, Acc* u, const Acc* s, const Acc* b,
                                         Index n, const Map& f) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  const P s1 = PerPos ? zero<Acc>() : pset1<P>(*s), b1 = PerPos ? zero<Acc>() : pset1<P>(*b);
  const auto param = [&](const Acc* q, const P& one, Index i, Index cnt) {
    return PerPos ? load_n<Acc>(q + i, cnt) : one;
  };
  const auto pair = [&](Index i) {
    P u0, u1;
    f.value2(load<Acc>(x + i), load<Acc>(x + i + W), u0, u1);
    if constexpr (WithU) {
      store<Acc>(u + i, u0);
      store<Acc>(u + i + W, u1);
    }
    const P y0 = pmadd(u0, param(s, s1, i, W), param(b, b1, i, W));
    const P y1 = pmadd(u1, param(s, s1, i + W, W), param(b, b1, i + W, W));
    if constexpr (Stream) {
      store_stream<Acc>(y + i, y0);
      store_stream<Acc>(y + i + W, y1);
    } else {
      store<Acc>(y + i, y0);
      store<Acc>(y + i + W, y1);
    }
  };
  Index i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    if constexpr (Stream) prefetch_span<4 * W>(x, i + kForwardAhead / Index(sizeof(T)));
    pair(i);
    pair(i + 2 * W);
  }
  if (i + 2 * W <= n) {
    if constexpr (Stream) prefetch_span<2 * W>(x, i + kForwardAhead / Index(sizeof(T)));
    pair(i);
    i += 2 * W;
  }
  for (; i < n; i += W) {
    const Index cnt = std::min(W, n - i);
    const P u0 = f.value(load_n<Acc>(x + i, cnt));
    if constexpr (WithU) store_n<Acc>(u + i, u0, cnt, false);
    store_n<Acc>(y + i, pmadd(u0, param(s, s1, i, cnt), param(b, b1, i, cnt)), cnt, Stream);
  }
}

/// forward_stretch with the streaming choice made per stretch: a misaligned head (at
/// most one packet) is written normally, the rest streamed.
template <class Acc, bool WithU, bool PerPos = true, class T, class Map>
EIGEN_ALWAYS_INLINE void forward_row(const T* x, T* y, Acc* u, const Acc* s, const Acc* b, Index n,
                                     const Map& f, bool stream) {
  Index head = stream ? simd::misalignment<Acc>(y) : -1;
  if (head < 0) {
    forward_stretch<Acc, WithU, false, PerPos>(x, y, u, s, b, n, f);
    return;
  }
  head = std::min(head, n);
  const Index ph = PerPos ? head : 0;
  forward_stretch<Acc, WithU, false, PerPos>(x, y, u, s, b, head, f);
  forward_stretch<Acc, WithU, true, PerPos>(x + head, y + head, WithU ? u + head : u, s + ph, b + ph,
                                            n - head, f);
}

/// One segment of a run: n contiguous elements of one channel, y = f(p x) * scale + shift,
/// u into `u` when WithU. Never inlined, with its arguments by value: one compiled copy
/// serves every device, and the packets go in pairs as the rows' (forward_stretch).
template <class Acc, bool WithU, class T, class Map>
EIGEN_DONT_INLINE void run_forward(const T* x, T* y, Acc* u, Acc scale, Acc shift, Index n, const Map& f,
                                   bool stream) {
  const Map fl = f;
  forward_row<Acc, WithU, false>(x, y, u, &scale, &shift, n, fl, stream);
}

/// y = f(p x) * scale + shift, and u = f(p x) into `u_out` (x's memory order) if not
/// null. scale/shift: [C] or null (1 and 0). y may alias x.
template <class Dev, class Acc, class T, class Map>
void channel_map_forward(const Dev& dev, const Block3& v, const T* x, T* y, Acc* u_out,
                         const Map& f, const T* scale, const T* shift, bool stream) {
  using namespace simd;
  if (v.size() == 0) return;
  const double bytes_per = (2.0 + (u_out ? 1.0 : 0.0)) * sizeof(T);
  constexpr double kCycles = 6.0;  // per element: ~29 packet ops of tanh over 8 lanes, + affine
  if (use_rows(v)) {
    const Index L = v.mid * v.inner, tiles = (L + kRowTile - 1) / kRowTile;
    const AlignedVector<Acc> s = expand_param<Acc>(scale, v.mid, v.inner, Acc(1)),
                           b = expand_param<Acc>(shift, v.mid, v.inner, -Acc(0));
    parallel_for(dev, v.outer * tiles, bytes_per * double(std::min(L, kRowTile)),
                 kCycles * double(std::min(L, kRowTile)), [&](Index i0, Index i1) {
                   for (Index it = i0; it < i1; ++it) {
                     const Index o = it / tiles, c0 = (it % tiles) * kRowTile;
                     const Index n = std::min(kRowTile, L - c0), off = o * L + c0;
                     if (u_out)
                       forward_row<Acc, true>(x + off, y + off, u_out + off, s.data() + c0,
                                              b.data() + c0, n, f, stream);
                     else
                       forward_row<Acc, false>(x + off, y + off, u_out, s.data() + c0,
                                               b.data() + c0, n, f, stream);
                   }
                   if (stream) stream_fence();
                 });
    return;
  }
  const Index segs = (v.inner + kRunSeg - 1) / kRunSeg;
  parallel_for(dev, v.outer * v.mid * segs, bytes_per * double(std::min(v.inner, kRunSeg)),
               kCycles * double(std::min(v.inner, kRunSeg)), [&](Index i0, Index i1) {
                 RunCursor at(i0, segs, v.mid);
                 for (Index it = i0; it < i1; ++it, at.next()) {
                   const Index s0 = at.seg * kRunSeg;
                   const Index n = std::min(kRunSeg, v.inner - s0), off = at.run * v.inner + s0;
                   const Acc sc = scale ? static_cast<Acc>(scale[at.c]) : Acc(1);
                   const Acc sh = shift ? static_cast<Acc>(shift[at.c]) : -Acc(0);
                   if (u_out)
                     run_forward<Acc, true>(x + off, y + off, u_out + off, sc, sh, n, f, stream);
                   else
                     run_forward<Acc, false>(x + off, y + off, u_out, sc, sh, n, f, stream);
                 }
                 if (stream) stream_fence();
               });
}

/// k[c] = w[c] * alpha in Acc (w null: alpha), without branches, so that it runs in
/// vectors. True where every k is normal, or 0 because a factor is: then each k is also
/// the product in a wider type rounded to Acc (bit for bit where Acc is float, whose
/// products are exact in double). False where some product is not finite or left Acc's
/// normal range although its factors are finite: the caller redoes those in the wider type.
/// Never inlined: one compiled copy serves every device.
template <class Acc, class T>
EIGEN_DONT_INLINE bool scaled_params(const T* __restrict w, Acc alpha, Index C, Acc* __restrict k) {
  constexpr Acc lo = std::numeric_limits<Acc>::min(), hi = std::numeric_limits<Acc>::max();
  int odd = 0;
  for (Index c = 0; c < C; ++c) {
    const Acc wc = w ? static_cast<Acc>(w[c]) : Acc(1), kc = wc * alpha, a = std::fabs(kc);
    k[c] = kc;
    odd |= ((a != 0) & !((a >= lo) & (a <= hi))) | ((a == 0) & (wc != 0) & (alpha != 0));
  }
  return odd == 0;
}

/// The per-channel sums of backward, [C] each, in Acc.
template <class Acc>
struct ChannelGrads {
  IndexVector<Acc> dscale, dshift, dpc;
};

/// f(p x) of the packet of x at i: the forward's, from u (Cached), or computed again from
/// xv, x's packet there.
template <bool Cached, class Acc, class Map>
EIGEN_STRONG_INLINE packet_t<Acc> value_at(const Acc* u, Index i, Index cnt, const packet_t<Acc>& xv,
                                           const Map& f) {
  if constexpr (Cached)
    return simd::load_n<Acc>(u + i, cnt);
  else
    return f.value(xv);
}

/// The backward of one packet: dx, and the three sums accumulated into ds, dh, dq.
template <class Acc, bool Stream, class T>
EIGEN_STRONG_INLINE void backward_packet(const packet_t<Acc>& xv, const packet_t<Acc>& d,
                                         const packet_t<Acc>& u, const packet_t<Acc>& slope,
                                         const packet_t<Acc>& kv, T* dxp, Index cnt,
                                         packet_t<Acc>& ds, packet_t<Acc>& dh,
                                         packet_t<Acc>& dq) {
  using namespace simd;
  const packet_t<Acc> gs = pmul(d, slope);
  store_n<Acc>(dxp, pmul(gs, kv), cnt, Stream);
  ds = pmadd(d, u, ds);
  dh = padd(dh, d);
  dq = pmadd(gs, xv, dq);
}

/// Backward over one stretch of n elements of a row: dx, and the per-position partials
/// ps, ph, pq (dscale, dshift, dpc) updated, or set when `first`. Two packets (a cache
/// line of float) per iteration: independent chains for the FMA pipes, and each
/// non-temporal line of dx completed at once. One row per update of the partials: two
/// rows at a time (fewer partial loads and stores) measured no faster once the partials
/// were aligned, and four 3x slower at 8192x4096, streaming stores to several rows at
/// once being what DRAM does worst.
/// Cached: u from `u` (only with Stream: in cache, backward_strips_cached is faster),
/// else recomputed. Stream: full packets of dx are aligned and
/// written with non-temporal stores. Recomputing, the loop asks for x and dy
/// kBackwardAhead bytes ahead (into the next row at its end): with the tanh between
/// the loads, the hardware prefetchers alone kept too few lines in flight, and this
/// measured 15-17 -> 19-21 GB/s at 8192x4096 on one core (a plain read x, dy / write
/// dx loop: 22-24).
template <class Acc, bool Cached, bool Stream, class T, class Map>
EIGEN_STRONG_INLINE void backward_stretch(const T* x, const T* dy, T* dx, const Acc* u, Index n, const Acc* kp, Acc* ps, Acc* ph, Acc* pq,
                                          bool first, const Map& f) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  Index i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    if constexpr (!Cached) {
      prefetch_span<2 * W>(x, i + kBackwardAhead / Index(sizeof(T)));
      prefetch_span<2 * W>(dy, i + kBackwardAhead / Index(sizeof(T)));
    }
    const P x0 = load<Acc>(x + i), x1 = load<Acc>(x + i + W);
    P u0, u1;
    if constexpr (Cached) {
      u0 = load<Acc>(u + i);
      u1 = load<Acc>(u + i + W);
    } else {
      f.value2(x0, x1, u0, u1);
    }
    // Everything else is loaded after the tanh: live across it, the partials and dy made
    // the compiler spill them (and tanh's constants) to the stack.
    for (Index h = 0; h < 2; ++h) {
      const Index j = i + h * W;
      const P& uv = h ? u1 : u0;
      P ds = zero<Acc>(), dh = zero<Acc>(), dq = zero<Acc>();
      if (!first) ds = load<Acc>(ps + j), dh = load<Acc>(ph + j), dq = load<Acc>(pq + j);
      backward_packet<Acc, Stream>(h ? x1 : x0, load<Acc>(dy + j), uv, f.slope(uv),
                                   load<Acc>(kp + j), dx + j, W, ds, dh, dq);
      store<Acc>(ps + j, ds), store<Acc>(ph + j, dh), store<Acc>(pq + j, dq);
    }
  }
  for (; i < n; i += W) {
    const Index cnt = std::min(W, n - i);
    P ds = zero<Acc>(), dh = zero<Acc>(), dq = zero<Acc>();
    if (!first) {
      ds = load_n<Acc>(ps + i, cnt), dh = load_n<Acc>(ph + i, cnt), dq = load_n<Acc>(pq + i, cnt);
    }
    const P kv = load_n<Acc>(kp + i, cnt);
    const P xv = load_n<Acc>(x + i, cnt), d = load_n<Acc>(dy + i, cnt);
    const P uv = value_at<Cached>(u, i, cnt, xv, f);
    if (cnt == W)
      backward_packet<Acc, Stream>(xv, d, uv, f.slope(uv), kv, dx + i, W, ds, dh, dq);
    else
      backward_packet<Acc, false>(xv, d, uv, f.slope(uv), kv, dx + i, cnt, ds, dh, dq);
    store_n<Acc>(ps + i, ds, cnt, false);
    store_n<Acc>(ph + i, dh, cnt, false);
    store_n<Acc>(pq + i, dq, cnt, false);
  }
}

/// The cached backward of `rows` rows (ld apart) over one stretch of n positions, a strip
/// of two packets at a time down all the rows, with the strip's partials (ps, ph, pq,
/// set here) and k in registers: per packet three loads and one store, where row by row
/// (backward_stretch) also loads and stores the three partials and loads k. Each
/// partial is still summed from 0 over the rows in row order: the same bits (a strip that
/// is not its block's first continues from the partials the previous strips left). Not for
/// streamed dx (non-temporal stores to many rows at once are what DRAM does worst), nor
/// for recomputed tanh (its constants and the six partials would not fit in AVX2's 16
/// registers). DyT backward 128x768 floats, 1 thread, best of 300, alternating runs on
/// a 2-vCPU Xeon (AVX-512): 27.0-27.3 -> 18.9-20.2 us (LayerNorm backward: 22-24).
template <class Acc, class T, class Map>
EIGEN_STRONG_INLINE void backward_strips_cached(const T* x, const T* dy, T* dx, const Acc* u, Index ld, Index rows,
                                                Index n, const Acc* kp, Acc* ps, Acc* ph, Acc* pq,
                                                bool first, const Map& f) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  const auto start = [&](const Acc* part, Index cnt) { return first ? zero<Acc>() : load_n<Acc>(part, cnt); };
  Index i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const P k0 = load<Acc>(kp + i), k1 = load<Acc>(kp + i + W);
    P s0 = start(ps + i, W), h0 = start(ph + i, W), q0 = start(pq + i, W);
    P s1 = start(ps + i + W, W), h1 = start(ph + i + W, W), q1 = start(pq + i + W, W);
    for (Index r = 0; r < rows; ++r) {
      const Index o = r * ld + i;
      const P u0 = load<Acc>(u + o), u1 = load<Acc>(u + o + W);
      backward_packet<Acc, false>(load<Acc>(x + o), load<Acc>(dy + o), u0, f.slope(u0), k0, dx + o, W,
                                  s0, h0, q0);
      backward_packet<Acc, false>(load<Acc>(x + o + W), load<Acc>(dy + o + W), u1, f.slope(u1), k1,
                                  dx + o + W, W, s1, h1, q1);
    }
    store<Acc>(ps + i, s0), store<Acc>(ph + i, h0), store<Acc>(pq + i, q0);
    store<Acc>(ps + i + W, s1), store<Acc>(ph + i + W, h1), store<Acc>(pq + i + W, q1);
  }
  for (; i < n; i += W) {
    const Index cnt = std::min(W, n - i);
    const P kv = load_n<Acc>(kp + i, cnt);
    P ds = start(ps + i, cnt), dh = start(ph + i, cnt), dq = start(pq + i, cnt);
    for (Index r = 0; r < rows; ++r) {
      const Index o = r * ld + i;
      const P uv = load_n<Acc>(u + o, cnt);
      backward_packet<Acc, false>(load_n<Acc>(x + o, cnt), load_n<Acc>(dy + o, cnt), uv, f.slope(uv), kv,
                                  dx + o, cnt, ds, dh, dq);
    }
    store_n<Acc>(ps + i, ds, cnt, false);
    store_n<Acc>(ph + i, dh, cnt, false);
    store_n<Acc>(pq + i, dq, cnt, false);
  }
}

/// The backward of one segment of a run: n contiguous elements of one channel, whose k is
/// `k`; dx, and the segment's three sums into out[0..2]. Its own function, with its
/// arguments by value and never inlined, as BatchNorm's run_map: inside the work item's
/// lambda the sums were the lambda's captures, kept in memory, each packet's FMAs
/// waiting for the previous packet's stores; and one compiled copy serves every device.
/// Two sets of sums, the packets taking them in turn: a run is often short (128 tokens,
/// 8 packets of float), and one chain of FMAs per sum waited on their latency.
template <class Acc, bool Cached, class T, class Map>
EIGEN_DONT_INLINE void run_backward(const T* x, const T* dy, T* dx, const Acc* u, Index n, Acc k,
                                    const Map& f, bool stream, Acc* out) {
  using namespace simd;
  using P = packet_t<Acc>;
  const Map fl = f;
  const P kv = pset1<P>(k);
  P ds = zero<Acc>(), dh = zero<Acc>(), dq = zero<Acc>();
  P ds2 = zero<Acc>(), dh2 = zero<Acc>(), dq2 = zero<Acc>();
  for_each_packet<Acc>(dx, n, stream, [&](Index i, Index cnt, auto st) NORMKIT_INLINE_LAMBDA {
    const P xv = load_n<Acc>(x + i, cnt), d = load_n<Acc>(dy + i, cnt);
    const P uv = value_at<Cached>(u, i, cnt, xv, fl);
    backward_packet<Acc, decltype(st)::value>(xv, d, uv, fl.slope(uv), kv, dx + i, cnt, ds, dh, dq);
    std::swap(ds, ds2);
    std::swap(dh, dh2);
    std::swap(dq, dq2);
  });
  out[0] = predux(padd(ds, ds2));
  out[1] = predux(padd(dh, dh2));
  out[2] = predux(padd(dq, dq2));
}

/// dx = dy * f'(p x) * k[c] and the per-channel sums (see the top of this file). u_in:
/// the forward's f(p x) in x's memory order, or null to recompute it. k: [C] in Acc.
/// dx may alias x or dy.
template <class Dev, class Acc, class T, class Map>
ChannelGrads<Acc> channel_map_backward(const Dev& dev, const Block3& v, const T* x, const T* dy,
                                       T* dx, const Acc* u_in, const Map& f, const Acc* k,
                                       Workspace<Acc>& work, bool stream) {
  using namespace simd;
  constexpr Index W = packet_size<Acc>;
  const Index C = v.mid;
  ChannelGrads<Acc> g;
  g.dscale.assign(static_cast<std::size_t>(C), Acc(0));
  g.dshift.assign(static_cast<std::size_t>(C), Acc(0));
  g.dpc.assign(static_cast<std::size_t>(C), Acc(0));
  if (v.size() == 0) return g;
  const double bytes_per = (3.0 + (u_in ? 1.0 : 0.0)) * sizeof(T);
  const double cycles_per = u_in ? 2.0 : 8.0;

  if (use_rows(v)) {
    const Index L = C * v.inner, tiles = (L + kRowTile - 1) / kRowTile;
    // k per position: k itself where a channel is one position (tokens x features).
    const AlignedVector<Acc> ke = v.inner == 1 ? AlignedVector<Acc>() : expand_param<Acc>(k, C, v.inner, Acc(0));
    const Acc* const kpos = v.inner == 1 ? k : ke.data();
    // A few MiB of partials at most: fewer row blocks for very long rows.
    const Index cap = std::max<Index>(1, std::min<Index>(64, (Index(1) << 20) / (3 * L)));
    const Blocking bl = fixed_blocking(v.outer, kBlockRows, cap);
    Acc* part = work.get(static_cast<std::size_t>(bl.blocks * 3 * L));
    // Row-group stores are streamed only when every row starts aligned.
    const bool st_rows = stream && L % W == 0 && misalignment<Acc>(dx) == 0;
    parallel_for(dev, bl.blocks * tiles, bytes_per * double(std::min(L, kRowTile) * bl.per_block),
                 cycles_per * double(std::min(L, kRowTile) * bl.per_block), [&](Index i0, Index i1) {
                   for (Index it = i0; it < i1; ++it) {
                     const Index b = it / tiles, c0 = (it % tiles) * kRowTile;
                     const Index n = std::min(kRowTile, L - c0);
                     Acc* ps = part + b * 3 * L + c0;
                     Acc* ph = ps + L;
                     Acc* pq = ph + L;
                     const Acc* kp = kpos + c0;
                     if (u_in && !st_rows) {
                       for (Index r = bl.begin(b); r < bl.end(b); r += kStripRows) {
                         const Index off = r * L + c0;
                         backward_strips_cached<Acc>(x + off, dy + off, dx + off, u_in + off, L,
                                                     std::min(kStripRows, bl.end(b) - r), n, kp, ps, ph,
                                                     pq, r == bl.begin(b), f);
                       }
                       continue;
                     }
                     for (Index r = bl.begin(b); r < bl.end(b); ++r) {
                       const Index off = r * L + c0;
                       const bool first = r == bl.begin(b);
                       if (u_in && st_rows)
                         backward_stretch<Acc, true, true>(x + off, dy + off, dx + off, u_in + off,
                                                           n, kp, ps, ph, pq, first, f);
                       else if (st_rows)
                         backward_stretch<Acc, false, true>(x + off, dy + off, dx + off, u_in, n, kp,
                                                            ps, ph, pq, first, f);
                       else
                         backward_stretch<Acc, false, false>(x + off, dy + off, dx + off, u_in, n,
                                                             kp, ps, ph, pq, first, f);
                     }
                   }
                   if (st_rows) stream_fence();
                 });
    // Block order, then the positions of a channel in order: fixed by the shape. Groups
    // of whole channels, also fixed by the shape (see sum_blocks), kSumColumns positions
    // or so at a time.
    const Index per = std::max<Index>(1, kSumColumns / v.inner), groups = (C + per - 1) / per;
    parallel_for(dev, groups, 3.0 * sizeof(Acc) * double(bl.blocks * per * v.inner),
                 3.0 * double(bl.blocks * per * v.inner), [&](Index g0, Index g1) {
                   if (v.inner == 1) {
                     // A channel is one position: its sum is the column's, the same bits
                     // as 0 + the column's (which starts from +0, so is never -0).
                     Acc* const out[3] = {g.dscale.data(), g.dshift.data(), g.dpc.data()};
                     for (Index gi = g0; gi < g1; ++gi) {
                       const Index j0 = gi * per, n = std::min(C, j0 + per) - j0;
                       for (Index w = 0; w < 3; ++w) sum_blocks(part + w * L + j0, 3 * L, bl.blocks, n, out[w] + j0);
                     }
                     return;
                   }
                   Acc sj[3 * kSumColumns];
                   for (Index gi = g0; gi < g1; ++gi) {
                     const Index c1 = std::min(C, (gi + 1) * per);
                     Index c = gi * per, pos = 0;
                     Acc s = 0, h = 0, q = 0;
                     for (Index j0 = c * v.inner, end = c1 * v.inner; j0 < end; j0 += kSumColumns) {
                       const Index n = std::min(kSumColumns, end - j0);
                       for (Index w = 0; w < 3; ++w)
                         sum_blocks(part + w * L + j0, 3 * L, bl.blocks, n, sj + w * kSumColumns);
                       for (Index j = 0; j < n; ++j) {
                         s += sj[j];
                         h += sj[kSumColumns + j];
                         q += sj[2 * kSumColumns + j];
                         if (++pos < v.inner) continue;
                         g.dscale[c] = s;
                         g.dshift[c] = h;
                         g.dpc[c] = q;
                         s = h = q = 0;
                         pos = 0;
                         ++c;
                       }
                     }
                   }
                 });
    return g;
  }

  const Index segs = (v.inner + kRunSeg - 1) / kRunSeg, items = v.outer * C * segs;
  Acc* part = work.get(static_cast<std::size_t>(items * 3));
  parallel_for(dev, items, bytes_per * double(std::min(v.inner, kRunSeg)),
               cycles_per * double(std::min(v.inner, kRunSeg)), [&](Index i0, Index i1) {
                 RunCursor at(i0, segs, C);
                 for (Index it = i0; it < i1; ++it, at.next()) {
                   const Index s0 = at.seg * kRunSeg;
                   const Index n = std::min(kRunSeg, v.inner - s0), off = at.run * v.inner + s0;
                   if (u_in)
                     run_backward<Acc, true>(x + off, dy + off, dx + off, u_in + off, n, k[at.c], f,
                                             stream, part + 3 * it);
                   else
                     run_backward<Acc, false>(x + off, dy + off, dx + off, u_in, n, k[at.c], f,
                                              stream, part + 3 * it);
                 }
                 if (stream) stream_fence();
               });
  // Per channel, items in (outer, segment) order.
  parallel_for(dev, C, 3.0 * sizeof(Acc) * double(v.outer * segs), 3.0 * double(v.outer * segs),
               [&](Index c0, Index c1) {
                 for (Index c = c0; c < c1; ++c) {
                   Acc s = 0, h = 0, q = 0;
                   for (Index o = 0; o < v.outer; ++o)
                     for (Index sg = 0; sg < segs; ++sg) {
                       const Acc* pi = part + 3 * ((o * C + c) * segs + sg);
                       s += pi[0];
                       h += pi[1];
                       q += pi[2];
                     }
                   g.dscale[c] = s;
                   g.dshift[c] = h;
                   g.dpc[c] = q;
                 }
               });
  return g;
}

}  // namespace detail
}  // namespace normkit

NORMKIT_CODE_END
