// NCCL communicators (engine/communicator.h). libnccl.so.2 is opened with dlopen the first time
// more than one rank is asked for, so that a single-GPU or CPU run never needs it. Collectives
// run on the calling rank's stream; a non-blocking communicator (multi-process, made with a
// timeout) is polled until each call has been enqueued. Host code only.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "engine/communicator.h"
#include "engine/error.h"

namespace llmq {

namespace {

using Clock = std::chrono::steady_clock;

struct Nccl {
#define LLMQ_NCCL_FUNCTIONS(X)                                                                                  \
  X(ncclGetErrorString) X(ncclGetUniqueId) X(ncclCommInitAll) X(ncclCommInitRankConfig) X(ncclCommGetAsyncError) \
  X(ncclCommAbort) X(ncclCommDestroy) X(ncclAllReduce) X(ncclAllGather) X(ncclBroadcast)
#define LLMQ_NCCL_MEMBER(name) decltype(&::name) name = nullptr;
  LLMQ_NCCL_FUNCTIONS(LLMQ_NCCL_MEMBER)
#undef LLMQ_NCCL_MEMBER
  decltype(&::ncclGetLastError) ncclGetLastError = nullptr;  // NCCL 2.13 and later; optional
};

// The library, opened on first success; a failure is retried on the next call (LLMQ_NCCL_LIBRARY
// may change), never cached.
const Nccl* load_nccl(std::string* why) {
  static std::mutex mutex;
  static Nccl nccl;
  static bool loaded = false;
  std::lock_guard<std::mutex> lock(mutex);
  if (loaded) return &nccl;
  const char* env = std::getenv("LLMQ_NCCL_LIBRARY");
  std::vector<std::string> names;
  if (env && *env)
    names = {env};
  else
    names = {"libnccl.so.2", "/usr/local/cuda/lib/libnccl.so.2", "/usr/local/cuda/lib64/libnccl.so.2"};
  void* lib = nullptr;
  std::string errors;
  for (const std::string& name : names) {
    if ((lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL))) break;
    const char* e = dlerror();
    errors += (errors.empty() ? "" : "; ") + std::string(e ? e : name);
  }
  if (!lib) {
    *why = fmt::format("cannot open libnccl.so.2 (NCCL, needed for more than one GPU rank): {}", errors);
    return nullptr;
  }
  Nccl n;
#define LLMQ_NCCL_LOAD(name)                                                        \
  n.name = reinterpret_cast<decltype(n.name)>(dlsym(lib, #name));                   \
  if (!n.name) {                                                                    \
    *why = "libnccl.so.2 has no symbol " #name " (NCCL 2.14 or newer is needed)";   \
    dlclose(lib);                                                                   \
    return nullptr;                                                                 \
  }
  LLMQ_NCCL_FUNCTIONS(LLMQ_NCCL_LOAD)
#undef LLMQ_NCCL_LOAD
  n.ncclGetLastError = reinterpret_cast<decltype(n.ncclGetLastError)>(dlsym(lib, "ncclGetLastError"));
  nccl = n;
  loaded = true;
  return &nccl;
}

const Nccl& nccl() {
  std::string why;
  const Nccl* n = load_nccl(&why);
  if (!n) fail(LLMQ_ERR_BACKEND_UNAVAILABLE, "NCCL: {}", why);
  return *n;
}

std::string describe(ncclResult_t r, ncclComm_t comm) {
  const Nccl& n = nccl();
  std::string text = n.ncclGetErrorString(r);
  const char* last = n.ncclGetLastError ? n.ncclGetLastError(comm) : nullptr;
  if (last && *last) text += fmt::format(" ({})", last);
  return text;
}

void check_cuda(cudaError_t e, const char* call) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // not sticky errors would be reported again by the next launch's check
  fail(e == cudaErrorInvalidDevice || e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver
             ? LLMQ_ERR_BACKEND_UNAVAILABLE
             : LLMQ_ERR_DEVICE,
         "NCCL: {}: {} ({})", call, cudaGetErrorString(e), cudaGetErrorName(e));
}

// Waits while a non-blocking communicator is still busy with a call (or its creation), at most
// until `deadline`; returns its state.
ncclResult_t wait_ready(ncclComm_t comm, Clock::time_point deadline, bool* timed_out) {
  ncclResult_t state = ncclInProgress;
  *timed_out = false;
  for (;;) {
    const ncclResult_t r = nccl().ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return r;
    if (state != ncclInProgress) return state;
    if (Clock::now() > deadline) {
      *timed_out = true;
      return state;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int rank, int size, int device, int timeout_ms)
      : comm_(comm), rank_(rank), size_(size), device_(device), timeout_(timeout_ms) {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    check_cuda(cudaMalloc(&barrier_value_, sizeof(float)), "cudaMalloc (barrier)");
    check_cuda(cudaStreamCreateWithFlags(&barrier_stream_, cudaStreamNonBlocking), "cudaStreamCreate (barrier)");
  }
  ~NcclCommunicator() override {
    cudaSetDevice(device_);
    if (barrier_stream_) cudaStreamDestroy(barrier_stream_);
    if (barrier_value_) cudaFree(barrier_value_);
    if (!aborted_) nccl().ncclCommDestroy(comm_);  // an aborted communicator is already freed
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const { return device_; }

  void all_reduce_sum(float* data, size_t count, void* stream) override {
    call("ncclAllReduce(sum)", [&] { return nccl().ncclAllReduce(data, data, count, ncclFloat32, ncclSum, comm_, cuda(stream)); });
  }
  void all_reduce_max(float* data, size_t count, void* stream) override {
    call("ncclAllReduce(max)", [&] { return nccl().ncclAllReduce(data, data, count, ncclFloat32, ncclMax, comm_, cuda(stream)); });
  }
  void all_gather(const float* send, size_t count, float* recv, void* stream) override {
    call("ncclAllGather", [&] { return nccl().ncclAllGather(send, recv, count, ncclFloat32, comm_, cuda(stream)); });
  }
  void broadcast(float* data, size_t count, int root, void* stream) override {
    call("ncclBroadcast", [&] { return nccl().ncclBroadcast(data, data, count, ncclFloat32, root, comm_, cuda(stream)); });
  }

  // A one-value all-reduce on a stream of its own, waited for at most the timeout: a rank that
  // never comes is an error naming this rank's wait, and the communicator is aborted.
  void barrier() override {
    call("ncclAllReduce(barrier)", [&] {
      return nccl().ncclAllReduce(barrier_value_, barrier_value_, 1, ncclFloat32, ncclSum, comm_, barrier_stream_);
    });
    const auto deadline = Clock::now() + timeout_;
    for (;;) {
      const cudaError_t e = cudaStreamQuery(barrier_stream_);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) check_cuda(e, "barrier (cudaStreamQuery)");
      if (Clock::now() > deadline) {
        const std::string why = fmt::format(
            "NCCL: rank {} of {} (device {}) waited {} ms at a barrier; at least one other rank never arrived", rank_, size_,
            device_, timeout_.count());
        abort(LLMQ_ERR_TIMEOUT, why);
        fail(LLMQ_ERR_TIMEOUT, "{}", why);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  void abort(llmq_status status, const std::string& why) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (aborted_) return;
    aborted_ = true;
    abort_status_ = status;
    abort_why_ = why;
    nccl().ncclCommAbort(comm_);  // pending operations end; the communicator is freed
  }

 private:
  static cudaStream_t cuda(void* stream) { return static_cast<cudaStream_t>(stream); }

  template <typename Fn>
  void call(const char* what, Fn&& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (aborted_) throw Error(abort_status_, abort_why_);
    }
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    ncclResult_t r = fn();
    if (r == ncclInProgress) {  // a non-blocking communicator is still enqueueing the call
      bool timed_out = false;
      r = wait_ready(comm_, Clock::now() + timeout_, &timed_out);
      if (timed_out) fail(LLMQ_ERR_TIMEOUT, "NCCL: {} on rank {} was not enqueued within {} ms", what, rank_, timeout_.count());
    }
    if (r != ncclSuccess)
      fail(LLMQ_ERR_DEVICE, "NCCL: {} on rank {} of {} (device {}): {}", what, rank_, size_, device_, describe(r, comm_));
  }

  ncclComm_t comm_;
  int rank_, size_, device_;
  std::chrono::milliseconds timeout_;
  float* barrier_value_ = nullptr;
  cudaStream_t barrier_stream_ = nullptr;
  std::mutex mutex_;
  bool aborted_ = false;
  llmq_status abort_status_ = LLMQ_OK;
  std::string abort_why_;
};

}  // namespace

bool nccl_available(std::string* why) { return load_nccl(why) != nullptr; }

std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<int>& devices, int timeout_ms) {
  const Nccl& n = nccl();
  std::vector<ncclComm_t> comms(devices.size(), nullptr);
  // All ranks are threads of this process, so there is no peer that may fail to come.
  const ncclResult_t r = n.ncclCommInitAll(comms.data(), int(devices.size()), devices.data());
  if (r != ncclSuccess)
    fail(LLMQ_ERR_DEVICE, "NCCL: ncclCommInitAll over devices {}: {}", fmt::join(devices, ","), describe(r, nullptr));
  std::vector<std::unique_ptr<Communicator>> out;
  try {
    for (size_t i = 0; i < comms.size(); ++i) {
      out.push_back(std::make_unique<NcclCommunicator>(comms[i], int(i), int(comms.size()), devices[i], timeout_ms));
      comms[i] = nullptr;
    }
  } catch (...) {
    for (ncclComm_t c : comms)
      if (c) n.ncclCommDestroy(c);
    throw;
  }
  return out;
}

NcclId nccl_unique_id() {
  ncclUniqueId id;
  static_assert(sizeof(id) == sizeof(NcclId), "NcclId holds an ncclUniqueId");
  const ncclResult_t r = nccl().ncclGetUniqueId(&id);
  if (r != ncclSuccess) fail(LLMQ_ERR_DEVICE, "NCCL: ncclGetUniqueId: {}", describe(r, nullptr));
  NcclId out;
  std::memcpy(out.data(), &id, sizeof id);
  return out;
}

std::unique_ptr<Communicator> make_nccl_communicator(const NcclId& id, int size, int rank, int device, int timeout_ms) {
  const Nccl& n = nccl();  // first, so that a missing NCCL is reported as such
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  ncclUniqueId uid;
  std::memcpy(&uid, id.data(), sizeof uid);
  // Non-blocking, so that creation can be abandoned when the other ranks do not all come.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = n.ncclCommInitRankConfig(&comm, size, uid, rank, &config);
  if (r == ncclInProgress || (r == ncclSuccess && comm)) {
    bool timed_out = false;
    r = wait_ready(comm, Clock::now() + std::chrono::milliseconds(timeout_ms), &timed_out);
    if (timed_out) {
      n.ncclCommAbort(comm);
      fail(LLMQ_ERR_TIMEOUT,
           "NCCL: rank {} of {} (device {}) waited {} ms for the other ranks to join (ncclCommInitRank); every rank "
           "must call llmq_comm_init_rank with the same id and n_ranks", rank, size, device, timeout_ms);
    }
  }
  if (r != ncclSuccess) {
    if (comm) n.ncclCommAbort(comm);
    fail(LLMQ_ERR_DEVICE, "NCCL: ncclCommInitRank as rank {} of {} on device {}: {}", rank, size, device,
         describe(r, nullptr));
  }
  try {
    return std::make_unique<NcclCommunicator>(comm, rank, size, device, timeout_ms);
  } catch (...) {
    n.ncclCommDestroy(comm);
    throw;
  }
}

int communicator_device(const Communicator& comm) {
  const auto* n = dynamic_cast<const NcclCommunicator*>(&comm);
  return n ? n->device() : -1;
}

}  // namespace llmq
