// Per-pixel steps of image preprocessing (idefics2.image_processing), one pass each and serial: the processor
// already runs one image per thread (torch ops release the GIL), so no OpenMP team is started here.
//
// The inputs are numpy arrays that may be read-only (PIL's buffers), which torch cannot wrap without a
// warning, so they come as an address plus geometry, checked on the Python side (idefics2/kernels/__init__.py).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdint>

namespace {

// out[c, y, x] = lut[c, src[y, x, c]]: the reference's rescale + normalise of each uint8 level (a table made
// by numpy with the reference's arithmetic, so bit-identical), written straight into a (possibly padded) CHW
// float view. Pixels are `pixel_bytes` apart: 3 (RGB) or 4 (RGBX, the 4th byte unused).
void lut_to_chw(int64_t src_address, int64_t height, int64_t width, int64_t row_stride, int64_t pixel_bytes,
                const at::Tensor& lut, at::Tensor out) {
  TORCH_CHECK(pixel_bytes == 3 || pixel_bytes == 4, "lut_to_chw: 3 or 4 bytes per pixel");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.is_contiguous() && lut.dim() == 2 && lut.size(0) == 3 &&
                  lut.size(1) == 256, "lut_to_chw: lut must be contiguous float32 [3, 256]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 3 && out.size(0) == 3 && out.size(1) == height &&
                  out.size(2) == width && out.stride(2) == 1, "lut_to_chw: out must be float32 [3, H, W], rows contiguous");
  TORCH_CHECK(height >= 0 && width >= 0 && row_stride >= pixel_bytes * width, "lut_to_chw: bad source geometry");
  const auto* src = reinterpret_cast<const uint8_t*>(src_address);
  const float* l0 = lut.data_ptr<float>();
  const float *l1 = l0 + 256, *l2 = l0 + 512;
  float* o = out.data_ptr<float>();
  const int64_t sc = out.stride(0), sy = out.stride(1);
  for (int64_t y = 0; y < height; ++y) {
    const uint8_t* row = src + y * row_stride;
    float* o0 = o + y * sy;
    float* o1 = o0 + sc;
    float* o2 = o1 + sc;
    if (pixel_bytes == 4) {
      for (int64_t x = 0; x < width; ++x) {
        o0[x] = l0[row[4 * x]];
        o1[x] = l1[row[4 * x + 1]];
        o2[x] = l2[row[4 * x + 2]];
      }
    } else {
      for (int64_t x = 0; x < width; ++x) {
        o0[x] = l0[row[3 * x]];
        o1[x] = l1[row[3 * x + 1]];
        o2[x] = l2[row[3 * x + 2]];
      }
    }
  }
}

// RGBA -> RGBX over an opaque white background: out[y, x, c] = table[alpha << 8 | value], where the table
// holds PIL's own alpha_composite results for every (alpha, value) pair, and out[y, x, 3] = 255. RGBX (4 bytes
// a pixel, PIL's own layout for RGB) lets PIL wrap the result without a copy.
void composite_on_white(int64_t src_address, int64_t height, int64_t width, int64_t row_stride,
                        const at::Tensor& table, at::Tensor out) {
  TORCH_CHECK(table.scalar_type() == at::kByte && table.is_contiguous() && table.numel() == 65536,
              "composite_on_white: table must be contiguous uint8 [65536]");
  TORCH_CHECK(out.scalar_type() == at::kByte && out.is_contiguous() && out.dim() == 3 && out.size(0) == height &&
                  out.size(1) == width && out.size(2) == 4, "composite_on_white: out must be contiguous uint8 [H, W, 4]");
  TORCH_CHECK(height >= 0 && width >= 0 && row_stride >= 4 * width, "composite_on_white: bad source geometry");
  const auto* src = reinterpret_cast<const uint8_t*>(src_address);
  const uint8_t* t = table.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t y = 0; y < height; ++y) {
    const uint8_t* row = src + y * row_stride;
    uint8_t* orow = o + y * width * 4;
    for (int64_t x = 0; x < width; ++x) {
      const uint8_t* p = row + 4 * x;
      const uint8_t* ta = t + (static_cast<int>(p[3]) << 8);
      orow[4 * x] = ta[p[0]];
      orow[4 * x + 1] = ta[p[1]];
      orow[4 * x + 2] = ta[p[2]];
      orow[4 * x + 3] = 255;
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idefics2_kernels, m) {
  m.def("lut_to_chw(int src_address, int height, int width, int row_stride, int pixel_bytes, Tensor lut, "
        "Tensor(a!) out) -> ()",
        &lut_to_chw);
  m.def("composite_on_white(int src_address, int height, int width, int row_stride, Tensor table, Tensor(a!) out) -> ()",
        &composite_on_white);
}
