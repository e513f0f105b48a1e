// Decode-step attention for XLA's CPU backend, called through the XLA FFI (see cpu_kernels.py).
//
// At a decode step each (row, head) attends one query over its cached keys and values. XLA's CPU
// backend runs that as b * h separate small dots (YNNPACK takes no matrix-vector products), which costs
// a few microseconds each: at batch 8 a fifth of the step. This loop streams each (row, head)'s cache
// once, on XLA's own intra-op threads, and reads only the slots between the row's first and last valid
// one.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x <= 0 to ~2 ulp (Cephes' expf polynomial), written so that loops over it vectorise:
// libm's expf is a call per element. Below -87 it returns ~1e-38 where expf underflows to 0.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2**n, n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// Runs body(i) for every i in [0, n) on the calling thread and the pool's threads. Tasks are claimed
// from a shared counter, so the caller only ever waits for tasks another thread is running: a helper that
// starts late (its thread busy elsewhere) finds nothing left and returns without touching `body`.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto counters = std::make_shared<Counters>();
  const Body* b = &body;
  auto work = [counters, b, n]() {
    for (int64_t i; (i = counters->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      (*b)(i);
      counters->finished.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (counters->finished.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// One query per (row, head) over a slots-last cache, softmax in float32:
//   q [b, h, d], k and v [b', h, d, s] (b' >= b: the first b rows are read), valid [b, s] -> out [b, h, d].
// Only slots between a row's first and last valid slot are read. A row with no valid slot gets the mean
// of v over every slot, as a softmax over equal (fully masked) logits gives.
ffi::Error AttendOne(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid,
                     ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = valid.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || kd[0] < qd[0] || kd[1] != qd[1] ||
      kd[2] != qd[2] || md[0] != qd[0] || md[1] != kd[3] ||
      !std::equal(qd.begin(), qd.end(), out->dimensions().begin())) {
    return ffi::Error::InvalidArgument(
        "qwenvl_attend_one wants q [b, h, d], k and v [b' >= b, h, d, s], valid [b, s], out [b, h, d]");
  }
  const int64_t b = qd[0], h = qd[1], d = qd[2], s = kd[3];
  const bool* mask = valid.typed_data();
  std::vector<int64_t> lo(b), hi(b);  // valid slots of row r lie in [lo[r], hi[r]); empty: lo == hi
  for (int64_t r = 0; r < b; ++r) {
    const bool* m = mask + r * s;
    int64_t first = 0, last = s;
    while (first < s && !m[first]) ++first;
    while (last > first && !m[last - 1]) --last;
    lo[r] = first;
    hi[r] = last;
  }
  ParallelFor(pool, b * h, [&](int64_t task) {
    const int64_t r = task / h;
    const float* qp = q.typed_data() + task * d;
    const float* kp = k.typed_data() + task * d * s;
    const float* vp = v.typed_data() + task * d * s;
    float* op = out->typed_data() + task * d;
    if (lo[r] == hi[r]) {
      for (int64_t c = 0; c < d; ++c) {
        double sum = 0;
        for (int64_t j = 0; j < s; ++j) sum += vp[c * s + j];
        op[c] = static_cast<float>(sum / s);
      }
      return;
    }
    const int64_t a = lo[r], n = hi[r] - lo[r];
    const bool* m = mask + r * s + a;
    thread_local std::vector<float> buffer;
    buffer.resize(n);
    float* p = buffer.data();
    std::fill(p, p + n, 0.f);
    for (int64_t c = 0; c < d; ++c) {  // logits, one key channel at a time: contiguous over slots
      const float qc = qp[c];
      const float* kc = kp + c * s + a;
      for (int64_t j = 0; j < n; ++j) p[j] += qc * kc[j];
    }
    float top = -std::numeric_limits<float>::max();
    for (int64_t j = 0; j < n; ++j) {
      p[j] *= scale;
      if (m[j]) top = std::max(top, p[j]);
    }
    for (int64_t j = 0; j < n; ++j) p[j] = ExpNonPositive(p[j] - top);
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = m[j] ? p[j] : 0.f;
      total += p[j];
    }
    const float inv = 1.f / total;
    for (int64_t j = 0; j < n; ++j) p[j] *= inv;
    for (int64_t c = 0; c < d; ++c) {
      const float* vc = vp + c * s + a;
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) acc += p[j] * vc[j];
      op[c] = acc;
    }
  });
  return ffi::Error::Success();
}

// Weight-only quantized product for decode steps: out = x @ w.T, w = scale * q, read as stored:
//   x [n, i] float32, q [o, i] int8 (one output channel per row: the weight-major layout) or, kPacked,
//   q [o, i / 2] uint8 holding int4 values two per byte (value 2j in byte j's low half, kernel_math.pack_int4),
//   scale [g, o] float32 (g groups of i / g inputs; g = 1 is per channel) -> out [n, o].
// XLA's CPU backend converts a whole int8 weight to float before its dot (four times the bytes of q read
// and written again); this loop reads each row of q once per call, converting it in registers (one row of
// int8) or into a thread-local buffer the n rows of x then share.
template <bool kPacked, typename Q>
ffi::Error QMatmulOf(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, Q& q, ffi::Buffer<ffi::F32>& scale,
                     ffi::ResultBuffer<ffi::F32>& out) {
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), od = out->dimensions();
  const int64_t q_in = qd.size() == 2 ? qd[1] * (kPacked ? 2 : 1) : -1;
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2 || od.size() != 2 || xd[1] != q_in ||
      sd[1] != qd[0] || sd[0] < 1 || q_in % sd[0] != 0 || od[0] != xd[0] || od[1] != qd[0]) {
    return ffi::Error::InvalidArgument(
        "qwenvl_qmatmul wants x [n, i], q [o, i] (int4: [o, i / 2]), scale [g, o] with g dividing i, "
        "out [n, o]");
  }
  const int64_t n = xd[0], in = xd[1], o = qd[0], g = sd[0], gs = in / g;
  const float* xp = x.typed_data();
  const auto* qp = q.typed_data();
  const float* sp = scale.typed_data();
  float* op = out->typed_data();
  const int64_t row_bytes = kPacked ? in / 2 : in;
  const bool buffered = kPacked || n > 1;  // one row of int8 is read in registers; any other into w
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 15) / row_bytes);  // ~32 KiB of q per task
  ParallelFor(pool, (o + block - 1) / block, [&](int64_t task) {
    thread_local std::vector<float> buffer;
    buffer.resize(in);
    float* w = buffer.data();
    for (int64_t r = task * block, end = std::min(o, r + block); r < end; ++r) {
      const auto* qr = qp + r * row_bytes;
      if (buffered) {
        for (int64_t j = 0; j < row_bytes; ++j) {
          if constexpr (kPacked) {
            const int8_t byte = static_cast<int8_t>(qr[j]);
            w[2 * j] = static_cast<float>(static_cast<int8_t>(byte << 4) >> 4);  // sign-extended nibbles
            w[2 * j + 1] = static_cast<float>(byte >> 4);
          } else {
            w[j] = static_cast<float>(qr[j]);
          }
        }
      }
      int64_t b = 0;
      for (; n > 1 && b + 4 <= n; b += 4) {  // four rows of x per pass: each weight loaded once for four
        const float *x0 = xp + b * in, *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
        float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
        for (int64_t k = 0; k < g; ++k) {
          float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
          for (int64_t j = k * gs; j < (k + 1) * gs; ++j) {
            a0 += w[j] * x0[j];
            a1 += w[j] * x1[j];
            a2 += w[j] * x2[j];
            a3 += w[j] * x3[j];
          }
          const float sk = sp[k * o + r];
          t0 += a0 * sk;
          t1 += a1 * sk;
          t2 += a2 * sk;
          t3 += a3 * sk;
        }
        op[b * o + r] = t0;
        op[(b + 1) * o + r] = t1;
        op[(b + 2) * o + r] = t2;
        op[(b + 3) * o + r] = t3;
      }
      for (; b < n; ++b) {
        const float* xb = xp + b * in;
        float total = 0.f;
        for (int64_t k = 0; k < g; ++k) {
          float acc = 0.f;
          if (buffered) {
            for (int64_t j = k * gs; j < (k + 1) * gs; ++j) acc += w[j] * xb[j];
          } else {
            for (int64_t j = k * gs; j < (k + 1) * gs; ++j) acc += static_cast<float>(qr[j]) * xb[j];
          }
          total += acc * sp[k * o + r];
        }
        op[b * o + r] = total;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                   ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out) {
  return QMatmulOf<false>(pool, x, q, scale, out);
}

ffi::Error QMatmul4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                    ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out) {
  return QMatmulOf<true>(pool, x, q, scale, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenvlAttendOne, AttendOne,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenvlQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenvlQMatmul4, QMatmul4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
