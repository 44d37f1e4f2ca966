// Paged KV cache bookkeeping: fixed-size blocks handed out from a free list, with reference counts
// so that blocks can be shared, and a block table per sequence. The block storage itself lives in
// the backend (KvLayer); this is the host-side allocator.
//
// Prefix caching: a full block can be registered under its content, the key being the entry of
// the block before it (0 at the start of a sequence) and its tokens, compared exactly (no hash is
// trusted on its own). A later sequence whose prompt starts with the same tokens finds the blocks
// and takes references instead of recomputing them. A registered block whose last reference goes
// keeps its content on an LRU list; it counts as free and is evicted only when no never-used block
// is left. Registered blocks are full and never written again, so sharing needs no copy-on-write.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace llmq {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  int32_t num_blocks() const { return int32_t(refcounts_.size()); }
  // Blocks that allocate() can hand out: never-used ones plus cached ones nobody references.
  int32_t num_free() const { return int32_t(free_.size() + lru_.size()); }
  // Cached blocks that nobody references (a part of num_free()).
  int32_t num_cached_free() const { return int32_t(lru_.size()); }
  // Takes a free block (refcount 1), evicting the least recently used cached one when no other is
  // left, or returns -1 when none is left.
  int32_t allocate();
  // Adds a reference to an allocated block.
  void retain(int32_t block);
  // Drops a reference; at zero the block becomes free (a cached one joins the LRU list).
  void release(int32_t block);
  int32_t refcount(int32_t block) const;

  // Finds the cached block holding `tokens` after the entry `parent`; on a hit, takes a reference,
  // sets *entry to its entry and returns the block, else returns -1.
  int32_t lookup(int64_t parent, const std::vector<int32_t>& tokens, int64_t* entry);
  // Registers the content of a full, allocated block; returns its entry (the existing one, leaving
  // `block` unregistered, when the same content is cached already).
  int64_t register_block(int32_t block, int64_t parent, std::vector<int32_t> tokens);
  // Cache hits and evictions since creation.
  uint64_t cache_hits() const { return cache_hits_; }
  uint64_t cache_evictions() const { return cache_evictions_; }

 private:
  struct Key {
    int64_t parent = 0;
    std::vector<int32_t> tokens;
    bool operator==(const Key& other) const { return parent == other.parent && tokens == other.tokens; }
  };
  struct KeyHash {
    size_t operator()(const Key& key) const;
  };
  struct Entry {
    int32_t block = -1;
    int64_t id = 0;
  };

  void check(int32_t block, const char* what) const;

  std::vector<int32_t> free_;  // never-used or unregistered blocks: a stack, the last freed reused first
  std::vector<int32_t> refcounts_;
  std::unordered_map<Key, Entry, KeyHash> cache_;
  std::vector<const Key*> block_key_;          // per block: its key in cache_, or null
  std::list<int32_t> lru_;                     // cached blocks with refcount 0, oldest first
  std::vector<std::list<int32_t>::iterator> lru_pos_;
  int64_t next_entry_ = 1;
  uint64_t cache_hits_ = 0, cache_evictions_ = 0;
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
  // Appends a block the caller holds a reference to (from BlockAllocator::lookup); the sequence
  // takes that reference over.
  void adopt(int32_t block) { blocks_.push_back(block); }
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
