// CPU kernels of the ragged expert ops (model/moe/ragged_mm.py has the semantics and the Python
// reference loop; model/moe/cpu_kernels.py builds and loads this file).
//
// Shape legend: S rows (sorted by local expert), L local experts (group-major), G size groups,
// n a group's local experts, K/N a group's contraction/output width, F a group's ffn width.
//
// One loop over the experts in C++: each expert's GEMM is an at::mm_out straight into its rows of
// the output (a row-strided view; BLAS takes the leading dimension), so no copies and no
// per-expert Python dispatch. `offs` (int32/int64 [L], the experts' cumulative row ends) is read
// where it lives: on the CPU there is no device to wait for.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

// The experts' row ends as host ints, checked against the weights and the rows of x.
std::vector<int64_t> expert_ends(const at::Tensor& offs, int64_t experts, int64_t rows) {
  TORCH_CHECK_VALUE(offs.device().is_cpu() && offs.dim() == 1 && !at::isFloatingType(offs.scalar_type()),
                    "ragged_mm: offs must be a 1-D integer CPU tensor");
  const auto ends_t = offs.to(at::kLong).contiguous();
  const int64_t* p = ends_t.data_ptr<int64_t>();
  std::vector<int64_t> ends(p, p + ends_t.numel());
  TORCH_CHECK_VALUE(static_cast<int64_t>(ends.size()) == experts, "ragged_mm: ", ends.size(),
                    " offsets for ", experts, " experts");
  const int64_t last = ends.empty() ? 0 : ends.back();
  TORCH_CHECK_VALUE(last == rows, "ragged_mm: offsets end at ", last, ", x has ", rows, " rows");
  for (size_t e = 0; e < ends.size(); ++e)
    TORCH_CHECK_VALUE(ends[e] >= (e ? ends[e - 1] : 0), "ragged_mm: offsets must not decrease");
  return ends;
}

int64_t total_experts(at::TensorList ws) {
  int64_t n = 0;
  for (const auto& w : ws) n += w.size(0);
  return n;
}

// First row of every group and S, from the experts' row ends and the groups' local expert counts
// (one per width: the loops below index the result by group).
std::vector<int64_t> group_rows(const at::Tensor& offs, at::IntArrayRef widths, at::IntArrayRef experts,
                                int64_t rows) {
  TORCH_CHECK_VALUE(!widths.empty() && widths.size() == experts.size(), "ragged_swiglu: ", widths.size(),
                    " widths for ", experts.size(), " groups");
  int64_t total = 0;
  for (auto n : experts) total += n;
  const auto ends = expert_ends(offs, total, rows);
  std::vector<int64_t> bounds{0};
  int64_t e = 0;
  for (auto n : experts) {
    e += n;
    bounds.push_back(n ? ends[e - 1] : bounds.back());
  }
  return bounds;
}

// out [S, out_cols]: rows of an expert of group g get x[:, :K_g] @ w_g[j] in their first N_g
// columns, zeros after.
at::Tensor ragged_mm(const at::Tensor& x, at::TensorList ws, const at::Tensor& offs, int64_t out_cols) {
  const auto ends = expert_ends(offs, total_experts(ws), x.size(0));
  auto out = at::empty({x.size(0), out_cols}, x.options());
  int64_t e = 0, row = 0;
  for (const auto& w : ws) {
    const int64_t K = w.size(1), N = w.size(2), first = row;
    for (int64_t j = 0; j < w.size(0); ++j, ++e) {
      if (ends[e] > row) {
        auto out_e = out.slice(0, row, ends[e]).slice(1, 0, N);
        at::mm_out(out_e, x.slice(0, row, ends[e]).slice(1, 0, K), w.select(0, j));
      }
      row = ends[e];
    }
    if (N < out_cols && row > first) out.slice(0, first, row).slice(1, N, out_cols).zero_();
  }
  return out;
}

// Gradient of every ws[g] (x_j^T @ grad_j per expert, zero for one without rows), in the weight's
// own memory layout (empty_like keeps the strides of a transposed view).
std::vector<at::Tensor> ragged_mm_wgrad(const at::Tensor& x, const at::Tensor& grad, at::TensorList ws,
                                        const at::Tensor& offs) {
  const auto ends = expert_ends(offs, total_experts(ws), x.size(0));
  std::vector<at::Tensor> grads;
  int64_t e = 0, row = 0;
  for (const auto& w : ws) {
    const int64_t K = w.size(1), N = w.size(2);
    auto dw = at::empty_like(w);
    for (int64_t j = 0; j < w.size(0); ++j, ++e) {
      auto dw_j = dw.select(0, j);
      if (ends[e] > row)
        at::mm_out(dw_j, x.slice(0, row, ends[e]).slice(1, 0, K).t(), grad.slice(0, row, ends[e]).slice(1, 0, N));
      else
        dw_j.zero_();
      row = ends[e];
    }
    grads.push_back(dw);
  }
  return grads;
}

// silu(gate) * up at each group's width F from h's rows [gate F | up F | ...] -> [S, Fm], zero after F.
at::Tensor ragged_swiglu(const at::Tensor& h, const at::Tensor& offs, at::IntArrayRef widths,
                         at::IntArrayRef experts) {
  const auto rows = group_rows(offs, widths, experts, h.size(0));
  const int64_t fm = *std::max_element(widths.begin(), widths.end());
  auto out = at::empty({h.size(0), fm}, h.options());
  for (size_t g = 0; g < widths.size(); ++g) {
    const int64_t lo = rows[g], hi = rows[g + 1], f = widths[g];
    if (hi == lo) continue;
    auto h_g = h.slice(0, lo, hi), out_g = out.slice(0, lo, hi);
    auto a = out_g.slice(1, 0, f);
    at::silu_out(a, h_g.slice(1, 0, f));  // written in place: no temporaries
    a.mul_(h_g.slice(1, f, 2 * f));
    if (f < fm) out_g.slice(1, f, fm).zero_();
  }
  return out;
}

// [d gate | d up | 0 ...] per row, in h's layout.
at::Tensor ragged_swiglu_backward(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& offs,
                                  at::IntArrayRef widths, at::IntArrayRef experts) {
  const auto rows = group_rows(offs, widths, experts, h.size(0));
  const int64_t cols = h.size(1);
  auto out = at::empty_like(h, at::MemoryFormat::Contiguous);
  for (size_t g = 0; g < widths.size(); ++g) {
    const int64_t lo = rows[g], hi = rows[g + 1], f = widths[g];
    if (hi == lo) continue;
    auto dy = grad.slice(0, lo, hi).slice(1, 0, f);
    auto h_g = h.slice(0, lo, hi), out_g = out.slice(0, lo, hi);
    auto gate = h_g.slice(1, 0, f), up = h_g.slice(1, f, 2 * f);
    auto d_gate = out_g.slice(1, 0, f), d_up = out_g.slice(1, f, 2 * f);
    at::mul_out(d_gate, dy, up);
    at::silu_backward_out(d_gate, d_gate, gate);
    at::silu_out(d_up, gate).mul_(dy);
    if (2 * f < cols) out_g.slice(1, 2 * f, cols).zero_();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(mohge_cpu, m) {
  m.def("ragged_mm(Tensor x, Tensor[] ws, Tensor offs, int out_cols) -> Tensor", &ragged_mm);
  m.def("ragged_mm_wgrad(Tensor x, Tensor grad, Tensor[] ws, Tensor offs) -> Tensor[]", &ragged_mm_wgrad);
  m.def("ragged_swiglu(Tensor h, Tensor offs, int[] widths, int[] experts) -> Tensor", &ragged_swiglu);
  m.def("ragged_swiglu_backward(Tensor grad, Tensor h, Tensor offs, int[] widths, int[] experts) -> Tensor",
        &ragged_swiglu_backward);
}
