// What florence_jax's CPU kernels share: the vector width they are built for, the attention kernels'
// exponential, softmax and weighted sum of values, and the split of a call's work among XLA's intra-op threads.
#ifndef FLORENCE_JAX_CPU_KERNELS_H_
#define FLORENCE_JAX_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace florence {

#if defined(__AVX512F__)
constexpr int kLanes = 16, kVecs = 2;  // 32 registers
#elif defined(__AVX__)
constexpr int kLanes = 8, kVecs = 1;   // 16 registers
#elif defined(__aarch64__)
constexpr int kLanes = 4, kVecs = 2;   // 32 registers
#else
constexpr int kLanes = 4, kVecs = 1;
#endif
// Columns of a packed panel (rows_product.cc's weights, cross_attention.cc's keys): kVecs vectors.
constexpr int kPanel = kLanes * kVecs;
// The attention kernels' largest head: 8 vectors (128 floats with AVX-512).
constexpr int kMaxHeadVecs = 8;

typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

inline vec splat(float x) { return vec{} + x; }

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, 2^n built in
// the exponent bits. Below -87.3 (where float32's exp leaves the normal range) the result is 0.
inline vec exp_nonpositive(vec x) {
  const vec lo = splat(-87.33654f);
  const ivec under = x < lo;
  x = under ? lo : x;
  const vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vec n = (x * splat(1.44269504088896341f) + magic) - magic;
  vec r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vec y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * (r * r) + r + splat(1.0f);
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return under ? vec{} : y * scale;
}

// Each row of s (G rows of S) to its softmax, in place.
inline void softmax(float* s, int G, int64_t S) {
  for (int g = 0; g < G; ++g) {
    float* row = s + g * S;
    vec m = splat(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < S; j += kLanes) {
      const vec x = load(row + j);
      m = x > m ? x : m;
    }
    float mx = m[0];
    for (int l = 1; l < kLanes; ++l) mx = std::max(mx, m[l]);
    vec sum = vec{};
    for (int64_t j = 0; j < S; j += kLanes) {
      const vec e = exp_nonpositive(load(row + j) - mx);
      store(row + j, e);
      sum += e;
    }
    float total = 0.0f;
    for (int l = 0; l < kLanes; ++l) total += sum[l];
    const vec inv = splat(total);
    for (int64_t j = 0; j < S; j += kLanes) store(row + j, load(row + j) / inv);
  }
}

// out_g = sum_j p[g][j] v_j for G rows, head_dim = DV vectors.
template <int G, int DV>
void weighted_values(const float* p, int64_t S, const float* value, float* out, int64_t ldo) {
  vec acc[G][DV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < DV; ++v) acc[g][v] = vec{};
  for (int64_t j = 0; j < S; ++j, value += DV * kLanes) {
    vec vv[DV];
    for (int v = 0; v < DV; ++v) vv[v] = load(value + v * kLanes);
    for (int g = 0; g < G; ++g) {
      const float pj = p[g * S + j];
      for (int v = 0; v < DV; ++v) acc[g][v] += pj * vv[v];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < DV; ++v) store(out + g * ldo + v * kLanes, acc[g][v]);
}

// A call's future, failed with this message (a bad operand shape).
inline xla::ffi::Future invalid(const char* message) {
  xla::ffi::Promise done;
  xla::ffi::Future future(done);
  done.SetError(xla::ffi::Error::InvalidArgument(message));
  return future;
}

// Runs part(i0, i1) over [0, n) in chunks of `grain`, taken in turn by the calling thread and up to `tasks` - 1
// threads of XLA's intra-op pool: a thread that starts late (the pool busy with another op) takes fewer
// chunks, and the caller never waits for work a fixed split gave a busy thread. The returned future is
// ready when every chunk is done.
template <typename Part>
xla::ffi::Future share(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain, int64_t tasks, Part part) {
  xla::ffi::Promise done;
  xla::ffi::Future future(done);
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = (n + grain - 1) / grain;
  tasks = std::max<int64_t>(1, std::min<int64_t>({tasks, chunks, static_cast<int64_t>(pool.num_threads())}));
  auto next = std::make_shared<std::atomic<int64_t>>(0);
  auto work = [=]() {
    for (int64_t c; (c = next->fetch_add(1)) < chunks;) part(c * grain, std::min(n, (c + 1) * grain));
  };
  if (tasks == 1) {
    work();
    done.SetAvailable();
    return future;
  }
  xla::ffi::CountDownPromise left(done, tasks);
  for (int64_t t = 1; t < tasks; ++t)
    pool.Schedule([=]() mutable {
      work();
      left.CountDown();
    });
  work();
  left.CountDown();
  return future;
}

// Runs part(i0, i1) over [0, n) in up to `tasks` equal parts, one per thread of XLA's intra-op pool at most,
// shared as `share` shares its chunks (a part a busy thread has not started, the caller takes); the returned
// future is ready when every part is.
template <typename Part>
xla::ffi::Future split(xla::ffi::ThreadPool& pool, int64_t n, int64_t tasks, Part part) {
  tasks = std::max<int64_t>(1, std::min<int64_t>({tasks, n, static_cast<int64_t>(pool.num_threads())}));
  return share(pool, n, (n + tasks - 1) / tasks, tasks, part);
}

}  // namespace florence

#endif  // FLORENCE_JAX_CPU_KERNELS_H_
