// A CUTLASS 3 (sm90) FP8 GEMM, D = alpha * A B^T in bf16, A (M, K) E4M3 row-major, B (N, K) E4M3 row-major
// (column-major K x N).  The non-"FastAccum" kernel schedules promote the tensor cores' partial sums into fp32
// (CUTLASS's MainloopSm90TmaGmmaWarpSpecializedFP8), like _scaled_mm's default.  A probe for
// benchmarks/debug/cutlass_fp8_mainloop.py: does a CUTLASS main loop built here match cuBLAS's speed, so that a
// fused epilogue (the gated product) can be put on it?
#pragma once

#ifndef FP8_GEMM_NO_TORCH
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>
#endif

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include <type_traits>

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule, int Stages = 0>
struct Fp8Gemm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignA = 16, kAlignB = 16, kAlignD = 8;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementD, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, ElementD, float>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignA, ElementB, LayoutB, kAlignB,
      float, TileShape, ClusterShape,
      std::conditional_t<Stages == 0,
                         cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
                             sizeof(typename CollectiveEpilogue::SharedStorage))>,
                         cutlass::gemm::collective::StageCount<Stages>>,
      KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                          CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static typename Gemm::Arguments arguments(const void* a, const void* b, void* d, int M, int N, int K,
                                            float alpha) {
    auto stride_a = cutlass::make_cute_packed_stride(typename GemmKernel::StrideA{}, {M, K, 1});
    auto stride_b = cutlass::make_cute_packed_stride(typename GemmKernel::StrideB{}, {N, K, 1});
    auto stride_d = cutlass::make_cute_packed_stride(typename GemmKernel::StrideD{}, {M, N, 1});
    auto* d_ptr = reinterpret_cast<ElementD*>(d);
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {reinterpret_cast<const ElementA*>(a), stride_a, reinterpret_cast<const ElementB*>(b), stride_b},
        {{alpha, 0.0f}, d_ptr, stride_d, d_ptr, stride_d}};
  }
};

#ifndef FP8_GEMM_NO_TORCH
template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule, int Stages = 0>
torch::Tensor run_fp8_gemm(torch::Tensor a, torch::Tensor b, double alpha) {
  using Kernel = Fp8Gemm<TileShape, ClusterShape, KernelSchedule, EpilogueSchedule, Stages>;
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.size(1) == b.size(1), "A (M, K) and B (N, K) contiguous");
  int M = a.size(0), K = a.size(1), N = b.size(0);
  auto d = torch::empty({M, N}, a.options().dtype(torch::kBFloat16));
  auto args = Kernel::arguments(a.data_ptr(), b.data_ptr(), d.data_ptr(), M, N, K, static_cast<float>(alpha));
  typename Kernel::Gemm gemm;
  auto workspace = torch::empty({static_cast<int64_t>(Kernel::Gemm::get_workspace_size(args)) + 1},
                                a.options().dtype(torch::kUInt8));
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, "CUTLASS cannot run this problem");
  auto stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess, "initialize failed");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "run failed");
  return d;
}
#endif
