#include "radix_tree.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace ettrl {

namespace {
constexpr int32_t kRoot = 0;

uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

std::runtime_error broken(const std::string& what) { return std::runtime_error("RadixTree integrity: " + what); }
}  // namespace

RadixTree::RadixTree(BlockAllocator& allocator, int64_t block_size) : allocator_(allocator), block_size_(block_size) {
  if (block_size <= 0) throw std::invalid_argument("RadixTree: block_size must be positive, got " + std::to_string(block_size));
  owner_.assign(allocator.num_blocks(), -1);
  new_node();  // the root
}

RadixTree::~RadixTree() {
  for (int64_t b = 0; b < static_cast<int64_t>(owner_.size()); ++b)
    if (owner_[b] >= 0 && allocator_.is_in_use(b)) allocator_.release(b);
}

// ---- lookup ---------------------------------------------------------------------------------------------

uint64_t RadixTree::hash_block(const int64_t* tokens) const {
  uint64_t h = 0x9e3779b97f4a7c15ULL;
  for (int64_t i = 0; i < block_size_; ++i) h = mix64(h ^ static_cast<uint64_t>(tokens[i]));
  return h;
}

bool RadixTree::same_block(const int64_t* a, const int64_t* b) const { return std::equal(a, a + block_size_, b); }

int32_t RadixTree::find_child(int32_t node, const int64_t* first_block) const {
  auto [lo, hi] = nodes_[node].children.equal_range(hash_block(first_block));
  for (auto it = lo; it != hi; ++it)
    if (same_block(nodes_[it->second].tokens.data(), first_block)) return it->second;
  return -1;
}

RadixTree::Cursor RadixTree::walk(const Tokens& tokens, int64_t max_blocks) const {
  Cursor c{kRoot, 0, 0};
  while (c.depth < max_blocks) {
    const int64_t* query = tokens.data() + c.depth * block_size_;
    const Node& node = nodes_[c.node];
    if (c.in_node < static_cast<int64_t>(node.blocks.size())) {
      if (!same_block(node.tokens.data() + c.in_node * block_size_, query)) break;
      ++c.in_node;
    } else {
      const int32_t child = find_child(c.node, query);
      if (child < 0) break;
      c.node = child;
      c.in_node = 1;
    }
    ++c.depth;
  }
  return c;
}

RadixTree::Blocks RadixTree::path_blocks(int32_t node) const {
  std::vector<int32_t> path;
  for (int32_t n = node; n != kRoot; n = nodes_[n].parent) path.push_back(n);
  Blocks out;
  for (auto it = path.rbegin(); it != path.rend(); ++it) out.insert(out.end(), nodes_[*it].blocks.begin(), nodes_[*it].blocks.end());
  return out;
}

// ---- structure ------------------------------------------------------------------------------------------

// Returns the node that ends exactly at the cursor, splitting the cursor's node in two when the cursor is inside
// it. The lower half keeps its slot and handle (its key still ends where it did); the upper half is new.
int32_t RadixTree::split_at(const Cursor& c) {
  const int64_t k = c.in_node;
  if (c.node == kRoot || k == static_cast<int64_t>(nodes_[c.node].blocks.size())) return c.node;
  const int32_t lower = c.node;
  const int32_t upper = new_node();  // may reallocate nodes_: index, don't hold references across it
  Node& lo = nodes_[lower];
  Node& up = nodes_[upper];
  const int64_t cut = k * block_size_;
  up.tokens.assign(lo.tokens.begin(), lo.tokens.begin() + cut);
  up.blocks.assign(lo.blocks.begin(), lo.blocks.begin() + k);
  lo.tokens.erase(lo.tokens.begin(), lo.tokens.begin() + cut);
  lo.blocks.erase(lo.blocks.begin(), lo.blocks.begin() + k);
  up.parent = lo.parent;
  up.lock_ref = lo.lock_ref;
  up.last_access = lo.last_access;
  for (int64_t b : up.blocks) owner_[b] = upper;
  auto [first, last] = nodes_[up.parent].children.equal_range(hash_block(up.tokens.data()));
  for (auto it = first; it != last; ++it)
    if (it->second == lower) it->second = upper;
  lo.parent = upper;
  up.children.emplace(hash_block(lo.tokens.data()), lower);
  return upper;
}

int32_t RadixTree::add_child(int32_t parent, const Tokens& tokens, const Blocks& blocks, int64_t from_block) {
  const int32_t child = new_node();
  Node& node = nodes_[child];
  node.tokens.assign(tokens.begin() + from_block * block_size_, tokens.begin() + blocks.size() * block_size_);
  node.blocks.assign(blocks.begin() + from_block, blocks.end());
  node.parent = parent;
  for (int64_t b : node.blocks) {
    allocator_.retain(b);
    owner_[b] = child;
  }
  num_cached_ += node.blocks.size();
  num_evictable_ += node.blocks.size();
  unlist(parent);  // no longer a leaf
  nodes_[parent].children.emplace(hash_block(node.tokens.data()), child);
  return child;
}

void RadixTree::touch_path(int32_t node) {
  const uint64_t now = ++clock_;
  unlist(node);  // the only node on the path that can be a listed leaf
  for (int32_t n = node; n != kRoot; n = nodes_[n].parent) nodes_[n].last_access = now;
  relist(node);
}

void RadixTree::unlink_child(int32_t parent, int32_t child) {
  auto [first, last] = nodes_[parent].children.equal_range(hash_block(nodes_[child].tokens.data()));
  for (auto it = first; it != last; ++it)
    if (it->second == child) {
      nodes_[parent].children.erase(it);
      return;
    }
  throw broken("child " + std::to_string(child) + " missing from its parent");
}

// ---- public API -----------------------------------------------------------------------------------------

std::pair<RadixTree::Blocks, int64_t> RadixTree::match_prefix(const Tokens& tokens) {
  const Cursor c = walk(tokens, static_cast<int64_t>(tokens.size()) / block_size_);
  const int32_t end = split_at(c);
  if (end != kRoot) touch_path(end);
  return {path_blocks(end), handle_of(end)};
}

void RadixTree::validate_new_blocks(const Blocks& blocks, int64_t from_block) const {
  Blocks fresh(blocks.begin() + from_block, blocks.end());
  for (int64_t b : fresh) {
    if (!allocator_.is_in_use(b))
      throw std::invalid_argument("RadixTree.insert: block " + std::to_string(b) +
                                  " is not an allocated block; insert only blocks you hold a reference to");
    if (owner_[b] >= 0)
      throw std::invalid_argument("RadixTree.insert: block " + std::to_string(b) +
                                  " is already cached under a different prefix; a block holds one prefix's KV");
  }
  std::sort(fresh.begin(), fresh.end());
  auto dup = std::adjacent_find(fresh.begin(), fresh.end());
  if (dup != fresh.end())
    throw std::invalid_argument("RadixTree.insert: block " + std::to_string(*dup) + " appears twice in `blocks`");
}

int64_t RadixTree::insert(const Tokens& tokens, const Blocks& blocks) {
  const int64_t n = static_cast<int64_t>(blocks.size());
  if (static_cast<int64_t>(tokens.size()) < n * block_size_)
    throw std::invalid_argument("RadixTree.insert: " + std::to_string(n) + " blocks need at least " +
                                std::to_string(n * block_size_) + " tokens, got " + std::to_string(tokens.size()));
  const Cursor c = walk(tokens, n);
  validate_new_blocks(blocks, c.depth);  // before any change: a bad insert leaves the tree untouched
  int32_t end = split_at(c);
  if (c.depth < n) end = add_child(end, tokens, blocks, c.depth);
  if (end != kRoot) touch_path(end);
  return handle_of(end);
}

void RadixTree::lock(int64_t handle) {
  const int32_t slot = resolve(handle, "lock");
  ++nodes_[slot].own_locks;
  for (int32_t n = slot; n >= 0; n = nodes_[n].parent) {
    if (nodes_[n].lock_ref++ == 0 && n != kRoot) {
      unlist(n);
      num_evictable_ -= nodes_[n].blocks.size();
    }
  }
}

void RadixTree::unlock(int64_t handle) {
  const int32_t slot = resolve(handle, "unlock");
  if (nodes_[slot].own_locks == 0)
    throw std::runtime_error("RadixTree.unlock: node " + std::to_string(handle) +
                             " is not locked (unlock without a matching lock)");
  --nodes_[slot].own_locks;
  for (int32_t n = slot; n >= 0; n = nodes_[n].parent) {
    if (--nodes_[n].lock_ref == 0 && n != kRoot) {
      num_evictable_ += nodes_[n].blocks.size();
      relist(n);
    }
  }
}

bool RadixTree::evict_last_block(int32_t slot) {
  unlist(slot);
  Node& node = nodes_[slot];
  const int64_t block = node.blocks.back();
  owner_[block] = -1;
  --num_cached_;
  --num_evictable_;
  if (node.blocks.size() == 1) {
    const int32_t parent = node.parent;
    unlink_child(parent, slot);
    free_node(slot);
    relist(parent);  // may have become a leaf
  } else {
    node.blocks.pop_back();
    node.tokens.resize(node.tokens.size() - block_size_);
    node.generation = (node.generation + 1) & 0x7fffffff;  // its key now ends elsewhere: old handles go stale
    relist(slot);
  }
  return allocator_.release(block);
}

// O(k log L) for k evicted blocks and L evictable leaves.
int64_t RadixTree::evict(int64_t num_blocks) {
  if (num_blocks < 0) throw std::invalid_argument("RadixTree.evict: num_blocks must be >= 0, got " + std::to_string(num_blocks));
  int64_t freed = 0;
  while (freed < num_blocks && !lru_.empty()) freed += evict_last_block(lru_.begin()->second);
  return freed;
}

void RadixTree::reset() {
  if (nodes_[kRoot].lock_ref > 0)
    throw std::runtime_error("RadixTree.reset: " + std::to_string(nodes_[kRoot].lock_ref) +
                             " locks are still held; unlock every node before reset");
  for (int64_t b = 0; b < static_cast<int64_t>(owner_.size()); ++b) {  // ascending block ids: a fixed release order
    if (owner_[b] < 0) continue;
    owner_[b] = -1;
    allocator_.release(b);
  }
  for (int32_t slot = 1; slot < static_cast<int32_t>(nodes_.size()); ++slot)
    if (nodes_[slot].alive) free_node(slot);
  nodes_[kRoot].children.clear();
  lru_.clear();
  num_cached_ = num_evictable_ = 0;
}

// ---- slots, handles, LRU list ---------------------------------------------------------------------------

int32_t RadixTree::new_node() {
  int32_t slot;
  if (free_slots_.empty()) {
    slot = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
  } else {
    slot = free_slots_.back();
    free_slots_.pop_back();
  }
  nodes_[slot].alive = true;
  return slot;
}

// The caller has already unlisted and unlinked the node and dropped its blocks.
void RadixTree::free_node(int32_t slot) {
  Node& node = nodes_[slot];
  const uint32_t generation = (node.generation + 1) & 0x7fffffff;
  node = Node();
  node.generation = generation;
  free_slots_.push_back(slot);
}

int64_t RadixTree::handle_of(int32_t slot) const {
  return static_cast<int64_t>(nodes_[slot].generation) << 32 | static_cast<int64_t>(slot);
}

int32_t RadixTree::resolve(int64_t handle, const char* op) const {
  const int64_t slot = handle & 0xffffffffLL;
  const int64_t generation = handle >> 32;
  if (handle < 0 || slot >= static_cast<int64_t>(nodes_.size()) || !nodes_[slot].alive ||
      nodes_[slot].generation != generation)
    throw std::invalid_argument(std::string("RadixTree.") + op + ": stale or unknown node handle " +
                                std::to_string(handle) +
                                " (the node was evicted, shortened by eviction, or reset); match the prefix again");
  return static_cast<int32_t>(slot);
}

bool RadixTree::is_evictable_leaf(int32_t slot) const {
  const Node& node = nodes_[slot];
  return slot != kRoot && node.alive && node.children.empty() && node.lock_ref == 0;
}

void RadixTree::unlist(int32_t slot) { lru_.erase({nodes_[slot].last_access, slot}); }

void RadixTree::relist(int32_t slot) {
  if (is_evictable_leaf(slot)) lru_.emplace(nodes_[slot].last_access, slot);
}

// ---- integrity ------------------------------------------------------------------------------------------

void RadixTree::check_integrity() const {
  const Node& root = nodes_[kRoot];
  if (!root.alive || !root.tokens.empty() || !root.blocks.empty() || root.parent != -1) throw broken("bad root");
  int64_t cached = 0, evictable = 0, live = 0, listed = 0;
  std::vector<int32_t> stack{kRoot};
  while (!stack.empty()) {
    const int32_t slot = stack.back();
    stack.pop_back();
    const Node& node = nodes_[slot];
    const std::string name = "node " + std::to_string(slot);
    ++live;
    if (!node.alive) throw broken(name + " is reachable but dead");
    if (node.tokens.size() != node.blocks.size() * block_size_) throw broken(name + " has tokens not matching its blocks");
    if (slot != kRoot && node.blocks.empty()) throw broken(name + " has no blocks");
    int64_t child_locks = 0;
    for (const auto& [hash, child] : node.children) {
      const Node& c = nodes_[child];
      if (c.parent != slot) throw broken("child " + std::to_string(child) + " of " + name + " points to another parent");
      if (c.blocks.empty() || hash != hash_block(c.tokens.data())) throw broken("child key hash wrong under " + name);
      if (slot != kRoot && c.last_access > node.last_access) throw broken("child newer than its parent at " + name);
      child_locks += c.lock_ref;
      stack.push_back(child);
    }
    if (node.children.size() > 1) {
      for (const auto& [hash, child] : node.children)
        if (find_child(slot, nodes_[child].tokens.data()) != child) throw broken("two children of " + name + " share a first block");
    }
    if (node.own_locks < 0 || node.lock_ref != node.own_locks + child_locks) throw broken(name + " lock count is inconsistent");
    for (int64_t b : node.blocks) {
      if (b < 0 || b >= static_cast<int64_t>(owner_.size()) || owner_[b] != slot) throw broken(name + " holds block " + std::to_string(b) + " it does not own");
      if (!allocator_.is_in_use(b)) throw broken(name + " holds block " + std::to_string(b) + " which the allocator has freed");
    }
    cached += node.blocks.size();
    if (slot != kRoot && node.lock_ref == 0) evictable += node.blocks.size();
    const bool in_lru = lru_.count({node.last_access, slot}) > 0;
    if (in_lru != is_evictable_leaf(slot)) throw broken(name + " LRU membership is wrong");
    listed += in_lru;
  }
  if (live != num_nodes()) throw broken(std::to_string(num_nodes() - live) + " live nodes are unreachable");
  if (listed != static_cast<int64_t>(lru_.size())) throw broken("LRU list holds dead or stale entries");
  if (cached != num_cached_) throw broken("num_cached_blocks counter is off");
  if (evictable != num_evictable_) throw broken("num_evictable_blocks counter is off");
  int64_t owned = 0;
  for (int32_t o : owner_) owned += o >= 0;
  if (owned != cached) throw broken("block owner map disagrees with the nodes");
}

}  // namespace ettrl

// ---- Python bindings ------------------------------------------------------------------------------------

namespace py = pybind11;

namespace {
// Token lists are long: read them straight from the list's items, much faster than pybind's generic caster.
std::vector<int64_t> int_list(py::handle obj, const char* name) {
  const std::string message = std::string(name) + " must be a list of ints";
  PyObject* seq = PySequence_Fast(obj.ptr(), message.c_str());
  if (seq == nullptr) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<int64_t> out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = PyLong_AsLongLong(items[i]);
    if (out[i] == -1 && PyErr_Occurred()) {
      Py_DECREF(seq);
      throw py::error_already_set();
    }
  }
  Py_DECREF(seq);
  return out;
}
}  // namespace

void bind_radix_tree(py::module_& m) {
  using ettrl::BlockAllocator;
  using ettrl::RadixTree;
  py::class_<RadixTree>(m, "RadixTree")
      .def(py::init<BlockAllocator&, int64_t>(), py::arg("allocator"), py::arg("block_size"), py::keep_alive<1, 2>())
      .def(
          "match_prefix", [](RadixTree& t, py::handle tokens) { return t.match_prefix(int_list(tokens, "tokens")); },
          py::arg("tokens"))
      .def(
          "insert",
          [](RadixTree& t, py::handle tokens, py::handle blocks) {
            return t.insert(int_list(tokens, "tokens"), int_list(blocks, "blocks"));
          },
          py::arg("tokens"), py::arg("blocks"))
      .def("lock", &RadixTree::lock, py::arg("node"))
      .def("unlock", &RadixTree::unlock, py::arg("node"))
      .def("evict", &RadixTree::evict, py::arg("num_blocks"))
      .def("reset", &RadixTree::reset)
      .def("check_integrity", &RadixTree::check_integrity)
      .def_property_readonly("block_size", &RadixTree::block_size)
      .def_property_readonly("num_cached_blocks", &RadixTree::num_cached_blocks)
      .def_property_readonly("num_evictable_blocks", &RadixTree::num_evictable_blocks)
      .def_property_readonly("num_nodes", &RadixTree::num_nodes);
}
