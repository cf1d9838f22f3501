// Fuzz target for all four layers (libFuzzer with clang -fsanitize=fuzzer,address,undefined;
// or, built with NORMKIT_FUZZ_REPLAY, a plain program that replays a corpus and a batch of
// pseudo-random inputs, so that the decoder and the checks run in every ctest).
//
// The bytes decode into: layer, scalar type, rank, layout, dims, the normalized dims /
// channel axis, options (eps, affine, bias, momentum, running stats, train/eval, alpha),
// a thread count, an injected misuse (or none), and the values of x, dy and the
// parameters in one of several modes (plain, NaN/Inf/subnormal/huge/tiny mixtures,
// large offset with a tiny spread, constant, raw bit patterns).
//
// Checks, any failure aborts (a crash to libFuzzer, a failed test to ctest):
//   - normkit::Error exactly when the decoder's own model of the rules says the call is
//     invalid, and then nothing written: outputs, cache, grads and layer state
//     (parameters, running statistics, num_batches_tracked) bitwise unchanged;
//   - otherwise y, dx and every parameter gradient (and BatchNorm's running statistics)
//     within 64 unit roundoffs of the magnitude of their terms (plus 64 subnormal
//     spacings, times what dx multiplies them by) of the long-double reference
//     (tests/fuzz/reference_layers.hpp), wherever that reference is finite in the
//     storage type and its terms are finite in the accumulation type;
//   - the same bits on the decoded thread count as on one thread.
// Sanitizers add: no out-of-bounds access, no use of uninitialized or freed memory, no UB.
//
// This file decodes the configuration; fuzz_case.hpp runs and checks the case, one
// translation unit per scalar type (fuzz_float.cpp ...).
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "fuzz_case.hpp"

using namespace nkfuzz;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in(data, size);
  Config c;
  c.kind = static_cast<LayerKind>(in.u8() % 4);
  const int type = in.u8() % 4;
  c.rank = 1 + in.u8() % 3;
  c.row_major = in.u8() % 2;
  for (int i = 0; i < c.rank; ++i) {
    const std::uint8_t b = in.u8();
    c.dims.push_back(b % 29 == 28 ? 0 : 1 + b % 12);  // 0 now and then; sizes 1..12 (SIMD tails)
  }
  c.k = 1 + in.u8() % c.rank;
  c.axis = static_cast<int>(in.u8() % (2 * c.rank + 2)) - c.rank - 1;  // one out of range at each end
  static const double kEps[] = {1e-5, 1e-12, 1.0, 1e3, 1.401298464324817e-45, 4.9406564584124654e-324, 0.0, -1e-5,
                                std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                                1.1754943508222875e-38 /* FLT_MIN */, 2.2250738585072014e-308 /* DBL_MIN */};
  c.eps = kEps[in.u8() % 12];
  const std::uint8_t flags = in.u8();
  c.affine = flags & 1;
  c.bias = flags & 2;
  c.track = flags & 4;
  c.training = flags & 8;
  static const double kMomentum[] = {0.1, 0.0, 1.0, -1.0 /* nullopt */, 1.5, -0.1, 0.5};
  const double m = kMomentum[in.u8() % 7];
  c.momentum = m == -1.0 ? std::nullopt : std::optional<double>(m);
  static const double kAlpha[] = {0.5, 1e-3, 10.0, 0.0, -2.0, 1e4};
  c.alpha = kAlpha[in.u8() % 6];
  static const int kThreads[] = {1, 2, 3, 7};
  c.threads = kThreads[in.u8() % 4];
  const std::uint8_t mis = in.u8();
  c.misuse = mis % 4 ? Misuse::None : static_cast<Misuse>(1 + (mis / 4) % 5);
  static const char* const kTypes[] = {"float", "double", "half", "bfloat16"};
  g_context = std::string(kLayerNames[int(c.kind)]) + "<" + kTypes[type] + "> " + (c.row_major ? "RowMajor" : "ColMajor") +
              " dims " + normkit::detail::shape_str(c.dims) + " k " + std::to_string(c.k) + " axis " + std::to_string(c.axis) +
              " eps " + std::to_string(c.eps) + " affine " + std::to_string(c.affine) + " bias " + std::to_string(c.bias) +
              " momentum " + (c.momentum ? std::to_string(*c.momentum) : "none") + " track " + std::to_string(c.track) +
              " training " + std::to_string(c.training) + " alpha " + std::to_string(c.alpha) + " threads " +
              std::to_string(c.threads) + " misuse " + std::to_string(int(c.misuse));
  switch (type) {
    case 0: dispatch_rank<float>(c, in); break;
    case 1: dispatch_rank<double>(c, in); break;
    case 2: dispatch_rank<Eigen::half>(c, in); break;
    default: dispatch_rank<Eigen::bfloat16>(c, in); break;
  }
  return 0;
}

#ifdef NORMKIT_FUZZ_REPLAY
// Plain replay: every file named on the command line (or in a directory named there),
// then `--random N` pseudo-random inputs of 16..400 bytes (`--seed S` before it picks
// another sequence than the default 12345, to explore beyond what CTest replays).
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>

namespace {

int replay(int argc, char** argv) {
  std::size_t files = 0, randoms = 0;
  auto run_file = [&](const std::filesystem::path& p) {
    g_input_name = p.string();
    std::ifstream f(p, std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + p.string());
    const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    ++files;
  };
  std::uint32_t seed = 12345;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seed" && i + 1 < argc) {
      seed = static_cast<std::uint32_t>(std::stoul(argv[++i]));
    } else if (a == "--random" && i + 1 < argc) {
      const long count = std::atol(argv[++i]);
      std::mt19937 gen(seed);
      for (long r = 0; r < count; ++r) {
        std::vector<std::uint8_t> bytes(16 + gen() % 385);
        for (auto& b : bytes) b = static_cast<std::uint8_t>(gen());
        g_input_name = "--random input " + std::to_string(r) + " (seed " + std::to_string(seed) + ")";
        LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
        ++randoms;
      }
    } else if (std::filesystem::is_directory(a)) {
      for (const auto& e : std::filesystem::directory_iterator(a))
        if (e.is_regular_file()) run_file(e.path());
    } else {
      run_file(a);
    }
  }
  std::printf("normkit fuzz replay: %zu corpus files, %zu random inputs, all checks passed\n", files, randoms);
  return 0;
}

}  // namespace

// A missing corpus or a failed allocation is a failed replay with its reason, not a
// std::terminate (the checks themselves abort with their own message).
int main(int argc, char** argv) {
  try {
    return replay(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "normkit fuzz replay: %s (input: %s)\n", e.what(), g_input_name.c_str());
    return 1;
  }
}
#endif
