// DaViT's 3x3 depthwise convolution (stride 1, padding 1) with its bias and the block's residual, x + bias +
// conv(x), over an NHWC float32 image, in one pass.
//
// XLA:CPU computes the nine shifted multiply-adds as one loop fusion per element that slices the padded
// input nine times, after a separate pass that pads it. Here each output row is made from the three input
// rows around it: for a vector of channels, the nine taps and the bias stay in registers, and a sliding
// window of three columns per input row moves along W, so each output vector loads three new input vectors
// (one per row) and is stored once. The rows of a call are shared among XLA's threads in chunks (kernels.h
// `share`).

#include <cstdint>

#include "kernels.h"

namespace ffi = xla::ffi;

namespace florence {
namespace {

struct ConvShape {
  int64_t B, H, W, C;
};

// Output rows [r0, r1) of the batch's B * H rows.
void conv_rows(const ConvShape& s, const float* x, const float* k, const float* b, float* out, int64_t r0,
               int64_t r1) {
  const int64_t W = s.W, C = s.C;
  const vec zero = splat(0.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t y = r % s.H, image = r / s.H;
    // the three input rows; a row outside the image reads as zeros (loaded never: `valid`)
    const float* rows[3];
    bool valid[3];
    for (int i = 0; i < 3; ++i) {
      const int64_t yy = y + i - 1;
      valid[i] = yy >= 0 && yy < s.H;
      rows[i] = valid[i] ? x + (image * s.H + yy) * W * C : nullptr;
    }
    float* o = out + r * W * C;
    for (int64_t c = 0; c < C; c += kLanes) {
      vec kk[3][3];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) kk[i][j] = load(k + (i * 3 + j) * C + c);
      const vec bias = load(b + c);
      // t[i][j]: input row i at columns x - 1, x, x + 1
      vec t[3][3];
      for (int i = 0; i < 3; ++i) {
        t[i][0] = zero;
        t[i][1] = valid[i] ? load(rows[i] + c) : zero;
      }
      for (int64_t col = 0; col < W; ++col) {
        const bool next = col + 1 < W;
        for (int i = 0; i < 3; ++i) t[i][2] = valid[i] && next ? load(rows[i] + (col + 1) * C + c) : zero;
        // one short chain per input row, then their sum: the nine products do not wait on each other
        vec a0 = bias + t[0][0] * kk[0][0] + t[0][1] * kk[0][1] + t[0][2] * kk[0][2];
        vec a1 = t[1][0] * kk[1][0] + t[1][1] * kk[1][1] + t[1][2] * kk[1][2];
        vec a2 = t[2][0] * kk[2][0] + t[2][1] * kk[2][1] + t[2][2] * kk[2][2];
        store(o + col * C + c, (a0 + a1 + a2) + t[1][1]);
        for (int i = 0; i < 3; ++i) {
          t[i][0] = t[i][1];
          t[i][1] = t[i][2];
        }
      }
    }
  }
}

ffi::Future DepthwiseResidual(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                              ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), bd = bias.dimensions(), od = out->dimensions();
  const bool ok = xd.size() == 4 && od.size() == 4 && kd.size() == 2 && bd.size() == 1 && kd[0] == 9 &&
                  kd[1] == xd[3] && bd[0] == xd[3] && xd[3] % kLanes == 0 && xd[3] >= 1 &&
                  od[0] == xd[0] && od[1] == xd[1] && od[2] == xd[2] && od[3] == xd[3];
  if (!ok)
    return invalid(
        "florence_depthwise_residual: expected x (B, H, W, C), kernel (9, C), bias (C,), out (B, H, W, C), C a "
        "multiple of the vector width");
  const ConvShape s{xd[0], xd[1], xd[2], xd[3]};
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  const float* bp = bias.typed_data();
  float* op = out->typed_data();
  // Chunks of rows of about 64K outputs (DaViT's rows hold 24K at every stage), shared by XLA's threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, s.W * s.C));
  return share(pool, s.B * s.H, grain, s.B * s.H, [=](int64_t r0, int64_t r1) { conv_rows(s, xp, kp, bp, op, r0, r1); });
}

}  // namespace
}  // namespace florence

XLA_FFI_DEFINE_HANDLER_SYMBOL(florence_depthwise_residual, florence::DepthwiseResidual,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
