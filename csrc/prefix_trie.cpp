// Path-compressed prefix trie over a batch of token sequences, laid out for packed tree attention.
//
// The output format (nine flat tensors: packed unique tokens in DFS preorder, their positions, nodes,
// visible_end, per-node ranges and parents, and each sequence's packed rows) is documented in
// credit_kernels/prefix_trie.py, which also holds the Python twin `_build_prefix_trie_python`. Both run
// the same algorithm and must return identical tensors.
//
// Algorithm: insert the sequences one by one into a radix tree whose nodes reference their tokens in
// the input buffer (no copies), then lay the nodes out in preorder with children ordered by first
// appearance. Insertion touches each input token once (a run comparison or nothing), and a child is
// found with one hash probe per node on the path, so the build is O(total tokens + path nodes). Two
// rules keep the tree a pure function of the input list:
//   * a node is split only where two sequences diverge, never where one ends (its rows are a prefix of
//     the run);
//   * a sequence that runs past the end of a LEAF extends that leaf instead of hanging a one-child
//     node under it, so [1 2] then [1 2 3] gives the same single node as [1 2 3] then [1 2].
// Hence every non-root node has >= 2 children or none, i.e. nodes are the maximal unbranched runs.
// Siblings are ordered by `creator`, the first sequence that created a node with that first token;
// splits let the head keep it and give the tail the old value, which is <= every later sibling's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace credit {
namespace {


struct Node {
  int64_t src;      // offset in flat_tokens of the node's first token (in any sequence holding the run)
  int64_t len;      // tokens in the run
  int64_t depth;    // position of the first token in its sequences
  int32_t parent;   // build id; 0 is the virtual root
  int32_t creator;  // first sequence that reached this node: orders siblings ("first appearance")
  bool leaf;
};

// Open-addressing map (parent build id, first token) -> child build id. Keys are never erased, only
// re-pointed (a split hands the parent's edge to the new head), so linear probing stays simple.
class ChildMap {
 public:
  explicit ChildMap(int64_t max_entries) {
    int64_t cap = 16;
    while (cap < 2 * max_entries) cap <<= 1;  // load factor <= 1/2
    mask_ = cap - 1;
    parent_.assign(cap, -1);
    token_.resize(cap);
    child_.resize(cap);
  }

  int32_t find(int32_t parent, int64_t token) const {
    for (int64_t i = slot(parent, token);; i = (i + 1) & mask_) {
      if (parent_[i] == -1) return -1;
      if (parent_[i] == parent && token_[i] == token) return child_[i];
    }
  }

  void set(int32_t parent, int64_t token, int32_t child) {
    for (int64_t i = slot(parent, token);; i = (i + 1) & mask_) {
      if (parent_[i] == -1 || (parent_[i] == parent && token_[i] == token)) {
        parent_[i] = parent;
        token_[i] = token;
        child_[i] = child;
        return;
      }
    }
  }

 private:
  int64_t slot(int32_t parent, int64_t token) const {
    // splitmix64-style finaliser: token ids are small and dense, spread them over the table
    uint64_t h = static_cast<uint64_t>(token) * 0x9E3779B97F4A7C15ull;
    h ^= static_cast<uint64_t>(parent) + 0x632BE59BD9B4E019ull;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    return static_cast<int64_t>(h & static_cast<uint64_t>(mask_));
  }

  int64_t mask_;
  std::vector<int32_t> parent_;
  std::vector<int64_t> token_;
  std::vector<int32_t> child_;
};

// Length of the common prefix of a[0:n] and b[0:n]. memcmp over blocks first: shared runs are long
// (thousands of tokens of the same prompt), mismatches rare.
inline int64_t common_prefix(const int64_t* a, const int64_t* b, int64_t n) {
  constexpr int64_t kBlock = 32;
  int64_t i = 0;
  while (i + kBlock <= n && std::memcmp(a + i, b + i, kBlock * sizeof(int64_t)) == 0) i += kBlock;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

void check_inputs(const at::Tensor& flat_tokens, const at::Tensor& seq_offsets) {
  constexpr const char* op = "build_prefix_trie";
  CHECK_CPU(op, flat_tokens);
  CHECK_CPU(op, seq_offsets);
  CHECK_DIM(op, flat_tokens, 1);
  CHECK_DIM(op, seq_offsets, 1);
  CHECK_INT64(op, flat_tokens);
  CHECK_INT64(op, seq_offsets);
  TORCH_CHECK(seq_offsets.numel() >= 1, "seq_offsets must have S+1 >= 1 entries, got 0");
}

std::vector<at::Tensor> build_prefix_trie_cpu(const at::Tensor& flat_tokens, const at::Tensor& seq_offsets) {
  check_inputs(flat_tokens, seq_offsets);
  const at::Tensor flat_c = flat_tokens.contiguous();
  const at::Tensor off_c = seq_offsets.contiguous();
  const int64_t* tok = flat_c.data_ptr<int64_t>();
  const int64_t* off = off_c.data_ptr<int64_t>();
  const int64_t num_seqs = off_c.numel() - 1;
  const int64_t total = flat_c.numel();

  // 0. Validate: offsets a CSR over flat_tokens, ids non-negative (the Python entry point already
  // checked both and names the sequence; these guard direct calls of the op).
  TORCH_CHECK(off[0] == 0 && off[num_seqs] == total, "seq_offsets must start at 0 and end at flat_tokens.numel() = ",
              total, "; got ", off[0], " and ", off[num_seqs]);
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(off[s] <= off[s + 1], "seq_offsets must be non-decreasing; got seq_offsets[", s, "] = ", off[s],
                " > seq_offsets[", s + 1, "] = ", off[s + 1]);
  }
  TORCH_CHECK(num_seqs < std::numeric_limits<int32_t>::max() / 2, "at most 2^30 sequences, got ", num_seqs);
  const int64_t negatives = at::parallel_reduce(
      0, total, int64_t(1) << 16, int64_t(0),
      [&](int64_t b, int64_t e, int64_t acc) {
        for (int64_t i = b; i < e; ++i) acc += tok[i] < 0;
        return acc;
      },
      std::plus<int64_t>());
  TORCH_CHECK(negatives == 0, "flat_tokens must be non-negative token ids; found ", negatives, " negative");

  // 1. Insert every sequence into the radix tree (build ids; 0 = virtual root). Each sequence adds at
  // most two nodes (a split head and a new leaf).
  std::vector<Node> nodes;
  nodes.reserve(2 * num_seqs + 1);
  nodes.push_back(Node{0, 0, 0, -1, -1, false});
  ChildMap children(2 * num_seqs + 1);
  auto add_node = [&](int64_t src, int64_t len, int64_t depth, int32_t parent, int32_t creator, bool leaf) {
    nodes.push_back(Node{src, len, depth, parent, creator, leaf});
    return static_cast<int32_t>(nodes.size() - 1);
  };
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t base = off[s], length = off[s + 1] - off[s];
    int32_t cur = 0;
    int64_t pos = 0;
    while (pos < length) {
      const int64_t first = tok[base + pos];
      const int32_t c = children.find(cur, first);
      if (c < 0) {  // a new branch: the rest of the sequence is one leaf
        const int32_t leaf = add_node(base + pos, length - pos, pos, cur, static_cast<int32_t>(s), true);
        children.set(cur, first, leaf);
        nodes[cur].leaf = false;
        break;
      }
      const int64_t run = std::min(nodes[c].len, length - pos);
      const int64_t l = common_prefix(tok + nodes[c].src, tok + base + pos, run);
      if (l < run) {  // diverges inside the run: split it into head [0, l) and tail [l, len)
        const Node old = nodes[c];
        const int32_t head = add_node(old.src, l, old.depth, cur, old.creator, false);
        children.set(cur, first, head);
        nodes[c].src += l;
        nodes[c].len -= l;
        nodes[c].depth += l;
        nodes[c].parent = head;
        children.set(head, tok[nodes[c].src], c);
        const int32_t leaf = add_node(base + pos + l, length - pos - l, pos + l, head, static_cast<int32_t>(s), true);
        children.set(head, tok[base + pos + l], leaf);
        break;
      }
      if (l < nodes[c].len || pos + l == length) break;  // ends inside or at the end of the run: no split
      if (nodes[c].leaf) {  // runs past a leaf: extend it (its run now lives in this sequence's tokens)
        nodes[c].src = base + pos;
        nodes[c].len = length - pos;
        break;
      }
      cur = c;
      pos += l;
    }
  }
  const int64_t num_nodes = static_cast<int64_t>(nodes.size()) - 1;

  // 2. Children lists: sort by (parent, creator), then CSR by parent.
  std::vector<int32_t> order(num_nodes);
  for (int64_t i = 0; i < num_nodes; ++i) order[i] = static_cast<int32_t>(i + 1);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return nodes[a].parent != nodes[b].parent ? nodes[a].parent < nodes[b].parent
                                              : nodes[a].creator < nodes[b].creator;
  });
  std::vector<int64_t> child_ptr(num_nodes + 2, 0);
  for (int64_t i = 1; i <= num_nodes; ++i) ++child_ptr[nodes[i].parent + 1];
  for (int64_t i = 0; i <= num_nodes; ++i) child_ptr[i + 1] += child_ptr[i];

  // 3. Preorder: node ids and packed row ranges.
  std::vector<int32_t> preorder;  // preorder index -> build id
  preorder.reserve(num_nodes);
  std::vector<int32_t> new_id(num_nodes + 1, -1);
  std::vector<int64_t> row_start(num_nodes + 1, 0);
  std::vector<int32_t> stack;
  for (int64_t i = child_ptr[1] - 1; i >= child_ptr[0]; --i) stack.push_back(order[i]);
  int64_t rows = 0;
  while (!stack.empty()) {
    const int32_t b = stack.back();
    stack.pop_back();
    new_id[b] = static_cast<int32_t>(preorder.size());
    preorder.push_back(b);
    row_start[b] = rows;
    rows += nodes[b].len;
    for (int64_t i = child_ptr[b + 1] - 1; i >= child_ptr[b]; --i) stack.push_back(order[i]);
  }
  const int64_t num_unique = rows;
  TORCH_CHECK(num_unique < std::numeric_limits<int32_t>::max(),
              "the trie has ", num_unique, " unique tokens; int32 row indices allow at most 2^31 - 1");

  // 4. Subtree ends: reverse preorder visits children before their parent.
  std::vector<int64_t> subtree_end(num_nodes + 1, 0);
  for (int64_t k = num_nodes - 1; k >= 0; --k) {
    const int32_t b = preorder[k];
    subtree_end[b] = std::max(subtree_end[b], row_start[b] + nodes[b].len);
    const int32_t p = nodes[b].parent;
    if (p > 0) subtree_end[p] = std::max(subtree_end[p], subtree_end[b]);
  }

  // 5. Outputs.
  const auto i64 = flat_c.options();
  const auto i32 = flat_c.options().dtype(at::kInt);
  at::Tensor tokens = at::empty({num_unique}, i64);
  at::Tensor positions = at::empty({num_unique}, i64);
  at::Tensor token_node = at::empty({num_unique}, i32);
  at::Tensor visible_end = at::empty({num_unique}, i32);
  at::Tensor node_start = at::empty({num_nodes}, i32);
  at::Tensor node_end = at::empty({num_nodes}, i32);
  at::Tensor node_parent = at::empty({num_nodes}, i32);
  at::Tensor seq_ptr = off_c.clone();  // one row per input position: the rows' CSR is the input's
  at::Tensor seq_rows = at::empty({total}, i64);
  int64_t* tokens_p = tokens.data_ptr<int64_t>();
  int64_t* positions_p = positions.data_ptr<int64_t>();
  int32_t* token_node_p = token_node.data_ptr<int32_t>();
  int32_t* visible_end_p = visible_end.data_ptr<int32_t>();
  int32_t* node_start_p = node_start.data_ptr<int32_t>();
  int32_t* node_end_p = node_end.data_ptr<int32_t>();
  int32_t* node_parent_p = node_parent.data_ptr<int32_t>();
  int64_t* seq_rows_p = seq_rows.data_ptr<int64_t>();

  at::parallel_for(0, num_nodes, 64, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      const int32_t b = preorder[k];
      const Node& n = nodes[b];
      const int64_t r0 = row_start[b];
      node_start_p[k] = static_cast<int32_t>(r0);
      node_end_p[k] = static_cast<int32_t>(r0 + n.len);
      node_parent_p[k] = n.parent == 0 ? -1 : new_id[n.parent];
      const int32_t vis = static_cast<int32_t>(subtree_end[b]);
      std::memcpy(tokens_p + r0, tok + n.src, n.len * sizeof(int64_t));
      for (int64_t j = 0; j < n.len; ++j) {
        positions_p[r0 + j] = n.depth + j;
        token_node_p[r0 + j] = static_cast<int32_t>(k);
        visible_end_p[r0 + j] = vis;
      }
    }
  });

  // 6. Each sequence's rows: walk it down the final tree (read-only, so in parallel).
  at::parallel_for(0, num_seqs, 16, [&](int64_t sb, int64_t se) {
    for (int64_t s = sb; s < se; ++s) {
      const int64_t base = off[s], length = off[s + 1] - off[s];
      int32_t cur = 0;
      int64_t pos = 0;
      while (pos < length) {
        const int32_t c = children.find(cur, tok[base + pos]);
        TORCH_CHECK(c >= 0, "prefix trie: internal error, sequence ", s, " lost at position ", pos);
        const int64_t n = std::min(nodes[c].len, length - pos);
        const int64_t r0 = row_start[c];
        int64_t* out = seq_rows_p + base + pos;
        for (int64_t j = 0; j < n; ++j) out[j] = r0 + j;
        pos += n;
        cur = c;
      }
    }
  });

  return {tokens, positions, token_node, visible_end, node_start, node_end, node_parent, seq_ptr, seq_rows};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(credit_C, m) {
  // Returns [tokens, positions, token_node, visible_end, node_start, node_end, node_parent, seq_ptr,
  // seq_rows]: the fields of credit_kernels.prefix_trie.PrefixTrie, in order.
  m.def("build_prefix_trie(Tensor flat_tokens, Tensor seq_offsets) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(credit_C, CPU, m) { m.impl("build_prefix_trie", &build_prefix_trie_cpu); }

}  // namespace credit
