"""Memory terms of the cost model: model states (weights, gradients, optimizer states, ZeRO sharding), the
low-precision weight copy autocast keeps, and the cross-entropy loss buffers.

Example:
    >>> from autoplan.cost.memory import model_state_bytes
    >>> model_state_bytes(1_000_000, "bf16", "adamw", dp=4, data_parallel="fsdp")
    4000000
"""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import ceil_div as _ceil_div
from .._checks import check_non_negative as _check_non_negative
from .._checks import check_positive_int as _check_positive_int
from .._checks import check_precision as _check_precision
from ..mixed_precision import mixed_precision_mode
from ..plan import Mesh
from ..vocabulary import DATA_PARALLEL_KINDS, OPTIMIZERS, PRECISION_BYTES

__all__ = ["StateBytes", "state_bytes_per_param", "zero_model_state_bytes", "model_state_bytes",
           "cross_entropy_bytes", "autocast_weight_copy_bytes", "holds_weight_copy"]


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter held for training, before any sharding."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def state_bytes_per_param(precision: str, optimizer: str) -> StateBytes:
    """Bytes per parameter for weights, gradients and optimizer states (ZeRO, Rajbhandari et al. 2020, §3.1).

    fp32 + AdamW: 4 (weight) + 4 (grad) + 8 (m, v). Mixed precision (bf16/fp16) + AdamW: 2 + 2 + 12 (fp32 master
    copy, m, v) — the paper's "16Ψ" with K = 12. SGD with momentum keeps one state: fp32 4 + 4 + 4; mixed
    2 + 2 + 8 (fp32 master, momentum).

    Example:
        >>> state_bytes_per_param("bf16", "adamw")
        StateBytes(params=2, grads=2, optimizer=12)
        >>> state_bytes_per_param("fp32", "sgd").total
        12
    """
    _check_precision(precision)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {OPTIMIZERS}")
    element = PRECISION_BYTES[precision]
    mixed = precision != "fp32"
    # Optimizer states are fp32 (4 bytes each); mixed precision adds the fp32 master weights (ZeRO §3.1).
    states = 2 if optimizer == "adamw" else 1
    return StateBytes(params=element, grads=element, optimizer=4 * (states + (1 if mixed else 0)))


def zero_model_state_bytes(num_params: int, dp: int, stage: int, precision: str = "bf16",
                           optimizer: str = "adamw") -> int:
    """ZeRO stage 0/1/2/3 model-state bytes per device (ZeRO §5, Figure 1).

    With p, g, k the bytes per parameter of weights, gradients and optimizer states and Ψ parameters over
    N_d data-parallel ranks: stage 0 (p + g + k)Ψ; stage 1 (P_os) (p + g)Ψ + kΨ/N_d; stage 2 (P_os+g)
    pΨ + (g + k)Ψ/N_d; stage 3 (P_os+g+p) (p + g + k)Ψ/N_d. A shard holds ⌈Ψ/N_d⌉ parameters.

    Example (the paper's Figure 1: 7.5B parameters, 64-way DP, K = 12):
        >>> [round(zero_model_state_bytes(7_500_000_000, 64, s) / 1e9, 1) for s in (0, 1, 2, 3)]
        [120.0, 31.4, 16.6, 1.9]
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be an int ≥ 0, got {num_params!r}")
    _check_positive_int("dp", dp)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    b = state_bytes_per_param(precision, optimizer)
    shard = _ceil_div(num_params, dp)
    replicated_bytes = {0: b.total, 1: b.params + b.grads, 2: b.params, 3: 0}[stage]
    sharded_bytes = b.total - replicated_bytes
    return num_params * replicated_bytes + shard * sharded_bytes


def model_state_bytes(num_params: int, precision: str, optimizer: str, dp: int, data_parallel: str) -> int:
    """Weights + gradients + optimizer states of ``num_params`` on one device; FSDP shards all three by ``dp``.

    DDP keeps a full replica (ZeRO stage 0); FSDP (FSDP2 ``fully_shard``) shards parameters, gradients and
    optimizer states (ZeRO stage 3). The unsharded parameters FSDP gathers for one layer at a time are
    transient and belong to the caller's activation/transient accounting.

    Example:
        >>> model_state_bytes(1_000_000, "bf16", "adamw", dp=4, data_parallel="ddp")
        16000000
        >>> model_state_bytes(1_000_000, "bf16", "adamw", dp=4, data_parallel="fsdp")
        4000000
    """
    if data_parallel not in DATA_PARALLEL_KINDS:
        raise ValueError(f"unknown data_parallel {data_parallel!r}; use one of {DATA_PARALLEL_KINDS}")
    stage = 3 if data_parallel == "fsdp" else 0
    return zero_model_state_bytes(num_params, dp, stage, precision, optimizer)


def cross_entropy_bytes(logits_elements: float) -> int:
    """Peak bytes a cross-entropy loss over ``logits_elements`` logits adds at the start of backward.

    ``F.cross_entropy`` is log_softmax + nll_loss and runs in fp32 (also under autocast, whose fp32 op list
    holds both): it keeps the fp32 log-probabilities for backward, and backward briefly holds their gradient
    and the logits' gradient beside them: 3 × 4 bytes per logit. The traced model ends at the logits, so this
    is not in any layer's figures; for a GPT with a 50k vocabulary it rivals the activations of several blocks.

    Example:
        >>> cross_entropy_bytes(8 * 1024 * 50304) / 2**30       # GPT-2 vocabulary, 8 × 1024 tokens
        4.60546875
    """
    _check_non_negative("logits_elements", logits_elements)
    return int(3 * 4 * logits_elements)


def autocast_weight_copy_bytes(matmul_params: int, precision: str, data_parallel: str, dp: int) -> int:
    """Low-precision copies of the matmul weights that ``torch.autocast`` keeps for backward, on one device.

    Under autocast (what the executor runs for DDP and for dp = 1) the parameters stay fp32 and each matmul
    casts its weight to bf16/fp16; the linear saves that copy for its input gradient, so it lives until the
    backward: 2 bytes × the matmul parameters (after TP). Autocast caches the cast of a leaf tensor for the
    whole autocast region (``torch.autocast(cache_enabled=True)``, the default; the cache is cleared when the
    outermost region exits), so every microbatch run inside one region shares one copy: the executor enters a
    region per microbatch without pipelining (its backward ends before the next forward) and one region around
    the whole pipeline schedule, so one copy is alive at any time, not one per microbatch in flight (checked:
    two forwards in one region save the same bf16 weight storage, two regions two). Under FSDP (dp > 1,
    ``MixedPrecisionPolicy(param_dtype=bf16)``) the all-gathered bf16 parameters take its place: they are the
    per-layer FSDP transient, freed after each layer and gathered again for its backward (PyTorch FSDP2
    ``fully_shard`` docs, ``reshard_after_forward``), so there is no separate copy. DDP composed with tensor or
    pipeline parallelism runs FSDP2's ``replicate`` with the same policy instead of autocast: its bf16
    unsharded parameters stay from forward to backward (replicate does not reshard), again one copy, of every
    parameter (norms, embeddings and routed experts too: :func:`autoplan.cost.plan_cost.weight_copy_bytes`). fp32
    casts nothing. The routed experts of a
    mixture-of-experts layer are not among the matmul parameters: whether a copy of them is kept depends on their
    kernel (:func:`autoplan.cost.experts.kept_expert_copy_params`).

    Example:
        >>> autocast_weight_copy_bytes(1_000_000, "bf16", "ddp", dp=8)
        2000000
        >>> autocast_weight_copy_bytes(1_000_000, "bf16", "fsdp", dp=8), autocast_weight_copy_bytes(1_000_000,
        ...     "fp32", "ddp", dp=8)
        (0, 0)
    """
    if isinstance(matmul_params, bool) or not isinstance(matmul_params, int) or matmul_params < 0:
        raise ValueError(f"matmul_params must be an int ≥ 0, got {matmul_params!r}")
    _check_precision(precision)
    _check_positive_int("dp", dp)
    if data_parallel not in DATA_PARALLEL_KINDS:
        raise ValueError(f"unknown data_parallel {data_parallel!r}; use one of {DATA_PARALLEL_KINDS}")
    if not holds_weight_copy(mixed_precision_mode(precision, data_parallel, Mesh(dp=dp))):
        return 0
    return matmul_params * PRECISION_BYTES[precision]


def holds_weight_copy(mixed_precision: str) -> bool:
    """Whether a layout run in ``mixed_precision`` (:func:`autoplan.mixed_precision.mixed_precision_mode`) keeps a
    low-precision copy of its matmul weights from forward to backward: autocast and ``replicate`` do; fp32 casts
    nothing and FSDP frees its gathered low-precision weights after each layer.

    Example:
        >>> [holds_weight_copy(m) for m in ("fp32", "autocast", "fsdp", "replicate")]
        [False, True, False, True]
    """
    return mixed_precision in ("autocast", "replicate")

