"""Megatron sequence parallelism priced: a tensor-parallel layer's cost with its residual stream split over the
sequence (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4.2.2).

What changes against plain tensor parallelism (:func:`autoplan.cost.layer_cost`), per layer and microbatch:

* **Collectives** (§4.2.2, the g / ḡ operators): a pair's forward all-reduce becomes an all-gather of the pair's
  input before its colwise linears plus a reduce-scatter of its output after the rowwise one; backward does the
  reverse. A ring all-gather and a reduce-scatter each move (t−1)/t of the tensor, an all-reduce twice that, so
  the bytes on the wire are the same (§4.2.2: "the communication bandwidth used ... is the same"). The executor
  (:mod:`autoplan.execute.sp_gather`) gathers a pair's input once however many colwise linears read it (q, k, v),
  and reduce-scatters its gradient once.
* **The gather again in backward** (§4.2.2, Megatron's storage): the colwise linears keep the input's shard, not
  the gathered input, and gather it once more per pair in backward for their weight gradients: one more all-gather
  of the pair's input per pair and microbatch, charged in ``tp_comm_s`` like every tensor-parallel collective,
  i.e. not overlapped. Megatron-LM overlaps it with the input-gradient GEMM; autoplan's executor issues it
  synchronously where autograd needs the tensor, so the charge is what autoplan runs (an upper bound for
  Megatron's step). A pair whose colwise linears run inside a checkpoint (recompute) has no such gather: the
  recomputation gathers its input again in forward instead (charged with the rest of the recomputed forward).
* **Activations** (§4.2, Eq. 1–2 and Table 2): per layer, without recompute, plain TP keeps
  sbh·(10 + 24/t + 5as/(ht)) bytes (Eq. 2) and TP with sequence parallelism sbh/t·(34 + 5as/h) (§4.2.2). Here the
  traced bytes outside the pairs — the norms' inputs and statistics, the dropout masks and outputs, Eq. 2's 10sbh
  — and the pairs' first inputs (each pair's input once, the QKV and first MLP linears' 4sbh) are divided by t:
  a GPT block keeps exactly the paper's 34sbh/t + 5as²b/t. With full recompute only the layer's input is kept,
  sbh·2/t instead of 2sbh (Table 2, last row); while it recomputes, the layer holds its gathered inputs whole
  (the checkpoint, not the shard, keeps them: ``transient_bytes``).
* **Elementwise time**: the ops on the split stream (norms, dropout, residual adds) touch 1/t of their bytes, at
  memory bandwidth (the FORWARD_PASSES / BACKWARD_PASSES rule of :mod:`autoplan.cost.layer`).
* **Once per run of such layers**: the stream is split on entry (a local slice; its backward all-gathers the
  input's gradient) and gathered on exit (an all-gather; its backward is a slice), charged to the run's last
  layer (:func:`sequence_edge_collectives`); and once per step each norm weight's gradient, a partial sum over
  the tp ranks, is all-reduced (:func:`norm_gradient_collectives`; Megatron all-reduces the same gradients,
  §4.2.2's "layer-norm weights"), charged to the layer that holds the norm.
* **Pipeline stages** cut runs: each stage gathers the stream where its piece of a run ends and splits it where
  its piece starts, so stages send whole activations (replicated over the tp ranks, as under plain TP). A cut
  inside a run therefore adds one exit (on the stage before it) and one entry (on the stage after): the same two
  all-gathers, priced on the layer before the cut as ``LayerCost.cut_s`` / ``cut_collectives`` and paid only
  where the plan cuts there. Each stage's piece of a run thus pays one entry and one exit, on that stage.

Example (a GPT block at h = 64, s = 16, tp = 2: the pair collectives turn into gathers and scatters):
    >>> from autoplan import Cluster
    >>> from autoplan.synthetic import gpt_like_graph
    >>> from autoplan.cost import layer_cost
    >>> graph = gpt_like_graph(layers=1, hidden=64, seq=16, heads=4, vocab=100)
    >>> block, c = graph.layer("blocks.0"), Cluster.preset("a100-80gb")
    >>> base = layer_cost(block, traced_batch_size=graph.batch_size, traced_dtype_bytes=4, cluster=c, tp=2,
    ...                   microbatch_size=1, precision="bf16")
    >>> sp = sequence_parallel_cost(block, base, traced_batch_size=graph.batch_size, traced_dtype_bytes=4,
    ...                             cluster=c, tp=2, microbatch_size=1, precision="bf16")
    >>> sorted({x.kind for x in base.tp_collectives}), sorted({x.kind for x in sp.tp_collectives})
    (['all_reduce'], ['all_gather', 'reduce_scatter'])
    >>> sp.activation_bytes < base.activation_bytes
    True
"""

from __future__ import annotations

from dataclasses import replace

from ..cluster import Cluster
from ..graph import Layer, RecomputeOption, TensorParallelGroup
from ..names import in_module
from ..vocabulary import PRECISION_BYTES, tp_style_kind
from .collectives import Collective, group_allgather_s, group_allreduce_s, group_reduce_scatter_s
from .layer import BACKWARD_PASSES, FORWARD_PASSES, LayerCost, memory_bound_s

__all__ = ["sequence_parallel_applies", "sequence_parallel_cost", "backward_regathers", "sequence_edge_collectives",
           "sequence_edge_payers", "norm_gradient_collectives", "collectives_s"]


def sequence_parallel_applies(layer: Layer, tp: int) -> bool:
    """Whether ``layer`` runs sequence-parallel at degree ``tp``: the trace found it possible (its norms outside
    Megatron pairs) and ``tp`` divides its sequence and its tensor-parallel groups (``tp = 0``: whether it can at
    some degree).

    Example:
        >>> from autoplan.synthetic import gpt_like_graph
        >>> g = gpt_like_graph(layers=1, seq=16)
        >>> sequence_parallel_applies(g.layer("blocks.0"), 2), sequence_parallel_applies(g.layer("head"), 2)
        (True, False)
    """
    sp = layer.sequence_parallel
    if tp == 0:
        return sp is not None and sp.possible and layer.tp_divisor > 0
    return (tp > 1 and sp is not None and sp.possible and sp.sequence % tp == 0 and layer.tp_divisor > 0
            and layer.tp_divisor % tp == 0)


def collectives_s(collectives: tuple[Collective, ...], cluster: Cluster, stride: int = 1) -> float:
    """Seconds of ``collectives`` (each its ``count`` times) over groups of their size ``stride`` ranks apart.

    Example:
        >>> from autoplan import Cluster
        >>> c = Cluster.preset("a100-80gb")
        >>> ag_rs = collectives_s((Collective("all_gather", 1e6, 1, 8), Collective("reduce_scatter", 1e6, 1, 8)), c)
        >>> abs(ag_rs - collectives_s((Collective("all_reduce", 1e6, 1, 8),), c)) < 1e-9   # same ring bytes
        True
    """
    price = {"all_reduce": group_allreduce_s, "all_gather": group_allgather_s,
             "reduce_scatter": group_reduce_scatter_s}
    return sum(c.count * price[c.kind](c.nbytes, cluster, c.group_size, stride) for c in collectives)


def _pair_collectives(group: TensorParallelGroup, scale: float, tp: int):
    """(forward, backward) of one pair: its input all-gathered once, whatever the number of colwise linears that
    read it (q, k, v share one gather: :mod:`autoplan.execute.sp_gather`), and its gradient reduce-scattered back
    once; each rowwise linear reduce-scatters its output (and all-gathers its gradient)."""
    rows = [tp_style_kind(s) for s in group.styles.values()].count("rowwise")
    gather_in = Collective("all_gather", group.input_bytes * scale, 1, tp, "tp")
    scatter_out = Collective("reduce_scatter", group.output_bytes * scale, rows, tp, "tp")
    backward = (Collective("all_gather", group.output_bytes * scale, rows, tp, "tp"),
                Collective("reduce_scatter", group.input_bytes * scale, 1, tp, "tp"))
    return (gather_in, scatter_out), backward


def _regathers(layer: Layer, scale: float, tp: int, recompute: RecomputeOption | None):
    """(pair, its input's all-gather again in backward) for each pair whose colwise linears save the shard."""
    return [(g, _pair_collectives(g, scale, tp)[0][0]) for g in layer.tp_groups
            if not _colwise_recomputed(g, recompute)]


def backward_regathers(layer: Layer, *, traced_batch_size: int, traced_dtype_bytes: int, tp: int,
                       microbatch_size: int, precision: str, recompute: RecomputeOption | None = None
                       ) -> tuple[tuple[TensorParallelGroup, Collective], ...]:
    """The all-gathers :func:`sequence_parallel_cost` charges in backward for the shards the colwise linears keep
    (one per pair outside a checkpoint), each with its pair: what Megatron-LM overlaps with the input-gradient GEMM
    and autoplan's executor runs where autograd needs the tensor. Empty where sequence parallelism does not apply.

    Example (a GPT block, tp = 2: the attention's and the MLP's inputs, 4096 bytes each in fp32):
        >>> from autoplan.synthetic import gpt_like_graph
        >>> block = gpt_like_graph(layers=1, hidden=64, seq=16, heads=4).layer("blocks.0")
        >>> [(c.kind, c.nbytes) for _, c in backward_regathers(block, traced_batch_size=1, traced_dtype_bytes=4,
        ...                                                   tp=2, microbatch_size=1, precision="fp32")]
        [('all_gather', 4096.0), ('all_gather', 4096.0)]
    """
    if not sequence_parallel_applies(layer, tp):
        return ()
    scale = microbatch_size / traced_batch_size * PRECISION_BYTES[precision] / traced_dtype_bytes
    return tuple(_regathers(layer, scale, tp, recompute))


def _colwise_recomputed(group: TensorParallelGroup, recompute: RecomputeOption | None) -> bool:
    """Whether a checkpoint runs around the pair's colwise linears (then it, not the shard, keeps their input)."""
    return recompute is not None and any(in_module(m, recompute.module) for m, s in group.styles.items()
                                         if tp_style_kind(s) == "colwise")


def sequence_parallel_cost(layer: Layer, base: LayerCost, *, traced_batch_size: int, traced_dtype_bytes: int,
                           cluster: Cluster, tp: int, microbatch_size: int, precision: str,
                           recompute: RecomputeOption | None = None, tp_stride: int = 1) -> LayerCost:
    """``base`` (the layer's plain tensor-parallel cost, same arguments) with its residual stream split over the
    sequence: see the module docstring for each term. ``base`` is returned unchanged where sequence parallelism
    does not apply (:func:`sequence_parallel_applies`).

    Example: see the module docstring.
    """
    if not sequence_parallel_applies(layer, tp):
        return base
    sp = layer.sequence_parallel
    scale = microbatch_size / traced_batch_size * PRECISION_BYTES[precision] / traced_dtype_bytes
    forward: list[Collective] = []
    backward: list[Collective] = []
    for group in layer.tp_groups:
        fwd, bwd = _pair_collectives(group, scale, tp)
        forward += fwd
        backward += bwd
    # the shards saved in place of the gathered inputs, gathered again for the weight gradients
    backward += [again for _, again in _regathers(layer, scale, tp, recompute)]
    again: list[Collective] = []
    if recompute is not None:
        inside = [g for g in layer.tp_groups if all(in_module(m, recompute.module) for m in g.styles)]
        for group in inside:
            (gather_in, scatter_out), _ = _pair_collectives(group, scale, tp)
            # Non-reentrant checkpointing stops once every saved tensor is back: a pre-norm block's last rowwise
            # linear's reduce-scatter only feeds the residual add, which saves nothing (as for plain TP's
            # all-reduce); a post-norm block's last norm saves the sum, so it runs again.
            again += [gather_in] + ([scatter_out] if recompute.reaches(group.styles) else [])
    collectives = tuple(c for c in forward + backward + again if c.count)
    # Bytes the split stream saves less (the traced figures, scaled): the norms' side over t, and each pair's
    # input kept as its shard (module docstring). A checkpoint re-running a colwise linear holds its gathered
    # input while it recomputes (the executor leaves the saving to the checkpoint there): the transient relief.
    relief = (sp.sharded_bytes + sp.shared_input_bytes) * (1 - 1 / tp) * scale
    gathered_again = any(_colwise_recomputed(g, recompute) for g in layer.tp_groups)
    relief_recomputing = (sp.sharded_bytes * (1 - 1 / tp) + sp.shared_input_bytes - sp.gathered_bytes) * scale \
        if gathered_again else relief
    full = recompute is not None and recompute.module == layer.name
    unsplit = base.activation_bytes + base.transient_bytes  # what plain TP holds before recompute frees it
    if full:
        kept = base.activation_bytes / tp  # the checkpointed input is this rank's slice of the stream
    else:
        kept = max(base.activation_bytes / tp, base.activation_bytes - relief)
    transient = max(0.0, unsplit - relief_recomputing - kept) if recompute is not None else 0.0
    stream_bytes = sp.sharded_bytes * (1 - 1 / tp) * scale
    return replace(
        base,
        forward_s=max(0.0, base.forward_s - memory_bound_s(FORWARD_PASSES * stream_bytes, cluster)),
        backward_s=max(0.0, base.backward_s - memory_bound_s(BACKWARD_PASSES * stream_bytes, cluster)),
        tp_comm_s=collectives_s(collectives, cluster, tp_stride),
        activation_bytes=int(round(kept)),
        transient_bytes=int(round(transient)),
        tp_collectives=collectives,
    )


def sequence_edge_payers(layers: list[Layer], tp: int) -> dict[int, int]:
    """For each run of neighbouring sequence-parallel layers, the index of the layer that is charged its entry
    and exit (the run's last: the stage that gathers the stream holds it, also when a pipeline cuts right after
    the run) → the bytes of the split stream as traced (that layer's output).

    Example:
        >>> from autoplan.synthetic import gpt_like_graph
        >>> g = gpt_like_graph(layers=3, seq=16)                    # tok pos blocks.0-2 ln_f head
        >>> sequence_edge_payers(g.layers, 2) == {4: g.layer("blocks.2").output_bytes}
        True
    """
    on = [sequence_parallel_applies(layer, tp) for layer in layers]
    payers: dict[int, int] = {}
    i = 0
    while i < len(layers):
        if not on[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(layers) and on[j + 1]:
            j += 1
        payers[j] = layers[j].output_bytes
        i = j + 1
    return payers


def sequence_edge_collectives(stream_bytes: float, tp: int) -> tuple[Collective, ...]:
    """One run's entry and exit (or a pipeline cut inside a run: the exit before it, the entry after it), for one
    microbatch of ``stream_bytes`` (the whole stream): the exit's forward all-gather and the entry's backward
    all-gather of the input gradient (the slices cost nothing).

    Example:
        >>> [(c.kind, c.nbytes) for c in sequence_edge_collectives(4096, 2)]
        [('all_gather', 4096), ('all_gather', 4096)]
    """
    return (Collective("all_gather", stream_bytes, 1, tp, "tp"), Collective("all_gather", stream_bytes, 1, tp, "tp"))


def norm_gradient_collectives(layers: list[Layer], tp: int, grad_bytes: int = 4) -> tuple[Collective, ...]:
    """Per step: one all-reduce over the tp ranks of each norm parameter's gradient (``grad_bytes`` per element:
    fp32, as the master weights) in each sequence-parallel layer of ``layers``.

    Example (one GPT block, h = 64: ln1 and ln2 each have a weight and a bias):
        >>> from autoplan.synthetic import gpt_like_graph
        >>> g = gpt_like_graph(layers=1, hidden=64, seq=16)
        >>> [(c.kind, c.nbytes, c.count) for c in norm_gradient_collectives(g.layers, 2)]
        [('all_reduce', 256, 4)]
    """
    sizes: dict[int, int] = {}
    for layer in layers:
        if sequence_parallel_applies(layer, tp):
            for numel in layer.sequence_parallel.norm_params:
                sizes[numel * grad_bytes] = sizes.get(numel * grad_bytes, 0) + 1
    return tuple(Collective("all_reduce", nbytes, count, tp, "tp") for nbytes, count in sorted(sizes.items()))
