// Low-rank linear layers on a CPU: y = expand(x · v_catᵀ) (+ bias), for every token count.
//
// Why a kernel of our own: at decode batch sizes a linear layer is a stream of its weights from
// memory. Through a GEMM library a low-rank layer is several small products (one shrink, one
// expand per output segment, then a concatenation), each too small to keep both cores
// streaming, so half the bytes cost 70-90 % of the dense time. Here one call streams every
// factor of the layer once, both phases split over all threads, and each segment's product is
// written straight into its block of the output. The same loops, blocked for cache, serve
// prefill batches (benchmarks/cpu_kernel_bench.py compares both with oneDNN).
//
// Weights are packed once (kernels/cpu_lowrank.py, pack_panels) into panels of PANEL outputs:
// a matrix W [N, K] becomes ceil(N / PANEL) panels, panel p holding Wᵀ[:, p·PANEL : ...] as
// [K][width] row-major (width = PANEL except for the last panel), so the microkernel reads
// PANEL consecutive outputs' weights per k and broadcasts one input value: no horizontal sums,
// no padding, one sequential stream per panel. The microkernel holds MR tokens x PANEL outputs
// in registers (AVX-512: 8 x 2 zmm, AVX2: 3 x 4 ymm); tokens come in chunks that stay in L2
// while the panels stream by. Compiled with -march=native: AVX-512, AVX2+FMA or plain C++.
//
// Segment table (int32 [7, S], kernels/segments.py META_FIELDS): rank_offset, rank, out_offset,
// out_size, u_offset (first float of the segment's panels in u), u_stride (unused: panels are
// unpadded), identity.
//
// The shrink factor v_cat [R, in] may come in row blocks ("parts", each packed on its own): a basis
// shared by several layers is packed once and read in place by every layer beside that layer's own
// rows. The parts are matrices of one phase, each writing its columns of h.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

// The vector unit, behind one small interface so that the microkernel is written once.
#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  using Mask = __mmask16;
  static constexpr int64_t W = 16;
  static Mask mask(int64_t lanes) {  // first `lanes` lanes (clamped to 0..W)
    return lanes <= 0 ? 0 : lanes >= W ? 0xFFFF : static_cast<Mask>((1u << lanes) - 1u);
  }
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static T bcast(float v) { return _mm512_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static void store(float* p, T v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
};
constexpr int64_t MR = 8;  // tokens per microkernel call: 16 accumulators, 8 broadcasts
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using T = __m256;
  using Mask = __m256i;
  static constexpr int64_t W = 8;
  static Mask mask(int64_t lanes) {
    const int64_t l = std::max<int64_t>(0, std::min<int64_t>(W, lanes));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(l)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static T bcast(float v) { return _mm256_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static void store(float* p, T v, Mask m) { _mm256_maskstore_ps(p, m, v); }
};
constexpr int64_t MR = 3;  // tokens per microkernel call: 12 accumulators, 3 broadcasts (16 ymm)
#else
struct Vec {  // portable scalar fallback (correct, not fast)
  using T = float;
  using Mask = bool;
  static constexpr int64_t W = 1;
  static Mask mask(int64_t lanes) { return lanes > 0; }
  static T zero() { return 0.f; }
  static T load(const float* p) { return *p; }
  static T load(const float* p, Mask m) { return m ? *p : 0.f; }
  static T bcast(float v) { return v; }
  static T fma(T a, T b, T c) { return a * b + c; }
  static T add(T a, T b) { return a + b; }
  static void store(float* p, T v, Mask m) {
    if (m) *p = v;
  }
};
constexpr int64_t MR = 4;
#endif

constexpr int64_t PANEL = 32;            // outputs per panel: must equal PANEL in kernels/cpu_lowrank.py
constexpr int64_t NV = PANEL / Vec::W;   // vectors per panel row
constexpr int64_t CHUNK_FLOATS = 1 << 17;  // inputs per work item (512 KB: they stay in L2 while panels stream)
// Panel rows fetched ahead of use. With several tokens per row the loop spends more time per byte
// and the hardware prefetcher alone falls behind: 16 rows ahead (2 KB) made the 30-layer stack
// about 10 % faster at 4-32 tokens on the project's EPYC (AVX-512), no change at 1 token.
constexpr int64_t PREFETCH_ROWS = 16;

// One matrix in panel layout, and where its product goes.
struct Panels {
  const float* w;   // panel p starts at w + p * PANEL * k; nullptr: identity (copy x)
  int64_t n, k;     // outputs, inputs
  const float* x;   // [tokens, k] with row stride ldx
  int64_t ldx;
  float* y;         // [tokens, n] with row stride ldy
  int64_t ldy;
  const float* bias;  // [n] or nullptr
  int64_t count() const { return (n + PANEL - 1) / PANEL; }
};

// acc[m] += x[m, :] · panel for m < R: R tokens against one panel (rows of `width` floats),
// every weight vector loaded once and used R times. FULL: width == PANEL, no masks.
template <int R, bool FULL>
inline void accumulate(const float* x, int64_t ldx, const float* panel, int64_t k, int64_t width,
                       const typename Vec::Mask* mask, typename Vec::T (&acc)[R][NV]) {
  for (int64_t i = 0; i < k; ++i) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    {  // both cache lines of the row PREFETCH_ROWS ahead (past the panel's end: a harmless no-op)
      const char* pf = reinterpret_cast<const char*>(panel + (i + PREFETCH_ROWS) * (FULL ? PANEL : width));
      _mm_prefetch(pf, _MM_HINT_T0);
      _mm_prefetch(pf + 64, _MM_HINT_T0);
    }
#endif
    typename Vec::T xb[R];
    for (int m = 0; m < R; ++m) xb[m] = Vec::bcast(x[m * ldx + i]);
    const float* row = panel + i * (FULL ? PANEL : width);
    for (int64_t v = 0; v < NV; ++v) {
      const typename Vec::T w = FULL ? Vec::load(row + v * Vec::W) : Vec::load(row + v * Vec::W, mask[v]);
      for (int m = 0; m < R; ++m) acc[m][v] = Vec::fma(w, xb[m], acc[m][v]);
    }
  }
}

// y[m, 0:width] = x[m, :] · panel (+ bias) for m < R, width <= PANEL.
template <int R>
void micro(const float* x, int64_t ldx, const float* panel, int64_t k, int64_t width, float* y, int64_t ldy,
           const float* bias) {
  typename Vec::T acc[R][NV];
  typename Vec::Mask mask[NV];
  for (int64_t v = 0; v < NV; ++v) mask[v] = Vec::mask(width - v * Vec::W);
  for (int m = 0; m < R; ++m)
    for (int64_t v = 0; v < NV; ++v) acc[m][v] = Vec::zero();
  if (width == PANEL) accumulate<R, true>(x, ldx, panel, k, width, mask, acc);
  else accumulate<R, false>(x, ldx, panel, k, width, mask, acc);
  for (int64_t v = 0; v < NV; ++v) {
    const typename Vec::T b = bias ? Vec::load(bias + v * Vec::W, mask[v]) : Vec::zero();
    for (int m = 0; m < R; ++m) Vec::store(y + m * ldy + v * Vec::W, Vec::add(acc[m][v], b), mask[v]);
  }
}

// micro<rows>, for a runtime rows <= R.
template <int R>
void micro_rows(int64_t rows, const float* x, int64_t ldx, const float* panel, int64_t k, int64_t width, float* y,
                int64_t ldy, const float* bias) {
  if constexpr (R > 1) {
    if (rows < R) return micro_rows<R - 1>(rows, x, ldx, panel, k, width, y, ldy, bias);
  }
  micro<R>(x, ldx, panel, k, width, y, ldy, bias);
}

// Panel p of `a` for tokens [t0, t1).
void panel_product(const Panels& a, int64_t p, int64_t t0, int64_t t1) {
  const int64_t n0 = p * PANEL, width = std::min(PANEL, a.n - n0);
  const float* panel = a.w + n0 * a.k;
  const float* bias = a.bias ? a.bias + n0 : nullptr;
  for (int64_t t = t0; t < t1; t += MR) {
    const float* x = a.x + t * a.ldx;
    float* y = a.y + t * a.ldy + n0;
    micro_rows<MR>(std::min(MR, t1 - t), x, a.ldx, panel, a.k, width, y, a.ldy, bias);
  }
}

// Identity segment: y block = x block (+ bias), PANEL columns at a time.
void panel_copy(const Panels& a, int64_t p, int64_t t0, int64_t t1) {
  const int64_t n0 = p * PANEL, n1 = std::min(a.n, n0 + PANEL);
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t j = n0; j < n1; ++j) a.y[t * a.ldy + j] = a.x[t * a.ldx + j] + (a.bias ? a.bias[j] : 0.f);
}

// One phase of a layer: every panel of every matrix, for all tokens, as work items (token
// chunk, panel). Consecutive items share the chunk, so its inputs stay in cache while panels
// stream by; each thread takes a contiguous run of items of about equal cost.
struct Work {
  std::vector<Panels> mats;
  int64_t tokens = 0;
  std::vector<int64_t> first{0};  // first global panel of each matrix
  int64_t chunk = MR, panels = 0;
  std::vector<double> cost{0.0};  // prefix sums of the items' costs (bytes and flops: width * k * rows)

  Work(std::vector<Panels> m, int64_t t) : mats(std::move(m)), tokens(t) {
    int64_t k_max = 1;
    for (const auto& a : mats) {
      first.push_back(first.back() + a.count());
      k_max = std::max(k_max, a.k);
    }
    panels = first.back();
    chunk = std::max<int64_t>(MR, CHUNK_FLOATS / k_max / MR * MR);
    for (int64_t i = 0; i < items(); ++i) {
      const auto [j, p, t0, t1] = locate(i);
      const int64_t width = std::min(PANEL, mats[j].n - p * PANEL);
      cost.push_back(cost.back() + static_cast<double>(width) * std::max<int64_t>(mats[j].k, 1) * (t1 - t0));
    }
  }
  int64_t items() const { return panels * ((tokens + chunk - 1) / chunk); }
  std::tuple<int64_t, int64_t, int64_t, int64_t> locate(int64_t i) const {  // matrix, its panel, tokens
    const int64_t c = i / panels, g = i % panels;
    const int64_t j = std::upper_bound(first.begin(), first.end(), g) - first.begin() - 1;
    return {j, g - first[j], c * chunk, std::min(tokens, (c + 1) * chunk)};
  }
  void run(int64_t i) const {
    const auto [j, p, t0, t1] = locate(i);
    if (mats[j].w) panel_product(mats[j], p, t0, t1);
    else panel_copy(mats[j], p, t0, t1);
  }
  int64_t begin(int64_t thread, int64_t threads) const {  // first item of `thread`
    return std::lower_bound(cost.begin(), cost.end(), cost.back() * thread / threads) - cost.begin();
  }
};

// The phases in order (the expand reads what the shrink wrote) in ONE parallel region with a
// barrier between them: at decode sizes a fork/join per phase costs as much as a small layer.
void run_phases(const std::vector<const Work*>& phases) {
#ifdef _OPENMP
  const int threads = at::get_num_threads();
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t tid = omp_get_thread_num(), n = omp_get_num_threads();
      for (size_t q = 0; q < phases.size(); ++q) {
        if (q > 0) {
#pragma omp barrier
        }
        const Work& w = *phases[q];
        for (int64_t i = w.begin(tid, n), end = w.begin(tid + 1, n); i < end; ++i) w.run(i);
      }
    }
    return;
  }
#endif
  for (const Work* w : phases)
    for (int64_t i = 0; i < w->items(); ++i) w->run(i);
}

void check_x(const at::Tensor& x, int64_t k, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "soco_cpu: ", what, " must be 2-D with unit column stride");
  TORCH_CHECK(x.size(1) == k, "soco_cpu: ", what, " has ", x.size(1), " columns, the factors expect ", k);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "soco_cpu: float32 only, got ", x.scalar_type());
}

void check_factor(const at::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat && t.dim() == 1, "soco_cpu: ", what,
              " must be a contiguous 1-D float32 panel buffer");
  TORCH_CHECK(t.numel() >= numel, "soco_cpu: ", what, " holds ", t.numel(), " floats, needs ", numel);
}

// The shrink's work: h [tokens, R] = x v_catᵀ, v_cat given as row blocks v[i] [ranks[i], in], each
// packed as panels, block i writing columns [ranks[0] + ... + ranks[i-1], + ranks[i]) of h.
Work shrink_work(const at::Tensor& x, const at::TensorList& v, const at::IntArrayRef& ranks, at::Tensor& h) {
  const int64_t in = x.size(1);
  check_x(x, in, "x");
  TORCH_CHECK(!v.empty() && v.size() == ranks.size(), "soco_cpu: ", v.size(), " shrink parts for ", ranks.size(),
              " ranks");
  int64_t rank_total = 0;
  for (const int64_t r : ranks) rank_total += r;
  h = at::empty({x.size(0), rank_total}, x.options());
  std::vector<Panels> mats;
  int64_t offset = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    check_factor(v[i], ranks[i] * in, "v (shrink panels)");
    mats.push_back(Panels{v[i].data_ptr<float>(), ranks[i], in, x.data_ptr<float>(), x.stride(0),
                          h.data_ptr<float>() + offset, rank_total, nullptr});
    offset += ranks[i];
  }
  return Work(std::move(mats), x.size(0));
}

// The expand's work: y [tokens, out_features] = each segment's h_j U_jᵀ (identity: h_j), + bias.
Work expand_work(const at::Tensor& h, const at::Tensor& u, const at::Tensor& meta,
                 const std::optional<at::Tensor>& bias, int64_t out_features, at::Tensor& y) {
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == 7 && meta.scalar_type() == at::kInt && meta.is_contiguous(),
              "soco_cpu: meta must be a contiguous int32 [7, segments] table");
  const int64_t S = meta.size(1);
  const int32_t* mt = meta.data_ptr<int32_t>();
  int64_t rank_total = 0;
  for (int64_t s = 0; s < S; ++s) rank_total = std::max<int64_t>(rank_total, mt[s] + mt[S + s]);
  check_x(h, rank_total, "h");
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == out_features,
                "soco_cpu: bias must be a contiguous float32 [", out_features, "]");
  }
  TORCH_CHECK(u.is_contiguous() && u.scalar_type() == at::kFloat, "soco_cpu: u must be contiguous float32");
  y = at::empty({h.size(0), out_features}, h.options());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  std::vector<Panels> mats;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t roff = mt[s], rank = mt[S + s], ooff = mt[2 * S + s], osz = mt[3 * S + s];
    const int64_t uoff = mt[4 * S + s], ident = mt[6 * S + s];
    TORCH_CHECK(ooff + osz <= out_features, "soco_cpu: segment ", s, " ends past out_features");
    TORCH_CHECK(ident || uoff + osz * rank <= u.numel(), "soco_cpu: segment ", s, " ends past u");
    mats.push_back(Panels{ident ? nullptr : u.data_ptr<float>() + uoff, osz, rank, h.data_ptr<float>() + roff,
                          h.stride(0), y.data_ptr<float>() + ooff, out_features, bp ? bp + ooff : nullptr});
  }
  return Work(std::move(mats), h.size(0));
}

at::Tensor shrink(const at::Tensor& x, at::TensorList v, at::IntArrayRef ranks) {
  at::Tensor h;
  const Work w = shrink_work(x, v, ranks, h);
  run_phases({&w});
  return h;
}

at::Tensor expand(const at::Tensor& h, const at::Tensor& u, const at::Tensor& meta, const std::optional<at::Tensor>& bias,
                  int64_t out_features) {
  at::Tensor y;
  const Work w = expand_work(h, u, meta, bias, out_features, y);
  run_phases({&w});
  return y;
}

at::Tensor lowrank(const at::Tensor& x, at::TensorList v, const at::Tensor& u, const at::Tensor& meta,
                   const std::optional<at::Tensor>& bias, at::IntArrayRef ranks, int64_t out_features) {
  at::Tensor h, y;
  const Work w1 = shrink_work(x, v, ranks, h);
  const Work w2 = expand_work(h, u, meta, bias, out_features, y);
  run_phases({&w1, &w2});
  return y;
}

}  // namespace

// The op namespace: soco_cpu, or another one for a second build with other ISA flags in the
// same process (the tests build the AVX2 and plain C++ variants beside the native one).
#ifndef SOCO_CPU_NS
#define SOCO_CPU_NS soco_cpu
#endif

TORCH_LIBRARY(SOCO_CPU_NS, m) {
  m.def("shrink(Tensor x, Tensor[] v, int[] ranks) -> Tensor");
  m.def("expand(Tensor h, Tensor u, Tensor meta, Tensor? bias, int out_features) -> Tensor");
  m.def("lowrank(Tensor x, Tensor[] v, Tensor u, Tensor meta, Tensor? bias, int[] ranks, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(SOCO_CPU_NS, CPU, m) {
  m.impl("shrink", &shrink);
  m.impl("expand", &expand);
  m.impl("lowrank", &lowrank);
}
