// Checks the CPU kernels' inline float exp and log (csrc/cpu/vec_ops.h exp_float, log_float) against double-precision
// std::exp / std::log over every `step`-th 32-bit pattern (argv[1]; 1 is every float). Built by tests/test_vec_math.py
// once per CPU capability with that capability's flags. Prints, per function, the largest error in units in the last
// place of the float result, where it is, and how many results break a rule that ulps do not measure:
//   exp: exactly 0 below ln FLT_MIN (no denormal), at least FLT_MIN above it, inf where the float result overflows,
//        NaN for NaN;
//   log: -inf at 0, NaN below 0 and for NaN, inf at inf.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "../csrc/cpu/vec_ops.h"

using namespace kdkernels::cpu::CPU_CAPABILITY;
using V = at::vec::Vectorized<float>;

namespace {

struct Tally {
  double max_ulp = 0;
  float worst = 0;
  long bad = 0;

  // The error of `got` against the exact value, in ulps of the float nearest to it (the smallest denormal's below
  // FLT_MIN).
  void ulps(float x, float got, double exact) {
    const double a = std::fabs(exact), rounded = double(float(a));
    const double ulp = rounded < FLT_MIN ? double(std::nextafter(0.0f, 1.0f))
                                         : double(std::nextafter(float(rounded), INFINITY)) - rounded;
    const double e = std::fabs(double(got) - exact) / ulp;
    if (e > max_ulp) {
      max_ulp = e;
      worst = x;
    }
  }
};

void check_exp(const float* x, const float* y, Tally& t) {
  constexpr float LN_FLT_MIN = -87.33654f;
  for (int i = 0; i < V::size(); ++i) {
    const double exact = std::exp(double(x[i]));
    if (std::isnan(x[i])) {
      t.bad += !std::isnan(y[i]);
    } else if (x[i] < LN_FLT_MIN) {
      t.bad += y[i] != 0.0f;
    } else if (std::isinf(float(exact))) {
      t.bad += y[i] != INFINITY;
    } else {
      t.bad += !(y[i] >= FLT_MIN);
      t.ulps(x[i], y[i], exact);
    }
  }
}

void check_log(const float* x, const float* y, Tally& t) {
  for (int i = 0; i < V::size(); ++i) {
    if (std::isnan(x[i]) || x[i] < 0) {
      t.bad += !std::isnan(y[i]);
    } else if (x[i] == 0) {
      t.bad += y[i] != -INFINITY;
    } else if (std::isinf(x[i])) {
      t.bad += y[i] != INFINITY;
    } else {
      t.ulps(x[i], y[i], std::log(double(x[i])));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t step = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1;
  Tally exp_tally, log_tally;
  float x[V::size()], y[V::size()];
  int k = 0;
  auto flush = [&]() {
    VecOps<float>::exp(V::loadu(x)).store(y);
    check_exp(x, y, exp_tally);
    VecOps<float>::log(V::loadu(x)).store(y);
    check_log(x, y, log_tally);
  };
  const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, FLT_MIN, -87.33654f, -87.3365f, 88.72f, 89.0f};
  for (float s : specials) {
    x[k++] = s;
    if (k == V::size()) flush(), k = 0;
  }
  for (uint64_t b = 0; b <= 0xffffffffu; b += step) {
    const uint32_t bits = uint32_t(b);
    std::memcpy(&x[k++], &bits, sizeof bits);
    if (k == V::size()) flush(), k = 0;
  }
  std::printf("exp %.4f %.9g %ld\n", exp_tally.max_ulp, exp_tally.worst, exp_tally.bad);
  std::printf("log %.4f %.9g %ld\n", log_tally.max_ulp, log_tally.worst, log_tally.bad);
  return 0;
}
