// Paged KV cache bookkeeping: fixed-size blocks handed out from a free list, with reference counts
// so that blocks can later be shared (prefix caching), and a block table per sequence. The block
// storage itself lives in the backend (KvLayer); this is the host-side allocator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace llmq {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  int32_t num_blocks() const { return int32_t(refcounts_.size()); }
  int32_t num_free() const { return int32_t(free_.size()); }
  // Takes a free block (refcount 1), or returns -1 when none is left.
  int32_t allocate();
  // Adds a reference to an allocated block.
  void retain(int32_t block);
  // Drops a reference; the block returns to the free list at zero.
  void release(int32_t block);
  int32_t refcount(int32_t block) const;

 private:
  void check(int32_t block, const char* what) const;

  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::vector<int32_t> refcounts_;
};

// The blocks of one sequence and how many of its tokens are stored in them.
class SequenceKv {
 public:
  SequenceKv(BlockAllocator& allocator, int32_t block_size) : allocator_(&allocator), block_size_(block_size) {}
  ~SequenceKv() { clear(); }
  SequenceKv(const SequenceKv&) = delete;
  SequenceKv& operator=(const SequenceKv&) = delete;

  // Makes room for `length` tokens in total. Returns false, changing nothing, when the allocator
  // cannot supply the blocks.
  bool reserve(int32_t length);
  // The KV slot of the token at `position` (< reserved length).
  int32_t slot(int32_t position) const { return blocks_[size_t(position / block_size_)] * block_size_ + position % block_size_; }
  const std::vector<int32_t>& blocks() const { return blocks_; }
  int32_t length() const { return length_; }
  void set_length(int32_t length) { length_ = length; }
  // Releases the blocks from index `first` on (undoing a reserve()).
  void release_blocks_from(size_t first);
  // Releases every block.
  void clear();

 private:
  BlockAllocator* allocator_;
  int32_t block_size_;
  std::vector<int32_t> blocks_;
  int32_t length_ = 0;  // tokens whose K/V are in the cache
};

}  // namespace llmq
