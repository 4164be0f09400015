"""What decides a tensor-parallel soundness verdict (:mod:`autoplan.trace.tp_check`), as one hashable key.

A verdict is a function of the parent module's code and state layout, the attributes its forward may read, the
inputs it is called with, the group's styles (relative to the parent) and the shard degree: the check draws its
weights and inputs from a fixed seed, so equal keys give equal verdicts. Two blocks, or the same block in two
traces, share one check only when their keys are equal:

- per submodule (by relative name): its class object and every function its class defines (a patched method
  is another key), its parameters' and buffers' names, shapes and dtypes (a real buffer's values too: a mask
  or a rotary table enters the numbers), and every plain attribute (``training``, head counts, flags, a
  ``config`` object's fields, functions such as an activation) except a block's own index in its stack
  (``layer_idx``), which the repeated-stack trace already treats as the only way its blocks may differ;
- the inputs recorded for the parent's first call (shapes, dtypes, non-tensor values), with the batch dimension
  as the check cuts it;
- the styles relative to the parent, the degree, and the check's own constants.

Whatever cannot be described safely (a hook on a module, a closure, a tensor attribute, an object of unknown
kind) gives no key: that group is checked on its own, every time.

Example:
    >>> from torch import nn
    >>> a, b, c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8)
    >>> module_key(a) == module_key(b), module_key(a) == module_key(c)
    (True, False)
"""

from __future__ import annotations

import enum
import re
import types
from collections import OrderedDict

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .measure import TensorSpec

__all__ = ["module_key", "describe_value", "verdict_key", "VerdictCache", "VERDICTS", "Uncacheable"]

_SKIPPED = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_state_dict_hooks",
            "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
            "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_MAX_DEPTH = 8
#: attributes that may hold a block's own index in its stack (transformers' ``layer_idx``)
_INDEX_NAME = re.compile(r"^(layer|block)_?(idx|index|id|number)$")
_MAX_BUFFER_VALUES = 1 << 22  # a real buffer larger than this makes its module uncacheable


class Uncacheable(Exception):
    """The value cannot be described safely: its group is checked on its own."""


def describe_value(value, depth: int = 0):
    """A hashable description of a plain value; raises :class:`Uncacheable` for anything else.

    Example:
        >>> describe_value({"heads": 4, "act": "gelu"})
        ('dict', (("'act'", ('str', 'gelu')), ("'heads'", ('int', 4))))
    """
    if depth > _MAX_DEPTH:
        raise Uncacheable("nested too deep")
    if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
        return (type(value).__name__, value)
    if isinstance(value, (torch.dtype, torch.device, torch.Size, enum.Enum, slice, range)):
        return (type(value).__name__, repr(value))
    if isinstance(value, (tuple, list, frozenset, set)):
        items = [describe_value(v, depth + 1) for v in value]
        return (type(value).__name__, tuple(sorted(items, key=repr) if isinstance(value, (set, frozenset))
                                            else items))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((repr(k), describe_value(v, depth + 1)) for k, v in value.items()),
                                     key=lambda kv: kv[0])))
    if isinstance(value, type):
        return ("class", value)  # the object itself: a key keeps it alive, so its identity cannot be reused
    if isinstance(value, types.BuiltinFunctionType):
        return ("builtin", value)
    if isinstance(value, types.FunctionType):
        if value.__closure__:
            raise Uncacheable(f"closure {value.__qualname__}")
        return ("function", value)
    if isinstance(value, (types.MethodType, torch.Tensor, nn.Module)):
        raise Uncacheable(f"a {type(value).__name__} held as an attribute")
    if hasattr(value, "__dict__") and type(value).__module__ != "builtins":
        # a config-like object (transformers' PretrainedConfig, a dataclass): its class and fields
        return ("object", type(value), describe_value(vars(value), depth + 1))
    raise Uncacheable(f"a {type(value).__name__} attribute")


def _class_code(cls: type) -> tuple:
    """The class and every function its own classes define (up to nn.Module): a patched method changes it."""
    code = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        code.append((klass, tuple(sorted((name, fn) for name, fn in vars(klass).items()
                                         if isinstance(fn, (types.FunctionType, staticmethod, classmethod,
                                                            property))))))
    return tuple(code)


def _tensor_key(t: torch.Tensor, values: bool) -> tuple:
    key = (tuple(t.shape), t.dtype, t.device.type == "meta")
    if values and t.device.type != "meta":
        if t.numel() > _MAX_BUFFER_VALUES:
            raise Uncacheable("a large real buffer")
        key += (t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(),)
    return key


def _block_indices(fqn: str) -> set[int]:
    """The list positions on a module's path (``model.layers.3.self_attn`` → {3})."""
    return {int(part) for part in fqn.split(".") if part.isdigit()}


def module_key(module: nn.Module, fqn: str = "") -> tuple:
    """Everything of ``module`` (at ``fqn`` in its model) and its submodules that a check may read;
    :class:`Uncacheable` if unsure. A block's own index (an int attribute named like ``layer_idx`` equal to a
    list position on the module's path) is left out, as the repeated-stack trace
    (:mod:`autoplan.trace.repeat`) leaves it out: the blocks of a stack differ only there, and the stack's
    blocks already share one traced block's groups."""
    out = []
    for name, m in module.named_modules():
        attrs = vars(m)
        if any(attrs.get(h) for h in _HOOKS) or attrs.get("_forward_pre_hooks_with_kwargs") \
                or attrs.get("_forward_hooks_with_kwargs"):
            raise Uncacheable(f"a hook on {name or 'the module'}")
        own = _block_indices(f"{fqn}.{name}" if fqn and name else fqn or name)
        plain = tuple(sorted((k, ("block index",) if _INDEX_NAME.match(k) and type(v) is int and v in own
                              else describe_value(v)) for k, v in attrs.items()
                             if k not in _SKIPPED and k not in _HOOKS))
        params = tuple((n, _tensor_key(p, False), p.requires_grad) for n, p in m.named_parameters(recurse=False))
        buffers = tuple((n, _tensor_key(b, True)) for n, b in m.named_buffers(recurse=False))
        out.append((name, _class_code(type(m)), plain, params, buffers))
    return tuple(out)


def verdict_key(module: nn.Module, parent: str, styles: dict[str, str], divisor: int, recorded: tuple | None,
                batch: int | None, constants: tuple) -> tuple | None:
    """The key of the check of the group ``styles`` (FQNs) in its parent ``module`` (FQN ``parent``), called
    with ``recorded`` (None: never called, not cached), the example batch cut to one sample where its first
    dimension is ``batch``; None when it cannot be told safely.

    Example:
        >>> from torch import nn
        >>> blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)) for _ in range(2)])
        >>> x = ((TensorSpec((2, 4), torch.float32),), {})
        >>> keys = [verdict_key(b, f"{i}", {f"{i}.0": "colwise", f"{i}.1": "rowwise"}, 8, x, 2, ())
        ...         for i, b in enumerate(blocks)]
        >>> keys[0] == keys[1], keys[0] == verdict_key(blocks[0], "0", {"0.0": "colwise", "0.1": "rowwise"},
        ...                                            8, ((TensorSpec((2, 5), torch.float32),), {}), 2, ())
        (True, False)
    """
    if recorded is None:
        return None
    prefix = parent + "." if parent else ""
    rel = tuple(sorted((fqn[len(prefix):], style) for fqn, style in styles.items()))
    inputs = pytree.tree_map(
        lambda x: ("tensor", (1,) + tuple(x.shape[1:]) if batch is not None and x.shape and x.shape[0] == batch
                   else tuple(x.shape), x.dtype) if isinstance(x, TensorSpec) else x, recorded)
    try:
        return module_key(module, parent), rel, divisor, describe_value(inputs), constants
    except Uncacheable:
        return None


class VerdictCache:
    """Verdicts of earlier checks in this process by :func:`verdict_key`, least recently used dropped first.
    A verdict names its parent module: stored with a placeholder, it is read back with the asking parent's name.

    Example:
        >>> cache = VerdictCache(kept=2)
        >>> cache.put(("k",), "h.0.attn", "h.0.attn's forward fails")
        >>> cache.get(("k",), "h.1.attn"), cache.get(("other",), "h.1.attn"), cache.get(None, "h.1.attn")
        (("h.1.attn's forward fails",), None, None)
    """

    _PARENT = "\x00parent\x00"

    def __init__(self, kept: int = 256):
        self.kept = kept
        self._verdicts: OrderedDict = OrderedDict()

    def get(self, key: tuple | None, parent: str) -> tuple[str | None] | None:
        """``(verdict,)`` when the key was checked before (the verdict None: sound), else None."""
        if key is None or key not in self._verdicts:
            return None
        self._verdicts.move_to_end(key)
        verdict = self._verdicts[key]
        return (verdict.replace(self._PARENT, parent) if verdict is not None and parent else verdict,)

    def put(self, key: tuple | None, parent: str, verdict: str | None) -> None:
        """Remember a verdict (nothing when the key is None)."""
        if key is None:
            return
        self._verdicts[key] = verdict.replace(parent, self._PARENT) if verdict is not None and parent else verdict
        while len(self._verdicts) > self.kept:
            self._verdicts.popitem(last=False)

    def clear(self) -> None:
        """Forget every verdict."""
        self._verdicts.clear()


#: the process's verdicts
VERDICTS = VerdictCache()
