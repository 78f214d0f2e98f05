"""The attention hook of the tree backend: transformers calls `_credit_tree_attention` in every layer while a
TeacherScorer forward is active (registered through its AttentionInterface as "credit_tree"), and it runs
`credit_kernels.tree_attention` on the packed trie tokens instead of the model's own attention."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

from credit_kernels.tree_attention import TreeAttentionPlan, tree_attention

ATTN_IMPLEMENTATION = "credit_tree"


@dataclass
class TreeState:
    plan: TreeAttentionPlan  # on the model's device (with the flex BlockMask for attn_backend "flex")
    attn_backend: str
    max_len: int  # longest sequence in the chunk (sliding-window guard)
    calls: int = 0
    masks_seen: int = 0


# A context variable, not a forward kwarg: transformers versions differ in which kwargs reach the attention
# function, and the state must never leak into a forward that is not ours.
_STATE: contextvars.ContextVar[TreeState | None] = contextvars.ContextVar("credit_tree_state", default=None)


def _credit_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [1, Hq, U, D], key/value [1, Hkv, U, D] -> ([1, U, Hq, D], None)."""
    state = _STATE.get()
    if state is None:
        raise RuntimeError(
            f"credit: attention implementation {ATTN_IMPLEMENTATION!r} only runs inside TeacherScorer; this model's "
            "config still names it (restore it with model.set_attn_implementation('sdpa'))"
        )
    if query.shape[0] != 1:
        raise RuntimeError(f"credit_tree attention expects one packed row (batch 1); got batch {query.shape[0]}")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"credit_tree attention does not support {name!r}; use TeacherScorer(backend='naive')")
    window = kwargs.get("sliding_window")
    if window is not None and state.max_len > window:  # checked up front too; this guards other model code
        raise RuntimeError(f"credit_tree attention: sequences of {state.max_len} tokens exceed the sliding window "
                           f"{window}; use TeacherScorer(backend='naive')")
    if attention_mask is not None:  # transformers built a mask we ignore: the tree defines visibility
        state.masks_seen += 1
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [U, H, D] views
    # the plan carries the flex BlockMask when attn_backend is "flex": built once per chunk, not once per layer
    out = tree_attention(q, k, v, state.plan, scale=scaling, backend=state.attn_backend, check_inputs=False).out
    state.calls += 1
    return out.unsqueeze(0), None


_registered = False


def _register_attention() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, _credit_tree_attention)
        _registered = True


def _set_attn(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, TypeError):  # older transformers: the config field is the switch
        model.config._attn_implementation = name


@contextlib.contextmanager
def tree_attention_active(model, state: TreeState):
    """Route the model's attention to tree_attention for the block; always restore the original implementation.

    Under transformers' activation checkpointing the backward replays each layer after the block has ended; those
    replays run inside the hook too (`_replays_in_tree`), so the recomputed activations are the tree's."""
    layers = checkpointed_layers(model)
    if not layers:
        with _attention_switched(model, state):
            yield state
        return
    configs = _configs(model)
    before = [dict(vars(c)) for c in configs]
    with _attention_switched(model, state):
        toggle = _Toggle.between(configs, before)
        with _replays_in_tree(layers, model, state, toggle):
            yield state


def checkpointed_layers(model) -> list:
    """The modules whose forward transformers' activation checkpointing wraps (flag on and a checkpoint function)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
            and callable(getattr(m, "_gradient_checkpointing_func", None))]


def _configs(model) -> list:
    """Every config object the model's modules hold (shared ones once), with their sub-configs at any depth."""
    seen: dict[int, object] = {}
    stack = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "sub_configs")]
    while stack:
        config = stack.pop()
        if id(config) not in seen:
            seen[id(config)] = config
            stack += [v for key in (config.sub_configs or {}) if (v := getattr(config, key, None)) is not None]
    return list(seen.values())


_MISSING = object()


@dataclass
class _Toggle:
    """What switching to the hook changed in the model's configs, as plain attribute writes. The backward replays
    every checkpointed layer outside the block; re-running set_attn_implementation there (it walks every module)
    costs ~1 ms a layer, replaying these writes a few microseconds."""

    changes: list  # (config, attribute, value off, value on); _MISSING where the attribute was absent

    @classmethod
    def between(cls, configs: list, before: list[dict]) -> "_Toggle":
        changes = []
        for config, old in zip(configs, before):
            new = vars(config)
            for name in old.keys() | new.keys():
                off, on = old.get(name, _MISSING), new.get(name, _MISSING)
                if off is not on and off != on:
                    changes.append((config, name, off, on))
        return cls(changes)

    def is_off(self) -> bool:
        """The configs hold exactly what the block restored: nothing has switched the model since."""
        return bool(self.changes) and all(vars(c).get(name, _MISSING) == off for c, name, off, _ in self.changes)

    def write(self, on: bool) -> None:
        for config, name, off, value_on in self.changes:
            value = value_on if on else off
            if value is _MISSING:
                vars(config).pop(name, None)
            else:
                vars(config)[name] = value


@contextlib.contextmanager
def _replays_in_tree(layers: list, model, state: TreeState, toggle: _Toggle):
    """For the block, give each checkpointed layer a checkpoint function whose function (run in the forward and
    again by the backward's recompute, in whatever thread autograd uses) enters the hook itself."""
    saved = [m.__dict__.get("_gradient_checkpointing_func") for m in layers]
    for m in layers:
        m._gradient_checkpointing_func = _in_tree(m._gradient_checkpointing_func, model, state, toggle)
    try:
        yield
    finally:
        for m, f in zip(layers, saved):
            if f is None:
                del m._gradient_checkpointing_func  # it was the class attribute
            else:
                m._gradient_checkpointing_func = f


def _in_tree(checkpoint_fn, model, state: TreeState, toggle: _Toggle):
    def checkpoint_in_tree(function, *args, **kwargs):
        def replay(*a, **k):
            if model.config._attn_implementation == ATTN_IMPLEMENTATION:  # the forward, inside the block
                with _state_set(state):
                    return function(*a, **k)
            if toggle.is_off():  # the backward: replay the block's switch as plain writes
                toggle.write(on=True)
                try:
                    with _state_set(state):
                        return function(*a, **k)
                finally:
                    toggle.write(on=False)
            with _attention_switched(model, state):  # something switched the model since: the slow, safe way
                return function(*a, **k)

        return checkpoint_fn(replay, *args, **kwargs)

    return checkpoint_in_tree


@contextlib.contextmanager
def _state_set(state: TreeState):
    token = _STATE.set(state)
    try:
        yield
    finally:
        _STATE.reset(token)


@contextlib.contextmanager
def _attention_switched(model, state: TreeState):
    _register_attention()
    original = model.config._attn_implementation
    with _state_set(state):
        try:
            _set_attn(model, ATTN_IMPLEMENTATION)
            if model.config._attn_implementation != ATTN_IMPLEMENTATION:
                raise ValueError(f"TeacherScorer: {type(model).__name__} refused attention implementation "
                                 f"{ATTN_IMPLEMENTATION!r}; use backend='naive'")
            yield state
        finally:
            if model.config._attn_implementation != original:
                _set_attn(model, original)


