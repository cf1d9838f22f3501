// BM_OneDNN_*: the same layers through oneDNN (Debian libdnnl-dev, 2.6), fp32, with the
// same Args as normkit's rows, so that compare.py pairs them by name. Compiled in only
// when CMake finds oneDNN (cmake/NormkitPeers.cmake).
//
// What a oneDNN user writes: one primitive per layer and direction, created once (its
// creation is not timed), executed on user buffers. oneDNN has no RMSNorm in 2.6; DyT
// forward is a binary_mul (x * alpha) primitive with fused post-ops tanh, * w, + b.
// oneDNN's BatchNorm does not update running statistics (normkit's does: O(C) work).
//
// Debian's libdnnl runs on OpenMP: the thread count is set with omp_set_num_threads
// before the primitive is created (oneDNN sizes its work split at creation).
#include <normkit/normkit.hpp>

#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>
#include <unordered_map>

#include "common.hpp"

namespace {
using nkbench::Index;
using nkbench::RowTensor2;
using dnnl::memory;
using Args = std::unordered_map<int, memory>;
using Flags = dnnl::normalization_flags;
using Tag = memory::format_tag;
constexpr auto f32 = memory::data_type::f32;
constexpr float kEps = 1e-5f;

/// The CPU engine and an in-order stream, one for the whole run.
struct Net {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  dnnl::stream strm{eng};
  memory mem(const memory::desc& md, const void* data) { return memory(md, eng, const_cast<void*>(data)); }
  void run(const dnnl::primitive& p, const Args& args) {
    p.execute(strm, args);
    strm.wait();
  }
};
Net& net() {
  static Net n;
  return n;
}

/// Times `prim` on `args` (after one untimed call) and reports with normkit's byte count.
void time_primitive(benchmark::State& state, const dnnl::primitive& prim, const Args& args,
                    const void* out, double bytes_per_float, Index n, int threads) {
  for (auto _ : state) {
    net().run(prim, args);
    benchmark::DoNotOptimize(out);
    benchmark::ClobberMemory();
  }
  nkbench::report(state, bytes_per_float, n, threads);
}

// ---- LayerNorm: layer_normalization_forward / _backward, [rows, features] row-major.

struct LayerNormSetup {
  Index rows, features;
  int threads;
  normkit::LayerNorm<float> ln;
  RowTensor2 x, y, dy, dx, ref;
  std::vector<float> mean, var, dweight, dbias;
  memory::desc md, stat, wmd;
  explicit LayerNormSetup(const benchmark::State& state)
      : rows(state.range(0)), features(state.range(1)), threads(static_cast<int>(state.range(2))),
        ln(features), x(rows, features), y(rows, features), dy(rows, features), dx(rows, features),
        ref(rows, features), mean(static_cast<std::size_t>(rows)), var(mean.size()),
        dweight(static_cast<std::size_t>(features)), dbias(dweight.size()),
        md({rows, features}, f32, Tag::ab), stat({rows}, f32, Tag::a), wmd({features}, f32, Tag::a) {
    omp_set_num_threads(threads);
    x.setRandom();
    dy.setRandom();
    ln.weight().setRandom();
    ln.bias().setRandom();
  }
  dnnl::layer_normalization_forward::primitive_desc forward_pd() const {
    return {{dnnl::prop_kind::forward_training, md, stat, kEps, Flags::use_scale | Flags::use_shift},
            net().eng};
  }
  Args forward_args() {
    return {{DNNL_ARG_SRC, net().mem(md, x.data())},           {DNNL_ARG_DST, net().mem(md, y.data())},
            {DNNL_ARG_MEAN, net().mem(stat, mean.data())},     {DNNL_ARG_VARIANCE, net().mem(stat, var.data())},
            {DNNL_ARG_SCALE, net().mem(wmd, ln.weight().data())}, {DNNL_ARG_SHIFT, net().mem(wmd, ln.bias().data())}};
  }
};

void BM_OneDNN_LayerNorm_Forward(benchmark::State& state) {
  LayerNormSetup s(state);
  s.ln.forward(s.x, s.ref);
  dnnl::layer_normalization_forward prim(s.forward_pd());
  const Args args = s.forward_args();
  net().run(prim, args);
  if (!nkbench::check_peer(state, "oneDNN LayerNorm forward y", s.y.data(), s.ref.data(), s.y.size())) return;
  time_primitive(state, prim, args, s.y.data(), 8, s.x.size(), s.threads);
}

void BM_OneDNN_LayerNorm_Backward(benchmark::State& state) {
  LayerNormSetup s(state);
  normkit::LayerNorm<float>::Cache cache;
  normkit::LayerNorm<float>::Grads grads;
  s.ln.forward(s.x, s.y, cache);
  s.ln.backward(s.x, s.dy, cache, s.ref, grads);
  const auto fpd = s.forward_pd();
  net().run(dnnl::layer_normalization_forward(fpd), s.forward_args());  // mean, var
  dnnl::layer_normalization_backward prim(
      {{dnnl::prop_kind::backward, s.md, s.md, s.stat, kEps, Flags::use_scale | Flags::use_shift}, net().eng, fpd});
  const Args args = {{DNNL_ARG_SRC, net().mem(s.md, s.x.data())},
                     {DNNL_ARG_DIFF_DST, net().mem(s.md, s.dy.data())},
                     {DNNL_ARG_MEAN, net().mem(s.stat, s.mean.data())},
                     {DNNL_ARG_VARIANCE, net().mem(s.stat, s.var.data())},
                     {DNNL_ARG_SCALE, net().mem(s.wmd, s.ln.weight().data())},
                     {DNNL_ARG_SHIFT, net().mem(s.wmd, s.ln.bias().data())},
                     {DNNL_ARG_DIFF_SRC, net().mem(s.md, s.dx.data())},
                     {DNNL_ARG_DIFF_SCALE, net().mem(s.wmd, s.dweight.data())},
                     {DNNL_ARG_DIFF_SHIFT, net().mem(s.wmd, s.dbias.data())}};
  net().run(prim, args);
  if (!nkbench::check_peer(state, "oneDNN LayerNorm backward dx", s.dx.data(), s.ref.data(), s.dx.size()) ||
      !nkbench::check_peer(state, "oneDNN LayerNorm backward dweight", s.dweight.data(), grads.weight.data(),
                           s.features, nkbench::kReductionTol) ||
      !nkbench::check_peer(state, "oneDNN LayerNorm backward dbias", s.dbias.data(), grads.bias.data(), s.features, nkbench::kReductionTol))
    return;
  time_primitive(state, prim, args, s.dx.data(), 12, s.x.size(), s.threads);
}

// ---- DyT forward: binary_mul(x, alpha) with post-ops tanh, binary_mul w, binary_add b.

void BM_OneDNN_DyT_Forward(benchmark::State& state) {
  const Index rows = state.range(0), features = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  omp_set_num_threads(threads);
  RowTensor2 x(rows, features), y(rows, features), ref(rows, features);
  Eigen::Tensor<float, 1> w(features), b(features);
  x.setRandom();
  w.setRandom();
  b.setRandom();
  const float alpha = 0.7f;
  normkit::DyT<float> dyt(features);
  dyt.alpha() = alpha;
  dyt.weight() = w;
  dyt.bias() = b;
  dyt.forward(x, ref);
  // A binary_mul by the broadcast alpha carries the post-ops: eltwise_linear with post-ops
  // runs on oneDNN's reference (scalar) path in 2.6, the binary one on its jit path.
  const memory::desc md({rows, features}, f32, Tag::ab), amd({1, 1}, f32, Tag::ab), wmd({1, features}, f32, Tag::ab);
  dnnl::post_ops ops;
  ops.append_eltwise(1.f, dnnl::algorithm::eltwise_tanh, 0.f, 0.f);
  ops.append_binary(dnnl::algorithm::binary_mul, wmd);
  ops.append_binary(dnnl::algorithm::binary_add, wmd);
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  dnnl::binary prim({{dnnl::algorithm::binary_mul, md, amd, md}, attr, net().eng});
  float alpha_buf = alpha;
  const Args args = {{DNNL_ARG_SRC_0, net().mem(md, x.data())},
                     {DNNL_ARG_SRC_1, net().mem(amd, &alpha_buf)},
                     {DNNL_ARG_DST, net().mem(md, y.data())},
                     {DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1, net().mem(wmd, w.data())},
                     {DNNL_ARG_ATTR_MULTIPLE_POST_OP(2) | DNNL_ARG_SRC_1, net().mem(wmd, b.data())}};
  net().run(prim, args);
  if (!nkbench::check_peer(state, "oneDNN DyT forward y", y.data(), ref.data(), y.size())) return;
  time_primitive(state, prim, args, y.data(), 8, x.size(), threads);
}

// ---- BatchNorm: batch_normalization_forward / _backward; the shapes of bench_batch_norm.cpp.

/// One BatchNorm case: x, y, dy, dx as flat buffers viewed by normkit as rank 4 (N x C
/// as [N, C, 1, 1], the same numbers as the rank-2 case) and by oneDNN with its tag.
struct BatchNormSetup {
  int threads;
  const nkbench::BatchNormShape& shape;
  std::array<Index, 4> dims;  // normkit's logical dims (RowMajor)
  Index channels, n;
  normkit::BatchNorm<float> bn;
  nkbench::PageBuffer x, y, dy, dx, ref;
  std::vector<float> mean, var, dweight, dbias;
  memory::desc md, cmd;
  using Map = Eigen::TensorMap<Eigen::Tensor<float, 4, Eigen::RowMajor>>;

  explicit BatchNormSetup(benchmark::State& state)
      : threads(static_cast<int>(state.range(1))),
        shape(nkbench::batch_norm_shape(state)),
        dims(shape.dims),
        channels(shape.channels()),
        n(shape.size()),
        bn(channels, normkit::BatchNormOptions().channel_axis(shape.channels_last ? -1 : 1)),
        x(static_cast<std::size_t>(n)), y(x.size()), dy(x.size()), dx(x.size()), ref(x.size()),
        mean(static_cast<std::size_t>(channels)), var(mean.size()), dweight(mean.size()), dbias(mean.size()),
        cmd({channels}, f32, Tag::a) {
    omp_set_num_threads(threads);
    md = shape.rank2() ? memory::desc({dims[0], dims[1]}, f32, Tag::ab)
         : shape.channels_last ? memory::desc({dims[0], channels, dims[1], dims[2]}, f32, Tag::nhwc)
                               : memory::desc({dims[0], channels, dims[2], dims[3]}, f32, Tag::nchw);
    map(x).setRandom();
    map(dy).setRandom();
    bn.weight().setRandom();
    bn.bias().setRandom();
  }
  Map map(const nkbench::PageBuffer& v) const { return Map(v.data(), dims); }
  dnnl::batch_normalization_forward::primitive_desc forward_pd(dnnl::prop_kind kind, Flags extra = Flags::none) const {
    return {{kind, md, kEps, Flags::use_scale | Flags::use_shift | extra}, net().eng};
  }
  Args forward_args(const float* m, const float* v) {
    return {{DNNL_ARG_SRC, net().mem(md, x.data())},          {DNNL_ARG_DST, net().mem(md, y.data())},
            {DNNL_ARG_MEAN, net().mem(cmd, m)},               {DNNL_ARG_VARIANCE, net().mem(cmd, v)},
            {DNNL_ARG_SCALE, net().mem(cmd, bn.weight().data())}, {DNNL_ARG_SHIFT, net().mem(cmd, bn.bias().data())}};
  }
};

void BM_OneDNN_BatchNorm_TrainForward(benchmark::State& state) {
  BatchNormSetup s(state);
  normkit::BatchNorm<float>::Cache cache;
  s.bn.forward(s.map(s.x), s.map(s.ref), cache);
  dnnl::batch_normalization_forward prim(s.forward_pd(dnnl::prop_kind::forward_training));
  const Args args = s.forward_args(s.mean.data(), s.var.data());
  net().run(prim, args);
  if (!nkbench::check_peer(state, "oneDNN BatchNorm train forward y", s.y.data(), s.ref.data(), s.n)) return;
  time_primitive(state, prim, args, s.y.data(), 8, s.n, s.threads);
}

void BM_OneDNN_BatchNorm_TrainBackward(benchmark::State& state) {
  BatchNormSetup s(state);
  normkit::BatchNorm<float>::Cache cache;
  normkit::BatchNorm<float>::Grads grads;
  s.bn.forward(s.map(s.x), s.map(s.y), cache);
  s.bn.backward(s.map(s.x), s.map(s.dy), cache, s.map(s.ref), grads);
  const auto fpd = s.forward_pd(dnnl::prop_kind::forward_training);
  net().run(dnnl::batch_normalization_forward(fpd), s.forward_args(s.mean.data(), s.var.data()));
  dnnl::batch_normalization_backward prim(
      {{dnnl::prop_kind::backward, s.md, s.md, kEps, Flags::use_scale | Flags::use_shift}, net().eng, fpd});
  const Args args = {{DNNL_ARG_SRC, net().mem(s.md, s.x.data())},
                     {DNNL_ARG_DIFF_DST, net().mem(s.md, s.dy.data())},
                     {DNNL_ARG_MEAN, net().mem(s.cmd, s.mean.data())},
                     {DNNL_ARG_VARIANCE, net().mem(s.cmd, s.var.data())},
                     {DNNL_ARG_SCALE, net().mem(s.cmd, s.bn.weight().data())},
                     {DNNL_ARG_SHIFT, net().mem(s.cmd, s.bn.bias().data())},
                     {DNNL_ARG_DIFF_SRC, net().mem(s.md, s.dx.data())},
                     {DNNL_ARG_DIFF_SCALE, net().mem(s.cmd, s.dweight.data())},
                     {DNNL_ARG_DIFF_SHIFT, net().mem(s.cmd, s.dbias.data())}};
  net().run(prim, args);
  if (!nkbench::check_peer(state, "oneDNN BatchNorm backward dx", s.dx.data(), s.ref.data(), s.n) ||
      !nkbench::check_peer(state, "oneDNN BatchNorm backward dweight", s.dweight.data(), grads.weight.data(),
                           s.channels, nkbench::kReductionTol) ||
      !nkbench::check_peer(state, "oneDNN BatchNorm backward dbias", s.dbias.data(), grads.bias.data(), s.channels, nkbench::kReductionTol))
    return;
  time_primitive(state, prim, args, s.dx.data(), 12, s.n, s.threads);
}

void BM_OneDNN_BatchNorm_EvalForward(benchmark::State& state) {
  BatchNormSetup s(state);
  s.bn.running_mean().setRandom();
  s.bn.running_var() = s.bn.running_var().random().abs() + 0.5f;
  s.bn.eval();
  s.bn.forward(s.map(s.x), s.map(s.ref));
  dnnl::batch_normalization_forward prim(s.forward_pd(dnnl::prop_kind::forward_inference, Flags::use_global_stats));
  const Args args = s.forward_args(s.bn.running_mean().data(), s.bn.running_var().data());
  net().run(prim, args);
  if (!nkbench::check_peer(state, "oneDNN BatchNorm eval forward y", s.y.data(), s.ref.data(), s.n)) return;
  time_primitive(state, prim, args, s.y.data(), 8, s.n, s.threads);
}

BENCHMARK(BM_OneDNN_LayerNorm_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_OneDNN_LayerNorm_Backward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_OneDNN_DyT_Forward)->Apply(nkbench::row_shapes);
BENCHMARK(BM_OneDNN_BatchNorm_TrainForward)->Apply(nkbench::batch_norm_shapes);
BENCHMARK(BM_OneDNN_BatchNorm_TrainBackward)->Apply(nkbench::batch_norm_shapes);
BENCHMARK(BM_OneDNN_BatchNorm_EvalForward)->Apply(nkbench::batch_norm_shapes);

}  // namespace
