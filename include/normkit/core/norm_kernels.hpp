// Kernels that normalize over a run of features: LayerNorm (Center = true) and RMSNorm
// (Center = false) differ only in that flag.
//
//   forward   xhat = (x - mean) * rstd     (RMSNorm: xhat = x * rstd)
//             y    = xhat * w + b
//   backward  g = dy * w
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMSNorm: no mean(g))
//             dw += dy * xhat,  db += dy
//
// Two memory shapes: contiguous rows (the fast path: RowMajor) and columns of a
// row-major block, i.e. features strided by `ld` (ColMajor tensors). Both use the same
// numerics:
// - Statistics are two-pass over data already in cache, never E[x^2] - E[x]^2. The
//   first pass sums x - s around a shift s (the row's first element), so float sums of
//   rows with a large offset (mean 1e4, std 0.1) stay exact to a few ulp of the spread.
// - The mean of such a row is not representable to the needed precision as one float
//   (ulp(1e4) ~ 1e-3), so the normalize pass uses ((x - s) - d) with d = mean - s, and
//   backward recovers the same correction from the cached float mean:
//   c = mean(x - mean_f), xhat = ((x - mean_f) - c) * rstd.
// - Rows whose Acc sums overflow although every input is finite (|x| ~ 1e19 and up in
//   float) are redone in a wider type; NaN and Inf stay in their own row.
#pragma once

#include <algorithm>
#include <cmath>

#include "config.hpp"
#include "simd.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {
namespace detail {

template <class T>
struct Affine {
  const T* weight = nullptr;  // [n] or null
  const T* bias = nullptr;    // [n] or null
};

/// Independent packet accumulators of the row reductions: FMA latency (4-5 cycles) times
/// the two FMA ports, so that the sums run at the load rate instead of waiting on their
/// own dependency chains; also K * packet_size partial sums for accuracy.
inline constexpr Index kRowAcc = 8;

/// a[0] + ... + a[K-1], pairwise.
template <Index K, class P>
EIGEN_STRONG_INLINE P tree_sum(P* a) {
  for (Index w = K / 2; w >= 1; w /= 2)
    for (Index k = 0; k < w; ++k) a[k] = simd::padd(a[k], a[k + w]);
  return a[0];
}

/// sum(term(x + i)) over the full packets of [0, n), kRowAcc accumulators; returns the
/// index of the first element not summed (the scalar tail is the caller's).
template <class Acc, class T, class Term>
EIGEN_ALWAYS_INLINE Index row_reduce(const T* x, Index n, Term term, Acc& out) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>, K = kRowAcc;
  P a[K];
  for (Index k = 0; k < K; ++k) a[k] = zero<Acc>();
  Index i = 0;
  for (; i + K * W <= n; i += K * W)
    for (Index k = 0; k < K; ++k) a[k] = term(a[k], x + i + k * W);
  for (; i + W <= n; i += W) a[0] = term(a[0], x + i);
  out = predux(tree_sum<K>(a));
  return i;
}

/// sum(x - s) (Shift) or sum(x).
template <bool Shift, class Acc, class T>
Acc row_sum(const T* x, Index n, Acc s) {
  using namespace simd;
  using P = packet_t<Acc>;
  const P ps = pset1<P>(s);
  Acc r;
  Index i = row_reduce<Acc>(x, n, [&](const P& a, const T* p) {
    const P v = load<Acc>(p);
    return padd(a, Shift ? psub(v, ps) : v);
  }, r);
  for (; i < n; ++i) r += Shift ? static_cast<Acc>(x[i]) - s : static_cast<Acc>(x[i]);
  return r;
}

/// The scalar tail [i, n) of row_sum_sq, added to r. Never inlined, as sum_d_d2_tail (see
/// there): RMSNorm's overlapped rows sum a row's tail in another loop.
template <bool Center, bool Corr, class Acc, class T>
EIGEN_DONT_INLINE void row_sum_sq_tail(const T* x, Index i, Index n, Acc s, Acc d, Acc& r) {
  for (; i < n; ++i) {
    Acc v = static_cast<Acc>(x[i]);
    if constexpr (Center) v -= s;
    if constexpr (Corr) v -= d;
    r += v * v;
  }
}

/// sum(x^2) (no Center), sum((x - s)^2) (Center), sum(((x - s) - d)^2) (Center, Corr).
template <bool Center, bool Corr, class Acc, class T>
Acc row_sum_sq(const T* x, Index n, Acc s, Acc d) {
  using namespace simd;
  using P = packet_t<Acc>;
  const P ps = pset1<P>(s), pd = pset1<P>(d);
  Acc r;
  Index i = row_reduce<Acc>(x, n, [&](const P& a, const T* p) {
    P v = load<Acc>(p);
    if constexpr (Center) v = psub(v, ps);
    if constexpr (Corr) v = psub(v, pd);
    return pmadd(v, v, a);
  }, r);
  row_sum_sq_tail<Center, Corr>(x, i, n, s, d, r);
  return r;
}

/// A row whose mean m is within this many standard deviations of zero can be
/// normalized as x * rstd - m * rstd: the rounding of m and of m * rstd then costs at
/// most a few ulp of the output. Rows further off (mean 1e4, std 0.1) take the careful
/// path, which carries the part of the mean a float cannot hold as a separate term.
template <class Acc>
inline constexpr Acc kFastOffset = Acc(4);

template <class Acc>
bool fast_row(Acc mean, Acc rstd) {
  return std::fabs(mean) * rstd <= kFastOffset<Acc>;
}

/// The whole row in a wider type: only for rows whose Acc sums overflowed.
template <bool Center, class Acc, class T>
NORMKIT_SCALAR_CODE void row_forward_wide(const T* x, T* y, Index n, Index stride, Acc eps, Affine<T> p,
                      Acc& mean, Acc& rstd) {
  using Wd = wide_t<Acc>;
  // Around the shift s = x[0], as the Acc path: a double row at 1e207 with a spread of
  // 1e198 needs more than long double's 11 extra bits to hold x - mean in one piece.
  const Wd s = Center && n > 0 ? static_cast<Wd>(x[0]) : Wd(0);
  Wd m = 0, ss = 0;
  if constexpr (Center) {
    for (Index i = 0; i < n; ++i) m += static_cast<Wd>(x[i * stride]) - s;
    m /= static_cast<Wd>(n);
  }
  for (Index i = 0; i < n; ++i) {
    const Wd v = (static_cast<Wd>(x[i * stride]) - s) - m;
    ss += v * v;
  }
  const Wd r = Wd(1) / std::sqrt(ss / static_cast<Wd>(n) + static_cast<Wd>(eps));
  NORMKIT_SCALAR_LOOP
  for (Index i = 0; i < n; ++i) {
    Wd v = ((static_cast<Wd>(x[i * stride]) - s) - m) * r;
    if (p.weight) v *= static_cast<Wd>(p.weight[i]);
    if (p.bias) v += static_cast<Wd>(p.bias[i]);
    y[i * stride] = static_cast<T>(static_cast<Acc>(v));
  }
  mean = static_cast<Acc>(s + m);
  rstd = static_cast<Acc>(r);
}

/// One pass of moments is as accurate as two while its shift is near the mean: with
/// S1 = sum(x - s), S2 = sum((x - s)^2), the rounding of M2 = S2 - S1^2 / n is that of
/// the two-pass sum of squares times about S2 / M2 = 1 + n (mean - s)^2 / M2. One-pass
/// results are kept while S2 <= kOnePassSlack * M2 (a shift within 0.7 standard
/// deviations of the mean), else the moments are summed again in two passes.
inline constexpr double kOnePassSlack = 1.5;

/// The shift of a row's one-pass moments: the mean of its first packet (of its first
/// element when shorter), a fraction of a standard deviation from the row's mean unless
/// the row drifts or starts with outliers.
template <class Acc, class T>
EIGEN_STRONG_INLINE Acc row_shift(const T* x, Index n) {
  using namespace simd;
  constexpr Index W = packet_size<Acc>;
  if (n < W) return static_cast<Acc>(x[0]);
  return predux(load<Acc>(x)) * (Acc(1) / static_cast<Acc>(W));
}

/// The scalar tail [i, n) of sum_d_d2, added to sd and sd2. Never inlined: LayerNorm's
/// overlapped rows (rows_forward_overlapped) sum a row's tail in another loop than
/// sum_d_d2 does, and an inlined copy may be compiled otherwise (whether v * v and the add
/// fuse into one FMA is the compiler's choice), which would change a row's bits with the
/// thread count (which rows start a part).
template <class Acc, class T>
EIGEN_DONT_INLINE void sum_d_d2_tail(const T* x, Index i, Index n, Acc m, Acc& sd, Acc& sd2) {
  for (; i < n; ++i) {
    const Acc v = static_cast<Acc>(x[i]) - m;
    sd += v;
    sd2 += v * v;
  }
}

/// sum(x - m) and sum((x - m)^2) of a contiguous run in one traversal, kRowAcc / 2
/// accumulators each; with Prefetch, the next run (contiguous after this one) is asked
/// for meanwhile, a line per 64 bytes.
template <bool Prefetch = false, class Acc, class T>
void sum_d_d2(const T* x, Index n, Acc m, Acc& sd, Acc& sd2) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>, K = kRowAcc / 2;
  const P pm = pset1<P>(m);
  P a[K], q[K];
  for (Index k = 0; k < K; ++k) a[k] = q[k] = zero<Acc>();
  Index i = 0;
  for (; i + K * W <= n; i += K * W) {
    if constexpr (Prefetch) prefetch_span<K * W>(x, n + i);
    for (Index k = 0; k < K; ++k) {
      const P v = psub(load<Acc>(x + i + k * W), pm);
      a[k] = padd(a[k], v);
      q[k] = pmadd(v, v, q[k]);
    }
  }
  for (; i + W <= n; i += W) {
    if constexpr (Prefetch) prefetch(x, n + i);
    const P v = psub(load<Acc>(x + i), pm);
    a[0] = padd(a[0], v);
    q[0] = pmadd(v, v, q[0]);
  }
  sd = predux(tree_sum<K>(a));
  sd2 = predux(tree_sum<K>(q));
  sum_d_d2_tail(x, i, n, m, sd, sd2);
}

/// d = mean - s and var from the one-pass sums S1 = sum(x - s), S2 = sum((x - s)^2) of n
/// values; false where one pass is not accurate enough (see kOnePassSlack) or a sum is not
/// finite.
template <class Acc>
bool one_pass_moments(Acc s1, Acc s2, Index n, Acc& d, Acc& var) {
  // Divide, not * (1/n): for a constant row x - s is the same e for every element, and
  // n e / n gives e back exactly (so y = b), while n e * fl(1/n) leaves a residual of
  // ulp(e) that a tiny eps turns into xhat = +-1.
  d = s1 / static_cast<Acc>(n);
  const Acc m2 = s2 - s1 * d;
  if (!(std::isfinite(m2) && s2 <= static_cast<Acc>(kOnePassSlack) * m2)) return false;
  var = m2 / static_cast<Acc>(n);
  return true;
}

/// The moments of a row in one pass around s = row_shift: s, d = mean - s and var (the
/// mean is s + d, kept as two numbers: a row at 1e4 with std 0.1 has a mean no float
/// holds to the precision its spread needs). False where one pass is not accurate
/// enough.
template <class Acc, class T>
bool row_moments_one_pass(const T* x, Index n, Acc& s, Acc& d, Acc& var) {
  s = row_shift<Acc>(x, n);
  Acc s1, s2;
  sum_d_d2<false>(x, n, s, s1, s2);
  return one_pass_moments(s1, s2, n, d, var);
}

/// What pass 2 of a row needs: the mean is m + d (d = 0 on the fast path), r = rstd.
/// `wide`: the sums overflowed Acc on a finite row, which row_forward_wide then takes.
template <class Acc>
struct RowStats {
  Acc m = 0, d = 0, r = 0;
  bool fast = true, wide = false;
};

/// A row's statistics from its one-pass moments (`one`: m = s, d, var valid; without
/// Center, var = sum(x^2) * (1/n) given), or, where those were not accurate enough, from
/// the row again: mean(x), then mean((x - m)^2) (and, with a large offset,
/// d = mean(x - m) and mean(((x - m) - d)^2)).
template <bool Center, class Acc, class T>
RowStats<Acc> row_stats(const T* x, Index n, Acc eps, bool one, Acc m, Acc d, Acc var) {
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  if (!one) {
    d = 0;
    m = Center ? row_sum<false>(x, n, Acc(0)) * inv_n : Acc(0);
    var = row_sum_sq<Center, false>(x, n, m, Acc(0)) * inv_n;
  }
  RowStats<Acc> st;
  st.r = Acc(1) / std::sqrt(var + eps);
  st.fast = !Center || fast_row(m + d, st.r);
  if (st.fast) {
    m += d;
    d = 0;
  } else if (!one) {
    d = row_sum<true>(x, n, m) / static_cast<Acc>(n);  // divide: see one_pass_moments
    var = row_sum_sq<true, true>(x, n, m, d) * inv_n;
    st.r = Acc(1) / std::sqrt(var + eps);
  }
  st.m = m;
  st.d = d;
  st.wide = !std::isfinite(var) && all_finite(x, n);
  return st;
}

/// Pass 2 of a row, one packet: xhat = fma(x, rstd, -mean * rstd) (Fast) or
/// ((x - m) - d) * rstd, then * w + b. The row's values come by value (see RowCoef),
/// from locals of the caller's loop.
template <bool Fast, bool HasW, bool HasB, class Acc, class T>
EIGEN_STRONG_INLINE packet_t<Acc> row_map_packet(const T* x, Index i, Index cnt, packet_t<Acc> m,
                                                 packet_t<Acc> d, packet_t<Acc> r, packet_t<Acc> nmr,
                                                 const T* w, const T* b) {
  using namespace simd;
  using P = packet_t<Acc>;
  const P xv = load_n<Acc>(x + i, cnt);
  const P v = Fast ? pmadd(xv, r, nmr) : pmul(psub(psub(xv, m), d), r);
  if constexpr (HasW && HasB)
    return pmadd(v, load_n<Acc>(w + i, cnt), load_n<Acc>(b + i, cnt));
  else if constexpr (HasW)
    return pmul(v, load_n<Acc>(w + i, cnt));
  else if constexpr (HasB)
    return padd(v, load_n<Acc>(b + i, cnt));
  else
    return v;
}

/// A row's values for row_map_packet, as packets. The loops that use them copy them into
/// locals and pass those by value: read through an object in memory (a map object, a
/// lambda's captures, a const reference), they were read again after every packet store,
/// which may alias anything; GCC kept them in registers anyway, clang 14 did not
/// (LayerNorm forward 128x768, 1 thread, median of 20000 calls: 14.2 us against GCC's
/// 9.9-10.2; 11.0-11.3 with them in locals).
template <class Acc>
struct RowCoef {
  using P = packet_t<Acc>;
  P m, d, r, nmr;
  explicit RowCoef(const RowStats<Acc>& st)
      : m(simd::pset1<P>(st.m)), d(simd::pset1<P>(st.d)), r(simd::pset1<P>(st.r)),
        nmr(simd::pset1<P>(-st.m * st.r)) {}
};

/// Calls f(std::bool_constant<st.fast>).
template <class Acc, class F>
EIGEN_STRONG_INLINE void with_fast(const RowStats<Acc>& st, F&& f) {
  if (st.fast)
    f(std::true_type{});
  else
    f(std::false_type{});
}

/// Pass 2 of a row: y = xhat * w + b; also prefetches the next row (contiguous after
/// this one).
template <bool HasW, bool HasB, class Acc, class T>
void row_map(const T* x, T* y, Index n, Affine<T> p, bool stream, const RowStats<Acc>& st) {
  with_fast(st, [&](auto fast) {
    constexpr bool Fast = decltype(fast)::value;
    const RowCoef<Acc> coef(st);
    const packet_t<Acc> cm = coef.m, cd = coef.d, cr = coef.r, cnmr = coef.nmr;
    const T* const w = p.weight;
    const T* const b = p.bias;
    for_each_packet<Acc>(y, n, stream, [&](Index i, Index cnt, auto s) {
      simd::prefetch(x, n + i);
      simd::store_n<Acc>(y + i, row_map_packet<Fast, HasW, HasB, Acc>(x, i, cnt, cm, cd, cr, cnmr, w, b), cnt, s);
    });
  });
}

/// One contiguous row: statistics, then y. y may alias x.
///   pass 1  s, d, var in one pass (row_moments_one_pass)   sub, add, fma per element
///   pass 2  y = fma(x, rstd, -mean * rstd) * w + b          2 fma (x is in L1 by now)
/// Rows with a large offset (see kFastOffset) use ((x - s) - d) * rstd in pass 2; rows
/// where one pass is not accurate enough are summed again (see row_stats).
template <bool Center, bool HasW, bool HasB, class Acc, class T>
void row_forward(const T* x, T* y, Index n, Acc eps, Affine<T> p, bool stream, Acc& mean,
                 Acc& rstd) {
  Acc m = 0, d = 0, var = 0;
  const bool one = Center && row_moments_one_pass(x, n, m, d, var);
  const RowStats<Acc> st = row_stats<Center>(x, n, eps, one, m, d, var);
  if (st.wide) {
    row_forward_wide<Center>(x, y, n, 1, eps, p, mean, rstd);
    return;
  }
  mean = st.m + st.d;
  rstd = st.r;
  row_map<HasW, HasB>(x, y, n, p, stream, st);
}

/// LayerNorm (Center) or RMSNorm over `rows` contiguous rows, with pass 2 of each row and
/// pass 1 of the next in one loop: the next row's sums do not wait for this row's
/// statistics, so the core overlaps them with the stores of this row instead of stalling
/// at every row's end (the reduction, the square root and the first dependent FMA of
/// pass 2). Every row gets the same bits wherever a thread's part starts or ends: the next
/// row's sums are those of sum_d_d2 or row_sum_sq (same accumulators, same order, the same
/// compiled tail; they decide only finite rows), and the map of every row comes from one
/// loop (the last row sums itself again, for nothing): a second copy of the map, for the
/// row that ends a part, was compiled with the operands of a multiply swapped, and a row
/// whose mean is NaN got another NaN there (the fuzz replay caught a bfloat16 row
/// [0.34, -inf, -2.3] whose y was -nan on 7 threads and +nan on 1). Never inlined, so
/// that one compiled copy serves every device. mean and rstd may be null.
///
/// For tensors of up to kOverlapBytes, where the latency shows. Measured on one core
/// (Zen 3, AVX2), rows x 768 floats, row by row / overlapped, alternating: 128 rows
/// 1.19-1.35x faster, 256 1.38x, 512 1.30x, 1024 (3 MiB) 1.14x; 2048 (6 MiB) 0.86x, where
/// the tensors come from memory and one loop that both stores a row and loads the next
/// kept fewer loads in flight; 4096-float rows (16 KiB, longer than the latency) 1.00-1.04x.
inline constexpr std::size_t kOverlapBytes = std::size_t(4) << 20;

/// The sums that pass 1 of the overlapped rows carries to the next row: around the
/// shift s, S1 = sum(x - s) and S2 = sum((x - s)^2) (LayerNorm); S2 = sum(x^2) (RMSNorm).
template <class Acc>
struct RowSums {
  Acc s = 0, s1 = 0, s2 = 0;
};

/// A row's sums as the row-by-row kernels form them (row_moments_one_pass, row_sum_sq).
template <bool Center, class Acc, class T>
RowSums<Acc> row_sums(const T* x, Index n) {
  RowSums<Acc> r;
  if constexpr (Center) {
    r.s = row_shift<Acc>(x, n);
    sum_d_d2<false>(x, n, r.s, r.s1, r.s2);
  } else {
    r.s2 = row_sum_sq<false, false>(x, n, Acc(0), Acc(0));
  }
  return r;
}

template <bool Center, bool HasW, bool HasB, class Acc, class T>
EIGEN_DONT_INLINE void rows_forward_overlapped(const T* x, T* y, Index rows, Index n, Acc eps,
                                               Affine<T> p, Acc* mean, Acc* rstd) {
  using namespace simd;
  using P = packet_t<Acc>;
  // The accumulators of sum_d_d2 (two arrays) or of row_sum_sq (row_reduce: one).
  constexpr Index W = packet_size<Acc>, K = Center ? kRowAcc / 2 : kRowAcc;
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  RowSums<Acc> sums = row_sums<Center, Acc>(x, n);
  for (Index r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    Acc d = 0, var = 0, m_out = 0, r_out;
    bool one = true;
    if constexpr (Center)
      one = one_pass_moments(sums.s1, sums.s2, n, d, var);
    else
      var = sums.s2 * inv_n;  // as row_stats forms it
    const RowStats<Acc> st = row_stats<Center>(xr, n, eps, one, sums.s, d, var);
    const bool last = r + 1 == rows;
    if (st.wide) {
      row_forward_wide<Center>(xr, yr, n, 1, eps, p, m_out, r_out);
      if (!last) sums = row_sums<Center, Acc>(xr + n, n);
    } else {
      m_out = st.m + st.d;
      r_out = st.r;
      // The last row sums itself again (discarded): every row's y then comes from this
      // one loop, whichever row ends a thread's part.
      const T* xn = last ? xr : xr + n;
      sums.s = Center ? row_shift<Acc>(xn, n) : Acc(0);
      const P ps = pset1<P>(sums.s);
      with_fast(st, [&](auto fast) {
        // Everything the loop reads, in locals (see RowCoef).
        constexpr bool Fast = decltype(fast)::value;
        const RowCoef<Acc> coef(st);
        const P cm = coef.m, cd = coef.d, cr = coef.r, cnmr = coef.nmr, shift = ps;
        const T* const w = p.weight;
        const T* const b = p.bias;
        const T* const xs = xr;
        T* const ys = yr;
        const T* const xt = xn;
        const Index len = n;
        P a[std::size_t(K)], q[std::size_t(K)];
        for (Index k = 0; k < K; ++k) a[k] = q[k] = zero<Acc>();
        auto add = [&](Index k, const T* at) {
          if constexpr (Center) {
            const P v = psub(load<Acc>(at), shift);
            a[k] = padd(a[k], v);
            q[k] = pmadd(v, v, q[k]);
          } else {
            const P v = load<Acc>(at);
            q[k] = pmadd(v, v, q[k]);
          }
        };
        auto map = [&](Index j, Index cnt) {
          return row_map_packet<Fast, HasW, HasB, Acc>(xs, j, cnt, cm, cd, cr, cnmr, w, b);
        };
        Index i = 0;
        for (; i + K * W <= len; i += K * W) {
          prefetch_span<K * W>(xt, len + i);
          for (Index k = 0; k < K; ++k) store<Acc>(ys + i + k * W, map(i + k * W, W));
          for (Index k = 0; k < K; ++k) add(k, xt + i + k * W);
        }
        for (; i + W <= len; i += W) {
          store<Acc>(ys + i, map(i, W));
          add(0, xt + i);
        }
        if (i < len) store_n<Acc>(ys + i, map(i, len - i), len - i, false);
        sums.s2 = predux(tree_sum<K>(q));
        if constexpr (Center) {
          sums.s1 = predux(tree_sum<K>(a));
          sum_d_d2_tail(xt, i, len, sums.s, sums.s1, sums.s2);
        } else {
          row_sum_sq_tail<false, false>(xt, i, len, Acc(0), Acc(0), sums.s2);
        }
      });
    }
    if (mean) mean[r] = m_out;
    if (rstd) rstd[r] = r_out;
  }
}

/// Row backward in a wider type (rows whose sums overflowed Acc).
template <bool Center, class Acc, class T>
NORMKIT_SCALAR_CODE void row_backward_wide(const T* x, const T* dy, T* dx, Index n, Index stride, Acc mean, Acc rstd,
                       const T* w, Acc* dw, Acc* db) {
  using Wd = wide_t<Acc>;
  const Wd r = rstd, nn = static_cast<Wd>(n);
  const Wd s = Center && n > 0 ? static_cast<Wd>(x[0]) : Wd(0);  // the shift of row_forward_wide
  Wd m = 0;
  if constexpr (Center) {
    for (Index i = 0; i < n; ++i) m += static_cast<Wd>(x[i * stride]) - s;
    m /= nn;
  }
  (void)mean;
  Wd sg = 0, sgx = 0;
  for (Index i = 0; i < n; ++i) {
    const Wd g = static_cast<Wd>(dy[i * stride]) * (w ? static_cast<Wd>(w[i]) : Wd(1));
    sg += g;
    sgx += g * ((static_cast<Wd>(x[i * stride]) - s) - m) * r;
  }
  const Wd mg = Center ? sg / nn : Wd(0), mgx = sgx / nn;
  NORMKIT_SCALAR_LOOP
  for (Index i = 0; i < n; ++i) {
    const Wd xh = ((static_cast<Wd>(x[i * stride]) - s) - m) * r;
    const Wd d = static_cast<Wd>(dy[i * stride]);
    const Wd g = d * (w ? static_cast<Wd>(w[i]) : Wd(1));
    if (dw) dw[i] += static_cast<Acc>(d * xh);
    if (db) db[i] += static_cast<Acc>(d);
    dx[i * stride] = static_cast<T>(static_cast<Acc>(r * (g - mg - xh * mgx)));
  }
}

/// xhat of a packet of x, formed as the forward pass formed it: fma(x, rstd, -mean * rstd)
/// (Fast), or ((x - mean) - c) * rstd for rows with a large offset (see kFastOffset).
/// A value, not a lambda over references: the kernels' stores go through may-alias
/// vector types, and a loop that reads its constants through references reloads them
/// after every store. Built inside each kernel from the row's scalars, not passed to it:
/// passed by value, its four packets went through the stack, and with clang 14 the
/// kernel's first load of them waited for the caller's stores (LayerNorm backward
/// of 128x768 floats, 1 thread: row_grad_sums spent 44% of its time on that load).
template <bool Fast, class Acc>
struct RowXhat {
  using P = packet_t<Acc>;
  P r, nmr, m, c;
  RowXhat(Acc mean, Acc rstd, Acc corr)
      : r(simd::pset1<P>(rstd)),
        nmr(simd::pset1<P>(-mean * rstd)),
        m(simd::pset1<P>(mean)),
        c(simd::pset1<P>(corr)) {}
  EIGEN_STRONG_INLINE P operator()(const P& v) const {
    using namespace simd;
    if constexpr (Fast)
      return pmadd(v, r, nmr);
    else
      return pmul(psub(psub(v, m), c), r);
  }
};

/// g = dy * w on a packet (or dy without weight).
template <bool HasW, class Acc, class T>
EIGEN_STRONG_INLINE packet_t<Acc> times_weight(const packet_t<Acc>& d, const T* w, Index i,
                                               Index cnt) {
  if constexpr (HasW)
    return simd::pmul(d, simd::load_n<Acc>(w + i, cnt));
  else
    return d;
}

/// Pass 1 of row_backward: B = sum(g), C = sum(g * xhat), kRowAcc / 2 accumulators
/// each to keep the dependency chains short; the tail in packets too (zero-filled lanes
/// add g = 0).
template <bool HasW, bool Fast, class Acc, class T>
void row_grad_sums(const T* x, const T* dy, const T* w, Index n, Acc mean, Acc rstd, Acc corr, Acc& B,
                   Acc& C) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>, K = kRowAcc / 2;
  const RowXhat<Fast, Acc> xhat(mean, rstd, corr);
  P b[K], c[K];
  for (Index k = 0; k < K; ++k) b[k] = c[k] = zero<Acc>();
  Index i = 0;
  for (; i + K * W <= n; i += K * W)
    for (Index k = 0; k < K; ++k) {
      const Index j = i + k * W;
      const P g = times_weight<HasW, Acc>(load<Acc>(dy + j), w, j, W);
      b[k] = padd(b[k], g);
      c[k] = pmadd(g, xhat(load<Acc>(x + j)), c[k]);
    }
  for (; i < n; i += W) {
    const Index cnt = std::min(W, n - i);
    const P g = times_weight<HasW, Acc>(load_n<Acc>(dy + i, cnt), w, i, cnt);
    b[0] = padd(b[0], g);
    c[0] = pmadd(g, xhat(load_n<Acc>(x + i, cnt)), c[0]);
  }
  B = predux(tree_sum<K>(b));
  C = predux(tree_sum<K>(c));
}

/// Pass 2's constants of a row from pass 1's sums B = sum(g), C = sum(g * xhat):
/// k0 = -rstd * mean(g) (0 without centering), nk1 = -rstd * mean(g * xhat). Built
/// inside the kernel, as RowXhat.
template <bool Center, class Acc>
struct GradCoefs {
  using P = packet_t<Acc>;
  P k0, nk1;
  GradCoefs(Acc B, Acc C, Acc rstd, Index n) {
    const Acc inv_n = Acc(1) / static_cast<Acc>(n);
    const Acc mg = Center ? B * inv_n : Acc(0), mgx = C * inv_n;
    k0 = simd::pset1<P>(-rstd * mg);
    nk1 = simd::pset1<P>(-rstd * mgx);
  }
};

/// dx of a packet: fma(g, rstd, k0) + xhat * nk1, g = dy * w; the one step that
/// row_grad_apply and row_pair_grad_apply share.
template <bool HasW, bool Center, class Acc, class T>
EIGEN_STRONG_INLINE packet_t<Acc> grad_dx(const packet_t<Acc>& xh, const packet_t<Acc>& d, const T* w, Index j,
                                          Index cnt, const packet_t<Acc>& r, const GradCoefs<Center, Acc>& k) {
  using namespace simd;
  return pmadd(xh, k.nk1, pmadd(times_weight<HasW, Acc>(d, w, j, cnt), r, k.k0));
}

/// Pass 2 of row_backward: dx = fma(g, rstd, k0) + xhat * nk1, dw += dy * xhat,
/// db += dy; prefetches the next row. Which partials exist is a template argument, so
/// the loop has no branch.
template <bool HasW, bool HasDW, bool HasDB, bool Center, bool Fast, class Acc, class T>
void row_grad_apply(const T* x, const T* dy, T* dx, Index n, const T* w, Acc* dw, Acc* db, Acc mean,
                    Acc rstd, Acc corr, Acc B, Acc C, bool stream) {
  using namespace simd;
  using P = packet_t<Acc>;
  const RowXhat<Fast, Acc> xhat(mean, rstd, corr);
  const GradCoefs<Center, Acc> k(B, C, rstd, n);
  const P r = xhat.r;
  for_each_packet<Acc>(dx, n, stream, [&](Index j, Index cnt, auto st) NORMKIT_INLINE_LAMBDA {
    prefetch(x, n + j);
    prefetch(dy, n + j);
    const P xh = xhat(load_n<Acc>(x + j, cnt));
    const P d = load_n<Acc>(dy + j, cnt);
    if constexpr (HasDW) store_n<Acc>(dw + j, pmadd(d, xh, load_n<Acc>(dw + j, cnt)), cnt, false);
    if constexpr (HasDB) store_n<Acc>(db + j, padd(d, load_n<Acc>(db + j, cnt)), cnt, false);
    store_n<Acc>(dx + j, grad_dx<HasW>(xh, d, w, j, cnt, r, k), cnt, st);
  });
}

/// One contiguous row of backward. dw/db (Acc partials, or null) are accumulated into;
/// dx may alias x or dy.
///   pass 1  B = sum(g), C = sum(g * xhat), g = dy * w, xhat = fma(x, rstd, -mean * rstd)
///   pass 2  dx = fma(g, rstd, -rstd * mean(g)) - xhat * rstd * mean(g * xhat)
///           dw += dy * xhat, db += dy
/// Rows with a large offset (see kFastOffset) first recover c = mean(x) - mean, the part
/// of the mean the float in the cache could not hold, and use xhat = ((x - mean) - c) * rstd.
template <bool Center, bool HasW, class Acc, class T>
void row_backward(const T* x, const T* dy, T* dx, Index n, Acc mean, Acc rstd, const T* w,
                  Acc* dw, Acc* db, bool stream) {
  const bool fast = !Center || fast_row(mean, rstd);
  const Acc c = fast ? Acc(0) : row_sum<true>(x, n, mean) / static_cast<Acc>(n);  // divide, as row_forward
  auto run = [&](auto fast_c) {
    constexpr bool Fast = decltype(fast_c)::value;
    Acc B, C;
    row_grad_sums<HasW, Fast>(x, dy, w, n, mean, rstd, c, B, C);
    if (!(std::isfinite(B) && std::isfinite(C)) && all_finite(x, n) && all_finite(dy, n) &&
        std::isfinite(mean) && std::isfinite(rstd)) {
      row_backward_wide<Center>(x, dy, dx, n, 1, mean, rstd, HasW ? w : nullptr, dw, db);
      return;
    }
    auto apply = [&](auto has_dw, auto has_db) {
      row_grad_apply<HasW, decltype(has_dw)::value, decltype(has_db)::value, Center, Fast>(
          x, dy, dx, n, w, dw, db, mean, rstd, c, B, C, stream);
    };
    if (dw)
      db ? apply(std::true_type{}, std::true_type{}) : apply(std::true_type{}, std::false_type{});
    else
      db ? apply(std::false_type{}, std::true_type{}) : apply(std::false_type{}, std::false_type{});
  };
  if (fast)
    run(std::true_type{});
  else
    run(std::false_type{});
}

/// Pass 2 of two consecutive rows at once (b starts n values after a): dw and db are
/// loaded and stored once per packet for both rows, with the same sums in the same
/// order as row_grad_apply on a, then on b (a's term stays in a register for b's). Plain
/// stores: for rows in cache, where the partials' loads and stores were a third of
/// the loop's memory operations.
template <bool HasW, bool HasDW, bool HasDB, bool Center, class Acc, class T>
void row_pair_grad_apply(const T* x, const T* dy, T* dx, Index n, const T* w, Acc* dw, Acc* db,
                         Acc mean_a, Acc rstd_a, Acc Ba, Acc Ca, Acc mean_b, Acc rstd_b, Acc Bb, Acc Cb) {
  using namespace simd;
  using P = packet_t<Acc>;
  const RowXhat<true, Acc> xa(mean_a, rstd_a, Acc(0)), xb(mean_b, rstd_b, Acc(0));
  const GradCoefs<Center, Acc> ka(Ba, Ca, rstd_a, n), kb(Bb, Cb, rstd_b, n);
  const P ra = xa.r, rb = xb.r;
  for_each_packet<Acc>(dx, n, false, [&](Index j, Index cnt, auto) NORMKIT_INLINE_LAMBDA {
    prefetch(x, 2 * n + j);
    prefetch(dy, 2 * n + j);
    const P xha = xa(load_n<Acc>(x + j, cnt)), xhb = xb(load_n<Acc>(x + n + j, cnt));
    const P da = load_n<Acc>(dy + j, cnt), dyb = load_n<Acc>(dy + n + j, cnt);
    if constexpr (HasDW)
      store_n<Acc>(dw + j, pmadd(dyb, xhb, pmadd(da, xha, load_n<Acc>(dw + j, cnt))), cnt, false);
    if constexpr (HasDB) store_n<Acc>(db + j, padd(dyb, padd(da, load_n<Acc>(db + j, cnt))), cnt, false);
    store_n<Acc>(dx + j, grad_dx<HasW>(xha, da, w, j, cnt, ra, ka), cnt, false);
    store_n<Acc>(dx + n + j, grad_dx<HasW>(xhb, dyb, w, j, cnt, rb, kb), cnt, false);
  });
}

/// row_backward of two consecutive rows (b starts n values after a) with one pass 2
/// (row_pair_grad_apply), for rows whose xhat is the fast one and whose sums are finite;
/// returns false, having written nothing, for any other pair: the caller then runs
/// row_backward on a. dw and db as row_backward's, non-null.
template <bool Center, bool HasW, bool HasDW, bool HasDB, class Acc, class T>
bool row_pair_backward(const T* x, const T* dy, T* dx, Index n, Acc mean_a, Acc rstd_a, Acc mean_b,
                       Acc rstd_b, const T* w, Acc* dw, Acc* db) {
  if (Center && !(fast_row(mean_a, rstd_a) && fast_row(mean_b, rstd_b))) return false;
  Acc Ba, Ca, Bb, Cb;
  row_grad_sums<HasW, true>(x, dy, w, n, mean_a, rstd_a, Acc(0), Ba, Ca);
  row_grad_sums<HasW, true>(x + n, dy + n, w, n, mean_b, rstd_b, Acc(0), Bb, Cb);
  if (!(std::isfinite(Ba) && std::isfinite(Ca) && std::isfinite(Bb) && std::isfinite(Cb))) return false;
  row_pair_grad_apply<HasW, HasDW, HasDB, Center>(x, dy, dx, n, w, dw, db, mean_a, rstd_a, Ba, Ca, mean_b,
                                                  rstd_b, Bb, Cb);
  return true;
}

/// row_backward over `rows` consecutive rows of n values (mean null: RMSNorm's zeros),
/// in row order, so dw and db get the same sums in the same order whichever way a row
/// goes. Where there are parameter partials and dx is not streamed, rows go two at a
/// time (row_pair_backward). Never inlined: one copy for every device type.
template <bool Center, bool HasW, class Acc, class T>
EIGEN_DONT_INLINE void rows_backward(const T* x, const T* dy, T* dx, Index rows, Index n, const Acc* mean,
                                     const Acc* rstd, const T* w, Acc* dw, Acc* db, bool stream) {
  auto m = [&](Index i) { return Center ? mean[i] : Acc(0); };
  auto pairs = [&](auto has_dw, auto has_db) {
    constexpr bool DW = decltype(has_dw)::value, DB = decltype(has_db)::value;
    for (Index i = 0; i < rows;) {
      const Index o = i * n;
      if (i + 1 < rows && row_pair_backward<Center, HasW, DW, DB>(x + o, dy + o, dx + o, n, m(i), rstd[i],
                                                                  m(i + 1), rstd[i + 1], w, dw, db)) {
        i += 2;
        continue;
      }
      row_backward<Center, HasW>(x + o, dy + o, dx + o, n, m(i), rstd[i], w, dw, db, stream);
      ++i;
    }
  };
  if (stream || !(dw || db)) {
    for (Index i = 0; i < rows; ++i)
      row_backward<Center, HasW>(x + i * n, dy + i * n, dx + i * n, n, m(i), rstd[i], w, dw, db, stream);
  } else if (dw) {
    db ? pairs(std::true_type{}, std::true_type{}) : pairs(std::true_type{}, std::false_type{});
  } else {
    pairs(std::false_type{}, std::true_type{});
  }
}

// ---- Features strided by `ld`: a tile of up to kColTile columns at a time ----------
//
// A ColMajor tensor keeps feature f of "row" c at f * ld + c. A tile of columns is
// walked feature by feature, so each step reads kColTile contiguous values, and the
// per-column accumulators stay in registers. The tile (F x kColTile) is sized to stay
// in L2 between the passes.

inline constexpr Index kColTile = 64;
inline constexpr Index kColSumBlock = 32;  // features per partial sum of squares

template <class Acc>
inline constexpr Index col_packets = kColTile / packet_size<Acc>;

/// Statistics and y for columns [0, nc) of a tile, nc <= kColTile, in NP packets (0: as
/// many as nc needs, counted at run time). See cols_forward.
///   pass 1  S1 = sum(x - s), S2 = sum((x - s)^2) around a shift s, the mean of the
///           column's first kColSumBlock features: one_pass_moments, as a row's
///   pass 2  y = (((x - s) - d) - e) * rstd * w + b
/// Columns whose one pass is not accurate enough (see kOnePassSlack: their first features
/// far from their mean) take, if the tile has any, three more passes over the tile:
/// d = mean(x - s), then the residual e = mean((x - s) - d), which holds what the
/// rounding of d's sum lost (a column at 2e9 with std 6e5 in double: 1e-13 of its
/// spread), and mean((((x - s) - d) - e)^2). Each column's numbers depend on its own
/// values only (e = 0 in the one-pass columns; (v - 0) is v), never on its neighbours.
template <bool Center, bool HasW, bool HasB, Index NP, class Acc, class T>
void cols_forward_tile(const T* x, T* y, Index F, Index ld, Index nc, Acc eps, Affine<T> p,
                       bool stream, Acc* mean, Acc* rstd) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  constexpr auto NPmax = static_cast<std::size_t>(col_packets<Acc>);
  const Index np = NP > 0 ? NP : (nc + W - 1) / W;
  auto cnt = [&](Index k) { return NP > 0 || k + 1 < np ? W : nc - k * W; };
  auto at = [&](Index f, Index k) { return load_n<Acc>(x + f * ld + k * W, cnt(k)); };
  const P nf = pset1<P>(static_cast<Acc>(F)), inv_f = pset1<P>(Acc(1) / static_cast<Acc>(F));
  P s[NPmax], d[NPmax], e[NPmax], r[NPmax];
  for (Index k = 0; k < np; ++k) s[k] = d[k] = e[k] = r[k] = zero<Acc>();
  if constexpr (Center) {
    const Index fs = std::min(F, kColSumBlock);
    for (Index f = 0; f < fs; ++f)
      for (Index k = 0; k < np; ++k) s[k] = padd(s[k], at(f, k));
    const P inv_fs = pset1<P>(Acc(1) / static_cast<Acc>(fs));
    for (Index k = 0; k < np; ++k) s[k] = pmul(s[k], inv_fs);
  }
  // Sums in blocks of kColSumBlock features, the block sums then added up: each column's
  // sum runs down the features one term at a time, and a single running sum of 1200
  // terms measured 270 ulp off in y (double); blocked, the rounding grows with the block
  // length plus the number of blocks instead of with F. S1 = sum(x - s) (unless Corr),
  // S2 = sum(v^2), v = x - s, or ((x - s) - d) - e with Corr.
  auto sums = [&](auto corr, P* S1, P* S2) NORMKIT_INLINE_LAMBDA {
    constexpr bool Corr = decltype(corr)::value;
    for (Index k = 0; k < np; ++k) S1[k] = S2[k] = zero<Acc>();
    for (Index f0 = 0; f0 < F; f0 += kColSumBlock) {
      P ta[NPmax], tq[NPmax];
      for (Index k = 0; k < np; ++k) ta[k] = tq[k] = zero<Acc>();
      for (Index f = f0; f < std::min(F, f0 + kColSumBlock); ++f)
        for (Index k = 0; k < np; ++k) {
          P v = at(f, k);
          if constexpr (Center) v = psub(v, s[k]);
          if constexpr (Corr) v = psub(psub(v, d[k]), e[k]);
          if constexpr (Center && !Corr) ta[k] = padd(ta[k], v);
          tq[k] = pmadd(v, v, tq[k]);
        }
      for (Index k = 0; k < np; ++k) {
        if constexpr (Center && !Corr) S1[k] = padd(S1[k], ta[k]);
        S2[k] = padd(S2[k], tq[k]);
      }
    }
  };
  sums(std::false_type{}, d, r);
  // d = S1 / F and the variance from the one-pass sums, lane by lane with
  // one_pass_moments' test; `ok` marks the columns that pass.
  P ok[NPmax];
  bool again = false;
  for (Index k = 0; k < np; ++k) {
    if constexpr (Center) {
      const P dk = pdiv(d[k], nf), m2 = psub(r[k], pmul(d[k], dk));
      ok[k] = pand(pisfinite(m2),
                   pcmp_le(r[k], pmul(pset1<P>(static_cast<Acc>(kOnePassSlack)), m2)));
      again |= predux_any(pandnot(ptrue(ok[k]), ok[k]));
      d[k] = dk;
      r[k] = pdiv(m2, nf);
    } else {
      r[k] = pmul(r[k], inv_f);
    }
  }
  if (Center && again) {  // d, e and the variance again, for the columns that failed
    P d1[NPmax], v1[NPmax], unused[NPmax];
    for (Index k = 0; k < np; ++k) {
      d1[k] = d[k];
      v1[k] = r[k];
      d[k] = zero<Acc>();
    }
    // Divided by F, not times 1/F, as one_pass_moments: a constant column whose shift is
    // not its value (the mean of its first values, rounded) has x - s = the same t in
    // every term, and F t / F gives t back exactly, so that y = b.
    for (Index f = 0; f < F; ++f)
      for (Index k = 0; k < np; ++k) d[k] = padd(d[k], psub(at(f, k), s[k]));
    for (Index k = 0; k < np; ++k) d[k] = pdiv(d[k], nf);
    for (Index f = 0; f < F; ++f)
      for (Index k = 0; k < np; ++k) e[k] = padd(e[k], psub(psub(at(f, k), s[k]), d[k]));
    for (Index k = 0; k < np; ++k) e[k] = pdiv(e[k], nf);
    sums(std::true_type{}, unused, r);
    for (Index k = 0; k < np; ++k) {
      d[k] = pselect(ok[k], d1[k], d[k]);
      e[k] = pselect(ok[k], zero<Acc>(), e[k]);
      r[k] = pselect(ok[k], v1[k], pmul(r[k], inv_f));
    }
  }
  const P pe = pset1<P>(eps), one = pset1<P>(Acc(1));
  bool overflow = false;
  for (Index k = 0; k < np; ++k) {
    overflow |= predux_any(pandnot(ptrue(r[k]), pisfinite(r[k])));
    r[k] = pdiv(one, psqrt_exact(padd(r[k], pe)));
    store_n<Acc>(mean + k * W, padd(s[k], padd(d[k], e[k])), cnt(k), false);
    store_n<Acc>(rstd + k * W, r[k], cnt(k), false);
  }
  auto normalize = [&](auto corr) NORMKIT_INLINE_LAMBDA {
    constexpr bool Corr = decltype(corr)::value;
    for (Index f = 0; f < F; ++f) {
      const P wf = pset1<P>(HasW ? static_cast<Acc>(p.weight[f]) : Acc(1));
      const P bf = pset1<P>(HasB ? static_cast<Acc>(p.bias[f]) : Acc(0));
      for (Index k = 0; k < np; ++k) {
        P v = at(f, k);
        if constexpr (Center) v = psub(psub(v, s[k]), d[k]);
        if constexpr (Corr) v = psub(v, e[k]);
        v = pmul(v, r[k]);
        if constexpr (HasW && HasB)
          v = pmadd(v, wf, bf);
        else if constexpr (HasW)
          v = pmul(v, wf);
        else if constexpr (HasB)
          v = padd(v, bf);
        T* out = y + f * ld + k * W;
        store_n<Acc>(out, v, cnt(k), stream && simd::misalignment<Acc>(out) == 0);
      }
    }
  };
  if (Center && again)
    normalize(std::true_type{});
  else
    normalize(std::false_type{});
  if (overflow) {  // rare: redo the overflowing columns in a wider type
    for (Index c = 0; c < nc; ++c) {
      const Acc var = Acc(1) / (rstd[c] * rstd[c]);
      if (std::isfinite(rstd[c]) && rstd[c] > Acc(0) && std::isfinite(var)) continue;
      if (all_finite(x + c, F, ld))
        row_forward_wide<Center>(x + c, y + c, F, ld, eps, p, mean[c], rstd[c]);
    }
  }
}

/// Statistics and y for columns [0, nc) of a tile, nc <= kColTile. A whole tile goes
/// with its packet count known at compile time: the loops over the packets unroll and
/// the per-column accumulators stay in registers; counted at run time they lived on the
/// stack, each sum's next term waiting for the last one's store (LayerNorm forward of
/// 128x768 floats ColMajor, 1 thread: 36.9 us, against 10.4 RowMajor). The same
/// operations in the same order, so the same bits. With the one-pass moments (two passes
/// over the tile where there were four: d, e, the sums of squares, y; a tile with a column
/// that fails the one-pass test still takes all five), 18.3 -> 12.5-13.5 us (GCC and
/// clang; AVX2 build 26 -> 17).
template <bool Center, bool HasW, bool HasB, class Acc, class T>
void cols_forward(const T* x, T* y, Index F, Index ld, Index nc, Acc eps, Affine<T> p,
                  bool stream, Acc* mean, Acc* rstd) {
  if (nc == kColTile)
    cols_forward_tile<Center, HasW, HasB, col_packets<Acc>>(x, y, F, ld, nc, eps, p, stream, mean, rstd);
  else
    cols_forward_tile<Center, HasW, HasB, 0>(x, y, F, ld, nc, eps, p, stream, mean, rstd);
}

/// Backward for columns [0, nc) of a tile, in NP packets (0: counted at run time), as
/// cols_forward_tile. dw/db: per-feature Acc partials (or null).
template <bool Center, bool HasW, Index NP, class Acc, class T>
void cols_backward_tile(const T* x, const T* dy, T* dx, Index F, Index ld, Index nc, const Acc* mean,
                        const Acc* rstd, const T* w, Acc* dw, Acc* db) {
  using namespace simd;
  using P = packet_t<Acc>;
  constexpr Index W = packet_size<Acc>;
  const Index np = NP > 0 ? NP : (nc + W - 1) / W;
  auto cnt = [&](Index k) { return NP > 0 || k + 1 < np ? W : nc - k * W; };
  P m[col_packets<Acc>], r[col_packets<Acc>], A[col_packets<Acc>], B[col_packets<Acc>],
      C[col_packets<Acc>];
  for (Index k = 0; k < np; ++k) {
    m[k] = Center ? load_n<Acc>(mean + k * W, cnt(k)) : zero<Acc>();
    r[k] = load_n<Acc>(rstd + k * W, cnt(k));
    A[k] = B[k] = C[k] = zero<Acc>();
  }
  // Blocked by kColSumBlock features, as cols_forward's sums of squares: a single
  // running sum(g) over 1320 equal features was 110 ulp off in dx (float, found by the
  // fuzzer's replay).
  for (Index f0 = 0; f0 < F; f0 += kColSumBlock) {
    P ta[col_packets<Acc>], tb[col_packets<Acc>], tc[col_packets<Acc>];
    for (Index k = 0; k < np; ++k) ta[k] = tb[k] = tc[k] = zero<Acc>();
    for (Index f = f0; f < std::min(F, f0 + kColSumBlock); ++f) {
      const P wf = pset1<P>(HasW ? static_cast<Acc>(w[f]) : Acc(1));
      for (Index k = 0; k < np; ++k) {
        P xm = load_n<Acc>(x + f * ld + k * W, cnt(k));
        if constexpr (Center) xm = psub(xm, m[k]);
        P g = load_n<Acc>(dy + f * ld + k * W, cnt(k));
        if constexpr (HasW) g = pmul(g, wf);
        ta[k] = padd(ta[k], xm);
        tb[k] = padd(tb[k], g);
        tc[k] = pmadd(g, pmul(xm, r[k]), tc[k]);  // g * xhat, as the row path: g * (x - m)
                                                   // underflows where g * xhat does not
      }
    }
    for (Index k = 0; k < np; ++k) {
      A[k] = padd(A[k], ta[k]);
      B[k] = padd(B[k], tb[k]);
      C[k] = padd(C[k], tc[k]);
    }
  }
  // A, B, C become the correction c, -rstd * mean(g) and -rstd * mean(g * xhat), so that
  // dx = g * rstd + B + xhat * C, as row_backward: no factor rstd applied after a sum
  // whose terms may exceed the range where dx does not.
  const P inv_f = pset1<P>(Acc(1) / static_cast<Acc>(F));
  bool overflow = false;
  for (Index k = 0; k < np; ++k) {
    const P c = Center ? pmul(A[k], inv_f) : zero<Acc>();
    const P mg = Center ? pmul(B[k], inv_f) : zero<Acc>();
    const P mgx = pmul(Center ? psub(C[k], pmul(pmul(c, r[k]), B[k])) : C[k], inv_f);
    A[k] = c;
    B[k] = psub(zero<Acc>(), pmul(r[k], mg));
    C[k] = psub(zero<Acc>(), pmul(r[k], mgx));
    alignas(64) Acc tmp[4][std::size_t(W)];
    Eigen::internal::pstore(tmp[0], mg);
    Eigen::internal::pstore(tmp[1], mgx);
    Eigen::internal::pstore(tmp[2], B[k]);
    Eigen::internal::pstore(tmp[3], C[k]);
    for (Index l = 0; l < cnt(k); ++l)
      for (int q = 0; q < 4; ++q) overflow |= !std::isfinite(tmp[q][l]);
  }
  if (overflow) {
    // Rare (sums overflowed): do the whole tile column by column in a wider type.
    for (Index c = 0; c < nc; ++c)
      row_backward_wide<Center>(x + c, dy + c, dx + c, F, ld, mean[c], rstd[c],
                                HasW ? w : nullptr, dw, db);
    return;
  }
  for (Index f = 0; f < F; ++f) {
    const P wf = pset1<P>(HasW ? static_cast<Acc>(w[f]) : Acc(1));
    P sdw = zero<Acc>(), sdb = zero<Acc>();
    for (Index k = 0; k < np; ++k) {
      P xh = load_n<Acc>(x + f * ld + k * W, cnt(k));
      if constexpr (Center) xh = psub(psub(xh, m[k]), A[k]);
      xh = pmul(xh, r[k]);
      const P d = load_n<Acc>(dy + f * ld + k * W, cnt(k));
      const P g = HasW ? pmul(d, wf) : d;
      sdw = pmadd(d, xh, sdw);
      sdb = padd(sdb, d);
      store_n<Acc>(dx + f * ld + k * W, pmadd(xh, C[k], pmadd(g, r[k], B[k])), cnt(k), false);
    }
    if (dw) dw[f] += predux(sdw);
    if (db) db[f] += predux(sdb);
  }
}

/// Backward for columns [0, nc) of a tile, nc <= kColTile; a whole tile with its packet
/// count known at compile time, as cols_forward (LayerNorm backward of 128x768 floats
/// ColMajor, 1 thread: 31.1 us, against 17.8 RowMajor). The same bits.
template <bool Center, bool HasW, class Acc, class T>
void cols_backward(const T* x, const T* dy, T* dx, Index F, Index ld, Index nc, const Acc* mean,
                   const Acc* rstd, const T* w, Acc* dw, Acc* db) {
  if (nc == kColTile)
    cols_backward_tile<Center, HasW, col_packets<Acc>>(x, dy, dx, F, ld, nc, mean, rstd, w, dw, db);
  else
    cols_backward_tile<Center, HasW, 0>(x, dy, dx, F, ld, nc, mean, rstd, w, dw, db);
}

}  // namespace detail
}  // namespace normkit

NORMKIT_CODE_END
