// Instruction-set paths and the one-time CPU check that picks among them. Kernels for every path
// are compiled into every build with function target attributes, so a program built with default
// flags still runs the AVX-512 path on an AVX-512 machine.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "kvattn/config/errors.hpp"

#if defined(__aarch64__)
#define KVATTN_ARCH_AARCH64 1
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVATTN_ARCH_X86_64 1
#include <cpuid.h>
#endif

namespace kvattn {

/// A kernel path. `scalar` is portable C++ and always available.
enum class isa { scalar, avx2, avx512, neon };

constexpr std::string_view isa_name(isa i) {
  switch (i) {
    case isa::scalar: return "scalar";
    case isa::avx2: return "avx2";
    case isa::avx512: return "avx512";
    case isa::neon: return "neon";
  }
  return "?";
}

#if defined(KVATTN_ARCH_X86_64)
namespace detail {
/// x86 features from cpuid, with the OS's consent (xgetbv) to use the AVX and AVX-512 registers.
struct X86Features {
  bool avx2 = false, avx512 = false, avx512_bf16 = false;
  X86Features() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
    if (!osxsave || !avx) return;
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    const bool os_avx = (xcr0_lo & 0x6u) == 0x6u, os_avx512 = (xcr0_lo & 0xE6u) == 0xE6u;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    avx2 = os_avx && fma && f16c && (b & (1u << 5));
    const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
    avx512 = avx2 && os_avx512 && f && dq && bw && vl;
    if (avx512 && a >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) avx512_bf16 = a & (1u << 5);
  }
};
inline const X86Features& x86_features() {
  static const X86Features f;
  return f;
}
}  // namespace detail
#endif

/// Whether this CPU (and OS) can run a path. avx2 means AVX2 + FMA + F16C; avx512 means
/// AVX-512 F/BW/VL/DQ on top of that.
inline bool cpu_supports(isa i) {
  switch (i) {
    case isa::scalar: return true;
#if defined(KVATTN_ARCH_X86_64)
    case isa::avx2: return detail::x86_features().avx2;
    case isa::avx512: return detail::x86_features().avx512;
#elif defined(KVATTN_ARCH_AARCH64)
    case isa::neon: return true;  // Advanced SIMD is part of every aarch64 CPU
#endif
    default: return false;
  }
}

/// Whether this CPU has the AVX-512 path's bf16 pair products (AVX512_BF16: vdpbf16ps), which
/// fpmath_mode::bf16 uses.
inline bool cpu_supports_bf16_dot() {
#if defined(KVATTN_ARCH_X86_64)
  return detail::x86_features().avx512_bf16;
#else
  return false;
#endif
}

/// Every path this CPU can run, fastest last.
inline std::vector<isa> supported_isas() {
  std::vector<isa> out;
  for (isa i : {isa::scalar, isa::neon, isa::avx2, isa::avx512})
    if (cpu_supports(i)) out.push_back(i);
  return out;
}

/// Parses "scalar", "avx2", "avx512" or "neon", in any case ("AVX2" too); an error message starts
/// with `origin`.
inline isa parse_isa(std::string_view name, std::string_view origin = {}) {
  const auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; };
  for (isa i : {isa::scalar, isa::avx2, isa::avx512, isa::neon})
    if (std::ranges::equal(name, isa_name(i), {}, lower)) return i;
  detail::fail<config_error>(origin, "unknown ISA path '", name, "' (expected scalar, avx2, avx512 or neon)");
}

namespace detail {
inline void require_supported(isa i, std::string_view origin) {
  if (isa_name(i) == "?") fail<config_error>(origin, "invalid ISA path value ", static_cast<int>(i));
  if (!cpu_supports(i)) fail<config_error>(origin, "ISA path '", isa_name(i), "' is not supported by this CPU");
}

/// The path kernels use unless set_isa forced one: KVATTN_ISA from the environment if set
/// (checked: a bad value throws here, at every call), else the fastest supported.
inline isa default_isa() {
  static const isa path = [] {
    if (const char* env = std::getenv("KVATTN_ISA"); env != nullptr && *env != '\0') {
      const isa forced = parse_isa(env, "KVATTN_ISA: ");
      require_supported(forced, "KVATTN_ISA: ");
      return forced;
    }
    return supported_isas().back();
  }();
  return path;
}

/// The path set_isa forced, or -1. Apart from the environment's default, so that set_isa works
/// (and overrides it) even when KVATTN_ISA holds a bad value.
inline std::atomic<int>& forced_isa_slot() {
  static std::atomic<int> slot{-1};
  return slot;
}
}  // namespace detail

/// The path kernels use now.
inline isa active_isa() {
  const int forced = detail::forced_isa_slot().load(std::memory_order_relaxed);
  return forced >= 0 ? static_cast<isa>(forced) : detail::default_isa();
}

/// Forces a path (for tests and benchmarks), over KVATTN_ISA; throws config_error if this CPU
/// cannot run it.
inline void set_isa(isa i) {
  detail::require_supported(i, "set_isa: ");
  detail::forced_isa_slot().store(static_cast<int>(i), std::memory_order_relaxed);
}

/// Undoes set_isa: kernels use KVATTN_ISA's path again, or the fastest supported.
inline void reset_isa() noexcept { detail::forced_isa_slot().store(-1, std::memory_order_relaxed); }

}  // namespace kvattn
