// Response normalisation then 3x3/2 max pooling, fused, for CPU tensors: the C++ twin of
// model/lrn_pool_kernel.py (same contract), compiled at first use by model/lrn_pool_cpu.py.
//
// Forward: each (image, channel) plane's normalised values go to a buffer that stays in
// the L1 cache, are pooled from there, and only the pooled maps and each window's argmax
// (int8, 0..8, row-major) reach memory. Backward: per (image, tower), channel by channel,
// the pooled gradient is routed to its argmaxes, D recomputed, and each channel's
// gradient finished once its neighbours' terms exist (a ring of 2·half+1 planes).
// channels_last: per image, channel vectors at each pixel, the pooling vectorised along
// channels. Work is split over torch's own threads (at::parallel_for); every output
// element is computed by one thread in a fixed order, so results do not depend on the
// thread count.
//
// Arithmetic in float (double for double inputs); inputs float, double, bf16 or fp16.
// Outputs go into the caller's tensors (allocated in Python): no tensor is made here.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// d^-β; for the paper's β = 0.75 as ⁴√d / d (what the PyTorch path computes, and it
// vectorises where pow does not).
template <typename acc_t>
inline acc_t pow_neg(acc_t d, acc_t beta, bool three_quarters) {
  return three_quarters ? std::sqrt(std::sqrt(d)) / d : std::pow(d, -beta);
}

struct Params {
  int64_t N, C, H, W, HO, WO, CG, half;
  double alpha, beta, k;
};

// out[q] = Σ_m f(planes[m][q]) over `count` planes, f the square or the identity, in one
// pass (count known at compile time up to 5, the paper's window; a loop beyond).
template <int K, bool SQ, typename T, typename acc_t>
inline void sum_k(const T* const* planes, int64_t n, acc_t* __restrict out) {
  const T* pl[K];
  for (int m = 0; m < K; ++m) pl[m] = planes[m];
  for (int64_t q = 0; q < n; ++q) {
    acc_t s = 0;
    for (int m = 0; m < K; ++m) {
      const acc_t v = static_cast<acc_t>(pl[m][q]);
      s += SQ ? v * v : v;
    }
    out[q] = s;
  }
}

template <bool SQ, typename T, typename acc_t>
void window_sum(const T* const* planes, int64_t count, int64_t n, acc_t* __restrict out) {
  switch (count) {
    case 1: return sum_k<1, SQ>(planes, n, out);
    case 2: return sum_k<2, SQ>(planes, n, out);
    case 3: return sum_k<3, SQ>(planes, n, out);
    case 4: return sum_k<4, SQ>(planes, n, out);
    case 5: return sum_k<5, SQ>(planes, n, out);
  }
  sum_k<5, SQ>(planes, n, out);
  for (int64_t m = 5; m < count; ++m)
    for (int64_t q = 0; q < n; ++q) {
      const acc_t v = static_cast<acc_t>(planes[m][q]);
      out[q] += SQ ? v * v : v;
    }
}

// 3x3/2 max pooling of a plane split by parity (see forward_nchw), n outputs of pitch P:
// the maximum and its position 0..8 in row-major order; the first maximum wins ties and a
// NaN replaces (max_pool2d's rule). Positions as acc_t so that the loop vectorises.
template <typename acc_t>
void pool_parity(const acc_t* __restrict par, int64_t plane, int64_t P, int64_t n, acc_t* __restrict best,
                 acc_t* __restrict where) {
  const acc_t* ee = par;
  const acc_t* eo = par + plane;
  const acc_t* oe = par + 2 * plane;
  const acc_t* oo = par + 3 * plane;
  for (int64_t q = 0; q < n; ++q) {
    acc_t b = ee[q], w = 0;
    const acc_t v[8] = {eo[q], ee[q + 1], oe[q], oo[q], oe[q + 1], ee[q + P], eo[q + P], ee[q + P + 1]};
    for (int t = 0; t < 8; ++t) {
      const bool m = (v[t] > b) | (v[t] != v[t]);
      b = m ? v[t] : b;
      w = m ? acc_t(t + 1) : w;
    }
    best[q] = b;
    where[q] = w;
  }
}

// ---- NCHW ------------------------------------------------------------------------------

template <typename in_t, typename out_t>
void forward_nchw(const in_t* x, out_t* out, int8_t* idx, const Params& p) {
  using acc_t = typename Acc<in_t>::type;
  const int64_t H = p.H, W = p.W, HO = p.HO, WO = p.WO, C = p.C, CG = p.CG, half = p.half;
  const int64_t HW = H * W, OHW = HO * WO;
  // The normalised plane split by row and column parity into 4 planes of pitch P: tap
  // (dh, dw) of window (ho, wo) is then plane [dh % 2][dw % 2] at q + (dh / 2)·P + dw / 2,
  // q = ho·P + wo, so the pooling is one flat loop whose 9 loads are all contiguous.
  const int64_t P = WO + 1, PR = HO + 1, PLANE = PR * P;
  const acc_t alpha = p.alpha, beta = p.beta, k = p.k;
  const bool tq = p.beta == 0.75;
  at::parallel_for(0, p.N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(HW), par(4 * PLANE + 1, acc_t(0)), best(HO * P), where(HO * P);
    std::vector<const in_t*> planes(2 * half + 1);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / C, c = item % C, g0 = c / CG * CG;
      const int64_t lo = std::max(g0, c - half), hi = std::min(g0 + CG, c + half + 1);
      const in_t* xn = x + n * C * HW;
      acc_t* sq = s.data();
      for (int64_t i = lo; i < hi; ++i) planes[i - lo] = xn + i * HW;
      window_sum<true>(planes.data(), hi - lo, HW, sq);
      const in_t* xc = xn + c * HW;
      if (tq) {
        for (int64_t q = 0; q < HW; ++q) {
          const acc_t d = k + alpha * sq[q];
          sq[q] = static_cast<acc_t>(xc[q]) * (std::sqrt(std::sqrt(d)) / d);
        }
      } else {
        for (int64_t q = 0; q < HW; ++q) sq[q] = static_cast<acc_t>(xc[q]) * std::pow(k + alpha * sq[q], -beta);
      }
      for (int64_t h = 0; h < 2 * PR - 1 && h < H; ++h) {
        const acc_t* row = sq + h * W;
        acc_t* e = par.data() + (h % 2 * 2) * PLANE + h / 2 * P;
        acc_t* o = e + PLANE;
        for (int64_t w2 = 0; w2 < P; ++w2) e[w2] = row[2 * w2];
        for (int64_t w2 = 0; w2 < WO; ++w2) o[w2] = row[2 * w2 + 1];
      }
      pool_parity(par.data(), PLANE, P, HO * P, best.data(), where.data());
      out_t* op = out + item * OHW;
      int8_t* ip = idx + item * OHW;
      for (int64_t ho = 0; ho < HO; ++ho)
        for (int64_t wo = 0; wo < WO; ++wo) {
          op[ho * WO + wo] = static_cast<out_t>(best[ho * P + wo]);
          ip[ho * WO + wo] = static_cast<int8_t>(where[ho * P + wo]);
        }
    }
  });
}

template <typename in_t, typename g_t>
void backward_nchw(const g_t* grad, const in_t* x, const int8_t* idx, in_t* gx, const Params& p) {
  using acc_t = typename Acc<in_t>::type;
  const int64_t HW = p.H * p.W, OHW = p.HO * p.WO, R = 2 * p.half + 1;
  const int64_t G = p.C / p.CG;
  const acc_t alpha = p.alpha, beta = p.beta, k = p.k, scale = -2 * alpha * beta;
  const bool tq = p.beta == 0.75;
  at::parallel_for(0, p.N * G, 1, [&](int64_t begin, int64_t end) {
    // t_i = gb_i a_i D_i^(-β-1) and own_i = gb_i D_i^-β for the last R channels.
    std::vector<acc_t> t(R * HW), own(R * HW), s(HW);
    std::vector<const acc_t*> tplanes(R);
    std::vector<const in_t*> xplanes(R);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / G, g0 = item % G * p.CG, g1 = g0 + p.CG;
      const in_t* xn = x + n * p.C * HW;
      // gx_j = own_j + scale · a_j · Σ_{i in window(j)} t_i, once t_{j+half} exists.
      auto finish = [&](int64_t j) {
        const int64_t lo = std::max(g0, j - p.half), hi = std::min(g1, j + p.half + 1);
        const acc_t* oj = own.data() + j % R * HW;
        const in_t* xj = xn + j * HW;
        acc_t* sum = s.data();
        for (int64_t i = lo; i < hi; ++i) tplanes[i - lo] = t.data() + i % R * HW;
        window_sum<false>(tplanes.data(), hi - lo, HW, sum);
        in_t* gj = gx + (n * p.C + j) * HW;
        for (int64_t q = 0; q < HW; ++q)
          gj[q] = static_cast<in_t>(oj[q] + scale * static_cast<acc_t>(xj[q]) * sum[q]);
      };
      for (int64_t i = g0; i < g1; ++i) {
        acc_t* gb = own.data() + i % R * HW;  // ∂L/∂b_i first, then own_i in place
        std::fill(gb, gb + HW, acc_t(0));
        const g_t* gi = grad + (n * p.C + i) * OHW;
        const int8_t* ii = idx + (n * p.C + i) * OHW;
        for (int64_t ho = 0; ho < p.HO; ++ho)
          for (int64_t wo = 0; wo < p.WO; ++wo) {
            const int at = ii[ho * p.WO + wo];
            gb[(2 * ho + at / 3) * p.W + 2 * wo + at % 3] += static_cast<acc_t>(gi[ho * p.WO + wo]);
          }
        const int64_t lo = std::max(g0, i - p.half), hi = std::min(g1, i + p.half + 1);
        acc_t* sq = s.data();
        for (int64_t m = lo; m < hi; ++m) xplanes[m - lo] = xn + m * HW;
        window_sum<true>(xplanes.data(), hi - lo, HW, sq);
        const in_t* xi = xn + i * HW;
        acc_t* ti = t.data() + i % R * HW;
        for (int64_t q = 0; q < HW; ++q) {
          const acc_t d = k + alpha * sq[q];
          const acc_t o = gb[q] * pow_neg(d, beta, tq);
          gb[q] = o;
          ti[q] = o * static_cast<acc_t>(xi[q]) / d;
        }
        if (i - p.half >= g0) finish(i - p.half);
      }
      for (int64_t j = std::max(g0, g1 - p.half); j < g1; ++j) finish(j);
    }
  });
}

// ---- channels_last ---------------------------------------------------------------------

// D = k + α Σ_window a² for the C channels of one pixel (contiguous at px), into d: the
// squares go to sq (C values between `half` zeros at either end), and mask[o][c] says
// whether channel c + o - half is in c's group, so each offset is one vectorised pass.
template <typename in_t, typename acc_t>
inline void pixel_denominators(const in_t* __restrict px, int64_t C, int64_t half, const acc_t* __restrict mask,
                               acc_t* __restrict sq, acc_t k, acc_t alpha, acc_t* __restrict d) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(px[c]);
    sq[half + c] = v * v;
  }
  for (int64_t c = 0; c < C; ++c) d[c] = 0;
  for (int64_t o = 0; o <= 2 * half; ++o) {
    const acc_t* m = mask + o * C;
    for (int64_t c = 0; c < C; ++c) d[c] += m[c] * sq[c + o];
  }
  for (int64_t c = 0; c < C; ++c) d[c] = k + alpha * d[c];
}

template <typename acc_t>
std::vector<acc_t> window_masks(int64_t C, int64_t CG, int64_t half) {
  std::vector<acc_t> mask((2 * half + 1) * C);
  for (int64_t o = 0; o <= 2 * half; ++o)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = c + o - half, g0 = c / CG * CG;
      mask[o * C + c] = (i >= g0 && i < g0 + CG) ? acc_t(1) : acc_t(0);
    }
  return mask;
}

// One 3x3 window of channels_last maps, C channels at once: tap pos at first + off[pos].
// Row-major order; the first maximum wins ties, a NaN replaces (max_pool2d's rule).
template <typename acc_t, typename out_t>
void pool_window_cl(const acc_t* __restrict first, const int64_t* __restrict off, int64_t C, out_t* __restrict out,
                    acc_t* __restrict where) {
  const acc_t* tap[9];
  for (int pos = 0; pos < 9; ++pos) tap[pos] = first + off[pos];
  for (int64_t c = 0; c < C; ++c) {
    acc_t best = tap[0][c], w = 0;
    for (int pos = 1; pos < 9; ++pos) {
      const acc_t v = tap[pos][c];
      const bool m = (v > best) | (v != v);
      best = m ? v : best;
      w = m ? acc_t(pos) : w;
    }
    out[c] = static_cast<out_t>(best);
    where[c] = w;
  }
}

template <typename in_t, typename out_t>
void forward_cl(const in_t* x, out_t* out, int8_t* idx, const Params& p) {
  using acc_t = typename Acc<in_t>::type;
  const int64_t H = p.H, W = p.W, HO = p.HO, WO = p.WO, C = p.C, half = p.half, HW = H * W;
  const acc_t alpha = p.alpha, beta = p.beta, k = p.k;
  const bool tq = p.beta == 0.75;
  const std::vector<acc_t> mask = window_masks<acc_t>(C, p.CG, half);
  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> b(HW * C), sq(C + 2 * half, acc_t(0)), where(C);
    for (int64_t n = begin; n < end; ++n) {
      const in_t* xn = x + n * HW * C;
      for (int64_t q = 0; q < HW; ++q) {
        acc_t* __restrict bq = b.data() + q * C;
        const in_t* __restrict xq = xn + q * C;
        pixel_denominators(xq, C, half, mask.data(), sq.data(), k, alpha, bq);
        if (tq) {
          for (int64_t c = 0; c < C; ++c) bq[c] = static_cast<acc_t>(xq[c]) * (std::sqrt(std::sqrt(bq[c])) / bq[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) bq[c] = static_cast<acc_t>(xq[c]) * std::pow(bq[c], -beta);
        }
      }
      // Tap (dh, dw) of window (ho, wo) is pixel (2·ho + dh, 2·wo + dw): at off[3·dh + dw]
      // from the window's first pixel.
      int64_t off[9];
      for (int pos = 0; pos < 9; ++pos) off[pos] = (pos / 3 * W + pos % 3) * C;
      for (int64_t ho = 0; ho < HO; ++ho)
        for (int64_t wo = 0; wo < WO; ++wo) {
          pool_window_cl(b.data() + (2 * ho * W + 2 * wo) * C, off, C, out + ((n * HO + ho) * WO + wo) * C,
                         where.data());
          int8_t* __restrict ix = idx + ((n * HO + ho) * WO + wo) * C;
          for (int64_t c = 0; c < C; ++c) ix[c] = static_cast<int8_t>(where[c]);
        }
    }
  });
}

template <typename in_t, typename g_t>
void backward_cl(const g_t* grad, const in_t* x, const int8_t* idx, in_t* gx, const Params& p) {
  using acc_t = typename Acc<in_t>::type;
  const int64_t H = p.H, W = p.W, HO = p.HO, WO = p.WO, C = p.C, half = p.half, HW = H * W;
  const acc_t alpha = p.alpha, beta = p.beta, k = p.k, scale = -2 * alpha * beta;
  const bool tq = p.beta == 0.75;
  const std::vector<acc_t> mask = window_masks<acc_t>(C, p.CG, half);
  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gb(HW * C), sq(C + 2 * half, acc_t(0)), tpad(C + 2 * half, acc_t(0)), d(C), sum(C);
    for (int64_t n = begin; n < end; ++n) {
      // ∂L/∂b: each pooled gradient added at its window's argmax.
      std::fill(gb.begin(), gb.end(), acc_t(0));
      for (int64_t ho = 0; ho < HO; ++ho)
        for (int64_t wo = 0; wo < WO; ++wo) {
          const int64_t o = ((n * HO + ho) * WO + wo) * C;
          for (int64_t c = 0; c < C; ++c) {
            const int at = idx[o + c];
            gb[((2 * ho + at / 3) * W + 2 * wo + at % 3) * C + c] += static_cast<acc_t>(grad[o + c]);
          }
        }
      const in_t* xn = x + n * HW * C;
      in_t* gn = gx + n * HW * C;
      for (int64_t q = 0; q < HW; ++q) {
        const in_t* __restrict xq = xn + q * C;
        acc_t* __restrict gq = gb.data() + q * C;
        acc_t* __restrict dd = d.data();
        acc_t* __restrict tp = tpad.data() + half;
        pixel_denominators(xq, C, half, mask.data(), sq.data(), k, alpha, dd);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t own = gq[c] * pow_neg(dd[c], beta, tq);  // gb D^-β
          gq[c] = own;
          tp[c] = own * static_cast<acc_t>(xq[c]) / dd[c];  // gb a D^(-β-1)
        }
        acc_t* __restrict s = sum.data();
        for (int64_t c = 0; c < C; ++c) s[c] = 0;
        for (int64_t o = 0; o <= 2 * half; ++o) {
          const acc_t* m = mask.data() + o * C;
          for (int64_t c = 0; c < C; ++c) s[c] += m[c] * tpad[c + o];
        }
        in_t* __restrict g = gn + q * C;
        for (int64_t c = 0; c < C; ++c) g[c] = static_cast<in_t>(gq[c] + scale * static_cast<acc_t>(xq[c]) * s[c]);
      }
    }
  });
}

// ---- entry points ----------------------------------------------------------------------

// The kernels index raw memory: every tensor is checked here, so that a wrong call is an
// error, never a write out of bounds.
Params params_of(const at::Tensor& x, const at::Tensor& pooled, const at::Tensor& idx, const at::Tensor& full,
                 int64_t size, double alpha, double beta, double k, int64_t groups, bool channels_last) {
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(x.dim() == 4 && x.size(2) >= 3 && x.size(3) >= 3, "lrn_max_pool (CPU): x must be (N, C, H>=3, W>=3)");
  TORCH_CHECK(size >= 1 && size % 2 == 1 && groups >= 1 && x.size(1) % groups == 0,
              "lrn_max_pool (CPU): size must be odd and C divisible by groups");
  const std::vector<int64_t> pooled_shape{x.size(0), x.size(1), (x.size(2) - 3) / 2 + 1, (x.size(3) - 3) / 2 + 1};
  TORCH_CHECK(pooled.sizes() == at::IntArrayRef(pooled_shape) && idx.sizes() == pooled.sizes() &&
                  full.sizes() == x.sizes() && idx.scalar_type() == at::kChar,
              "lrn_max_pool (CPU): the pooled maps, argmaxes (int8) and full-size tensor must match x");
  for (const at::Tensor* t : {&x, &pooled, &idx, &full})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(fmt), "lrn_max_pool (CPU): tensors must be CPU and ",
                channels_last ? "channels_last" : "NCHW", "-contiguous");
  return Params{x.size(0), x.size(1), x.size(2), x.size(3), pooled.size(2), pooled.size(3), x.size(1) / groups,
                size / 2, alpha, beta, k};
}

// The dtype pairs the Python side hands over: (x, out or grad) = (T, T) or (reduced, float).
template <typename F>
void dispatch(const at::Tensor& x, const at::Tensor& other, F&& f) {
  const auto xt = x.scalar_type(), ot = other.scalar_type();
  if (xt == at::kFloat && ot == at::kFloat) return f(float(), float());
  if (xt == at::kDouble && ot == at::kDouble) return f(double(), double());
  if (xt == at::kBFloat16 && ot == at::kBFloat16) return f(c10::BFloat16(), c10::BFloat16());
  if (xt == at::kBFloat16 && ot == at::kFloat) return f(c10::BFloat16(), float());
  if (xt == at::kHalf && ot == at::kHalf) return f(c10::Half(), c10::Half());
  if (xt == at::kHalf && ot == at::kFloat) return f(c10::Half(), float());
  TORCH_CHECK(false, "lrn_max_pool (CPU): unsupported dtypes ", xt, " and ", ot);
}

void forward(const at::Tensor& x, const at::Tensor& out, const at::Tensor& idx, int64_t size, double alpha,
             double beta, double k, int64_t groups, bool channels_last) {
  const Params p = params_of(x, out, idx, x, size, alpha, beta, k, groups, channels_last);
  dispatch(x, out, [&](auto in_v, auto out_v) {
    using in_t = decltype(in_v);
    using out_t = decltype(out_v);
    const in_t* xp = x.const_data_ptr<in_t>();
    out_t* op = out.mutable_data_ptr<out_t>();
    int8_t* ip = idx.mutable_data_ptr<int8_t>();
    channels_last ? forward_cl(xp, op, ip, p) : forward_nchw(xp, op, ip, p);
  });
}

void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& idx, const at::Tensor& gx,
              int64_t size, double alpha, double beta, double k, int64_t groups, bool channels_last) {
  const Params p = params_of(x, grad, idx, gx, size, alpha, beta, k, groups, channels_last);
  TORCH_CHECK(gx.scalar_type() == x.scalar_type(), "lrn_max_pool (CPU): the gradient must be in x's dtype");
  dispatch(x, grad, [&](auto in_v, auto g_v) {
    using in_t = decltype(in_v);
    using g_t = decltype(g_v);
    const g_t* gp = grad.const_data_ptr<g_t>();
    const in_t* xp = x.const_data_ptr<in_t>();
    const int8_t* ip = idx.const_data_ptr<int8_t>();
    in_t* op = gx.mutable_data_ptr<in_t>();
    channels_last ? backward_cl(gp, xp, ip, op, p) : backward_nchw(gp, xp, ip, op, p);
  });
}

}  // namespace

TORCH_LIBRARY(alexprep_cpu, m) {
  m.def("lrn_max_pool_forward(Tensor x, Tensor(a!) out, Tensor(b!) idx, int size, float alpha, float beta, "
        "float k, int groups, bool channels_last) -> ()", &forward);
  m.def("lrn_max_pool_backward(Tensor grad, Tensor x, Tensor idx, Tensor(a!) gx, int size, float alpha, "
        "float beta, float k, int groups, bool channels_last) -> ()", &backward);
}
