// normkit::Error and the helpers that build its messages.
//
// Every public entry point validates its arguments before it writes anything and
// throws normkit::Error with a message naming the function, the argument, what was
// expected and what came, e.g.
//   LayerNorm::forward: x has 512 features, expected 768 (x is [8, 512])
#pragma once

#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace normkit {

/// Sizes and indices, as Eigen::Index.
using Index = std::ptrdiff_t;

/// Thrown on misuse (bad shapes, bad options). Derives from std::invalid_argument so
/// callers that already catch that keep working.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

/// "[8, 512]"
inline std::string shape_str(const std::vector<Index>& dims) {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << parts);
  throw Error(os.str());
}

/// An argument that must have x's shape (y, dy, dx of every layer):
/// "LayerNorm::forward: y is [3, 768], expected [4, 768] (the shape of x)".
inline void check_like(const std::string& fn, const char* arg, const std::vector<Index>& got,
                       const std::vector<Index>& want) {
  if (got != want)
    fail(fn, ": ", arg, " is ", shape_str(got), ", expected ", shape_str(want), " (the shape of x)");
}

}  // namespace detail
}  // namespace normkit
