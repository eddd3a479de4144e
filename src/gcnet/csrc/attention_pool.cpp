// Attention pooling of the GC block on CPU, forward and backward, one sample per task.
//
// Cao et al., "GCNet", arXiv:1904.11492: context = sum_j alpha_j x_j, alpha = softmax_j(w . x_j + b).
// The block is memory-bound. One thread walks one sample, in blocks of positions where that pays,
// so that a second pass over a block of x finds it in cache:
//   forward:  logits, online softmax and the weighted sum over one read of x;
//   backward: grad_x = grad_out + grad_context alpha^T + w grad_logits^T and
//             grad_w = sum_j grad_logits_j x_j over one read of x and grad_out and one write,
//             with grad_logits_j = alpha_j (grad_context . x_j - grad_context . context).
// x is (B, C, N) with positions contiguous (NCHW) or channels contiguous (channels_last).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
// One build runs everywhere; the loader picks the widest vector unit the CPU has.
#define GCNET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GCNET_CLONES
#endif
#define GCNET_INLINE inline __attribute__((always_inline))

namespace {

// Positions per block, chosen by measurement (32 x {256..2048} x {56..7}^2, 2 threads; see
// docs/benchmarks.md). Channels-last blocks are contiguous: small ones keep the second pass in L2.
// Positions-contiguous blocks cut every channel row into a short segment, which defeats the
// hardware prefetcher; there only the forward of a sample larger than L2 is blocked.
int64_t block_positions(int64_t C, int64_t N, int64_t element_size, bool channels_last, bool backward) {
  const auto positions_in = [&](int64_t bytes) { return std::min(N, std::max<int64_t>(16, bytes / (C * element_size))); };
  if (channels_last) return positions_in(256 * 1024);
  if (backward || C * N * element_size <= 2 * 1024 * 1024) return N;
  return positions_in(384 * 1024);
}

// Online softmax over positions, one block at a time; the caller accumulates the context.
template <typename T>
struct OnlineSoftmax {
  T max = -std::numeric_limits<T>::infinity();
  T total = 0;

  // weights_j = exp(logits_j - new max) for the block; returns the factor for what was summed so far.
  GCNET_INLINE T add_block(const T* logits, int64_t n, T* weights) {
    T block_max = max;
    for (int64_t j = 0; j < n; ++j) block_max = std::max(block_max, logits[j]);
    const T rescale = std::exp(max - block_max);
    T block_total = 0;
    for (int64_t j = 0; j < n; ++j) {
      weights[j] = std::exp(logits[j] - block_max);
      block_total += weights[j];
    }
    total = total * rescale + block_total;
    max = block_max;
    return rescale;
  }

  // Normalises the context (C) and turns the logits kept in alpha (N) into the softmax.
  GCNET_INLINE void finish(T* context, int64_t C, T* alpha, int64_t N) const {
    const T inverse = T(1) / total;
    for (int64_t c = 0; c < C; ++c) context[c] *= inverse;
    for (int64_t j = 0; j < N; ++j) alpha[j] = std::exp(alpha[j] - max) * inverse;
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
    for (int64_t c = 0; c < C; ++c) {
      const T* row = x + c * N + j0;
      const T wc = w[c];
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
      for (int64_t c = 0; c < C; ++c) context[c] += e * row[c];
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const T* row = x + c * N + j0;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) acc += weights[j] * row[j];
      context[c] = context[c] * rescale + acc;
    }
  }
}

// alpha (N) holds the logits until the softmax; weights is scratch (P).
template <typename T, bool kChannelsLast>
GCNET_INLINE void pool_forward(const T* x, int64_t C, int64_t N, int64_t P, const T* w, T b, T* alpha, T* context,
                               T* weights) {
  std::fill(context, context + C, T(0));
  OnlineSoftmax<T> softmax;
  for (int64_t j0 = 0; j0 < N; j0 += P) {
    const int64_t n = std::min(P, N - j0);
    block_logits<T, kChannelsLast>(x, C, N, j0, n, w, b, alpha + j0);
    const T rescale = softmax.add_block(alpha + j0, n, weights);
    block_accumulate<T, kChannelsLast>(x, C, N, j0, n, weights, rescale, context);
  }
  softmax.finish(context, C, alpha, N);
}

// grad_x = grad_out + grad_context alpha_j + w dl_j and grad_w += sum_j dl_j x_j over [j0, j0 + n);
// alpha and dl point at the block.
template <typename T, bool kChannelsLast>
GCNET_INLINE void block_grad_x(const T* x, const T* grad_out, int64_t C, int64_t N, int64_t j0, int64_t n,
                               const T* w, const T* alpha, const T* grad_context, const T* dl, T* grad_x,
                               T* grad_w) {
  if constexpr (kChannelsLast) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t offset = (j0 + j) * C;
      const T* row = x + offset;
      const T* g = grad_out + offset;
      T* out = grad_x + offset;
      const T a = alpha[j];
      const T d = dl[j];
      for (int64_t c = 0; c < C; ++c) {
        out[c] = g[c] + a * grad_context[c] + d * w[c];
        grad_w[c] += d * row[c];
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t offset = c * N + j0;
      const T* row = x + offset;
      const T* g = grad_out + offset;
      T* out = grad_x + offset;
      const T d = grad_context[c];
      const T wc = w[c];
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) {
        out[j] = g[j] + d * alpha[j] + wc * dl[j];
        acc += dl[j] * row[j];
      }
      grad_w[c] += acc;
    }
  }
}

// mean_term = grad_context . context; grad_logits (N) first holds grad_context . x_j.
template <typename T, bool kChannelsLast>
GCNET_INLINE void pool_backward(const T* x, const T* grad_out, int64_t C, int64_t N, int64_t P, const T* w,
                                const T* alpha, const T* grad_context, T mean_term, T* grad_x, T* grad_w,
                                T* grad_logits) {
  std::fill(grad_w, grad_w + C, T(0));
  for (int64_t j0 = 0; j0 < N; j0 += P) {
    const int64_t n = std::min(P, N - j0);
    T* dl = grad_logits + j0;
    block_logits<T, kChannelsLast>(x, C, N, j0, n, grad_context, T(0), dl);
    for (int64_t j = 0; j < n; ++j) dl[j] = alpha[j0 + j] * (dl[j] - mean_term);
    block_grad_x<T, kChannelsLast>(x, grad_out, C, N, j0, n, w, alpha + j0, grad_context, dl, grad_x, grad_w);
  }
}

#define GCNET_SAMPLE_KERNELS(T)                                                                               \
  GCNET_CLONES void forward_sample(bool channels_last, const T* x, int64_t C, int64_t N, int64_t P,          \
                                   const T* w, T b, T* alpha, T* context, T* weights) {                      \
    if (channels_last)                                                                                       \
      pool_forward<T, true>(x, C, N, P, w, b, alpha, context, weights);                                      \
    else                                                                                                     \
      pool_forward<T, false>(x, C, N, P, w, b, alpha, context, weights);                                     \
  }                                                                                                          \
  GCNET_CLONES void backward_sample(bool channels_last, const T* x, const T* grad_out, int64_t C, int64_t N,  \
                                    int64_t P, const T* w, const T* alpha, const T* grad_context, T mean_term, \
                                    T* grad_x, T* grad_w, T* grad_logits) {                                  \
    if (channels_last)                                                                                       \
      pool_backward<T, true>(x, grad_out, C, N, P, w, alpha, grad_context, mean_term, grad_x, grad_w,          \
                             grad_logits);                                                                   \
    else                                                                                                     \
      pool_backward<T, false>(x, grad_out, C, N, P, w, alpha, grad_context, mean_term, grad_x, grad_w,         \
                              grad_logits);                                                                  \
  }

GCNET_SAMPLE_KERNELS(float)
GCNET_SAMPLE_KERNELS(double)

// Layout of (B, C, N): positions contiguous (NCHW memory) or channels contiguous (channels_last).
bool is_channels_last(const torch::Tensor& t) {
  if (t.is_contiguous()) return false;
  TORCH_CHECK(t.transpose(1, 2).is_contiguous(),
              "gcnet attention pooling: expected (B, C, N) with positions or channels contiguous, got sizes ",
              t.sizes(), " and strides ", t.strides());
  return true;
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu(), "gcnet attention pooling: expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "gcnet attention pooling: expected x of shape (B, C, N), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble,
              "gcnet attention pooling: expected float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.numel() == x.size(1) && weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "gcnet attention pooling: expected a contiguous key weight of ", x.size(1), " ", x.scalar_type(),
              " values, got ", weight.sizes(), " ", weight.scalar_type());
}

}  // namespace

// Returns alpha (B, 1, N) and context (B, C).
std::vector<torch::Tensor> attention_pool(const torch::Tensor& x, const torch::Tensor& weight,
                                          const torch::Tensor& bias) {
  check_inputs(x, weight);
  TORCH_CHECK(bias.numel() == 1, "gcnet attention pooling: expected a key bias of one value, got ", bias.sizes());
  const bool channels_last = is_channels_last(x);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  auto alpha = torch::empty({B, 1, N}, x.options());
  auto context = torch::empty({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_pool", [&] {
    const int64_t P = block_positions(C, N, sizeof(scalar_t), channels_last, false);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t b = bias.item().to<scalar_t>();
    scalar_t* ap = alpha.data_ptr<scalar_t>();
    scalar_t* cp = context.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> weights(std::min(P, N));
      for (int64_t i = begin; i < end; ++i)
        forward_sample(channels_last, xp + i * C * N, C, N, P, wp, b, ap + i * N, cp + i * C, weights.data());
    });
  });
  return {alpha, context};
}

// For z = x + transform(context): grad_x (in x's layout), grad_weight (1, C) and grad_bias (1,).
std::vector<torch::Tensor> attention_pool_add_backward(const torch::Tensor& x, const torch::Tensor& grad_out,
                                                       const torch::Tensor& weight, const torch::Tensor& alpha,
                                                       const torch::Tensor& context,
                                                       const torch::Tensor& grad_context) {
  check_inputs(x, weight);
  const bool channels_last = is_channels_last(x);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                  is_channels_last(grad_out) == channels_last,
              "gcnet attention pooling: expected grad_out laid out like x ", x.sizes(), " ", x.strides(), ", got ",
              grad_out.sizes(), " ", grad_out.strides());
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  TORCH_CHECK(alpha.numel() == B * N && context.numel() == B * C && grad_context.numel() == B * C &&
                  alpha.is_contiguous() && context.is_contiguous() && grad_context.is_contiguous(),
              "gcnet attention pooling: expected contiguous alpha (B, 1, N), context and grad_context (B, C) for ",
              "B=", B, ", C=", C, ", N=", N, "; got ", alpha.sizes(), ", ", context.sizes(), ", ", grad_context.sizes());
  auto grad_x = channels_last ? torch::empty({B, N, C}, x.options()).transpose(1, 2)
                              : torch::empty({B, C, N}, x.options());
  auto grad_w = torch::empty({B, C}, x.options());
  auto grad_logits = torch::empty({B, N}, x.options());
  auto mean_terms = (grad_context * context).sum(1);  // (B,)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_pool_add_backward", [&] {
    const int64_t P = block_positions(C, N, sizeof(scalar_t), channels_last, true);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* ap = alpha.const_data_ptr<scalar_t>();
    const scalar_t* dcp = grad_context.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean_terms.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.data_ptr<scalar_t>();
    scalar_t* dlp = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        backward_sample(channels_last, xp + i * C * N, gp + i * C * N, C, N, P, wp, ap + i * N, dcp + i * C, mp[i],
                        gxp + i * C * N, gwp + i * C, dlp + i * N);
    });
  });
  return {grad_x, grad_w.sum(0, true), grad_logits.sum().reshape({1})};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gcnet CPU kernels: attention pooling of the GC block";
  m.def("attention_pool", &attention_pool, "alpha (B, 1, N), context (B, C) from x (B, C, N)");
  m.def("attention_pool_add_backward", &attention_pool_add_backward,
        "grad_x, grad_weight (1, C), grad_bias (1,) of attention pooling fused with an add");
}
