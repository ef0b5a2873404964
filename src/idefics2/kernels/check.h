// IDEFICS2_CHECK(cond, format, ...): TORCH_CHECK with a printf-formatted message.
//
// Why not TORCH_CHECK(cond, "text ", value, ...): a message of several parts is assembled by c10::str through an
// ostringstream compiled into this library, and on one machine (GCC 13.3 with torch 2.11 wheels) that crashed the
// process with SIGSEGV instead of raising; a single C string takes the same path as a literal message, which
// raised normally there. So the message is formatted into a buffer first and handed over as one C string.
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>

namespace idefics2_kernels {
// Whether this build has the AVX-512 code paths: the ops that need them refuse otherwise, and Python asks isa().
#if defined(__AVX512F__)
inline constexpr bool kHaveAvx512 = true;
#else
inline constexpr bool kHaveAvx512 = false;
#endif
}  // namespace idefics2_kernels

#define IDEFICS2_CHECK(cond, ...)                                           \
  do {                                                                      \
    if (C10_UNLIKELY(!(cond))) {                                            \
      char idefics2_check_message_[512];                                    \
      std::snprintf(idefics2_check_message_, sizeof(idefics2_check_message_), __VA_ARGS__); \
      TORCH_CHECK(false, static_cast<const char*>(idefics2_check_message_)); \
    }                                                                       \
  } while (0)
