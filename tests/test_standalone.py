"""credit_kernels stands alone: importing it and calling every op never loads the `credit` package (issue 10, 2)."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import credit_kernels

PACKAGE = pathlib.Path(credit_kernels.__file__).parent

# Every public op, each once on tiny CPU tensors, with the default backend; then the module table is checked.
SCRIPT = textwrap.dedent(
    """
    import sys

    import torch

    import credit_kernels as ck

    h, w = torch.randn(5, 8), torch.randn(40, 8)
    t = torch.randint(0, 40, (5,))
    ck.linear_logprob(h, w, t, return_entropy=True, return_lse=True)
    ck.linear_logprob_ref(h, w, t)
    top = ck.linear_topk(h, w, 3)
    ck.linear_topk_ref(h, w, 3)
    ck.linear_gather(h, w, top.ids)
    ck.linear_gather_ref(h, w, top.ids)
    a, s = -torch.rand(2, 6), -torch.rand(2, 6)
    b, m = -torch.rand(3, 2, 6), torch.ones(2, 6, dtype=torch.bool)
    ck.credit_reward(a, b, s, m)
    ck.credit_reward(a, b, s, m, backend="torch")
    ck.credit_reward_ref(a, b, s, m)
    trie = ck.build_prefix_trie([[1, 2, 3], [1, 2, 4], []])
    ck.trie_stats(trie)
    ck.gather_sequence_rows(trie, 1)
    q, k = torch.randn(trie.num_unique, 2, 16), torch.randn(trie.num_unique, 1, 16)
    ck.tree_attention(q, k, k, trie)
    ck.tree_attention(q, k, k, ck.tree_attention_plan(trie), backend="torch")
    ck.tree_attention_ref(q, k, k, trie.visible_end)
    loaded = sorted(name for name in sys.modules if name == "credit" or name.startswith("credit."))
    print("LOADED", loaded)
    sys.exit(1 if loaded else 0)
    """
)


def test_import_and_every_op_leave_credit_unloaded():
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"credit modules loaded by credit_kernels:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    assert "LOADED []" in proc.stdout


def test_no_module_of_credit_kernels_imports_credit():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "credit"]
    assert not offenders, offenders
