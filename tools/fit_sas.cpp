// Fits the SAS polynomial p(f) ~= 255 * 2^f, f in [-0.5, 0.5], with fp16 coefficients, and measures
// the whole fp16 pipeline exhaustively over every fp16 input in [TA_SAS_MIN_X, 0].
//   fit_sas          measure the coefficients in turboattn/format.h
//   fit_sas --fit    search fp16 coefficients around a least-squares fit, then measure the best
#include <cmath>
#include <cstdio>
#include <cstring>

#include "reference/half.hpp"
#include "reference/sas.hpp"
#include "turboattn/format.h"

using namespace turboattn::ref;

namespace {

struct Report {
  long inputs = 0, mismatches = 0, nonzero = 0;
  int worst_code_diff = 0;
  double max_abs = 0, max_rel = 0;  // of p(f) * 2^n / 255 against 2^x, over x >= TA_SAS_SKIP_X
};

Report measure(const SasCoefficients& k) {
  Report r;
  const uint16_t min_bits = float_to_half(float(TA_SAS_MIN_X));
  for (uint32_t m = 0; m <= uint32_t(min_bits & 0x7FFF); ++m) {
    const uint16_t xh = uint16_t(0x8000 | m);
    const double x = half_to_float(xh);
    const double exact = std::exp2(x);
    const int want = int(std::nearbyint(TA_P_CODE_MAX * exact));
    const int got = sas_code_half(xh, k);
    ++r.inputs;
    if (got) ++r.nonzero;
    if (got != want) ++r.mismatches;
    r.worst_code_diff = std::max(r.worst_code_diff, std::abs(got - want));
    if (x >= TA_SAS_SKIP_X) {
      const double v = sas_value_half(xh, k) / TA_P_CODE_MAX;
      r.max_abs = std::max(r.max_abs, std::fabs(v - exact));
      r.max_rel = std::max(r.max_rel, std::fabs(v - exact) / exact);
    }
  }
  return r;
}

bool better(const Report& a, const Report& b) {
  if (a.worst_code_diff != b.worst_code_diff) return a.worst_code_diff < b.worst_code_diff;
  if (a.mismatches != b.mismatches) return a.mismatches < b.mismatches;
  return a.max_rel < b.max_rel;
}

// Least squares for 255*2^f = 255 + c1 f + c2 f^2 + c3 f^3 on a fine grid (c0 fixed at 255 so that
// the row maximum gets exactly code 255).
void least_squares(double c[4]) {
  double a[3][3] = {}, b[3] = {};
  for (int i = 0; i <= 4000; ++i) {
    const double f = -0.5 + i / 4000.0;
    const double y = TA_P_CODE_MAX * std::exp2(f) - TA_P_CODE_MAX;
    const double w = 1.0 / (std::exp2(f) * std::exp2(f));  // relative error weighting
    const double phi[3] = {f, f * f, f * f * f};
    for (int r = 0; r < 3; ++r) {
      b[r] += w * phi[r] * y;
      for (int s = 0; s < 3; ++s) a[r][s] += w * phi[r] * phi[s];
    }
  }
  for (int p = 0; p < 3; ++p)  // Gaussian elimination (well conditioned, 3x3)
    for (int r = p + 1; r < 3; ++r) {
      const double f = a[r][p] / a[p][p];
      for (int s = p; s < 3; ++s) a[r][s] -= f * a[p][s];
      b[r] -= f * b[p];
    }
  double x[3];
  for (int r = 2; r >= 0; --r) {
    double s = b[r];
    for (int t = r + 1; t < 3; ++t) s -= a[r][t] * x[t];
    x[r] = s / a[r][r];
  }
  c[0] = TA_P_CODE_MAX;
  c[1] = x[0], c[2] = x[1], c[3] = x[2];
}

void print(const char* what, const SasCoefficients& k, const Report& r) {
  std::printf("%s\n", what);
  for (int i = 0; i < 4; ++i)
    std::printf("  c%d = %.6g (fp16 0x%04X)\n", i, half_to_float(k.c[i]), k.c[i]);
  std::printf("  fp16 inputs in [%d, 0]: %ld; nonzero codes: %ld\n", TA_SAS_MIN_X, r.inputs, r.nonzero);
  std::printf("  codes differing from round(255*2^x): %ld (%.3f%%), largest difference %d\n",
              r.mismatches, 100.0 * r.mismatches / r.inputs, r.worst_code_diff);
  std::printf("  p(f)*2^n/255 vs 2^x for x >= %.0f: max abs error %.3g, max rel error %.3g\n",
              double(TA_SAS_SKIP_X), r.max_abs, r.max_rel);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--fit") == 0) {
    double c[4];
    least_squares(c);
    std::printf("least squares: c1 %.6f c2 %.6f c3 %.6f\n", c[1], c[2], c[3]);
    SasCoefficients best{{float_to_half(float(c[0])), float_to_half(float(c[1])),
                          float_to_half(float(c[2])), float_to_half(float(c[3]))}};
    Report best_r = measure(best);
    print("least-squares coefficients rounded to fp16:", best, best_r);
    const SasCoefficients start = best;
    const int span = 4;
    for (int d1 = -span; d1 <= span; ++d1)
      for (int d2 = -span; d2 <= span; ++d2)
        for (int d3 = -span; d3 <= span; ++d3) {
          SasCoefficients k = start;
          k.c[1] = uint16_t(k.c[1] + d1), k.c[2] = uint16_t(k.c[2] + d2), k.c[3] = uint16_t(k.c[3] + d3);
          const Report r = measure(k);
          if (better(r, best_r)) best = k, best_r = r;
        }
    print("best fp16 neighbours:", best, best_r);
    return 0;
  }
  print("coefficients in turboattn/format.h:", sas_default_coefficients(), measure(sas_default_coefficients()));
  return 0;
}
