// Few-row products with narrow weights for XLA:CPU, as XLA FFI handlers (`dsv32_jax.native`).
//
// y (M, N) f32 = x (M, K) f32 . W(N, K)^T, W read in its stored width and widened in registers;
// W may be one matrix of a stack (L..., N, K) (+ its scales (L..., ...)), picked by an int32 index
// per leading axis: the kernel reads it in place (XLA would copy the slice out first).
//   dsv32_gemv_e4m3: W e4m3 (N, K), given as its bits (uint8), with block scales
//                    s (ceil(N/128), ceil(K/128)) f32: x * s[n/128, k/128] * 2^8 . W * 2^-8 (the
//                    scale folded into x once per 128 rows of W; W widened through fp16, which
//                    gives its values times 2^-8 exactly, subnormals included)
//   dsv32_gemv_bf16: W bf16 (N, K)
// XLA:CPU has no such dot: it widens a narrow weight whole, every call, before a float32 product.
// Rows of W are split over XLA's intra-op thread pool in tasks of 128 (e4m3) or 256 (bf16) rows.
// Each product is exact in float32; sums are float32 in 16 lanes over K (AVX-512; one lane
// without it), the lanes added at the end: another order than XLA's dot.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t BLOCK = 128;  // the FP8 block (rows and columns per scale)
constexpr int MR = 4;           // x rows per pass (at most)
constexpr int PREFETCH = 2048;  // bytes ahead in each weight row (measured: +30% read rate)
constexpr int64_t INLINE_BYTES = 1 << 20;  // weights read on the calling thread alone

// e4m3fn byte -> float, exact: normal values by their bits moved into float32's fields (times
// 2^120 to rebias), subnormals as mantissa * 2^-9 (no float32 denormal on the way), 0x7F NaN.
inline float e4m3_value(uint8_t b) {
  int mag = b & 0x7F;
  float v;
  if (mag == 0x7F) {
    v = NAN;
  } else if (mag >= 8) {
    uint32_t bits = static_cast<uint32_t>(mag) << 20;
    std::memcpy(&v, &bits, 4);
    v *= 0x1p120f;
  } else {
    v = static_cast<float>(b & 7) * 0x1p-9f;
  }
  return (b & 0x80) ? -v : v;
}

inline float bf16_value(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

#if defined(__AVX512F__)
// 32 e4m3 bytes -> 32 floats times 2^-8, exactly: each byte's fields moved into an fp16's
// (sign to bit 15, exponent and mantissa up by 7: fp16's bias is 8 more than e4m3's, and e4m3's
// subnormals land on fp16 subnormals), then widened by the hardware's fp16 convert. 0x7F (NaN)
// reads as 480 * 2^-8 (`checkpoint.finite` refuses non-finite weights).
inline void e4m3_32(const uint8_t* p, __m512& lo, __m512& hi) {
  __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  __m512i h = _mm512_or_si512(
      _mm512_and_si512(_mm512_slli_epi16(b, 7), _mm512_set1_epi16(0x3F80)),
      _mm512_and_si512(_mm512_slli_epi16(b, 8), _mm512_set1_epi16(static_cast<short>(0x8000))));
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

// 32 bf16 -> 32 floats (their bits moved up 16)
inline void bf16_32(const uint16_t* p, __m512& lo, __m512& hi) {
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))), 16));
}

inline void widen32(const uint8_t* p, __m512& lo, __m512& hi) { e4m3_32(p, lo, hi); }
inline void widen32(const uint16_t* p, __m512& lo, __m512& hi) { bf16_32(p, lo, hi); }
#endif

inline float widen1(uint8_t b) { return e4m3_value(b) * 0x1p-8f; }  // as e4m3_32
inline float widen1(uint16_t h) { return bf16_value(h); }

// y[m, r] for r < nr, m < mr: rows x (mr, K) (already scaled), weight rows w + r * K.
template <typename W, int nr, int mr>
void tile(const float* x, int64_t ldx, const W* w, int64_t k, float* y, int64_t ldy) {
  int64_t k16 = 0;
  float sums[nr][mr];
#if defined(__AVX512F__)
  __m512 acc[nr][mr];
  for (int r = 0; r < nr; ++r)
    for (int m = 0; m < mr; ++m) acc[r][m] = _mm512_setzero_ps();
  k16 = k / 32 * 32;
  for (int64_t j = 0; j < k16; j += 32) {
    __m512 xl[mr], xh[mr];
    for (int m = 0; m < mr; ++m) {
      xl[m] = _mm512_loadu_ps(x + m * ldx + j);
      xh[m] = _mm512_loadu_ps(x + m * ldx + j + 16);
    }
    for (int r = 0; r < nr; ++r) {
      __m512 lo, hi;
      _mm_prefetch(reinterpret_cast<const char*>(w + r * k + j) + PREFETCH, _MM_HINT_T0);
      widen32(w + r * k + j, lo, hi);
      for (int m = 0; m < mr; ++m) {
        acc[r][m] = _mm512_fmadd_ps(xl[m], lo, acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(xh[m], hi, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int m = 0; m < mr; ++m) sums[r][m] = _mm512_reduce_add_ps(acc[r][m]);
#else
  for (int r = 0; r < nr; ++r)
    for (int m = 0; m < mr; ++m) sums[r][m] = 0.0f;
#endif
  for (int64_t j = k16; j < k; ++j)
    for (int r = 0; r < nr; ++r) {
      float wv = widen1(w[r * k + j]);
      for (int m = 0; m < mr; ++m) sums[r][m] += x[m * ldx + j] * wv;
    }
  for (int r = 0; r < nr; ++r)
    for (int m = 0; m < mr; ++m) y[m * ldy + r] = sums[r][m];
}

template <typename W, int nr>
void rows_tile(const float* x, int64_t m, int64_t k, const W* w, float* y, int64_t ldy) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) tile<W, nr, MR>(x + i * k, k, w, k, y + i * ldy, ldy);
  switch (m - i) {
    case 3: tile<W, nr, 3>(x + i * k, k, w, k, y + i * ldy, ldy); break;
    case 2: tile<W, nr, 2>(x + i * k, k, w, k, y + i * ldy, ldy); break;
    case 1: tile<W, nr, 1>(x + i * k, k, w, k, y + i * ldy, ldy); break;
    default: break;
  }
}

template <typename W, int nr>
void rows_by(const float* x, int64_t m, int64_t k, const W* w, int64_t n, int64_t n0, int64_t n1,
             float* y) {
  int64_t r = n0;
  for (; r + nr <= n1; r += nr) rows_tile<W, nr>(x, m, k, w + r * k, y + r, n);
  for (; r < n1; ++r) rows_tile<W, 1>(x, m, k, w + r * k, y + r, n);
}

// Weight rows [n0, n1) (within one 128-row block when scaled): x (M, K), y (M, N). 8 weight rows
// a pass for 1-2 rows of x (8 streams read at once: +15% read rate), 4 for more (registers).
template <typename W>
void rows(const float* x, int64_t m, int64_t k, const W* w, int64_t n, int64_t n0, int64_t n1,
          float* y) {
  if (m <= 2)
    rows_by<W, 8>(x, m, k, w, n, n0, n1, y);
  else
    rows_by<W, 4>(x, m, k, w, n, n0, n1, y);
}

// Runs body(task) for task in [0, tasks) on the caller and the pool's threads; returns when all
// have run. The state is shared: a pool task that starts after the work is taken returns at once.
template <typename Body>
void parallel(ffi::ThreadPool& pool, int64_t tasks, int64_t bytes, Body body) {
  if (bytes < INLINE_BYTES) {  // waking a pool thread costs more than it saves
    for (int64_t t = 0; t < tasks; ++t) body(t);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto work = [st, tasks, body]() {
    int64_t t;
    while ((t = st->next.fetch_add(1)) < tasks) {
      body(t);
      if (st->done.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == tasks; });
}

// The matrix of a stack W (L..., N, K) that `index` (one int32 per leading axis, each clamped into
// range as XLA's dynamic-slice does) picks: its number among the stack's L... matrices.
int64_t picked(ffi::Span<const int64_t> dims, const ffi::Buffer<ffi::S32>& index) {
  const int32_t* idx = index.typed_data();
  int64_t flat = 0;
  for (size_t i = 0; i + 2 < dims.size(); ++i)
    flat = flat * dims[i] + std::clamp<int64_t>(idx[i], 0, dims[i] - 1);
  return flat;
}

// x (M, K), y (M, N) against W (..., N, K) with index (W.rank - 2,): the error text, or "".
const char* shapes(const ffi::Buffer<ffi::F32>& x, ffi::Span<const int64_t> wd,
                   const ffi::Buffer<ffi::S32>& index, ffi::Result<ffi::Buffer<ffi::F32>>& y) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (wd.size() < 2 || index.dimensions().size() != 1 ||
      index.dimensions()[0] != static_cast<int64_t>(wd.size()) - 2)
    return "dsv32 gemv: W (..., N, K) with one index per leading axis expected";
  const int64_t n = wd[wd.size() - 2], k = wd[wd.size() - 1];
  if (xd.size() != 2 || xd[1] != k || yd.size() != 2 || yd[0] != xd[0] || yd[1] != n)
    return "dsv32 gemv: x (M, K), W (..., N, K), y (M, N) expected";
  return "";
}

ffi::Error GemvE4m3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                    ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::S32> index,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (w.element_type() != ffi::DataType::U8)
    return ffi::Error::InvalidArgument("dsv32 gemv: W e4m3 bits (uint8) expected");
  if (const char* bad = shapes(x, wd, index, y); *bad) return ffi::Error::InvalidArgument(bad);
  const int64_t n = wd[wd.size() - 2], k = wd[wd.size() - 1], m = x.dimensions()[0];
  const int64_t nb = (n + BLOCK - 1) / BLOCK, kb = (k + BLOCK - 1) / BLOCK;
  auto sd = s.dimensions();
  bool same_lead = sd.size() == wd.size();
  for (size_t i = 0; same_lead && i + 2 < wd.size(); ++i) same_lead = sd[i] == wd[i];
  if (!same_lead || sd[sd.size() - 2] != nb || sd[sd.size() - 1] != kb)
    return ffi::Error::InvalidArgument(
        "dsv32 gemv: scales (..., ceil(N/128), ceil(K/128)) expected");
  const int64_t mat = picked(wd, index);
  const float* xp = x.typed_data();
  const float* sp = s.typed_data() + mat * nb * kb;
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.untyped_data()) + mat * n * k;
  float* yp = y->typed_data();
  parallel(pool, nb, n * k, [=](int64_t b) {
    std::vector<float> xs(m * k);  // x * s[b, k / 128] * 2^8
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < k; ++j)
        xs[i * k + j] = xp[i * k + j] * sp[b * kb + j / BLOCK] * 0x1p8f;
    rows(xs.data(), m, k, wp, n, b * BLOCK, std::min(n, (b + 1) * BLOCK), yp);
  });
  return ffi::Error::Success();
}

ffi::Error GemvBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                    ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (w.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("dsv32 gemv: W bf16 expected");
  if (const char* bad = shapes(x, wd, index, y); *bad) return ffi::Error::InvalidArgument(bad);
  const int64_t n = wd[wd.size() - 2], k = wd[wd.size() - 1], m = x.dimensions()[0];
  const float* xp = x.typed_data();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data()) + picked(wd, index) * n * k;
  float* yp = y->typed_data();
  const int64_t rows_per = 2 * BLOCK;
  parallel(pool, (n + rows_per - 1) / rows_per, 2 * n * k, [=](int64_t b) {
    rows(xp, m, k, wp, n, b * rows_per, std::min(n, (b + 1) * rows_per), yp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv32_gemv_e4m3, GemvE4m3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv32_gemv_bf16, GemvBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
