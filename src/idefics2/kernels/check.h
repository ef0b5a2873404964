// IDEFICS2_CHECK(cond, format, ...): TORCH_CHECK with a printf-formatted message.
//
// Why not TORCH_CHECK(cond, "text ", value, ...): a message of several parts is assembled by c10::str through an
// ostringstream compiled into this library, and on one machine (GCC 13.3 with torch 2.11 wheels) that crashed the
// process with SIGSEGV instead of raising; a single C string takes the same path as a literal message, which
// raised normally there. So the message is formatted into a buffer first and handed over as one C string.
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>

#define IDEFICS2_CHECK(cond, ...)                                           \
  do {                                                                      \
    if (C10_UNLIKELY(!(cond))) {                                            \
      char idefics2_check_message_[512];                                    \
      std::snprintf(idefics2_check_message_, sizeof(idefics2_check_message_), __VA_ARGS__); \
      TORCH_CHECK(false, static_cast<const char*>(idefics2_check_message_)); \
    }                                                                       \
  } while (0)
