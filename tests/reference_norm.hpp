// Plain long-double scalar references of LayerNorm (center = true) and RMSNorm
// (center = false), written from the formulas, not from the kernels. Data is logical:
// [rows, features] row-major.
#pragma once

#include <cmath>
#include <vector>

namespace nktest::ref {

using LD = long double;

struct NormForward {
  std::vector<LD> y, mean, rstd;  // y [rows*F], mean/rstd [rows]
};

inline NormForward norm_forward(bool center, const std::vector<double>& x, long rows, long F,
                                LD eps, const std::vector<double>* w,
                                const std::vector<double>* b) {
  NormForward r;
  r.y.resize(x.size());
  r.mean.resize(static_cast<std::size_t>(rows));
  r.rstd.resize(static_cast<std::size_t>(rows));
  for (long i = 0; i < rows; ++i) {
    const double* xr = x.data() + i * F;
    LD mean = 0;
    if (center) {
      for (long j = 0; j < F; ++j) mean += xr[j];
      mean /= F;
    }
    LD var = 0;
    for (long j = 0; j < F; ++j) var += (xr[j] - mean) * (xr[j] - mean);
    var /= F;
    const LD rstd = 1.0L / std::sqrt(var + eps);
    r.mean[static_cast<std::size_t>(i)] = mean;
    r.rstd[static_cast<std::size_t>(i)] = rstd;
    for (long j = 0; j < F; ++j) {
      LD v = (xr[j] - mean) * rstd;
      if (w) v *= (*w)[static_cast<std::size_t>(j)];
      if (b) v += (*b)[static_cast<std::size_t>(j)];
      r.y[static_cast<std::size_t>(i * F + j)] = v;
    }
  }
  return r;
}

struct NormBackward {
  std::vector<LD> dx, dweight, dbias;
};

/// The closed form dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w,
/// with the statistics recomputed from x.
inline NormBackward norm_backward(bool center, const std::vector<double>& x,
                                  const std::vector<double>& dy, long rows, long F, LD eps,
                                  const std::vector<double>* w) {
  const NormForward f = norm_forward(center, x, rows, F, eps, nullptr, nullptr);
  NormBackward r;
  r.dx.resize(x.size());
  r.dweight.assign(static_cast<std::size_t>(F), 0);
  r.dbias.assign(static_cast<std::size_t>(F), 0);
  for (long i = 0; i < rows; ++i) {
    const LD rstd = f.rstd[static_cast<std::size_t>(i)];
    LD mg = 0, mgx = 0;
    for (long j = 0; j < F; ++j) {
      const std::size_t k = static_cast<std::size_t>(i * F + j);
      const LD g = dy[k] * (w ? (*w)[static_cast<std::size_t>(j)] : 1.0);
      const LD xh = f.y[k];  // un-affine forward output is xhat
      mg += g;
      mgx += g * xh;
      r.dweight[static_cast<std::size_t>(j)] += dy[k] * xh;
      r.dbias[static_cast<std::size_t>(j)] += dy[k];
    }
    mg = center ? mg / F : 0;
    mgx /= F;
    for (long j = 0; j < F; ++j) {
      const std::size_t k = static_cast<std::size_t>(i * F + j);
      const LD g = dy[k] * (w ? (*w)[static_cast<std::size_t>(j)] : 1.0);
      r.dx[k] = rstd * (g - mg - f.y[k] * mgx);
    }
  }
  return r;
}

}  // namespace nktest::ref
