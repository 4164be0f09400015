"""ModelGraph: what tracing learned about a model, as plain data.

A ``ModelGraph`` holds the op-level graph (a networkx DiGraph) and, above it, the ordered chain of
*layers* (module boundaries) that pipeline cuts may fall between. Every byte and FLOP figure is for
the example batch the model was traced with (``graph.batch_size`` samples); the cost model scales
them linearly to a microbatch.

Example:
    >>> import torch, autoplan
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> graph = autoplan.trace(model, (torch.randn(2, 8),))
    >>> [layer.name for layer in graph.layers]
    ['0', '1', '2']
    >>> graph.num_params
    212
"""

from __future__ import annotations


from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .vocabulary import fused_parts

if TYPE_CHECKING:  # pragma: no cover
    import networkx

__all__ = ["LowPrecisionBytes", "TensorParallelGroup", "RecomputeOption", "SequenceParallelLayer", "ExpertsLayer",
           "Layer", "ModelGraph", "fsdp_blocks_tensor_parallel"]


@dataclass(frozen=True)
class LowPrecisionBytes:
    """Bytes of a layer's (or a tensor-parallel group's) tensors, over the example batch, as one way of running a
    low precision makes them (:mod:`autoplan.trace.low_precision_bytes`): ``torch.autocast`` keeps a residual
    stream in the weights' precision and casts a linear's output down; bf16 weights (FSDP2's and ``replicate``'s
    ``MixedPrecisionPolicy``) make bf16 everything but what the model upcasts itself (an RMSNorm's fp32 inside).
    A figure left ``None`` was not seen: the precision's bytes (the traced fp32 bytes halved) are charged.

    Example:
        >>> LowPrecisionBytes(output_bytes=4096, activation_bytes=10_000).input_bytes is None
        True
    """

    output_bytes: int | None = None  # what crosses the boundary after it (a group: what it all-reduces)
    input_bytes: int | None = None  # a group's: what enters its first module (whose gradient backward all-reduces)
    activation_bytes: int | None = None  # a layer's: saved for backward, each storage once, its weights' casts not


@dataclass(frozen=True)
class TensorParallelGroup:
    """Modules inside one layer that are sharded together by tensor parallelism.

    ``styles`` maps module FQN → style (``"colwise"``, ``"rowwise"``, ``"vocab_embedding"``,
    ``"vocab_head"``). A colwise/rowwise pair (Megatron-LM SC'21 §3) needs one all-reduce of its output
    (``output_bytes``) in forward and one of its input gradient in backward; a vocabulary-parallel embedding one
    all-reduce of its output in forward; a vocabulary-parallel head one all-gather of its logits
    (``output_bytes``) in forward and one all-reduce of its input gradient (``input_bytes``) in backward.
    A degree ``t`` is legal only when ``divisor % t == 0`` (heads, features or vocabulary).
    """

    styles: dict[str, str]
    divisor: int
    num_params: int  # parameters sharded by this group (divided by t)
    forward_flops: int  # FLOPs of the sharded modules (divided by t)
    activation_bytes: int  # saved-for-backward bytes that become sharded (divided by t)
    output_bytes: int  # bytes of the group's output tensor (all-reduced, or all-gathered for a head), example batch
    input_bytes: int  # bytes entering its first module (a head's input gradient is all-reduced), example batch
    # the same two as autocast and as bf16 weights run the model (None where not traced: the precision's bytes)
    autocast: LowPrecisionBytes | None = None
    bf16_weights: LowPrecisionBytes | None = None
    # what a pair all-reduces in backward, its input's gradient; None: output_bytes (one shape, one dtype traced)
    input_gradient_bytes: int | None = None


@dataclass(frozen=True)
class RecomputeOption:
    """Recomputing ``module`` (the layer itself = full; a module inside it, at any depth = selective, e.g.
    Megatron's attention core ``blocks.0.attn.core``) in backward.

    Saves ``saved_activation_bytes`` of the layer's activations (only the module's input stays alive)
    and costs one more forward of the module, ``forward_flops``. The trace offers the layer and each module in it
    that saves at least a quarter of the layer's bytes, less any that another option matches in bytes for fewer
    FLOPs (see ``autoplan.trace``).

    Example:
        >>> RecomputeOption("blocks.0.attn.core", saved_activation_bytes=5 << 20, forward_flops=10**9).module
        'blocks.0.attn.core'
    """

    module: str
    saved_activation_bytes: int
    forward_flops: int
    #: modules inside ``module`` whose output the recomputation never reaches: non-reentrant checkpointing stops
    #: once every tensor the module saved is back, so the work after the last save (a pre-norm block's last
    #: projection's output: the residual add saves nothing) does not run again, nor the collectives at those
    #: outputs. Empty: everything runs again (a post-norm block's last norm saves the sum)
    unreached: tuple[str, ...] = ()

    def reaches(self, modules) -> bool:
        """Whether the recomputation runs past the outputs of all of ``modules`` (FQNs inside the option's
        module), so that the collectives at their outputs run again.

        Example:
            >>> o = RecomputeOption("b", 1, 1, unreached=("b.mlp.proj",))
            >>> o.reaches(["b.attn.qkv", "b.attn.proj"]), o.reaches(["b.mlp.fc", "b.mlp.proj"])
            (True, False)
        """
        return not any(m in self.unreached for m in modules)


@dataclass(frozen=True)
class SequenceParallelLayer:
    """What Megatron sequence parallelism (Korthikanti et al. 2022 §4.2.2) does to a layer with tensor-parallel
    pairs: its residual stream is split over the tp ranks along dim 1 (``sequence`` tokens) outside the pairs.

    ``norms`` (names relative to the layer) run on their rank's tokens; ``sharded_bytes`` of the layer's saved
    activations lie outside the pairs and are divided by t; ``shared_input_bytes`` is what the pairs' first
    linears save of their input without it (once per pair) and ``gathered_bytes`` what they save with it (each
    colwise linear keeps its own all-gathered input); ``norm_params`` the element counts of the norms' parameters
    (their gradients are all-reduced over the tp ranks). ``blocker`` says why the layer cannot run
    sequence-parallel ("" when it can); a legal degree t divides ``sequence``.
    """

    norms: tuple[str, ...] = ()
    sequence: int = 0
    sharded_bytes: int = 0
    shared_input_bytes: int = 0
    gathered_bytes: int = 0
    norm_params: tuple[int, ...] = ()
    blocker: str = ""

    @property
    def possible(self) -> bool:
        return not self.blocker


@dataclass(frozen=True)
class ExpertsLayer:
    """The routed experts of one layer (mixture of experts): what expert parallelism shards and moves.
    ``num_params``: the experts' weights of all ``modules`` experts modules of the layer; ``tokens``: the tokens
    each module is called with over the example batch, each routed to ``top_k`` of ``num_experts`` experts;
    ``hidden``: the width of a token."""

    modules: int
    num_experts: int
    top_k: int
    num_params: int
    tokens: int
    hidden: int
    names: tuple[str, ...] = ()  # the experts modules' FQNs


@dataclass(frozen=True)
class Layer:
    """One link of the layer chain: a module (or a run of ops) between two possible pipeline cuts.

    ``kind`` is a structural signature: two layers with equal ``kind`` have identical costs (the
    transformer blocks of one model), which lets the planner solve them once.

    FLOPs are ``forward_flops`` and ``backward_flops``, as on :class:`ModelGraph`; ``flops`` is the forward
    figure under its short public name.
    """

    name: str
    index: int
    kind: str
    forward_flops: int  # forward FLOPs over the example batch
    backward_flops: int
    num_params: int  # parameters first owned by this layer (a tied weight counts at its first owner only)
    param_bytes: int
    activation_bytes: int  # saved for backward over the example batch, each storage counted once
    output_bytes: int  # bytes that cross the boundary after this layer (what a cut here sends)
    param_names: tuple[str, ...] = ()
    tp_groups: tuple[TensorParallelGroup, ...] = ()
    recompute_options: tuple[RecomputeOption, ...] = ()
    sequence_parallel: SequenceParallelLayer | None = None  # None: no Megatron pair to build on
    # output_bytes and activation_bytes as autocast and as bf16 weights run the layer (None: the precision's bytes)
    autocast: LowPrecisionBytes | None = None
    bf16_weights: LowPrecisionBytes | None = None

    @property
    def flops(self) -> int:
        """Forward FLOPs over the example batch (the public name of ``forward_flops``)."""
        return self.forward_flops

    @property
    def tp_divisor(self) -> int:
        """Largest integer every legal tensor-parallel degree of this layer divides (0: no TP possible)."""
        from math import gcd

        d = 0
        for group in self.tp_groups:
            d = gcd(d, group.divisor)
        return d


@dataclass
class ModelGraph:
    """The traced model: op graph, layer chain and totals. Built by :func:`autoplan.trace`."""

    model_name: str
    layers: list[Layer]
    nx_graph: "networkx.DiGraph"
    batch_size: int  # samples in the example batch the figures are for
    dtype_bytes: int  # bytes per element of the parameters as traced (4 for fp32)
    num_params: int
    forward_flops: int
    backward_flops: int
    input_bytes: int  # bytes of the example inputs
    fingerprint: str
    tied_parameters: list[tuple[str, ...]] = field(default_factory=list)  # groups of FQNs sharing one tensor
    tied_numels: list[int] = field(default_factory=list)  # elements of each tied group's tensor (same order)
    method: str = "fx"  # "fx" (symbolic_trace) or "export" (torch.export, non-strict)
    trace_s: float = 0.0
    # candidate tensor-parallel groups that a numerical check at trace time found unsound: (styles, reason) each
    tp_dropped: list[tuple[dict[str, str], str]] = field(default_factory=list)
    # why the executor cannot split the model into pipeline stages (None: it can); the planner then keeps pp = 1
    pipeline_blocker: str | None = None
    # the routed experts of mixture-of-experts layers, by layer name (empty: no experts module)
    experts: dict[str, ExpertsLayer] = field(default_factory=dict)

    @property
    def param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    @property
    def activation_bytes(self) -> int:
        return sum(layer.activation_bytes for layer in self.layers)

    def layer(self, name: str) -> Layer:
        """The layer called ``name``; ``KeyError`` listing the known names otherwise."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers are: {[l.name for l in self.layers]}")

    def summary(self) -> str:
        """A readable table: layer, params, FLOPs, activation bytes, boundary bytes, with totals."""
        from .explain import format_graph_summary

        return format_graph_summary(self)

    def __str__(self) -> str:
        return self.summary()


def fsdp_blocks_tensor_parallel(layer: Layer) -> bool:
    """Whether FSDP over dp > 1 rules out sharding ``layer`` by tensor parallelism: it holds a fused ``colwise:K``
    projection with a bias, whose one dim tensor parallelism already splits part by part, leaving FSDP no dim
    (:func:`autoplan.execute.tp_styles.fsdp_placement`).

    Example:
        >>> group = TensorParallelGroup({"attn.qkv": "colwise:3", "attn.out": "rowwise"}, 4, 0, 0, 0, 0, 0)
        >>> layer = Layer("attn", 0, "block", 1, 2, 3, 12, 4, 4, param_names=("attn.qkv.weight", "attn.qkv.bias"),
        ...               tp_groups=(group,))
        >>> fsdp_blocks_tensor_parallel(layer)
        True
    """
    return any(fused_parts(style) > 1 and f"{fqn}.bias" in layer.param_names
               for group in layer.tp_groups for fqn, style in group.styles.items())
