// Context pooling and fusion of the global context blocks on CPU, forward and backward.
//
// Cao et al., "GCNet", arXiv:1904.11492: context = sum_j alpha_j x_j, alpha = softmax_j(w . x_j + b),
// z = x * gate + add, with gate (B, C) and add (B, C) from the transforms of the context.
// The blocks are memory-bound. One thread walks one sample, in blocks of P positions, so that the
// second pass over a block of x finds it in cache; the caller chooses P from the cache sizes:
//   forward:  logits, online softmax and the weighted sum over one read of x;
//   backward: grad_logits_j = alpha_j (grad_context . x_j - grad_context . context) and
//             grad_w = sum_j grad_logits_j x_j over one read of x (the block twice, as forward),
//             then grad_x = grad_out * gate + grad_context alpha^T + w grad_logits^T over one read
//             of grad_out and one write, without x and over whole rows: two long streams;
//   fusion sums: sum_j grad_out_j and sum_j grad_out_j * x_j, the gradients of add and gate (or
//                the sums alone: torch's sum over positions is slow in channels_last);
//   scale_shift: x * scale + shift, the fusion with both terms (and an average pooling's grad_x);
//                with a residual, max(x * scale + shift + residual, 0): fusion, residual add and ReLU;
//   transforms: the bottleneck W2 act(W1 context + b1) + b2 [sigmoid] on (B, C) vectors, and its
//               gradients, in one call each (below, with the products they need).
// x is (B, C, N) with positions contiguous (NCHW) or channels contiguous (channels_last).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#if defined(GCNET_AVX2_ONLY)
// GCNET_KERNEL_ISA=avx2 (setup.py): an AVX2 machine's code, to check it where AVX-512 is present.
#define GCNET_CLONES __attribute__((target("arch=x86-64-v3")))
#define GCNET_AVX512 0
#define GCNET_ISA "x86-64-v3 only"
#else
// One build runs everywhere; the loader picks the widest vector unit the CPU has.
#define GCNET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define GCNET_AVX512 1
#define GCNET_ISA "x86-64-v4, v3 and baseline clones"
#endif
#else
#define GCNET_CLONES
#define GCNET_AVX512 0
#define GCNET_ISA "the compiler's default"
#endif
#define GCNET_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
// The 32-byte vectors pass only between always-inline functions: no call sees the ABI note.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

// Channel rows that the positions-contiguous logits read together: four streams share each pass
// over the (block of) logits.
constexpr int64_t kRows = 4;

// 32-byte vectors (GCC/Clang vector extensions): each target clone compiles them to its own
// instructions. The positions-contiguous dot products (one per channel row) keep a vector of
// partial sums per row and add the lanes of kWidth rows at once (Lanes::row_sums). GCC's omp simd
// reductions store each row's lanes and add them one at a time: at 7x7 to 14x14 positions that
// is a large share of a row's work (the backward kernel of a GC block at 32x1024x14x14 took
// 6.1 ms instead of 3.9, `python -m benchmarks.gc_breakdown`).
template <typename T>
struct Lanes;

#if defined(__clang__)
#define GCNET_SHUFFLE(Mask, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define GCNET_SHUFFLE(Mask, a, b, ...) __builtin_shuffle(a, b, Mask{__VA_ARGS__})
#endif

template <>
struct Lanes<float> {
  static constexpr int kWidth = 8;
  static constexpr int kTileRows = 6;  // rows of an outer-product tile: 6 x 2 accumulators of AVX2's 16 registers
  typedef float Vec __attribute__((vector_size(32)));
  typedef int32_t Mask __attribute__((vector_size(32)));

  // Lane r of the result: the sum of a[r]'s lanes.
  static GCNET_INLINE Vec row_sums(const Vec* a) {
    Vec pairs[4];
    for (int k = 0; k < 4; ++k)
      pairs[k] = GCNET_SHUFFLE(Mask, a[2 * k], a[2 * k + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
                 GCNET_SHUFFLE(Mask, a[2 * k], a[2 * k + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    const Vec low = GCNET_SHUFFLE(Mask, pairs[0], pairs[1], 0, 1, 8, 9, 4, 5, 12, 13) +
                    GCNET_SHUFFLE(Mask, pairs[0], pairs[1], 2, 3, 10, 11, 6, 7, 14, 15);
    const Vec high = GCNET_SHUFFLE(Mask, pairs[2], pairs[3], 0, 1, 8, 9, 4, 5, 12, 13) +
                     GCNET_SHUFFLE(Mask, pairs[2], pairs[3], 2, 3, 10, 11, 6, 7, 14, 15);
    return GCNET_SHUFFLE(Mask, low, high, 0, 1, 2, 3, 8, 9, 10, 11) +
           GCNET_SHUFFLE(Mask, low, high, 4, 5, 6, 7, 12, 13, 14, 15);
  }
};

template <>
struct Lanes<double> {
  static constexpr int kWidth = 4;
  static constexpr int kTileRows = 6;
  typedef double Vec __attribute__((vector_size(32)));
  typedef int64_t Mask __attribute__((vector_size(32)));

  static GCNET_INLINE Vec row_sums(const Vec* a) {
    const Vec low = GCNET_SHUFFLE(Mask, a[0], a[1], 0, 4, 2, 6) + GCNET_SHUFFLE(Mask, a[0], a[1], 1, 5, 3, 7);
    const Vec high = GCNET_SHUFFLE(Mask, a[2], a[3], 0, 4, 2, 6) + GCNET_SHUFFLE(Mask, a[2], a[3], 1, 5, 3, 7);
    return GCNET_SHUFFLE(Mask, low, high, 0, 1, 4, 5) + GCNET_SHUFFLE(Mask, low, high, 2, 3, 6, 7);
  }
};

// 64-byte vectors for the transforms' products (compute-bound, unlike the passes over x) on CPUs
// with AVX-512: twice the multiply-adds per instruction, and 32 registers for their larger tiles.
template <typename T>
struct WideLanes {
  using Narrow = Lanes<T>;
  static constexpr int kWidth = 2 * Narrow::kWidth;
  static constexpr int kTileRows = 8;  // 8 x 2 accumulators of AVX-512's 32 registers
  typedef T Vec __attribute__((vector_size(64)));

  // Lane r of the result: the sum of a[r]'s lanes (each folded to a narrow vector first).
  static GCNET_INLINE Vec row_sums(const Vec* a) {
    typename Narrow::Vec folded[kWidth];
    for (int r = 0; r < kWidth; ++r) {
      typename Narrow::Vec low, high;
      std::memcpy(&low, &a[r], sizeof(low));
      std::memcpy(&high, reinterpret_cast<const char*>(&a[r]) + sizeof(low), sizeof(high));
      folded[r] = low + high;
    }
    const typename Narrow::Vec first = Narrow::row_sums(folded), second = Narrow::row_sums(folded + Narrow::kWidth);
    Vec sums;
    std::memcpy(&sums, &first, sizeof(first));
    std::memcpy(reinterpret_cast<char*>(&sums) + sizeof(first), &second, sizeof(second));
    return sums;
  }
};

template <typename V, typename T>
GCNET_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
GCNET_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Online softmax over positions, one block at a time; the caller accumulates the context. Each
// block's logits become exp(logit - the running max) in place, once: finish rescales them by block.
template <typename T>
struct OnlineSoftmax {
  T max = -std::numeric_limits<T>::infinity();
  T total = 0;

  // values_j = exp(values_j - new max) for the block; returns the factor for what was summed so far.
  GCNET_INLINE T add_block(T* values, int64_t n) {
    T block_max = max;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < n; ++j) block_max = values[j] > block_max ? values[j] : block_max;  // std::max stays scalar
    const T rescale = std::exp(max - block_max);
    for (int64_t j = 0; j < n; ++j) values[j] = std::exp(values[j] - block_max);
    T block_total = 0;
#pragma omp simd reduction(+ : block_total)
    for (int64_t j = 0; j < n; ++j) block_total += values[j];
    total = total * rescale + block_total;
    max = block_max;
    return rescale;
  }

  // Normalises the context (C) and alpha (N), whose block b of P values is relative to maxes[b].
  GCNET_INLINE void finish(T* context, int64_t C, T* alpha, int64_t N, int64_t P, const T* maxes) const {
    const T inverse = T(1) / total;
    for (int64_t c = 0; c < C; ++c) context[c] *= inverse;
    for (int64_t j0 = 0, b = 0; j0 < N; j0 += P, ++b) {
      const T factor = std::exp(maxes[b] - max) * inverse;
      const int64_t end = std::min(N, j0 + P);
      for (int64_t j = j0; j < end; ++j) alpha[j] *= factor;
    }
  }
};

// w . x_j + b for positions [j0, j0 + n) (the logits; with w = grad_context, b = 0, the backward's
// d alpha_j). x: (C, N) positions contiguous, or (N, C) channels contiguous.
template <typename T, bool kChannelsLast>
GCNET_INLINE void block_logits(const T* x, int64_t C, int64_t N, int64_t j0, int64_t n, const T* w, T b,
                               T* logits) {
  if constexpr (kChannelsLast) {
    for (int64_t j = 0; j < n; ++j) {
      const T* row = x + (j0 + j) * C;
      T acc = b;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < C; ++c) acc += w[c] * row[c];
      logits[j] = acc;
    }
  } else {
    std::fill(logits, logits + n, b);
    int64_t c = 0;
    for (; c + kRows <= C; c += kRows) {
      const T* r0 = x + c * N + j0;
      const T *r1 = r0 + N, *r2 = r1 + N, *r3 = r2 + N;
      const T w0 = w[c], w1 = w[c + 1], w2 = w[c + 2], w3 = w[c + 3];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) logits[j] += w0 * r0[j] + w1 * r1[j] + w2 * r2[j] + w3 * r3[j];
    }
    for (; c < C; ++c) {
      const T* row = x + c * N + j0;
      const T wc = w[c];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) logits[j] += wc * row[j];
    }
  }
}

// context = context * rescale + sum_j weights_j x_j over positions [j0, j0 + n).
template <typename T, bool kChannelsLast>
GCNET_INLINE void block_accumulate(const T* x, int64_t C, int64_t N, int64_t j0, int64_t n, const T* weights,
                                   T rescale, T* context) {
  if constexpr (kChannelsLast) {
    for (int64_t c = 0; c < C; ++c) context[c] *= rescale;
    for (int64_t j = 0; j < n; ++j) {
      const T* row = x + (j0 + j) * C;
      const T e = weights[j];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) context[c] += e * row[c];
    }
  } else {
    using L = Lanes<T>;
    using V = typename L::Vec;
    constexpr int W = L::kWidth;
    const int64_t whole = n - n % W;
    const int64_t grouped = C - C % W;
    // Last rows first: block_logits read them last, so they are the likeliest still in cache.
    for (int64_t c = C - 1; c >= grouped; --c) {
      const T* row = x + c * N + j0;
      T acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += weights[j] * row[j];
      context[c] = context[c] * rescale + acc;
    }
    for (int64_t c = grouped - W; c >= 0; c -= W) {  // W rows together: one load of the weights serves W rows
      const T* rows = x + c * N + j0;
      V partial[W] = {};
      for (int64_t j = 0; j < whole; j += W) {
        const V e = load<V>(weights + j);
        for (int k = 0; k < W; ++k) partial[k] += e * load<V>(rows + k * N + j);
      }
      V sums = L::row_sums(partial);
      for (int64_t j = whole; j < n; ++j)
        for (int k = 0; k < W; ++k) sums[k] += weights[j] * rows[k * N + j];
      store(context + c, load<V>(context + c) * rescale + sums);
    }
  }
}

// alpha (N) holds the logits, then their exps until the softmax; maxes is scratch (one per block).
template <typename T, bool kChannelsLast>
GCNET_INLINE void pool_forward(const T* x, int64_t C, int64_t N, int64_t P, const T* w, T b, T* alpha, T* context,
                               T* maxes) {
  std::fill(context, context + C, T(0));
  OnlineSoftmax<T> softmax;
  for (int64_t j0 = 0, block = 0; j0 < N; j0 += P, ++block) {
    const int64_t n = std::min(P, N - j0);
    block_logits<T, kChannelsLast>(x, C, N, j0, n, w, b, alpha + j0);
    const T rescale = softmax.add_block(alpha + j0, n);
    maxes[block] = softmax.max;
    block_accumulate<T, kChannelsLast>(x, C, N, j0, n, alpha + j0, rescale, context);
  }
  softmax.finish(context, C, alpha, N, P, maxes);
}

// grad_x = grad_out [* gate] + grad_context alpha_j + w dl_j over one sample. It does not read x:
// this pass streams grad_out and grad_x alone.
template <typename T, bool kChannelsLast, bool kGate>
GCNET_INLINE void sample_grad_x(const T* grad_out, int64_t C, int64_t N, const T* w, const T* gate, const T* alpha,
                                const T* grad_context, const T* dl, T* grad_x) {
  if constexpr (kChannelsLast) {
    for (int64_t j = 0; j < N; ++j) {
      const int64_t offset = j * C;
      const T* g = grad_out + offset;
      T* out = grad_x + offset;
      const T a = alpha[j];
      const T d = dl[j];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] = (kGate ? g[c] * gate[c] : g[c]) + a * grad_context[c] + d * w[c];
    }
  } else {
    using V = typename Lanes<T>::Vec;
    constexpr int W = Lanes<T>::kWidth;
    const int64_t whole = N - N % W;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t offset = c * N;
      const T* g = grad_out + offset;
      T* out = grad_x + offset;
      const T d = grad_context[c];
      const T wc = w[c];
      const T s = kGate ? gate[c] : T(1);
      for (int64_t j = 0; j < whole; j += W) {
        const V gj = load<V>(g + j);
        store(out + j, (kGate ? gj * s : gj) + d * load<V>(alpha + j) + wc * load<V>(dl + j));
      }
      for (int64_t j = whole; j < N; ++j) out[j] = (kGate ? g[j] * s : g[j]) + d * alpha[j] + wc * dl[j];
    }
  }
}

// mean_term = grad_context . context; grad_logits (N) first holds grad_context . x_j.
template <typename T, bool kChannelsLast, bool kGate>
GCNET_INLINE void pool_backward(const T* x, const T* grad_out, int64_t C, int64_t N, int64_t P, const T* w,
                                const T* gate, const T* alpha, const T* grad_context, T mean_term, T* grad_x,
                                T* grad_w, T* grad_logits) {
  std::fill(grad_w, grad_w + C, T(0));
  for (int64_t j0 = 0; j0 < N; j0 += P) {
    const int64_t n = std::min(P, N - j0);
    T* dl = grad_logits + j0;
    block_logits<T, kChannelsLast>(x, C, N, j0, n, grad_context, T(0), dl);
    for (int64_t j = 0; j < n; ++j) dl[j] = alpha[j0 + j] * (dl[j] - mean_term);
    block_accumulate<T, kChannelsLast>(x, C, N, j0, n, dl, T(1), grad_w);  // x's block again, while in cache
  }
  // Whole rows: the two streams keep the prefetcher's pace.
  sample_grad_x<T, kChannelsLast, kGate>(grad_out, C, N, w, gate, alpha, grad_context, grad_logits, grad_x);
}

// sums (C) = sum_j grad_out_j and products (C) = sum_j grad_out_j * x_j over one sample; without
// kProducts, the sums alone (x is not read): torch's sum over positions is slow in channels_last.
template <typename T, bool kChannelsLast, bool kProducts = true>
GCNET_INLINE void fusion_sums_of(const T* x, const T* grad_out, int64_t C, int64_t N, T* sums, T* products) {
  if constexpr (kChannelsLast && !kProducts) {
    std::fill(sums, sums + C, T(0));
    int64_t j = 0;
    for (; j + 4 <= N; j += 4) {  // four positions per pass over the sums
      const T* g = grad_out + j * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) sums[c] += (g[c] + g[C + c]) + (g[2 * C + c] + g[3 * C + c]);
    }
    for (; j < N; ++j) {
      const T* g = grad_out + j * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) sums[c] += g[c];
    }
  } else if constexpr (kChannelsLast) {
    std::fill(sums, sums + C, T(0));
    std::fill(products, products + C, T(0));
    for (int64_t j = 0; j < N; ++j) {
      const T* row = x + j * C;
      const T* g = grad_out + j * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        sums[c] += g[c];
        products[c] += g[c] * row[c];
      }
    }
  } else {
    using L = Lanes<T>;
    using V = typename L::Vec;
    constexpr int W = L::kWidth;
    const int64_t whole = N - N % W;
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      V row_sums[W], row_products[W];
      for (int k = 0; k < W; ++k) {
        const T* row = x + (c + k) * N;
        const T* g = grad_out + (c + k) * N;
        V s = {}, p = {};
        for (int64_t j = 0; j < whole; j += W) {
          const V gj = load<V>(g + j);
          s += gj;
          if constexpr (kProducts) p += gj * load<V>(row + j);
        }
        for (int64_t j = whole; j < N; ++j) {
          s[0] += g[j];
          if constexpr (kProducts) p[0] += g[j] * row[j];
        }
        row_sums[k] = s;
        row_products[k] = p;
      }
      store(sums + c, L::row_sums(row_sums));
      if constexpr (kProducts) store(products + c, L::row_sums(row_products));
    }
    for (; c < C; ++c) {
      const T* row = x + c * N;
      const T* g = grad_out + c * N;
      T s = 0, p = 0;
      for (int64_t j = 0; j < N; ++j) {
        s += g[j];
        if constexpr (kProducts) p += g[j] * row[j];
      }
      sums[c] = s;
      if constexpr (kProducts) products[c] = p;
    }
  }
}

// out_j = x_j * scale + shift over one sample, scale and shift (C): the fusion with a gate and an
// add term, and grad_x = grad_out * gate + grad_context / N under average pooling. One pass; torch's
// addcmul with two broadcast operands is slower than a copy on CPU. With kResidualRelu,
// out_j = max(x_j * scale + shift + residual_j, 0): a residual block's fusion, add and ReLU in one
// pass (the sums in the order of the composite ops).
template <typename T, bool kChannelsLast, bool kResidualRelu>
GCNET_INLINE void scale_shift_of(const T* x, int64_t C, int64_t N, const T* scale, const T* shift,
                                 const T* residual, T* out) {
  if constexpr (kChannelsLast) {
    for (int64_t j = 0; j < N; ++j) {
      const T* row = x + j * C;
      T* o = out + j * C;
      if constexpr (kResidualRelu) {
        const T* r = residual + j * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = std::max<T>(row[c] * scale[c] + shift[c] + r[c], T(0));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = row[c] * scale[c] + shift[c];
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const T* row = x + c * N;
      T* o = out + c * N;
      const T s = scale[c], a = shift[c];
      if constexpr (kResidualRelu) {
        const T* r = residual + c * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) o[j] = std::max<T>(row[j] * s + a + r[j], T(0));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) o[j] = row[j] * s + a;
      }
    }
  }
}

#define GCNET_SAMPLE_KERNELS(T)                                                                                 \
  GCNET_CLONES void forward_sample(bool channels_last, const T* x, int64_t C, int64_t N, int64_t P,            \
                                   const T* w, T b, T* alpha, T* context, T* maxes) {                          \
    if (channels_last)                                                                                         \
      pool_forward<T, true>(x, C, N, P, w, b, alpha, context, maxes);                                          \
    else                                                                                                       \
      pool_forward<T, false>(x, C, N, P, w, b, alpha, context, maxes);                                         \
  }                                                                                                            \
  GCNET_CLONES void backward_sample(bool channels_last, const T* x, const T* grad_out, int64_t C, int64_t N,    \
                                    int64_t P, const T* w, const T* gate, const T* alpha, const T* grad_context, \
                                    T mean_term, T* grad_x, T* grad_w, T* grad_logits) {                       \
    if (channels_last && gate)                                                                                 \
      pool_backward<T, true, true>(x, grad_out, C, N, P, w, gate, alpha, grad_context, mean_term, grad_x,       \
                                   grad_w, grad_logits);                                                       \
    else if (channels_last)                                                                                    \
      pool_backward<T, true, false>(x, grad_out, C, N, P, w, gate, alpha, grad_context, mean_term, grad_x,      \
                                    grad_w, grad_logits);                                                      \
    else if (gate)                                                                                             \
      pool_backward<T, false, true>(x, grad_out, C, N, P, w, gate, alpha, grad_context, mean_term, grad_x,      \
                                    grad_w, grad_logits);                                                      \
    else                                                                                                       \
      pool_backward<T, false, false>(x, grad_out, C, N, P, w, gate, alpha, grad_context, mean_term, grad_x,     \
                                     grad_w, grad_logits);                                                     \
  }                                                                                                            \
  GCNET_CLONES void sums_sample(bool channels_last, const T* x, const T* grad_out, int64_t C, int64_t N,        \
                                T* sums, T* products) {                                                        \
    if (channels_last && products)                                                                             \
      fusion_sums_of<T, true>(x, grad_out, C, N, sums, products);                                                 \
    else if (channels_last)                                                                                    \
      fusion_sums_of<T, true, false>(x, grad_out, C, N, sums, products);                                         \
    else if (products)                                                                                         \
      fusion_sums_of<T, false>(x, grad_out, C, N, sums, products);                                                \
    else                                                                                                       \
      fusion_sums_of<T, false, false>(x, grad_out, C, N, sums, products);                                        \
  }                                                                                                            \
  GCNET_CLONES void scale_shift_sample(bool channels_last, const T* x, int64_t C, int64_t N, const T* scale,    \
                                       const T* shift, const T* residual, T* out) {                            \
    if (channels_last && residual)                                                                             \
      scale_shift_of<T, true, true>(x, C, N, scale, shift, residual, out);                                     \
    else if (channels_last)                                                                                    \
      scale_shift_of<T, true, false>(x, C, N, scale, shift, residual, out);                                    \
    else if (residual)                                                                                         \
      scale_shift_of<T, false, true>(x, C, N, scale, shift, residual, out);                                    \
    else                                                                                                       \
      scale_shift_of<T, false, false>(x, C, N, scale, shift, residual, out);                                   \
  }

GCNET_SAMPLE_KERNELS(float)
GCNET_SAMPLE_KERNELS(double)


// The transforms of the context, on (B, C) vectors: out = W2 act(W1 c + b1) + b2 [then a sigmoid],
// act = [LayerNorm] [ReLU]. Small GEMMs (C = 1024, C/r = 64, B = 32: 2M multiply-adds each) whose
// operands fit in L2: one call for all of them, rather than a dozen dispatched ops that each find
// their code and data evicted by the pass over x just before.

// Pairs of rows i of a (R, K) by the kM = W/2 rows [m, m + kM) of w (M, K), over columns [k0, k1): W
// accumulators, summed lane-wise at once; out = bias + the sums, or out += the sums (kAdd).
template <typename T, typename L, bool kAdd>
GCNET_INLINE void dot_pairs(const T* a, int64_t R, int64_t K, const T* w, const T* bias, int64_t m, int64_t k0,
                            int64_t k1, int64_t M, T* out) {
  using V = typename L::Vec;
  constexpr int W = L::kWidth;
  constexpr int kM = W / 2;
  const int64_t whole = K - K % W, vec_end = std::min(whole, k1);
  for (int64_t i = 0; i + 2 <= R; i += 2) {
    V acc[W] = {};
    for (int64_t k = k0; k < vec_end; k += W) {
      const V a0 = load<V>(a + i * K + k), a1 = load<V>(a + (i + 1) * K + k);
      for (int r = 0; r < kM; ++r) {
        const V wr = load<V>(w + (m + r) * K + k);
        acc[2 * r] += wr * a0;
        acc[2 * r + 1] += wr * a1;
      }
    }
    V sums = L::row_sums(acc);
    for (int64_t k = std::max(whole, k0); k < k1; ++k)
      for (int r = 0; r < kM; ++r) {
        sums[2 * r] += w[(m + r) * K + k] * a[i * K + k];
        sums[2 * r + 1] += w[(m + r) * K + k] * a[(i + 1) * K + k];
      }
    for (int r = 0; r < kM; ++r) {
      out[i * M + m + r] = (kAdd ? out[i * M + m + r] : bias[m + r]) + sums[2 * r];
      out[(i + 1) * M + m + r] = (kAdd ? out[(i + 1) * M + m + r] : bias[m + r]) + sums[2 * r + 1];
    }
  }
}

// out[i][m] = bias[m] + sum_k a[i][k] w[m][k] for rows i < R of a (R, K) and rows m in [m0, m1)
// of w (M, K), in tiles of dot_pairs. With 64-byte tiles and 16 rows of a or more, the columns go in
// chunks whose kM rows of w (16 KiB) stay in L1 while the rows of a go by (Zen 5, 32x2048 -> 128:
// 0.81x the time of whole rows); 32-byte tiles keep whole rows (the chunked code ran their small
// products 1.04-1.16x slower).
template <typename T, typename L>
GCNET_INLINE void dot_rows(const T* a, int64_t R, int64_t K, const T* w, const T* bias, int64_t m0, int64_t m1,
                           int64_t M, T* out) {
  constexpr int W = L::kWidth;
  constexpr int kM = W / 2;
  const int64_t chunk =
      R < 16 || sizeof(typename L::Vec) < 64 ? K : std::max<int64_t>(W, (16384 / (kM * sizeof(T))) / W * W);
  int64_t m = m0;
  for (; m + kM <= m1; m += kM) {
    dot_pairs<T, L, false>(a, R, K, w, bias, m, 0, std::min(K, chunk), M, out);
    if constexpr (sizeof(typename L::Vec) == 64)
      for (int64_t k0 = chunk; k0 < K; k0 += chunk)
        dot_pairs<T, L, true>(a, R, K, w, bias, m, k0, std::min(K, k0 + chunk), M, out);
    if (R % 2)
      for (int r = 0; r < kM; ++r) {
        T acc = bias[m + r];
        for (int64_t k = 0; k < K; ++k) acc += w[(m + r) * K + k] * a[(R - 1) * K + k];
        out[(R - 1) * M + m + r] = acc;
      }
  }
  for (; m < m1; ++m)
    for (int64_t i = 0; i < R; ++i) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += w[m * K + k] * a[i * K + k];
      out[i * M + m] = bias[m] + acc;
    }
}

// Columns [n, n + 2W) of rows [i, i + R) of axpy_rows, R a constant: the accumulators stay in registers.
template <typename T, typename L, int R>
GCNET_INLINE void axpy_tile(const T* coef, int64_t si, int64_t sk, const T* src, int64_t K, int64_t Nc, int64_t i,
                            int64_t n, T* out) {
  using V = typename L::Vec;
  constexpr int W = L::kWidth;
  V acc[R][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    const V s0 = load<V>(src + k * Nc + n), s1 = load<V>(src + k * Nc + n + W);
    for (int r = 0; r < R; ++r) {
      const T c = coef[(i + r) * si + k * sk];
      acc[r][0] += c * s0;
      acc[r][1] += c * s1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store(out + (i + r) * Nc + n, acc[r][0]);
    store(out + (i + r) * Nc + n + W, acc[r][1]);
  }
}

// out[i][n] = sum_k coef[i * si + k * sk] src[k][n] for rows i in [i0, i1), src (K, Nc): a product
// whose left factor may be transposed (weight gradients: coef^T src; input gradients: coef w).
// Tiles of L::kTileRows rows by 2 vectors of columns; the last rows in tiles of 4, of 2 (where
// kTileRows is not a multiple of 4), then of 1.
template <typename T, typename L>
GCNET_INLINE void axpy_rows(const T* coef, int64_t si, int64_t sk, const T* src, int64_t K, int64_t Nc, int64_t i0,
                            int64_t i1, T* out) {
  constexpr int W = L::kWidth;
  constexpr int kI = L::kTileRows;
  const int64_t whole = Nc - Nc % (2 * W);
  for (int64_t i = i0; i < i1; i += kI) {
    const int rows = static_cast<int>(std::min<int64_t>(kI, i1 - i));
    for (int64_t n = 0; n < whole; n += 2 * W) {
      int r = 0;
      if (rows == kI) {
        axpy_tile<T, L, kI>(coef, si, sk, src, K, Nc, i, n, out);
        r = kI;
      }
      for (; kI > 4 && r + 4 <= rows; r += 4) axpy_tile<T, L, 4>(coef, si, sk, src, K, Nc, i + r, n, out);
      if constexpr (kI % 4 != 0)
        for (; r + 2 <= rows; r += 2) axpy_tile<T, L, 2>(coef, si, sk, src, K, Nc, i + r, n, out);
      for (; r < rows; ++r) axpy_tile<T, L, 1>(coef, si, sk, src, K, Nc, i + r, n, out);
    }
    for (int r = 0; r < rows; ++r) {
      T* o = out + (i + r) * Nc;
      for (int64_t n = whole; n < Nc; ++n) o[n] = 0;
      for (int64_t k = 0; k < K; ++k) {
        const T c = coef[(i + r) * si + k * sk];
        for (int64_t n = whole; n < Nc; ++n) o[n] += c * src[k * Nc + n];
      }
    }
  }
}

// The products' leaves, compiled for each vector unit (a clone cannot reach into the lambdas of
// parallel_for, so they call these); with AVX-512, the 64-byte tiles where the rows are whole tiles
// (otherwise more of them would fall to the scalar remainder loops).
#if GCNET_AVX512
#define GCNET_WIDE_PRODUCTS(T)                                                                                  \
  __attribute__((target("arch=x86-64-v4"))) void dot_rows_wide(const T* a, int64_t R, int64_t K, const T* w,    \
                                                               const T* bias, int64_t m0, int64_t m1, int64_t M, \
                                                               T* out) {                                         \
    dot_rows<T, WideLanes<T>>(a, R, K, w, bias, m0, m1, M, out);                                                 \
  }                                                                                                             \
  __attribute__((target("arch=x86-64-v4"))) void axpy_rows_wide(const T* coef, int64_t si, int64_t sk,          \
                                                                const T* src, int64_t K, int64_t Nc, int64_t i0, \
                                                                int64_t i1, T* out) {                            \
    axpy_rows<T, WideLanes<T>>(coef, si, sk, src, K, Nc, i0, i1, out);                                           \
  }
GCNET_WIDE_PRODUCTS(float)
GCNET_WIDE_PRODUCTS(double)

bool avx512_present() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#else
bool avx512_present() { return false; }
#endif

// Whether the products take the 64-byte tiles: where the CPU has AVX-512, unless switched off (tests
// compare both).
bool& wide_products() {
  static bool wide = avx512_present();
  return wide;
}

#define GCNET_PRODUCT_KERNELS(T)                                                                                \
  GCNET_CLONES void dot_rows_narrow(const T* a, int64_t R, int64_t K, const T* w, const T* bias, int64_t m0,     \
                                    int64_t m1, int64_t M, T* out) {                                            \
    dot_rows<T, Lanes<T>>(a, R, K, w, bias, m0, m1, M, out);                                                    \
  }                                                                                                             \
  GCNET_CLONES void axpy_rows_narrow(const T* coef, int64_t si, int64_t sk, const T* src, int64_t K, int64_t Nc, \
                                     int64_t i0, int64_t i1, T* out) {                                          \
    axpy_rows<T, Lanes<T>>(coef, si, sk, src, K, Nc, i0, i1, out);                                              \
  }                                                                                                             \
  void dot_rows_of(const T* a, int64_t R, int64_t K, const T* w, const T* bias, int64_t m0, int64_t m1, int64_t M,  \
                   T* out) {                                                                                    \
    if (GCNET_AVX512 && wide_products() && K % WideLanes<T>::kWidth == 0)                                       \
      GCNET_WIDE_CALL(dot_rows_wide(a, R, K, w, bias, m0, m1, M, out));                                          \
    else                                                                                                        \
      dot_rows_narrow(a, R, K, w, bias, m0, m1, M, out);                                                        \
  }                                                                                                             \
  void axpy_rows_of(const T* coef, int64_t si, int64_t sk, const T* src, int64_t K, int64_t Nc, int64_t i0,      \
                    int64_t i1, T* out) {                                                                       \
    if (GCNET_AVX512 && wide_products() && Nc % (2 * WideLanes<T>::kWidth) == 0)                                \
      GCNET_WIDE_CALL(axpy_rows_wide(coef, si, sk, src, K, Nc, i0, i1, out));                                    \
    else                                                                                                        \
      axpy_rows_narrow(coef, si, sk, src, K, Nc, i0, i1, out);                                                  \
  }

#if GCNET_AVX512
#define GCNET_WIDE_CALL(call) call
#else
#define GCNET_WIDE_CALL(call) (void)0
#endif
GCNET_PRODUCT_KERNELS(float)
GCNET_PRODUCT_KERNELS(double)

// act = [LayerNorm(hidden) * ln_w + ln_b] [ReLU] per row of (B, H). The norm's (mean, rstd) per
// row are computed into new_stats (B, 2) where that is given (forward), else read from stats.
template <typename T>
GCNET_INLINE void activate(const T* hidden, int64_t B, int64_t H, const T* ln_w, const T* ln_b, double eps, bool relu,
                           const T* stats, T* new_stats, T* act) {
  for (int64_t i = 0; i < B; ++i) {
    const T* h = hidden + i * H;
    T* y = act + i * H;
    if (ln_w) {
      T mean, rstd;
      if (new_stats) {
        double total = 0, squares = 0;
        for (int64_t k = 0; k < H; ++k) total += h[k];
        const double m = total / H;
        for (int64_t k = 0; k < H; ++k) squares += (h[k] - m) * (h[k] - m);
        mean = new_stats[2 * i] = static_cast<T>(m);
        rstd = new_stats[2 * i + 1] = static_cast<T>(1.0 / std::sqrt(squares / H + eps));
      } else {
        mean = stats[2 * i];
        rstd = stats[2 * i + 1];
      }
      for (int64_t k = 0; k < H; ++k) y[k] = (h[k] - mean) * rstd * ln_w[k] + ln_b[k];
    } else {
      std::copy(h, h + H, y);
    }
    if (relu)
      for (int64_t k = 0; k < H; ++k) y[k] = y[k] > T(0) ? y[k] : T(0);
  }
}

// Rows per task of a product with `work` multiply-adds per row: tasks of at least ~64K.
int64_t grain(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(work_per_row, 1));
}

template <typename T>
void transform_forward_of(const T* context, int64_t B, int64_t C, const T* w1, const T* b1, int64_t H, const T* ln_w,
                          const T* ln_b, double eps, bool relu, const T* w2, const T* b2, int64_t Co, bool sigmoid,
                          T* hidden, T* stats, T* act, T* out) {
  at::parallel_for(0, H, grain(B * C), [&](int64_t m0, int64_t m1) {
    dot_rows_of(context, B, C, w1, b1, m0, m1, H, hidden);
  });
  activate(hidden, B, H, ln_w, ln_b, eps, relu, stats, stats, act);
  if (GCNET_AVX512 && wide_products() && B % (2 * WideLanes<T>::kWidth) == 0) {
    // out^T = w2 act^T in rows of 64-byte tiles over the batch: no lane sums per output (K = H is short).
    // With 32-byte tiles the lane sums cost less than the transposes (1.05-1.18x slower on Zen 5).
    const std::unique_ptr<T[]> act_t(new T[H * B]), out_t(new T[Co * B]);  // uninitialized
    for (int64_t i = 0; i < B; ++i)
      for (int64_t k = 0; k < H; ++k) act_t[k * B + i] = act[i * H + k];
    at::parallel_for(0, Co, grain(B * H), [&](int64_t m0, int64_t m1) {
      axpy_rows_of(w2, H, 1, act_t.get(), H, B, m0, m1, out_t.get());
      constexpr int64_t kBand = 16;
      for (int64_t n0 = m0; n0 < m1; n0 += kBand)
        for (int64_t i = 0; i < B; ++i)
          for (int64_t n = n0; n < std::min(m1, n0 + kBand); ++n) out[i * Co + n] = out_t[n * B + i] + b2[n];
    });
  } else {
    at::parallel_for(0, Co, grain(B * H), [&](int64_t m0, int64_t m1) {
      dot_rows_of(act, B, H, w2, b2, m0, m1, Co, out);
    });
  }
  if (sigmoid)
    for (int64_t j = 0; j < B * Co; ++j) out[j] = T(1) / (T(1) + std::exp(-out[j]));
}

// Gradients of out = input w^T + b, input (B, K), w (M, K), from g (B, M), the gradient of out:
// grad_w (M, K) = g^T input, grad_b (M) = sum of g's rows, grad_input (B, K) = g w.
template <typename T>
void linear_backward(const T* g, const T* input, const T* w, int64_t B, int64_t M, int64_t K, T* grad_w, T* grad_b,
                     T* grad_input) {
  at::parallel_for(0, M, grain(B * K), [&](int64_t i0, int64_t i1) {
    axpy_rows_of(g, 1, M, input, B, K, i0, i1, grad_w);
  });
  at::parallel_for(0, B, grain(M * K), [&](int64_t i0, int64_t i1) {
    axpy_rows_of(g, M, 1, w, M, K, i0, i1, grad_input);
  });
  std::fill(grad_b, grad_b + M, T(0));
  for (int64_t i = 0; i < B; ++i)
    for (int64_t m = 0; m < M; ++m) grad_b[m] += g[i * M + m];
}

// Gradients of transform_forward_of from grad (B, Co), the gradient of its output.
template <typename T>
void transform_backward_of(const T* grad, const T* out, bool sigmoid, const T* context, int64_t B, int64_t C,
                           const T* w1, int64_t H, const T* ln_w, const T* ln_b, bool relu, const T* w2, int64_t Co,
                           const T* hidden, const T* stats, T* act, T* gz, T* gact, T* grad_context, T* gw1, T* gb1,
                           T* gln_w, T* gln_b, T* gw2, T* gb2) {
  for (int64_t j = 0; j < B * Co; ++j) gz[j] = sigmoid ? grad[j] * out[j] * (T(1) - out[j]) : grad[j];
  activate<T>(hidden, B, H, ln_w, ln_b, 0.0, relu, stats, nullptr, act);
  linear_backward(gz, act, w2, B, Co, H, gw2, gb2, gact);
  if (relu)
    for (int64_t j = 0; j < B * H; ++j) gact[j] = act[j] > T(0) ? gact[j] : T(0);
  if (ln_w) {  // gact becomes the gradient of hidden
    std::fill(gln_w, gln_w + H, T(0));
    std::fill(gln_b, gln_b + H, T(0));
    for (int64_t i = 0; i < B; ++i) {
      const T mean = stats[2 * i], rstd = stats[2 * i + 1];
      const T* h = hidden + i * H;
      T* g = gact + i * H;
      T mean_g = 0, mean_gx = 0;
      for (int64_t k = 0; k < H; ++k) {
        const T xhat = (h[k] - mean) * rstd;
        gln_w[k] += g[k] * xhat;
        gln_b[k] += g[k];
        mean_g += g[k] * ln_w[k];
        mean_gx += g[k] * ln_w[k] * xhat;
      }
      mean_g /= H;
      mean_gx /= H;
      for (int64_t k = 0; k < H; ++k) g[k] = rstd * (g[k] * ln_w[k] - mean_g - (h[k] - mean) * rstd * mean_gx);
    }
  }
  linear_backward(gact, context, w1, B, H, C, gw1, gb1, grad_context);
}

constexpr const char* kName = "gcnet context kernels";

// Layout of (B, C, N): positions contiguous (NCHW memory) or channels contiguous (channels_last).
bool is_channels_last(const torch::Tensor& t) {
  if (t.is_contiguous()) return false;
  TORCH_CHECK(t.transpose(1, 2).is_contiguous(), kName,
              ": expected (B, C, N) with positions or channels contiguous, got sizes ", t.sizes(), " and strides ",
              t.strides());
  return true;
}

void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), kName, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, kName, ": expected x of shape (B, C, N), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble, kName,
              ": expected float32 or float64, got ", x.scalar_type());
}

void check_key(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(weight.numel() == x.size(1) && weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              kName, ": expected a contiguous key weight of ", x.size(1), " ", x.scalar_type(), " values, got ",
              weight.sizes(), " ", weight.scalar_type());
}

// grad_out (or another `what`) must share x's shape, dtype and layout; returns whether that layout is
// channels_last.
bool check_pair(const torch::Tensor& x, const torch::Tensor& grad_out, const char* what = "grad_out") {
  check_x(x);
  const bool channels_last = is_channels_last(x);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                  is_channels_last(grad_out) == channels_last,
              kName, ": expected ", what, " laid out like x ", x.sizes(), " ", x.strides(), ", got ", grad_out.sizes(),
              " ", grad_out.strides());
  return channels_last;
}

void check_vectors(const char* what, const torch::Tensor& x, std::initializer_list<torch::Tensor> vectors) {
  for (const auto& v : vectors)
    TORCH_CHECK(v.numel() == x.size(0) * x.size(1) && v.is_contiguous() && v.scalar_type() == x.scalar_type(),
                kName, ": expected contiguous ", what, " (B, C) = (", x.size(0), ", ", x.size(1), ") of ",
                x.scalar_type(), ", got ", v.sizes(), " ", v.scalar_type());
}

int64_t check_block(int64_t positions_per_block, int64_t N) {
  TORCH_CHECK(positions_per_block > 0, kName, ": expected positions_per_block > 0, got ", positions_per_block);
  return std::min(positions_per_block, std::max<int64_t>(N, 1));
}

}  // namespace

// Returns alpha (B, 1, N) and context (B, C).
std::vector<torch::Tensor> attention_pool(const torch::Tensor& x, const torch::Tensor& weight,
                                          const torch::Tensor& bias, int64_t positions_per_block) {
  check_x(x);
  check_key(x, weight);
  TORCH_CHECK(bias.numel() == 1, kName, ": expected a key bias of one value, got ", bias.sizes());
  const bool channels_last = is_channels_last(x);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const int64_t P = check_block(positions_per_block, N);
  auto alpha = torch::empty({B, 1, N}, x.options());
  auto context = torch::empty({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_pool", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t b = bias.item().to<scalar_t>();
    scalar_t* ap = alpha.data_ptr<scalar_t>();
    scalar_t* cp = context.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> maxes((N + P - 1) / P);
      for (int64_t i = begin; i < end; ++i)
        forward_sample(channels_last, xp + i * C * N, C, N, P, wp, b, ap + i * N, cp + i * C, maxes.data());
    });
  });
  return {alpha, context};
}

// For z = x [* gate] + add(context): grad_x (in x's layout), grad_weight (1, C) and grad_bias (1,).
std::vector<torch::Tensor> attention_pool_backward(const torch::Tensor& x, const torch::Tensor& grad_out,
                                                   const torch::Tensor& weight, const torch::Tensor& alpha,
                                                   const torch::Tensor& context, const torch::Tensor& grad_context,
                                                   const std::optional<torch::Tensor>& gate,
                                                   int64_t positions_per_block) {
  const bool channels_last = check_pair(x, grad_out);
  check_key(x, weight);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const int64_t P = check_block(positions_per_block, N);
  TORCH_CHECK(alpha.numel() == B * N && alpha.is_contiguous() && alpha.scalar_type() == x.scalar_type(), kName,
              ": expected contiguous alpha (B, 1, N) = (", B, ", 1, ", N, "), got ", alpha.sizes());
  check_vectors("context and grad_context", x, {context, grad_context});
  if (gate) check_vectors("gate", x, {*gate});
  auto grad_x = channels_last ? torch::empty({B, N, C}, x.options()).transpose(1, 2)
                              : torch::empty({B, C, N}, x.options());
  auto grad_weight = torch::empty({1, C}, x.options());
  auto grad_bias = torch::empty({1}, x.options());
  // Per-sample partial sums, added up here rather than by dispatched ops (each costs tens of us with
  // cold caches, as the backward finds them): grad_w (B, C) and the sums of grad_logits (B).
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_pool_backward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* sp = gate ? gate->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ap = alpha.const_data_ptr<scalar_t>();
    const scalar_t* cp = context.const_data_ptr<scalar_t>();
    const scalar_t* dcp = grad_context.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    std::vector<scalar_t> grad_w(B * C);
    std::vector<double> logit_sums(B);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> grad_logits(N);
      for (int64_t i = begin; i < end; ++i) {
        double mean_term = 0;  // grad_context . context
        for (int64_t c = 0; c < C; ++c) mean_term += double(dcp[i * C + c]) * cp[i * C + c];
        backward_sample(channels_last, xp + i * C * N, gp + i * C * N, C, N, P, wp, sp ? sp + i * C : nullptr,
                        ap + i * N, dcp + i * C, scalar_t(mean_term), gxp + i * C * N, grad_w.data() + i * C,
                        grad_logits.data());
        logit_sums[i] = std::accumulate(grad_logits.begin(), grad_logits.end(), 0.0);
      }
    });
    scalar_t* gwp = grad_weight.data_ptr<scalar_t>();
    std::copy(grad_w.begin(), grad_w.begin() + C, gwp);
    for (int64_t i = 1; i < B; ++i)
      for (int64_t c = 0; c < C; ++c) gwp[c] += grad_w[i * C + c];
    grad_bias.data_ptr<scalar_t>()[0] = scalar_t(std::accumulate(logit_sums.begin(), logit_sums.end(), 0.0));
  });
  return {grad_x, grad_weight, grad_bias};
}

// sums (B, C) = sum_j grad_out_j and, where x is given, products (B, C) = sum_j grad_out_j * x_j.
std::vector<torch::Tensor> sums_over_positions(const std::optional<torch::Tensor>& x, const torch::Tensor& grad_out) {
  const bool channels_last = x ? check_pair(*x, grad_out) : (check_x(grad_out), is_channels_last(grad_out));
  const int64_t B = grad_out.size(0), C = grad_out.size(1), N = grad_out.size(2);
  auto sums = torch::empty({B, C}, grad_out.options());
  auto products = x ? torch::empty({B, C}, grad_out.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "fusion_sums", [&] {
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x ? x->const_data_ptr<scalar_t>() : gp;  // not read without x
    scalar_t* sp = sums.data_ptr<scalar_t>();
    scalar_t* pp = x ? products.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        sums_sample(channels_last, xp + i * C * N, gp + i * C * N, C, N, sp + i * C, pp ? pp + i * C : nullptr);
    });
  });
  return x ? std::vector<torch::Tensor>{sums, products} : std::vector<torch::Tensor>{sums};
}

// sum_j grad_out_j and sum_j grad_out_j * x_j, each (B, C): what a fusion's add and gate receive.
std::vector<torch::Tensor> fusion_sums(const torch::Tensor& x, const torch::Tensor& grad_out) {
  return sums_over_positions(x, grad_out);
}

// sum_j x_j, (B, C): the add's gradient (x = grad_out) or an average pooling's context times N.
torch::Tensor position_sums(const torch::Tensor& x) { return sums_over_positions(std::nullopt, x)[0]; }

// x * scale + shift with (B, C) scale and shift broadcast over positions, in x's layout; with a
// residual (x's shape and layout), max(x * scale + shift + residual, 0).
torch::Tensor scale_shift(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& shift,
                          const std::optional<torch::Tensor>& residual) {
  check_x(x);
  const bool channels_last = is_channels_last(x);
  check_vectors("scale and shift", x, {scale, shift});
  if (residual) check_pair(x, *residual, "residual");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  auto out = channels_last ? torch::empty({B, N, C}, x.options()).transpose(1, 2) : torch::empty({B, C, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scale_shift", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const scalar_t* ap = shift.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        scale_shift_sample(channels_last, xp + i * C * N, C, N, sp + i * C, ap + i * C, rp ? rp + i * C * N : nullptr,
                           op + i * C * N);
    });
  });
  return out;
}


namespace {

struct TransformWeights {
  torch::Tensor w1, b1, ln_w, ln_b, w2, b2;
  int64_t H, Co;
};

// w1 (H, C), b1 (H), ln_w and ln_b (H) or undefined, w2 (Co, H), b2 (Co): contiguous, context's dtype.
TransformWeights check_transform(const torch::Tensor& context, const torch::Tensor& w1, const torch::Tensor& b1,
                                 const std::optional<torch::Tensor>& ln_w, const std::optional<torch::Tensor>& ln_b,
                                 const torch::Tensor& w2, const torch::Tensor& b2) {
  TORCH_CHECK(context.device().is_cpu() && context.dim() == 2 && context.is_contiguous() &&
                  (context.scalar_type() == torch::kFloat || context.scalar_type() == torch::kDouble),
              kName, ": expected a contiguous CPU float32/float64 context (B, C), got ", context.sizes(), " ",
              context.scalar_type());
  const int64_t C = context.size(1), H = w1.size(0), Co = w2.size(0);
  TORCH_CHECK(ln_w.has_value() == ln_b.has_value(), kName, ": expected both LayerNorm weight and bias, or neither");
  std::vector<std::pair<const char*, const torch::Tensor*>> named = {
      {"w1", &w1}, {"b1", &b1}, {"w2", &w2}, {"b2", &b2}};
  if (ln_w) named.insert(named.end(), {{"ln_w", &*ln_w}, {"ln_b", &*ln_b}});
  for (const auto& [name, t] : named)
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == context.scalar_type() && t->device().is_cpu(), kName,
                ": expected a contiguous CPU ", context.scalar_type(), " ", name, ", got ", t->scalar_type(), " ",
                t->sizes());
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C && b1.numel() == H && w2.dim() == 2 && w2.size(1) == H &&
                  b2.numel() == Co && (!ln_w || (ln_w->numel() == H && ln_b->numel() == H)),
              kName, ": expected w1 (H, ", C, "), b1 (H), norm (H), w2 (Co, H), b2 (Co); got w1 ", w1.sizes(), ", b1 ",
              b1.sizes(), ", w2 ", w2.sizes(), ", b2 ", b2.sizes());
  return {w1, b1, ln_w ? *ln_w : torch::Tensor(), ln_b ? *ln_b : torch::Tensor(), w2, b2, H, Co};
}

template <typename T>
const T* maybe(const torch::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

// out (B, Co) = W2 act(W1 context + b1) + b2 [sigmoid], act = [LayerNorm] [ReLU]; with hidden
// (B, H) = W1 context + b1 and stats (B, 2) = the norm's mean and rstd, which the backward takes.
std::vector<torch::Tensor> transform_forward(const torch::Tensor& context, const torch::Tensor& w1,
                                             const torch::Tensor& b1, const std::optional<torch::Tensor>& ln_w,
                                             const std::optional<torch::Tensor>& ln_b, double eps, bool relu,
                                             const torch::Tensor& w2, const torch::Tensor& b2, bool sigmoid) {
  const auto p = check_transform(context, w1, b1, ln_w, ln_b, w2, b2);
  const int64_t B = context.size(0), C = context.size(1);
  auto hidden = torch::empty({B, p.H}, context.options());
  auto stats = torch::zeros({B, 2}, context.options());
  auto act = torch::empty({B, p.H}, context.options());
  auto out = torch::empty({B, p.Co}, context.options());
  AT_DISPATCH_FLOATING_TYPES(context.scalar_type(), "transform_forward", [&] {
    transform_forward_of<scalar_t>(context.const_data_ptr<scalar_t>(), B, C, maybe<scalar_t>(p.w1),
                                   maybe<scalar_t>(p.b1), p.H, maybe<scalar_t>(p.ln_w), maybe<scalar_t>(p.ln_b), eps,
                                   relu, maybe<scalar_t>(p.w2), maybe<scalar_t>(p.b2), p.Co, sigmoid,
                                   hidden.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(),
                                   out.data_ptr<scalar_t>());
  });
  return {out, hidden, stats};
}

// grad_context, grad_w1, grad_b1, grad_ln_w, grad_ln_b (undefined without a norm), grad_w2, grad_b2.
std::vector<torch::Tensor> transform_backward(const torch::Tensor& grad, const torch::Tensor& out, bool sigmoid,
                                              const torch::Tensor& context, const torch::Tensor& w1,
                                              const torch::Tensor& b1, const std::optional<torch::Tensor>& ln_w,
                                              const std::optional<torch::Tensor>& ln_b, bool relu,
                                              const torch::Tensor& w2, const torch::Tensor& b2,
                                              const torch::Tensor& hidden, const torch::Tensor& stats) {
  const auto p = check_transform(context, w1, b1, ln_w, ln_b, w2, b2);
  const int64_t B = context.size(0), C = context.size(1);
  for (const auto* t : {&grad, &out})
    TORCH_CHECK(t->sizes() == torch::IntArrayRef({B, p.Co}) && t->is_contiguous() &&
                    t->scalar_type() == context.scalar_type(),
                kName, ": expected contiguous grad and out (", B, ", ", p.Co, "), got ", t->sizes());
  TORCH_CHECK(hidden.sizes() == torch::IntArrayRef({B, p.H}) && stats.sizes() == torch::IntArrayRef({B, 2}) &&
                  hidden.is_contiguous() && stats.is_contiguous(),
              kName, ": expected hidden (", B, ", ", p.H, ") and stats (", B, ", 2) from transform_forward");
  auto o = context.options();
  auto grad_context = torch::empty({B, C}, o), gw1 = torch::empty({p.H, C}, o), gb1 = torch::empty({p.H}, o);
  auto gw2 = torch::empty({p.Co, p.H}, o), gb2 = torch::empty({p.Co}, o);
  auto gln_w = torch::empty({p.H}, o), gln_b = torch::empty({p.H}, o);
  auto act = torch::empty({B, p.H}, o), gz = torch::empty({B, p.Co}, o), gact = torch::empty({B, p.H}, o);
  AT_DISPATCH_FLOATING_TYPES(context.scalar_type(), "transform_backward", [&] {
    transform_backward_of<scalar_t>(
        grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), sigmoid, context.const_data_ptr<scalar_t>(), B,
        C, maybe<scalar_t>(p.w1), p.H, maybe<scalar_t>(p.ln_w), maybe<scalar_t>(p.ln_b), relu, maybe<scalar_t>(p.w2),
        p.Co, hidden.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(), act.data_ptr<scalar_t>(),
        gz.data_ptr<scalar_t>(), gact.data_ptr<scalar_t>(), grad_context.data_ptr<scalar_t>(),
        gw1.data_ptr<scalar_t>(), gb1.data_ptr<scalar_t>(), gln_w.data_ptr<scalar_t>(), gln_b.data_ptr<scalar_t>(),
        gw2.data_ptr<scalar_t>(), gb2.data_ptr<scalar_t>());
  });
  if (!ln_w) gln_w = gln_b = torch::Tensor();
  return {grad_context, gw1, gb1, gln_w, gln_b, gw2, gb2};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gcnet CPU kernels: attention pooling and fusion gradients of the global context blocks";
  m.def("attention_pool", &attention_pool, "alpha (B, 1, N), context (B, C) from x (B, C, N)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("positions_per_block"));
  m.def("attention_pool_backward", &attention_pool_backward,
        "grad_x, grad_weight (1, C), grad_bias (1,) of attention pooling fused with x [* gate] + add",
        py::arg("x"), py::arg("grad_out"), py::arg("weight"), py::arg("alpha"), py::arg("context"),
        py::arg("grad_context"), py::arg("gate"), py::arg("positions_per_block"));
  m.def("fusion_sums", &fusion_sums, "sum_j grad_out_j and sum_j grad_out_j * x_j, each (B, C)", py::arg("x"),
        py::arg("grad_out"));
  m.def("position_sums", &position_sums, "sum_j x_j, (B, C)", py::arg("x"));
  m.def("scale_shift", &scale_shift,
        "x * scale + shift with (B, C) scale and shift broadcast over positions; max(that + residual, 0) with one",
        py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("residual") = py::none());
  m.def(
      "wide_products",
      [](std::optional<bool> enable) {
        if (enable) wide_products() = *enable && avx512_present();
        return wide_products();
      },
      "whether the transforms' products take 64-byte (AVX-512) tiles; `enable` sets it (for tests)",
      py::arg("enable") = py::none());
  m.attr("built_for") = GCNET_ISA;
  m.def("transform_forward", &transform_forward,
        "out (B, Co) = W2 act(W1 context + b1) + b2 [sigmoid], act = [LayerNorm] [ReLU]; with hidden and norm stats",
        py::arg("context"), py::arg("w1"), py::arg("b1"), py::arg("ln_w"), py::arg("ln_b"), py::arg("eps"),
        py::arg("relu"), py::arg("w2"), py::arg("b2"), py::arg("sigmoid"));
  m.def("transform_backward", &transform_backward,
        "grad_context and the parameters' gradients of transform_forward", py::arg("grad"), py::arg("out"),
        py::arg("sigmoid"), py::arg("context"), py::arg("w1"), py::arg("b1"), py::arg("ln_w"), py::arg("ln_b"),
        py::arg("relu"), py::arg("w2"), py::arg("b2"), py::arg("hidden"), py::arg("stats"));
}
