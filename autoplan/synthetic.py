"""ModelGraphs built from closed forms instead of tracing: realistic GPT figures at any size, in no time.

They let the planner be tried (and its examples run) on models far larger than any machine at hand. Figures
follow the usual closed forms for one pre-norm GPT block of hidden size h, sequence s, a heads over a batch of
b samples (Narayanan et al. SC'21 §5.1 for FLOPs: 24bsh² + 4bs²h per block forward; Korthikanti et al. 2022
Eq. 1 for the bytes saved for backward, here at ``dtype_bytes`` per element instead of 2).

Example:
    >>> graph = gpt_like_graph(layers=2, hidden=64, seq=16, vocab=100)
    >>> [layer.name for layer in graph.layers]
    ['tok', 'pos', 'blocks.0', 'blocks.1', 'ln_f', 'head']
    >>> graph.layer("blocks.0").num_params == 12 * 64 * 64 + 13 * 64
    True
"""

from __future__ import annotations

import networkx as nx

from .graph import Layer, ModelGraph, RecomputeOption, SequenceParallelLayer, TensorParallelGroup

__all__ = ["gpt_like_graph", "mlp_graph", "pipeline_plan"]


def _block(i: int, h: int, s: int, a: int, b: int, dtype_bytes: int) -> Layer:
    name = f"blocks.{i}"
    flops = 24 * b * s * h * h + 4 * b * s * s * h
    act_half = s * b * h * 34 + 5 * a * s * s * b  # Korthikanti Eq. 1 at 2 bytes per element
    activation = act_half * dtype_bytes // 2
    attn_scores = 5 * a * s * s * b * dtype_bytes // 2
    out = b * s * h * dtype_bytes
    attn = TensorParallelGroup(
        styles={f"{name}.attn.qkv": "colwise", f"{name}.attn.proj": "rowwise"},
        divisor=a, num_params=4 * h * h, forward_flops=8 * b * s * h * h + 4 * b * s * s * h,
        activation_bytes=attn_scores + 3 * out, output_bytes=out, input_bytes=out,
    )
    mlp = TensorParallelGroup(
        styles={f"{name}.mlp.fc": "colwise", f"{name}.mlp.proj": "rowwise"},
        divisor=4 * h, num_params=8 * h * h, forward_flops=16 * b * s * h * h,
        activation_bytes=8 * out, output_bytes=out, input_bytes=out,
    )
    return Layer(
        name=name, index=0, kind="block", forward_flops=flops, backward_flops=2 * flops,
        num_params=12 * h * h + 13 * h, param_bytes=(12 * h * h + 13 * h) * dtype_bytes,
        activation_bytes=activation, output_bytes=out,
        tp_groups=(attn, mlp),
        # outside the pairs: both norms' inputs (sharded by sequence parallelism) and the pairs' first inputs
        sequence_parallel=SequenceParallelLayer(norms=("ln1", "ln2"), sequence=s, sharded_bytes=4 * out,
                                                shared_input_bytes=2 * out, gathered_bytes=2 * out,
                                                norm_params=(h, h, h, h)),
        recompute_options=(
            # pre-norm: nothing after the MLP's projection saves a tensor, so recompute stops there
            RecomputeOption(name, saved_activation_bytes=activation - out, forward_flops=flops,
                            unreached=(f"{name}.mlp", f"{name}.mlp.proj")),
            RecomputeOption(f"{name}.attn.core", saved_activation_bytes=attn_scores,
                            forward_flops=4 * b * s * s * h),
        ),
    )


def gpt_like_graph(layers: int = 4, hidden: int = 1024, seq: int = 1024, heads: int = 16, vocab: int = 50304,
                   batch: int = 1, dtype_bytes: int = 4, name: str = "GPTLike") -> ModelGraph:
    """tok, pos, blocks.0..blocks.{layers-1}, ln_f, head: the layer chain of :class:`autoplan.models.GPT`."""
    h, s, b = hidden, seq, batch
    out = b * s * h * dtype_bytes
    chain: list[Layer] = [
        Layer("tok", 0, "embedding", forward_flops=0, backward_flops=0, num_params=vocab * h,
              param_bytes=vocab * h * dtype_bytes, activation_bytes=b * s * 8, output_bytes=out,
              tp_groups=(TensorParallelGroup({"tok": "vocab_embedding"}, vocab, vocab * h, 0, 0, out,
                                                 b * s * 8),)),
        Layer("pos", 0, "position", forward_flops=b * s * h, backward_flops=b * s * h, num_params=s * h,
              param_bytes=s * h * dtype_bytes, activation_bytes=0, output_bytes=out),
    ]
    chain += [_block(i, h, s, heads, b, dtype_bytes) for i in range(layers)]
    logits = b * s * vocab * dtype_bytes
    chain += [
        Layer("ln_f", 0, "norm", forward_flops=5 * b * s * h, backward_flops=10 * b * s * h, num_params=2 * h,
              param_bytes=2 * h * dtype_bytes, activation_bytes=out, output_bytes=out),
        Layer("head", 0, "head", forward_flops=2 * b * s * h * vocab, backward_flops=4 * b * s * h * vocab, num_params=0,
              param_bytes=0, activation_bytes=out + logits, output_bytes=logits,
              # the head is tied to tok: it owns no parameter, but its group names the shared weight (as traced)
              tp_groups=(TensorParallelGroup({"head": "vocab_head"}, vocab, vocab * h, 2 * b * s * h * vocab, logits,
                                             logits, out),)),
    ]
    chain = [Layer(**{**layer.__dict__, "index": i}) for i, layer in enumerate(chain)]
    graph = nx.DiGraph()
    graph.add_nodes_from(layer.name for layer in chain)
    graph.add_edges_from((x.name, y.name) for x, y in zip(chain, chain[1:]))
    return ModelGraph(
        model_name=name, layers=chain, nx_graph=graph, batch_size=b, dtype_bytes=dtype_bytes,
        num_params=sum(layer.num_params for layer in chain),
        forward_flops=sum(layer.forward_flops for layer in chain),
        backward_flops=sum(layer.backward_flops for layer in chain),
        input_bytes=b * s * 8, fingerprint=f"{name}-{layers}-{hidden}".ljust(16, "0")[:16],
    )


def mlp_graph(widths: tuple[int, ...] = (256, 1024, 1024, 256), batch: int = 32, dtype_bytes: int = 4) -> ModelGraph:
    """A chain of Linear layers with distinct shapes (no repeated kinds), each its own layer.

    Example:
        >>> [(layer.name, layer.num_params) for layer in mlp_graph(widths=(4, 8, 2)).layers]
        [('layers.0', 40), ('layers.1', 18)]
    """
    chain = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        params = fan_in * fan_out + fan_out
        flops = 2 * batch * fan_in * fan_out
        chain.append(Layer(
            name=f"layers.{i}", index=i, kind=f"linear{fan_in}x{fan_out}", forward_flops=flops, backward_flops=2 * flops,
            num_params=params, param_bytes=params * dtype_bytes, activation_bytes=batch * fan_in * dtype_bytes,
            output_bytes=batch * fan_out * dtype_bytes,
            tp_groups=(TensorParallelGroup({f"layers.{i}": "colwise" if i % 2 == 0 else "rowwise"},
                                           min(fan_in, fan_out), params, flops, 0, batch * fan_out * dtype_bytes,
                                           batch * fan_in * dtype_bytes),),
            recompute_options=(RecomputeOption(f"layers.{i}", 0, flops),),
        ))
    graph = nx.DiGraph()
    graph.add_nodes_from(layer.name for layer in chain)
    return ModelGraph(
        model_name="MLP", layers=chain, nx_graph=graph, batch_size=batch, dtype_bytes=dtype_bytes,
        num_params=sum(layer.num_params for layer in chain), forward_flops=sum(layer.forward_flops for layer in chain),
        backward_flops=sum(layer.backward_flops for layer in chain), input_bytes=batch * widths[0] * dtype_bytes,
        fingerprint="mlp".ljust(16, "0"),
    )


def pipeline_plan(schedule: str = "1f1b"):
    """A small hand-made :class:`~autoplan.Plan` with predicted figures, for pictures and timelines: pp2 × dp2 on 4
    A100s, 4 microbatches; interleaved holds 2 stages per rank. Stage k's forward takes (k + 1) ms, its backward
    twice that, stage 1 recomputes (0.5 ms) and every stage communicates 0.2 ms.

    Example:
        >>> plan = pipeline_plan("interleaved")
        >>> plan.mesh.pp, plan.virtual_stages, len(plan.stages), plan.predicted.stages[1].recompute_s
        (2, 2, 4, 0.0005)
    """
    from .cluster import Cluster
    from .plan import Mesh, ModelInfo, Plan, Predicted, RankFigures, Stage, StageTime

    gib = 2**30
    v = 2 if schedule == "interleaved" else 1
    stages = tuple(Stage((f"blocks.{k}",), ("blocks.1",) if k == 1 else ()) for k in range(2 * v))
    times = tuple(StageTime((k + 1) * 1e-3, 2 * (k + 1) * 1e-3, 0.5e-3 if k == 1 else 0.0, 0.2e-3)
                  for k in range(2 * v))
    ranks = tuple(RankFigures(dp_sync_s=1e-3 * (r + 1), optimizer_s=0.3e-3, parameters_bytes=2 * gib,
                              gradients_bytes=2 * gib, optimizer_states_bytes=12 * gib,
                              activations_bytes=(20 - 8 * r) * gib, transients_bytes=gib) for r in range(2))
    peaks = tuple(ranks[k % 2].peak_bytes for k in range(2 * v))
    return Plan(
        model=ModelInfo("Small", "0" * 16, 1000), cluster=Cluster.preset("a100-80gb", devices_per_node=4),
        global_batch_size=8, microbatch_size=1, microbatches=4, mesh=Mesh(pp=2, dp=2, tp=1), schedule=schedule,
        data_parallel="ddp", stages=stages, virtual_stages=v, precision="bf16",
        predicted=Predicted(step_time_s=0.04, peak_memory_bytes=peaks, compute_s=0.03, bubble_s=0.005,
                            stages=times, ranks=ranks),
    )
