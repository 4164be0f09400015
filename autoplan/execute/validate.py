"""Check a plan against a model and a world before anything is changed, so that nothing is half-applied.

Example:
    >>> import torch, autoplan
    >>> from autoplan.execute.validate import check_plan_matches
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> plan = autoplan.Plan.example()
    >>> try:
    ...     check_plan_matches(plan, model, world_size=1)
    ... except autoplan.PlanMismatchError as e:
    ...     print("mismatch")
    mismatch
"""

from __future__ import annotations

from torch import nn

from ..errors import PlanMismatchError
from ..names import owner_index, tied_holders, tied_parameter_names
from ..trace.fingerprint import model_fingerprint
from ..trace.opgraph import is_conv1d
from ..trace.tp_groups import linear_features
from ..vocabulary import fused_parts, part_sizes, tp_style_kind
from ..plan import Plan

__all__ = ["check_plan_matches", "owning_layer"]

_STYLE_MODULES = {
    "colwise": nn.Linear,
    "rowwise": nn.Linear,
    "vocab_embedding": nn.Embedding,
    "vocab_head": nn.Linear,
}

_REPLAN = "re-plan for this model and job with autoplan.plan(model, example_inputs, cluster=...) or pass plan=None"


def owning_layer(fqn: str, layers: tuple[str, ...]) -> str | None:
    """The plan layer that contains module ``fqn`` (itself or an ancestor), or ``None``.

    Example:
        >>> owning_layer("blocks.0.attn.qkv", ("tok", "blocks.0")), owning_layer("head", ("tok", "blocks.0"))
        ('blocks.0', None)
    """
    i = owner_index(fqn, layers)
    return None if i is None else layers[i]


def check_plan_matches(plan: Plan, model: nn.Module, world_size: int) -> None:
    """Raise :class:`autoplan.PlanMismatchError` when ``plan`` was made for another model or world size, or names
    modules the model does not have (or of the wrong kind for their tensor-parallel style).

    Example:
        >>> import torch, autoplan
        >>> from autoplan.trace.fingerprint import model_fingerprint
        >>> from autoplan.plan import ModelInfo
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> p = autoplan.Plan.example().replace(model=ModelInfo("Sequential", model_fingerprint(m), 20),
        ...                                     stages=(autoplan.Stage(("0",)),))
        >>> check_plan_matches(p, m, world_size=1)
    """
    fingerprint = model_fingerprint(model)
    if plan.model.fingerprint != fingerprint:
        raise PlanMismatchError(
            f"the plan was made for model {plan.model.name!r} (fingerprint {plan.model.fingerprint}) but this is "
            f"{type(model).__name__!r} (fingerprint {fingerprint}); {_REPLAN}"
        )
    if plan.mesh.world_size != world_size:
        raise PlanMismatchError(
            f"the plan's mesh {plan.mesh} needs {plan.mesh.world_size} ranks but this job has {world_size}; "
            f"launch with torchrun --nproc_per_node/--nnodes totalling {plan.mesh.world_size} ranks, or {_REPLAN}"
        )
    modules = dict(model.named_modules())
    layers = plan.layers
    missing = [fqn for fqn in layers if fqn not in modules]
    if missing:
        raise PlanMismatchError(f"the plan's stages name modules {missing} that this model does not have; {_REPLAN}")
    for index, stage in enumerate(plan.stages):
        for fqn in stage.recompute:
            if fqn not in modules:
                raise PlanMismatchError(f"the plan recomputes module {fqn!r}, which this model lacks; {_REPLAN}")
            if owning_layer(fqn, stage.layers) is None:
                raise PlanMismatchError(
                    f"stage {index} recomputes {fqn!r}, which is not inside its layers {list(stage.layers)}; {_REPLAN}"
                )
    if plan.mesh.dp > 1 and len(plan.stages) > plan.mesh.pp:
        stage_of = {layer: k for k, stage in enumerate(plan.stages) for layer in stage.layers}
        for name, held in tied_holders(tied_parameter_names(model), layers):
            stages = sorted({stage_of[layers[i]] for i in held})
            ranks = [k % plan.mesh.pp for k in stages]
            if len(set(ranks)) < len(ranks):
                raise PlanMismatchError(
                    f"stages {stages} hold the tied weight {name!r} and two of them run on one pipeline rank "
                    f"(stage k on rank k mod pp = {plan.mesh.pp}); data parallelism (dp = {plan.mesh.dp}) cannot "
                    f"wrap one parameter in two stage modules. Move the stage boundaries, use dp = 1 or the 1f1b "
                    f"or gpipe schedule, or {_REPLAN}"
                )
    for fqn, style in plan.tensor_parallel.items():
        if fqn not in modules:
            raise PlanMismatchError(
                f"the plan shards module {fqn!r} ({style}) but this model has no such module; {_REPLAN}"
            )
        if style == "sequence":  # a norm: SequenceParallel replicates whatever weights it has
            continue
        # colwise:K, colwise:a+b+c: fused parts, each split over tp
        fused, parts, style = style, fused_parts(style), tp_style_kind(style)
        kind = _STYLE_MODULES[style]
        conv1d = style in ("colwise", "rowwise") and is_conv1d(modules[fqn])  # GPT-2's transposed linear
        if not (isinstance(modules[fqn], kind) or conv1d):
            raise PlanMismatchError(
                f"tensor_parallel[{fqn!r}] = {style!r} needs an nn.{kind.__name__} but the module is "
                f"{type(modules[fqn]).__name__}; {_REPLAN}"
            )
        module = modules[fqn]
        sharded_dim = {"colwise": "out_features", "vocab_head": "out_features", "rowwise": "in_features",
                       "vocab_embedding": "num_embeddings"}[style]
        features = getattr(module, sharded_dim) if not conv1d else linear_features(module)[style == "colwise"]
        sizes = part_sizes(fused, features)
        if sum(sizes) != features:
            raise PlanMismatchError(
                f"tensor_parallel[{fqn!r}] = {fused!r} cuts {sharded_dim}={features} into parts {list(sizes)}, "
                f"which do not add up to it; {_REPLAN}"
            )
        size = next((s for s in sizes if s % plan.mesh.tp), sizes[0])
        if size % plan.mesh.tp:
            raise PlanMismatchError(
                f"tensor_parallel[{fqn!r}] = {style!r} splits {sharded_dim}={size} over tp={plan.mesh.tp} ranks, "
                f"which does not divide it; {_REPLAN}"
            )
        if owning_layer(fqn, layers) is None and plan.mesh.pp > 1:
            raise PlanMismatchError(
                f"the plan shards {fqn!r}, which lies outside every pipeline stage's layers; {_REPLAN}"
            )
        one_dim = [name for name, p in module.named_parameters(recurse=False) if p.dim() == 1]
        if parts > 1 and one_dim and plan.data_parallel == "fsdp" and plan.mesh.dp > 1:
            raise PlanMismatchError(
                f"tensor_parallel[{fqn!r}] = {fused} splits the fused projection's 1-D {one_dim[0]} part by "
                f"part over tp, which leaves FSDP (dp={plan.mesh.dp}) no dim to shard it on; plan with "
                f"data_parallel='ddp', or leave {fqn!r} unsharded ({_REPLAN})"
            )
