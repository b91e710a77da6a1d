// rome_update_, the fused update of a ROME edit, composed of the ops cholesky_solve, normalize_dot
// and rank_k_update_ (csrc/cpu/update_ops.cpp) through the dispatcher, so one device-generic
// algorithm serves every device those ops have kernels for. The algorithm and its numerics:
// docs/kernels.md.
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "checks.h"

TORCH_LIBRARY_FRAGMENT(rome_fast, m) {
  // u = C⁻¹k̄ / ‖C⁻¹k̄‖ from the cached factor of C, right = resid / ⟨k*, u⟩, W += u ⊗ right in
  // place; batched over columns (kbar, kstar [d_k, n], resid [d_v, n]). Returns (u, right), float32.
  m.def("rome_update_(Tensor(a!) W, Tensor factor, Tensor kbar, Tensor kstar, Tensor resid, "
        "str layout, str factor_kind='cholesky', Tensor? pivots=None) -> (Tensor, Tensor)");
}

namespace rome_fast {
namespace {

// Columns whose ⟨k*, u⟩ is below this fraction of ‖k*‖ would scale the residual by > 10⁶.
constexpr double kMinCosine = 1e-6;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void check_rome_update_(const at::Tensor& W, const at::Tensor& factor, const at::Tensor& kbar,
                        const at::Tensor& kstar, const at::Tensor& resid, std::string_view layout,
                        std::string_view factor_kind, const std::optional<at::Tensor>& pivots) {
  check_weight(W);
  const bool in_out = parse_layout(layout);
  const int64_t d_k = in_out ? W.size(0) : W.size(1), d_v = in_out ? W.size(1) : W.size(0);
  RF_CHECK(factor_kind == "cholesky" || factor_kind == "lu",
           "factor_kind must be 'cholesky' or 'lu', got '", factor_kind, "'");
  RF_CHECK(factor.dim() == 2 && factor.size(0) == factor.size(1),
           "factor must be a square matrix, got shape ", factor.sizes());
  RF_CHECK(factor.size(0) == d_k, "factor is ", factor.sizes(), " but W ", W.sizes(), " in layout '",
           layout, "' has d_k = ", d_k, " (is the layout right?)");
  RF_CHECK(factor.scalar_type() == at::kFloat || factor.scalar_type() == at::kDouble,
           "factor must be float32 or float64, got ", factor.scalar_type());
  check_same_device(factor, "factor", W, "W");
  if (factor_kind == "lu") {
    RF_CHECK(pivots.has_value(), "factor_kind 'lu' needs the pivots of the LU factorisation");
    RF_CHECK(pivots->dim() == 1 && pivots->size(0) == d_k && pivots->scalar_type() == at::kInt,
             "pivots must be int32 of shape [", d_k, "], got ", pivots->scalar_type(), " ",
             pivots->sizes());
    check_same_device(*pivots, "pivots", W, "W");
  }
  RF_CHECK(kbar.dim() == 1 || kbar.dim() == 2, "kbar must be [d_k] or [d_k, n], got shape ",
           kbar.sizes());
  RF_CHECK(kstar.sizes() == kbar.sizes(), "kstar shape ", kstar.sizes(), " != kbar shape ",
           kbar.sizes());
  RF_CHECK(kbar.size(0) == d_k, "kbar has ", kbar.size(0), " entries but W ", W.sizes(),
           " in layout '", layout, "' has d_k = ", d_k, " (is the layout right?)");
  const bool vec = kbar.dim() == 1;
  const int64_t n = vec ? 1 : kbar.size(1);
  RF_CHECK(resid.dim() == kbar.dim() && resid.size(0) == d_v && (vec || resid.size(1) == n),
           "resid must be ", vec ? "[d_v]" : "[d_v, n]", " with d_v = ", d_v, " (W ", W.sizes(),
           " in layout '", layout, "') and n = ", n, ", got shape ", resid.sizes());
  for (const auto* t : {&kbar, &kstar, &resid}) {
    RF_CHECK(at::isFloatingType(t->scalar_type()), "kbar, kstar and resid must be floating point, got ",
             t->scalar_type());
    RF_CHECK(t->device() == W.device(), "kbar, kstar and resid must be on W's device ", W.device(),
             ", got ", t->device());
  }
  RF_CHECK(n > 0, "no edits: kbar has 0 columns");
  // One host sync for all three; finding the culprit only on failure.
  if (!(at::isfinite(kbar).all() & at::isfinite(kstar).all() & at::isfinite(resid).all())
           .item<bool>()) {
    const char* bad = !at::isfinite(kbar).all().item<bool>()    ? "kbar"
                      : !at::isfinite(kstar).all().item<bool>() ? "kstar"
                                                                : "resid";
    RF_CHECK(false, bad, " contains NaN or Inf");
  }
}

std::tuple<at::Tensor, at::Tensor> rome_update_(at::Tensor& W, const at::Tensor& factor,
                                                const at::Tensor& kbar, const at::Tensor& kstar,
                                                const at::Tensor& resid, std::string_view layout,
                                                std::string_view factor_kind,
                                                const std::optional<at::Tensor>& pivots) {
  check_rome_update_(W, factor, kbar, kstar, resid, layout, factor_kind, pivots);
  static const auto cholesky_solve =
      op<at::Tensor(const at::Tensor&, const at::Tensor&)>("rome_fast::cholesky_solve");
  static const auto normalize_dot =
      op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>(
          "rome_fast::normalize_dot");
  static const auto rank_k_update = op<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            std::string_view)>("rome_fast::rank_k_update_");

  const bool vec = kbar.dim() == 1;
  const at::Tensor kb = vec ? kbar.unsqueeze(1) : kbar;
  const at::Tensor ks = (vec ? kstar.unsqueeze(1) : kstar).to(at::kFloat).contiguous();
  const at::Tensor rs = (vec ? resid.unsqueeze(1) : resid).to(at::kDouble);
  // Y = C⁻¹ k̄ with the cached factor: cholesky_solve (fp64 right-hand sides), or ATen's LU solve
  // in the factor's dtype. Row-major for normalize_dot.
  const at::Tensor Y =
      (factor_kind == "cholesky"
           ? cholesky_solve.call(factor, kb.to(at::kDouble))
           : at::linalg_lu_solve(factor, *pivots, kb.to(factor.scalar_type())))
          .contiguous();
  auto [U, stats] = normalize_dot.call(Y, ks);
  const at::Tensor st = stats.cpu();
  const double* s = st.data_ptr<double>();
  const int64_t n = kb.size(1);
  for (int64_t j = 0; j < n; ++j) {
    const double norm = s[j], dot = s[n + j], knorm = s[2 * n + j];
    RF_CHECK(std::isfinite(norm) && norm > 0, "C^-1 kbar is ",
             std::isfinite(norm) ? "zero" : "not finite", " for edit ", j,
             std::isfinite(norm) ? " (is kbar zero?)" : " (is C singular or the factor invalid?)");
    const double cosine = dot / (norm * knorm);
    RF_CHECK(std::isfinite(cosine) && std::abs(cosine) > kMinCosine,
             "the denominator <kstar, u> is ~0 for edit ", j, " (<kstar, u> = ", dot / norm,
             ", cosine ", cosine, "): kstar is orthogonal to C^-1 kbar, the update would blow up");
  }
  // right = resid / <k*, u>, divided in fp64 and rounded once.
  const at::Tensor R = (rs / (stats[1] / stats[0])).to(at::kFloat).contiguous();
  rank_k_update.call(W, U, R, layout);
  if (vec) return {U.squeeze(1), R.squeeze(1)};
  return {U, R};
}

}  // namespace
}  // namespace rome_fast

// Device-generic: the pieces it calls dispatch on the tensors' device.
TORCH_LIBRARY_IMPL(rome_fast, CompositeExplicitAutograd, m) {
  m.impl("rome_update_", &rome_fast::rome_update_);
}
