#include "engine/tensor_parallel.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <tuple>
#include <utility>

#include "engine/error.h"

namespace llmq {

void check_tensor_parallel(const ModelConfig& c, int size) {
  if (c.num_heads % size != 0)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: tensor_parallel {} does not divide num_attention_heads {}", size,
         c.num_heads);
  if (size <= c.num_kv_heads && c.num_kv_heads % size != 0)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: tensor_parallel {} does not divide num_key_value_heads {}", size,
         c.num_kv_heads);
  if (size > c.num_kv_heads && size % c.num_kv_heads != 0)
    fail(LLMQ_ERR_INVALID_ARGUMENT,
         "engine params: tensor_parallel {} exceeds num_key_value_heads {} but is not a multiple of it (each KV head "
         "is replicated to the same number of ranks)", size, c.num_kv_heads);
  // The intermediate and vocabulary dimensions may split unevenly (stories260K: 172 features over
  // 8 ranks), but every rank needs a part of them.
  if (c.intermediate_size < size)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: tensor_parallel {} exceeds intermediate_size {}", size,
         c.intermediate_size);
  if (c.vocab_size < size)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "engine params: tensor_parallel {} exceeds vocab_size {}", size, c.vocab_size);
}

namespace {
// Part `rank` of `n` items split over `size` ranks as evenly as possible: [n * r / size, n * (r + 1) / size).
std::pair<int64_t, int64_t> split(int64_t n, int rank, int size) {
  const int64_t first = n * rank / size;
  return {first, n * (rank + 1) / size - first};
}
}  // namespace

TpShard tp_shard(const ModelConfig& c, int rank, int size) {
  TpShard s;
  s.rank = rank;
  s.size = size;
  s.heads = c.num_heads / size;
  s.first_head = rank * s.heads;
  if (size <= c.num_kv_heads) {
    s.kv_heads = c.num_kv_heads / size;
    s.first_kv_head = rank * s.kv_heads;
  } else {
    const int replicas = size / int(c.num_kv_heads);
    s.kv_heads = 1;
    s.first_kv_head = rank / replicas;
    s.kv_replica = rank % replicas != 0;
  }
  std::tie(s.first_inter, s.inter) = split(c.intermediate_size, rank, size);
  std::tie(s.first_vocab, s.vocab) = split(c.vocab_size, rank, size);
  s.vocab_stride = (c.vocab_size + size - 1) / size;
  return s;
}

namespace {

// Columns [first, first + count) of every row. A one-row tensor (bias, per-channel scale) is a
// view; otherwise the strided columns are copied into *storage.
Tensor columns(const Tensor& t, int64_t first, int64_t count, std::vector<std::vector<char>>* storage) {
  if (t.empty()) return t;
  const size_t elem = dtype_size(t.dtype);
  const char* src = static_cast<const char*>(t.data);
  if (t.rows == 1) return Tensor{const_cast<char*>(src) + size_t(first) * elem, t.dtype, 1, count};
  storage->emplace_back(size_t(t.rows * count) * elem);
  char* dst = storage->back().data();
  for (int64_t r = 0; r < t.rows; ++r)
    std::memcpy(dst + size_t(r * count) * elem, src + size_t(r * t.cols + first) * elem, size_t(count) * elem);
  return Tensor{dst, t.dtype, t.rows, count};
}

// A per-channel scale [1, N] goes with its channels; a per-tensor one [1, 1] is replicated.
Tensor channel_scale(const Tensor& scale, int64_t first, int64_t count) {
  return scale.empty() || scale.cols == 1 ? scale : columns(scale, first, count, nullptr);
}

}  // namespace

ModelWeights shard_weights(const ModelWeights& w, const ModelConfig& c, const TpShard& s,
                           std::vector<std::vector<char>>* storage) {
  const int64_t D = c.head_dim;
  const int64_t q0 = s.first_head * D, nq = s.heads * D, kv0 = s.first_kv_head * D, nkv = s.kv_heads * D;
  ModelWeights out;
  out.embed = w.embed.row_slice(s.first_vocab, s.vocab);
  out.lm_head = w.lm_head.data == w.embed.data ? out.embed : w.lm_head.row_slice(s.first_vocab, s.vocab);
  out.final_norm = w.final_norm;
  for (const LayerWeights& src : w.layers) {
    LayerWeights l = src;  // norms, input scales and KV scales are replicated
    l.wq = src.wq.row_slice(q0, nq);
    l.wk = src.wk.row_slice(kv0, nkv);
    l.wv = src.wv.row_slice(kv0, nkv);
    l.wo = columns(src.wo, q0, nq, storage);
    l.bq = columns(src.bq, q0, nq, storage);
    l.bk = columns(src.bk, kv0, nkv, storage);
    l.bv = columns(src.bv, kv0, nkv, storage);
    if (s.rank != 0) l.bo = Tensor{};
    l.w_gate = src.w_gate.row_slice(s.first_inter, s.inter);
    l.w_up = src.w_up.row_slice(s.first_inter, s.inter);
    l.w_down = columns(src.w_down, s.first_inter, s.inter, storage);
    l.weight_scale[kQ] = channel_scale(src.weight_scale[kQ], q0, nq);
    l.weight_scale[kK] = channel_scale(src.weight_scale[kK], kv0, nkv);
    l.weight_scale[kV] = channel_scale(src.weight_scale[kV], kv0, nkv);
    l.weight_scale[kGate] = channel_scale(src.weight_scale[kGate], s.first_inter, s.inter);
    l.weight_scale[kUp] = channel_scale(src.weight_scale[kUp], s.first_inter, s.inter);
    out.layers.push_back(l);
  }
  return out;
}

// ---- RankThreads ------------------------------------------------------------------------------

struct RankThreads::Worker {
  std::thread thread;
  std::mutex mutex;
  std::condition_variable cv;
  const std::function<void(int)>* job = nullptr;
  bool stop = false;
};

RankThreads::RankThreads(int n) : n_(n) {
  for (int r = 1; r < n; ++r) {
    workers_.push_back(std::make_unique<Worker>());
    Worker* w = workers_.back().get();
    w->thread = std::thread([w, r] {
      std::unique_lock<std::mutex> lock(w->mutex);
      for (;;) {
        w->cv.wait(lock, [w] { return w->job || w->stop; });
        if (!w->job) return;
        lock.unlock();
        (*w->job)(r);  // never throws: run() wraps it
        lock.lock();
        w->job = nullptr;
        w->cv.notify_all();
      }
    });
  }
}

RankThreads::~RankThreads() {
  for (auto& w : workers_) {
    {
      std::lock_guard<std::mutex> lock(w->mutex);
      w->stop = true;
    }
    w->cv.notify_all();
    w->thread.join();
  }
}

void RankThreads::run(const std::function<void(int)>& fn,
                      const std::function<void(llmq_status, const std::string&)>& on_error) {
  std::mutex error_mutex;
  std::exception_ptr first;
  const std::function<void(int)> call = [&](int r) {
    try {
      fn(r);
    } catch (...) {
      llmq_status status = LLMQ_ERR_INTERNAL;
      std::string message;
      try {
        throw;
      } catch (const Error& e) {
        status = e.status();
        message = e.what();
      } catch (const std::bad_alloc&) {
        status = LLMQ_ERR_OUT_OF_MEMORY;
        message = "out of memory";
      } catch (const std::exception& e) {
        message = e.what();
      } catch (...) {
        message = "unknown exception";
      }
      {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (first) return;  // a consequence of the first failure (its abort), or a later one
        first = std::current_exception();
      }
      on_error(status, fmt::format("rank {} failed: {}", r, message));
    }
  };
  for (auto& w : workers_) {
    std::lock_guard<std::mutex> lock(w->mutex);
    w->job = &call;
  }
  for (auto& w : workers_) w->cv.notify_all();
  call(0);
  for (auto& w : workers_) {
    std::unique_lock<std::mutex> lock(w->mutex);
    w->cv.wait(lock, [&] { return w->job == nullptr; });
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace llmq
