#include "engine/communicator.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>

#include <fmt/ranges.h>

#include "engine/error.h"

namespace llmq {

namespace {

// What the ranks of an in-process group share. Each collective is one barrier: every rank first
// copies its contribution into a buffer of its own and posts it, then, once all have posted,
// reads everyone's. A rank's buffers alternate between collectives: a rank can be at most one
// collective ahead of the slowest one (it cannot pass the next barrier alone), and the slowest
// may still be reading the previous collective's buffers.
struct Group {
  struct Post {
    const char* op = nullptr;
    size_t count = 0;
    const float* data = nullptr;
  };

  Group(int size, int timeout_ms)
      : size(size), timeout(timeout_ms), here(size_t(size), false), posts{std::vector<Post>(size_t(size)),
                                                                          std::vector<Post>(size_t(size))} {}

  // Waits until every rank has arrived (posting `post` in posts[parity] first, when given).
  void arrive(int rank, const char* what, int parity, const Post* post) {
    std::unique_lock<std::mutex> lock(mutex);
    if (abort_status != LLMQ_OK) throw Error(abort_status, abort_why);
    if (post) posts[size_t(parity)][size_t(rank)] = *post;
    here[size_t(rank)] = true;
    if (++arrived == size) {
      arrived = 0;
      std::fill(here.begin(), here.end(), false);
      ++generation;
      cv.notify_all();
      return;
    }
    const uint64_t gen = generation;
    cv.wait_for(lock, timeout, [&] { return generation != gen || abort_status != LLMQ_OK; });
    if (generation != gen) return;
    if (abort_status != LLMQ_OK) throw Error(abort_status, abort_why);
    std::vector<int> missing;
    for (int r = 0; r < size; ++r)
      if (!here[size_t(r)]) missing.push_back(r);
    abort_status = LLMQ_ERR_TIMEOUT;
    abort_why = fmt::format("tensor parallel: rank {} waited {} ms in {} for rank(s) {}, which never arrived", rank,
                            timeout.count(), what, fmt::join(missing, ", "));
    cv.notify_all();
    throw Error(abort_status, abort_why);
  }

  void abort(llmq_status status, const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex);
    if (abort_status != LLMQ_OK) return;  // the first reason stays
    abort_status = status;
    abort_why = why;
    cv.notify_all();
  }

  const int size;
  const std::chrono::milliseconds timeout;
  std::mutex mutex;
  std::condition_variable cv;
  uint64_t generation = 0;  // barriers completed
  int arrived = 0;
  std::vector<bool> here;  // ranks at the current barrier
  llmq_status abort_status = LLMQ_OK;
  std::string abort_why;
  std::vector<Group::Post> posts[2];  // [parity][rank]
};

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Group> group, int rank) : group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size; }

  void all_reduce_sum(float* data, size_t count, void*) override {
    reduce(data, count, "all_reduce_sum", [](float a, float b) { return a + b; });
  }
  void all_reduce_max(float* data, size_t count, void*) override {
    reduce(data, count, "all_reduce_max", [](float a, float b) { return std::max(a, b); });
  }

  void all_gather(const float* send, size_t count, float* recv, void*) override {
    const std::vector<Group::Post>& posts = exchange("all_gather", send, count);
    for (size_t r = 0; r < posts.size(); ++r) std::memcpy(recv + r * count, posts[r].data, count * sizeof(float));
  }

  void broadcast(float* data, size_t count, int root, void*) override {
    if (root < 0 || root >= size()) fail(LLMQ_ERR_INTERNAL, "tensor parallel: broadcast from rank {} of {}", root, size());
    const std::vector<Group::Post>& posts = exchange("broadcast", rank_ == root ? data : nullptr, rank_ == root ? count : 0);
    if (rank_ != root) std::memcpy(data, posts[size_t(root)].data, count * sizeof(float));
  }

  void barrier() override { group_->arrive(rank_, "barrier", 0, nullptr); }

  void abort(llmq_status status, const std::string& why) override { group_->abort(status, why); }

 private:
  // Posts a copy of data[0, count) and returns every rank's post once all have posted.
  const std::vector<Group::Post>& exchange(const char* op, const float* data, size_t count) {
    const int parity = int(collectives_++ % 2);
    std::vector<float>& mine = buffers_[parity];
    mine.assign(data, data + count);
    const Group::Post post{op, count, mine.data()};
    group_->arrive(rank_, op, parity, &post);
    const std::vector<Group::Post>& posts = group_->posts[parity];
    for (size_t r = 0; r < posts.size(); ++r) {
      // A broadcast's non-roots post nothing; anything else must match exactly.
      const bool same = std::strcmp(posts[r].op, op) == 0 &&
                        (posts[r].count == count || std::strcmp(op, "broadcast") == 0);
      if (!same) {
        const std::string why = fmt::format("tensor parallel: rank {} called {}({}) while rank {} called {}({})", rank_,
                                            op, count, r, posts[r].op, posts[r].count);
        group_->abort(LLMQ_ERR_INTERNAL, why);
        fail(LLMQ_ERR_INTERNAL, "{}", why);
      }
    }
    return posts;
  }

  template <typename Op>
  void reduce(float* data, size_t count, const char* name, Op op) {
    const std::vector<Group::Post>& posts = exchange(name, data, count);
    // Every rank reduces the whole array in rank order: the same bits everywhere.
    for (size_t i = 0; i < count; ++i) {
      float acc = posts[0].data[i];
      for (size_t r = 1; r < posts.size(); ++r) acc = op(acc, posts[r].data[i]);
      data[i] = acc;
    }
  }

  std::shared_ptr<Group> group_;
  int rank_;
  uint64_t collectives_ = 0;
  std::vector<float> buffers_[2];
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_in_process_communicators(int size, int timeout_ms) {
  if (size < 1) fail(LLMQ_ERR_INVALID_ARGUMENT, "tensor parallel: a group needs at least one rank, got {}", size);
  if (timeout_ms < 1) fail(LLMQ_ERR_INVALID_ARGUMENT, "tensor parallel: timeout must be positive, got {} ms", timeout_ms);
  auto group = std::make_shared<Group>(size, timeout_ms);
  std::vector<std::unique_ptr<Communicator>> ranks;
  for (int r = 0; r < size; ++r) ranks.push_back(std::make_unique<InProcessCommunicator>(group, r));
  return ranks;
}

#ifndef LLMQ_HAVE_CUDA
namespace {
[[noreturn]] void no_nccl() {
  fail(LLMQ_ERR_BACKEND_UNAVAILABLE,
       "NCCL: this build of llmq has no CUDA backend (configured with LLMQ_CUDA=OFF or without nvcc)");
}
}  // namespace

bool nccl_available(std::string* why) {
  *why = "this build of llmq has no CUDA backend (configured with LLMQ_CUDA=OFF or without nvcc)";
  return false;
}
std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<int>&, int) { no_nccl(); }
NcclId nccl_unique_id() { no_nccl(); }
std::unique_ptr<Communicator> make_nccl_communicator(const NcclId&, int, int, int, int) { no_nccl(); }
int communicator_device(const Communicator&) { return -1; }
#endif

}  // namespace llmq
