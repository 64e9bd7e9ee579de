// bsr_spmm_t on the CPU (per-ISA): dX = dY W with W in r x c blocks, no transposed copy of the
// values: a block-column index (per block column, its blocks' block rows and slots in block-row
// order; O(blocks) per call) drives the blocked product of bsr_common_kernel.h with each block
// read transposed. Every dX entry is summed in one fixed order (block rows ascending, then the
// block's rows) whatever the thread count (deterministic).
#pragma once
#include "cpu/bsr_common_kernel.h"

namespace seft::cpu::SEFT_ISA {
namespace {

// tptr[nbc + 1], trow / tslot[nblocks]: the blocks of each block column, by block row (trow in
// int16 while the block rows fit: 6 bytes per block in all, 0.014x dense bf16 for 8x8 blocks at 70%).
template <typename I, typename R>
void bsr_column_index(const int32_t* crow, const I* col, int64_t nbr, int64_t nbc, std::vector<int32_t>& tptr,
                      std::vector<R>& trow, std::vector<int32_t>& tslot) {
  const int64_t nb = crow[nbr];
  tptr.assign(size_t(nbc + 1), 0);
  trow.resize(size_t(nb));
  tslot.resize(size_t(nb));
  for (int64_t p = 0; p < nb; ++p) ++tptr[size_t(col[p]) + 1];
  for (int64_t b = 0; b < nbc; ++b) tptr[b + 1] += tptr[b];
  std::vector<int32_t> pos(tptr.begin(), tptr.end() - 1);
  for (int64_t br = 0; br < nbr; ++br)
    for (int32_t p = crow[br]; p < crow[br + 1]; ++p) {
      const int32_t e = pos[size_t(col[p])]++;
      trow[e] = R(br);
      tslot[e] = p;
    }
}

template <typename A, typename V, typename I>
at::Tensor bsr_spmm_t_typed(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col,
                            const at::Tensor& values, int64_t in) {
  const int64_t T = dy.size(0), out = dy.size(1), r = values.size(1), c = values.size(2);
  const int64_t nbr = crow.numel() - 1, nbc = (in + c - 1) / c;
  at::Tensor dx = at::empty({T, in}, dy.options());
  if (T == 0 || in == 0) return dx;
  std::vector<int32_t> tptr, trow32, tslot;
  std::vector<int16_t> trow16;
  BsrMM<A, V> m{};
  if (nbr <= INT16_MAX) {
    bsr_column_index<I>(crow.data_ptr<int32_t>(), col.data_ptr<I>(), nbr, nbc, tptr, trow16, tslot);
    m.idx16 = trow16.data();
  } else {
    bsr_column_index<I>(crow.data_ptr<int32_t>(), col.data_ptr<I>(), nbr, nbc, tptr, trow32, tslot);
    m.idx32 = trow32.data();
  }
  m.ptr = tptr.data();
  m.slot = tslot.data();
  m.val = values.data_ptr<V>();
  m.nrows = nbc, m.r = r, m.c = c, m.tr = true;
  m.kp = nbr * r, m.T = T, m.nout = in;
  m.y = dx.data_ptr<V>();
  bsr_mm_run<A, V>(m, dy, out);
  return dx;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
