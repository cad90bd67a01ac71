// The k largest of each row of a float32 matrix, as XLA's TopK orders them, on the CPU: beam search's choice
// of each row's best 2 x beams continuations among beams x vocabulary scores (154k per row at beam 3).
//
//   x       (R, N) float32
//   values  (R, k) float32   largest first
//   indices (R, k) int32
//
// The order is XLA's (jax.lax.top_k): floats compared by the total order of their bits (-NaN < -inf < ... <
// -0 < +0 < ... < +inf < +NaN), ties to the lower index. XLA:CPU runs a partial sort of every row, one row
// at a time; here one pass over a row compares whole vectors against the running k-th best and only the
// few elements above it enter the sorted list, the rows split among XLA's intra-op threads.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace florence;

constexpr int kBlock = 4 * kLanes;  // elements tested together
constexpr int kMaxK = 64;

// The total-order key of a float's bits: its order as a signed integer is the floats' total order.
static inline int32_t key_of(int32_t bits) { return bits < 0 ? bits ^ 0x7fffffff : bits; }

static inline ivec keys_of(const int32_t* p) {
  ivec b;
  std::memcpy(&b, p, sizeof b);
  return b < 0 ? b ^ 0x7fffffff : b;
}

static inline bool any(ivec m) {
  int32_t a[kLanes];
  std::memcpy(a, &m, sizeof a);
  int32_t o = 0;
  for (int i = 0; i < kLanes; ++i) o |= a[i];
  return o != 0;
}

// The best k of one row, kept sorted: larger key first, equal keys in index order.
struct Best {
  int32_t key[kMaxK];
  int32_t index[kMaxK];
  int k, count = 0;

  // Index j (larger than every index offered before) with key c.
  inline void offer(int32_t c, int32_t j) {
    if (count == k && c <= key[k - 1]) return;
    int at = count < k ? count++ : k - 1;
    while (at > 0 && key[at - 1] < c) {  // strict: an equal key came earlier and stays ahead
      key[at] = key[at - 1];
      index[at] = index[at - 1];
      --at;
    }
    key[at] = c;
    index[at] = j;
  }
};

static void row_top_k(const int32_t* bits, int64_t n, int k, float* values, int32_t* indices) {
  Best best;
  best.k = k;
  int64_t j = 0;
  for (; j < std::min<int64_t>(k, n); ++j) best.offer(key_of(bits[j]), static_cast<int32_t>(j));
  for (; j + kBlock <= n; j += kBlock) {
    const ivec t = ivec{} + best.key[k - 1];
    const ivec m = (keys_of(bits + j) > t) | (keys_of(bits + j + kLanes) > t) |
                   (keys_of(bits + j + 2 * kLanes) > t) | (keys_of(bits + j + 3 * kLanes) > t);
    if (!any(m)) continue;
    for (int64_t i = j; i < j + kBlock; ++i) best.offer(key_of(bits[i]), static_cast<int32_t>(i));
  }
  for (; j < n; ++j) best.offer(key_of(bits[j]), static_cast<int32_t>(j));
  for (int i = 0; i < k; ++i) {
    indices[i] = best.index[i];
    std::memcpy(values + i, bits + best.index[i], sizeof(float));
  }
}

static ffi::Future TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, int64_t k, ffi::ResultBuffer<ffi::F32> values,
                        ffi::ResultBuffer<ffi::S32> indices) {
  const auto xd = x.dimensions(), vd = values->dimensions(), id = indices->dimensions();
  if (xd.size() != 2 || vd.size() != 2 || id.size() != 2 || k < 1 || k > kMaxK || k > xd[1] || vd[0] != xd[0] ||
      id[0] != xd[0] || vd[1] != k || id[1] != k)
    return invalid("florence_top_k: expected x (R, N), values and indices (R, k), 1 <= k <= min(N, 64)");
  const int64_t rows = xd[0], n = xd[1];
  const int32_t* xp = reinterpret_cast<const int32_t*>(x.typed_data());
  float* vp = values->typed_data();
  int32_t* ip = indices->typed_data();
  return split(pool, rows, rows, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_top_k(xp + r * n, n, static_cast<int>(k), vp + r * k, ip + r * k);
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(florence_top_k, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

extern "C" int florence_top_k_max_k() { return kMaxK; }
