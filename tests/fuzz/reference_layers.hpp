// Long-double scalar references of the four layers, written from the formulas (not
// from the kernels), shared by the adversarial tests and the fuzz target. No GoogleTest
// here: the fuzz target links none.
//
// Every layer is seen on logical (row-major) data as [outer, C, inner]:
//   LayerNorm / RMSNorm  normalize over C for each (outer, inner); params per C
//                        (the trailing normalized dims flattened: inner = 1)
//   BatchNorm            normalize over (outer, inner) for each C; params per C
//   DyT                  elementwise; params per C (channel axis)
// Besides the values, each result carries the magnitude of the terms that were summed
// to get it (`*_scale`): a correct float kernel is within a small multiple of the unit
// roundoff of that scale, however much the terms cancel.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace nkref {

using LD = long double;

struct Shape3 {
  long outer = 1, C = 1, inner = 1;
  long size() const { return outer * C * inner; }
  std::size_t at(long o, long c, long i) const { return static_cast<std::size_t>((o * C + c) * inner + i); }
};

struct Params {
  std::vector<LD> w, b;  // [C] or empty (no weight / no bias)
  LD eps = 1e-5L;
  LD alpha = 0.5L;  // DyT only
  LD wt(long c) const { return w.empty() ? 1.0L : w[static_cast<std::size_t>(c)]; }
  LD bs(long c) const { return b.empty() ? 0.0L : b[static_cast<std::size_t>(c)]; }
};

struct Result {
  std::vector<LD> y, dx, dw, db;     // y, dx [size]; dw, db [C]
  std::vector<LD> y_scale, dx_scale, dw_scale, db_scale;
  // How much dx amplifies the absolute error (denorm_min / 2 each) of subnormal
  // intermediates such as dy * w or g * xhat: the factors applied after them.
  std::vector<LD> dx_amp;
  // The same for the parameter-gradient sums (DyT): every term may carry such an error,
  // times the factors applied after it (dalpha: w and x; dweight: none).
  std::vector<LD> dw_amp;
  LD dalpha = 0, dalpha_scale = 0, dalpha_amp = 0;
  std::vector<LD> mean, var;  // per group (LN/RMS: outer*inner, BN: C); var biased
};

/// LayerNorm (center) / RMSNorm over the mid axis (over_mid), or BatchNorm over
/// (outer, inner) per channel (!over_mid). With `fixed_mean`/`fixed_var` (BatchNorm
/// eval) the statistics are constants and backward does not go through them.
inline Result normalize(bool center, bool over_mid, const std::vector<LD>& x, const std::vector<LD>& dy,
                        const Shape3& s, const Params& p, const std::vector<LD>* fixed_mean = nullptr,
                        const std::vector<LD>* fixed_var = nullptr) {
  Result r;
  const std::size_t n = static_cast<std::size_t>(s.size());
  r.y.assign(n, 0);
  r.dx.assign(n, 0);
  r.y_scale.assign(n, 0);
  r.dx_scale.assign(n, 0);
  r.dx_amp.assign(n, 1);
  r.dw_amp.assign(static_cast<std::size_t>(s.C), 1);
  r.dw.assign(static_cast<std::size_t>(s.C), 0);
  r.db = r.dw;
  r.dw_scale = r.dw;
  r.db_scale = r.dw;
  // Groups: the element indices normalized together.
  std::vector<std::vector<std::size_t>> groups;
  if (over_mid) {
    for (long o = 0; o < s.outer; ++o)
      for (long i = 0; i < s.inner; ++i) {
        groups.emplace_back();
        for (long c = 0; c < s.C; ++c) groups.back().push_back(s.at(o, c, i));
      }
  } else {
    for (long c = 0; c < s.C; ++c) {
      groups.emplace_back();
      for (long o = 0; o < s.outer; ++o)
        for (long i = 0; i < s.inner; ++i) groups.back().push_back(s.at(o, c, i));
    }
  }
  auto chan = [&](std::size_t k) { return static_cast<long>((k / static_cast<std::size_t>(s.inner)) % static_cast<std::size_t>(s.C)); };
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& g = groups[gi];
    const LD cnt = static_cast<LD>(g.size());
    // x - mean as (x - shift) - (mean - shift), shift = the group's first value: long
    // double has only 11 bits more than double, too few for mean 1e12, spread 1e-2 in
    // one piece, while x - shift is exact for values within a factor 2 of each other.
    LD shift = 0, dmean = 0, var = 0;
    if (fixed_mean) {
      shift = (*fixed_mean)[gi];
      var = (*fixed_var)[gi];
    } else {
      if (center && !g.empty()) {
        shift = x[g[0]];
        for (std::size_t k : g) dmean += x[k] - shift;
        dmean /= cnt;
      }
      for (std::size_t k : g) var += ((x[k] - shift) - dmean) * ((x[k] - shift) - dmean);
      var /= cnt;
    }
    auto centered = [&](std::size_t k) { return (x[k] - shift) - dmean; };
    r.mean.push_back(shift + dmean);
    r.var.push_back(var);
    const LD rstd = 1.0L / std::sqrt(var + p.eps);
    LD mg = 0, mgx = 0, max_g = 0, max_xh = 0, max_w = 0, max_b = 0;
    for (std::size_t k : g) {
      const long c = chan(k);
      const LD xh = centered(k) * rstd;
      r.y[k] = xh * p.wt(c) + p.bs(c);
      const LD gk = dy[k] * p.wt(c);
      mg += gk;
      mgx += gk * xh;
      max_g = std::max(max_g, std::fabs(gk));
      max_xh = std::max(max_xh, std::fabs(xh));
      max_w = std::max(max_w, std::fabs(p.wt(c)));
      max_b = std::max(max_b, std::fabs(p.bs(c)));
      r.dw[static_cast<std::size_t>(c)] += dy[k] * xh;
      r.db[static_cast<std::size_t>(c)] += dy[k];
      r.dw_scale[static_cast<std::size_t>(c)] += std::fabs(dy[k]) * (1 + std::fabs(xh));
      // dweight = sum(dy * (x - mean)) * rstd: a subnormal product's rounding, times rstd.
      r.dw_amp[static_cast<std::size_t>(c)] += 1 + rstd;
      r.db_scale[static_cast<std::size_t>(c)] += std::fabs(dy[k]);
    }
    mg = center ? mg / cnt : 0;
    mgx /= cnt;
    const bool through_stats = fixed_mean == nullptr;
    for (std::size_t k : g) {
      const long c = chan(k);
      const LD xh = centered(k) * rstd;
      const LD gk = dy[k] * p.wt(c);
      r.dx[k] = through_stats ? rstd * (gk - mg - xh * mgx) : rstd * gk;
      r.y_scale[k] = max_w * (1 + max_xh) + max_b;
      r.dx_scale[k] = through_stats ? rstd * max_g * (1 + max_xh) * (1 + max_xh) : rstd * std::fabs(gk);
      r.dx_amp[k] = 1 + rstd * (1 + max_xh) * (1 + max_xh) * (1 + max_w);
    }
  }
  return r;
}

/// BatchNorm running statistics after one training step from (rm, rv).
inline void running_update(const Result& r, long count, LD momentum_or_neg, long num_batches_tracked,
                           std::vector<LD>& rm, std::vector<LD>& rv) {
  const LD f = momentum_or_neg >= 0 ? momentum_or_neg : 1.0L / static_cast<LD>(num_batches_tracked);
  const LD unbias = static_cast<LD>(count) / static_cast<LD>(count - 1);
  for (std::size_t c = 0; c < rm.size(); ++c) {
    rm[c] = (1 - f) * rm[c] + f * r.mean[c];
    rv[c] = (1 - f) * rv[c] + f * r.var[c] * unbias;
  }
}

/// DyT: y = w * tanh(alpha * x) + b, elementwise, params per channel.
inline Result dyt(const std::vector<LD>& x, const std::vector<LD>& dy, const Shape3& s, const Params& p) {
  Result r;
  const std::size_t n = static_cast<std::size_t>(s.size());
  r.y.assign(n, 0);
  r.dx.assign(n, 0);
  r.y_scale.assign(n, 0);
  r.dx_scale.assign(n, 0);
  r.dx_amp.assign(n, 1);
  r.dw_amp.assign(static_cast<std::size_t>(s.C), 1);
  r.dw.assign(static_cast<std::size_t>(s.C), 0);
  r.db = r.dw;
  r.dw_scale = r.dw;
  r.db_scale = r.dw;
  for (long o = 0; o < s.outer; ++o)
    for (long c = 0; c < s.C; ++c)
      for (long i = 0; i < s.inner; ++i) {
        const std::size_t k = s.at(o, c, i);
        const LD t = std::tanh(p.alpha * x[k]);
        const LD sech2 = 1 - t * t;
        const LD gk = dy[k] * p.wt(c);
        r.y[k] = p.wt(c) * t + p.bs(c);
        r.y_scale[k] = std::fabs(p.wt(c)) + std::fabs(p.bs(c));
        r.dx[k] = gk * p.alpha * sech2;
        r.dx_scale[k] = std::fabs(gk * p.alpha);
        // dx = dy * w * alpha * sech2 in any order: the subnormal intermediate may be
        // dy * w (times alpha after it), dy * alpha (times w), or w * alpha (times dy).
        r.dx_amp[k] = 1 + std::fabs(p.wt(c) * p.alpha) + std::fabs(dy[k]) * (1 + std::fabs(p.alpha)) * (1 + std::fabs(p.wt(c)));
        r.dalpha_amp += (1 + std::fabs(x[k])) * (1 + std::fabs(p.wt(c)));
        r.dw_amp[static_cast<std::size_t>(c)] += 1;
        r.dalpha += gk * x[k] * sech2;
        // The slope 1 - t^2 is formed from the rounded t (the forward's cached tanh), so
        // its error is absolute, a few ulp of 1, at any |alpha x|: where t rounds to 1
        // (|alpha x| > 9 in float) the term is 0 while sech2 is not, and a dalpha made
        // only of such terms is 0 against a reference of 1e-13 (found by the replay).
        r.dalpha_scale += std::fabs(gk * x[k]) * (sech2 + 1);
        r.dw[static_cast<std::size_t>(c)] += dy[k] * t;
        r.db[static_cast<std::size_t>(c)] += dy[k];
        r.dw_scale[static_cast<std::size_t>(c)] += std::fabs(dy[k]);
        r.db_scale[static_cast<std::size_t>(c)] += std::fabs(dy[k]);
      }
  return r;
}

}  // namespace nkref
