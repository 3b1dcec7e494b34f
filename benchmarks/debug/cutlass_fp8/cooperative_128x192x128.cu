#include "fp8_gemm.cuh"

torch::Tensor fp8_gemm_cooperative_128x192x128(torch::Tensor a, torch::Tensor b, double alpha) {
  using namespace cute;
  return run_fp8_gemm<Shape<_128, _192, _128>, Shape<_1, _2, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, 0>(a, b, alpha);
}
