"""ParallelModel: a model with a plan applied, trained one global batch at a time on every rank.

- ``train_step(inputs, targets)``: ``inputs`` (a tensor, a tuple of tensors or a dict of keyword inputs, the forms
  :func:`autoplan.plan` takes) and ``targets`` are the GLOBAL batch,
  identical on every rank. Each data-parallel rank takes its contiguous 1/dp slice, splits it into the plan's
  microbatches, runs forward and backward (pipelined when pp > 1) and leaves in ``parameters()`` the gradient of the
  single-device mean loss over the global batch. Returns that mean loss as a float on every rank.
- ``evaluate(inputs, targets)``: the same mean loss, forward only, no gradients.
- ``pm(inputs)``: the model's outputs for ``inputs`` on this rank (pp = 1 only; with pipelining use ``evaluate``).
- ``pm.train()`` / ``pm.eval()``: training or evaluation mode on this rank's modules (dropout and the like).
- ``parameters()``: this rank's parameters (shards under TP/FSDP) for the optimizer.
- ``full_state_dict()``: the unsharded state dict under the original FQNs (tied weights under each name, as
  ``model.state_dict()``), on rank 0; other ranks get ``{}``. Every rank must call it.

``loss_fn(outputs, targets)`` returns the scalar mean over its (micro)batch; the default is cross-entropy over the
last dim for integer targets and mean squared error otherwise. Mixed-precision plans (bf16/fp16) compute in the low
precision with fp32 parameters; fp16 runs without a loss scaler.

Made by :func:`autoplan.parallelize`; when it was given no example inputs and no plan, the first ``train_step``,
``evaluate`` or call plans with that call's inputs as the example (global) batch and applies the plan then. Until
then there are no parameters to optimise, so build the optimizer after the first step::

    pm = autoplan.parallelize(model)
    opt = None
    for inputs, targets in batches:
        loss = pm.train_step(inputs, targets)
        opt = opt or torch.optim.AdamW(pm.parameters(), lr=3e-4)
        opt.step(); opt.zero_grad()

Example (a world of one):
    >>> import torch, autoplan
    >>> from autoplan.models import MLP
    >>> from autoplan.execute.manual import manual_plan
    >>> model = MLP(8, 16, depth=2)
    >>> pm = autoplan.parallelize(model, plan=manual_plan(model, [[""]], global_batch_size=4, microbatches=2))
    >>> loss = pm.train_step(torch.randn(4, 8), torch.randn(4, 8))
    >>> isinstance(loss, float), sorted(pm.full_state_dict()) == sorted(MLP(8, 16, depth=2).state_dict())
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from ..plan import Plan
from .apply import AppliedPlan
from .batch import Inputs, as_args, check_targets, checked_loss, guard_token_ids
from .mesh import rank_at
from .experts import fill_expert_gradients
from .guards import check_ddp_gradients, fail_together
from .materialize import held_tensors
from .pipeline import average_microbatch_gradients, sync_tied_gradients
from .tensor_parallel import reduce_sequence_parallel_gradients

__all__ = ["ParallelModel"]


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


class ParallelModel:
    """See the module docstring. Build with :func:`autoplan.parallelize`."""

    def __init__(self, loss_fn: Callable | None, applied: AppliedPlan | None = None,
                 pending: Callable[[tuple], AppliedPlan] | None = None):
        self.loss_fn = checked_loss(loss_fn)
        self._applied = applied
        self._pending = pending

    # -- lazy application ----------------------------------------------------------------------------------
    def _ready(self, inputs: Any = None) -> AppliedPlan:
        if self._applied is None:
            if inputs is None:
                raise ValueError(
                    "this ParallelModel plans at its first train_step/evaluate/call (no example inputs were given "
                    "to autoplan.parallelize), so it has no parameters or plan yet; call train_step first and build "
                    "the optimizer after it, or pass example_inputs (or plan) to autoplan.parallelize"
                )
            self._applied = self._pending(as_args(inputs))
            self._pending = None
        return self._applied

    @property
    def plan(self) -> Plan:
        """The plan in force (planned on rank 0 and broadcast, or the one given)."""
        return self._ready().plan

    @property
    def applied(self) -> bool:
        """Whether the plan has been applied (``False`` until the first call when planning is deferred)."""
        return self._applied is not None

    # -- parameters -------------------------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their original FQNs (each tensor once).

        Example: ``dict(pm.named_parameters())["blocks.0.attn.qkv.weight"]``
        """
        seen: set[int] = set()
        for stage in self._ready().stages:
            for name, param in stage.module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield name, param

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters, for the optimizer: ``torch.optim.AdamW(pm.parameters())``.

        Example: ``opt = torch.optim.AdamW(pm.parameters(), lr=3e-4)``
        """
        for _, param in self.named_parameters():
            yield param

    @property
    def modules_on_rank(self) -> list[nn.Module]:
        """The stage modules this rank holds (the whole model when pp = 1), with the original FQNs."""
        return [stage.module for stage in self._ready().stages]

    def train(self, mode: bool = True) -> "ParallelModel":
        """Set training mode (dropout, batch-norm statistics) on this rank's modules, as ``nn.Module.train``.

        Example: ``pm.eval(); loss = pm.evaluate(x, y); pm.train()``
        """
        for module in self.modules_on_rank:
            module.train(mode)
        return self

    def eval(self) -> "ParallelModel":
        """Set evaluation mode on this rank's modules (``train(False)``); ``evaluate`` does not switch modes itself.

        Example: ``pm.eval()``
        """
        return self.train(False)

    # -- running ----------------------------------------------------------------------------------------------
    def _autocast(self, a: AppliedPlan):
        if a.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(a.device.type, dtype=a.autocast_dtype)

    def _local_batch(self, a: AppliedPlan, inputs: Any, targets: Any) -> tuple[Inputs, Any]:
        """Checks that fail alike on every rank (the same global batch everywhere), then this rank's slice."""
        batch = Inputs.of(inputs)
        size = batch.batch_size
        if size != a.plan.global_batch_size:
            raise ValueError(
                f"got a batch of {size} samples but the plan is for global_batch_size {a.plan.global_batch_size}; "
                f"pass batches of {a.plan.global_batch_size} (the global batch, identical on every rank) or re-plan "
                f"with global_batch_size={size}"
            )
        check_targets(targets, size, "train_step/evaluate")
        guard_token_ids(self.modules_on_rank)
        dp, dp_rank = a.plan.mesh.dp, a.coords["dp"]
        batch = batch.chunk(dp, dp_rank).map(lambda v: _to(v, a.device))
        if a.step_kwargs:  # e.g. no generation cache in a training step, as the plan was traced
            batch = Inputs(batch.args, {**a.step_kwargs, **batch.kwargs})
        return batch, _to(Inputs((targets,)).chunk(dp, dp_rank).args[0], a.device)

    def train_step(self, inputs: Any, targets: torch.Tensor) -> float:
        """Forward and backward over the global batch; returns its mean loss on every rank. Call the optimizer's
        ``step()`` and ``zero_grad()`` after it.

        Example: ``loss = pm.train_step(tokens, next_tokens); opt.step(); opt.zero_grad()``
        """
        a, args, targets = self._prepare(inputs, targets)
        with fail_together("train_step", sync=False):  # its loss collectives end it
            loss = self._run(a, args, targets, backward=True)
            if a.plan.sequence_parallel:
                reduce_sequence_parallel_gradients(self.modules_on_rank)
            # every name of a tied weight (named_parameters lists it once, under whichever name comes first)
            sync_tied_gradients(a.tied_groups, held_tensors([s.module for s in a.stages]))
            if a.plan.expert_parallel > 1:
                fill_expert_gradients(self.modules_on_rank)
            mean = self._global_mean(a, loss)
        if isinstance(a.stages[0].runner, DistributedDataParallel):  # after the step's collectives: alike on all
            check_ddp_gradients(self.named_parameters())
        return mean

    @torch.no_grad()
    def evaluate(self, inputs: Any, targets: torch.Tensor) -> float:
        """The global batch's mean loss, forward only; on every rank.

        Example: ``val_loss = pm.evaluate(tokens, next_tokens)``
        """
        a, args, targets = self._prepare(inputs, targets)
        with fail_together("evaluate", sync=False):  # its loss collectives end it
            return self._global_mean(a, self._run(a, args, targets, backward=False))

    def _prepare(self, inputs: Any, targets: torch.Tensor) -> tuple[AppliedPlan, tuple, Any]:
        """Checks that fail alike on every rank (before any collective), then this rank's slice of the batch."""
        a = self._ready(inputs)
        if a.uninitialized:
            raise ValueError(
                "the model was built on meta and parallelized with init_weights=False, so its weights are "
                "uninitialized memory; call pm.load_state_dict(...), autoplan.load_safetensors(pm, ...) or "
                "pm.load_checkpoint(...) first (or parallelize without init_weights=False)"
            )
        args, targets = self._local_batch(a, inputs, targets)
        return a, args, targets

    def _run(self, a: AppliedPlan, args: tuple, targets: Any, *, backward: bool) -> torch.Tensor:
        """This rank's part of the global batch through the model (pipelined when pp > 1): the loss."""
        run = self._accumulate if a.schedule is None else self._pipeline
        loss = run(a, args, targets, backward=backward)
        if not backward:
            self._reshard()
        return loss

    def _reshard(self) -> None:
        """Free FSDP units' gathered weights after a forward-only run: under several microbatches or a pipeline
        they are kept after forward (``reshard_after_forward=False``) for a backward that will not come."""
        for root in self.modules_on_rank:
            for module in root.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def __call__(self, *inputs: Any, **keyword_inputs: Any) -> Any:
        """The model's outputs for ``inputs`` on this rank (with TP, every rank of a TP group gets the same):
        positional inputs, keyword inputs, or one dict of keyword inputs (``pm({"input_ids": ids})``, the form
        :func:`autoplan.plan` takes). Needs pp = 1: a pipelined model has no single rank holding the whole forward.

        Example: ``logits = pm(tokens)``
        """
        batch = Inputs(inputs, keyword_inputs) if keyword_inputs else Inputs.of(inputs)
        a = self._ready(batch)
        if a.schedule is not None:
            raise ValueError(
                "pm(inputs) needs a plan without pipeline parallelism (pp = 1), this one has "
                f"pp = {a.plan.mesh.pp}; use pm.evaluate(inputs, targets) for a loss"
            )
        stage = a.stages[0]
        runner = stage.runner.module if isinstance(stage.runner, DistributedDataParallel) else stage.runner
        guard_token_ids(self.modules_on_rank)
        batch = batch.map(lambda v: _to(v, a.device))
        with self._autocast(a):
            outputs = runner(*batch.args, **batch.kwargs)
        self._reshard()
        return outputs

    forward = __call__

    def _accumulate(self, a: AppliedPlan, args: Inputs, targets: torch.Tensor, backward: bool) -> torch.Tensor:
        count = a.plan.microbatches
        runner = a.stages[0].runner
        total = torch.zeros((), device=a.device)
        targets_mb = [t.args[0] for t in Inputs((targets,)).split(count)]
        for i, (mb, mb_targets) in enumerate(zip(args.split(count), targets_mb)):
            last = i == count - 1
            sync = nullcontext()
            if backward and isinstance(runner, DistributedDataParallel) and not last:
                sync = runner.no_sync()
            if backward and isinstance(runner, FSDPModule) and a.plan.fsdp_keeps_weights:
                # Reduce and reshard once, after the last microbatch: the weights stay gathered in between
                # (reshard_after_forward=False, see autoplan.cost.fsdp_keeps_weights), one all-gather per step.
                # Resharding per microbatch (fsdp_reshard="microbatch") keeps FSDP2's defaults: every backward
                # reshards and reduce-scatters.
                runner.set_requires_gradient_sync(last)
                runner.set_reshard_after_backward(last)
            with sync:
                with self._autocast(a):
                    loss = self.loss_fn(runner(*mb.args, **mb.kwargs), mb_targets)
                if backward:
                    (loss / count).backward()
            total += loss.detach().float()
        return total / count

    def _pipeline(self, a: AppliedPlan, args: Inputs, targets: torch.Tensor, backward: bool) -> torch.Tensor:
        indices = [s.index for s in a.stages]
        first, last = 0 in indices, len(a.plan.stages) - 1 in indices
        losses: list[torch.Tensor] = []
        step = a.schedule.step if backward else a.schedule.eval
        with self._autocast(a):
            kwargs = {"return_outputs": False} if backward else {}
            if a.inputs_to_every_stage:  # skeleton stages each run the model's forward on the model inputs
                step(model_inputs=(args.args, args.kwargs), target=targets if last else None, losses=losses, **kwargs)
            else:
                step(*(args.args if first else ()), **(args.kwargs if first else {}),
                     target=targets if last else None, losses=losses, **kwargs)
        if backward:
            average_microbatch_gradients([s.runner for s in a.stages], a.plan.microbatches)
        loss = torch.stack([l.detach().float() for l in losses]).mean() if last else torch.zeros((), device=a.device)
        pp = a.plan.mesh.pp
        src = rank_at(a.plan.mesh, (len(a.plan.stages) - 1) % pp, a.coords["dp"], a.coords["tp"])
        dist.broadcast(loss, src=src, group=a.mesh.get_group("pp"))  # no sub-mesh built per step
        return loss

    def _global_mean(self, a: AppliedPlan, loss: torch.Tensor) -> float:
        if a.plan.mesh.dp > 1:
            dist.all_reduce(loss, group=a.mesh.get_group("dp"))
            loss = loss / a.plan.mesh.dp
        return float(loss)

    # -- state ------------------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU tensors under the model's original state-dict keys on rank 0; ``{}`` on other ranks.
        Collective: every rank must call it.

        Example: ``sd = pm.full_state_dict(); if rank == 0: torch.save(sd, "model.pt")``
        """
        a = self._ready()
        local: dict[str, torch.Tensor] = {}
        for stage in a.stages:
            for name, tensor in stage.module.state_dict(keep_vars=True).items():
                if name in local:
                    continue
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                local[name] = full.detach().cpu().clone()
        if not a.world.distributed:
            return {k: local[k] for k in a.state_keys if k in local}
        if a.coords["dp"] or a.coords["tp"]:
            local = {}  # after full_tensor() every dp/tp rank of a stage holds the same tensors: send one copy
        gathered: list[dict] | None = [None] * a.world.size if a.world.rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if a.world.rank != 0:
            return {}
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            for name, tensor in part.items():
                merged.setdefault(name, tensor)
        missing = [k for k in a.state_keys if k not in merged]
        if missing:
            raise RuntimeError(f"full_state_dict: no rank holds {missing}; the plan's stages do not cover them")
        return {k: merged[k] for k in a.state_keys}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor] | None) -> None:
        """Load full (unsharded) tensors under the original names into this rank's shards, for any layout. Every
        rank calls it: with the dict, or rank 0 with it and the others with ``None``. Tied weights need one name
        of their group. See :mod:`autoplan.execute.state_dict`.

        Example: ``pm.load_state_dict(torch.load("model.pt") if rank == 0 else None)``
        """
        from .state_dict import load_full_state_dict

        load_full_state_dict(self, state_dict)

    def save_checkpoint(self, path: str, optimizer: torch.optim.Optimizer | None = None, extra: Any = None,
                        async_save: bool = False):
        """Write a sharded checkpoint (model, optimizer, ``extra``) to the folder ``path`` with
        ``torch.distributed.checkpoint``; every rank writes its part. Loads under any plan and world size. With
        ``async_save=True`` returns a future to wait on. Collective. See :mod:`autoplan.execute.checkpoint`.

        Example: ``pm.save_checkpoint(f"ckpt/step{step}", optimizer=opt, extra={"step": step})``
        """
        from .checkpoint import save

        return save(self, path, optimizer, extra, async_save)

    def load_checkpoint(self, path: str, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """Read a checkpoint written by :meth:`save_checkpoint` under any plan into this rank's shards (and
        ``optimizer``, built over ``pm.parameters()``); returns its ``extra``. Collective.

        Example: ``extra = pm.load_checkpoint("ckpt/step100", optimizer=opt)``
        """
        from .checkpoint import load

        return load(self, path, optimizer)
