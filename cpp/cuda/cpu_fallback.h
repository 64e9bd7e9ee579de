// The evolution ops on CUDA run their decisions on host copies: they call the op's CPU kernel
// through the dispatcher, so its checks, messages and rules stay in one place.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

namespace seft::cuda {

// The typed handle of a seft op (e.g. "seft::csr_slot_union"), looked up once by the caller.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace seft::cuda
