// Rotary embedding of one head vector, shared by the rope op (small_gemm.cpp) and the fused decode attention
// (decode_attention.cpp): y = x * cos + rotate_half(x) * sin over D values, each product and the sum rounded to
// T, as the separate torch ops round them (so both ops agree with the torch formula bit for bit).
#pragma once

#include <cstdint>

namespace idefics2_kernels {

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")  // no fused multiply-add: round like the separate torch ops
template <typename T>
inline void rope_half(const T* x, const T* partner, const T* c, const T* s, T* y, int64_t n, float sign) {
  for (int64_t d = 0; d < n; ++d) {  // two branch-free loops (one per half) that the compiler vectorizes
    const T a = static_cast<T>(static_cast<float>(x[d]) * static_cast<float>(c[d]));
    const T rotated = static_cast<T>(sign * static_cast<float>(partner[d]));
    const T r = static_cast<T>(static_cast<float>(rotated) * static_cast<float>(s[d]));
    y[d] = static_cast<T>(static_cast<float>(a) + static_cast<float>(r));
  }
}

template <typename T>
inline void rope_vector(const T* x, const T* c, const T* s, T* y, int64_t D) {
  const int64_t half = D / 2;
  rope_half(x, x + half, c, s, y, half, -1.f);                          // first half:  x * cos - x[d + half] * sin
  rope_half(x + half, x, c + half, s + half, y + half, D - half, 1.f);  // second half: x * cos + x[d - half] * sin
}
#pragma GCC pop_options

}  // namespace idefics2_kernels
