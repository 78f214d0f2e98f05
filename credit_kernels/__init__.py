"""Fused kernels for CREDIT teacher scoring and updates (see the README and docs/kernels.md).

The package stands alone: it imports nothing from `credit` (tests/test_standalone.py).
"""

from credit_kernels._ext import HAS_EXT, HAS_EXT_CUDA
from credit_kernels.credit_reward import CreditReward, credit_reward
from credit_kernels.linear_gather import GatherOutput, linear_gather
from credit_kernels.linear_logprob import linear_logprob
from credit_kernels.linear_topk import TopKOutput, linear_topk
from credit_kernels.prefix_trie import PrefixTrie, build_prefix_trie, gather_sequence_rows, trie_stats
from credit_kernels.reference import credit_reward_ref, linear_gather_ref, linear_logprob_ref, linear_topk_ref
from credit_kernels.tree_attention import (
    TreeAttentionOutput,
    TreeAttentionPlan,
    tree_attention,
    tree_attention_plan,
    tree_attention_ref,
)

__all__ = [
    "HAS_EXT",
    "HAS_EXT_CUDA",
    "CreditReward",
    "GatherOutput",
    "PrefixTrie",
    "TopKOutput",
    "TreeAttentionOutput",
    "TreeAttentionPlan",
    "build_prefix_trie",
    "credit_reward",
    "credit_reward_ref",
    "gather_sequence_rows",
    "linear_gather",
    "linear_gather_ref",
    "linear_logprob",
    "linear_logprob_ref",
    "linear_topk",
    "linear_topk_ref",
    "tree_attention",
    "tree_attention_plan",
    "tree_attention_ref",
    "trie_stats",
]
