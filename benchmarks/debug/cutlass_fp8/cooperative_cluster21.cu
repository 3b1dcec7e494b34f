#include "fp8_gemm.cuh"

torch::Tensor fp8_gemm_cooperative_cluster21(torch::Tensor a, torch::Tensor b, double alpha) {
  using namespace cute;
  return run_fp8_gemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative>(a, b, alpha);
}
