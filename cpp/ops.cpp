// The one schema block of the `seft` operator namespace. Each op registers its kernels in its
// own files: cpp/cpu/<op>_cpu.cpp (TORCH_LIBRARY_IMPL(seft, CPU)) and cpp/cuda/<op>_cuda.cu
// (TORCH_LIBRARY_IMPL(seft, CUDA)); ops shared by both devices in cpp/common (cpp/README.md).
//
// A CSR weight W of shape (out, in) is (crow, col, values):
//   crow   int32 [out + 1], crow[0] == 0, non-decreasing, crow[out] == nnz
//   col    int16 (in <= 32768) or int32 [nnz], sorted and unique within each row, in [0, in)
//   values float32 / float64 / bfloat16 / float16 [nnz]
#include <torch/library.h>

#include "common/cuda_path.h"
#include "common/structure_cache.h"
#include "cpu/cpu_cache.h"
#include "cpu/isa.h"

TORCH_LIBRARY(seft, m) {
  // Y = X W^T (+ bias), X of shape (..., in) -> Y (..., out). in = x.size(-1).
  m.def("csr_spmm(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias=None) -> Tensor");
  // dX = dY W, dY of shape (..., out) -> dX (..., in_features). Deterministic.
  m.def("csr_spmm_t(Tensor grad_out, Tensor crow, Tensor col, Tensor values, int in_features) -> Tensor");
  // g[s] = sum_t dY[t, row(p)] * X[t, col(p)] with p = slots[s] (every non-zero when slots is
  // None). slots: int64, strictly increasing, in [0, nnz). Result in the accumulation dtype:
  // float64 for float64 inputs, float32 otherwise.
  m.def("csr_sddmm(Tensor grad_out, Tensor x, Tensor crow, Tensor col, Tensor? slots=None) -> Tensor");

  // --- BSR (cpp/cpu/bsr_*_cpu.cpp): W (out, in) in r x c blocks, cpp/common/bsr_checks.h ---
  // crow int32 [ceil(out / r) + 1], col int16 / int32 block columns [nblocks], values
  // [nblocks, r, c]; rows / columns of the last block row / column beyond out / in are padding.
  // Y = X W^T (+ bias), X (..., in) -> Y (..., out_features).
  m.def("bsr_spmm(Tensor x, Tensor crow, Tensor col, Tensor values, int out_features, Tensor? bias=None) -> Tensor");
  // dX = dY W, dY (..., out) -> dX (..., in_features). Deterministic, no transposed copy of W.
  m.def("bsr_spmm_t(Tensor grad_out, Tensor crow, Tensor col, Tensor values, int in_features) -> Tensor");
  // The gradient of blocks [n, r, c] (every block, or the blocks slots names: int64, strictly
  // increasing), in the accumulation dtype; padding entries are 0.
  m.def("bsr_sddmm(Tensor grad_out, Tensor x, Tensor crow, Tensor col, int r, int c, Tensor? slots=None) -> Tensor");

  // --- evolution (cpp/cpu/csr_grow_scan_cpu.cpp, csr_drop_grow_adapt_cpu.cpp, csr_slot_union_cpu.cpp) ---
  // theta: the frozen base values [nnz]; delta_slots: int64, strictly increasing indices of
  // the trainable delta's slots into the CSR arrays. Positions are flat: row * in + col.
  // budget: the unit that keeps its non-zero count: "layer", "row" or "nm" (groups of nm_m
  // inputs holding nm_n non-zeros).
  //
  // The first step of a window: streams G = dY^T X through row tiles and returns the
  // tracked positions outside the delta (grow and prune candidates, sorted), G at them,
  // the bytes it held at its peak, and whether G was finite (if not, nothing is tracked).
  // sketch > 0: G estimated from CountSketches of the tokens to that many rows (seeded).
  m.def("csr_grow_scan(Tensor grad_out, Tensor x, Tensor crow, Tensor col, Tensor theta, Tensor delta_slots, "
        "int num_grow, int num_prune, str budget=\"layer\", int nm_n=2, int nm_m=4, bool grow_inactive=True, "
        "int sketch=0, int seed=0) -> (Tensor, Tensor, int, bool)");
  // The same scan, exact, from ATen ops only (cpp/common/csr_grow_scan_tiled.cpp): csr_grow_scan's
  // CUDA kernel for the layer and row budgets; registered on the CPU too, so tests compare it
  // with the CPU kernel. tile_bytes bounds the one dense tile of G alive at a time.
  m.def("csr_grow_scan_tiled(Tensor grad_out, Tensor x, Tensor crow, Tensor col, Tensor theta, "
        "Tensor delta_slots, int num_grow, int num_prune, str budget=\"layer\", bool grow_inactive=True, "
        "int tile_bytes=1048576) -> (Tensor, Tensor, int, bool)");
  // Drop num_drop slots, grow as many at tracked positions, prune base-only positions so
  // every budget unit keeps its count; in place. Returns (remap [k]: old slot or -1,
  // counts [dropped, grown, reactivated, pruned, undropped]).
  m.def("csr_drop_grow_adapt_(Tensor(a!) crow, Tensor(b!) col, Tensor(c!) theta, Tensor(d!) delta_slots, "
        "Tensor(e!) delta, Tensor tracked, Tensor gsum, int num_drop, int in_features, str budget=\"layer\", "
        "int nm_n=2, int nm_m=4, bool grow_inactive=True) -> (Tensor, Tensor)");
  // The CSR pattern of the delta's positions and other sorted positions (disjoint), merged:
  // (crow, col, where each slot landed, where each position landed).
  m.def("csr_slot_union(Tensor crow, Tensor col, Tensor slots, Tensor positions, int in_features) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Raises ValueError unless the pattern is N:M: every group of m consecutive inputs of every row
  // holds exactly n non-zeros (cpp/common/nm_check.cpp; CUDA patterns are checked on host copies).
  m.def("csr_check_nm(Tensor crow, Tensor col, int in_features, int n, int m) -> ()");
  // Which CPU kernel set runs ("avx512", "avx2" or "base"); pass one of them or "auto" to choose.
  m.def("cpu_isa(str choose=\"\") -> str", &seft::cpu::cpu_isa);
  // The caching CPU allocator for blocks of 256 KiB and more (cpp/cpu/cpu_cache.cpp): enable -1
  // keep / 0 off / 1 on, limit in bytes (-1 keep), empty frees what it holds; returns [enabled,
  // limit, cached bytes, cached blocks, hits, misses, bytes in use, peak bytes in use].
  m.def("cpu_cache(int enable=-1, int limit=-1, bool empty=False) -> int[]", &seft::cpu::cpu_cache);
  // Which CUDA kernels run: "auto" (tensor cores for bf16 / fp16 from 64 tokens), or forced
  // "tensor_core" / "cuda_core"; "" reads the setting.
  m.def("cuda_path(str choose=\"\") -> str", &seft::cuda_path_op);
  // The column-tile index of W (cpp/common/csr_tile_index.h), int32 [out, ceil(in / tile) + 1]:
  // row o's non-zeros in columns [j * tile, (j + 1) * tile) are [tp[o][j], tp[o][j + 1]).
  // The CUDA csr_spmm_t / csr_sddmm use it (tile 128) in place of a transposed copy of W.
  m.def("csr_tile_ptr(Tensor crow, Tensor col, int in_features, int tile=128) -> Tensor");
  // Internal (the controller's, after an evolution step): the caller has just copied crow_host /
  // col_host (and slots_host) into crow / col (and slots) on a GPU, on the current stream. Checks
  // the host copies on the CPU and records the device tensors as checked, so the next op call
  // needs no device check and no sync. It trusts that the device tensors hold the host copies.
  m.def("_csr_adopt_pattern(Tensor crow, Tensor col, int in_features, Tensor crow_host, Tensor col_host, "
        "Tensor? slots=None, Tensor? slots_host=None) -> ()");
  // Patterns whose device-side check is remembered (cpp/common/structure_cache.h).
  m.def("structure_cache_size() -> int", &seft::structure_cache_size);
}
