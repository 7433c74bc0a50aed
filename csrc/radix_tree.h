// Radix tree of block-aligned token prefixes whose KV blocks live in a BlockAllocator.
//
// A node's key is a run of whole blocks of tokens; children are found by a hash of their first block.
// Every access (match or insert) stamps one root path with a new clock value and splits the node it ends in,
// so each node has a single last-access time and ancestors are never older than descendants.
// Eviction drops the last block of the least-recently-used unlocked leaf, one block at a time, which is
// exactly LRU over cached block prefixes. Handles are slot | generation << 32; a node whose key changes end
// (truncated by eviction) or that dies gets a new generation, so old handles are rejected.
//
// Cost: match/insert O(tokens + depth) with one hash lookup per node; lock/unlock O(depth + log L);
// evict O(k log L) for k blocks, L evictable leaves (an ordered set keyed by last access); reset O(blocks).
#pragma once
#include <cstdint>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_allocator.h"

namespace ettrl {

class RadixTree {
 public:
  using Tokens = std::vector<int64_t>;
  using Blocks = std::vector<int64_t>;

  RadixTree(BlockAllocator& allocator, int64_t block_size);
  ~RadixTree();  // releases the tree's references
  RadixTree(const RadixTree&) = delete;
  RadixTree& operator=(const RadixTree&) = delete;

  // Blocks of the longest cached prefix of `tokens` (whole blocks) and the handle of the node ending there.
  std::pair<Blocks, int64_t> match_prefix(const Tokens& tokens);
  // Caches tokens[:blocks.size() * block_size]; adopts (retains) only blocks of the uncached suffix.
  int64_t insert(const Tokens& tokens, const Blocks& blocks);
  void lock(int64_t handle);
  void unlock(int64_t handle);
  // Evicts LRU unlocked leaf blocks until `num_blocks` were freed or none is evictable; returns blocks freed.
  int64_t evict(int64_t num_blocks);
  void reset();

  int64_t block_size() const { return block_size_; }
  int64_t num_cached_blocks() const { return num_cached_; }
  int64_t num_evictable_blocks() const { return num_evictable_; }
  int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size() - free_slots_.size()); }
  // Throws std::runtime_error describing the first broken invariant.
  void check_integrity() const;

 private:
  struct Node {
    Tokens tokens;  // whole blocks of tokens; empty only at the root
    Blocks blocks;  // one KV block per block_size tokens
    int32_t parent = -1;
    std::unordered_multimap<uint64_t, int32_t> children;  // hash of the child's first block -> slot
    int64_t lock_ref = 0;   // locks taken on this node or any descendant
    int64_t own_locks = 0;  // locks taken on this node's handle
    uint64_t last_access = 0;
    uint32_t generation = 0;
    bool alive = false;
  };
  // Where a walk stopped: `in_node` blocks of `node` matched, `depth` blocks matched in total.
  struct Cursor {
    int32_t node;
    int64_t in_node;
    int64_t depth;
  };

  uint64_t hash_block(const int64_t* tokens) const;
  bool same_block(const int64_t* a, const int64_t* b) const;
  int32_t find_child(int32_t node, const int64_t* first_block) const;
  Cursor walk(const Tokens& tokens, int64_t max_blocks) const;
  int32_t split_at(const Cursor& c);
  int32_t add_child(int32_t parent, const Tokens& tokens, const Blocks& blocks, int64_t from_block);
  void touch_path(int32_t node);
  Blocks path_blocks(int32_t node) const;
  void validate_new_blocks(const Blocks& blocks, int64_t from_block) const;
  bool evict_last_block(int32_t node);  // returns whether the block was freed
  void unlink_child(int32_t parent, int32_t child);

  int32_t new_node();
  void free_node(int32_t slot);
  int64_t handle_of(int32_t slot) const;
  int32_t resolve(int64_t handle, const char* op) const;
  void unlist(int32_t slot);
  void relist(int32_t slot);
  bool is_evictable_leaf(int32_t slot) const;

  BlockAllocator& allocator_;
  int64_t block_size_;
  std::vector<Node> nodes_;  // slot 0 is the root
  std::vector<int32_t> free_slots_;
  std::vector<int32_t> owner_;  // block id -> slot holding it, -1 if not cached
  std::set<std::pair<uint64_t, int32_t>> lru_;  // (last_access, slot) of unlocked non-root leaves
  uint64_t clock_ = 0;
  int64_t num_cached_ = 0;
  int64_t num_evictable_ = 0;
};

}  // namespace ettrl
