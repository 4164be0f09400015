"""The discrete search space: every strategy (mesh, microbatching, schedule, DP kind) the pins allow.

A :class:`~autoplan.cost.plan_cost.Strategy` fixes everything but the stage cuts and the per-layer choices
(tensor parallel on/off, recompute option); :mod:`autoplan.solve.cpsat` finds those for one strategy.

Example:
    >>> from autoplan.solve.space import divisors
    >>> divisors(12)
    [1, 2, 3, 4, 6, 12]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..cluster import Cluster
from ..cost.plan_cost import Strategy
from ..cost.sequence import sequence_parallel_applies
from ..graph import Layer, ModelGraph, RecomputeOption, fsdp_blocks_tensor_parallel
from ..names import tied_holders
from ..options import PlanOptions

__all__ = ["divisors", "LayerChoice", "layer_choices", "enumerate_strategies", "global_batch_size",
           "MAX_VIRTUAL_STAGES"]

#: Interleaved schedules are searched with 2..MAX_VIRTUAL_STAGES model chunks per pipeline rank.
MAX_VIRTUAL_STAGES = 4


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n`` in increasing order."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass(frozen=True)
class LayerChoice:
    """How one layer runs: sharded by tensor parallelism or not, and which recompute option (an index into
    ``Layer.recompute_options``, or ``None`` for no recompute)."""

    tp_on: bool
    recompute: int | None

    def option(self, layer: Layer) -> RecomputeOption | None:
        """The recompute option this choice names on ``layer``, or ``None``."""
        return None if self.recompute is None else layer.recompute_options[self.recompute]

    @property
    def order_key(self) -> tuple[int, bool]:
        """Sorts choices deterministically: no recompute first, then by option index, unsharded first."""
        return (-1 if self.recompute is None else self.recompute, self.tp_on)


def _recompute_allowed(layer: Layer, mode: str) -> list[int | None]:
    options = list(enumerate(layer.recompute_options))
    if mode == "none":
        return [None]
    if mode == "full":
        full: list[int | None] = [i for i, o in options if o.module == layer.name]
        return full[:1] or [None]
    if mode == "selective":
        selective: list[int | None] = [i for i, o in options if o.module != layer.name]
        return selective or [None]
    return [None] + [i for i, _ in options]


def layer_choices(layer: Layer, tp: int, recompute: str, sequence_parallel: bool = False,
                  fsdp: bool = False) -> list[LayerChoice]:
    """The choices the options allow for ``layer`` under a tensor-parallel degree ``tp`` (``fsdp``: the
    strategy shards its data-parallel replicas with FSDP, see :func:`fsdp_blocks_tensor_parallel`).

    ``recompute`` pinned to "full" / "selective" forces that kind wherever the layer offers it (a layer
    without such an option runs without recompute); "none" forbids recompute. Under ``sequence_parallel`` a layer
    that can run it is always sharded (its split stream must reach every layer of the run) and recomputes whole
    or not at all (a recomputed child module's bytes are not priced for a split stream).

    Example:
        >>> from autoplan.graph import Layer
        >>> layer = Layer("fc", 0, "linear", 1, 2, 3, 12, 4, 4)
        >>> layer_choices(layer, tp=1, recompute="auto")
        [LayerChoice(tp_on=False, recompute=None)]
    """
    tp_options = [False]
    blocked = fsdp and fsdp_blocks_tensor_parallel(layer)
    if tp > 1 and layer.tp_divisor and layer.tp_divisor % tp == 0 and not blocked:
        tp_options.append(True)
    recomputes = _recompute_allowed(layer, recompute)
    if sequence_parallel and sequence_parallel_applies(layer, tp) and not blocked:
        tp_options = [True]
        recomputes = [r for r in recomputes if r is None or layer.recompute_options[r].module == layer.name] or [None]
    return [LayerChoice(t, r) for t in tp_options for r in recomputes]


def global_batch_size(graph: ModelGraph, options: PlanOptions) -> int:
    return options.global_batch_size if options.global_batch_size is not None else graph.batch_size


def _tp_degrees(graph: ModelGraph, cluster: Cluster, options: PlanOptions) -> list[int]:
    if "tp" in options.mesh:
        return [options.mesh["tp"]]
    out = []
    for tp in divisors(cluster.world_size):
        if tp > 1 and not any(layer.tp_divisor and layer.tp_divisor % tp == 0 for layer in graph.layers):
            continue  # no layer can shard: tp would only replicate work
        within_node = cluster.devices_per_node % tp == 0
        if not within_node and not options.tp_across_nodes:
            continue
        out.append(tp)
    return out


def enumerate_strategies(graph: ModelGraph, cluster: Cluster, options: PlanOptions) -> list[Strategy]:
    """Every strategy allowed by the world size, the global batch and the pins, in a fixed order.

    Raises ``ValueError`` naming the arithmetic when the pins leave nothing (e.g. a mesh whose product is not
    the world size, or a data-parallel degree that does not divide the global batch).

    Example:
        >>> from autoplan.synthetic import gpt_like_graph
        >>> from autoplan import Cluster
        >>> s = enumerate_strategies(gpt_like_graph(layers=2), Cluster.preset("a100-80gb"),
        ...                          PlanOptions(global_batch_size=8, mesh={"pp": 1, "tp": 1}))
        >>> sorted({x.microbatch_size for x in s})
        [1]
    """
    world = cluster.world_size
    batch = global_batch_size(graph, options)
    num_layers = len(graph.layers)
    pins = options.mesh
    pinned_product = 1
    for degree in pins.values():
        pinned_product *= degree
    if world % pinned_product or (len(pins) == 3 and pinned_product != world):
        raise ValueError(
            f"mesh pins {pins} multiply to {pinned_product}, which does not fit a world of {world} devices "
            f"({cluster.nodes} nodes × {cluster.devices_per_node}); pin degrees whose product divides {world}"
        )
    if "pp" in pins and pins["pp"] > num_layers:
        raise ValueError(f"mesh pp={pins['pp']} needs at least that many layers; the model has {num_layers}")
    blocker = getattr(graph, "pipeline_blocker", None)  # the executor's own split check, run at trace time
    if blocker and pins.get("pp", 1) > 1:
        raise ValueError(f"mesh pp={pins['pp']} needs pipeline stages, but {graph.model_name} cannot be split into "
                         f"them: {blocker}")
    strategies: list[Strategy] = []
    inner_tie = _inner_tied_weight(graph)
    sp_degrees = _sequence_parallel_degrees(graph, cluster, options)
    for tp in _tp_degrees(graph, cluster, options):
        for pp in divisors(world // tp):
            if pp > num_layers or pins.get("pp", pp) != pp or (blocker and pp > 1):
                continue
            dp = world // (tp * pp)
            if pins.get("dp", dp) != dp or batch % dp:
                continue
            per_replica = batch // dp
            sizes = [options.microbatch_size] if options.microbatch_size else divisors(per_replica)
            for mb in sizes:
                if per_replica % mb:
                    continue
                m = per_replica // mb
                for schedule, v in _schedules(pp, m, num_layers, options.schedule):
                    if schedule == "interleaved" and dp > 1 and inner_tie:
                        continue
                    for kind in _dp_kinds(dp, options.data_parallel, _fsdp_blocks_pinned_tp(graph, options, tp)):
                        for sp in _sequence_parallel_choices(tp, tp in sp_degrees, options.sequence_parallel):
                            for reshard in _fsdp_reshards(kind, dp, pp, m, options.fsdp_reshard):
                                strategies.append(Strategy(pp, dp, tp, mb, m, schedule, kind, v, options.precision,
                                                           options.optimizer, sp, reshard))
    if not strategies:
        raise ValueError(_no_strategy_message(graph, cluster, options, batch))
    return strategies


def _sequence_parallel_choices(tp: int, possible: bool, pinned: str | bool) -> list[bool]:
    """Sequence parallelism off and/or on for one mesh: on needs tp > 1 and a layer that can run it at this tp
    (under a pipeline each stage splits and gathers its own piece of a run); ``True`` then forces it, ``"auto"``
    prices both."""
    able = tp > 1 and possible
    if pinned is True:
        return [True] if able else ([False] if tp == 1 else [])
    return [False, True] if able and pinned == "auto" else [False]


def _sequence_parallel_degrees(graph: ModelGraph, cluster: Cluster, options: PlanOptions) -> set[int]:
    """The tp degrees at which some layer can run sequence-parallel; with ``sequence_parallel=True``,
    ``ValueError`` naming why no layer can (each layer's reason, or the degrees that fail)."""
    if options.sequence_parallel is False:
        return set()
    degrees = {tp for tp in _tp_degrees(graph, cluster, options)
               if any(sequence_parallel_applies(layer, tp) for layer in graph.layers)}
    if options.sequence_parallel is True and not degrees:
        reasons = sorted({f"{layer.name}: {layer.sequence_parallel.blocker}" for layer in graph.layers
                          if layer.sequence_parallel is not None and layer.sequence_parallel.blocker})
        sequences = sorted({layer.sequence_parallel.sequence for layer in graph.layers
                            if layer.sequence_parallel is not None and layer.sequence_parallel.possible})
        if sequences:
            why = (f"no tensor-parallel degree allowed here ({_tp_degrees(graph, cluster, options)}) divides the "
                   f"sequence length {sequences[0]} and the sharded dimensions")
        elif reasons:
            why = "; ".join(reasons[:3])
        else:
            why = "it has no Megatron colwise/rowwise pair (tensor parallelism has nothing to build on)"
        raise ValueError(f"sequence_parallel=True, but no layer of {graph.model_name} can run it: {why}. "
                         f"Use sequence_parallel='auto' or False")
    return degrees


def _inner_tied_weight(graph: ModelGraph) -> str | None:
    """A tied weight that a layer other than the chain's first and last holds (BART's and T5's shared embedding
    in the decoder), or None. An interleaved schedule may put two stages holding it on one pipeline rank, and data
    parallelism cannot wrap one parameter in two stage modules, so such plans keep dp = 1 or another schedule
    (stage k runs on rank k mod pp: the first and last layer are never on one rank when pp > 1)."""
    last = len(graph.layers) - 1
    names = [layer.name for layer in graph.layers]
    return next((name for name, held in tied_holders(graph.tied_parameters, names)
                 if any(0 < i < last for i in held) and len(held) > 1), None)


def _schedules(pp: int, microbatches: int, num_layers: int, pinned: str) -> list[tuple[str, int]]:
    if pp == 1:
        # One stage: the schedules coincide (gradient accumulation, one microbatch alive).
        return [(pinned if pinned != "auto" else "1f1b", 1)]
    # Order breaks ties: 1F1B first (it never holds more activations than GPipe), GPipe last.
    out = []
    if pinned in ("auto", "1f1b") and microbatches >= pp:
        out.append(("1f1b", 1))
    if pinned in ("auto", "interleaved") and microbatches >= pp and microbatches % pp == 0:
        out += [("interleaved", v) for v in range(2, MAX_VIRTUAL_STAGES + 1) if pp * v <= num_layers]
    if pinned in ("auto", "gpipe"):
        out.append(("gpipe", 1))
    return out


def _fsdp_blocks_pinned_tp(graph: ModelGraph, options: PlanOptions, tp: int) -> bool:
    """Whether a pinned tp > 1 would leave some layer whole under FSDP that it shards under DDP (a fused projection
    with a bias): a pinned tp is meant to shard every layer it soundly can."""
    if tp == 1 or "tp" not in options.mesh:
        return False
    return any(layer.tp_divisor and layer.tp_divisor % tp == 0 and fsdp_blocks_tensor_parallel(layer)
               for layer in graph.layers)


def _dp_kinds(dp: int, pinned: str, fsdp_blocks_tp: bool = False) -> list[str]:
    if pinned != "auto":
        return [pinned]
    if dp == 1:
        return ["ddp"]  # FSDP over one rank shards nothing
    return ["ddp"] if fsdp_blocks_tp else ["ddp", "fsdp"]


def _fsdp_reshards(kind: str, dp: int, pp: int, microbatches: int, pinned: str = "auto") -> list[str]:
    """How FSDP may treat its gathered weights between microbatches (``Plan.fsdp_reshard``): keep them through
    the step, and, with several microbatches and no pipeline, also reshard per microbatch (ZeRO-3 with gradient
    accumulation: :func:`autoplan.cost.fsdp_keeps_weights`). The two differ only there; a pipeline's stages keep
    them whatever they are asked (:func:`autoplan.cost.check_fsdp_reshard`). A pinned ``"microbatch"`` leaves
    only the layouts that can run it (FSDP over dp > 1, no pipeline); a pinned ``"step"`` never reshards.

    Example:
        >>> _fsdp_reshards("fsdp", dp=4, pp=1, microbatches=4), _fsdp_reshards("fsdp", 4, 1, 4, pinned="step")
        (['step', 'microbatch'], ['step'])
        >>> _fsdp_reshards("ddp", 4, 1, 4, pinned="microbatch"), _fsdp_reshards("fsdp", 4, 2, 4, pinned="microbatch")
        ([], [])
    """
    can_reshard = kind == "fsdp" and dp > 1 and pp == 1
    if pinned == "microbatch":
        return ["microbatch"] if can_reshard else []
    if pinned == "auto" and can_reshard and microbatches > 1:
        return ["step", "microbatch"]
    return ["step"]


_PROBING = False  # set while _no_strategy_message tries other batch sizes (their failures need no message)


def _no_strategy_message(graph: ModelGraph, cluster: Cluster, options: PlanOptions, batch: int) -> str:
    """Why no strategy splits ``batch`` (the rule that failed, with its numbers, for the meshes the pins allow)
    and the nearest global batch sizes that do split."""
    global _PROBING
    if _PROBING:
        return ""
    world, layers = cluster.world_size, len(graph.layers)
    pins = {k: v for k, v in (("mesh", options.mesh), ("microbatch_size", options.microbatch_size),
                               ("schedule", options.schedule), ("fsdp_reshard", options.fsdp_reshard))
            if v not in ({}, None, "auto")}
    mb_pin, schedule = options.microbatch_size, options.schedule
    inner_tie = _inner_tied_weight(graph)
    reasons: list[str] = []
    for tp in _tp_degrees(graph, cluster, options):
        for pp in divisors(world // tp):
            dp = world // (tp * pp)
            if pp > layers or any(options.mesh.get(axis, d) != d for axis, d in (("pp", pp), ("dp", dp))):
                continue
            mesh = f"pp{pp}×dp{dp}×tp{tp}"
            per_replica = batch // dp
            if options.fsdp_reshard == "microbatch" and not _fsdp_reshards("fsdp", dp, pp, 2, "microbatch"):
                reasons.append(f"{mesh}: fsdp_reshard='microbatch' needs FSDP over dp > 1 and no pipeline")
            elif batch % dp:
                reasons.append(f"{mesh}: {batch} is not a multiple of dp = {dp}")
            elif mb_pin and per_replica % mb_pin:
                reasons.append(f"{mesh}: batch / dp = {per_replica} is not a multiple of microbatch_size = {mb_pin}")
            elif schedule in ("1f1b", "interleaved") and per_replica // (mb_pin or 1) < pp:
                reasons.append(f"{mesh}: {per_replica // (mb_pin or 1)} microbatches, but {schedule} needs at least "
                               f"pp = {pp}")
            elif schedule == "interleaved" and dp > 1 and inner_tie:
                reasons.append(f"{mesh}: interleaved stages of one rank could both hold the tied weight "
                               f"{inner_tie!r}, which data parallelism cannot wrap twice")
            elif schedule == "interleaved":
                reasons.append(f"{mesh}: interleaved needs microbatches divisible by pp = {pp} (and pp × 2 ≤ "
                               f"{layers} layers)")
    if not reasons:
        reasons.append(f"no tensor-parallel degree fits: tp must divide the {cluster.devices_per_node} devices of a "
                       f"node (tp_across_nodes=True lifts that) and a sharded dimension of the model")
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more meshes alike" if len(reasons) > 3 else "")
    nearest = []
    _PROBING = True
    try:
        for candidates in (range(batch - 1, max(0, batch - 4096), -1), range(batch + 1, batch + 4096)):
            for b in candidates:
                try:
                    enumerate_strategies(graph, cluster, replace(options, global_batch_size=b))
                except ValueError:
                    continue
                nearest.append(b)
                break
    finally:
        _PROBING = False
    fix = (f"Nearest global batch size{'s' if len(nearest) > 1 else ''} that work{'' if len(nearest) > 1 else 's'}: "
           f"{' and '.join(map(str, nearest))}" if nearest else "No batch size near it works with these pins")
    return (
        f"global batch {batch} cannot be split over {world} devices with the pins {pins}: every layout needs "
        f"global batch = dp × microbatch_size × microbatches (1f1b and interleaved also microbatches ≥ pp), and "
        f"{shown}. {fix}; or drop a pin"
    )
