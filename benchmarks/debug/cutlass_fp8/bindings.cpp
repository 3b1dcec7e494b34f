#include <torch/extension.h>

// tile (M x N x K), cluster, warp-group schedule -- see fp8_gemm.cuh
torch::Tensor fp8_gemm_cooperative(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_cooperative_cluster21(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_cooperative_256x128(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_pingpong(torch::Tensor a, torch::Tensor b, double alpha);
torch::Tensor fp8_gemm_pingpong_cluster21(torch::Tensor a, torch::Tensor b, double alpha);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cooperative", &fp8_gemm_cooperative, "128x128x128 tiles, cluster 1x2, cooperative warp groups");
  m.def("cooperative_cluster21", &fp8_gemm_cooperative_cluster21, "128x128x128, cluster 2x1, cooperative");
  m.def("cooperative_256x128", &fp8_gemm_cooperative_256x128, "256x128x128, cluster 1x2, cooperative");
  m.def("pingpong", &fp8_gemm_pingpong, "128x128x128, cluster 1x2, ping-pong warp groups");
  m.def("pingpong_cluster21", &fp8_gemm_pingpong_cluster21, "128x128x128, cluster 2x1, ping-pong");
}
