#include "fp8_gemm.cuh"

torch::Tensor fp8_gemm_cooperative_stages5(torch::Tensor a, torch::Tensor b, double alpha) {
  using namespace cute;
  return run_fp8_gemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, 5>(a, b, alpha);
}
