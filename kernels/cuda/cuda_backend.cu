// The CUDA backend: the ops of engine/backend.h on one GPU, on one stream. Activations are fp32
// on the device as in the CPU backend; GEMMs go through cuBLASLt (fp32, 16-bit and FP8 inputs,
// fp32 accumulation and output), the quantized GEMV for a few rows, or the INT8 weight-only
// tensor-core GEMM (w8a16_gemm.cu) for more; the other ops are the kernels of cuda_kernels.cu.
// cuBLASLt is opened with dlopen when a backend is created, so that libllmq.so loads on machines
// without the CUDA libraries.
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "engine/backend.h"
#include "engine/device.h"
#include "engine/error.h"
#include "kernels/cuda/cuda_kernels.h"

namespace llmq {

namespace {

llmq_status status_of(cudaError_t e) {
  switch (e) {
    case cudaErrorMemoryAllocation:
      return LLMQ_ERR_OUT_OF_MEMORY;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
      return LLMQ_ERR_BACKEND_UNAVAILABLE;
    default:
      return LLMQ_ERR_DEVICE;
  }
}

// Clears the error as well: a non-sticky error (a failed allocation or launch) left set would be
// reported again by the next launch's cudaGetLastError.
void check(cudaError_t e, const char* call) {
  if (e == cudaSuccess) return;
  cudaGetLastError();
  fail(status_of(e), "cuda backend: {}: {} ({})", call, cudaGetErrorString(e), cudaGetErrorName(e));
}

// ---- cuBLASLt, opened at run time ---------------------------------------------------------

struct CublasLt {
#define LLMQ_LT_FUNCTIONS(X)                                                                                 \
  X(cublasLtCreate) X(cublasLtDestroy) X(cublasLtGetStatusString) X(cublasLtMatmulDescCreate)               \
  X(cublasLtMatmulDescDestroy) X(cublasLtMatmulDescSetAttribute) X(cublasLtMatrixLayoutCreate)               \
  X(cublasLtMatrixLayoutDestroy) X(cublasLtMatmulPreferenceCreate) X(cublasLtMatmulPreferenceDestroy)        \
  X(cublasLtMatmulPreferenceSetAttribute) X(cublasLtMatmulAlgoGetHeuristic) X(cublasLtMatmul)
#define LLMQ_LT_MEMBER(name) decltype(&::name) name = nullptr;
  LLMQ_LT_FUNCTIONS(LLMQ_LT_MEMBER)
#undef LLMQ_LT_MEMBER
};

const CublasLt& cublas_lt() {
  static std::once_flag once;
  static CublasLt lt;
  static std::string error;
  std::call_once(once, [] {
    void* lib = nullptr;
    for (const char* name : {"libcublasLt.so.13", "/usr/local/cuda/lib64/libcublasLt.so.13", "libcublasLt.so"})
      if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
    if (!lib) {
      error = fmt::format("cannot open libcublasLt.so.13 (the CUDA 13 cuBLAS library): {}", dlerror());
      return;
    }
#define LLMQ_LT_LOAD(name)                                                          \
  lt.name = reinterpret_cast<decltype(lt.name)>(dlsym(lib, #name));                 \
  if (!lt.name && error.empty()) error = "libcublasLt.so has no symbol " #name;
    LLMQ_LT_FUNCTIONS(LLMQ_LT_LOAD)
#undef LLMQ_LT_LOAD
  });
  if (!error.empty()) fail(LLMQ_ERR_BACKEND_UNAVAILABLE, "cuda backend: {}", error);
  return lt;
}

void check(cublasStatus_t s, const char* call) {
  if (s != CUBLAS_STATUS_SUCCESS)
    fail(s == CUBLAS_STATUS_ALLOC_FAILED ? LLMQ_ERR_OUT_OF_MEMORY : LLMQ_ERR_DEVICE, "cuda backend: {}: {}", call,
         cublas_lt().cublasLtGetStatusString(s));
}

cudaDataType cuda_type(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return CUDA_R_32F;
    case DType::BF16:
      return CUDA_R_16BF;
    case DType::F16:
      return CUDA_R_16F;
    case DType::F8_E4M3:
      return CUDA_R_8F_E4M3;
    default:
      fail(LLMQ_ERR_INTERNAL, "cuda backend: no cuBLASLt type for {}", dtype_name(dtype));
  }
}

class DeviceBuffer final : public Buffer {
 public:
  explicit DeviceBuffer(uint64_t bytes) : size_(bytes) {
    cudaError_t e = cudaMalloc(&data_, std::max<uint64_t>(bytes, 256));
    if (e != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it, or the next kernel launch's check reports it
      fail(status_of(e), "cuda backend: cudaMalloc({} bytes): {} ({})", bytes, cudaGetErrorString(e), cudaGetErrorName(e));
    }
  }
  ~DeviceBuffer() override { cudaFree(data_); }
  void* data() override { return data_; }
  uint64_t size() const override { return size_; }

 private:
  void* data_ = nullptr;
  uint64_t size_;
};

// LLMQ_PROFILE=1: GPU time per op (CUDA events around each), and the host's time to enqueue a step
// against the step's wall time, by kind of step (prefill, decode of N rows), printed to stderr
// when the backend is destroyed. Steps that timed linear paths or GEMM plans (a shape's first use)
// are left out, so that the rows are the steady state's.
class Profiler {
 public:
  Profiler() {
    const char* env = std::getenv("LLMQ_PROFILE");
    enabled_ = env && *env && std::string(env) != "0";
  }
  ~Profiler() {
    for (cudaEvent_t e : pool_) cudaEventDestroy(e);
    for (auto& p : pending_) {
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.stop);
    }
  }
  bool enabled() const { return enabled_; }

  // Times the ops enqueued between its construction and destruction.
  class Scope {
   public:
    Scope(Profiler& p, std::string name, cudaStream_t stream) : p_(p), stream_(stream) {
      if (!p_.enabled_) return;
      name_ = std::move(name);
      start_ = p_.event();
      cudaEventRecord(start_, stream_);
    }
    ~Scope() {
      if (!p_.enabled_) return;
      cudaEvent_t stop = p_.event();
      cudaEventRecord(stop, stream_);
      p_.pending_.push_back(Pending{std::move(name_), start_, stop});
    }

   private:
    Profiler& p_;
    cudaStream_t stream_;
    std::string name_;
    cudaEvent_t start_ = nullptr;
  };

  void step_begin(std::string kind) {
    kind_ = std::move(kind);
    tuned_ = false;
    step_start_ = std::chrono::steady_clock::now();
  }
  void step_enqueued() { enqueued_ = std::chrono::steady_clock::now(); }
  void tuning() { tuned_ = true; }  // this step times paths or plans: not the steady state
  // After the stream is synchronized: collect the step's timings.
  void step_done() {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (tuned_) ++tuned_steps_;
    auto record = [&](const std::string& name, double ms) {
      if (tuned_) return;
      Total& t = totals_[kind_][name];
      t.ms += ms;
      ++t.calls;
    };
    record("(host) enqueue a step", std::chrono::duration<double, std::milli>(enqueued_ - step_start_).count());
    record("(host) step wall time", std::chrono::duration<double, std::milli>(now - step_start_).count());
    for (auto& p : pending_) {
      float ms = 0;
      cudaEventElapsedTime(&ms, p.start, p.stop);
      record(p.name, ms);
      pool_.push_back(p.start);
      pool_.push_back(p.stop);
    }
    pending_.clear();
  }
  void print(const std::string& device) const {
    if (!enabled_ || totals_.empty()) return;
    std::fprintf(stderr,
                 "llmq profile (%s): op, calls, total ms, us per call, by kind of step (%lld steps that timed "
                 "paths or plans left out)\n",
                 device.c_str(), (long long)tuned_steps_);
    for (auto& [kind, totals] : totals_) {
      std::vector<std::pair<std::string, Total>> rows(totals.begin(), totals.end());
      std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.ms > b.second.ms; });
      std::fprintf(stderr, "  %s:\n", kind.c_str());
      for (auto& [name, t] : rows)
        std::fprintf(stderr, "    %-44s %8lld %10.2f %10.1f\n", name.c_str(), (long long)t.calls, t.ms,
                     1e3 * t.ms / double(t.calls));
    }
  }

 private:
  struct Pending {
    std::string name;
    cudaEvent_t start, stop;
  };
  struct Total {
    double ms = 0;
    int64_t calls = 0;
  };
  cudaEvent_t event() {
    if (!pool_.empty()) {
      cudaEvent_t e = pool_.back();
      pool_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    cudaEventCreate(&e);
    return e;
  }
  bool enabled_ = false;
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> pool_;
  std::map<std::string, std::map<std::string, Total>> totals_;  // kind of step -> op -> total
  std::string kind_;
  bool tuned_ = false;
  int64_t tuned_steps_ = 0;
  std::chrono::steady_clock::time_point step_start_, enqueued_;
};

// The ways a linear can run. Gemv: kernels.cuh's GEMV, kGemvMaxM rows per launch (taken up to
// kGemvMaxRows rows). Gemm: cuBLASLt (INT8 weights dequantized to 16 bits first), then the scale
// and bias epilogue. GemmSlices (INT8 weights): the same a slice of kDequantSliceRows channels at a
// time, each dequantized into one small scratch and multiplied at once, so that cuBLASLt may find
// the slice's 16-bit weights in L2 (8 MiB at K = 4096) rather than read back from memory what the
// dequantization wrote there (a prefill's dequantization was about 7.5 ms of 72 on an H200).
// W8A16: the INT8 tiled tensor-core kernel of w8a16_kernel.cuh; Stream: its decode kernel (up to
// 64 rows), which streams INT8 or FP8 weights into tensor-core fragments; StreamSplit: the same
// kernel in blocks of 16 rows (17-64 rows: more blocks, fewer registers, the weights read again
// from L2); StreamWide: in blocks of 16 rows and 128 channels (17-64 rows: the
// activations read from L2 once for 128 channels); Wgmma: the Hopper kernels (compute capability
// 9.0) for INT8 weights (warpgroup MMAs with the weights from registers) and FP8 weights (both
// operands from shared memory); WgmmaCopiers: the INT8 one with a warpgroup that only copies.
enum class LinearPath { Gemv, Gemm, GemmSlices, W8A16, Stream, StreamSplit, StreamWide, Wgmma, WgmmaCopiers };
constexpr int64_t kDequantSliceRows = 1024;  // a slice's channels: enough CTAs for cuBLASLt at prefill
// The INT8 wgmma kernel is in the timed choice above the stream kernel's rows; its copier form and
// the FP8 one run only when LLMQ_LINEAR_PATH=wgmma / wgmma-copiers (the gpu tests, gpu-check.sh's
// forced pass) or =all (timed against the others, at every row count). On an H200 (session 8) the
// INT8 one (weights as A from registers) was right and took 169 / 378 / 465 us at 2048 tokens of the
// Llama-2-7B layers against 132 / 285 / 322 for dequantize + cuBLASLt; but ptxas serialized its
// MMAs then (C7518, found in session 9: tests/check_ptxas.cmake now guards it). Its form since (no
// per-step proxy fence, no serialization) is not yet checked on a GPU: the timed choice takes it
// only where it is the fastest and its output agrees with cuBLASLt's (timed_choice). The copier
// form is still serialized (C7513); the FP8 kernel took 105 against cuBLASLt's 56 ms a prefill
// (session 7).
constexpr bool kInt8WgmmaInTimedChoice = true, kFp8WgmmaInTimedChoice = false;
constexpr int64_t kGemvMaxRows = 2 * cuda::kGemvMaxM;

const char* linear_path_name(LinearPath path) {
  switch (path) {
    case LinearPath::Gemv:
      return "gemv";
    case LinearPath::Gemm:
      return "gemm";
    case LinearPath::GemmSlices:
      return "gemm-slices";
    case LinearPath::W8A16:
      return "w8a16";
    case LinearPath::Stream:
      return "stream";
    case LinearPath::StreamSplit:
      return "stream16";
    case LinearPath::StreamWide:
      return "stream-wide";
    case LinearPath::Wgmma:
      return "wgmma";
    default:
      return "wgmma-copiers";
  }
}
std::optional<LinearPath> linear_path_named(const std::string& name) {
  for (LinearPath path : {LinearPath::Gemv, LinearPath::Gemm, LinearPath::GemmSlices, LinearPath::W8A16, LinearPath::Stream,
                          LinearPath::StreamSplit, LinearPath::StreamWide, LinearPath::Wgmma, LinearPath::WgmmaCopiers})
    if (name == linear_path_name(path)) return path;
  return std::nullopt;
}

// Rows of a GEMM, in the buckets the profile reports.
std::string rows_bucket(int64_t M) {
  return M == 1 ? "M=1" : M <= 8 ? "M<=8" : M <= 64 ? "M<=64" : M <= 512 ? "M<=512" : "M>512";
}

// One cuBLASLt problem shape: descriptors and the heuristic's algorithm, made once.
struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool has_algo = false;
  int candidates = 0, chosen = 0;  // the heuristic's candidates, and which one was fastest
  float first_ms = 0, best_ms = 0;  // one run of the heuristic's first choice and of the fastest
};

constexpr uint64_t kWorkspaceBytes = uint64_t(32) << 20;

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& options) : device_(options.device) {
    int count = 0;
    check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (device_ < 0 || device_ >= count)
      fail(LLMQ_ERR_BACKEND_UNAVAILABLE, "cuda backend: device {} does not exist ({} visible)", device_, count);
    check(cudaSetDevice(device_), "cudaSetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
    sm_ = prop.major * 10 + prop.minor;
    num_sms_ = prop.multiProcessorCount;
    if (sm_ < 80)
      fail(LLMQ_ERR_UNSUPPORTED, "cuda backend: {} has compute capability {}.{}; llmq needs 8.0 or newer", prop.name,
           prop.major, prop.minor);
    name_ = std::string("cuda:") + prop.name;
    const char* graphs = std::getenv("LLMQ_CUDA_GRAPHS");
    graphs_enabled_ = !(graphs && std::string(graphs) == "0");
    // LLMQ_LINEAR_PATH=gemv|gemm|gemm-slices|w8a16|stream|stream16|stream-wide|wgmma|wgmma-copiers: that path wherever it
    // applies, instead of the fastest (tests and profiling); =all: the fastest of every path, the
    // wgmma kernels included (profiling them against the others).
    if (const char* path = std::getenv("LLMQ_LINEAR_PATH"); path && *path) {
      wgmma_timed_ = std::string(path) == "all";
      forced_path_ = linear_path_named(path);
      if (!forced_path_ && !wgmma_timed_)
        fail(LLMQ_ERR_INVALID_ARGUMENT,
             "cuda backend: LLMQ_LINEAR_PATH={} is not one of gemv, gemm, gemm-slices, w8a16, stream, stream16, stream-wide, wgmma, "
             "wgmma-copiers, all",
             path);
    }

    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check(cublas_lt().cublasLtCreate(&lt_handle_), "cublasLtCreate");
    workspace_ = std::make_unique<DeviceBuffer>(kWorkspaceBytes);
    counters_ = std::make_unique<DeviceBuffer>(uint64_t(kMaxCountedLayers) * kSaturationCounters * sizeof(uint64_t));
    check(cudaMemset(counters_->data(), 0, counters_->size()), "cudaMemset (saturation counters)");
  }

  ~CudaBackend() override {
    cudaSetDevice(device_);  // the thread destroying it may have another device current
    abandon_capture();
    cudaStreamSynchronize(stream_);
    drop_recordings();
    profiler_.print(name_);
    const CublasLt& lt = cublas_lt();
    if (profiler_.enabled()) {
      std::fprintf(stderr, "llmq GEMM plans: (w, x, out) dtypes, M, N, K: candidates, chosen, us per run (first choice -> chosen)\n");
      for (auto& [key, plan] : plans_)
        std::fprintf(stderr, "  %s %s %s M=%lld N=%lld K=%lld%s%s: %d, #%d, %.1f -> %.1f\n", dtype_name(DType(std::get<0>(key))),
                     dtype_name(DType(std::get<1>(key))), dtype_name(DType(std::get<2>(key))), (long long)std::get<3>(key),
                     (long long)std::get<4>(key), (long long)std::get<5>(key),
                     std::get<6>(key) != std::get<4>(key) ? fmt::format(" (rows of {})", std::get<6>(key)).c_str() : "",
                     std::get<7>(key) ? " scaled" : "",
                     plan.candidates, plan.chosen, 1e3 * plan.first_ms, 1e3 * plan.best_ms);
      std::fprintf(stderr, "llmq linear paths: (w, x) dtypes, rows (above 8: a bucket), N, K: us per path (wrong: "
                           "disagreed with the reference) -> chosen\n");
      for (auto& [key, choice] : path_choices_) {
        std::string times;
        for (auto& [path, ms] : choice.timed)
          times += fmt::format("{}{} {:.1f}", times.empty() ? "" : ", ", linear_path_name(path), 1e3 * ms);
        for (LinearPath path : choice.rejected)
          times += fmt::format("{}{} wrong", times.empty() ? "" : ", ", linear_path_name(path));
        std::fprintf(stderr, "  %s x %s M%s%lld N=%lld K=%lld: %s -> %s\n", dtype_name(DType(std::get<0>(key))),
                     dtype_name(DType(std::get<1>(key))), std::get<2>(key) > cuda::kGemvMaxM ? "<=" : "=",
                     (long long)std::get<2>(key), (long long)std::get<3>(key), (long long)std::get<4>(key),
                     times.c_str(), linear_path_name(choice.best));
      }
    }
    for (auto& [key, plan] : plans_) {
      lt.cublasLtMatrixLayoutDestroy(plan.a);
      lt.cublasLtMatrixLayoutDestroy(plan.b);
      lt.cublasLtMatrixLayoutDestroy(plan.d);
      lt.cublasLtMatmulDescDestroy(plan.desc);
    }
    lt.cublasLtDestroy(lt_handle_);
    cudaStreamDestroy(stream_);
  }

  const char* name() const override { return name_.c_str(); }

  bool supports_fp8(std::string* why) const override {
    if (sm_ >= 89) return true;
    *why = fmt::format("FP8 needs FP8 tensor cores (compute capability 8.9 or newer); this GPU has {}.{}", sm_ / 10,
                       sm_ % 10);
    return false;
  }

  double measure_peak_bandwidth() override {
    // A device-to-device copy reads and writes each byte once: 2 x 512 MiB per copy, best of 5.
    // A GPU filled by its KV cache may not have that much free: smaller buffers then, else 0.
    for (uint64_t bytes : {uint64_t(512) << 20, uint64_t(128) << 20, uint64_t(32) << 20}) {
      std::unique_ptr<DeviceBuffer> src, dst;
      try {
        src = std::make_unique<DeviceBuffer>(bytes);
        dst = std::make_unique<DeviceBuffer>(bytes);
      } catch (const Error& e) {
        if (e.status() != LLMQ_ERR_OUT_OF_MEMORY) throw;
        continue;
      }
      cudaEvent_t start, stop;
      check(cudaEventCreate(&start), "cudaEventCreate");
      check(cudaEventCreate(&stop), "cudaEventCreate");
      float best_ms = 0;
      for (int pass = 0; pass < 6; ++pass) {
        check(cudaEventRecord(start, stream_), "cudaEventRecord");
        check(cudaMemcpyAsync(dst->data(), src->data(), bytes, cudaMemcpyDeviceToDevice, stream_),
              "cudaMemcpyAsync (bandwidth)");
        check(cudaEventRecord(stop, stream_), "cudaEventRecord");
        check(cudaEventSynchronize(stop), "cudaEventSynchronize");
        float ms = 0;
        check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
        if (pass > 0 && (best_ms == 0 || ms < best_ms)) best_ms = ms;  // pass 0 warms up
      }
      cudaEventDestroy(start);
      cudaEventDestroy(stop);
      return 2.0 * double(bytes) / (double(best_ms) * 1e-3);
    }
    return 0;
  }

  std::unique_ptr<Buffer> allocate(uint64_t bytes) override { return std::make_unique<DeviceBuffer>(bytes); }

  Tensor upload(const Tensor& host) override {
    if (host.empty()) return host;
    uploads_.push_back(std::make_unique<DeviceBuffer>(host.nbytes()));
    check(cudaMemcpy(uploads_.back()->data(), host.data, host.nbytes(), cudaMemcpyHostToDevice), "upload (cudaMemcpy)");
    return Tensor{uploads_.back()->data(), host.dtype, host.rows, host.cols};
  }

  void begin_step(const BatchPlan& plan) override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    abandon_capture();  // a step that failed while being recorded
    const int32_t n_seqs = int32_t(plan.block_offsets.size()) - 1;
    if (profiler_.enabled())
      profiler_.step_begin(plan.n_tokens() == n_seqs
                               ? fmt::format("decode, {} rows", n_seqs)
                               : fmt::format("prefill, {} tokens of {} sequences", plan.n_tokens(), n_seqs));
    cuda::make_query_tiles(plan.token_seq.data(), plan.positions.data(), plan.n_tokens(), &tiles_);
    max_keys_ = 0;
    for (int32_t position : plan.positions) max_keys_ = std::max(max_keys_, position + 1);
    // All of the step's metadata goes over in one copy. The block table, whose length changes from
    // step to step, goes last, so that the other arrays keep their addresses for a given batch shape.
    staging_.clear();
    std::vector<size_t> offsets;
    const std::vector<int32_t>* arrays[] = {&plan.tokens,        &plan.positions,       &plan.token_seq,
                                            &plan.slots,         &plan.block_offsets,   &plan.logit_rows,
                                            &tiles_.small_first, &tiles_.small_count,   &tiles_.large_first,
                                            &tiles_.large_count, &plan.block_ids};
    for (const std::vector<int32_t>* v : arrays) {
      offsets.push_back(staging_.size());
      staging_.insert(staging_.end(), v->begin(), v->end());
      staging_.resize((staging_.size() + 3) / 4 * 4);  // 16-byte aligned arrays
    }
    ensure(plan_buffer_, staging_.size() * sizeof(int32_t));
    check(cudaMemcpyAsync(plan_buffer_->data(), staging_.data(), staging_.size() * sizeof(int32_t),
                          cudaMemcpyHostToDevice, stream_),
          "begin_step (cudaMemcpyAsync)");
    const int32_t* base = static_cast<const int32_t*>(plan_buffer_->data());
    device_plan_.tokens = base + offsets[0];
    device_plan_.positions = base + offsets[1];
    device_plan_.token_seq = base + offsets[2];
    device_plan_.slots = base + offsets[3];
    device_plan_.block_offsets = base + offsets[4];
    device_plan_.logit_rows = base + offsets[5];
    device_plan_.small = cuda::Tiles{base + offsets[6], base + offsets[7], int32_t(tiles_.small_first.size())};
    device_plan_.large = cuda::Tiles{base + offsets[8], base + offsets[9], int32_t(tiles_.large_first.size())};
    device_plan_.block_ids = base + offsets[10];

    // Decode steps (one token per sequence) are recorded as CUDA graphs, keyed by what fixes their
    // kernels' launch shapes and the metadata's addresses.
    step_key_.reset();
    if (graphs_enabled_ && !profiler_.enabled() && plan.n_tokens() == n_seqs && n_seqs <= 1024)
      step_key_ = std::make_tuple(plan.n_tokens(), int32_t(plan.logit_rows.size()), max_keys_ > 64);
  }

  bool replay_step() override {
    if (!step_key_) return false;
    auto it = graphs_.find(*step_key_);
    if (it != graphs_.end()) {
      if (!it->second) return false;  // this shape could not be recorded
      check(cudaGraphLaunch(it->second, stream_), "cudaGraphLaunch");
      return true;
    }
    // Record the second step of a shape: the first has made the GEMM plans and sized the scratch.
    if (seen_.insert(*step_key_).second) return false;
    if (graphs_.size() >= 256) drop_recordings();
    check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    capturing_ = true;
    return false;
  }

  void end_step() override {
    if (!capturing_) return;
    capturing_ = false;
    cudaGraph_t graph = nullptr;
    check(cudaStreamEndCapture(stream_, &graph), "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check(e, "cudaGraphInstantiate");
    graphs_[*step_key_] = exec;
    // Recording does not run anything: run it now.
    check(cudaGraphLaunch(exec, stream_), "cudaGraphLaunch");
  }

  void drop_recordings() override {
    for (auto& [key, exec] : graphs_)
      if (exec) cudaGraphExecDestroy(exec);
    graphs_.clear();
    seen_.clear();
  }

  void embed(const Tensor& table, int64_t first_id, Tensor& out) override {
    Profiler::Scope timer(profiler_, "embed", stream_);
    cuda::embed(table.data, table.dtype, first_id, table.rows, out.cols, device_plan_, out.rows, out.as<float>(), stream_);
    check(cudaGetLastError(), "embed kernel");
  }

  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    norm(nullptr, x, weight, eps, out, DType::F32, false);
  }

  void add_rmsnorm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    norm(&residual, x, weight, eps, out, DType::F32, false);
  }

  // When the linears all read one 16-bit copy of out, or all FP8 codes of it with dynamic scales,
  // the norm's kernel writes those: the linears take them as they would have made them, without a
  // pass of their own. Otherwise (mixed inputs, F32 weights, static FP8 scales) the default.
  void rmsnorm_linears(Tensor* residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                       std::initializer_list<LinearJob> jobs) override {
    norm_linears(residual, x, weight, eps, out, jobs, nullptr);
  }

  // The norm and the linears of a block, then the kernel that reads their outputs, which takes the
  // epilogues that cuBLASLt's paths leave (see norm_linears). Otherwise the defaults.
  void attention_inputs(Tensor* residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                        const LinearJob& q, const LinearJob& k, const LinearJob& v, const Tensor& inv_freq,
                        const KvLayer& cache) override {
    cuda::LinearScales left[3];
    norm_linears(residual, x, weight, eps, out, {q, k, v}, left);
    rope(*q.out, *k.out, *v.out, inv_freq, cache, cuda::QkvScales{left[0], left[1], left[2]});
  }

  void mlp(Tensor* residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out, const LinearJob& gate,
           const LinearJob& up, const LinearWeight& down, Tensor& down_out) override {
    if (down.w.dtype != DType::F8_E4M3 && linear_input_dtype(down) == DType::F32)  // silu_mul applies none
      return Backend::mlp(residual, x, weight, eps, out, gate, up, down, down_out);
    cuda::LinearScales left[2];
    norm_linears(residual, x, weight, eps, out, {gate, up}, left);
    silu_mul_into_linear(*gate.out, *up.out, *gate.out, down, nullptr, down_out, left[0], left[1]);
  }

  // rmsnorm_linears. With `left` (one a job), a linear whose path would take a pass over its output
  // for its scales and bias (cuBLASLt's) leaves them in left[job] instead, for the caller's next
  // kernel to apply; the others leave none. Only where every job reads one 16-bit copy or one set
  // of FP8 codes (the norm's): then no linear of them rewrites the row scales that a left FP8
  // epilogue reads.
  void norm_linears(Tensor* residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                    std::initializer_list<LinearJob> jobs, cuda::LinearScales* left) {
    DType rounded = jobs.size() ? linear_input_dtype(*jobs.begin()->weight) : DType::F32;
    bool fp8 = jobs.size() > 0;
    for (const LinearJob& job : jobs) {
      if (linear_input_dtype(*job.weight) != rounded) rounded = DType::F32;
      fp8 = fp8 && fp8_dynamic(*job.weight);
    }
    if (rounded == DType::F32 && !fp8) return Backend::rmsnorm_linears(residual, x, weight, eps, out, jobs);
    norm(residual, x, weight, eps, out, rounded, fp8);
    SharedInput sharing(*this, rounded == DType::F32 ? nullptr : out.data, rounded, fp8 ? out.data : nullptr);
    if (stream_together(out, jobs)) return;  // the stream kernel applies the epilogues: none left
    for (const LinearJob& job : jobs) {
      Deferring deferring(*this, left ? left++ : nullptr);
      linear(out, *job.weight, job.bias, *job.out);
    }
  }

  // Up to 16 rows, linears of one input (inside norm_linears' SharedInput) whose timed choice is the
  // stream kernel run as one launch of it (cuda::stream_linears), with the bits of one launch each.
  // False, having run nothing, unless every job is such a linear with its choice made (the first
  // step of a shape times them one at a time).
  bool stream_together(const Tensor& x, std::initializer_list<LinearJob> jobs) {
    const int64_t M = x.rows, K = x.cols;
    // (Up to 16 rows every stream layout is the one launch takes.)
    if (M > kGemvMaxRows || jobs.size() < 2 || jobs.size() > size_t(cuda::kMaxStreamJobs)) return false;
    const DType w_dtype = jobs.begin()->weight->w.dtype;
    const bool fp8 = w_dtype == DType::F8_E4M3;
    if (!fp8 && w_dtype != DType::I8) return false;
    // The input every job reads: the FP8 codes or the 16-bit copy that the norm wrote.
    const DType x_dtype = fp8 ? DType::F8_E4M3 : linear_input_dtype(*jobs.begin()->weight);
    const bool shared = shared_input_ && (fp8 ? fp8_codes_of_ == x.data
                                              : converted_of_ == x.data && converted_dtype_ == x_dtype);
    if (!shared) return false;
    const void* xs = fp8 ? codes_->data() : converted_->data();
    cuda::StreamJob group[cuda::kMaxStreamJobs];
    int count = 0;
    for (const LinearJob& job : jobs) {
      const LinearWeight& w = *job.weight;
      const int64_t N = w.w.rows;
      const bool same_input = fp8 ? fp8_dynamic(w) : linear_input_dtype(w) == x_dtype;
      if (w.w.dtype != w_dtype || !same_input || w.w.cols != K || chosen_path(w_dtype, x_dtype, M, N, K) != LinearPath::Stream ||
          !cuda::stream_supported(x_dtype, M, N, K, xs, w.w.data))
        return false;
      const cuda::LinearScales scales{fp8 ? static_cast<const float*>(row_scales_->data()) : nullptr,
                                      w.scale.as<float>(), w.scale.cols > 1, job.bias ? job.bias->data : nullptr,
                                      job.bias ? job.bias->dtype : DType::F32};
      group[count++] = cuda::StreamJob{w.w.data, N, scales, job.out->as<float>()};
    }
    Profiler::Scope timer(profiler_,
                          profiler_.enabled() ? fmt::format("linears {} {}, one stream launch", dtype_name(w_dtype), rows_bucket(M)) : "",
                          stream_);
    cuda::stream_linears(xs, x_dtype, M, K, group, count, cuda::StreamLayout::Whole, stream_);
    check(cudaGetLastError(), "stream_linear kernel");
    return true;
  }

  void linear(const Tensor& x, const LinearWeight& weight, const Tensor* bias, Tensor& out,
              const Tensor* row_amax = nullptr) override {
    const int64_t M = x.rows, K = x.cols, N = weight.w.rows;
    const DType w_dtype = weight.w.dtype;
    const void* bias_data = bias ? bias->data : nullptr;
    const DType bias_dtype = bias ? bias->dtype : DType::F32;
    const float* w_scale = weight.quantized() ? weight.scale.as<float>() : nullptr;
    const bool per_channel = weight.scale.cols > 1;
    float* y = out.as<float>();
    Profiler::Scope timer(profiler_, profiler_.enabled() ? fmt::format("linear {} {}", dtype_name(w_dtype), rows_bucket(M)) : "",
                          stream_);
    if (w_dtype == DType::F8_E4M3) {
      // With dynamic scales, linears of one input (inside a SharedInput) share its codes.
      const bool shareable = shared_input_ && fp8_dynamic(weight) && !row_amax;
      if (!shareable || fp8_codes_of_ != x.data) {
        fp8_scratch(M, K);
        cuda::quantize_fp8_rows(x.as<float>(), M, K, weight.input_scale.as<float>(),
                                row_amax ? row_amax->as<float>() : nullptr, static_cast<uint8_t*>(codes_->data()),
                                static_cast<float*>(row_scales_->data()), layer_counters(weight.layer), stream_);
        check(cudaGetLastError(), "quantize_fp8_rows kernel");
        fp8_codes_of_ = shareable ? x.data : nullptr;  // codes_ now holds these codes, shareable or not
      }
      fp8_linear(weight, bias, M, K, out);
      return;
    }
    if (w_dtype != DType::F32 && w_dtype != DType::BF16 && w_dtype != DType::F16 && w_dtype != DType::I8)
      fail(LLMQ_ERR_UNSUPPORTED, "cuda backend: linear weights of dtype {} are not supported", dtype_name(w_dtype));
    // The products' input: fp32 for F32 weights, else rounded to the 16-bit type (INT8 weights: the
    // checkpoint's activation type), the same for every path, so that the path changes only the
    // order of the fp32 sums.
    const DType x_dtype = linear_input_dtype(weight);
    const void* xs = activations(x, x_dtype);
    const void* w = weight.w.data;
    auto run = [&](LinearPath path) {
      switch (path) {
        case LinearPath::Gemv:
          gemv_rows(xs, x_dtype, w, w_dtype, M, N, K, nullptr, w_scale, per_channel, bias_data, bias_dtype, y);
          return;
        case LinearPath::W8A16: {
          Profiler::Scope part(profiler_, "  (in linear) W8A16 kernel", stream_);
          const cuda::SplitKPlan plan = cuda::w8a16_plan(M, N, K, num_sms_);
          auto [partial, counters] = split_scratch(plan);
          cuda::w8a16_gemm(xs, x_dtype, weight.w.as<int8_t>(), M, N, K, w_scale, per_channel, bias_data, bias_dtype,
                           y, plan, partial, counters, stream_);
          check(cudaGetLastError(), "w8a16_gemm kernel");
          return;
        }
        case LinearPath::Stream:
        case LinearPath::StreamSplit:
        case LinearPath::StreamWide:
          return stream_linear(xs, x_dtype, w, M, N, K, nullptr, w_scale, per_channel, bias_data, bias_dtype,
                               stream_layout(path), y);
        case LinearPath::Wgmma:
        case LinearPath::WgmmaCopiers:
          return wgmma_linear(xs, x_dtype, w, M, N, K, nullptr, w_scale, per_channel, bias_data, bias_dtype,
                              path == LinearPath::WgmmaCopiers, y);
        case LinearPath::Gemm:
        case LinearPath::GemmSlices:
          if (w_dtype == DType::I8) {  // dequantized exactly to the activation type first, whole or in slices
            const int64_t slice = path == LinearPath::GemmSlices ? kDequantSliceRows : N;
            ensure(dequantized_, uint64_t(std::min(N, slice)) * uint64_t(K) * 2);
            for (int64_t n0 = 0; n0 < N; n0 += slice) {
              const int64_t rows = std::min(slice, N - n0);
              cuda::dequantize_i8(weight.w.as<int8_t>() + n0 * K, rows * K, x_dtype, dequantized_->data(), stream_);
              check(cudaGetLastError(), "dequantize_i8 kernel");
              gemm(dequantized_->data(), x_dtype, xs, x_dtype, M, rows, K, y + n0, /*required=*/true, nullptr,
                   nullptr, /*y_stride=*/N);
            }
          } else {
            gemm(w, w_dtype, xs, x_dtype, M, N, K, y);
          }
          epilogue(y, M, N, nullptr, w_scale, per_channel, bias_data, bias_dtype);
          return;
      }
    };
    std::vector<LinearPath> paths;
    if (M <= kGemvMaxRows) paths.push_back(LinearPath::Gemv);
    if (w_dtype == DType::I8 && cuda::w8a16_supported(M, N, K, xs, w)) paths.push_back(LinearPath::W8A16);
    if (w_dtype == DType::I8) add_stream_paths(x_dtype, M, N, K, xs, w, paths);
    if (w_dtype == DType::I8 && wgmma_applies(x_dtype, M, N, K, xs, w)) {
      paths.push_back(LinearPath::Wgmma);
      if (wgmma_timed_ || forced_path_ == LinearPath::WgmmaCopiers) paths.push_back(LinearPath::WgmmaCopiers);
    }
    paths.push_back(LinearPath::Gemm);
    if (w_dtype == DType::I8 && M > kGemvMaxRows && N > kDequantSliceRows) paths.push_back(LinearPath::GemmSlices);
    run(choose_path(w_dtype, x_dtype, M, N, K, paths, run, y));
  }

  void linears(const Tensor& x, std::initializer_list<LinearJob> jobs) override {
    SharedInput sharing(*this);  // the first linear makes the copy (or codes) the others read
    Backend::linears(x, jobs);
  }

  // silu(gate) * up goes straight into the linear's input, with no fp32 product in memory: for
  // FP8 weights its codes and row scales, then the same GEMM / GEMV as linear; for 16-bit and
  // INT8 weights its 16-bit copy (act is not written), then linear. F32 weights: silu_mul, linear.
  void silu_mul_linear(const Tensor& gate, const Tensor& up, Tensor& act, const LinearWeight& weight,
                       const Tensor* bias, Tensor& out) override {
    silu_mul_into_linear(gate, up, act, weight, bias, out, {}, {});
  }

  // silu_mul_linear, with the epilogues that the linears which wrote gate and up left (none: gate
  // and up are final) applied as they are read.
  void silu_mul_into_linear(const Tensor& gate, const Tensor& up, Tensor& act, const LinearWeight& weight,
                            const Tensor* bias, Tensor& out, const cuda::LinearScales& gate_scales,
                            const cuda::LinearScales& up_scales) {
    if (weight.w.dtype != DType::F8_E4M3) {
      const DType rounded = linear_input_dtype(weight);
      if (rounded == DType::F32) {
        if (!gate_scales.none() || !up_scales.none())
          fail(LLMQ_ERR_INTERNAL, "cuda backend: epilogues left for an fp32 SiLU-mul");
        return Backend::silu_mul_linear(gate, up, act, weight, bias, out);
      }
      {
        Profiler::Scope timer(profiler_, "silu_mul (rounded for the linear)", stream_);
        cuda::silu_mul(gate.as<float>(), up.as<float>(), gate.rows, gate.cols,
                       rounded_scratch(gate.numel(), rounded).p, rounded, stream_, gate_scales, up_scales);
        check(cudaGetLastError(), "silu_mul kernel");
      }
      SharedInput sharing(*this, act.data, rounded);
      return linear(act, weight, bias, out);
    }
    const int64_t M = gate.rows, K = gate.cols;
    Profiler::Scope timer(profiler_, profiler_.enabled() ? fmt::format("silu_mul_linear F8_E4M3 {}", rows_bucket(M)) : "",
                          stream_);
    fp8_scratch(M, K);
    cuda::silu_mul_quantize_fp8(gate.as<float>(), up.as<float>(), M, K, weight.input_scale.as<float>(),
                                static_cast<uint8_t*>(codes_->data()), static_cast<float*>(row_scales_->data()),
                                layer_counters(weight.layer), stream_, gate_scales, up_scales);
    check(cudaGetLastError(), "silu_mul_quantize_fp8 kernel");
    fp8_linear(weight, bias, M, K, out);
  }

  void rope_kv_write(Tensor& q, Tensor& k, const Tensor& v, const Tensor& inv_freq, const KvLayer& cache) override {
    rope(q, k, v, inv_freq, cache, {});
  }

  // rope_kv_write, with the epilogues that the linears which wrote q, k and v left applied as they
  // are read.
  void rope(Tensor& q, Tensor& k, const Tensor& v, const Tensor& inv_freq, const KvLayer& cache,
            const cuda::QkvScales& scales) {
    Profiler::Scope timer(profiler_, "rope_kv_write", stream_);
    cuda::rope_kv_write(q.as<float>(), q.cols, k.as<float>(), v.as<float>(), k.cols, inv_freq.as<float>(),
                        cache.head_dim, cache.num_kv_heads, cache.block_size, cache.k.data, cache.v.data,
                        cache.k_scale.as<float>(), cache.v_scale.as<float>(), cache.k.dtype, device_plan_, q.rows,
                        layer_counters(cache.layer), stream_, scales);
    check(cudaGetLastError(), "rope_kv_write kernel");
  }

  void attention(const Tensor& q, const KvLayer& cache, const AttentionParams& params, Tensor& out) override {
    run_attention(q, cache, params, out, cuda::RoundedCopy{});
  }

  // 16-bit and INT8 weights: the attention kernels write the linear's 16-bit input beside attn.
  void attention_linear(const Tensor& q, const KvLayer& cache, const AttentionParams& params, Tensor& attn,
                        const LinearWeight& weight, const Tensor* bias, Tensor& out) override {
    const DType rounded = linear_input_dtype(weight);
    if (rounded == DType::F32) return Backend::attention_linear(q, cache, params, attn, weight, bias, out);
    run_attention(q, cache, params, attn, rounded_scratch(attn.numel(), rounded));
    SharedInput sharing(*this, attn.data, rounded);
    linear(attn, weight, bias, out);
  }

  void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    Profiler::Scope timer(profiler_, "silu_mul", stream_);
    cuda::silu_mul(gate.as<float>(), up.as<float>(), gate.rows, gate.cols, out.data, DType::F32, stream_);
    check(cudaGetLastError(), "silu_mul kernel");
  }

  void gather_rows(const Tensor& x, Tensor& out) override {
    cuda::gather_rows(x.as<float>(), x.cols, device_plan_, out.rows, out.as<float>(), stream_);
    check(cudaGetLastError(), "gather_rows kernel");
  }

  void row_absmax(const Tensor& x, Tensor& out) override {
    cuda::row_absmax(x.as<float>(), x.rows, x.cols, out.as<float>(), stream_);
    check(cudaGetLastError(), "row_absmax kernel");
  }

  std::vector<uint64_t> saturation(int32_t layers, bool reset) override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    std::vector<uint64_t> out(size_t(layers) * kSaturationCounters, 0);
    const size_t n = std::min<size_t>(out.size(), size_t(kMaxCountedLayers) * kSaturationCounters);
    check(cudaMemcpyAsync(out.data(), counters_->data(), n * sizeof(uint64_t), cudaMemcpyDeviceToHost, stream_),
          "saturation (cudaMemcpyAsync)");
    if (reset) check(cudaMemsetAsync(counters_->data(), 0, counters_->size(), stream_), "saturation (cudaMemsetAsync)");
    check(cudaStreamSynchronize(stream_), "saturation (cudaStreamSynchronize)");
    return out;
  }

  void sample(Tensor& logits, const std::vector<SampleRow>& rows, int32_t* tokens) override {
    if (rows.empty()) return;
    // The rows' arguments and penalized ids go over in one copy; only the tokens come back.
    std::vector<cuda::SampleArgs> args(rows.size());
    sample_staging_.clear();
    for (size_t i = 0; i < rows.size(); ++i) {
      const SampleRow& r = rows[i];
      args[i] = cuda::SampleArgs{r.temperature, r.top_p, r.min_p, r.repetition_penalty, r.top_k,
                                 int32_t(sample_staging_.size()), int32_t(sample_staging_.size()) + r.n_penalized, 0,
                                 r.draw};
      sample_staging_.insert(sample_staging_.end(), r.penalized, r.penalized + r.n_penalized);
    }
    const uint64_t args_bytes = args.size() * sizeof(cuda::SampleArgs);
    const uint64_t ids_bytes = sample_staging_.size() * sizeof(int32_t);
    const uint64_t tokens_bytes = rows.size() * sizeof(int32_t);
    ensure(sample_buffer_, args_bytes + ids_bytes + tokens_bytes);
    char* base = static_cast<char*>(sample_buffer_->data());
    check(cudaMemcpyAsync(base, args.data(), args_bytes, cudaMemcpyHostToDevice, stream_), "sample (cudaMemcpyAsync)");
    if (ids_bytes)
      check(cudaMemcpyAsync(base + args_bytes, sample_staging_.data(), ids_bytes, cudaMemcpyHostToDevice, stream_),
            "sample (cudaMemcpyAsync)");
    int32_t* device_tokens = reinterpret_cast<int32_t*>(base + args_bytes + ids_bytes);
    {
      Profiler::Scope timer(profiler_, "sample", stream_);
      cuda::sample(logits.as<float>(), logits.rows, logits.cols, reinterpret_cast<const cuda::SampleArgs*>(base),
                   reinterpret_cast<const int32_t*>(base + args_bytes), device_tokens, stream_);
      check(cudaGetLastError(), "sample kernel");
    }
    profiler_.step_enqueued();
    check(cudaMemcpyAsync(tokens, device_tokens, tokens_bytes, cudaMemcpyDeviceToHost, stream_),
          "sample (cudaMemcpyAsync)");
    // Errors of any earlier kernel of the step surface here.
    check(cudaStreamSynchronize(stream_), "step (cudaStreamSynchronize)");
    profiler_.step_done();
  }

  void to_host(const Tensor& x, float* host) override {
    profiler_.step_enqueued();
    check(cudaMemcpyAsync(host, x.data, x.nbytes(), cudaMemcpyDeviceToHost, stream_), "to_host (cudaMemcpyAsync)");
    // Errors of any earlier kernel of the step surface here.
    check(cudaStreamSynchronize(stream_), "step (cudaStreamSynchronize)");
    profiler_.step_done();
  }

  void from_host(const float* host, Tensor& x) override {
    check(cudaMemcpyAsync(x.data, host, x.nbytes(), cudaMemcpyHostToDevice, stream_), "from_host (cudaMemcpyAsync)");
    check(cudaStreamSynchronize(stream_), "from_host (cudaStreamSynchronize)");
  }

  void* stream() override { return stream_; }

 private:
  // Grows a scratch buffer to at least `bytes` (freeing waits for the device first). Recorded steps
  // that used the old buffer are dropped.
  void ensure(std::unique_ptr<Buffer>& buffer, uint64_t bytes) {
    if (buffer && buffer->size() >= bytes) return;
    if (capturing_) fail(LLMQ_ERR_INTERNAL, "cuda backend: scratch memory grew while a step was being recorded");
    if (buffer) {
      check(cudaStreamSynchronize(stream_), "scratch resize (cudaStreamSynchronize)");
      drop_recordings();
    }
    buffer.reset();
    buffer = std::make_unique<DeviceBuffer>(std::max<uint64_t>(bytes, 1 << 20));
  }

  // Whether a wgmma kernel takes this linear: compute capability 9.0, a shape it takes, and
  // LLMQ_LINEAR_PATH=wgmma, or the timed choice (when in it, INT8 above the stream kernel's rows; or
  // LLMQ_LINEAR_PATH=all, at any rows).
  bool wgmma_applies(DType x_dtype, int64_t M, int64_t N, int64_t K, const void* x, const void* w) const {
    const bool in_choice = x_dtype == DType::F8_E4M3 ? kFp8WgmmaInTimedChoice
                                                     : kInt8WgmmaInTimedChoice && M > cuda::kStreamMaxM;
    const bool timed = in_choice || wgmma_timed_;
    return sm_ == 90 && cuda::wgmma_supported(x_dtype, M, N, K, x, w) &&
           (timed || forced_path_ == LinearPath::Wgmma || forced_path_ == LinearPath::WgmmaCopiers);
  }

  // The stream kernel's paths for a linear it takes: all rows in one block, and above 16 rows its
  // other block layouts too.
  static void add_stream_paths(DType x_dtype, int64_t M, int64_t N, int64_t K, const void* x, const void* w,
                               std::vector<LinearPath>& paths) {
    if (!cuda::stream_supported(x_dtype, M, N, K, x, w)) return;
    paths.push_back(LinearPath::Stream);
    if (M <= 16) return;
    paths.push_back(LinearPath::StreamSplit);
    paths.push_back(LinearPath::StreamWide);
  }
  static cuda::StreamLayout stream_layout(LinearPath path) {
    return path == LinearPath::StreamSplit ? cuda::StreamLayout::Rows16
           : path == LinearPath::StreamWide ? cuda::StreamLayout::Wide
                                            : cuda::StreamLayout::Whole;
  }

  // The stream kernel (INT8 weights with 16-bit x, or FP8 weights with FP8 codes and row scales).
  void stream_linear(const void* x, DType x_dtype, const void* w, int64_t M, int64_t N, int64_t K,
                     const float* row_scales, const float* w_scale, bool per_channel, const void* bias,
                     DType bias_dtype, cuda::StreamLayout layout, float* y) {
    Profiler::Scope part(profiler_, "  (in linear) stream kernel", stream_);
    cuda::stream_linear(x, x_dtype, w, M, N, K, row_scales, w_scale, per_channel, bias, bias_dtype, layout, y, stream_);
    check(cudaGetLastError(), "stream_linear kernel");
  }

  // The wgmma kernel (INT8 weights with 16-bit x, or FP8 weights with FP8 codes and row scales;
  // copier_group: the INT8 form with a copier warpgroup).
  void wgmma_linear(const void* x, DType x_dtype, const void* w, int64_t M, int64_t N, int64_t K,
                    const float* row_scales, const float* w_scale, bool per_channel, const void* bias,
                    DType bias_dtype, bool copier_group, float* y) {
    Profiler::Scope part(profiler_, copier_group ? "  (in linear) wgmma kernel, copiers" : "  (in linear) wgmma kernel",
                         stream_);
    const cuda::SplitKPlan plan = cuda::wgmma_plan(x_dtype, copier_group, M, N, K, num_sms_);
    auto [partial, counters] = split_scratch(plan);
    cuda::wgmma_linear(x, x_dtype, w, M, N, K, row_scales, w_scale, per_channel, bias, bias_dtype, copier_group, y, plan,
                       partial, counters, stream_);
    check(cudaGetLastError(), "wgmma_linear kernel");
  }

  // The split-K scratch of a kernel's plan (none without splits): partial sums and the
  // tiles' counters, zero between launches.
  std::pair<float*, unsigned*> split_scratch(const cuda::SplitKPlan& plan) {
    if (plan.splits <= 1) return {nullptr, nullptr};
    ensure(split_partial_, uint64_t(plan.partial_floats) * sizeof(float));
    ensure_zeroed(split_counters_, uint64_t(plan.counters) * sizeof(unsigned));
    return {static_cast<float*>(split_partial_->data()), static_cast<unsigned*>(split_counters_->data())};
  }

  // ensure() for a buffer that must hold zeros when it is first used (the split-K tile counters).
  void ensure_zeroed(std::unique_ptr<Buffer>& buffer, uint64_t bytes) {
    if (buffer && buffer->size() >= bytes) return;
    ensure(buffer, bytes);
    check(cudaMemsetAsync(buffer->data(), 0, buffer->size(), stream_), "scratch (cudaMemsetAsync)");
  }

  // Ends a recording left open by a step that failed, and never records that shape again.
  void abandon_capture() {
    if (!capturing_) return;
    capturing_ = false;
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    if (step_key_) graphs_[*step_key_] = nullptr;
  }

  // The layer's saturation counters on the device (none past kMaxCountedLayers).
  unsigned long long* layer_counters(int32_t layer) {
    if (layer < 0 || layer >= kMaxCountedLayers) return nullptr;
    return static_cast<unsigned long long*>(counters_->data()) + size_t(layer) * kSaturationCounters;
  }

  // The scales and bias of a linear whose GEMM wrote y unscaled (nothing to do without either): a
  // pass over y, or, while Deferring, left for the caller's next kernel. (Paths being timed take the
  // pass: the choice of a shape serves linears that cannot leave it too.)
  void epilogue(float* y, int64_t M, int64_t N, const float* row_scales, const float* w_scale, bool per_channel,
                const void* bias, DType bias_dtype) {
    const cuda::LinearScales scales{row_scales, w_scale, per_channel, bias, bias_dtype};
    if (scales.none()) return;
    if (deferred_ && !timing_) {
      *deferred_ = scales;
      Profiler::Scope counted(profiler_, "  (in linear) epilogue left to the next kernel", stream_);  // no GPU work
      return;
    }
    Profiler::Scope part(profiler_, "  (in linear) epilogue", stream_);
    cuda::linear_epilogue(y, M, N, scales, stream_);
    check(cudaGetLastError(), "linear epilogue kernel");
  }

  // While alive, the linear that runs leaves its epilogue pass's scales and bias in *left (none
  // when its path applies them itself); with left null, it takes the pass.
  struct Deferring {
    CudaBackend& b;
    Deferring(CudaBackend& backend, cuda::LinearScales* left) : b(backend) {
      if (left) *left = {};
      b.deferred_ = left;
    }
    ~Deferring() { b.deferred_ = nullptr; }
  };

  // FP8 activations: room for M x K codes in codes_ and M row scales in row_scales_.
  void fp8_scratch(int64_t M, int64_t K) {
    ensure(codes_, uint64_t(M) * uint64_t(K));
    ensure(row_scales_, uint64_t(M) * sizeof(float));
  }

  // out = codes_ . weight^T, scaled by row_scales_ and the weight's scale (+ bias): the FP8 linear
  // once its input is quantized. cuBLASLt FP8 (K and N multiples of 16) or the GEMV, the faster.
  // With a static activation scale and a per-tensor weight scale, cuBLASLt applies both (its A/B
  // scale pointers) and no epilogue pass is needed for them.
  void fp8_linear(const LinearWeight& weight, const Tensor* bias, int64_t M, int64_t K, Tensor& out) {
    const int64_t N = weight.w.rows;
    const void* bias_data = bias ? bias->data : nullptr;
    const DType bias_dtype = bias ? bias->dtype : DType::F32;
    const float* w_scale = weight.scale.as<float>();
    const bool per_channel = weight.scale.cols > 1;
    const float* row_scales = static_cast<const float*>(row_scales_->data());
    const uint8_t* codes = static_cast<const uint8_t*>(codes_->data());
    float* y = out.as<float>();
    auto gemv_all = [&] {
      gemv_rows(codes, DType::F8_E4M3, weight.w.data, DType::F8_E4M3, M, N, K, row_scales, w_scale, per_channel,
                bias_data, bias_dtype, y);
    };
    const float* static_scale = weight.input_scale.empty() ? nullptr : weight.input_scale.as<float>();
    auto run = [&](LinearPath path) {
      if (path == LinearPath::Wgmma)
        return wgmma_linear(codes, DType::F8_E4M3, weight.w.data, M, N, K, row_scales, w_scale, per_channel, bias_data,
                            bias_dtype, /*copier_group=*/false, y);
      if (path == LinearPath::Stream || path == LinearPath::StreamSplit || path == LinearPath::StreamWide)
        return stream_linear(codes, DType::F8_E4M3, weight.w.data, M, N, K, row_scales, w_scale, per_channel,
                             bias_data, bias_dtype, stream_layout(path), y);
      if (path == LinearPath::Gemm) {
        // (cuBLASLt's per-channel / per-token scale vectors, OUTER_VEC_32F, and a BF16 GEMM's alpha
        // vector had no algorithm on an H200 with CUDA 13: the epilogue applies those scales.)
        if (static_scale && !per_channel &&
            gemm(weight.w.data, DType::F8_E4M3, codes, DType::F8_E4M3, M, N, K, y, /*required=*/false, w_scale,
                 static_scale))
          return epilogue(y, M, N, nullptr, nullptr, false, bias_data, bias_dtype);
        if (gemm(weight.w.data, DType::F8_E4M3, codes, DType::F8_E4M3, M, N, K, y, /*required=*/false))
          return epilogue(y, M, N, row_scales, w_scale, per_channel, bias_data, bias_dtype);
      }
      gemv_all();  // also when cuBLASLt has no algorithm for the shape
    };
    std::vector<LinearPath> paths;
    if (M <= kGemvMaxRows) paths.push_back(LinearPath::Gemv);
    if (K % 16 == 0 && N % 16 == 0) paths.push_back(LinearPath::Gemm);
    if (wgmma_applies(DType::F8_E4M3, M, N, K, codes, weight.w.data)) paths.push_back(LinearPath::Wgmma);
    add_stream_paths(DType::F8_E4M3, M, N, K, codes, weight.w.data, paths);
    if (paths.empty()) return gemv_all();
    run(choose_path(DType::F8_E4M3, DType::F8_E4M3, M, N, K, paths, run, y));
  }

  // The GEMV over M rows, kGemvMaxM at a time (each launch reads the weights once).
  void gemv_rows(const void* x, DType x_dtype, const void* w, DType w_dtype, int64_t M, int64_t N, int64_t K,
                 const float* row_scales, const float* w_scale, bool per_channel, const void* bias, DType bias_dtype,
                 float* y) {
    const int64_t x_row_bytes = K * int64_t(dtype_size(x_dtype));
    for (int64_t m0 = 0; m0 < M; m0 += cuda::kGemvMaxM) {
      const int64_t rows = std::min(cuda::kGemvMaxM, M - m0);
      cuda::gemv(static_cast<const uint8_t*>(x) + m0 * x_row_bytes, x_dtype, w, w_dtype, rows, N, K,
                 row_scales ? row_scales + m0 : nullptr, w_scale, per_channel, bias, bias_dtype, y + m0 * N, stream_);
      check(cudaGetLastError(), "gemv kernel");
    }
  }

  // A shape's timed paths (us per run) and the fastest.
  struct PathChoice {
    LinearPath best = LinearPath::Gemm;
    float best_ms = 0.0f;
    std::vector<std::pair<LinearPath, float>> timed;
    std::vector<LinearPath> rejected;  // paths whose output disagreed with the reference's
  };

  // The path a linear of this shape takes: the forced one (LLMQ_LINEAR_PATH) where it applies,
  // the only one, or the fastest of `paths` that agree with the reference path (timed_choice),
  // timed with run(path), which writes y [M, N], when the shape (weight and activation types, rows,
  // N, K; rows above 8 in power-of-two buckets, since serving steps vary them every step) is first
  // seen. A step being recorded cannot time: it takes the first path and leaves the choice to an
  // eager step.
  template <typename Run>
  LinearPath choose_path(DType w_dtype, DType x_dtype, int64_t M, int64_t N, int64_t K,
                         const std::vector<LinearPath>& paths, Run&& run, float* y) {
    if (forced_path_ && std::find(paths.begin(), paths.end(), *forced_path_) != paths.end()) return *forced_path_;
    if (paths.size() == 1) return paths[0];
    const auto key = path_key(w_dtype, x_dtype, M, N, K);
    auto it = path_choices_.find(key);
    if (it == path_choices_.end()) {
      if (capturing_) return paths[0];
      const std::string shape = fmt::format("{} x {} M={} N={} K={}", dtype_name(w_dtype), dtype_name(x_dtype), M, N, K);
      it = path_choices_.emplace(key, timed_choice(paths, run, y, M * N, x_dtype == DType::F8_E4M3, shape)).first;
    }
    return it->second.best;
  }

  // The fastest of `paths` whose output agrees with the reference path's. The reference is
  // cuBLASLt (Gemm), else the GEMV: paths checked on H100 / H200 GPUs. Every other path runs first
  // on an output poisoned with NaN, and its output must agree with the reference's
  // (cuda::outputs_agree) or it is left out of the choice, with a warning on stderr: a kernel that
  // is wrong on this GPU falls back to a checked path instead of serving wrong tokens. Without
  // memory for the reference's output, the choice is the reference.
  template <typename Run>
  PathChoice timed_choice(std::vector<LinearPath> paths, Run&& run, float* y, int64_t n, bool fp8,
                          const std::string& shape) {
    auto reference = std::find(paths.begin(), paths.end(), LinearPath::Gemm);
    if (reference == paths.end()) reference = std::find(paths.begin(), paths.end(), LinearPath::Gemv);
    const bool checked = reference != paths.end();
    if (checked) std::rotate(paths.begin(), reference, reference + 1);  // the reference runs first
    std::unique_ptr<DeviceBuffer> reference_out;
    if (checked) {
      try {
        reference_out = std::make_unique<DeviceBuffer>(uint64_t(n) * sizeof(float));
      } catch (const Error& e) {
        if (e.status() != LLMQ_ERR_OUT_OF_MEMORY) throw;
        std::fprintf(stderr, "llmq cuda: no memory to check the paths of %s; it takes %s\n", shape.c_str(),
                     linear_path_name(paths[0]));
        paths.resize(1);
      }
      if (!distance_) distance_ = std::make_unique<DeviceBuffer>(sizeof(cuda::OutputDistance));
    }
    PathChoice choice;
    for (LinearPath path : paths) {
      const bool is_reference = checked && path == paths[0];
      if (checked && !is_reference)
        check(cudaMemsetAsync(y, 0xff, uint64_t(n) * sizeof(float), stream_), "path check (cudaMemsetAsync)");
      const float ms = time_ms([&] { run(path); });
      if (is_reference) {
        if (reference_out)  // (none when it runs alone)
          check(cudaMemcpyAsync(reference_out->data(), y, uint64_t(n) * sizeof(float), cudaMemcpyDeviceToDevice,
                                stream_),
                "path check (cudaMemcpyAsync)");
      } else if (checked) {
        auto* device_distance = static_cast<cuda::OutputDistance*>(distance_->data());
        cuda::output_distance(y, static_cast<const float*>(reference_out->data()), n, device_distance, stream_);
        check(cudaGetLastError(), "output_distance kernel");
        cuda::OutputDistance d;
        check(cudaMemcpyAsync(&d, device_distance, sizeof d, cudaMemcpyDeviceToHost, stream_),
              "path check (cudaMemcpyAsync)");
        check(cudaStreamSynchronize(stream_), "path check (cudaStreamSynchronize)");
        if (!cuda::outputs_agree(d, fp8)) {
          std::fprintf(stderr,
                       "llmq cuda: linear path %s disagrees with %s on %s (relative error %.3g, largest difference "
                       "%.3g against largest |reference| %.3g, %llu elements not finite): it is not used\n",
                       linear_path_name(path), linear_path_name(paths[0]), shape.c_str(), d.relative_error(),
                       double(d.max_diff()), double(d.max_ref()), d.not_finite);
          choice.rejected.push_back(path);
          continue;
        }
      }
      choice.timed.emplace_back(path, ms);
      if (choice.timed.size() == 1 || ms < choice.best_ms) {
        choice.best = path;
        choice.best_ms = ms;
      }
    }
    return choice;
  }

  // path_choices_'s key for a shape.
  static std::tuple<int, int, int64_t, int64_t, int64_t> path_key(DType w_dtype, DType x_dtype, int64_t M, int64_t N,
                                                                  int64_t K) {
    int64_t rows = M;
    if (M > cuda::kGemvMaxM) {
      rows = 16;
      while (rows < M) rows *= 2;
    }
    return std::make_tuple(int(w_dtype), int(x_dtype), rows, N, K);
  }
  // The path a shape's linears take, as far as it is known without running them: the forced one,
  // or the timed choice once made.
  std::optional<LinearPath> chosen_path(DType w_dtype, DType x_dtype, int64_t M, int64_t N, int64_t K) const {
    if (forced_path_) return forced_path_;
    auto it = path_choices_.find(path_key(w_dtype, x_dtype, M, N, K));
    if (it == path_choices_.end()) return std::nullopt;
    return it->second.best;
  }

  // attention() with the output's 16-bit copy written beside it when `rounded` is set.
  void run_attention(const Tensor& q, const KvLayer& cache, const AttentionParams& params, Tensor& out,
                     cuda::RoundedCopy rounded) {
    cuda::AttentionArgs args;
    args.rounded = rounded;
    args.num_heads = params.num_heads;
    args.num_kv_heads = params.num_kv_heads;
    args.head_dim = params.head_dim;
    args.block_size = cache.block_size;
    args.sliding_window = params.sliding_window;
    args.scale = params.scale;
    args.k_scale = cache.k_scale.as<float>();
    args.v_scale = cache.v_scale.as<float>();
    args.scale_per_token = cache.k.dtype == DType::I8;
    // Prefill (a run of more than 16 tokens of one sequence) goes to the tensor cores when the cache
    // is not F32. Else, when few (tile, head) blocks would leave multiprocessors idle, split the keys.
    args.tensor_cores = tiles_.longest_run > cuda::kAttentionTileQ &&
                        cuda::attention_has_tensor_core_kernel(cache.k.dtype, params.head_dim);
    args.one_token_tiles = tiles_.longest_run == 1;
    const int64_t blocks = int64_t(device_plan_.small.n) * params.num_heads;
    // The split count depends only on the batch shape and whether there is more than one key tile,
    // so that a recorded decode step stays valid as the contexts grow; empty splits cost little.
    if (!args.tensor_cores && blocks < num_sms_ && max_keys_ > 64)
      args.n_splits = int32_t(std::min<int64_t>((2 * num_sms_ + blocks - 1) / blocks, 64));
    Profiler::Scope timer(profiler_,
                          profiler_.enabled() ? fmt::format("attention {}{}",
                                                            args.tensor_cores      ? "mma"
                                                            : args.one_token_tiles ? "decode"
                                                                                   : "cuda-core",
                                                            args.n_splits > 1 ? " split" : "")
                                              : "",
                          stream_);
    float *partial_o = nullptr, *partial_ml = nullptr;
    if (args.n_splits > 1) {
      const uint64_t parts = uint64_t(q.rows) * uint64_t(params.num_heads) * uint64_t(args.n_splits);
      ensure(partial_o_, parts * uint64_t(params.head_dim) * sizeof(float));
      ensure(partial_ml_, parts * 2 * sizeof(float));
      partial_o = static_cast<float*>(partial_o_->data());
      partial_ml = static_cast<float*>(partial_ml_->data());
    }
    cuda::attention(q.as<float>(), q.cols, cache.k.data, cache.v.data, cache.k.dtype, args, device_plan_, q.rows,
                    partial_o, partial_ml, out.as<float>(), stream_);
    check(cudaGetLastError(), "attention kernel");
  }

  // The type a linear's input is rounded to: BF16 or F16 (16-bit weights: theirs; INT8: the
  // checkpoint's activation type), else F32 (F32 weights; FP8 weights quantize it their own way).
  static DType linear_input_dtype(const LinearWeight& weight) {
    const DType w_dtype = weight.w.dtype;
    if (w_dtype == DType::I8) return weight.act_dtype;
    return w_dtype == DType::BF16 || w_dtype == DType::F16 ? w_dtype : DType::F32;
  }

  static bool fp8_dynamic(const LinearWeight& weight) {
    return weight.w.dtype == DType::F8_E4M3 && weight.input_scale.empty();
  }

  // rmsnorm (residual null) or add_rmsnorm into out; as well, with `rounded` BF16 / F16, out
  // rounded to it into converted_, and with `fp8`, its FP8 codes (dynamic scales) into codes_ and
  // row_scales_.
  void norm(Tensor* residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out, DType rounded, bool fp8) {
    const bool with_input = rounded != DType::F32 || fp8;
    Profiler::Scope timer(profiler_,
                          residual ? (with_input ? "add_rmsnorm (and the linears' input)" : "add_rmsnorm")
                                   : (with_input ? "rmsnorm (and the linears' input)" : "rmsnorm"),
                          stream_);
    if (fp8) fp8_scratch(out.rows, out.cols);
    cuda::rmsnorm(residual ? residual->as<float>() : nullptr, x.as<float>(), weight.data, weight.dtype, eps, x.rows,
                  x.cols, out.as<float>(), rounded_scratch(out.numel(), rounded),
                  fp8 ? static_cast<uint8_t*>(codes_->data()) : nullptr,
                  fp8 ? static_cast<float*>(row_scales_->data()) : nullptr, stream_);
    check(cudaGetLastError(), residual ? "add_rmsnorm kernel" : "rmsnorm kernel");
  }

  // converted_, room for n values of `dtype` (BF16 / F16), as a kernel's 16-bit copy of an output
  // (none for F32).
  cuda::RoundedCopy rounded_scratch(int64_t n, DType dtype) {
    if (dtype == DType::F32) return {};
    ensure(converted_, uint64_t(n) * dtype_size(dtype));
    return {converted_->data(), dtype == DType::BF16};
  }

  // While alive, linears of one input share what they read of it: its 16-bit copy in converted_
  // (of converted_of_), its FP8 codes with dynamic scales in codes_ / row_scales_ (of
  // fp8_codes_of_), given by the op that has just written them (rounded_of / fp8_codes_of) or made
  // by the first linear. Never kept past it: the input changes between calls.
  struct SharedInput {
    CudaBackend& b;
    explicit SharedInput(CudaBackend& backend, const void* rounded_of = nullptr, DType rounded = DType::F32,
                         const void* fp8_codes_of = nullptr)
        : b(backend) {
      b.shared_input_ = true;
      b.converted_of_ = rounded_of;
      b.converted_dtype_ = rounded;
      b.fp8_codes_of_ = fp8_codes_of;
    }
    ~SharedInput() {
      b.shared_input_ = false;
      b.converted_of_ = nullptr;
      b.fp8_codes_of_ = nullptr;
    }
  };

  // x rounded to `dtype` in scratch memory (F32: x itself). Inside a SharedInput, the copy made for
  // the first linear (or by the op before) serves the others.
  const void* activations(const Tensor& x, DType dtype) {
    if (dtype == DType::F32) return x.data;
    if (shared_input_ && converted_of_ == x.data && converted_dtype_ == dtype) return converted_->data();
    Profiler::Scope part(profiler_, "  (in linear) convert activations", stream_);
    void* copy = rounded_scratch(x.numel(), dtype).p;
    cuda::convert_activations(x.as<float>(), x.numel(), dtype, copy, stream_);
    check(cudaGetLastError(), "convert_activations kernel");
    converted_of_ = x.data;
    converted_dtype_ = dtype;
    return copy;
  }

  // The mean GPU time of fn() over 3 runs after a warm-up, from events on the stream. Autotuning
  // only: it synchronizes, so it runs in eager steps, never while a step is recorded.
  template <typename Fn>
  float time_ms(Fn&& fn) {
    if (capturing_) fail(LLMQ_ERR_INTERNAL, "cuda backend: autotuning while a step was being recorded");
    profiler_.tuning();
    struct Timing {  // timing_ while fn runs (time_ms may nest: a GEMM's plan is timed in a path's run)
      bool& flag;
      const bool was;
      explicit Timing(bool& f) : flag(f), was(f) { f = true; }
      ~Timing() { flag = was; }
    } timing(timing_);
    cudaEvent_t start = nullptr, stop = nullptr;
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
    fn();
    check(cudaEventRecord(start, stream_), "cudaEventRecord");
    for (int r = 0; r < 3; ++r) fn();
    check(cudaEventRecord(stop, stream_), "cudaEventRecord");
    const cudaError_t status = cudaEventSynchronize(stop);
    float ms = 0.0f;
    if (status == cudaSuccess) cudaEventElapsedTime(&ms, start, stop);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    check(status, "autotune (cudaEventSynchronize)");
    return ms / 3.0f;
  }

  // y[M, N] (fp32) = x[M, K] . w[N, K]^T with fp32 accumulation, times *w_scale * *x_scale when
  // given (device fp32 scalars: FP8's per-tensor scales, cuBLASLt's A/B scale pointers). In
  // cuBLASLt's column-major terms y^T (N x M) = op(W) x^T with W read as K x N transposed: the "TN"
  // layout FP8 requires. y_stride (0: N): the distance between y's rows, for a slice of wider rows.
  // Returns false (with `required` false) when cuBLASLt has no algorithm.
  // (A BF16 output converted by the epilogue was tried: no faster on an H200, so the output is fp32.)
  bool gemm(const void* w, DType w_dtype, const void* x, DType x_dtype, int64_t M, int64_t N, int64_t K, float* y,
            bool required = true, const float* w_scale = nullptr, const float* x_scale = nullptr,
            int64_t y_stride = 0) {
    const CublasLt& lt = cublas_lt();
    void* d = y;
    const DType out_dtype = DType::F32;
    const bool scaled = w_scale && x_scale;
    const int64_t ldd = y_stride ? y_stride : N;
    const auto key = std::make_tuple(int(w_dtype), int(x_dtype), int(out_dtype), M, N, K, ldd, scaled);
    // The scale pointers change with the weight: set on the shape's descriptor before each use.
    auto set_scales = [&](cublasLtMatmulDesc_t desc) {
      if (!scaled) return;
      check(lt.cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale, sizeof w_scale),
            "cublasLtMatmulDescSetAttribute(A_SCALE_POINTER)");
      check(lt.cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale, sizeof x_scale),
            "cublasLtMatmulDescSetAttribute(B_SCALE_POINTER)");
    };
    const float alpha = 1.0f, beta = 0.0f;
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      if (plans_.size() > 4096) fail(LLMQ_ERR_INTERNAL, "cuda backend: too many GEMM shapes");
      GemmPlan plan;
      check(lt.cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
      const cublasOperation_t transpose = CUBLAS_OP_T;
      check(lt.cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof transpose),
            "cublasLtMatmulDescSetAttribute(TRANSA)");
      set_scales(plan.desc);
      check(lt.cublasLtMatrixLayoutCreate(&plan.a, cuda_type(w_dtype), uint64_t(K), uint64_t(N), K),
            "cublasLtMatrixLayoutCreate(A)");
      check(lt.cublasLtMatrixLayoutCreate(&plan.b, cuda_type(x_dtype), uint64_t(K), uint64_t(M), K),
            "cublasLtMatrixLayoutCreate(B)");
      check(lt.cublasLtMatrixLayoutCreate(&plan.d, cuda_type(out_dtype), uint64_t(N), uint64_t(M), ldd),
            "cublasLtMatrixLayoutCreate(D)");
      cublasLtMatmulPreference_t preference = nullptr;
      check(lt.cublasLtMatmulPreferenceCreate(&preference), "cublasLtMatmulPreferenceCreate");
      const uint64_t workspace = kWorkspaceBytes;
      lt.cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                              sizeof workspace);
      // The heuristic's first choice can be far from the best for decode-like shapes (a 2.4 ms
      // lm_head at M = 1 was seen): time its candidates once, on this call's buffers, and keep
      // the fastest; one that fails to run is skipped, and with none that runs the plan has no
      // algorithm. Plans are made in eager steps only, never during a graph capture.
      cublasLtMatmulHeuristicResult_t results[8] = {};
      int found = 0;
      cublasStatus_t s = lt.cublasLtMatmulAlgoGetHeuristic(lt_handle_, plan.desc, plan.a, plan.b, plan.d, plan.d,
                                                          preference, 8, results, &found);
      lt.cublasLtMatmulPreferenceDestroy(preference);
      plan.candidates = s == CUBLAS_STATUS_SUCCESS ? found : 0;
      for (int i = 0; i < plan.candidates; ++i) {
        auto run = [&] {
          return lt.cublasLtMatmul(lt_handle_, plan.desc, &alpha, w, plan.a, x, plan.b, &beta, d, plan.d, d, plan.d,
                                   &results[i].algo, workspace_->data(), kWorkspaceBytes, stream_);
        };
        if (run() != CUBLAS_STATUS_SUCCESS) continue;
        const float ms = time_ms(run);
        if (i == 0) plan.first_ms = ms;
        if (!plan.has_algo || ms < plan.best_ms) {
          plan.algo = results[i].algo;
          plan.has_algo = true;
          plan.chosen = i;
          plan.best_ms = ms;
        }
      }
      it = plans_.emplace(key, plan).first;
    }
    const GemmPlan& plan = it->second;
    set_scales(plan.desc);
    if (!plan.has_algo) {
      if (!required) return false;
      fail(LLMQ_ERR_UNSUPPORTED, "cuda backend: cuBLASLt has no algorithm for {} x {} GEMM of [{}, {}] x [{}, {}]",
           dtype_name(w_dtype), dtype_name(x_dtype), M, K, N, K);
    }
    // The GEMM alone inside the linear's time: the profile's answer to "is it the GEMM or the rest".
    Profiler::Scope part(profiler_,
                         profiler_.enabled() ? fmt::format("  (in linear) cuBLASLt {} {}", dtype_name(w_dtype), rows_bucket(M))
                                             : "",
                         stream_);
    check(lt.cublasLtMatmul(lt_handle_, plan.desc, &alpha, w, plan.a, x, plan.b, &beta, d, plan.d, d, plan.d,
                            &plan.algo, workspace_->data(), kWorkspaceBytes, stream_),
          "cublasLtMatmul");
    return true;
  }

  int device_ = 0;
  int sm_ = 0;
  int num_sms_ = 0;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_handle_ = nullptr;
  std::unique_ptr<Buffer> workspace_;
  static constexpr int32_t kMaxCountedLayers = 1024;
  std::unique_ptr<Buffer> counters_;  // kSaturationCounters uint64 per layer
  // (w, x, out dtypes, M, N, K, y's row stride, scaled by the scale pointers) -> the shape's plan.
  std::map<std::tuple<int, int, int, int64_t, int64_t, int64_t, int64_t, bool>, GemmPlan> plans_;
  // (weight dtype, activation dtype, rows or rows bucket, N, K) -> each path's time when first seen.
  std::map<std::tuple<int, int, int64_t, int64_t, int64_t>, PathChoice> path_choices_;
  std::optional<LinearPath> forced_path_;  // LLMQ_LINEAR_PATH
  bool wgmma_timed_ = false;               // LLMQ_LINEAR_PATH=all
  // converted_ holds converted_of_'s data rounded to converted_dtype_, codes_ / row_scales_
  // fp8_codes_of_'s FP8 codes with dynamic scales; reused while shared_input_ (a SharedInput).
  bool shared_input_ = false;
  cuda::LinearScales* deferred_ = nullptr;  // while Deferring: where an epilogue pass is left
  bool timing_ = false;                     // inside time_ms
  const void* converted_of_ = nullptr;
  DType converted_dtype_ = DType::F32;
  const void* fp8_codes_of_ = nullptr;

  std::vector<std::unique_ptr<Buffer>> uploads_;

  std::vector<int32_t> staging_;
  cuda::QueryTiles tiles_;
  int32_t max_keys_ = 0;
  std::unique_ptr<Buffer> plan_buffer_;
  std::unique_ptr<Buffer> sample_buffer_;  // a sampling step's arguments, penalized ids and tokens
  std::vector<int32_t> sample_staging_;
  cuda::DevicePlan device_plan_;

  std::unique_ptr<Buffer> converted_, dequantized_, codes_, row_scales_, partial_o_, partial_ml_;
  std::unique_ptr<Buffer> split_partial_, split_counters_;  // the W8A16 kernels' split-K scratch
  std::unique_ptr<Buffer> distance_;                         // a path check's cuda::OutputDistance
  Profiler profiler_;

  // Recorded decode steps: (tokens, logit rows, keys split or not) -> graph (null: not recordable).
  using StepKey = std::tuple<int32_t, int32_t, bool>;
  bool graphs_enabled_ = true;
  bool capturing_ = false;
  std::optional<StepKey> step_key_;
  std::map<StepKey, cudaGraphExec_t> graphs_;
  std::set<StepKey> seen_;
};

}  // namespace

int cuda_device_count(std::string* why) {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    *why = std::string("CUDA runtime: ") + cudaGetErrorString(status);
    return 0;
  }
  if (count == 0) *why = "CUDA runtime: no CUDA device is visible";
  return count;
}

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(options);
}

}  // namespace llmq
