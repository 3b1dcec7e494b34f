#include "fp8_gemm.cuh"

torch::Tensor fp8_gemm_cooperative_128x256x64(torch::Tensor a, torch::Tensor b, double alpha) {
  using namespace cute;
  return run_fp8_gemm<Shape<_128, _256, _64>, Shape<_1, _2, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, 0>(a, b, alpha);
}
