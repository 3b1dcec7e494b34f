#include "fp8_gemm.cuh"

torch::Tensor fp8_gemm_cooperative_fast_accum(torch::Tensor a, torch::Tensor b, double alpha) {
  using namespace cute;
  return run_fp8_gemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum, cutlass::epilogue::TmaWarpSpecializedCooperative, 0>(a, b, alpha);
}
