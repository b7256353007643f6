// bnlab's compiled CPU kernels for batch normalization.
//
// Custom ops, registered with torch.library under the `bnlab` namespace:
//
//   bnlab::bn_train_fwd(x, weight?, bias?, eps) -> (y, mu_b, biased_var_b)
//   bnlab::bn_bwd(grad_y, x, weight?, mu_b, inv_std, need_x) -> (grad_x, sum_dy_xhat, sum_dy)
//   bnlab::bn_eval(x, weight?, bias?, running_mean, running_var, eps) -> y
//   bnlab::bn_stats(x) -> (mu_b, biased_var_b)
//   bnlab::bn_input_grad(grad_y, x, weight?, mu, inv_std, sum_dy, sum_dy_xmu, m) -> grad_x
//   bnlab::bn_train(x, weight?, bias?, running_mean!?, running_var!?, num_batches_tracked!?,
//                   momentum?, eps) -> (y, mu_b, biased_var_b, n_skipped)
//
// sum_dy_xhat = sum dy * (x - mu_b) * inv_std is dl/dgamma and sum_dy is dl/dbeta; grad_x
// is an empty tensor when need_x is false. bn_stats and bn_input_grad are SyncBatchNorm's
// local parts (the sums are reduced across processes between them); bn_train is a
// module's whole training forward with its own autograd node (see the end of the file),
// also exposed to Python without the dispatcher as the extension function train_step.
//
// The math is Algorithm 1 of Ioffe & Szegedy (2015) and the closed-form backward of
// Section 3 (see bnlab.core.batch_norm_backward). Statistics are taken over every dim
// but the channel dim 1; float16/bfloat16 are accumulated in float32, converted in
// chunks to float32 buffers (see Staging) so that every arithmetic loop vectorizes.
//
// Memory layouts:
//   * "NCS": x contiguous as (N, C, S) with S = prod(spatial) > 1. The work is split
//     over channels; one task reads its channel for the statistics and at once again
//     for the output, so the second read comes from the core's cache when a channel
//     (N * S values) fits there. With fewer channels than threads the batch is split too.
//     On one thread, short runs (S of at most 2 KiB) are streamed instead: x front to
//     back for the statistics, then again for the output (see ncs_streams).
//   * "RC": rows of C channels, channel innermost: 2-D (N, C) and channels_last inputs,
//     R = N * S rows. The rows are split over threads; each keeps per-channel partial
//     sums, merged afterwards. Short rows are grouped into super-rows of >= 256 values.
//   * Tiny inputs (below kGrain values per task) run on the calling thread, with no
//     parallel region to start; their cost is then the op's dispatch.
//
// Numerics: one statistics pass over values shifted by an estimate of their channel's
// mean (K = the mean of 16 of its values, see kShiftSamples), so sum(d) and sum(d^2) of
// d = x - K do not cancel when |mean| >> std. Blocks of at most kBlock values are summed in the
// accumulation type (vectorized), and block sums are added in float64. The output
// subtracts the mean as a float64 value split into two acc_t parts (hi + lo), so
// large-mean inputs keep their precision.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace bnlab {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 4096;       // values summed in acc_t before a float64 add
constexpr int64_t kRowBlock = 64;      // rows summed in acc_t before a float64 add (RC)
constexpr int64_t kRowChains = 4;      // RC: rows i % 4 go to 4 accumulators (see rc_reduce)
constexpr int64_t kGrain = 1 << 15;    // values per task below which work stays serial

enum class Layout { NCS, RC };

struct Geometry {
  Layout layout;
  int64_t n, c, s;  // NCS: (n, c, s); RC: rows = n * s, channels c
};

bool is_channels_last_dense(const Tensor& x) {
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// Make x one of the two layouts the kernels take (a copy only when x is neither).
Tensor as_supported_layout(const Tensor& x) {
  if (x.is_contiguous() || is_channels_last_dense(x)) return x;
  return x.contiguous(x.suggest_memory_format());
}

Geometry geometry_of(const Tensor& x) {
  int64_t n = x.size(0), c = x.size(1);
  int64_t s = c == 0 || n == 0 ? 0 : x.numel() / (n * c);
  bool rc = !x.is_contiguous() || s == 1;  // channels_last dense, or (N, C) rows
  if (c == 1) return {Layout::NCS, 1, 1, x.numel()};  // one channel: all values in a row
  return {rc ? Layout::RC : Layout::NCS, n, c, s};
}

// The memory format of x once it is in a layout the kernels take (as_supported_layout):
// the one place that names it. Every tensor read beside x (grad_y) must be laid out in
// this format, not in its suggest_memory_format(): that heuristic looks at the strides of
// size-1 dims too, and for a channels_last-dense x such as (4, 3, 10, 1) with strides
// (30, 1, 3, 1) it answers Contiguous, which made dy be read in another order than x
// (wrong gradients, found by review; torch 2.13's own CPU kernel gets this case wrong).
at::MemoryFormat kernel_format(const Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  return x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

// Bring t to the layout of x (grad_y may come strided, expanded or in another format).
// is_contiguous(format) ignores the strides of size-1 dims, as the kernels' indexing does.
Tensor like_layout(const Tensor& t_in, const Tensor& x) {
  const Tensor t = t_in.scalar_type() == x.scalar_type() ? t_in : t_in.to(x.scalar_type());
  const auto format = kernel_format(x);
  return t.is_contiguous(format) ? t : t.contiguous(format);
}

template <typename acc_t>
struct MeanSplit {
  acc_t hi, lo;
  explicit MeanSplit(double m)
      : hi(static_cast<acc_t>(m)), lo(static_cast<acc_t>(m - double(hi))) {}
};

// Element loads and stores in the accumulation type, written so the compiler vectorizes
// them (c10's own conversions do not vectorize): bfloat16 by bit shifts, rounding to
// nearest even on store; float16 by the branch-free method below. Both are bit-exact
// with c10::BFloat16 / c10::Half.
template <typename T>
struct IO {
  using raw = T;
  static inline T load(T v) { return v; }
  static inline T store(T v) { return v; }
};

template <>
struct IO<c10::BFloat16> {
  using raw = uint16_t;
  static inline float load(uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
    const uint32_t nan = 0u - static_cast<uint32_t>(f != f);  // all ones for NaN
    u = (0x7fc00000u & nan) | (rounded & ~nan);
    return static_cast<uint16_t>(u >> 16);
  }
};

template <>
struct IO<c10::Half> {
  using raw = uint16_t;
  // IEEE half <-> float with integer and float operations only (the method of
  // Maratyszcza's FP16 library, which c10::Half also uses), branch-free (selects by
  // masks) so that loops over them vectorize; bit-exact with c10::Half.
  static inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  }
  static inline uint32_t select(bool c, uint32_t a, uint32_t b) {
    const uint32_t mask = 0u - static_cast<uint32_t>(c);
    return (a & mask) | (b & ~mask);
  }
  static inline float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_float(
        sign | select(two_w < (1u << 27), float_bits(denormalized), float_bits(normalized)));
  }
  static inline uint16_t store(float f) {
    const uint32_t w = float_bits(f);
    const float scaled = (bits_float(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t exp2 = shl1_w & 0xFF000000u;
    const uint32_t bias = select(exp2 < 0x71000000u, 0x71000000u, exp2);
    const uint32_t bits = float_bits(bits_float((bias >> 1) + 0x07800000u) + scaled);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<uint16_t>((sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
  }
};

template <typename T>
using Raw = typename IO<T>::raw;

template <typename T>
const Raw<T>* raw_ptr(const Tensor& t) {
  return reinterpret_cast<const Raw<T>*>(t.const_data_ptr<T>());
}

template <typename T>
Raw<T>* raw_mut_ptr(Tensor& t) {
  return reinterpret_cast<Raw<T>*>(t.mutable_data_ptr<T>());
}

// Loops see their values in acc_t. float and double are read in place; float16 and
// bfloat16 are converted chunk by chunk into stack buffers (F16C instructions for
// float16 where the build has them), and outputs converted back, so every arithmetic
// loop is a plain float loop the compiler vectorizes.
template <typename scalar_t>
struct Staging {
  using acc_t = at::opmath_type<scalar_t>;
  using raw_t = Raw<scalar_t>;
  static constexpr bool kCopy = !std::is_same_v<raw_t, acc_t>;
  static constexpr int64_t kChunk = 256;

  static inline void to_acc(const raw_t* __restrict__ src, acc_t* __restrict__ dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
      }
    }
#endif
#pragma omp simd
    for (int64_t j = i; j < n; ++j) dst[j] = IO<scalar_t>::load(src[j]);
  }

  static inline void from_acc(const acc_t* __restrict__ src, raw_t* __restrict__ dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
      }
    }
#endif
#pragma omp simd
    for (int64_t j = i; j < n; ++j) dst[j] = IO<scalar_t>::store(src[j]);
  }

  // body(j0, a, n): a[0..n) are values j0..j0+n of the run, in acc_t.
  template <typename Body>
  static inline void read1(const raw_t* a, int64_t len, const Body& body) {
    if constexpr (!kCopy) {
      body(int64_t(0), a, len);
    } else {
      acc_t ba[kChunk];
      for (int64_t j0 = 0; j0 < len; j0 += kChunk) {
        const int64_t n = std::min(kChunk, len - j0);
        to_acc(a + j0, ba, n);
        body(j0, static_cast<const acc_t*>(ba), n);
      }
    }
  }

  template <typename Body>
  static inline void read2(const raw_t* a, const raw_t* b, int64_t len, const Body& body) {
    if constexpr (!kCopy) {
      body(int64_t(0), a, b, len);
    } else {
      acc_t ba[kChunk], bb[kChunk];
      for (int64_t j0 = 0; j0 < len; j0 += kChunk) {
        const int64_t n = std::min(kChunk, len - j0);
        to_acc(a + j0, ba, n);
        to_acc(b + j0, bb, n);
        body(j0, static_cast<const acc_t*>(ba), static_cast<const acc_t*>(bb), n);
      }
    }
  }

  // body(j0, a, out, n) writes out[0..n), stored to y[j0..j0+n).
  template <typename Body>
  static inline void map1(const raw_t* a, raw_t* y, int64_t len, const Body& body) {
    if constexpr (!kCopy) {
      body(int64_t(0), a, y, len);
    } else {
      acc_t ba[kChunk], out[kChunk];
      for (int64_t j0 = 0; j0 < len; j0 += kChunk) {
        const int64_t n = std::min(kChunk, len - j0);
        to_acc(a + j0, ba, n);
        body(j0, static_cast<const acc_t*>(ba), out, n);
        from_acc(out, y + j0, n);
      }
    }
  }

  template <typename Body>
  static inline void map2(const raw_t* a, const raw_t* b, raw_t* y, int64_t len,
                          const Body& body) {
    if constexpr (!kCopy) {
      body(int64_t(0), a, b, y, len);
    } else {
      acc_t ba[kChunk], bb[kChunk], out[kChunk];
      for (int64_t j0 = 0; j0 < len; j0 += kChunk) {
        const int64_t n = std::min(kChunk, len - j0);
        to_acc(a + j0, ba, n);
        to_acc(b + j0, bb, n);
        body(j0, static_cast<const acc_t*>(ba), static_cast<const acc_t*>(bb), out, n);
        from_acc(out, y + j0, n);
      }
    }
  }
};

// ---------------------------------------------------------------------------
// NCS kernels: per channel, over positions [q0, q1) of its N * S values
// ---------------------------------------------------------------------------

// Calls body(offset, len) for the contiguous runs of channel ch's positions [q0, q1)
// (position q is value q % S of batch entry q / S), each at most max_len long.
template <typename Body>
inline void for_each_run(const Geometry& g, int64_t ch, int64_t q0, int64_t q1,
                         int64_t max_len, const Body& body) {
  for (int64_t q = q0; q < q1;) {
    const int64_t n = q / g.s, i = q % g.s;
    const int64_t len = std::min({g.s - i, q1 - q, max_len});
    body((n * g.c + ch) * g.s + i, len);
    q += len;
  }
}

// Sums of one block (n <= kBlock values, in acc_t) for the NCS kernels. kLanes partial
// sums (four AVX2 vectors), kept in an array the compiler maps to vector registers, make
// the adds independent chains; one `omp simd reduction` accumulator is a single chain
// bound by the add latency (4 cycles per vector), slower than the cache feeds a core.
template <typename acc_t>
constexpr int64_t kLanes = 128 / sizeof(acc_t);

// s1 = sum (v - k), s2 = sum (v - k)^2.
template <typename acc_t>
inline void block_shifted_sums(const acc_t* __restrict__ v, int64_t n, acc_t k, acc_t& s1,
                               acc_t& s2) {
  constexpr int64_t L = kLanes<acc_t>;
  acc_t a1[L] = {}, a2[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const acc_t d = v[i + j] - k;
      a1[j] += d;
      a2[j] += d * d;
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    const acc_t d = v[i + j] - k;
    a1[j] += d;
    a2[j] += d * d;
  }
  acc_t r1 = 0, r2 = 0;
#pragma omp simd reduction(+ : r1, r2)
  for (int64_t j = 0; j < L; ++j) {
    r1 += a1[j];
    r2 += a2[j];
  }
  s1 = r1;
  s2 = r2;
}

// s1 = sum dy, s2 = sum dy * (x - mu).
template <typename acc_t>
inline void block_grad_sums(const acc_t* __restrict__ d, const acc_t* __restrict__ v,
                            int64_t n, acc_t mu, acc_t& s1, acc_t& s2) {
  constexpr int64_t L = kLanes<acc_t>;
  acc_t a1[L] = {}, a2[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      a1[j] += d[i + j];
      a2[j] += d[i + j] * (v[i + j] - mu);
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    a1[j] += d[i + j];
    a2[j] += d[i + j] * (v[i + j] - mu);
  }
  acc_t r1 = 0, r2 = 0;
#pragma omp simd reduction(+ : r1, r2)
  for (int64_t j = 0; j < L; ++j) {
    r1 += a1[j];
    r2 += a2[j];
  }
  s1 = r1;
  s2 = r2;
}

template <typename scalar_t, typename acc_t>
void ncs_shifted_sums(const Raw<scalar_t>* __restrict__ x, const Geometry& g, int64_t ch,
                      int64_t q0, int64_t q1, acc_t k, double& out1, double& out2) {
  double t1 = 0, t2 = 0;
  for_each_run(g, ch, q0, q1, kBlock, [&](int64_t off, int64_t len) {
    Staging<scalar_t>::read1(x + off, len, [&](int64_t, const auto* __restrict__ v, int64_t n) {
      acc_t s1, s2;
      block_shifted_sums<acc_t>(v, n, k, s1, s2);
      t1 += s1;
      t2 += s2;
    });
  });
  out1 = t1;
  out2 = t2;
}

template <typename scalar_t, typename acc_t>
void ncs_normalize(const Raw<scalar_t>* __restrict__ x, Raw<scalar_t>* __restrict__ y,
                   const Geometry& g, int64_t ch, int64_t q0, int64_t q1, MeanSplit<acc_t> mu,
                   acc_t scale, acc_t shift) {
  for_each_run(g, ch, q0, q1, g.s, [&](int64_t off, int64_t len) {
    Staging<scalar_t>::map1(
        x + off, y + off, len,
        [&](int64_t, const auto* __restrict__ v, auto* __restrict__ out, int64_t n) {
          const acc_t hi = mu.hi, lo = mu.lo, sc = scale, sh = shift;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) out[i] = ((v[i] - hi) - lo) * sc + sh;
        });
  });
}

template <typename scalar_t, typename acc_t>
void ncs_grad_sums(const Raw<scalar_t>* __restrict__ dy, const Raw<scalar_t>* __restrict__ x,
                   const Geometry& g, int64_t ch, int64_t q0, int64_t q1, acc_t mu,
                   double& out_dy, double& out_dyxmu) {
  double t1 = 0, t2 = 0;
  for_each_run(g, ch, q0, q1, kBlock, [&](int64_t off, int64_t len) {
    Staging<scalar_t>::read2(
        dy + off, x + off, len,
        [&](int64_t, const auto* __restrict__ d, const auto* __restrict__ v, int64_t n) {
          acc_t s1, s2;
          block_grad_sums<acc_t>(d, v, n, mu, s1, s2);
          t1 += s1;
          t2 += s2;
        });
  });
  out_dy = t1;
  out_dyxmu = t2;
}

// dx = k * dy + a * (x - mu) + b  (the closed form of Section 3 with per-channel k, a, b)
template <typename scalar_t, typename acc_t>
void ncs_input_grad(const Raw<scalar_t>* __restrict__ dy, const Raw<scalar_t>* __restrict__ x,
                    Raw<scalar_t>* __restrict__ dx, const Geometry& g, int64_t ch, int64_t q0,
                    int64_t q1, acc_t mu, acc_t k, acc_t a, acc_t b) {
  for_each_run(g, ch, q0, q1, g.s, [&](int64_t off, int64_t len) {
    Staging<scalar_t>::map2(dy + off, x + off, dx + off, len,
                            [&](int64_t, const auto* __restrict__ d, const auto* __restrict__ v,
                                auto* __restrict__ out, int64_t n) {
                              const acc_t kk = k, aa = a, bb = b, m = mu;
#pragma omp simd
                              for (int64_t i = 0; i < n; ++i) {
                                out[i] = kk * d[i] + aa * (v[i] - m) + bb;
                              }
                            });
  });
}

// RC rows are processed in "super-rows" of W = C * rep values (rep whole rows), so a
// short row (a few channels, channels_last) still makes a long vector loop; per-channel
// arrays are tiled to W (value j of a super-row belongs to channel j % C).
int64_t tile_width(int64_t c) {
  constexpr int64_t kMinWidth = 256;
  return c >= kMinWidth ? c : c * ((kMinWidth + c - 1) / c);
}

template <typename T>
std::vector<T> tiled(const T* v, int64_t c, int64_t w) {
  std::vector<T> out(w);
  for (int64_t j = 0; j < w; ++j) out[j] = v[j % c];
  return out;
}

// Per-channel sums over rows [r0, r1) of f(j, a1, a2) accumulated per lane: blocks of
// kRowBlock super-rows in acc_t, block sums added in float64, folded to C channels.
// Within a block, super-row i goes to accumulator i % kRowChains, so each acc_t sum has
// 16 terms, not 64 (its rounding error grows with its length: float32 outputs of a
// (64, 256) batch were 1.3e-6 off with one chain, 5e-7 with four, torch's 5.8e-7); the
// chains are added pairwise at the block's end, and cost nothing per row.
template <typename acc_t, typename Body>
void rc_reduce(int64_t c, int64_t w, int64_t r0, int64_t r1, double* __restrict__ out1,
               double* __restrict__ out2, const Body& body) {
  static_assert(kRowChains == 4, "the pairwise sum below adds four chains");
  std::vector<acc_t> s1(kRowChains * w), s2(kRowChains * w);
  std::vector<double> d1(w, 0.0), d2(w, 0.0);
  const int64_t end = r1 * c;
  for (int64_t p = r0 * c; p < end;) {
    std::fill(s1.begin(), s1.end(), acc_t(0));
    std::fill(s2.begin(), s2.end(), acc_t(0));
    for (int64_t blk = 0; blk < kRowBlock && p < end; ++blk) {
      const int64_t len = std::min(w, end - p);
      const int64_t chain = (blk % kRowChains) * w;
      body(p, len, s1.data() + chain, s2.data() + chain);
      p += len;
    }
    const acc_t* a = s1.data();
    const acc_t* b = s2.data();
    for (int64_t j = 0; j < w; ++j) {
      d1[j] += double(a[j] + a[w + j]) + double(a[2 * w + j] + a[3 * w + j]);
      d2[j] += double(b[j] + b[w + j]) + double(b[2 * w + j] + b[3 * w + j]);
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    out1[j % c] += d1[j];
    out2[j % c] += d2[j];
  }
}

template <typename scalar_t, typename acc_t>
void rc_shifted_sums(const Raw<scalar_t>* __restrict__ x, int64_t c, int64_t w, int64_t r0,
                     int64_t r1, const acc_t* __restrict__ k, double* out1, double* out2) {
  rc_reduce<acc_t>(c, w, r0, r1, out1, out2,
                   [&](int64_t p, int64_t len, acc_t* __restrict__ a1, acc_t* __restrict__ a2) {
                     Staging<scalar_t>::read1(
                         x + p, len, [&](int64_t j0, const auto* __restrict__ v, int64_t n) {
                           const acc_t* __restrict__ kk = k + j0;
                           acc_t* __restrict__ b1 = a1 + j0;
                           acc_t* __restrict__ b2 = a2 + j0;
#pragma omp simd
                           for (int64_t j = 0; j < n; ++j) {
                             const acc_t d = v[j] - kk[j];
                             b1[j] += d;
                             b2[j] += d * d;
                           }
                         });
                   });
}

template <typename scalar_t, typename acc_t>
void rc_grad_sums(const Raw<scalar_t>* __restrict__ dy, const Raw<scalar_t>* __restrict__ x,
                  int64_t c, int64_t w, int64_t r0, int64_t r1,
                  const acc_t* __restrict__ mu, double* out1, double* out2) {
  rc_reduce<acc_t>(c, w, r0, r1, out1, out2,
                   [&](int64_t p, int64_t len, acc_t* __restrict__ a1, acc_t* __restrict__ a2) {
                     Staging<scalar_t>::read2(
                         dy + p, x + p, len,
                         [&](int64_t j0, const auto* __restrict__ d, const auto* __restrict__ v,
                             int64_t n) {
                           const acc_t* __restrict__ mm = mu + j0;
                           acc_t* __restrict__ b1 = a1 + j0;
                           acc_t* __restrict__ b2 = a2 + j0;
#pragma omp simd
                           for (int64_t j = 0; j < n; ++j) {
                             b1[j] += d[j];
                             b2[j] += d[j] * (v[j] - mm[j]);
                           }
                         });
                   });
}

// Number of row chunks: one per thread for large inputs, one for small ones.
int64_t row_tasks(int64_t rows, int64_t c) {
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t by_size = std::max<int64_t>(1, rows * c / kGrain);
  return std::max<int64_t>(1, std::min({nt, by_size, rows}));
}

// Split [0, total) into `parts` nearly equal ranges; range i.
inline void split(int64_t total, int64_t parts, int64_t i, int64_t& b, int64_t& e) {
  const int64_t q = total / parts, r = total % parts;
  b = i * q + std::min(i, r);
  e = b + q + (i < r ? 1 : 0);
}

// Chunks per channel for NCS when there are fewer channels than threads: each channel's
// N * S positions are split (across batch entries and within them).
int64_t ncs_batch_tasks(const Geometry& g) {
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (nt == 1 || g.c >= 4 * nt) return 1;
  const int64_t by_size = std::max<int64_t>(1, g.n * g.s / kGrain);
  return std::max<int64_t>(1, std::min((4 * nt + g.c - 1) / g.c, by_size));
}

// Channels per parallel_for grain so each task has about kGrain values.
int64_t channel_grain(const Geometry& g) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.n * g.s));
}

// An elementwise pass over RC input: body(p, len) for each super-row (len values from
// offset p; value j of it belongs to channel j % C, as the tiled arrays are indexed).
// Threads take contiguous ranges of rows.
template <typename Body>
void rc_super_rows(int64_t rows, int64_t C, int64_t W, const Body& body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
    const int64_t end = r1 * C;
    for (int64_t p = r0 * C; p < end; p += W) body(p, std::min(W, end - p));
  });
}

// The RC output pass: y = ((x - hi) - lo) * scale + shift per channel, over all rows.
template <typename scalar_t, typename acc_t>
void rc_normalize(const Raw<scalar_t>* __restrict__ xp, Raw<scalar_t>* __restrict__ yp,
                  int64_t rows, int64_t C, const acc_t* hi, const acc_t* lo, const acc_t* scales,
                  const acc_t* shifts) {
  const int64_t W = tile_width(C);
  const std::vector<acc_t> hi_t = tiled(hi, C, W), lo_t = tiled(lo, C, W);
  const std::vector<acc_t> sc_t = tiled(scales, C, W), sh_t = tiled(shifts, C, W);
  const acc_t* __restrict__ hp = hi_t.data();
  const acc_t* __restrict__ lp = lo_t.data();
  const acc_t* __restrict__ sp = sc_t.data();
  const acc_t* __restrict__ tp = sh_t.data();
  rc_super_rows(rows, C, W, [&](int64_t p, int64_t len) {
    Staging<scalar_t>::map1(
        xp + p, yp + p, len,
        [&](int64_t j0, const auto* __restrict__ v, auto* __restrict__ out, int64_t n) {
          const acc_t* __restrict__ h = hp + j0;
          const acc_t* __restrict__ l = lp + j0;
          const acc_t* __restrict__ sc = sp + j0;
          const acc_t* __restrict__ sh = tp + j0;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) out[j] = ((v[j] - h[j]) - l[j]) * sc[j] + sh[j];
        });
  });
}

// NCS with short runs on one thread, "streaming": x is read front to back (all
// channels of a batch entry, then the next entry) into per-channel sums, then front to
// back again for the output. A channel's runs lie C * S values apart, each on another
// page; a short one (S = 14 * 14 floats: 12 cache lines) ends before the hardware
// prefetcher has followed it, so one core reading channel by channel waits on memory
// run after run (software prefetch of the runs ahead did not help), while a contiguous
// stream is prefetched. With two or more threads the cores together keep memory busy on
// the per-channel path, which then wins: it reads x from memory once, this path twice
// (the second time partly from L3). Op times on a 2-core EPYC (L2 1 MiB, L3 32 MiB),
// (128, 256, 14, 14) float32, the two paths interleaved: 1 thread, streaming 2.2 ms
// against 2.8 ms per channel (forward), 3.0 against 3.4 (backward); 2 threads, 1.65
// against 1.6 and 2.2 against 1.9. Runs of 28 x 28 floats already gain nothing.
constexpr int64_t kStreamMaxRunBytes = 2048;
constexpr int64_t kStreamMinBytes = 1 << 20;  // smaller inputs stay in L2 either way
static_assert(kStreamMaxRunBytes / 2 <= kBlock, "a streamed run must be one block");

bool ncs_streams(const Geometry& g, int64_t elem_bytes) {
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  return nt == 1 && g.s * elem_bytes <= kStreamMaxRunBytes &&
         g.n * g.c * g.s * elem_bytes >= kStreamMinBytes;
}

// Per-channel shifted sums of the whole input, into out1/out2 (C each, zeroed).
template <typename scalar_t, typename acc_t>
void ncs_stream_shifted_sums(const Raw<scalar_t>* __restrict__ x, const Geometry& g,
                             const acc_t* __restrict__ k, double* __restrict__ out1,
                             double* __restrict__ out2) {
  for (int64_t r = 0; r < g.n * g.c; ++r) {  // run r: batch entry r / C, channel r % C
    const int64_t ch = r % g.c;
    Staging<scalar_t>::read1(x + r * g.s, g.s,
                             [&](int64_t, const auto* __restrict__ v, int64_t n) {
                               acc_t s1, s2;  // a run is one block (see the static_assert)
                               block_shifted_sums<acc_t>(v, n, k[ch], s1, s2);
                               out1[ch] += s1;
                               out2[ch] += s2;
                             });
  }
}

// Per-channel sum dy and sum dy * (x - mu) of the whole input, into out1/out2 (zeroed).
template <typename scalar_t, typename acc_t>
void ncs_stream_grad_sums(const Raw<scalar_t>* __restrict__ dy,
                          const Raw<scalar_t>* __restrict__ x, const Geometry& g,
                          const acc_t* __restrict__ mu, double* __restrict__ out1,
                          double* __restrict__ out2) {
  for (int64_t r = 0; r < g.n * g.c; ++r) {
    const int64_t ch = r % g.c;
    Staging<scalar_t>::read2(
        dy + r * g.s, x + r * g.s, g.s,
        [&](int64_t, const auto* __restrict__ d, const auto* __restrict__ v, int64_t n) {
          acc_t s1, s2;
          block_grad_sums<acc_t>(d, v, n, mu[ch], s1, s2);
          out1[ch] += s1;
          out2[ch] += s2;
        });
  }
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// The shift K of a channel's sums: the mean (in float64, rounded to acc_t) of up to
// kShiftSamples of its m values, spread evenly over them (values q = i * (m / 16)).
// Any K gives the exact statistics in exact arithmetic. In acc_t, the variance
// s2 / m - (s1 / m)^2 cancels by about 1 + (mean - K)^2 / var: a single sample as K
// (what the kernels used before) is often 2-3 std off, a cancellation of 5-10x, and
// float32 outputs were 1e-5 off on (64, 256) data of std 3 (torch: 5e-7). The mean of
// 16 samples is about std / 4 off, so the cancellation is about 1.06x.
constexpr int64_t kShiftSamples = 16;


template <typename scalar_t>
void train_forward_impl(const Tensor& x, const Tensor& w, const Tensor& b, double eps,
                        const Geometry& g, Tensor& y, Tensor& mean_out, Tensor& var_out,
                        Tensor& inv_std_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Raw<scalar_t>* xp = raw_ptr<scalar_t>(x);
  Raw<scalar_t>* yp = y.defined() ? raw_mut_ptr<scalar_t>(y) : nullptr;  // null: statistics only
  const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
  acc_t* mean_p = mean_out.mutable_data_ptr<acc_t>();
  acc_t* var_p = var_out.mutable_data_ptr<acc_t>();
  acc_t* inv_p = inv_std_out.mutable_data_ptr<acc_t>();
  const int64_t C = g.c;
  const double m = static_cast<double>(g.n) * static_cast<double>(g.s);

  // Per-channel statistics from the shifted sums, and the affine coefficients.
  auto finish = [&](int64_t ch, double k, double s1, double s2, double& mu, acc_t& scale,
                    acc_t& shift) {
    const double d = s1 / m;
    mu = k + d;
    const double biased_var = std::max(s2 / m - d * d, 0.0);
    mean_p[ch] = static_cast<acc_t>(mu);
    var_p[ch] = static_cast<acc_t>(biased_var);
    // inv_std from the variance as returned (acc_t), as the autograd layer computes it.
    // A variance that overflows acc_t gives NaN, as the pure-PyTorch path does (not the
    // finite, meaningless output inv_std = 0 would give): NaN is what shows divergence.
    const double stored_var = static_cast<acc_t>(biased_var);
    const double inv_std = std::isfinite(stored_var) ? 1.0 / std::sqrt(stored_var + eps)
                                                     : std::numeric_limits<double>::quiet_NaN();
    inv_p[ch] = static_cast<acc_t>(inv_std);
    scale = static_cast<acc_t>(wp ? static_cast<double>(wp[ch]) * inv_std : inv_std);
    shift = bp ? bp[ch] : acc_t(0);
  };

  if (g.layout == Layout::NCS) {
    // The shift K of each channel (kShiftSamples): value q of a channel is batch entry
    // q / S, position q % S; the samples' offsets are the same for every channel.
    const int64_t m_ch = g.n * g.s, ns = std::min<int64_t>(m_ch, kShiftSamples);
    std::vector<int64_t> sample_at(ns);
    for (int64_t i = 0; i < ns; ++i) {
      const int64_t q = i * (m_ch / ns);
      sample_at[i] = (q / g.s) * C * g.s + q % g.s;
    }
    auto first = [&](int64_t ch) {
      const Raw<scalar_t>* base = xp + ch * g.s;
      double sum = 0;
      for (int64_t i = 0; i < ns; ++i) sum += static_cast<double>(IO<scalar_t>::load(base[sample_at[i]]));
      return static_cast<acc_t>(sum / static_cast<double>(ns));
    };
    if (ncs_streams(g, sizeof(Raw<scalar_t>))) {
      // One thread, short runs: the sums in one pass over x, then the output in another.
      std::vector<acc_t> k(C), hi(C), lo(C), scales(C), shifts(C);
      std::vector<double> s1(C, 0.0), s2(C, 0.0);
      for (int64_t ch = 0; ch < C; ++ch) k[ch] = first(ch);
      ncs_stream_shifted_sums<scalar_t, acc_t>(xp, g, k.data(), s1.data(), s2.data());
      for (int64_t ch = 0; ch < C; ++ch) {
        double mu;
        finish(ch, k[ch], s1[ch], s2[ch], mu, scales[ch], shifts[ch]);
        const MeanSplit<acc_t> ms(mu);
        hi[ch] = ms.hi;
        lo[ch] = ms.lo;
      }
      if (!yp) return;  // statistics only
      for (int64_t r = 0; r < g.n * C; ++r) {
        const int64_t ch = r % C;
        Staging<scalar_t>::map1(
            xp + r * g.s, yp + r * g.s, g.s,
            [&](int64_t, const auto* __restrict__ v, auto* __restrict__ out, int64_t n) {
              const acc_t h = hi[ch], l = lo[ch], sc = scales[ch], sh = shifts[ch];
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) out[i] = ((v[i] - h) - l) * sc + sh;
            });
      }
      return;
    }
    const int64_t nb = ncs_batch_tasks(g);
    if (nb == 1) {
      // Fused per channel: statistics, then the output while the channel is in cache.
      at::parallel_for(0, C, channel_grain(g), [&](int64_t c0, int64_t c1) {
        for (int64_t ch = c0; ch < c1; ++ch) {
          const acc_t k = first(ch);
          double s1, s2, mu;
          acc_t scale, shift;
          ncs_shifted_sums<scalar_t, acc_t>(xp, g, ch, 0, g.n * g.s, k, s1, s2);
          finish(ch, k, s1, s2, mu, scale, shift);
          if (!yp) continue;  // statistics only
          ncs_normalize<scalar_t, acc_t>(xp, yp, g, ch, 0, g.n * g.s, MeanSplit<acc_t>(mu),
                                         scale, shift);
        }
      });
      return;
    }
    std::vector<double> p1(C * nb), p2(C * nb), mus(C);
    std::vector<acc_t> scales(C), shifts(C), k(C);
    for (int64_t ch = 0; ch < C; ++ch) k[ch] = first(ch);
    at::parallel_for(0, C * nb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t ch = t / nb, q0, q1;
        split(g.n * g.s, nb, t % nb, q0, q1);
        ncs_shifted_sums<scalar_t, acc_t>(xp, g, ch, q0, q1, k[ch], p1[t], p2[t]);
      }
    });
    for (int64_t ch = 0; ch < C; ++ch) {
      double s1 = 0, s2 = 0;
      for (int64_t i = 0; i < nb; ++i) {
        s1 += p1[ch * nb + i];
        s2 += p2[ch * nb + i];
      }
      finish(ch, k[ch], s1, s2, mus[ch], scales[ch], shifts[ch]);
    }
    if (!yp) return;  // statistics only
    at::parallel_for(0, C * nb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t ch = t / nb, q0, q1;
        split(g.n * g.s, nb, t % nb, q0, q1);
        ncs_normalize<scalar_t, acc_t>(xp, yp, g, ch, q0, q1, MeanSplit<acc_t>(mus[ch]),
                                       scales[ch], shifts[ch]);
      }
    });
    return;
  }

  // RC: rows of C channels.
  const int64_t rows = g.n * g.s;
  const int64_t nt = row_tasks(rows, C);
  const int64_t W = tile_width(C);
  std::vector<acc_t> k(C);
  {  // the shift K of each channel (kShiftSamples), row by row so the loads stream
    const int64_t ns = std::min<int64_t>(rows, kShiftSamples), step = rows / ns;
    std::vector<double> sum(C, 0.0);
    for (int64_t i = 0; i < ns; ++i) {
      const Raw<scalar_t>* row = xp + i * step * C;
      for (int64_t ch = 0; ch < C; ++ch) sum[ch] += static_cast<double>(IO<scalar_t>::load(row[ch]));
    }
    for (int64_t ch = 0; ch < C; ++ch) k[ch] = static_cast<acc_t>(sum[ch] / static_cast<double>(ns));
  }
  const std::vector<acc_t> kt = tiled(k.data(), C, W);
  std::vector<double> p1(nt * C, 0.0), p2(nt * C, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t r0, r1;
      split(rows, nt, t, r0, r1);
      rc_shifted_sums<scalar_t, acc_t>(xp, C, W, r0, r1, kt.data(), p1.data() + t * C,
                                       p2.data() + t * C);
    }
  });
  std::vector<acc_t> hi(C), lo(C), scales(C), shifts(C);
  for (int64_t ch = 0; ch < C; ++ch) {
    double s1 = 0, s2 = 0, mu;
    for (int64_t t = 0; t < nt; ++t) {
      s1 += p1[t * C + ch];
      s2 += p2[t * C + ch];
    }
    finish(ch, k[ch], s1, s2, mu, scales[ch], shifts[ch]);
    MeanSplit<acc_t> ms(mu);
    hi[ch] = ms.hi;
    lo[ch] = ms.lo;
  }
  if (!yp) return;  // statistics only
  rc_normalize<scalar_t, acc_t>(xp, yp, rows, C, hi.data(), lo.data(), scales.data(),
                                shifts.data());
}

// A per-channel (C,) vector as a contiguous acc_t tensor (undefined when absent).
Tensor channel_vector(const Tensor& t, at::ScalarType acc, int64_t c, const char* name) {
  if (!t.defined()) return Tensor();
  TORCH_CHECK(t.numel() == c && t.device().is_cpu(), "bnlab: ", name,
              " must be a CPU tensor of ", c, " elements (one per channel), got shape ",
              t.sizes(), " on ", t.device());
  // Most calls pass contiguous acc_t vectors already: no dispatcher round trip then.
  if (t.scalar_type() == acc && t.is_contiguous()) return t;
  return t.to(acc).contiguous();
}

Tensor channel_vector(const c10::optional<Tensor>& t, at::ScalarType acc, int64_t c,
                      const char* name) {
  return channel_vector(t.value_or(Tensor()), acc, c, name);
}

// The training forward: (y, mu_b, biased_var_b, inv_std), inv_std = 1/sqrt(var + eps).
// stats_only: y is not written (an undefined tensor is returned in its place).
std::tuple<Tensor, Tensor, Tensor, Tensor> train_forward(const Tensor& x_in, const Tensor& weight,
                                                         const Tensor& bias, double eps,
                                                         bool stats_only = false) {
  TORCH_CHECK(x_in.dim() >= 2, "bnlab::bn_train_fwd: expected (N, C, *) input, got ",
              x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "bnlab::bn_train_fwd: CPU tensors only");
  const Tensor x = as_supported_layout(x_in);
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t C = x.size(1);
  Tensor y = stats_only ? Tensor() : at::empty_like(x, at::MemoryFormat::Preserve);
  Tensor mean = at::empty({C}, x.options().dtype(acc));
  Tensor var = at::empty({C}, x.options().dtype(acc));
  Tensor inv_std = at::empty({C}, x.options().dtype(acc));
  const Geometry g = geometry_of(x);
  TORCH_CHECK(g.n * g.s > 0 || C == 0, "bnlab::bn_train_fwd: empty batch");
  if (x.numel() == 0) return {y, mean, var, inv_std};
  const Tensor w = channel_vector(weight, acc, C, "weight");
  const Tensor b = channel_vector(bias, acc, C, "bias");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_train_fwd", [&] {
    train_forward_impl<scalar_t>(x, w, b, eps, g, y, mean, var, inv_std);
  });
  return {y, mean, var, inv_std};
}

std::tuple<Tensor, Tensor, Tensor> bn_train_fwd(const Tensor& x,
                                                const c10::optional<Tensor>& weight,
                                                const c10::optional<Tensor>& bias, double eps) {
  auto [y, mean, var, inv_std] =
      train_forward(x, weight.value_or(Tensor()), bias.value_or(Tensor()), eps);
  return {y, mean, var};
}

// Algorithm 1, lines 1-2 only: (mu_b, biased_var_b), for SyncBatchNorm's local part.
std::tuple<Tensor, Tensor> bn_stats(const Tensor& x) {
  auto [y, mean, var, inv_std] = train_forward(x, Tensor(), Tensor(), 1.0, /*stats_only=*/true);
  return {mean, var};
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// Coefficients of dx = k dy + a (x - mu) + b, the closed form of Section 3 for one channel
// (gamma, inv_std, sum dy and sum dy (x - mu) over m values):
//   k = gamma * inv_std, a = -k inv_std^2 sum_dy_xmu / m, b = -k sum_dy / m.
template <typename acc_t>
inline void input_grad_coefs(double gamma, double inv_std, double sum_dy, double sum_dy_xmu,
                             double m, acc_t& k, acc_t& a, acc_t& b) {
  const double kk = gamma * inv_std;
  k = static_cast<acc_t>(kk);
  a = static_cast<acc_t>(-kk * inv_std * inv_std * sum_dy_xmu / m);
  b = static_cast<acc_t>(-kk * sum_dy / m);
}

// A one-pass elementwise map over NCS input in memory order: body(channel, offset) for
// run r (batch entry r / C, channel r % C; S contiguous values at offset r * S). Threads
// take contiguous ranges of runs, so each streams through memory; visiting a channel's
// runs one after another instead (they lie C * S apart) leaves the hardware prefetcher
// behind on short runs: inference on (128, 256, 14, 14) took 2.1x torch's time that way.
template <typename Body>
void ncs_runs(const Geometry& g, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.s));
  at::parallel_for(0, g.n * g.c, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) body(r % g.c, r * g.s);
  });
}

// The dx pass of the backward: dx = k dy + a (x - mu) + b per channel (coefficients
// from the two reduced sums), for every layout.
template <typename scalar_t, typename acc_t>
void rc_input_grad(const Raw<scalar_t>* __restrict__ dp, const Raw<scalar_t>* __restrict__ xp,
                   Raw<scalar_t>* __restrict__ dxp, int64_t rows, int64_t C, const acc_t* ks,
                   const acc_t* as, const acc_t* bs, const acc_t* mu) {
  const int64_t W = tile_width(C);
  const std::vector<acc_t> k_t = tiled(ks, C, W), a_t = tiled(as, C, W);
  const std::vector<acc_t> b_t = tiled(bs, C, W), mu_t = tiled(mu, C, W);
  const acc_t* __restrict__ kp = k_t.data();
  const acc_t* __restrict__ ap = a_t.data();
  const acc_t* __restrict__ bp = b_t.data();
  const acc_t* __restrict__ mup = mu_t.data();
  rc_super_rows(rows, C, W, [&](int64_t p, int64_t len) {
    Staging<scalar_t>::map2(
        dp + p, xp + p, dxp + p, len,
        [&](int64_t j0, const auto* __restrict__ d, const auto* __restrict__ v,
            auto* __restrict__ out, int64_t n) {
          const acc_t* __restrict__ kk = kp + j0;
          const acc_t* __restrict__ aa = ap + j0;
          const acc_t* __restrict__ bb = bp + j0;
          const acc_t* __restrict__ mm = mup + j0;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) out[j] = kk[j] * d[j] + aa[j] * (v[j] - mm[j]) + bb[j];
        });
  });
}

template <typename scalar_t, typename acc_t>
void input_grad_pass(const Raw<scalar_t>* dp, const Raw<scalar_t>* xp, Raw<scalar_t>* dxp,
                     const Geometry& g, const acc_t* ks, const acc_t* as, const acc_t* bs,
                     const acc_t* mu) {
  if (g.layout == Layout::RC) {
    rc_input_grad<scalar_t, acc_t>(dp, xp, dxp, g.n * g.s, g.c, ks, as, bs, mu);
    return;
  }
  ncs_runs(g, [&](int64_t ch, int64_t off) {
    Staging<scalar_t>::map2(
        dp + off, xp + off, dxp + off, g.s,
        [&](int64_t, const auto* __restrict__ d, const auto* __restrict__ v,
            auto* __restrict__ out, int64_t n) {
          const acc_t kk = ks[ch], aa = as[ch], bb = bs[ch], m = mu[ch];
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) out[i] = kk * d[i] + aa * (v[i] - m) + bb;
        });
  });
}


template <typename scalar_t>
void backward_impl(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                   const Tensor& inv_std, const Geometry& g, Tensor& dx, Tensor& sum_dy_out,
                   Tensor& sum_dyxhat_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Raw<scalar_t>* xp = raw_ptr<scalar_t>(x);
  const Raw<scalar_t>* dp = raw_ptr<scalar_t>(dy);
  Raw<scalar_t>* dxp = dx.defined() ? raw_mut_ptr<scalar_t>(dx) : nullptr;
  const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* ip = inv_std.const_data_ptr<acc_t>();
  acc_t* sdy = sum_dy_out.mutable_data_ptr<acc_t>();
  acc_t* sdx = sum_dyxhat_out.mutable_data_ptr<acc_t>();
  const int64_t C = g.c;
  const double m = static_cast<double>(g.n) * static_cast<double>(g.s);

  // The sums, then the coefficients of dx = k dy + a (x - mu) + b (input_grad_coefs).
  auto coefs = [&](int64_t ch, double s_dy, double s_dyxmu, acc_t& k, acc_t& a, acc_t& b) {
    sdy[ch] = static_cast<acc_t>(s_dy);
    sdx[ch] = static_cast<acc_t>(s_dyxmu * ip[ch]);  // sum dy * xhat = dl/dgamma
    input_grad_coefs(wp ? static_cast<double>(wp[ch]) : 1.0, ip[ch], s_dy, s_dyxmu, m, k, a, b);
  };

  if (g.layout == Layout::NCS) {
    if (ncs_streams(g, sizeof(Raw<scalar_t>))) {
      // One thread, short runs (as in the forward): the sums in one pass, then dx.
      std::vector<double> s1(C, 0.0), s2(C, 0.0);
      std::vector<acc_t> ks(C), as(C), bs(C);
      ncs_stream_grad_sums<scalar_t, acc_t>(dp, xp, g, mp, s1.data(), s2.data());
      for (int64_t ch = 0; ch < C; ++ch) coefs(ch, s1[ch], s2[ch], ks[ch], as[ch], bs[ch]);
      if (!dxp) return;
      for (int64_t r = 0; r < g.n * C; ++r) {
        const int64_t ch = r % C;
        Staging<scalar_t>::map2(
            dp + r * g.s, xp + r * g.s, dxp + r * g.s, g.s,
            [&](int64_t, const auto* __restrict__ d, const auto* __restrict__ v,
                auto* __restrict__ out, int64_t n) {
              const acc_t kk = ks[ch], aa = as[ch], bb = bs[ch], m = mp[ch];
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) out[i] = kk * d[i] + aa * (v[i] - m) + bb;
            });
      }
      return;
    }
    const int64_t nb = ncs_batch_tasks(g);
    if (nb == 1) {
      at::parallel_for(0, C, channel_grain(g), [&](int64_t c0, int64_t c1) {
        for (int64_t ch = c0; ch < c1; ++ch) {
          double s1, s2;
          acc_t k, a, b;
          ncs_grad_sums<scalar_t, acc_t>(dp, xp, g, ch, 0, g.n * g.s, mp[ch], s1, s2);
          coefs(ch, s1, s2, k, a, b);
          if (dxp) {
            ncs_input_grad<scalar_t, acc_t>(dp, xp, dxp, g, ch, 0, g.n * g.s, mp[ch], k, a, b);
          }
        }
      });
      return;
    }
    std::vector<double> p1(C * nb), p2(C * nb);
    std::vector<acc_t> ks(C), as(C), bs(C);
    at::parallel_for(0, C * nb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t ch = t / nb, q0, q1;
        split(g.n * g.s, nb, t % nb, q0, q1);
        ncs_grad_sums<scalar_t, acc_t>(dp, xp, g, ch, q0, q1, mp[ch], p1[t], p2[t]);
      }
    });
    for (int64_t ch = 0; ch < C; ++ch) {
      double s1 = 0, s2 = 0;
      for (int64_t i = 0; i < nb; ++i) {
        s1 += p1[ch * nb + i];
        s2 += p2[ch * nb + i];
      }
      coefs(ch, s1, s2, ks[ch], as[ch], bs[ch]);
    }
    if (!dxp) return;
    at::parallel_for(0, C * nb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t ch = t / nb, q0, q1;
        split(g.n * g.s, nb, t % nb, q0, q1);
        ncs_input_grad<scalar_t, acc_t>(dp, xp, dxp, g, ch, q0, q1, mp[ch], ks[ch], as[ch],
                                        bs[ch]);
      }
    });
    return;
  }

  const int64_t rows = g.n * g.s;
  const int64_t nt = row_tasks(rows, C);
  const int64_t W = tile_width(C);
  const std::vector<acc_t> mu_t = tiled(mp, C, W);
  std::vector<double> p1(nt * C, 0.0), p2(nt * C, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t r0, r1;
      split(rows, nt, t, r0, r1);
      rc_grad_sums<scalar_t, acc_t>(dp, xp, C, W, r0, r1, mu_t.data(), p1.data() + t * C,
                                    p2.data() + t * C);
    }
  });
  std::vector<acc_t> ks(C), as(C), bs(C);
  for (int64_t ch = 0; ch < C; ++ch) {
    double s1 = 0, s2 = 0;
    for (int64_t t = 0; t < nt; ++t) {
      s1 += p1[t * C + ch];
      s2 += p2[t * C + ch];
    }
    coefs(ch, s1, s2, ks[ch], as[ch], bs[ch]);
  }
  if (!dxp) return;
  rc_input_grad<scalar_t, acc_t>(dp, xp, dxp, rows, C, ks.data(), as.data(), bs.data(), mp);
}

std::tuple<Tensor, Tensor, Tensor> bn_bwd(const Tensor& grad_y, const Tensor& x_in,
                                          const c10::optional<Tensor>& weight,
                                          const Tensor& mean, const Tensor& inv_std,
                                          bool need_x) {
  TORCH_CHECK(x_in.dim() >= 2 && grad_y.sizes() == x_in.sizes(),
              "bnlab::bn_bwd: grad_y ", grad_y.sizes(), " and x ", x_in.sizes(),
              " must have the same (N, C, *) shape");
  TORCH_CHECK(x_in.device().is_cpu() && grad_y.device().is_cpu(),
              "bnlab::bn_bwd: CPU tensors only");
  const Tensor x = as_supported_layout(x_in);
  const Tensor dy = like_layout(grad_y, x);
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t C = x.size(1);
  Tensor dx = need_x ? at::empty_like(x, at::MemoryFormat::Preserve)
                     : at::empty({0}, x.options());
  Tensor sum_dy = at::empty({C}, x.options().dtype(acc));
  Tensor sum_dyxhat = at::empty({C}, x.options().dtype(acc));
  if (x.numel() == 0) {
    sum_dy.zero_();
    sum_dyxhat.zero_();
    return {dx, sum_dyxhat, sum_dy};
  }
  const Tensor w = channel_vector(weight, acc, C, "weight");
  const Tensor mu = channel_vector(mean, acc, C, "mean");
  const Tensor is = channel_vector(inv_std, acc, C, "inv_std");
  const Geometry g = geometry_of(x);
  Tensor dx_arg = need_x ? dx : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_bwd", [&] {
    backward_impl<scalar_t>(dy, x, w, mu, is, g, dx_arg, sum_dy, sum_dyxhat);
  });
  return {dx, sum_dyxhat, sum_dy};
}

// dl/dx from sums reduced elsewhere (SyncBatchNorm: over every process), m values:
//   dx = k dy - k sum_dy / m - (k inv_std^2 sum_dy_xmu / m) (x - mu),  k = gamma inv_std
Tensor bn_input_grad(const Tensor& grad_y, const Tensor& x_in,
                     const c10::optional<Tensor>& weight, const Tensor& mean,
                     const Tensor& inv_std, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                     int64_t m) {
  TORCH_CHECK(x_in.dim() >= 2 && grad_y.sizes() == x_in.sizes() && x_in.device().is_cpu() &&
                  grad_y.device().is_cpu() && m > 0,
              "bnlab::bn_input_grad: grad_y and x must be CPU tensors of one (N, C, *) shape "
              "and m positive");
  const Tensor x = as_supported_layout(x_in);
  const Tensor dy = like_layout(grad_y, x);
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t C = x.size(1);
  Tensor dx = at::empty_like(x, at::MemoryFormat::Preserve);
  if (x.numel() == 0) return dx;
  const Tensor w = channel_vector(weight, acc, C, "weight");
  const Tensor mu = channel_vector(mean, acc, C, "mean");
  const Tensor is = channel_vector(inv_std, acc, C, "inv_std");
  const Tensor s1 = sum_dy.to(at::kDouble).contiguous(), s2 = sum_dy_xmu.to(at::kDouble).contiguous();
  TORCH_CHECK(s1.numel() == C && s2.numel() == C, "bnlab::bn_input_grad: sums must have ", C,
              " elements");
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_input_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* ip = is.const_data_ptr<acc_t>();
    const double* p1 = s1.const_data_ptr<double>();
    const double* p2 = s2.const_data_ptr<double>();
    std::vector<acc_t> ks(C), as(C), bs(C);
    for (int64_t ch = 0; ch < C; ++ch) {
      input_grad_coefs(wp ? static_cast<double>(wp[ch]) : 1.0, ip[ch], p1[ch], p2[ch],
                       static_cast<double>(m), ks[ch], as[ch], bs[ch]);
    }
    input_grad_pass<scalar_t, acc_t>(raw_ptr<scalar_t>(dy), raw_ptr<scalar_t>(x),
                                     raw_mut_ptr<scalar_t>(dx), g, ks.data(), as.data(),
                                     bs.data(), mu.const_data_ptr<acc_t>());
  });
  return dx;
}

// ---------------------------------------------------------------------------
// Inference (Algorithm 2, step 11): y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta
// ---------------------------------------------------------------------------

template <typename scalar_t>
void eval_impl(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& mean,
               const Tensor& var, double eps, const Geometry& g, Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const Raw<scalar_t>* xp = raw_ptr<scalar_t>(x);
  Raw<scalar_t>* yp = raw_mut_ptr<scalar_t>(y);
  const int64_t C = g.c;
  const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* vp = var.const_data_ptr<acc_t>();
  // The mean is subtracted before scaling, as in training, so |E[x]| >> std keeps its
  // precision (a folded scale * x + shift would cancel).
  std::vector<acc_t> hi(C), lo(C), scales(C), shifts(C);
  for (int64_t ch = 0; ch < C; ++ch) {
    const acc_t inv_std = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(vp[ch]) + eps));
    hi[ch] = mp[ch];
    lo[ch] = acc_t(0);
    scales[ch] = wp ? wp[ch] * inv_std : inv_std;
    shifts[ch] = bp ? bp[ch] : acc_t(0);
  }
  if (g.layout == Layout::RC) {
    rc_normalize<scalar_t, acc_t>(xp, yp, g.n * g.s, C, hi.data(), lo.data(), scales.data(),
                                  shifts.data());
    return;
  }
  ncs_runs(g, [&](int64_t ch, int64_t off) {
    Staging<scalar_t>::map1(
        xp + off, yp + off, g.s,
        [&](int64_t, const auto* __restrict__ v, auto* __restrict__ out, int64_t n) {
          const acc_t h = hi[ch], sc = scales[ch], sh = shifts[ch];
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) out[i] = (v[i] - h) * sc + sh;
        });
  });
}

Tensor bn_eval(const Tensor& x_in, const c10::optional<Tensor>& weight,
               const c10::optional<Tensor>& bias, const Tensor& running_mean,
               const Tensor& running_var, double eps) {
  TORCH_CHECK(x_in.dim() >= 2 && x_in.device().is_cpu(),
              "bnlab::bn_eval: expected a CPU (N, C, *) input, got ", x_in.sizes());
  const Tensor x = as_supported_layout(x_in);
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t C = x.size(1);
  Tensor y = at::empty_like(x, at::MemoryFormat::Preserve);
  if (x.numel() == 0) return y;
  const Tensor w = channel_vector(weight, acc, C, "weight");
  const Tensor b = channel_vector(bias, acc, C, "bias");
  const Tensor mean = channel_vector(running_mean, acc, C, "running_mean");
  const Tensor var = channel_vector(running_var, acc, C, "running_var");
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_eval", [&] {
    eval_impl<scalar_t>(x, w, b, mean, var, eps, g, y);
  });
  return y;
}

// ---------------------------------------------------------------------------
// Fused training step for modules: forward, running statistics, autograd in C++
// ---------------------------------------------------------------------------
//
// bnlab::bn_train is what a BN layer's training forward costs on a small input, where
// the arithmetic is a few microseconds and the rest is per-call overhead: one op call
// runs the forward kernel, updates the running statistics (and the batch count) in
// place, and records a C++ autograd node whose backward is the bn_bwd kernel, with no
// Python in the forward or the backward. The Python path (bnlab.autograd) remains the
// reference and runs under torch.compile, torch.func transforms and forward-mode AD.

// Algorithm 2, step 10 with PyTorch's momentum convention, in place:
//   running_mean = (1 - momentum) * running_mean + momentum * mu_B
//   running_var  = (1 - momentum) * running_var  + momentum * m / (m - 1) * sigma2_B
// Channels whose batch mean or variance is not finite keep their running statistics
// (as bnlab.core.update_running_stats). Returns the number of such channels.
template <typename r_t, typename acc_t>
int64_t update_running_impl(r_t* rm, r_t* rv, const acc_t* mu, const acc_t* var, int64_t C,
                            double m, double momentum) {
  int64_t skipped = 0;
  const double unbias = m / (m - 1);
  for (int64_t ch = 0; ch < C; ++ch) {
    const double mu_c = mu[ch], var_c = var[ch];
    if (!std::isfinite(mu_c + var_c)) {
      ++skipped;
      continue;
    }
    if (rm) rm[ch] = static_cast<r_t>((1 - momentum) * double(rm[ch]) + momentum * mu_c);
    if (rv) rv[ch] = static_cast<r_t>((1 - momentum) * double(rv[ch]) + momentum * unbias * var_c);
  }
  return skipped;
}

int64_t update_running(Tensor& rm, Tensor& rv, const Tensor& mu, const Tensor& var, double m,
                       double momentum) {
  const Tensor& any = rm.defined() ? rm : rv;
  for (const Tensor* t : {&rm, &rv}) {
    TORCH_CHECK(!t->defined() || (t->is_contiguous() && t->scalar_type() == any.scalar_type() &&
                                  t->numel() == mu.numel() && t->device().is_cpu()),
                "bnlab::bn_train: running_mean and running_var must be contiguous CPU tensors "
                "of one dtype with one element per channel");
  }
  int64_t skipped = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, any.scalar_type(), "bn_running", [&] {
    using acc_t = float;
    auto ptr = [](Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    if (mu.scalar_type() == at::kDouble) {
      skipped = update_running_impl(ptr(rm), ptr(rv), mu.const_data_ptr<double>(),
                                    var.const_data_ptr<double>(), mu.numel(), m, momentum);
    } else {
      skipped = update_running_impl(ptr(rm), ptr(rv), mu.const_data_ptr<acc_t>(),
                                    var.const_data_ptr<acc_t>(), mu.numel(), m, momentum);
    }
  });
  // In-place writes outside the dispatcher: bump the version counters ourselves, so
  // autograd notices if a graph had saved these buffers.
  for (Tensor* t : {&rm, &rv}) {
    if (t->defined()) t->unsafeGetTensorImpl()->bump_version();
  }
  return skipped;
}

// The reduce dims of x: every dim but the channel dim 1.
std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

// The backward as differentiable ATen ops, for double backward (create_graph=True):
// the batch statistics are re-derived from x, so the second derivative sees their
// dependence on x (as bnlab.autograd.BatchNormTrainFunction.backward does).
torch::autograd::variable_list differentiable_backward(const Tensor& grad_y, const Tensor& x,
                                                       const Tensor& weight, double eps,
                                                       const std::array<bool, 3>& need) {
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto dims = reduce_dims(x);
  std::vector<int64_t> view(x.dim(), 1);
  view[1] = x.size(1);
  const Tensor xc = x.to(acc), dy = grad_y.to(acc);
  const double m = static_cast<double>(x.numel() / x.size(1));
  const Tensor x_mu = xc - xc.mean(dims, /*keepdim=*/true);
  const Tensor inv_std = at::rsqrt((x_mu * x_mu).mean(dims, /*keepdim=*/true) + eps);
  const Tensor x_hat = x_mu * inv_std;
  const Tensor sum_dy = dy.sum(dims, /*keepdim=*/true);
  const Tensor sum_dy_xhat = (dy * x_hat).sum(dims, /*keepdim=*/true);
  Tensor gx, gw, gb;
  if (need[0]) {
    Tensor k = weight.defined() ? inv_std * weight.to(acc).reshape(view) : inv_std;
    gx = (k * (dy - sum_dy / m - x_hat * (sum_dy_xhat / m))).to(x.scalar_type());
  }
  // Sums without keepdim, not flatten(): vmap's legacy batching (is_grads_batched) has
  // no rule for flatten.
  if (need[1] && weight.defined()) gw = (dy * x_hat).sum(dims).to(weight.scalar_type());
  if (need[2]) gb = dy.sum(dims).to(weight.defined() ? weight.scalar_type() : x.scalar_type());
  return {gx, gw, gb};
}

// The autograd node of bn_train: dl/dx, dl/dgamma, dl/dbeta by the bn_bwd kernel (a
// hand-written Node, as PyTorch's generated ones are: a torch::autograd::Function costs
// about a microsecond more per call, a tenth of a small layer's forward).
struct TrainBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x_, weight_;
  Tensor mean_, inv_std_;  // made here and never handed out: no version check needed
  double eps_ = 0;
  bool has_weight_ = false, has_bias_ = false;

  std::string name() const override { return "BnlabBatchNormBackward"; }

  void release_variables() override {
    x_.reset_data();
    weight_.reset_data();
    mean_.reset();
    inv_std_.reset();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    // Edges: 0 x, 1 weight, 2 bias (an absent weight or bias has an invalid edge).
    const std::array<bool, 3> need{task_should_compute_output(0),
                                   has_weight_ && task_should_compute_output(1),
                                   has_bias_ && task_should_compute_output(2)};
    const Tensor& grad_y = grads[0];
    if (!grad_y.defined() || !(need[0] || need[1] || need[2])) return {Tensor(), Tensor(), Tensor()};
    const Tensor x = x_.unpack(getptr());
    const Tensor weight = weight_.unpack(getptr());
    // create_graph=True, or batched gradients (is_grads_batched, gradcheck's batched-grad
    // check: grad_y is then a vmap-wrapped tensor without storage): differentiable ATen ops.
    if (at::GradMode::is_enabled() || !grad_y.has_storage() || grad_y.layout() != at::kStrided ||
        !grad_y.device().is_cpu()) {
      return differentiable_backward(grad_y, x, weight, eps_, need);
    }
    auto [gx, sum_dy_xhat, sum_dy] =
        bn_bwd(grad_y, x, weight.defined() ? c10::optional<Tensor>(weight) : c10::nullopt, mean_,
               inv_std_, need[0]);
    auto as = [](const Tensor& t, at::ScalarType dtype) {
      return t.scalar_type() == dtype ? t : t.to(dtype);
    };
    Tensor gw, gb;
    if (need[1]) gw = as(sum_dy_xhat, weight.scalar_type());
    if (need[2]) gb = as(sum_dy, weight.defined() ? weight.scalar_type() : grad_y.scalar_type());
    return {need[0] ? gx : Tensor(), gw, gb};
  }
};

// Algorithm 1 by the kernels, recording a TrainBackward node when autograd needs one.
// Returns (y, mu_b, biased_var_b).
std::tuple<Tensor, Tensor, Tensor> train_forward_recorded(const Tensor& x, const Tensor& weight,
                                                          const Tensor& bias, double eps) {
  const bool record = torch::autograd::compute_requires_grad(x, weight, bias);
  Tensor y, mean, var, inv_std;
  {
    at::NoGradGuard no_grad;  // the kernels' own conversions are not part of the graph
    std::tie(y, mean, var, inv_std) = train_forward(x, weight, bias, eps);
  }
  if (record) {
    auto node = c10::make_intrusive<TrainBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
    node->x_ = torch::autograd::SavedVariable(x, /*is_output=*/false);
    node->weight_ = torch::autograd::SavedVariable(weight, /*is_output=*/false);
    node->mean_ = mean;
    node->inv_std_ = inv_std;
    node->eps_ = eps;
    node->has_weight_ = weight.defined();
    node->has_bias_ = bias.defined();
    torch::autograd::set_history(y, node);
  }
  return {y, mean, var};
}

// Returns (y, mu_b, biased_var_b, number of channels whose running update was skipped).
// num_batches_tracked (when given) is incremented; momentum None is then the cumulative
// average 1 / num_batches_tracked, as in torch.nn.BatchNorm*d.
std::tuple<Tensor, Tensor, Tensor, int64_t> bn_train(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    c10::optional<Tensor> running_mean, c10::optional<Tensor> running_var,
    c10::optional<Tensor> num_batches_tracked, c10::optional<double> momentum, double eps) {
  auto [y, mean, var] = train_forward_recorded(x, weight.value_or(Tensor()),
                                               bias.value_or(Tensor()), eps);
  Tensor rm = running_mean.value_or(Tensor()), rv = running_var.value_or(Tensor());
  int64_t skipped = 0;
  if (rm.defined() || rv.defined()) {
    double mom = momentum.value_or(0.0);
    if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      Tensor& nbt = *num_batches_tracked;
      TORCH_CHECK(nbt.numel() == 1 && nbt.scalar_type() == at::kLong && nbt.device().is_cpu(),
                  "bnlab::bn_train: num_batches_tracked must be a CPU int64 scalar");
      int64_t& count = *nbt.mutable_data_ptr<int64_t>();
      count += 1;
      nbt.unsafeGetTensorImpl()->bump_version();
      if (!momentum.has_value()) mom = 1.0 / static_cast<double>(count);
    }
    at::NoGradGuard no_grad;
    skipped = update_running(rm, rv, mean, var, static_cast<double>(x.numel() / x.size(1)), mom);
  }
  return {y, mean, var, skipped};
}

// What the Python entry points below accept (else they return None and the caller's
// pure path runs): an input the kernels take, per-channel CPU vectors.
bool supported_input(const Tensor& x) {
  const auto dtype = x.scalar_type();
  return (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
          dtype == at::kBFloat16) &&
         x.dim() >= 2 && x.numel() > 0 && x.device().is_cpu() && x.has_storage() &&
         x.layout() == at::kStrided;
}

bool cpu_vector(const c10::optional<Tensor>& t, const Tensor& x) {
  return !t.has_value() || !t->defined() ||
         (t->device().is_cpu() && t->numel() == x.size(1) && t->has_storage() &&
          at::isFloatingType(t->scalar_type()));
}

// A per-channel buffer the kernels update in place (else the caller's pure path runs).
bool updatable(const c10::optional<Tensor>& t, const Tensor& x) {
  return cpu_vector(t, x) && (!t.has_value() || !t->defined() || t->is_contiguous());
}

// bn_eval for plain eager calls from Python (bnlab.backend.eval_forward), without the
// dispatcher's boxing; None where the kernels do not take these tensors.
py::object eval_forward(const Tensor& x, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias, const Tensor& running_mean,
                        const Tensor& running_var, double eps) {
  if (!supported_input(x) || !cpu_vector(weight, x) || !cpu_vector(bias, x) ||
      !cpu_vector(running_mean, x) || !cpu_vector(running_var, x)) {
    return py::none();
  }
  return py::cast(bn_eval(x, weight, bias, running_mean, running_var, eps));
}

// bn_train for plain eager calls from Python (bnlab.backend.train_step), without the
// dispatcher's boxing; None where the kernels do not take these tensors.
py::object train_step(const Tensor& x, const c10::optional<Tensor>& weight,
                      const c10::optional<Tensor>& bias, c10::optional<Tensor> running_mean,
                      c10::optional<Tensor> running_var, c10::optional<Tensor> num_batches_tracked,
                      c10::optional<double> momentum, double eps) {
  if (!supported_input(x) || !cpu_vector(weight, x) || !cpu_vector(bias, x) ||
      !updatable(running_mean, x) ||
      !updatable(running_var, x) ||
      (running_mean.has_value() && running_var.has_value() && running_mean->defined() &&
       running_var->defined() && running_mean->scalar_type() != running_var->scalar_type())) {
    return py::none();
  }
  auto out = bn_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                      eps);
  return py::cast(out);
}

}  // namespace

// ---------------------------------------------------------------------------
// BN followed by an activation, fused (bnlab.nn.BatchNormAct2d and its kin)
// ---------------------------------------------------------------------------
//
//   bnlab::bn_act_train_fwd(x, weight?, bias?, eps, act, slope) -> (y, mu_b, biased_var_b)
//   bnlab::bn_act_bwd(grad_y, saved, weight?, bias?, mu_b, inv_std, act, slope, from_output,
//                     need_x) -> (grad_x, sum_dz_xhat, sum_dz)
//
// y = f(z), z = gamma * xhat + beta, f one of Act (the ids bnlab.core.ACTIVATIONS has, in
// order). The forward is the statistics pass of bn_train_fwd and one output pass that
// applies f as it writes y: no z is written. The backward takes x (from_output false) or
// the output y (from_output true: the memory-saving mode of InPlace-ABN, Rota Bulo et al.
// 2018; f invertible, gamma != 0), recomputes z and u = x - mu_b per value, and makes
// the two passes of bn_bwd on dz = dy * f'(z): the sums of dz and dz * u, then
// dx = k dz + a u + b. No dz or z tensor is written either.

enum Act : int64_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kSilu = 3, kSigmoid = 4 };

// e^x for the activation loops: std::exp for double; for float a polynomial the compiler
// vectorizes (glibc's expf is a call per value, which left the fused SiLU 1.2-2.3x slower
// than torch's vectorized one). Range reduction x = n ln2 + r (ln2 in two parts), then
// Cephes' degree-5 polynomial for e^r on |r| <= ln2 / 2 and 2^n from the exponent bits:
// within 2 ulp of e^x on [-87, 88]; beyond, the result saturates (e^-87 = 1.6e-38 and
// e^88 = 1.7e38, which leave sigmoid and SiLU within 1e-38 of their values); NaN stays NaN.
inline double exp_vec(double x) { return std::exp(x); }

inline float exp_vec(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float out = e * scale;
  return x != x ? x : out;
}

template <int64_t A, typename acc_t>
inline acc_t act_apply(acc_t z, acc_t slope) {
  if constexpr (A == kIdentity) return z;
  if constexpr (A == kRelu) return z > acc_t(0) ? z : acc_t(0);
  if constexpr (A == kLeakyRelu) return z > acc_t(0) ? z : z * slope;
  if constexpr (A == kSilu) return z / (acc_t(1) + exp_vec(-z));
  if constexpr (A == kSigmoid) return acc_t(1) / (acc_t(1) + exp_vec(-z));
}

// dy * f'(z), with torch's values at the kinks (relu'(0) = 0, leaky_relu'(0) = slope) and
// its selects (relu's backward is dy or 0, never dy * 0). The selects vectorize because
// the kernels build with -fno-trapping-math (see build.py): without it GCC turned them
// into a branch per value, 8x slower on random signs.
template <int64_t A, typename acc_t>
inline acc_t act_grad(acc_t d, acc_t z, acc_t slope) {
  if constexpr (A == kIdentity) return d;
  if constexpr (A == kRelu) return z > acc_t(0) ? d : acc_t(0);
  if constexpr (A == kLeakyRelu) return z > acc_t(0) ? d : d * slope;
  if constexpr (A == kSilu || A == kSigmoid) {
    const acc_t s = acc_t(1) / (acc_t(1) + exp_vec(-z));
    if constexpr (A == kSilu) return d * (s * (acc_t(1) + z * (acc_t(1) - s)));
    else return d * (s * (acc_t(1) - s));
  }
}

// f^-1(y) for the invertible activations (leaky_relu with slope > 0: y >= 0 iff z >= 0).
template <int64_t A, typename acc_t>
inline acc_t act_inverse(acc_t y, acc_t inv_slope) {
  if constexpr (A == kLeakyRelu) return y >= acc_t(0) ? y : y * inv_slope;
  else return y;
}

// dz = dy * f'(z) and u = x - mu of one value, from dy and the saved value t (x, or y
// when FromOut: z = f^-1(y), u = (z - beta) / scale), with its channel's coefficients.
template <int64_t A, bool FromOut, typename acc_t>
inline void act_grad_elem(acc_t d, acc_t t, acc_t mu, acc_t sc, acc_t sh, acc_t isc,
                          acc_t slope, acc_t inv_slope, acc_t& dz, acc_t& u) {
  acc_t z;
  if constexpr (FromOut) {
    z = act_inverse<A, acc_t>(t, inv_slope);
    u = (z - sh) * isc;
  } else {
    u = t - mu;
    z = u * sc + sh;
  }
  dz = act_grad<A, acc_t>(d, z, slope);
}

// Per-channel coefficients of the fused layer's element loops.
template <typename acc_t>
struct ActCoefs {
  std::vector<acc_t> mu, scale, shift, inv_scale, k, a, b;
  explicit ActCoefs(int64_t c) : mu(c), scale(c), shift(c), inv_scale(c), k(c), a(c), b(c) {}
};

// s1 = sum dz, s2 = sum dz * u over one block of one channel (n <= kBlock values), in
// kLanes independent chains as block_grad_sums.
template <int64_t A, bool FromOut, typename acc_t>
inline void block_act_grad_sums(const acc_t* __restrict__ d, const acc_t* __restrict__ t,
                                int64_t n, acc_t mu, acc_t sc, acc_t sh, acc_t isc, acc_t slope,
                                acc_t inv_slope, acc_t& s1, acc_t& s2) {
  constexpr int64_t L = kLanes<acc_t>;
  acc_t a1[L] = {}, a2[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      acc_t dz, u;
      act_grad_elem<A, FromOut, acc_t>(d[i + j], t[i + j], mu, sc, sh, isc, slope, inv_slope,
                                       dz, u);
      a1[j] += dz;
      a2[j] += dz * u;
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    acc_t dz, u;
    act_grad_elem<A, FromOut, acc_t>(d[i + j], t[i + j], mu, sc, sh, isc, slope, inv_slope, dz,
                                     u);
    a1[j] += dz;
    a2[j] += dz * u;
  }
  acc_t r1 = 0, r2 = 0;
#pragma omp simd reduction(+ : r1, r2)
  for (int64_t j = 0; j < L; ++j) {
    r1 += a1[j];
    r2 += a2[j];
  }
  s1 = r1;
  s2 = r2;
}

template <int64_t A, typename scalar_t>
void act_forward_impl(const Tensor& x, const Tensor& mean, const Tensor& inv_std,
                      const Tensor& w, const Tensor& b, double slope_d, const Geometry& g,
                      Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const Raw<scalar_t>* xp = raw_ptr<scalar_t>(x);
  Raw<scalar_t>* yp = raw_mut_ptr<scalar_t>(y);
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* ip = inv_std.const_data_ptr<acc_t>();
  const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
  const int64_t C = g.c;
  const acc_t slope = static_cast<acc_t>(slope_d);
  // z = (x - mu_b) * scale + beta with mu_b as stored (acc_t): the backward reads the
  // same mu_b, so both see the same z.
  std::vector<acc_t> mu(mp, mp + C), sc(C), sh(C);
  for (int64_t ch = 0; ch < C; ++ch) {
    sc[ch] = static_cast<acc_t>(wp ? double(wp[ch]) * double(ip[ch]) : double(ip[ch]));
    sh[ch] = bp ? bp[ch] : acc_t(0);
  }
  if (g.layout == Layout::NCS) {
    ncs_runs(g, [&](int64_t ch, int64_t off) {
      Staging<scalar_t>::map1(
          xp + off, yp + off, g.s,
          [&](int64_t, const auto* __restrict__ v, auto* __restrict__ out, int64_t n) {
            const acc_t m = mu[ch], s = sc[ch], t = sh[ch];
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) out[i] = act_apply<A, acc_t>((v[i] - m) * s + t, slope);
          });
    });
    return;
  }
  const int64_t W = tile_width(C);
  const std::vector<acc_t> mu_t = tiled(mu.data(), C, W), sc_t = tiled(sc.data(), C, W),
                           sh_t = tiled(sh.data(), C, W);
  rc_super_rows(g.n * g.s, C, W, [&](int64_t p, int64_t len) {
    Staging<scalar_t>::map1(
        xp + p, yp + p, len,
        [&](int64_t j0, const auto* __restrict__ v, auto* __restrict__ out, int64_t n) {
          const acc_t* __restrict__ m = mu_t.data() + j0;
          const acc_t* __restrict__ s = sc_t.data() + j0;
          const acc_t* __restrict__ t = sh_t.data() + j0;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) out[i] = act_apply<A, acc_t>((v[i] - m[i]) * s[i] + t[i], slope);
        });
  });
}

template <int64_t A, bool FromOut, typename scalar_t>
void act_backward_impl(const Tensor& dy, const Tensor& t, const Tensor& w, const Tensor& b,
                       const Tensor& mean, const Tensor& inv_std, double slope_d,
                       const Geometry& g, Tensor& dx, Tensor& sum_dz_out,
                       Tensor& sum_dzxhat_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Raw<scalar_t>* tp = raw_ptr<scalar_t>(t);
  const Raw<scalar_t>* dp = raw_ptr<scalar_t>(dy);
  Raw<scalar_t>* dxp = dx.defined() ? raw_mut_ptr<scalar_t>(dx) : nullptr;
  const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* ip = inv_std.const_data_ptr<acc_t>();
  acc_t* sdz = sum_dz_out.mutable_data_ptr<acc_t>();
  acc_t* sdx = sum_dzxhat_out.mutable_data_ptr<acc_t>();
  const int64_t C = g.c;
  const double m = static_cast<double>(g.n) * static_cast<double>(g.s);
  const acc_t slope = static_cast<acc_t>(slope_d);
  const acc_t inv_slope = static_cast<acc_t>(slope_d != 0 ? 1.0 / slope_d : 0.0);
  ActCoefs<acc_t> cf(C);
  for (int64_t ch = 0; ch < C; ++ch) {
    const double scale = wp ? double(wp[ch]) * double(ip[ch]) : double(ip[ch]);
    cf.mu[ch] = mp[ch];
    cf.scale[ch] = static_cast<acc_t>(scale);
    cf.shift[ch] = bp ? bp[ch] : acc_t(0);
    cf.inv_scale[ch] = static_cast<acc_t>(1.0 / scale);
  }
  // The sums of dz and dz * u of channel ch, then dx's coefficients (input_grad_coefs).
  auto coefs = [&](int64_t ch, double s_dz, double s_dzu) {
    sdz[ch] = static_cast<acc_t>(s_dz);
    sdx[ch] = static_cast<acc_t>(s_dzu * ip[ch]);  // sum dz * xhat = dl/dgamma
    input_grad_coefs(wp ? static_cast<double>(wp[ch]) : 1.0, ip[ch], s_dz, s_dzu, m, cf.k[ch],
                     cf.a[ch], cf.b[ch]);
  };

  if (g.layout == Layout::NCS) {
    at::parallel_for(0, C, channel_grain(g), [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        const acc_t mu = cf.mu[ch], sc = cf.scale[ch], sh = cf.shift[ch], isc = cf.inv_scale[ch];
        double t1 = 0, t2 = 0;
        for_each_run(g, ch, 0, g.n * g.s, kBlock, [&](int64_t off, int64_t len) {
          Staging<scalar_t>::read2(
              dp + off, tp + off, len,
              [&](int64_t, const auto* __restrict__ d, const auto* __restrict__ v, int64_t n) {
                acc_t s1, s2;
                block_act_grad_sums<A, FromOut, acc_t>(d, v, n, mu, sc, sh, isc, slope,
                                                       inv_slope, s1, s2);
                t1 += s1;
                t2 += s2;
              });
        });
        coefs(ch, t1, t2);
      }
    });
    if (!dxp) return;
    ncs_runs(g, [&](int64_t ch, int64_t off) {
      Staging<scalar_t>::map2(
          dp + off, tp + off, dxp + off, g.s,
          [&](int64_t, const auto* __restrict__ d, const auto* __restrict__ v,
              auto* __restrict__ out, int64_t n) {
            const acc_t mu = cf.mu[ch], sc = cf.scale[ch], sh = cf.shift[ch],
                        isc = cf.inv_scale[ch], k = cf.k[ch], a = cf.a[ch], bb = cf.b[ch];
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
              acc_t dz, u;
              act_grad_elem<A, FromOut, acc_t>(d[i], v[i], mu, sc, sh, isc, slope, inv_slope, dz,
                                               u);
              out[i] = k * dz + a * u + bb;
            }
          });
    });
    return;
  }

  const int64_t rows = g.n * g.s;
  const int64_t nt = row_tasks(rows, C);
  const int64_t W = tile_width(C);
  const std::vector<acc_t> mu_t = tiled(cf.mu.data(), C, W), sc_t = tiled(cf.scale.data(), C, W),
                           sh_t = tiled(cf.shift.data(), C, W),
                           isc_t = tiled(cf.inv_scale.data(), C, W);
  std::vector<double> p1(nt * C, 0.0), p2(nt * C, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      int64_t r0, r1;
      split(rows, nt, task, r0, r1);
      rc_reduce<acc_t>(
          C, W, r0, r1, p1.data() + task * C, p2.data() + task * C,
          [&](int64_t p, int64_t len, acc_t* __restrict__ a1, acc_t* __restrict__ a2) {
            Staging<scalar_t>::read2(
                dp + p, tp + p, len,
                [&](int64_t j0, const auto* __restrict__ d, const auto* __restrict__ v,
                    int64_t n) {
                  const acc_t* __restrict__ mu = mu_t.data() + j0;
                  const acc_t* __restrict__ sc = sc_t.data() + j0;
                  const acc_t* __restrict__ sh = sh_t.data() + j0;
                  const acc_t* __restrict__ isc = isc_t.data() + j0;
                  acc_t* __restrict__ b1 = a1 + j0;
                  acc_t* __restrict__ b2 = a2 + j0;
#pragma omp simd
                  for (int64_t j = 0; j < n; ++j) {
                    acc_t dz, u;
                    act_grad_elem<A, FromOut, acc_t>(d[j], v[j], mu[j], sc[j], sh[j], isc[j],
                                                     slope, inv_slope, dz, u);
                    b1[j] += dz;
                    b2[j] += dz * u;
                  }
                });
          });
    }
  });
  for (int64_t ch = 0; ch < C; ++ch) {
    double s1 = 0, s2 = 0;
    for (int64_t task = 0; task < nt; ++task) {
      s1 += p1[task * C + ch];
      s2 += p2[task * C + ch];
    }
    coefs(ch, s1, s2);
  }
  if (!dxp) return;
  const std::vector<acc_t> k_t = tiled(cf.k.data(), C, W), a_t = tiled(cf.a.data(), C, W),
                           b_t = tiled(cf.b.data(), C, W);
  rc_super_rows(rows, C, W, [&](int64_t p, int64_t len) {
    Staging<scalar_t>::map2(
        dp + p, tp + p, dxp + p, len,
        [&](int64_t j0, const auto* __restrict__ d, const auto* __restrict__ v,
            auto* __restrict__ out, int64_t n) {
          const acc_t* __restrict__ mu = mu_t.data() + j0;
          const acc_t* __restrict__ sc = sc_t.data() + j0;
          const acc_t* __restrict__ sh = sh_t.data() + j0;
          const acc_t* __restrict__ isc = isc_t.data() + j0;
          const acc_t* __restrict__ k = k_t.data() + j0;
          const acc_t* __restrict__ a = a_t.data() + j0;
          const acc_t* __restrict__ bb = b_t.data() + j0;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            acc_t dz, u;
            act_grad_elem<A, FromOut, acc_t>(d[j], v[j], mu[j], sc[j], sh[j], isc[j], slope,
                                             inv_slope, dz, u);
            out[j] = k[j] * dz + a[j] * u + bb[j];
          }
        });
  });
}

// The activation id as a compile-time constant: fn(std::integral_constant<int64_t, A>).
template <typename Fn>
void with_act(int64_t act, const char* op, const Fn& fn) {
  switch (act) {
    case kIdentity: fn(std::integral_constant<int64_t, kIdentity>()); break;
    case kRelu: fn(std::integral_constant<int64_t, kRelu>()); break;
    case kLeakyRelu: fn(std::integral_constant<int64_t, kLeakyRelu>()); break;
    case kSilu: fn(std::integral_constant<int64_t, kSilu>()); break;
    case kSigmoid: fn(std::integral_constant<int64_t, kSigmoid>()); break;
    default: TORCH_CHECK(false, "bnlab::", op, ": unknown activation id ", act);
  }
}

std::tuple<Tensor, Tensor, Tensor> bn_act_train_fwd(const Tensor& x_in,
                                                    const c10::optional<Tensor>& weight,
                                                    const c10::optional<Tensor>& bias,
                                                    double eps, int64_t act, double slope) {
  // The statistics pass of bn_train_fwd (stats only), then one output pass applying f.
  auto [unused, mean, var, inv_std] =
      train_forward(x_in, Tensor(), Tensor(), eps, /*stats_only=*/true);
  const Tensor x = as_supported_layout(x_in);
  Tensor y = at::empty_like(x, at::MemoryFormat::Preserve);
  if (x.numel() == 0) return {y, mean, var};
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t C = x.size(1);
  const Tensor w = channel_vector(weight, acc, C, "weight");
  const Tensor b = channel_vector(bias, acc, C, "bias");
  const Geometry g = geometry_of(x);
  with_act(act, "bn_act_train_fwd", [&](auto a) {
    constexpr int64_t A = decltype(a)::value;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_fwd", [&] {
      act_forward_impl<A, scalar_t>(x, mean, inv_std, w, b, slope, g, y);
    });
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> bn_act_bwd(const Tensor& grad_y, const Tensor& saved_in,
                                              const c10::optional<Tensor>& weight,
                                              const c10::optional<Tensor>& bias,
                                              const Tensor& mean, const Tensor& inv_std,
                                              int64_t act, double slope, bool from_output,
                                              bool need_x) {
  TORCH_CHECK(saved_in.dim() >= 2 && grad_y.sizes() == saved_in.sizes(),
              "bnlab::bn_act_bwd: grad_y ", grad_y.sizes(), " and the saved tensor ",
              saved_in.sizes(), " must have the same (N, C, *) shape");
  TORCH_CHECK(saved_in.device().is_cpu() && grad_y.device().is_cpu(),
              "bnlab::bn_act_bwd: CPU tensors only");
  TORCH_CHECK(!from_output || act == kIdentity || (act == kLeakyRelu && slope > 0),
              "bnlab::bn_act_bwd: from_output needs an invertible activation "
              "(identity, or leaky_relu with a positive slope)");
  const Tensor t = as_supported_layout(saved_in);
  const Tensor dy = like_layout(grad_y, t);
  const auto acc = at::toOpMathType(t.scalar_type());
  const int64_t C = t.size(1);
  Tensor dx = need_x ? at::empty_like(t, at::MemoryFormat::Preserve) : at::empty({0}, t.options());
  Tensor sum_dz = at::zeros({C}, t.options().dtype(acc));
  Tensor sum_dzxhat = at::zeros({C}, t.options().dtype(acc));
  if (t.numel() == 0) return {dx, sum_dzxhat, sum_dz};
  const Tensor w = channel_vector(weight, acc, C, "weight");
  const Tensor b = channel_vector(bias, acc, C, "bias");
  const Tensor mu = channel_vector(mean, acc, C, "mean");
  const Tensor is = channel_vector(inv_std, acc, C, "inv_std");
  const Geometry g = geometry_of(t);
  Tensor dx_arg = need_x ? dx : Tensor();
  with_act(act, "bn_act_bwd", [&](auto a) {
    constexpr int64_t A = decltype(a)::value;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "bn_act_bwd", [&] {
      if constexpr (A == kIdentity || A == kLeakyRelu) {
        if (from_output) {
          act_backward_impl<A, true, scalar_t>(dy, t, w, b, mu, is, slope, g, dx_arg, sum_dz,
                                               sum_dzxhat);
          return;
        }
      }
      act_backward_impl<A, false, scalar_t>(dy, t, w, b, mu, is, slope, g, dx_arg, sum_dz,
                                            sum_dzxhat);
    });
  });
  return {dx, sum_dzxhat, sum_dz};
}

TORCH_LIBRARY(bnlab, m) {
  m.def(
      "bn_train_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor inv_std, bool need_x)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("bn_stats(Tensor x) -> (Tensor, Tensor)");
  m.def(
      "bn_input_grad(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor inv_std,"
      " Tensor sum_dy, Tensor sum_dy_xmu, int m) -> Tensor");
  m.def(
      "bn_eval(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var,"
      " float eps) -> Tensor");
  m.def(
      "bn_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
      " Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps)"
      " -> (Tensor, Tensor, Tensor, int)");
  m.def(
      "bn_act_train_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, int act, float slope)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_bwd(Tensor grad_y, Tensor saved, Tensor? weight, Tensor? bias, Tensor mean,"
      " Tensor inv_std, int act, float slope, bool from_output, bool need_x)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("bn_train_fwd", &bn_train_fwd);
  m.impl("bn_bwd", &bn_bwd);
  m.impl("bn_eval", &bn_eval);
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_input_grad", &bn_input_grad);
  m.impl("bn_act_train_fwd", &bn_act_train_fwd);
  m.impl("bn_act_bwd", &bn_act_bwd);
  m.impl("bn_train", &bn_train);  // inference_mode tensors skip the Autograd key
}

// bn_train records its own autograd node (TrainFunction), so it is also the Autograd kernel.
TORCH_LIBRARY_IMPL(bnlab, Autograd, m) { m.impl("bn_train", &bn_train); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnlab's compiled CPU kernels (the ops are in torch.ops.bnlab)";
  m.def("train_step", &train_step,
        "bnlab::bn_train without the dispatcher's boxing; None where it does not apply");
  m.def("eval_forward", &eval_forward,
        "bnlab::bn_eval without the dispatcher's boxing; None where it does not apply");
}

}  // namespace bnlab
