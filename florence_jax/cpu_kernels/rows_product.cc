// A few rows times a large float32 matrix on the CPU: y = x @ w for x of shape (rows, K), rows small (a
// decoding step's batch x beams), with w stored panel-major, shape (panels, K, kPanel): column block p of
// w (columns p*kPanel .. p*kPanel+kPanel-1, zero padded past N) is one contiguous (K, kPanel) panel.
//
// Why: XLA:CPU's dot libraries pack the weight matrix for a general GEMM, which at 12 rows runs at about
// half the core's FMA peak (docs/benchmarks.md). Here each panel is streamed once per block of up to 12
// rows with every accumulator in a register, so the product runs near the FMA peak and reads each weight
// once. Float32 in, float32 accumulation, float32 out; the sum over K runs in order k = 0, 1, ...
//
// Built at first use with the host's C++ compiler (florence_jax/cpu_kernels/__init__.py), registered with
// XLA as the FFI target "florence_rows_product". Column panels are split among XLA's intra-op threads.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace florence;

constexpr int kMaxRows = 12;

// Rows [0, R) of x against panels [p0, p1).
template <int R>
static void panels(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t K, int64_t N,
                   int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    vec acc[R][kVecs];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVecs; ++v) acc[r][v] = vec{};
    const float* wp = w + p * K * kPanel;
    for (int64_t k = 0; k < K; ++k, wp += kPanel) {
      vec wv[kVecs];
      for (int v = 0; v < kVecs; ++v) wv[v] = load(wp + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const float xs = x[r * ldx + k];
        for (int v = 0; v < kVecs; ++v) acc[r][v] += xs * wv[v];
      }
    }
    const int64_t n0 = p * kPanel, valid = std::min<int64_t>(kPanel, N - n0);
    for (int r = 0; r < R; ++r) {
      float out[kPanel];
      std::memcpy(out, acc[r], sizeof out);
      std::memcpy(y + r * ldy + n0, out, valid * sizeof(float));
    }
  }
}

using PanelFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                         int64_t);

template <int... Rs>
static PanelFn panel_fn(int rows, std::integer_sequence<int, Rs...>) {
  static constexpr PanelFn table[] = {&panels<Rs + 1>...};
  return table[rows - 1];
}

// Every row of x against panels [p0, p1), in blocks of up to kMaxRows rows.
static void run(const float* x, const float* w, float* y, int64_t rows, int64_t K, int64_t N, int64_t p0,
                int64_t p1) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int block = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
    panel_fn(block, std::make_integer_sequence<int, kMaxRows>{})(x + r0 * K, K, w, y + r0 * N, N, K, N, p0, p1);
  }
}

static ffi::Future RowsProduct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                               ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[1] != xd[1] || wd[2] != kPanel ||
      yd[0] != xd[0] || wd[0] != (yd[1] + kPanel - 1) / kPanel)
    return invalid("florence_rows_product: expected x (rows, K), w (ceil(N / panel), K, panel), y (rows, N)");
  const int64_t rows = xd[0], K = xd[1], N = yd[1], P = wd[0];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // At least 8 panels (a quarter of a megabyte at K = 768) per task: fewer is not worth a thread hop.
  return split(pool, P, P / 8, [=](int64_t p0, int64_t p1) { run(xp, wp, yp, rows, K, N, p0, p1); });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(florence_rows_product, RowsProduct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int florence_rows_product_panel() { return kPanel; }
