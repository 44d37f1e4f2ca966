#include "engine/kv_cache.h"

#include "engine/error.h"

namespace llmq {

BlockAllocator::BlockAllocator(int32_t num_blocks) : refcounts_(size_t(num_blocks), 0) {
  free_.reserve(size_t(num_blocks));
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
}

void BlockAllocator::check(int32_t block, const char* what) const {
  if (block < 0 || block >= num_blocks() || refcounts_[size_t(block)] == 0)
    fail(LLMQ_ERR_INTERNAL, "kv cache: {} of block {}, which is not allocated", what, block);
}

int32_t BlockAllocator::allocate() {
  if (free_.empty()) return -1;
  int32_t block = free_.back();
  free_.pop_back();
  refcounts_[size_t(block)] = 1;
  return block;
}

void BlockAllocator::retain(int32_t block) {
  check(block, "retain");
  ++refcounts_[size_t(block)];
}

void BlockAllocator::release(int32_t block) {
  check(block, "release");
  if (--refcounts_[size_t(block)] == 0) free_.push_back(block);
}

int32_t BlockAllocator::refcount(int32_t block) const {
  if (block < 0 || block >= num_blocks()) fail(LLMQ_ERR_INVALID_ARGUMENT, "kv cache: no block {}", block);
  return refcounts_[size_t(block)];
}

bool SequenceKv::reserve(int32_t length) {
  size_t needed = size_t((int64_t(length) + block_size_ - 1) / block_size_);
  size_t had = blocks_.size();
  while (blocks_.size() < needed) {
    int32_t block = allocator_->allocate();
    if (block < 0) {
      release_blocks_from(had);
      return false;
    }
    blocks_.push_back(block);
  }
  return true;
}

void SequenceKv::release_blocks_from(size_t first) {
  while (blocks_.size() > first) {
    allocator_->release(blocks_.back());
    blocks_.pop_back();
  }
}

void SequenceKv::clear() {
  release_blocks_from(0);
  length_ = 0;
}

}  // namespace llmq
