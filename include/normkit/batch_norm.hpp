// BatchNorm over every dim but the channel axis, as torch.nn.BatchNorm{1,2,3}d.
//
//   forward   train: mean, var = batch statistics per channel (var biased), then
//                    running_mean += f * (mean - running_mean)
//                    running_var  += f * (var * n / (n - 1) - running_var)
//                    with f = momentum, or 1 / num_batches_tracked without one
//             eval:  mean, var = running_mean, running_var
//             xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps);  y = xhat * weight + bias
//   backward  train (through the batch statistics; n values per channel):
//               dx = weight * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))
//             eval (a per-channel affine map): dx = weight * rstd * dy
//             both: dweight = sum(dy * xhat), dbias = sum(dy)  (sums over all but the channel)
//   shapes    x, y, dy, dx: [N, C, ...] (channel axis 1; any axis through the options, -1 is
//             channels-last); weight, bias, running_mean, running_var: [C]; cache: [C]
//   derivation: docs/derivations/batch_norm.md
//
// Synchronized statistics: with a StatsReducer (include <normkit/mpi.hpp> for one over
// MPI) every process holds a part of the batch, and forward/backward see the whole one.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "core/config.hpp"
#include "core/channel_kernels.hpp"
#include "core/trailing_norm.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {

/// Sums per-channel partial statistics over the processes that share a batch. Every
/// process must call it with the same n, in the same order (it is a collective).
class StatsReducer {
 public:
  virtual ~StatsReducer() = default;
  /// data[0, n) becomes, on every process, the sum over processes of their data[0, n).
  virtual void allreduce_sum(double* data, Index n) = 0;
};

/// Options of BatchNorm, set fluently: BatchNormOptions().eps(1e-3).momentum(0.01).
class BatchNormOptions {
 public:
  BatchNormOptions& eps(double v) { eps_ = v; return *this; }
  /// The weight of the new batch in the running statistics; std::nullopt for a
  /// cumulative moving average (PyTorch's momentum=None).
  BatchNormOptions& momentum(std::optional<double> v) { momentum_ = v; return *this; }
  BatchNormOptions& affine(bool v) { affine_ = v; return *this; }
  /// Off: no running statistics, and batch statistics in eval mode too.
  BatchNormOptions& track_running_stats(bool v) { track_ = v; return *this; }
  /// The channel axis of x; negative counts from the end (-1: channels-last).
  BatchNormOptions& channel_axis(int v) { axis_ = v; return *this; }
  /// Synchronized BatchNorm: statistics over the batches of all processes.
  BatchNormOptions& reducer(std::shared_ptr<StatsReducer> v) { reducer_ = std::move(v); return *this; }

  double eps() const { return eps_; }
  std::optional<double> momentum() const { return momentum_; }
  bool affine() const { return affine_; }
  bool track_running_stats() const { return track_; }
  int channel_axis() const { return axis_; }
  const std::shared_ptr<StatsReducer>& reducer() const { return reducer_; }

 private:
  double eps_ = 1e-5;
  std::optional<double> momentum_ = 0.1;
  bool affine_ = true;
  bool track_ = true;
  int axis_ = 1;
  std::shared_ptr<StatsReducer> reducer_;
};

/// Batch normalization (Ioffe & Szegedy, 2015) with PyTorch's semantics. Statistics in
/// double from float (or double) partial sums; float/double/half/bfloat16 storage. A new
/// BatchNorm is in training mode. forward() updates the running statistics in training
/// mode, so it is not const; backward() is.
template <class T>
class BatchNorm {
  static_assert(detail::is_layer_scalar_v<T>, "normkit layers take float, double, Eigen::half or Eigen::bfloat16");

 public:
  using Scalar = T;
  using Acc = detail::acc_t<T>;
  using Options = BatchNormOptions;

 private:
  /// The per-channel finish (statistics to coefficients): double for float data, where
  /// its 29 extra bits and 2^1024 range hold every float intermediate (squares included)
  /// and it runs several times faster than x87; long double for double data.
  using Fin = std::conditional_t<std::is_same_v<Acc, float>, double, long double>;
  /// Per-channel arrays, subscripted by channel.
  using FinVec = detail::IndexVector<Fin>;
  using AccVec = detail::IndexVector<Acc>;

 public:

  /// What backward needs from forward: the mean and rstd it normalized with, per channel.
  struct Cache {
    Eigen::Tensor<Acc, 1> mean;    // [C]
    Eigen::Tensor<Acc, 1> invstd;  // [C]
    bool batch_stats = false;      // true: backward goes through the batch statistics
    double count = 0;              // values per channel (over all processes)
    std::vector<Index> x_dims;     // shape of the x it was computed from; empty: not filled
    // Channels normalized in long double (their values or coefficients leave Acc's
    // range: |x| near its maximum, std > 1e19 in float), with their exact statistics.
    std::vector<detail::WideChannel> wide;
    bool empty() const { return x_dims.empty(); }
  };

  /// Parameter gradients, overwritten by backward. With a reducer they are already the
  /// sums over all processes (the gradient of the sum of their losses).
  struct Grads {
    Eigen::Tensor<T, 1> weight;  // [C], empty without affine
    Eigen::Tensor<T, 1> bias;    // [C], empty without affine
    std::vector<double> work;    // reused scratch
  };

  /// Eval-mode BatchNorm as y = x * scale + shift per channel, to fold into a
  /// neighbouring linear or convolution layer.
  struct Folded {
    Eigen::Tensor<T, 1> scale;  // [C] = weight / sqrt(running_var + eps)
    Eigen::Tensor<T, 1> shift;  // [C] = bias - running_mean * scale
  };

  explicit BatchNorm(Index num_features, const Options& options = Options())
      : C_(num_features), opt_(options) {
    if (C_ < 0) detail::fail("BatchNorm: num_features must be >= 0, got ", C_);
    detail::validate_eps<T>("BatchNorm", opt_.eps());
    if (opt_.momentum() && !(*opt_.momentum() >= 0 && *opt_.momentum() <= 1))
      detail::fail("BatchNorm: momentum must be in [0, 1] (or std::nullopt for a cumulative average), got ",
                   *opt_.momentum());
    if (opt_.affine()) {
      weight_.resize(C_);
      bias_.resize(C_);
    }
    if (opt_.track_running_stats()) {
      running_mean_.resize(C_);
      running_var_.resize(C_);
    }
    reset_parameters();
  }

  template <class X, class Y, detail::enable_if_tensors_t<X, Y> = 0>
  void forward(const X& x, Y&& y) {
    forward_impl(Eigen::DefaultDevice(), detail::dense(x), y, nullptr);
  }
  template <class X, class Y, detail::enable_if_tensors_t<X, Y> = 0>
  void forward(const X& x, Y&& y, Cache& cache) {
    forward_impl(Eigen::DefaultDevice(), detail::dense(x), y, &cache);
  }
  template <class Device, class X, class Y, detail::enable_if_device_tensors_t<Device, X, Y> = 0>
  void forward(const Device& dev, const X& x, Y&& y) {
    forward_impl(dev, detail::dense(x, dev), y, nullptr);
  }
  template <class Device, class X, class Y, detail::enable_if_device_tensors_t<Device, X, Y> = 0>
  void forward(const Device& dev, const X& x, Y&& y, Cache& cache) {
    forward_impl(dev, detail::dense(x, dev), y, &cache);
  }

  /// dx (overwritten) and the parameter gradients (overwritten), in the mode the cache
  /// was filled in. dx may be x or dy itself.
  template <class X, class DY, class DX, detail::enable_if_tensors_t<X, DY, DX> = 0>
  void backward(const X& x, const DY& dy, const Cache& cache, DX&& dx, Grads& grads) const {
    backward_impl(Eigen::DefaultDevice(), detail::dense(x), detail::dense(dy), cache, dx, grads);
  }
  template <class Device, class X, class DY, class DX,
            detail::enable_if_device_tensors_t<Device, X, DY, DX> = 0>
  void backward(const Device& dev, const X& x, const DY& dy, const Cache& cache, DX&& dx,
                Grads& grads) const {
    backward_impl(dev, detail::dense(x, dev), detail::dense(dy, dev), cache, dx, grads);
  }

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }
  bool training() const { return training_; }  // PyTorch's module.training

  /// As PyTorch: running_mean 0, running_var 1, num_batches_tracked 0.
  void reset_running_stats() {
    running_mean_.setConstant(T(0));
    running_var_.setConstant(T(1));
    num_batches_tracked_ = 0;
  }
  /// As PyTorch: the running statistics reset, weight 1, bias 0.
  void reset_parameters() {
    reset_running_stats();
    weight_.setConstant(T(1));
    bias_.setConstant(T(0));
  }

  /// The per-channel scale and shift eval mode applies (needs running statistics).
  Folded fold() const {
    if (!opt_.track_running_stats())
      detail::fail("BatchNorm::fold: track_running_stats is off, so eval mode normalizes with batch "
                   "statistics and is no fixed per-channel affine map");
    Folded f;
    f.scale.resize(C_);
    f.shift.resize(C_);
    for (Index c = 0; c < C_; ++c) {
      const long double r = 1.0L / std::sqrt(static_cast<long double>(running_var_(c)) + opt_.eps());
      const long double s = (opt_.affine() ? static_cast<long double>(weight_(c)) : 1.0L) * r;
      f.scale(c) = static_cast<T>(s);
      f.shift(c) = static_cast<T>((opt_.affine() ? static_cast<long double>(bias_(c)) : 0.0L) -
                                  static_cast<long double>(running_mean_(c)) * s);
    }
    return f;
  }

  Eigen::Tensor<T, 1>& weight() { return weight_; }
  const Eigen::Tensor<T, 1>& weight() const { return weight_; }
  Eigen::Tensor<T, 1>& bias() { return bias_; }
  const Eigen::Tensor<T, 1>& bias() const { return bias_; }
  /// [C]; empty without track_running_stats.
  Eigen::Tensor<T, 1>& running_mean() { return running_mean_; }
  const Eigen::Tensor<T, 1>& running_mean() const { return running_mean_; }
  Eigen::Tensor<T, 1>& running_var() { return running_var_; }
  const Eigen::Tensor<T, 1>& running_var() const { return running_var_; }
  std::int64_t& num_batches_tracked() { return num_batches_tracked_; }
  std::int64_t num_batches_tracked() const { return num_batches_tracked_; }

  Index num_features() const { return C_; }
  Index features() const { return C_; }
  double eps() const { return opt_.eps(); }
  std::optional<double> momentum() const { return opt_.momentum(); }
  bool affine() const { return opt_.affine(); }
  bool track_running_stats() const { return opt_.track_running_stats(); }
  int channel_axis() const { return opt_.channel_axis(); }
  const std::shared_ptr<StatsReducer>& reducer() const { return opt_.reducer(); }

 private:
  /// x's dims and its channel axis, after checking them.
  template <class X>
  std::pair<std::vector<Index>, std::size_t> check_x(const std::string& fn, const X& x) const {
    std::vector<Index> dims = detail::dims_of(x);
    const int rank = static_cast<int>(dims.size());
    if (rank < 2)
      detail::fail(fn, ": x has rank ", rank, ", expected rank >= 2 (x is ", detail::shape_str(dims), ")");
    const int axis = opt_.channel_axis() < 0 ? opt_.channel_axis() + rank : opt_.channel_axis();
    if (axis < 0 || axis >= rank)
      detail::fail(fn, ": channel_axis ", opt_.channel_axis(), " is out of range for x of rank ", rank,
                   " (x is ", detail::shape_str(dims), ")");
    if (dims[static_cast<std::size_t>(axis)] != C_)
      detail::fail(fn, ": x has ", dims[static_cast<std::size_t>(axis)], " channels on axis ", axis,
                   ", expected ", C_, " (x is ", detail::shape_str(dims), ")");
    return {dims, static_cast<std::size_t>(axis)};
  }

  bool batch_stats() const { return training_ || !opt_.track_running_stats(); }

  template <class Dev, class X, class Y>
  void forward_impl(const Dev& dev, const X& x, Y& y, Cache* cache) {
    static_assert(detail::traits_of<Y>::writable, "normkit: the output y must be writable");
    detail::check_same_type<T, X, Y>();
    const std::string fn = "BatchNorm::forward";
    const auto [dims, axis] = check_x(fn, x);
    detail::check_output(fn, "y", y, dims);
    if (detail::partial_overlap(x.data(), y.data(), x.size()))
      detail::fail(fn, ": y partially overlaps x (only y == x, in place, is supported)");
    const detail::ChannelView v = detail::channel_view(dims, detail::traits_of<X>::row_major, axis);
    const bool batch = batch_stats();
    StatsReducer* red = opt_.reducer().get();
    // y is resized (if it is to be) after the last check: in training mode, the one of
    // the values per channel, which with a reducer (every process must join the
    // reductions, and the count that matters is the global one) comes after them.
    if (batch && !red && v.count() == 1) too_few_values(fn, dims);
    if (!(batch && red)) detail::fit_output(y, dims);
    const Index C = C_;
    // Statistics in Fin (wider than Acc); m[c] is the mean rounded to Acc and corr[c] the
    // rest of it (a large offset is not representable in Acc to the precision of the spread).
    FinVec mean(C), var(C), corr(C), r(C);
    AccVec m(C);
    // y = (x - m) * a + b, b absorbing corr.
    AccVec a(C), b(C), rs(C);
    std::vector<detail::WideChannel> wide;
    double count = 0;
    detail::IndexVector<detail::Moments> mom;
    if (batch) {
      mom.resize(C);
      count = x.size() == 0 ? 0.0 : static_cast<double>(v.count());
      if (!red && count > 0 && v.row_path()) {
        // Channels whose values are rows of their own (NCHW) go a group at a time,
        // statistics then map, so that the map reads x again from the cache the
        // statistics left it in rather than from memory (on a pool, the groups in parallel
        // where there are channels enough: for_each_channel_group). Each channel's results
        // are the same as in one group of all.
        std::mutex wide_mutex;
        detail::for_each_channel_group(dev, v, sizeof(T), [&](const auto& d, detail::ChannelRange cr, bool concurrent) {
          detail::IndexVector<detail::Moments> local_work;
          std::vector<detail::WideChannel> group_wide;
          detail::channel_moments(d, x.data(), v, concurrent ? local_work : moments_work_, mom.data(), cr);
          batch_statistics(d, x.data(), v, mom, count, nullptr, cr, mean, var, corr, r, m);
          map_channels(d, x.data(), y.data(), v, batch, count, cr, mean, var, corr, r, m, a, b, rs, group_wide);
          if (group_wide.empty()) return;
          const std::lock_guard<std::mutex> lock(wide_mutex);
          wide.insert(wide.end(), group_wide.begin(), group_wide.end());
        });
        std::sort(wide.begin(), wide.end(), [](const detail::WideChannel& p, const detail::WideChannel& q) {
          return p.channel < q.channel;
        });
        if (training_ && opt_.track_running_stats()) update_running(mean, var, count);
        if (cache) fill_cache(*cache, dims, batch, m.data(), rs.data(), count, std::move(wide));
        return;
      }
      detail::channel_moments(dev, x.data(), v, moments_work_, mom.data());
      if (red) {
        count = reduce_moments(*red, mom);
        if (count == 1) too_few_values(fn, dims);
        detail::fit_output(y, dims);
      }
      if (count == 0) {  // nothing to normalize anywhere: no statistics, no update
        if (cache) fill_cache(*cache, dims, batch, nullptr, nullptr, 0, {});
        return;
      }
      batch_statistics(dev, x.data(), v, mom, count, red, detail::all_channels(v), mean, var, corr, r, m);
      if (training_ && opt_.track_running_stats()) update_running(mean, var, count);
    } else {
      count = static_cast<double>(v.count());
      for (Index c = 0; c < C; ++c) {
        mean[c] = static_cast<Fin>(static_cast<double>(running_mean_(c)));
        var[c] = static_cast<Fin>(static_cast<double>(running_var_(c)));
      }
      set_shift(mean, var, m, corr, r, detail::all_channels(v));
    }
    map_channels(dev, x.data(), y.data(), v, batch, count, detail::all_channels(v), mean, var, corr, r, m, a, b, rs,
                 wide);
    if (cache) fill_cache(*cache, dims, batch, m.data(), rs.data(), count, std::move(wide));
  }

  /// The channels of cr from their moments (over all processes, `count` values each) to
  /// mean, var, corr, r and m.
  template <class Dev>
  void batch_statistics(const Dev& dev, const T* x, const detail::ChannelView& v,
                        const detail::IndexVector<detail::Moments>& mom, double count, StatsReducer* red,
                        detail::ChannelRange cr, FinVec& mean, FinVec& var,
                        FinVec& corr, FinVec& r, AccVec& m) const {
    const Index C = C_;
    for (Index c = cr.begin; c < cr.end; ++c) {
      mean[c] = mom[c].mean;
      var[c] = static_cast<Fin>(mom[c].m2) / count;
      if constexpr (std::is_same_v<Acc, double>) {
        // Moments of values near DBL_MAX overflow double: redone in long double.
        if (!red && !(std::isfinite(mom[c].mean) && std::isfinite(mom[c].m2)))
          detail::exact_channel_moments(x, v, c, mean[c], var[c]);
      }
    }
    set_shift(mean, var, m, corr, r, cr);
    if constexpr (std::is_same_v<Acc, double>) {
      // A double channel far from zero (1e12 +- 1e-2) has a mean that no long double
      // holds to the precision of its spread, and its pieces' means merged as doubles
      // lose the variance too. Around m, every x - m is exact: A = sum(x - m) and
      // Q = sum((x - m)^2) give both.
      detail::IndexVector<char> offset(C);
      bool any = false;
      for (Index c = cr.begin; c < cr.end; ++c) any |= (offset[c] = offset_channel(mean[c], r[c])) != 0;
      if (any) {
        detail::IndexVector<double> sums(3 * C);
        std::vector<double> work;
        detail::channel_grad_sums<T, Acc, true>(dev, x, nullptr, m.data(), nullptr, v, work, sums.data(), cr);
        if (red) red->allreduce_sum(sums.data(), 3 * C);
        for (Index c = cr.begin; c < cr.end; ++c) {
          if (!offset[c]) continue;
          const long double A = sums[c], Q = sums[2 * C + c];
          // Squares beyond double (std > ~1e154): keep the moments above, which the
          // long-double pass computed when double overflowed.
          if (!(std::isfinite(A) && std::isfinite(Q))) continue;
          corr[c] = A / count;
          mean[c] = static_cast<long double>(m[c]) + corr[c];
          var[c] = detail::nonnegative(Q - A * corr[c]) / count;
          r[c] = 1 / std::sqrt(var[c] + static_cast<long double>(opt_.eps()));
        }
      }
    }
  }

  /// y for the channels of cr: the coefficients, then the vector map and the channels
  /// done in long double (`wide`, empty on entry).
  template <class Dev>
  void map_channels(const Dev& dev, const T* x, T* y, const detail::ChannelView& v, bool batch, double count,
                    detail::ChannelRange cr, const FinVec& mean, const FinVec& var,
                    const FinVec& corr, const FinVec& r, AccVec& m,
                    AccVec& a, AccVec& b, AccVec& rs,
                    std::vector<detail::WideChannel>& wide) const {
    map_coefficients(batch, count, mean, var, corr, r, cr, m, a, b, rs, wide);
    std::vector<T> wide_y = wide_forward(x, v, wide);
    detail::channel_map<T, Acc>(dev, x, nullptr, y, v,
                                detail::ChannelMap<Acc>{m.data(), a.data(), b.data(), nullptr, nullptr}, cr);
    detail::scatter_channels(wide_y.data(), v, wide, y);
  }

  EIGEN_DONT_INLINE void set_shift(const FinVec& mean, const FinVec& var, AccVec& m,
                                    FinVec& corr, FinVec& r, detail::ChannelRange cr) const {
    for (Index c = cr.begin; c < cr.end; ++c) {
      m[c] = static_cast<Acc>(mean[c]);
      corr[c] = detail::blend(std::isfinite(mean[c]), mean[c] - static_cast<Fin>(m[c]), Fin(0));
    }
    // In packets: with few values per channel (an eval forward of 256x512) the channels'
    // divisions and square roots one at a time took a fifth of the call.
    detail::simd::inv_sqrt_plus(var.data() + cr.begin, static_cast<Fin>(opt_.eps()), r.data() + cr.begin,
                                cr.size());
  }

  /// |mean| * rstd beyond which the mean's rounding to one double costs more than a few
  /// ulp of xhat.
  static bool offset_channel(long double mean, long double r) {
    return std::isfinite(mean) && std::isfinite(r) && std::fabs(mean) * r > 2;
  }

  /// A comparison as 0 or 1, for loops without a branch (&& and || are branches).
  static unsigned bit(bool b) { return static_cast<unsigned>(b); }

  /// A channel with finite statistics goes through the long-double path when the
  /// accumulation type cannot hold its intermediates: deviations x - mean beyond its
  /// range (values near its maximum), rstd below its smallest normal (std > 1e19 in
  /// float), or a coefficient (rstd * weight, the bias term) outside its normal range.
  /// Branch-free (each comparison a 0/1 unsigned), so that map_coefficients' loop over
  /// every channel, which calls it, vectorizes.
  static unsigned is_wide(bool batch, double count, Fin mean, Fin var, Fin r, Fin aw, Fin bw) {
    const Fin max_fin = std::numeric_limits<Fin>::max(), max_acc = std::numeric_limits<Acc>::max(),
              min_acc = std::numeric_limits<Acc>::min();
    const Fin fm = std::fabs(mean);
    const unsigned finite = bit(fm <= max_fin) & bit(std::fabs(var) <= max_fin);  // NaN/Inf stay in their channel
    const Fin inf = std::numeric_limits<Fin>::infinity();  // a limit that nothing exceeds
    const Fin var_limit = batch ? max_acc * max_acc / 4 : inf;
    const Fin mean_limit = batch ? inf : max_acc * std::numeric_limits<Acc>::epsilon();
    const unsigned deviations = bit(var * count > var_limit) | bit(fm > mean_limit);
    return finite & (deviations | bit(r < min_acc) | leaves_acc(aw) | leaves_acc(bw));
  }

  /// 1 where a finite, nonzero coefficient is outside Acc's normal range, else 0.
  static unsigned leaves_acc(Fin k) {
    const Fin f = std::fabs(k);
    return bit(f <= std::numeric_limits<Fin>::max()) & bit(k != 0) &
           (bit(f < std::numeric_limits<Acc>::min()) | bit(f > std::numeric_limits<Acc>::max()));
  }

  /// y of the wide channels, in long double, channel after channel (before y is written:
  /// y may be x).
  std::vector<T> wide_forward(const T* x, const detail::ChannelView& v, const std::vector<detail::WideChannel>& wide) const {
    std::vector<T> out(wide.size() * static_cast<std::size_t>(v.count()));
    std::size_t j = 0;
    for (const detail::WideChannel& w : wide) {
      const long double wt = opt_.affine() ? static_cast<long double>(static_cast<double>(weight_(w.channel))) : 1;
      const long double bs = opt_.affine() ? static_cast<long double>(static_cast<double>(bias_(w.channel))) : 0;
      detail::for_each_in_channel(v, w.channel, [&](Index k) {
        const long double xhat = (static_cast<long double>(static_cast<double>(x[k])) - w.mean) * w.invstd;
        out[j++] = static_cast<T>(static_cast<double>(xhat * wt + bs));
      });
    }
    return out;
  }

  [[noreturn]] static void too_few_values(const std::string& fn, const std::vector<Index>& dims) {
    detail::fail(fn, ": expected more than 1 value per channel when training, got x of shape ",
                 detail::shape_str(dims));
  }

  void fill_cache(Cache& cache, const std::vector<Index>& dims, bool batch, const Acc* m, const Acc* rs,
                  double count, std::vector<detail::WideChannel>&& wide) const {
    cache.wide = std::move(wide);
    cache.mean.resize(C_);
    cache.invstd.resize(C_);
    for (Index c = 0; c < C_; ++c) {
      cache.mean(c) = m ? m[c] : Acc(0);
      cache.invstd(c) = rs ? rs[c] : Acc(0);
    }
    cache.batch_stats = batch;
    cache.count = count;
    cache.x_dims = dims;
  }

  /// Local moments to global ones: one sum of (n, n * mean) gives the global mean mu,
  /// a second one sum(M2 + n * (mean - mu)^2), a sum of non-negative terms. Returns the
  /// global count.
  EIGEN_DONT_INLINE double reduce_moments(StatsReducer& red, detail::IndexVector<detail::Moments>& mom) const {
    const Index C = C_;
    detail::IndexVector<double> buf(2 * C);
    for (Index c = 0; c < C; ++c) {
      buf[c] = mom[c].n;
      buf[C + c] = mom[c].n * mom[c].mean;
    }
    red.allreduce_sum(buf.data(), 2 * C);
    const double count = C ? buf[0] : 0;
    detail::IndexVector<double> m2(C);
    for (Index c = 0; c < C; ++c) {
      const double mu = count > 0 ? buf[C + c] / count : 0;
      const double d = mom[c].mean - mu;
      m2[c] = mom[c].n > 0 ? mom[c].m2 + mom[c].n * d * d : 0;
      mom[c].mean = mu;
    }
    red.allreduce_sum(m2.data(), C);
    for (Index c = 0; c < C; ++c) {
      mom[c].m2 = m2[c];
      mom[c].n = count;
    }
    return count;
  }

  EIGEN_DONT_INLINE void update_running(const FinVec& mean, const FinVec& var, double count) {
    ++num_batches_tracked_;
    const Fin f = opt_.momentum() ? *opt_.momentum() : Fin(1) / static_cast<Fin>(num_batches_tracked_);
    const Fin unbias = static_cast<Fin>(count) / (count - 1);
    for (Index c = 0; c < C_; ++c) {
      const Fin rm = static_cast<double>(running_mean_(c)), rv = static_cast<double>(running_var_(c));
      running_mean_(c) = static_cast<T>(static_cast<double>((1 - f) * rm + f * mean[c]));
      running_var_(c) = static_cast<T>(static_cast<double>((1 - f) * rv + f * var[c] * unbias));
    }
  }

  template <class Dev, class X, class DY, class DX>
  void backward_impl(const Dev& dev, const X& x, const DY& dy, const Cache& cache, DX& dx, Grads& grads) const {
    static_assert(detail::traits_of<DX>::writable, "normkit: the output dx must be writable");
    detail::check_same_type<T, X, DY>();
    detail::check_same_type<T, X, DX>();
    const std::string fn = "BatchNorm::backward";
    const auto [dims, axis] = check_x(fn, x);
    detail::check_like(fn, "dy", detail::dims_of(dy), dims);
    detail::check_output(fn, "dx", dx, dims);
    if (cache.empty()) detail::fail(fn, ": cache is empty, expected the cache filled by forward(x, y, cache)");
    if (cache.x_dims != dims)
      detail::fail(fn, ": cache is from x of shape ", detail::shape_str(cache.x_dims), ", but x is ",
                   detail::shape_str(dims));
    if (cache.mean.size() != C_ || cache.invstd.size() != C_)
      detail::fail(fn, ": cache holds statistics of ", cache.mean.size(), " channels, expected ", C_);
    if (detail::partial_overlap(x.data(), dx.data(), x.size()))
      detail::fail(fn, ": dx partially overlaps x (only dx == x or dx == dy is supported)");
    if (detail::partial_overlap(dy.data(), dx.data(), x.size()))
      detail::fail(fn, ": dx partially overlaps dy (only dx == x or dx == dy is supported)");
    detail::fit_output(dx, dims);

    const Index C = C_;
    const bool affine = opt_.affine();
    grads.weight.resize(affine ? C : 0);
    grads.bias.resize(affine ? C : 0);
    const detail::ChannelView v = detail::channel_view(dims, detail::traits_of<X>::row_major, axis);
    StatsReducer* red = opt_.reducer().get();
    const bool batch = cache.batch_stats;
    const bool need_sums = batch || affine;
    if (x.size() == 0 && (!red || !need_sums)) {
      if (affine) {
        grads.weight.setConstant(T(0));
        grads.bias.setConstant(T(0));
      }
      return;
    }

    // A = sum(xh), B = sum(dy), Cc = sum(dy * xh) per channel with xh = (x - m) * rstd, over
    // all processes; for the channels forward sent through long double, the same sums
    // around its long-double mean, from there. With batch statistics A is 0 but for the
    // rounding of the mean, and grad_coefficients takes that out of Cc.
    detail::IndexVector<double> sums(3 * C, 0.0);
    const Acc* m = cache.mean.data();
    detail::IndexVector<const detail::WideChannel*> was_wide(C, nullptr);
    // By channel: wide_sums, the long-double channels' sums as computed (sum(dy) of values
    // near DBL_MAX can exceed double although mean(dy) does not; with a reducer, the
    // double sums are what the processes exchange), and overflowed, the channels found
    // to overflow here. Both are sized on first use, which is rare (filling them with
    // long doubles took 7% of the call at 256x512); groups may run concurrently.
    detail::IndexVector<std::array<long double, 3>> wide_sums;
    detail::IndexVector<detail::WideChannel> overflowed;
    std::once_flag wide_sized;
    auto size_wide = [&] {
      std::call_once(wide_sized, [&] {
        wide_sums.resize(C);
        overflowed.resize(C);
      });
    };
    for (const detail::WideChannel& w : cache.wide) was_wide[w.channel] = &w;
    if (!cache.wide.empty()) size_wide();
    // dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)), k = weight * rstd (batch mode),
    // dx = k * dy (eval), as the map ((x - m) * a + dy) * k + b. Channels whose
    // coefficients leave Acc's range are done in long double.
    AccVec a(C), b(C), k(C), g(C, Acc(1)), zero(C, Acc(0));
    // Without a reducer, channels whose values are rows of their own (NCHW: the row path)
    // go a group at a time, sums then map, so that the map reads x and dy again from the
    // cache the sums left them in rather than from memory (on a pool, the groups in
    // parallel where there are channels enough: for_each_channel_group). Each channel's
    // results are the same as in one group of all.
    auto group = [&](const auto& d, detail::ChannelRange cr, bool concurrent) {
      if (need_sums) {
        std::vector<double> local_work;
        detail::channel_grad_sums<T, Acc>(d, x.data(), dy.data(), m, cache.invstd.data(), v,
                                          concurrent ? local_work : grads.work, sums.data(), cr);
        for (const detail::WideChannel& w : cache.wide) {
          if (!cr.contains(w.channel)) continue;
          const std::array<long double, 3> ws = wide_grad_sums(x.data(), dy.data(), v, w.channel, w.mean, w.invstd);
          sums[w.channel] = static_cast<double>(ws[0]);
          sums[C + w.channel] = static_cast<double>(ws[1]);
          sums[2 * C + w.channel] = static_cast<double>(ws[2]);
          wide_sums[w.channel] = ws;
        }
        // Sums of finite values that overflowed Acc (dy * (x - m) near DBL_MAX): that
        // channel too is done in long double, around the mean forward used.
        const auto finite_sums = [&](Index q) {  // A, B or Cc of every channel of cr
          return detail::all_finite(sums.data() + q * C + cr.begin, cr.size());
        };
        if (!red && !(finite_sums(0) && finite_sums(1) && finite_sums(2))) {
          for (Index c = cr.begin; c < cr.end; ++c) {
            if (was_wide[c] ||
                (std::isfinite(sums[c]) && std::isfinite(sums[C + c]) && std::isfinite(sums[2 * C + c])) ||
                !(std::isfinite(m[c]) && std::isfinite(cache.invstd(c))))  // NaN/Inf statistics: not an overflow
              continue;
            const long double mc = static_cast<long double>(m[c]);
            long double sa = 0;
            bool finite = true;
            detail::for_each_in_channel(v, c, [&](Index i) {
              const double xi = static_cast<double>(x.data()[i]), gi = static_cast<double>(dy.data()[i]);
              finite = finite && std::isfinite(xi) && std::isfinite(gi);
              sa += static_cast<long double>(xi) - mc;
            });
            if (!finite) continue;  // NaN and Inf stay in their channel
            const long double mean = batch && cache.count > 0 ? mc + sa / static_cast<long double>(cache.count) : mc;
            const long double r = static_cast<long double>(cache.invstd(c));
            size_wide();
            overflowed[c] = {c, mean, r};
            was_wide[c] = &overflowed[c];
            wide_sums[c] = wide_grad_sums(x.data(), dy.data(), v, c, mean, r);
          }
        }
        if (red) red->allreduce_sum(sums.data(), 3 * C);  // one group of all channels
      }
      std::vector<WideGrad> wide;
      grad_coefficients(cache, sums.data(), was_wide, wide_sums, red == nullptr, cr, grads, a, b, k, g, wide);
      if (x.size() == 0) return;
      std::vector<T> wide_dx = wide_backward(x.data(), dy.data(), v, wide);
      if (batch)
        detail::channel_map<T, Acc>(d, x.data(), dy.data(), dx.data(), v,
                                    detail::ChannelMap<Acc>{m, a.data(), b.data(), k.data(), g.data()}, cr);
      else  // dx = k * dy: the map with dy in the place of x
        detail::channel_map<T, Acc>(d, dy.data(), nullptr, dx.data(), v,
                                    detail::ChannelMap<Acc>{zero.data(), k.data(), zero.data(), nullptr, nullptr}, cr);
      std::vector<detail::WideChannel> channels;
      channels.reserve(wide.size());
      for (const WideGrad& w : wide) channels.push_back({w.channel, 0, 0});
      detail::scatter_channels(wide_dx.data(), v, channels, dx.data());
    };
    if (!red && v.row_path() && x.size() > 0)
      detail::for_each_channel_group(dev, v, 2 * sizeof(T), group);
    else
      group(dev, detail::all_channels(v), false);
  }

  /// Forward's per-channel map coefficients from the statistics; the channels that
  /// leave Acc's range go to `wide`. Device-independent and never inlined (see
  /// grad_coefficients).
  EIGEN_DONT_INLINE void map_coefficients(bool batch, double count, const FinVec& mean,
                                          const FinVec& var, const FinVec& corr,
                                          const FinVec& r, detail::ChannelRange cr, AccVec& m,
                                          AccVec& a, AccVec& b, AccVec& rs,
                                          std::vector<detail::WideChannel>& wide) const {
    // Every channel's coefficients and is_wide flag in one loop without a branch (it
    // vectorizes: with few values per channel these channel loops are much of an eval
    // forward), then, only where some channel is wide, those channels again, in order.
    const T* const wt = weight_.data();
    const T* const bs = bias_.data();
    auto coefficients = [&](auto affine, Index c, Fin& aw, Fin& bw) {
      const Fin w = affine ? static_cast<Fin>(static_cast<double>(wt[c])) : Fin(1);
      const Fin bb = affine ? static_cast<Fin>(static_cast<double>(bs[c])) : Fin(0);
      aw = r[c] * w;
      bw = bb - corr[c] * aw;
    };
    // The outputs as restrict parameters: with T = Acc, clang cannot tell them from the
    // weight and bias it reads, and left the loop scalar (a tenth of the forward of a
    // ColMajor 128x768 float, 1 thread; GCC checks for overlap at run time).
    auto first_pass = [&](auto affine, Acc* __restrict pa, Acc* __restrict pb, Acc* __restrict prs) {
      unsigned flags = 0;
      for (Index c = cr.begin; c < cr.end; ++c) {
        Fin aw, bw;
        coefficients(affine, c, aw, bw);
        prs[c] = static_cast<Acc>(r[c]);
        pa[c] = static_cast<Acc>(aw);
        pb[c] = static_cast<Acc>(bw);
        flags |= is_wide(batch, count, mean[c], var[c], r[c], aw, bw);
      }
      return flags != 0;
    };
    const bool any = opt_.affine() ? first_pass(std::true_type{}, a.data(), b.data(), rs.data())
                                   : first_pass(std::false_type{}, a.data(), b.data(), rs.data());
    if (!any) return;
    for (Index c = cr.begin; c < cr.end; ++c) {
      Fin aw, bw;
      if (opt_.affine())
        coefficients(std::true_type{}, c, aw, bw);
      else
        coefficients(std::false_type{}, c, aw, bw);
      if (is_wide(batch, count, mean[c], var[c], r[c], aw, bw)) {
        wide.push_back({c, mean[c], r[c]});
        m[c] = a[c] = b[c] = rs[c] = Acc(0);  // the vector pass writes 0; the wide pass the values
      }
    }
  }

  /// A channel of backward in long double: dx = k * (dy - mean_dy - xhat * mean_dy_xhat)
  /// with batch statistics, dx = k * dy without (x and the running mean not read: a
  /// NaN running mean does not reach dx, as in the vector pass).
  struct WideGrad {
    Index channel;
    long double mean, invstd, k, mean_dy, mean_dy_xhat;
    bool batch;
  };

  /// The backward's per-channel coefficients and parameter gradients from the sums, for
  /// the channels of cr. Device-independent and never inlined, like set_shift and map_coefficients: one
  /// copy of this arithmetic (and of the compiler's FMA contractions in it) serves
  /// every device, so the results are the same bits for any thread count.
  ///
  /// With few values per channel this is much of a backward (32x512: a third of it, one
  /// channel at a time), so like map_coefficients it runs as one loop without a branch
  /// over every channel (the compiler vectorizes it), and then, only where some channel
  /// goes through long double, those channels again, in order.
  EIGEN_DONT_INLINE void grad_coefficients(const Cache& cache, const double* sums,
                                           const detail::IndexVector<const detail::WideChannel*>& was_wide,
                                           const detail::IndexVector<std::array<long double, 3>>& wide_sums,
                                           bool exact_wide, detail::ChannelRange cr, Grads& grads,
                                           AccVec& a, AccVec& b, AccVec& k,
                                           AccVec& g, std::vector<WideGrad>& wide) const {
    const Index C = C_;
    const bool batch = cache.batch_stats, with_n = batch && cache.count > 0;
    const Fin n = cache.count;
    const T* const wt = weight_.data();
    T* const gw = grads.weight.data();
    T* const gb = grads.bias.data();
    const Acc* const rs = cache.invstd.data();
    const detail::WideChannel* const* const ww = was_wide.data();
    const auto pass = opt_.affine() ? (with_n ? &coefficient_pass<true, true> : &coefficient_pass<true, false>)
                                    : (with_n ? &coefficient_pass<false, true> : &coefficient_pass<false, false>);
    const bool any = pass(cr, C, n, batch, wt, rs, sums, ww, gw, gb, a.data(), b.data(), k.data(), g.data()) != 0;
    if (!any) return;
    // The channels forward did in long double (their sums exactly as computed, where
    // they were not exchanged) and those whose coefficients leave Acc's range.
    for (Index c = cr.begin; c < cr.end; ++c) {
      const detail::WideChannel* wc = ww[c];
      const Fin r = wc ? static_cast<Fin>(wc->invstd) : static_cast<Fin>(rs[c]);
      const Fin w = opt_.affine() ? static_cast<Fin>(static_cast<double>(wt[c])) : Fin(1);
      const bool exact = wc && exact_wide;
      const Fin A = exact ? static_cast<Fin>(wide_sums[c][0]) : sums[c],
                B = exact ? static_cast<Fin>(wide_sums[c][1]) : sums[C + c],
                Cc = exact ? static_cast<Fin>(wide_sums[c][2]) : sums[2 * C + c];
      const GradCoefficients q = grad_coefficient(with_n, n, w, r, A, B, Cc);
      if (!wc && !out_of_range({q.k, q.a, q.b})) continue;
      if (opt_.affine()) {
        gw[c] = static_cast<T>(static_cast<double>(q.sum_dy_xhat));
        gb[c] = static_cast<T>(static_cast<double>(B));
      }
      // The mean the sums were taken around (forward's, in long double for its wide
      // channels) plus what it missed, so that xhat in dx sums to 0 as in the vector pass.
      const long double mean = (wc ? wc->mean : static_cast<long double>(cache.mean(c))) +
                               (q.corr != 0 ? static_cast<long double>(q.corr) / r : 0);
      wide.push_back({c, mean, r, q.k, with_n ? B / n : 0, with_n ? q.sum_dy_xhat / n : 0, batch});
      a[c] = b[c] = k[c] = Acc(0);  // the vector pass writes 0; the wide pass the values
      g[c] = Acc(1);
    }
  }

  /// One channel's backward coefficients from its sums A = sum(xh), B = sum(dy),
  /// Cc = sum(dy * xh), xh = (x - m) * r: dx = ((x - m) * a + dy) * k + b.
  struct GradCoefficients {
    Fin corr, sum_dy_xhat, k, a, b;
  };
  template <class WithN>
  static GradCoefficients grad_coefficient(WithN with_n, Fin n, Fin w, Fin r, Fin A, Fin B, Fin Cc) {
    // In batch mode m is the rounded batch mean (a long-double channel's too, to long
    // double); corr = A / n is what it misses, times rstd (the sums are of
    // xh = (x - m) * rstd = xhat + corr). Without taking it out, a channel with a large
    // offset (|mean| * rstd = 4e6, long double's mean off by 2^-64 |mean|) gave
    // dweight = 2.6e-12 where sum(dy * xhat) is 0 and dy = -4.
    GradCoefficients q{};
    q.corr = with_n ? A / n : Fin(0);
    q.sum_dy_xhat = Cc - q.corr * B;
    q.k = w * r;
    q.a = with_n ? -r * q.sum_dy_xhat / n : Fin(0);
    q.b = with_n ? q.k * (-B / n + q.sum_dy_xhat / n * q.corr) : Fin(0);  // k (-B / n - a corr / r)
    return q;
  }

  /// grad_coefficients' pass over every channel of cr, without a branch; nonzero where
  /// some channel needs the long-double pass. A function of its own for the restrict
  /// qualifiers: with ten arrays, the vectorizer's run-time alias checks would be too many.
  template <bool Affine, bool HasN>
  static unsigned coefficient_pass(detail::ChannelRange cr, Index C, Fin n, bool batch, const T* wt, const Acc* rs,
                                   const double* sums, const detail::WideChannel* const* ww, T* __restrict gw,
                                   T* __restrict gb, Acc* __restrict a, Acc* __restrict b, Acc* __restrict k,
                                   Acc* __restrict g) {
    unsigned flags = 0;
    for (Index c = cr.begin; c < cr.end; ++c) {
      const Fin w = Affine ? static_cast<Fin>(static_cast<double>(wt[c])) : Fin(1);
      const GradCoefficients q =
          grad_coefficient(std::bool_constant<HasN>{}, n, w, rs[c], sums[c], sums[C + c], sums[2 * C + c]);
      if (Affine) {
        gw[c] = static_cast<T>(static_cast<double>(q.sum_dy_xhat));
        gb[c] = static_cast<T>(static_cast<double>(sums[C + c]));
      }
      // With |k| <= 1, ((x - m) * (a k) + dy * k) * 1 + b: the inner sum cannot overflow
      // where dx does not (dy near the format's maximum), unless a k leaves Acc's range.
      const Fin ak = q.a * q.k;
      const bool fold = (bit(batch) & bit(std::fabs(q.k) <= 1) & (1u - leaves_acc(ak))) != 0;
      const Acc kf = static_cast<Acc>(q.k);
      a[c] = detail::blend(fold, static_cast<Acc>(ak), static_cast<Acc>(q.a));
      b[c] = static_cast<Acc>(q.b);
      k[c] = detail::blend(fold, Acc(1), kf);
      g[c] = detail::blend(fold, kf, Acc(1));
      flags |= bit(ww[c] != nullptr) | leaves_acc(q.k) | leaves_acc(q.a) | leaves_acc(q.b);
    }
    return flags;
  }

  static bool out_of_range(std::initializer_list<Fin> coefficients) {
    unsigned out = 0;
    for (Fin k : coefficients) out |= leaves_acc(k);
    return out != 0;
  }

  /// Sums of channel c in long double around (mean, r): sum(xh), sum(dy), sum(dy * xh)
  /// with xh = (x - mean) * r.
  static std::array<long double, 3> wide_grad_sums(const T* x, const T* dy, const detail::ChannelView& v, Index c,
                                                   long double mean, long double r) {
    long double sa = 0, sb = 0, sc = 0;
    detail::for_each_in_channel(v, c, [&](Index i) {
      const long double gi = static_cast<double>(dy[i]);
      const long double xh = (static_cast<long double>(static_cast<double>(x[i])) - mean) * r;
      sa += xh;
      sb += gi;
      sc += gi * xh;
    });
    return {sa, sb, sc};
  }

  static std::vector<T> wide_backward(const T* x, const T* dy, const detail::ChannelView& v,
                                      const std::vector<WideGrad>& wide) {
    std::vector<T> out(wide.size() * static_cast<std::size_t>(v.count()));
    std::size_t j = 0;
    for (const WideGrad& w : wide)
      detail::for_each_in_channel(v, w.channel, [&](Index i) {
        const long double g = static_cast<double>(dy[i]);
        if (!w.batch) {
          out[j++] = static_cast<T>(static_cast<double>(w.k * g));
          return;
        }
        const long double xhat = (static_cast<long double>(static_cast<double>(x[i])) - w.mean) * w.invstd;
        out[j++] = static_cast<T>(static_cast<double>(w.k * (g - w.mean_dy - xhat * w.mean_dy_xhat)));
      });
    return out;
  }

  Index C_;
  Options opt_;
  bool training_ = true;
  Eigen::Tensor<T, 1> weight_, bias_;               // [C], empty without affine
  Eigen::Tensor<T, 1> running_mean_, running_var_;  // [C], empty without track_running_stats
  std::int64_t num_batches_tracked_ = 0;
  detail::IndexVector<detail::Moments> moments_work_;  // reused scratch of the statistics pass
};

}  // namespace normkit

NORMKIT_CODE_END
