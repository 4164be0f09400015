"""Reading plan JSON strictly: every field checked for its type, nothing coerced, unknown keys reported.

A plan file is often edited by hand, so a wrong value must be named where it is (``stages[2].layers``) with the type
that was expected, before any layout is applied. Integers must be JSON integers (``64``, not ``64.0``, ``"64"`` or
``true``); seconds may be any number.

Example:
    >>> import autoplan
    >>> from autoplan.plan_json import plan_from_dict
    >>> data = autoplan.Plan.example().to_dict()
    >>> data["global_batch_size"] = "abc"
    >>> try:
    ...     plan_from_dict(data)
    ... except ValueError as e:
    ...     print(e)
    plan JSON field 'global_batch_size' must be an integer, got str 'abc'
"""

from __future__ import annotations

from typing import Any

__all__ = ["plan_from_dict"]

_MISSING = object()

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _describe(value: Any) -> str:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return "null" if value is None else f"{type(value).__name__} {shown}"


def _fail(where: str, expected: str, value: Any) -> None:
    raise ValueError(f"plan JSON field {where!r} must be {expected}, got {_describe(value)}")


def _value(obj: dict, key: str, where: str, kind: type, default: Any = _MISSING, nullable: bool = False) -> Any:
    """``obj[key]`` checked to be of ``kind`` (bool is never an int or a number; an int is a number)."""
    path = f"{where}.{key}" if where else key
    if key not in obj:
        if default is _MISSING:
            raise ValueError(f"plan JSON field {path!r} is missing ({_TYPE_NAMES[kind]} is required there)")
        return default
    value = obj[key]
    if value is None and nullable:
        return None
    ok = not isinstance(value, bool) and (
        isinstance(value, (int, float)) if kind is float else isinstance(value, kind))
    if not ok:
        _fail(path, _TYPE_NAMES[kind] + (" or null" if nullable else ""), value)
    return float(value) if kind is float else value


def _boolean(obj: dict, key: str, default: bool) -> bool:
    """``obj[key]`` checked to be a JSON boolean (``true``/``false``; not 1, "yes" or null)."""
    value = obj.get(key, default)
    if not isinstance(value, bool):
        _fail(key, "true or false", value)
    return value


def _strings(obj: dict, key: str, where: str, default: Any = _MISSING) -> tuple[str, ...]:
    path = f"{where}.{key}" if where else key
    values = _value(obj, key, where, list, default)
    for i, item in enumerate(values):
        if not isinstance(item, str):
            _fail(f"{path}[{i}]", "a string (a module name)", item)
    return tuple(values)


def _object(value: Any, where: str, known: tuple[str, ...]) -> dict:
    """``value`` checked to be a JSON object with no keys outside ``known``."""
    if not isinstance(value, dict):
        _fail(where, "an object", value)
    unknown = sorted(set(value) - set(known))
    if unknown:
        place = f"field {where!r}" if where else "object"
        raise ValueError(f"plan JSON {place} has unknown keys {unknown}; known keys are {list(known)}")
    return value


def _objects(obj: dict, key: str, where: str, known: tuple[str, ...], default: Any = _MISSING) -> list[dict]:
    path = f"{where}.{key}" if where else key
    values = _value(obj, key, where, list, default)
    return [_object(item, f"{path}[{i}]", known) for i, item in enumerate(values)]


def _fields(cls) -> tuple[str, ...]:
    from dataclasses import fields

    return tuple(f.name for f in fields(cls))


def _predicted(data: dict):
    from .plan import Predicted, RankFigures, StageTime

    p = _object(data["predicted"], "predicted", _fields(Predicted))
    peaks = _value(p, "peak_memory_bytes", "predicted", list)
    for i, b in enumerate(peaks):
        if isinstance(b, bool) or not isinstance(b, int):
            _fail(f"predicted.peak_memory_bytes[{i}]", "an integer (bytes)", b)
    numbers = {k: _value(p, k, "predicted", float, 0.0) for k in _fields(Predicted)
               if k not in ("step_time_s", "peak_memory_bytes", "stages", "ranks")}
    stages = tuple(
        StageTime(**{k: _value(s, k, f"predicted.stages[{i}]", float, 0.0 if k in ("recompute_s", "comm_s")
                               else _MISSING) for k in _fields(StageTime)})
        for i, s in enumerate(_objects(p, "stages", "predicted", _fields(StageTime), []))
    )
    ranks = tuple(
        RankFigures(**{k: _value(r, k, f"predicted.ranks[{i}]", float if k.endswith("_s") else int)
                       for k in _fields(RankFigures)})
        for i, r in enumerate(_objects(p, "ranks", "predicted", _fields(RankFigures), []))
    )
    return Predicted(step_time_s=_value(p, "step_time_s", "predicted", float), peak_memory_bytes=tuple(peaks),
                     stages=stages, ranks=ranks, **numbers)


def _search(data: dict):
    from .plan import Alternative, SearchInfo

    if "search" not in data:
        return SearchInfo()
    s = _object(data["search"], "search", _fields(SearchInfo))
    alternatives = tuple(
        Alternative(_value(a, "description", f"search.alternatives[{i}]", str),
                    _value(a, "step_time_s", f"search.alternatives[{i}]", float, nullable=True),
                    _value(a, "reason", f"search.alternatives[{i}]", str))
        for i, a in enumerate(_objects(s, "alternatives", "search", _fields(Alternative), []))
    )
    defaults = SearchInfo()
    return SearchInfo(solver=_value(s, "solver", "search", str, defaults.solver),
                      status=_value(s, "status", "search", str, defaults.status),
                      wall_s=_value(s, "wall_s", "search", float, defaults.wall_s),
                      candidates=_value(s, "candidates", "search", int, defaults.candidates),
                      gap=_value(s, "gap", "search", float, defaults.gap), alternatives=alternatives,
                      notes=_notes(s))


def _notes(search: dict) -> tuple[str, ...]:
    notes = search.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ValueError(f"plan JSON: search.notes must be a list of strings, got {notes!r}")
    return tuple(notes)


_TOP_KEYS = ("autoplan_plan", "model", "cluster", "global_batch_size", "microbatch_size", "microbatches", "mesh",
             "schedule", "virtual_stages", "data_parallel", "precision", "optimizer", "stages", "tensor_parallel",
             "sequence_parallel", "expert_parallel", "fsdp_reshard", "predicted", "search")


def plan_from_dict(data: Any):
    """A :class:`~autoplan.plan.Plan` from its JSON form (version already checked), every field type-checked.

    ``ValueError`` names the field (``stages[0].layers``), the type expected and the value found; unknown keys
    are listed with the known ones. The plan's own consistency checks (:meth:`Plan.validate`) run last.

    Example:
        >>> import autoplan
        >>> d = autoplan.Plan.example().to_dict(); d["stages"][0]["layers"] = "layer"
        >>> try:
        ...     plan_from_dict(d)
        ... except ValueError as e:
        ...     print(e)
        plan JSON field 'stages[0].layers' must be a list, got str 'layer'
    """
    from .cluster import Cluster
    from .plan import Mesh, ModelInfo, Plan, Stage

    data = _object(data, "", _TOP_KEYS)
    model = _object(data.get("model"), "model", _fields(ModelInfo))
    mesh = _object(data.get("mesh"), "mesh", ("pp", "dp", "tp"))
    try:
        cluster = Cluster.from_dict(data.get("cluster"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"plan JSON field 'cluster': {exc}") from exc
    tensor_parallel = _value(data, "tensor_parallel", "", dict, {})
    for fqn, style in tensor_parallel.items():
        if not isinstance(style, str):
            _fail(f"tensor_parallel[{fqn!r}]", "a string (a style)", style)
    predicted = data.get("predicted")
    return Plan(
        model=ModelInfo(_value(model, "name", "model", str), _value(model, "fingerprint", "model", str),
                        _value(model, "num_params", "model", int),
                        _value(model, "tokens_per_sample", "model", int, None, nullable=True)),
        cluster=cluster,
        global_batch_size=_value(data, "global_batch_size", "", int),
        microbatch_size=_value(data, "microbatch_size", "", int),
        microbatches=_value(data, "microbatches", "", int),
        mesh=Mesh(**{axis: _value(mesh, axis, "mesh", int, 1) for axis in ("pp", "dp", "tp")}),
        schedule=_value(data, "schedule", "", str),
        data_parallel=_value(data, "data_parallel", "", str),
        stages=tuple(Stage(_strings(s, "layers", f"stages[{i}]"), _strings(s, "recompute", f"stages[{i}]", []))
                     for i, s in enumerate(_objects(data, "stages", "", ("layers", "recompute")))),
        tensor_parallel=dict(tensor_parallel),
        precision=_value(data, "precision", "", str, "fp32"),
        optimizer=_value(data, "optimizer", "", str, "adamw"),
        virtual_stages=_value(data, "virtual_stages", "", int, 1),
        sequence_parallel=_boolean(data, "sequence_parallel", False),
        expert_parallel=_value(data, "expert_parallel", "", int, 1),
        fsdp_reshard=_value(data, "fsdp_reshard", "", str, "step"),
        predicted=_predicted(data) if predicted is not None else None,
        search=_search(data),
    )
