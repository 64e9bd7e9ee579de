// A once-per-version memo of structure checks, so that a training step on the GPU does not
// synchronise: checking a CSR pattern (or a slots list) stored on the device needs a device ->
// host read, and the pattern only changes at an evolution step.
//
// An entry is keyed by the tensors' identities (TensorImpl, held by a weak reference so that
// an address cannot be reused while the entry lives), their data pointers, sizes and version
// counters, and in_features (or nnz for slots). Any in-place change through torch (an
// evolution step, copy_, index_put_, ...) bumps the version and forces a new check (the
// evolution ops write through copy_, so they bump it; a test holds them to it). Writes that
// bypass the version counter (through `.data`, DLPack or raw pointers) are not seen: the
// kernels clamp every offset and index, so they stay in bounds on such a stale pattern, but
// results are then undefined. Inference tensors have no version counter: checked every call.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>

namespace seft {

// Runs `check` (which throws on bad input) unless (crow, col, in) passed it unchanged before,
// and returns what `check` returned then: a tensor derived from the checked pattern (the CUDA
// ops' column-tile index, built before the check's sync so it is complete on every stream).
at::Tensor checked_structure(const at::Tensor& crow, const at::Tensor& col, int64_t in,
                             const std::function<at::Tensor()>& check);

// Records (crow, col, in) as checked, with its derived tensor, without a device check: for a
// pattern the caller has just checked on the host and copied to these tensors itself.
void remember_structure(const at::Tensor& crow, const at::Tensor& col, int64_t in, const at::Tensor& derived);

// The same for a slots list against nnz.
void checked_slots(const at::Tensor& slots, int64_t nnz, const std::function<void()>& check);
void remember_slots(const at::Tensor& slots, int64_t nnz);

// Number of live entries (for tests and diagnostics).
int64_t structure_cache_size();

}  // namespace seft
