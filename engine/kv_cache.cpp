#include "engine/kv_cache.h"

#include "engine/error.h"

namespace llmq {

BlockAllocator::BlockAllocator(int32_t num_blocks)
    : refcounts_(size_t(num_blocks), 0), block_key_(size_t(num_blocks), nullptr), lru_pos_(size_t(num_blocks)) {
  free_.reserve(size_t(num_blocks));
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
}

size_t BlockAllocator::KeyHash::operator()(const Key& key) const {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ uint64_t(key.parent);
  for (int32_t t : key.tokens) h = (h ^ uint32_t(t)) * 0x100000001b3ull;  // FNV-1a style over ids
  return size_t(h ^ (h >> 29));
}

void BlockAllocator::check(int32_t block, const char* what) const {
  if (block < 0 || block >= num_blocks() || refcounts_[size_t(block)] == 0)
    fail(LLMQ_ERR_INTERNAL, "kv cache: {} of block {}, which is not allocated", what, block);
}

int32_t BlockAllocator::allocate() {
  int32_t block;
  if (!free_.empty()) {
    block = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    block = lru_.front();  // evict the least recently used cached content
    lru_.pop_front();
    cache_.erase(*block_key_[size_t(block)]);
    block_key_[size_t(block)] = nullptr;
    ++cache_evictions_;
  } else {
    return -1;
  }
  refcounts_[size_t(block)] = 1;
  return block;
}

void BlockAllocator::retain(int32_t block) {
  check(block, "retain");
  ++refcounts_[size_t(block)];
}

void BlockAllocator::release(int32_t block) {
  check(block, "release");
  if (--refcounts_[size_t(block)] > 0) return;
  if (block_key_[size_t(block)]) {
    lru_pos_[size_t(block)] = lru_.insert(lru_.end(), block);
  } else {
    free_.push_back(block);
  }
}

int32_t BlockAllocator::refcount(int32_t block) const {
  if (block < 0 || block >= num_blocks()) fail(LLMQ_ERR_INVALID_ARGUMENT, "kv cache: no block {}", block);
  return refcounts_[size_t(block)];
}

int32_t BlockAllocator::lookup(int64_t parent, const std::vector<int32_t>& tokens, int64_t* entry) {
  auto it = cache_.find(Key{parent, tokens});
  if (it == cache_.end()) return -1;
  const int32_t block = it->second.block;
  if (refcounts_[size_t(block)] == 0) lru_.erase(lru_pos_[size_t(block)]);
  ++refcounts_[size_t(block)];
  ++cache_hits_;
  *entry = it->second.id;
  return block;
}

int64_t BlockAllocator::register_block(int32_t block, int64_t parent, std::vector<int32_t> tokens) {
  check(block, "register");
  if (block_key_[size_t(block)])
    fail(LLMQ_ERR_INTERNAL, "kv cache: block {} is registered already", block);
  auto inserted = cache_.emplace(Key{parent, std::move(tokens)}, Entry{block, next_entry_});
  if (!inserted.second) return inserted.first->second.id;  // the same content is cached in another block
  block_key_[size_t(block)] = &inserted.first->first;      // keys of an unordered_map never move
  return next_entry_++;
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
