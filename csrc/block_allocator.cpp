#include "block_allocator.h"

#include <algorithm>
#include <stdexcept>

namespace ettrl {

BlockAllocator::BlockAllocator(int64_t num_blocks) {
  if (num_blocks <= 0) throw std::invalid_argument("BlockAllocator: num_blocks must be positive, got " + std::to_string(num_blocks));
  ref_counts_.assign(num_blocks, 0);
  reset();
}

void BlockAllocator::reset() {
  std::fill(ref_counts_.begin(), ref_counts_.end(), 0);
  free_list_.clear();
  free_list_.reserve(ref_counts_.size());
  for (int64_t b = num_blocks() - 1; b >= 0; --b) free_list_.push_back(b);  // block 0 handed out first
}

void BlockAllocator::check_id(int64_t block, const char* op) const {
  if (block < 0 || block >= num_blocks())
    throw std::out_of_range(std::string("BlockAllocator.") + op + ": block id " + std::to_string(block) +
                            " is outside the pool [0, " + std::to_string(num_blocks()) + ")");
}

void BlockAllocator::check_in_use(int64_t block, const char* op, bool releasing) const {
  check_id(block, op);
  if (ref_counts_[block] > 0) return;
  if (releasing)
    throw std::runtime_error(std::string("BlockAllocator.") + op + ": double release of block " +
                             std::to_string(block) + " (it is already free)");
  throw std::runtime_error(std::string("BlockAllocator.") + op + ": block " + std::to_string(block) +
                           " is free; allocate it first");
}

std::vector<int64_t> BlockAllocator::allocate(int64_t n) {
  if (n < 0) throw std::invalid_argument("BlockAllocator.allocate: n must be >= 0, got " + std::to_string(n));
  if (n > num_free())
    throw std::runtime_error("BlockAllocator.allocate: out of KV blocks: asked for " + std::to_string(n) + ", " +
                             std::to_string(num_free()) + " of " + std::to_string(num_blocks()) + " free");
  std::vector<int64_t> out(free_list_.rbegin(), free_list_.rbegin() + n);  // pop order
  free_list_.resize(free_list_.size() - n);
  for (int64_t b : out) ref_counts_[b] = 1;
  return out;
}

void BlockAllocator::retain(int64_t block) {
  check_in_use(block, "retain", false);
  ++ref_counts_[block];
}

void BlockAllocator::retain_many(const std::vector<int64_t>& blocks) {
  for (int64_t b : blocks) check_in_use(b, "retain_many", false);
  for (int64_t b : blocks) ++ref_counts_[b];
}

bool BlockAllocator::release(int64_t block) {
  check_in_use(block, "release", true);
  if (--ref_counts_[block] > 0) return false;
  free_list_.push_back(block);
  return true;
}

int64_t BlockAllocator::release_many(const std::vector<int64_t>& blocks) {
  // Decrement first and roll back on error, so a duplicate id past its ref count leaves no trace.
  std::vector<int64_t> freed;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int64_t b = blocks[i];
    if (b < 0 || b >= num_blocks() || ref_counts_[b] == 0) {
      try {
        check_in_use(b, "release_many", true);  // throws the precise error
      } catch (...) {
        for (size_t j = 0; j < i; ++j) ++ref_counts_[blocks[j]];
        throw;
      }
    }
    if (--ref_counts_[b] == 0) freed.push_back(b);
  }
  free_list_.insert(free_list_.end(), freed.begin(), freed.end());
  return static_cast<int64_t>(freed.size());
}

int64_t BlockAllocator::ref_count(int64_t block) const {
  check_id(block, "ref_count");
  return ref_counts_[block];
}

void BlockAllocator::check_integrity() const {
  std::vector<char> in_free(ref_counts_.size(), 0);
  for (int64_t b : free_list_) {
    if (b < 0 || b >= num_blocks()) throw std::runtime_error("integrity: free list holds invalid id " + std::to_string(b));
    if (in_free[b]) throw std::runtime_error("integrity: block " + std::to_string(b) + " is on the free list twice");
    if (ref_counts_[b] != 0)
      throw std::runtime_error("integrity: block " + std::to_string(b) + " is free but has ref count " +
                               std::to_string(ref_counts_[b]));
    in_free[b] = 1;
  }
  int64_t referenced = 0;
  for (int64_t b = 0; b < num_blocks(); ++b) {
    if (ref_counts_[b] < 0) throw std::runtime_error("integrity: negative ref count on block " + std::to_string(b));
    if (ref_counts_[b] > 0) ++referenced;
    else if (!in_free[b]) throw std::runtime_error("integrity: block " + std::to_string(b) + " leaked (ref 0, not free)");
  }
  if (num_free() + referenced != num_blocks())
    throw std::runtime_error("integrity: free " + std::to_string(num_free()) + " + referenced " +
                             std::to_string(referenced) + " != total " + std::to_string(num_blocks()));
}

}  // namespace ettrl
