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
//   tile); backward keeps three partials per position and row block, updated once
//   per group of kRowGroup rows so that the partial traffic stays small next to the
//   data, and combined in block order.
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
#include <vector>

#include "parallel.hpp"
#include "simd.hpp"
#include "tanh.hpp"

namespace normkit {
namespace detail {

inline constexpr Index kRunMin = 64;          // shorter inner runs use the row shape
inline constexpr Index kRunSeg = 8192;        // run segment: one work item
inline constexpr Index kExpandMax = 1 << 16;  // longest expanded row (C * inner)
inline constexpr Index kRowTile = 16384;      // row shape: columns per work item (whole rows: page-long runs for the prefetcher)
inline constexpr Index kRowGroup = 1;         // rows per update of the partials (more rows = more concurrent streams; 1 measured fastest)

/// u = tanh(p x) and du/d(p x) = 1 - u^2 (DyT).
template <class Acc>
struct TanhMap {
  using P = packet_t<Acc>;
  P p;
  explicit TanhMap(Acc alpha) : p(simd::pset1<P>(alpha)) {}
  EIGEN_STRONG_INLINE P value(const P& x) const { return ptanh_accurate(simd::pmul(p, x)); }
  EIGEN_STRONG_INLINE P slope(const P& u) const { return ptanh_grad_from_tanh(u); }
};

/// The per-position parameters of the row shape, in Acc: for inner == 1 the channel
/// vector converted, else each channel's value repeated `inner` times. Null in, null out.
template <class Acc, class T>
std::vector<Acc> expand_param(const T* p, Index C, Index inner) {
  std::vector<Acc> out;
  if (!p) return out;
  out.resize(static_cast<std::size_t>(C * inner));
  for (Index c = 0; c < C; ++c)
    std::fill(out.begin() + c * inner, out.begin() + (c + 1) * inner, static_cast<Acc>(p[c]));
  return out;
}

inline bool use_rows(const Block3& v) {
  return v.inner == 1 || (v.inner < kRunMin && v.mid * v.inner <= kExpandMax);
}

template <class Acc>
EIGEN_STRONG_INLINE packet_t<Acc> apply_affine(const packet_t<Acc>& u, const Acc* scale,
                                               const Acc* shift, Index i, Index n) {
  using namespace simd;
  if (scale && shift) return pmadd(u, load_n<Acc>(scale + i, n), load_n<Acc>(shift + i, n));
  if (scale) return pmul(u, load_n<Acc>(scale + i, n));
  if (shift) return padd(u, load_n<Acc>(shift + i, n));
  return u;
}

template <class Acc>
EIGEN_STRONG_INLINE packet_t<Acc> apply_affine(const packet_t<Acc>& u, const packet_t<Acc>& s,
                                               const packet_t<Acc>& b) {
  return simd::pmadd(u, s, b);
}

/// y = f(p x) * scale + shift, and u = f(p x) into `u_out` (x's memory order) if not
/// null. scale/shift: [C] or null (1 and 0). y may alias x.
template <class Dev, class Acc, class T, class Map>
void channel_map_forward(const Dev& dev, const Block3& v, const T* x, T* y, Acc* u_out,
                         const Map& f, const T* scale, const T* shift, bool stream) {
  using namespace simd;
  using P = packet_t<Acc>;
  if (v.size() == 0) return;
  const double bytes_per = (2.0 + (u_out ? 1.0 : 0.0)) * sizeof(T);
  constexpr double kCycles = 6.0;  // per element: ~29 packet ops of tanh over 8 lanes, + affine
  if (use_rows(v)) {
    const Index L = v.mid * v.inner, tiles = (L + kRowTile - 1) / kRowTile;
    const std::vector<Acc> s = expand_param<Acc>(scale, v.mid, v.inner),
                           b = expand_param<Acc>(shift, v.mid, v.inner);
    const Acc* sp = s.empty() ? nullptr : s.data();
    const Acc* bp = b.empty() ? nullptr : b.data();
    parallel_for(dev, v.outer * tiles, bytes_per * std::min(L, kRowTile),
                 kCycles * std::min(L, kRowTile), [&](Index i0, Index i1) {
                   for (Index it = i0; it < i1; ++it) {
                     const Index o = it / tiles, c0 = (it % tiles) * kRowTile;
                     const Index n = std::min(kRowTile, L - c0), off = o * L + c0;
                     for_each_packet<Acc>(y + off, n, stream, [&](Index i, Index cnt, bool st) {
                       const P u = f.value(load_n<Acc>(x + off + i, cnt));
                       if (u_out) store_n<Acc>(u_out + off + i, u, cnt, false);
                       store_n<Acc>(y + off + i, apply_affine(u, sp, bp, c0 + i, cnt), cnt, st);
                     });
                   }
                   if (stream) stream_fence();
                 });
    return;
  }
  const Index segs = (v.inner + kRunSeg - 1) / kRunSeg;
  parallel_for(dev, v.outer * v.mid * segs, bytes_per * std::min(v.inner, kRunSeg),
               kCycles * std::min(v.inner, kRunSeg), [&](Index i0, Index i1) {
                 for (Index it = i0; it < i1; ++it) {
                   const Index run = it / segs, c = run % v.mid, s0 = (it % segs) * kRunSeg;
                   const Index n = std::min(kRunSeg, v.inner - s0), off = run * v.inner + s0;
                   const P ps = pset1<P>(scale ? static_cast<Acc>(scale[c]) : Acc(1));
                   const P pb = pset1<P>(shift ? static_cast<Acc>(shift[c]) : Acc(0));
                   for_each_packet<Acc>(y + off, n, stream, [&](Index i, Index cnt, bool st) {
                     const P u = f.value(load_n<Acc>(x + off + i, cnt));
                     if (u_out) store_n<Acc>(u_out + off + i, u, cnt, false);
                     store_n<Acc>(y + off + i, apply_affine<Acc>(u, ps, pb), cnt, st);
                   });
                 }
                 if (stream) stream_fence();
               });
}

/// The per-channel sums of backward, [C] each, in Acc.
template <class Acc>
struct ChannelGrads {
  std::vector<Acc> dscale, dshift, dpc;
};

/// dx = dy * f'(p x) * k[c] and the per-channel sums (see the top of this file). u_in:
/// the forward's f(p x) in x's memory order, or null to recompute it. k: [C] in Acc.
/// dx may alias x or dy.
template <class Dev, class Acc, class T, class Map>
ChannelGrads<Acc> channel_map_backward(const Dev& dev, const Block3& v, const T* x, const T* dy,
                                       T* dx, const Acc* u_in, const Map& f, const Acc* k,
                                       Workspace<Acc>& work, bool stream) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  const Index C = v.mid;
  ChannelGrads<Acc> g;
  g.dscale.assign(static_cast<std::size_t>(C), Acc(0));
  g.dshift.assign(static_cast<std::size_t>(C), Acc(0));
  g.dpc.assign(static_cast<std::size_t>(C), Acc(0));
  if (v.size() == 0) return g;
  const double bytes_per = (3.0 + (u_in ? 1.0 : 0.0)) * sizeof(T);
  const double cycles_per = u_in ? 2.0 : 8.0;

  // One packet: dx, and the three sums accumulated into ds, dh, dq. Full packets
  // (Cnt == W) and the cached/recomputed choice are compile-time, so the hot loop has
  // no partial-load logic and no branch on the cache.
  auto element = [&](auto cached, auto full, const T* xp, const T* dyp, T* dxp, const Acc* up,
                     const P& kv, Index cnt, bool st, P& ds, P& dh, P& dq) {
    constexpr bool Cached = decltype(cached)::value, Full = decltype(full)::value;
    const P xv = Full ? load<Acc>(xp) : load_n<Acc>(xp, cnt);
    const P d = Full ? load<Acc>(dyp) : load_n<Acc>(dyp, cnt);
    P u;
    if constexpr (Cached)
      u = Full ? load<Acc>(up) : load_n<Acc>(up, cnt);
    else
      u = f.value(xv);
    const P gs = pmul(d, f.slope(u));
    if constexpr (Full) {
      if (st)
        store_stream<Acc>(dxp, pmul(gs, kv));
      else
        store<Acc>(dxp, pmul(gs, kv));
    } else {
      store_n<Acc>(dxp, pmul(gs, kv), cnt, st);
    }
    ds = pmadd(d, u, ds);
    dh = padd(dh, d);
    dq = pmadd(gs, xv, dq);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  // The cached tanh at `off`; never formed from a null pointer.
  auto u_at = [&](auto cached, Index off) -> const Acc* {
    if constexpr (decltype(cached)::value)
      return u_in + off;
    else
      return nullptr;
  };

  if (use_rows(v)) {
    const Index L = C * v.inner, tiles = (L + kRowTile - 1) / kRowTile;
    const std::vector<Acc> ke = expand_param<Acc>(k, C, v.inner);
    // A few MiB of partials at most: fewer row blocks for very long rows.
    const Index cap = std::max<Index>(1, std::min<Index>(64, (Index(1) << 20) / (3 * L)));
    const Blocking bl = fixed_blocking(v.outer, 16, cap);
    Acc* part = work.get(static_cast<std::size_t>(bl.blocks * 3 * L));
    // Row-group stores are streamed only when every row starts aligned.
    const bool st_rows = stream && L % W == 0 && misalignment<Acc>(dx) == 0;
    parallel_for(dev, bl.blocks * tiles, bytes_per * std::min(L, kRowTile) * double(bl.per_block),
                 cycles_per * std::min(L, kRowTile) * double(bl.per_block), [&](Index i0, Index i1) {
                   for (Index it = i0; it < i1; ++it) {
                     const Index b = it / tiles, c0 = (it % tiles) * kRowTile;
                     const Index n = std::min(kRowTile, L - c0);
                     Acc* ps = part + b * 3 * L + c0;
                     Acc* ph = ps + L;
                     Acc* pq = ph + L;
                     std::fill(ps, ps + n, Acc(0));
                     std::fill(ph, ph + n, Acc(0));
                     std::fill(pq, pq + n, Acc(0));
                     for (Index r0 = bl.begin(b); r0 < bl.end(b); r0 += kRowGroup) {
                       const Index nr = std::min(kRowGroup, bl.end(b) - r0);
                       auto columns = [&](auto cached) {
                         Index i = 0;
                         for (; i + W <= n; i += W) {
                           P ds = load<Acc>(ps + i), dh = load<Acc>(ph + i), dq = load<Acc>(pq + i);
                           const P kv = load<Acc>(ke.data() + c0 + i);
                           for (Index r = r0; r < r0 + nr; ++r) {
                             const Index off = r * L + c0 + i;
                             element(cached, Yes{}, x + off, dy + off, dx + off, u_at(cached, off), kv, W,
                                     st_rows, ds, dh, dq);
                           }
                           store<Acc>(ps + i, ds);
                           store<Acc>(ph + i, dh);
                           store<Acc>(pq + i, dq);
                         }
                         if (i == n) return;
                         const Index cnt = n - i;
                         P ds = load_n<Acc>(ps + i, cnt), dh = load_n<Acc>(ph + i, cnt),
                           dq = load_n<Acc>(pq + i, cnt);
                         const P kv = load_n<Acc>(ke.data() + c0 + i, cnt);
                         for (Index r = r0; r < r0 + nr; ++r) {
                           const Index off = r * L + c0 + i;
                           element(cached, No{}, x + off, dy + off, dx + off, u_at(cached, off), kv, cnt,
                                   false, ds, dh, dq);
                         }
                         store_n<Acc>(ps + i, ds, cnt, false);
                         store_n<Acc>(ph + i, dh, cnt, false);
                         store_n<Acc>(pq + i, dq, cnt, false);
                       };
                       if (u_in)
                         columns(Yes{});
                       else
                         columns(No{});
                     }
                   }
                   if (st_rows) stream_fence();
                 });
    // Block order, then the positions of a channel in order: fixed by the shape.
    parallel_for(dev, C, 3.0 * sizeof(Acc) * double(bl.blocks * v.inner),
                 3.0 * double(bl.blocks * v.inner), [&](Index c0, Index c1) {
                   for (Index c = c0; c < c1; ++c) {
                     Acc s = 0, h = 0, q = 0;
                     for (Index j = c * v.inner; j < (c + 1) * v.inner; ++j) {
                       Acc sj = 0, hj = 0, qj = 0;
                       for (Index b = 0; b < bl.blocks; ++b) {
                         const Acc* pb = part + b * 3 * L;
                         sj += pb[j];
                         hj += pb[L + j];
                         qj += pb[2 * L + j];
                       }
                       s += sj;
                       h += hj;
                       q += qj;
                     }
                     g.dscale[static_cast<std::size_t>(c)] = s;
                     g.dshift[static_cast<std::size_t>(c)] = h;
                     g.dpc[static_cast<std::size_t>(c)] = q;
                   }
                 });
    return g;
  }

  const Index segs = (v.inner + kRunSeg - 1) / kRunSeg, items = v.outer * C * segs;
  Acc* part = work.get(static_cast<std::size_t>(items * 3));
  parallel_for(dev, items, bytes_per * std::min(v.inner, kRunSeg),
               cycles_per * std::min(v.inner, kRunSeg), [&](Index i0, Index i1) {
                 for (Index it = i0; it < i1; ++it) {
                   const Index run = it / segs, c = run % C, s0 = (it % segs) * kRunSeg;
                   const Index n = std::min(kRunSeg, v.inner - s0), off = run * v.inner + s0;
                   const P kv = pset1<P>(k[c]);
                   P ds = zero<Acc>(), dh = zero<Acc>(), dq = zero<Acc>();
                   auto segment = [&](auto cached) {
                     for_each_packet<Acc>(dx + off, n, stream, [&](Index i, Index cnt, bool st) {
                       if (cnt == W)
                         element(cached, Yes{}, x + off + i, dy + off + i, dx + off + i,
                                 u_at(cached, off + i), kv, W, st, ds, dh, dq);
                       else
                         element(cached, No{}, x + off + i, dy + off + i, dx + off + i,
                                 u_at(cached, off + i), kv, cnt, st, ds, dh, dq);
                     });
                   };
                   if (u_in)
                     segment(Yes{});
                   else
                     segment(No{});
                   part[3 * it] = predux(ds);
                   part[3 * it + 1] = predux(dh);
                   part[3 * it + 2] = predux(dq);
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
                   g.dscale[static_cast<std::size_t>(c)] = s;
                   g.dshift[static_cast<std::size_t>(c)] = h;
                   g.dpc[static_cast<std::size_t>(c)] = q;
                 }
               });
  return g;
}

}  // namespace detail
}  // namespace normkit
