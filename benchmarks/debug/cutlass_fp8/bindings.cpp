#include <torch/extension.h>

torch::Tensor fp8_gemm_pingpong(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_cooperative(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_cooperative_wide(torch::Tensor a, torch::Tensor b, double alpha);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pingpong", &fp8_gemm_pingpong, "FP8 GEMM, ping-pong warp groups, 64x128x128 tiles");
  m.def("cooperative", &fp8_gemm_cooperative, "FP8 GEMM, cooperative warp groups, 128x128x128 tiles");
  m.def("cooperative_wide", &fp8_gemm_cooperative_wide, "FP8 GEMM, cooperative warp groups, 128x256x128 tiles");
}
