// Fixed pool of KV-cache block ids with reference counts and a free list.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ettrl {

class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t num_blocks);

  // Takes `n` free blocks, each with reference count 1, in the order n calls of allocate(1) would.
  // Throws when fewer than `n` are free.
  std::vector<int64_t> allocate(int64_t n);
  // Adds one reference to a block that is in use.
  void retain(int64_t block);
  // Bulk ops are all-or-nothing: on a bad id nothing changes. Same result as the single ops in order.
  void retain_many(const std::vector<int64_t>& blocks);
  // Drops one reference; the block returns to the free list at zero. Returns true if it was freed.
  bool release(int64_t block);
  // Returns how many blocks were freed.
  int64_t release_many(const std::vector<int64_t>& blocks);
  // Returns every block to the free list.
  void reset();

  int64_t num_blocks() const { return static_cast<int64_t>(ref_counts_.size()); }
  int64_t num_free() const { return static_cast<int64_t>(free_list_.size()); }
  int64_t num_used() const { return num_blocks() - num_free(); }
  int64_t ref_count(int64_t block) const;
  bool is_in_use(int64_t block) const { return block >= 0 && block < num_blocks() && ref_counts_[block] > 0; }
  // Throws std::runtime_error describing the first broken invariant (free + referenced == total, ...).
  void check_integrity() const;

 private:
  void check_id(int64_t block, const char* op) const;
  void check_in_use(int64_t block, const char* op, bool releasing) const;
  std::vector<int64_t> ref_counts_;
  std::vector<int64_t> free_list_;  // stack: the most recently freed block is reused first
};

}  // namespace ettrl
