#include <torch/extension.h>

// tile (M x N x K), cluster, warp-group schedule -- see fp8_gemm.cuh
torch::Tensor fp8_gemm_cooperative(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_cooperative_stages5(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_cooperative_128x256x64(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_cooperative_128x192x128(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_cooperative_fast_accum(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_pingpong(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_pingpong_64x256x128(torch::Tensor a, torch::Tensor b, double alpha);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cooperative", &fp8_gemm_cooperative, "128x128x128, cluster 1x2, cooperative warp groups (promoted main loop)");
  m.def("cooperative_stages5", &fp8_gemm_cooperative_stages5, "the same with 5 pipeline stages");
  m.def("cooperative_128x256x64", &fp8_gemm_cooperative_128x256x64, "128x256x64, cluster 1x2, cooperative");
  m.def("cooperative_128x192x128", &fp8_gemm_cooperative_128x192x128, "128x192x128, cluster 1x2, cooperative");
  m.def("cooperative_fast_accum", &fp8_gemm_cooperative_fast_accum, "128x128x128, cooperative, no promotion (speed ceiling, less precise)");
  m.def("pingpong", &fp8_gemm_pingpong, "64x128x128, cluster 1x2, ping-pong warp groups");
  m.def("pingpong_64x256x128", &fp8_gemm_pingpong_64x256x128, "64x256x128, cluster 1x2, ping-pong");
}
