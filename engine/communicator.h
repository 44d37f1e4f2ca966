// Collectives between the ranks of a tensor-parallel group. Two implementations: the in-process
// one below (ranks are threads of this process, data in host memory; the CPU backend's and the
// tests'), and NCCL (kernels/cuda/nccl.cu; data in device memory, ordered on a CUDA stream).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llmq.h"

namespace llmq {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Every rank calls the same collectives in the same order, with the same counts. Data are F32;
  // `stream` is the CUDA stream they are ordered on (NCCL), nullptr for host memory.
  // In place: data = the sum (or max) over the ranks, identical on every rank.
  virtual void all_reduce_sum(float* data, size_t count, void* stream) = 0;
  virtual void all_reduce_max(float* data, size_t count, void* stream) = 0;
  // recv[r * count + i] = rank r's send[i].
  virtual void all_gather(const float* send, size_t count, float* recv, void* stream) = 0;
  // data = root's data.
  virtual void broadcast(float* data, size_t count, int root, void* stream) = 0;
  // Returns once every rank has called it.
  virtual void barrier() = 0;
  // A rank failed: every rank's pending and later collectives fail (with `status` and `why`)
  // instead of waiting for it.
  virtual void abort(llmq_status status, const std::string& why) = 0;
};

// Ranks that are threads of one process, over host memory. Sums are taken in rank order,
// ((x0 + x1) + x2) + ..., so results are deterministic and bitwise the same on every rank. A rank
// waits at most `timeout_ms` for the others at any collective, then fails with LLMQ_ERR_TIMEOUT
// naming the ranks that never arrived (and the group is aborted: never a hang). Each communicator
// is used by one thread.
std::vector<std::unique_ptr<Communicator>> make_in_process_communicators(int size, int timeout_ms);

// ---- NCCL (kernels/cuda/nccl.cu; without the CUDA backend, every call fails clearly) ----------
// libnccl.so.2 is opened with dlopen on first use only (LLMQ_NCCL_LIBRARY overrides the name), so
// a single-GPU or CPU run never needs it.

using NcclId = std::array<char, 128>;  // ncclUniqueId

// Whether libnccl can be opened; else false with the reason.
bool nccl_available(std::string* why);
// Single process: one communicator per device, communicator r on devices[r] (ncclCommInitAll).
// timeout_ms bounds barrier() waits.
std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<int>& devices, int timeout_ms);
// ncclGetUniqueId: made by one process, passed to the others by the host's own means.
NcclId nccl_unique_id();
// One rank of a group spread over processes (ncclCommInitRank on `device`), waiting at most
// timeout_ms for the other ranks to join (LLMQ_ERR_TIMEOUT otherwise).
std::unique_ptr<Communicator> make_nccl_communicator(const NcclId& id, int size, int rank, int device, int timeout_ms);
// The CUDA device of an NCCL communicator (-1 for others).
int communicator_device(const Communicator& comm);

}  // namespace llmq
