"""Attention modules' head counts under tensor parallelism: a module that computes per head and owns a colwise
linear reads its head count (``view(B, T, num_heads, head_dim)``), which must be the rank's local heads on a t-way
shard. :func:`local_head_owners` finds such modules, :func:`divide_head_attributes` divides their counts by t (the
executor when it shards, the soundness check when it simulates a shard).

Example:
    >>> from torch import nn
    >>> attn = nn.Module(); attn.q = nn.Linear(8, 8); attn.num_heads = 4
    >>> root = nn.Module(); root.attn = attn
    >>> undo = divide_head_attributes(local_head_owners(root, ["attn.q"]), 2)
    >>> attn.num_heads, [(name, old) for _, name, old in undo]
    (2, [('num_heads', 4)])
"""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["HEAD_COUNT_ATTRIBUTES", "HEAD_SCALED_ATTRIBUTES", "CONFIG_HEAD_ATTRIBUTES", "local_head_owners",
           "divide_head_attributes"]


#: attributes that hold an attention module's head count: a module with one of them computes per head
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads")
#: attributes of such a module that count heads or features over all heads: divided by t on a t-way shard (as
#: torchtitan sets ``n_heads // tp`` on its attention modules), so ``view(B, T, num_heads, head_dim)`` sees the
#: local heads
HEAD_SCALED_ATTRIBUTES = HEAD_COUNT_ATTRIBUTES + ("num_key_value_heads", "n_kv_heads", "embed_dim", "all_head_size",
                                                  "inner_dim", "hidden_size", "n_embd", "split_size")


#: head counts of a transformers config that attention code may read through ``self.config``
CONFIG_HEAD_ATTRIBUTES = ("num_attention_heads", "num_key_value_heads")


def local_head_owners(root: nn.Module, colwise_fqns) -> list[nn.Module]:
    """The distinct modules directly owning a colwise linear that count attention heads in attributes (their own
    or their ``config``'s).

    Example:
        >>> from torch import nn
        >>> attn = nn.Module(); attn.q = nn.Linear(8, 8); attn.num_heads = 4
        >>> root = nn.Module(); root.attn = attn
        >>> [type(m).__name__ for m in local_head_owners(root, ["attn.q"])]
        ['Module']
    """
    owners: dict[int, nn.Module] = {}
    for fqn in colwise_fqns:
        owner_name = fqn.rpartition(".")[0]
        owner = root.get_submodule(owner_name) if owner_name else root
        config = getattr(owner, "config", None)
        # an attention module (it has a head_dim) may read its head counts from the model's config instead
        attention = isinstance(getattr(owner, "head_dim", None), int)
        if any(isinstance(getattr(owner, a, None), int) for a in HEAD_COUNT_ATTRIBUTES) or attention and any(
                isinstance(getattr(config, a, None), int) for a in CONFIG_HEAD_ATTRIBUTES):
            owners.setdefault(id(owner), owner)
    return list(owners.values())


def divide_head_attributes(owners: list[nn.Module], t: int) -> list[tuple[nn.Module, str, int]]:
    """Divide each owner's head/feature counts by ``t`` in place (an owner that holds a ``config`` with head counts
    gets a copy of it with local counts); returns ``(module, name, old value)`` to undo.

    Example:
        >>> from torch import nn
        >>> attn = nn.Module(); attn.num_heads, attn.embed_dim, attn.head_dim = 4, 32, 8
        >>> undo = divide_head_attributes([attn], 2)
        >>> attn.num_heads, attn.embed_dim, attn.head_dim
        (2, 16, 8)
    """
    undo = []
    for owner in owners:
        config = getattr(owner, "config", None) if isinstance(getattr(owner, "head_dim", None), int) else None
        counts = {a: getattr(config, a, None) for a in CONFIG_HEAD_ATTRIBUTES}
        if config is not None and all(isinstance(v, int) and v % t == 0 for v in counts.values() if v is not None) \
                and any(isinstance(v, int) for v in counts.values()):
            # the module reads head counts from the model-wide config (Phi-3: config.num_attention_heads *
            # head_dim): it gets a copy of its own with its local counts; every other module keeps the shared one
            local = copy.copy(config)
            for name, value in counts.items():
                if isinstance(value, int):
                    setattr(local, name, value // t)
            undo.append((owner, "config", config))
            owner.config = local
        for name in HEAD_SCALED_ATTRIBUTES:
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value % t == 0:
                undo.append((owner, name, value))
                setattr(owner, name, value // t)
    return undo
