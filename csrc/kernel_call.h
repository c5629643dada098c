// The kernel call's options as the C++ and CUDA ops read them: kdkernels/backends/kernel_call.py's KernelCall sends
// its float fields as the schema's `float[] scalars` and its int and bool fields as `int[] flags`, each in field
// order; the X-macro lists below name them in the same order (the extension exports them as CALL_SCALARS and
// CALL_FLAGS, and tests/test_ops.py compares them with the Python record).
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "row_math.h"

// X-macro item lists, laid out by hand:
// clang-format off
#define KDKERNELS_CALL_SCALARS(X) \
  X(double, temperature) X(double, ce_weight) X(double, label_smoothing) X(double, distill_weight)
#define KDKERNELS_CALL_FLAGS(X) \
  X(int64_t, ignore_index) X(bool, t2_scale) X(bool, reduce) X(bool, with_ce) X(bool, standardize)
// clang-format on

namespace kdkernels {

// One call's options, read from the op's two lists (their lengths checked against the lists above).
struct CallOptions {
  KDKERNELS_CALL_SCALARS(KDKERNELS_PARAM_FIELD)
  KDKERNELS_CALL_FLAGS(KDKERNELS_PARAM_FIELD)
  static constexpr int num_scalars = 0 KDKERNELS_CALL_SCALARS(KDKERNELS_PARAM_COUNT);
  static constexpr int num_flags = 0 KDKERNELS_CALL_FLAGS(KDKERNELS_PARAM_COUNT);

  static CallOptions from(const char* op, c10::ArrayRef<double> scalars, c10::ArrayRef<int64_t> flags) {
    TORCH_CHECK(int(scalars.size()) == num_scalars && int(flags.size()) == num_flags, op, ": scalars must hold ",
                num_scalars, " and flags ", num_flags, " numbers (kdkernels/backends/kernel_call.py), got ",
                scalars.size(), " and ", flags.size());
    CallOptions out;
    int i = 0;
    {
      const double* values = scalars.data();
      KDKERNELS_CALL_SCALARS(KDKERNELS_PARAM_READ)
    }
    i = 0;
    {
      const int64_t* values = flags.data();
      KDKERNELS_CALL_FLAGS(KDKERNELS_PARAM_READ)
    }
    return out;
  }

  // The plan's loss times T^2 with t2_scale, else 1.
  double t2() const { return t2_scale ? temperature * temperature : 1.0; }
};

}  // namespace kdkernels
