// Tensor and device traits, and the canonical strided view every kernel works on.
//
// A layer sees a tensor of any rank and either layout as a 3-D block in memory order
//   [outer, mid, inner]   (strides mid*inner, inner, 1)
// where `mid` is the flattened run of logical dims the layer cares about (the
// normalized dims of LayerNorm, the channel axis of BatchNorm and DyT). RowMajor puts
// the leading logical dims in `outer`; ColMajor, whose memory order is the reverse of
// the logical one, puts them in `inner`.
#pragma once

#include <array>
#include <string>
#include <type_traits>
#include <vector>

#define EIGEN_USE_THREADS
#include <unsupported/Eigen/CXX11/Tensor>

#include "config.hpp"
#include "error.hpp"

NORMKIT_CODE_BEGIN

namespace normkit {
namespace detail {

template <class T>
struct tensor_traits {
  static constexpr bool value = false;
};

/// What the layers accept: Eigen::Tensor, Eigen::TensorFixedSize, and TensorMaps of
/// either (const for inputs); dense storage, any layout.
template <class S, std::ptrdiff_t R, int Opt, bool Writable, bool Resizable = false>
struct dense_traits {
  static constexpr bool value = true;
  using scalar = std::remove_const_t<S>;
  static constexpr int rank = static_cast<int>(R);
  static constexpr bool row_major = (Opt & Eigen::RowMajor) != 0;
  static constexpr bool writable = Writable && !std::is_const_v<S>;
  /// An owning Eigen::Tensor, which an output of no elements may be resized into.
  static constexpr bool resizable = Resizable;
};

template <class S, int R, int Opt, class I>
struct tensor_traits<Eigen::Tensor<S, R, Opt, I>> : dense_traits<S, R, Opt, true, true> {};

template <class S, class Dims, int Opt, class I>
struct tensor_traits<Eigen::TensorFixedSize<S, Dims, Opt, I>> : dense_traits<S, Dims::count, Opt, true> {};

template <class S, int R, int Opt, class I, int MapOpt, template <class> class MP>
struct tensor_traits<Eigen::TensorMap<Eigen::Tensor<S, R, Opt, I>, MapOpt, MP>>
    : dense_traits<S, R, Opt, true> {};

template <class S, int R, int Opt, class I, int MapOpt, template <class> class MP>
struct tensor_traits<Eigen::TensorMap<const Eigen::Tensor<S, R, Opt, I>, MapOpt, MP>>
    : dense_traits<S, R, Opt, false> {};

template <class S, class Dims, int Opt, class I, int MapOpt, template <class> class MP>
struct tensor_traits<Eigen::TensorMap<Eigen::TensorFixedSize<S, Dims, Opt, I>, MapOpt, MP>>
    : dense_traits<S, Dims::count, Opt, true> {};

template <class S, class Dims, int Opt, class I, int MapOpt, template <class> class MP>
struct tensor_traits<Eigen::TensorMap<const Eigen::TensorFixedSize<S, Dims, Opt, I>, MapOpt, MP>>
    : dense_traits<S, Dims::count, Opt, false> {};

template <class X>
using traits_of = tensor_traits<std::remove_cv_t<std::remove_reference_t<X>>>;

template <class X>
inline constexpr bool is_tensor_v = traits_of<X>::value;

/// An Eigen tensor expression that is not one of the dense tensors above: x.reshape(d),
/// x.slice(o, e), x.shuffle(p), x * 2.f, x.cast<Eigen::half>(), ... A layer's inputs
/// (x, dy) may be one; dense() evaluates it first.
template <class X, class = void>
struct is_expression : std::false_type {};
template <class X>
struct is_expression<X, std::enable_if_t<std::is_base_of_v<Eigen::TensorBase<X, Eigen::ReadOnlyAccessors>, X>>>
    : std::bool_constant<!tensor_traits<X>::value> {};
template <class X>
inline constexpr bool is_expression_v = is_expression<std::remove_cv_t<std::remove_reference_t<X>>>::value;

/// What a layer reads: a dense tensor or a tensor expression.
template <class X>
inline constexpr bool is_input_v = is_tensor_v<X> || is_expression_v<X>;

/// x itself where it is a dense tensor; an expression evaluated (on dev) into a new
/// Eigen::Tensor of its scalar, rank and layout, the copy the call then reads.
/// bfloat16 expressions are evaluated on one thread, a value at a time, where GCC has
/// bug 105593 (see config.hpp): Eigen's executors run them in their own functions, beyond
/// normkit's warning pragmas, and its AVX-512 bfloat16 packets give that bug's warnings
/// there (as they do in a user's own `t.device(pool) = x + x`).
template <class X, class Dev = Eigen::DefaultDevice>
decltype(auto) dense(const X& x, const Dev& dev = Dev()) {
  if constexpr (is_tensor_v<X>) {
    (void)dev;
    return (x);
  } else {
    using Tr = Eigen::internal::traits<X>;
    using S = std::remove_const_t<typename Tr::Scalar>;
    using I = typename Tr::Index;
    // The evaluator's dims: DSizes, or Sizes<...> for an expression of a fixed-size tensor.
    Eigen::TensorEvaluator<const X, Eigen::DefaultDevice> ev(x, Eigen::DefaultDevice());
    const auto& d = ev.dimensions();
    Eigen::array<I, static_cast<std::size_t>(Tr::NumDimensions)> dims;
    for (std::size_t i = 0; i < dims.size(); ++i) dims[i] = static_cast<I>(d[i]);
    Eigen::Tensor<S, Tr::NumDimensions, Tr::Layout, I> t(dims);
#ifdef NORMKIT_GCC_PR105593_
    constexpr bool one_thread = std::is_same_v<S, Eigen::bfloat16>;
#else
    constexpr bool one_thread = false;
#endif
    if constexpr (one_thread) {
      (void)dev;
      // Coefficient by coefficient (Eigen's scalar path), in normkit's code: no packets.
      ev.evalSubExprsIfNeeded(nullptr);
      for (I i = 0; i < t.size(); ++i) t.data()[i] = ev.coeff(i);
      ev.cleanup();
    } else if constexpr (std::is_same_v<Dev, Eigen::ThreadPoolDevice>) {
      // From one of the pool's own threads, on that thread (as parallel_for does):
      // Eigen's executor would wait there for tasks of the same pool.
      if (dev.currentThreadId() != -1)
        t.device(Eigen::DefaultDevice()) = x;
      else
        t.device(dev) = x;
    } else {
      t.device(dev) = x;
    }
    return t;
  }
}

template <class D>
inline constexpr bool is_device_v =
    std::is_same_v<std::remove_cv_t<std::remove_reference_t<D>>, Eigen::DefaultDevice> ||
    std::is_same_v<std::remove_cv_t<std::remove_reference_t<D>>, Eigen::ThreadPoolDevice>;

/// Whether the tensor arguments of a call are inputs (dense tensors or expressions) but
/// the last, its output, which is dense.
template <class... A>
constexpr bool inputs_then_output() {
  constexpr bool input[] = {is_input_v<A>...}, tensor[] = {is_tensor_v<A>...};
  constexpr std::size_t n = sizeof...(A);
  for (std::size_t i = 0; i + 1 < n; ++i)
    if (!input[i]) return false;
  return tensor[n - 1];
}

template <class... X>
using enable_if_tensors_t = std::enable_if_t<inputs_then_output<X...>(), int>;

template <class D, class... X>
using enable_if_device_tensors_t = std::enable_if_t<is_device_v<D> && inputs_then_output<X...>(), int>;

template <class X>
std::vector<Index> dims_of(const X& x) {
  std::vector<Index> d;
  d.reserve(traits_of<X>::rank);
  for (std::size_t i = 0; i < std::size_t{traits_of<X>::rank}; ++i) d.push_back(x.dimension(i));
  return d;
}

/// Whether output `y` is to be resized to x's shape `dims`: an owning Eigen::Tensor with
/// no elements (default-constructed, say) of another shape, as PyTorch resizes an empty
/// `out=` tensor. Maps, fixed-size tensors and tensors with elements keep their shape,
/// and one that differs from x's is an error.
template <class Y>
bool output_to_resize(const Y& y, const std::vector<Index>& dims) {
  if constexpr (traits_of<Y>::resizable) {
    return y.size() == 0 && dims_of(y) != dims;
  } else {
    (void)y;
    (void)dims;
    return false;
  }
}

/// Checks an output (y, dx) against x's shape `dims`; one that output_to_resize accepts
/// passes, to be resized by fit_output once every check of the call has passed.
template <class Y>
void check_output(const std::string& fn, const char* arg, const Y& y, const std::vector<Index>& dims) {
  if (!output_to_resize(y, dims)) check_like(fn, arg, dims_of(y), dims);
}

/// Resizes an output that check_output let through to x's shape; a no-op on any other.
/// Called after the last check that may throw, so that a refused call leaves it as it came.
template <class Y>
void fit_output(Y& y, const std::vector<Index>& dims) {
  if constexpr (traits_of<Y>::resizable) {
    if (!output_to_resize(y, dims)) return;
    using I = typename Y::Index;
    Eigen::array<I, static_cast<std::size_t>(traits_of<Y>::rank)> d;
    for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<I>(dims[i]);
    y.resize(d);
  } else {
    (void)y;
    (void)dims;
  }
}

/// A std::vector subscripted by the library's signed Index: the per-channel (per-row,
/// per-position) arrays the kernels index with channel numbers, without a cast at each
/// subscript (and warning-free under -Wsign-conversion).
template <class T>
class IndexVector : public std::vector<T> {
 public:
  IndexVector() = default;
  explicit IndexVector(Index n) : std::vector<T>(static_cast<std::size_t>(n)) {}
  IndexVector(Index n, const T& value) : std::vector<T>(static_cast<std::size_t>(n), value) {}
  T& operator[](Index i) { return std::vector<T>::operator[](static_cast<std::size_t>(i)); }
  const T& operator[](Index i) const { return std::vector<T>::operator[](static_cast<std::size_t>(i)); }
  void resize(Index n) { std::vector<T>::resize(static_cast<std::size_t>(n)); }
};

inline Index product(const std::vector<Index>& d, std::size_t first, std::size_t last) {
  Index p = 1;
  for (std::size_t i = first; i < last; ++i) p *= d[i];
  return p;
}

/// [outer, mid, inner] in memory order, for the logical dims [first, last) as `mid`.
struct Block3 {
  Index outer = 1, mid = 1, inner = 1;
  Index size() const { return outer * mid * inner; }
};

inline Block3 block3(const std::vector<Index>& dims, bool row_major, std::size_t first,
                     std::size_t last) {
  Block3 b;
  b.mid = product(dims, first, last);
  const Index before = product(dims, 0, first), after = product(dims, last, dims.size());
  b.outer = row_major ? before : after;
  b.inner = row_major ? after : before;
  return b;
}

/// Parameters are indexed by the logical (row-major) flattening of the `mid` dims, as
/// in PyTorch. A ColMajor tensor stores several `mid` dims in column-major order; this
/// gives, for each memory position inside `mid`, the parameter index. Empty when the
/// two orders agree (RowMajor, or a single `mid` dim).
inline IndexVector<Index> mid_permutation(const std::vector<Index>& dims, bool row_major, std::size_t first,
                                          std::size_t last) {
  IndexVector<Index> perm;
  if (row_major || last - first < 2) return perm;
  const Index n = product(dims, first, last);
  perm.resize(n);
  std::vector<Index> idx(last - first, 0);
  for (Index m = 0; m < n; ++m) {  // m walks memory (column-major) order
    Index logical = 0;
    for (std::size_t k = 0; k < idx.size(); ++k) logical = logical * dims[first + k] + idx[k];
    perm[m] = logical;
    for (std::size_t k = 0; k < idx.size(); ++k) {
      if (++idx[k] < dims[first + k]) break;
      idx[k] = 0;
    }
  }
  return perm;
}

/// Pointer to the first element, writable or not as the tensor allows.
template <class X>
auto data_of(X& x) {
  return x.data();
}

/// True when [a, a+n) and [b, b+n) overlap without being the same range: exact aliasing
/// is a supported in-place call, a shifted overlap is not.
template <class A, class B>
bool partial_overlap(const A* a, const B* b, Index n) {
  const auto pa = reinterpret_cast<std::uintptr_t>(a);
  const auto pb = reinterpret_cast<std::uintptr_t>(b);
  if (pa == pb || n == 0) return false;
  const auto bytes_a = static_cast<std::uintptr_t>(n) * sizeof(A);
  const auto bytes_b = static_cast<std::uintptr_t>(n) * sizeof(B);
  return pa < pb + bytes_b && pb < pa + bytes_a;
}

/// The scalar types every layer takes.
template <class T>
inline constexpr bool is_layer_scalar_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                          std::is_same_v<T, Eigen::half> || std::is_same_v<T, Eigen::bfloat16>;

/// Compile-time checks of a call's tensors against a layer of scalar T: the same scalar,
/// rank and layout for the input X and the tensor Y that goes with it.
template <class T, class X, class Y>
constexpr void check_same_type() {
  static_assert(std::is_same_v<typename traits_of<X>::scalar, T>, "normkit: tensor scalar type differs from the layer's");
  static_assert(std::is_same_v<typename traits_of<Y>::scalar, T>, "normkit: tensor scalar type differs from the layer's");
  static_assert(traits_of<X>::rank == traits_of<Y>::rank, "normkit: input and output tensors differ in rank");
  static_assert(traits_of<X>::row_major == traits_of<Y>::row_major,
                "normkit: input and output tensors differ in layout (RowMajor/ColMajor)");
}

}  // namespace detail
}  // namespace normkit

NORMKIT_CODE_END
