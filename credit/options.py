"""CREDIT's method options (lam, num_partners, baseline, swap): one rule each, for every front end that takes them.

TrainConfig, CreditTeacher, the TRL config (CreditSDPOConfig) and the verl loss config (CreditLossConfig) all call
`method_option_error` and word the error in their own style (`TrainConfig: \\`lam\\` ...`, `CreditTeacher: lam ...`),
so a rule changes in one place. Standard library only: credit.config imports it before torch.
"""

from __future__ import annotations

import numbers

BASELINES = ("mean", "logmeanexp")  # beta over the M shuffled teachers (credit_kernels._core checks the same pair)
SWAPS = ("input", "context")  # what the shuffled context swaps: the prompt x, or the whole feedback context c


def method_option_error(*, lam, num_partners, baseline, swap, min_partners: int = 1) -> tuple[str, str] | None:
    """The first invalid option as (name, what it must be), or None when all are valid.

    Args:
        lam: debiasing weight, a real number in [0, 1] (0 = SDPO, 1 = the pure contrast a - beta).
        num_partners: M shuffled teachers per response, an int >= min_partners.
        baseline, swap: one of BASELINES / SWAPS.
        min_partners: 1 where every run has shuffled teachers (TrainConfig, CreditTeacher); 0 where M = 0 means
            "no shuffled teacher" (the TRL and verl configs), which then needs lam = 0.

    The caller raises: ``ValueError(f"{fn}: {name} {why}; got {value!r}")`` in its own style.
    """
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= float(lam) <= 1.0:  # NaN fails too
        return "lam", "must be a number in [0, 1] (0 = SDPO, 1 = the pure contrast a - beta)"
    if isinstance(num_partners, bool) or not isinstance(num_partners, numbers.Integral) or num_partners < min_partners:
        return "num_partners", f"must be an int >= {min_partners}"
    if num_partners == 0 and float(lam) > 0:
        return "num_partners", "= 0 means no shuffled teacher: use lam = 0 (SDPO) or num_partners >= 1"
    if baseline not in BASELINES:
        return "baseline", f"must be one of {BASELINES}"
    if swap not in SWAPS:
        return "swap", f"must be one of {SWAPS}"
    return None
