// Exceptions thrown by kvattn, and the overflow-checked size arithmetic used at every API boundary.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvattn {

/// Base of every exception kvattn throws. Catch this to catch them all.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A head layout, layer-sharing map, model or layout policy that cannot be built.
class config_error : public error {
 public:
  using error::error;
};

/// A tensor, weight or batch whose sizes do not match the configuration.
class shape_error : public error {
 public:
  using error::error;
};

/// A sequence id that the cache does not hold (or already holds, when adding).
class sequence_error : public error {
 public:
  using error::error;
};

/// A sequence that would grow past its layout's per-sequence capacity.
class capacity_error : public error {
 public:
  using error::error;
};

/// The block pool (or the byte source behind it) cannot supply the blocks a call needs.
class pool_exhausted : public error {
 public:
  using error::error;
};

/// A size computation that does not fit in 64 bits.
class overflow_error : public error {
 public:
  using error::error;
};

namespace detail {

/// Builds an exception message from streamable parts: message("bad head dim ", d).
template <class... Parts>
std::string message(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

template <class Error, class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw Error(message(std::forward<Parts>(parts)...));
}

}  // namespace detail

/// a * b, throwing overflow_error (naming `what`) when the product leaves int64 or an operand is negative.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* what = "size") {
  std::int64_t r = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r))
    detail::fail<overflow_error>(what, " overflows 64 bits: ", a, " x ", b);
  return r;
}

/// a + b with the same checks as checked_mul.
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* what = "size") {
  std::int64_t r = 0;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r))
    detail::fail<overflow_error>(what, " overflows 64 bits: ", a, " + ", b);
  return r;
}

/// Product of any number of non-negative sizes, overflow-checked.
template <class... Ints>
std::int64_t checked_product(const char* what, std::int64_t first, Ints... rest) {
  std::int64_t r = first;
  ((r = checked_mul(r, static_cast<std::int64_t>(rest), what)), ...);
  return r;
}

/// Checks that `count` (> 0) rows of `row` elements, `stride` elements apart, of `element_bytes`
/// bytes each, span a byte range that fits in 64 bits: ((count - 1) x stride + row) x element_bytes.
/// Pointers into the rows are formed in bytes, so an extent that fits only in elements would wrap.
inline void check_extent(std::int64_t count, std::int64_t stride, std::int64_t row, std::int64_t element_bytes, const char* what) {
  (void)checked_mul(checked_add(checked_mul(count - 1, stride, what), row, what), element_bytes, what);
}

/// Ceiling division of non-negative values (no intermediate that can overflow).
constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return a / b + (a % b != 0); }

}  // namespace kvattn
