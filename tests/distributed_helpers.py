"""Executor test support: the layouts checked for numerics, a torchrun launcher for one world that runs many
layouts, and the single-process reference they are compared with."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from autoplan.models import GPT, MLP, Attention, Block, GPTConfig

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("execute_worker.py")
GLOBAL_BATCH = 16
STEPS = 2  # the second step's loss and the final weights depend on the first step's gradients and AdamW's state
LR = 1e-3

GPT_CONFIG = GPTConfig(vocab_size=64, seq_len=8, hidden=32, layers=6, heads=4)
GPT_LAYERS = ["tok", "pos"] + [f"blocks.{i}" for i in range(6)] + ["ln_f", "head"]
MLP_DEPTH = 8  # Linear+ReLU pairs, then a Linear: 17 modules
MLP_LAYERS = [f"layers.{i}" for i in range(2 * MLP_DEPTH + 1)]


class Core(torch.nn.Module):
    """QKᵀ, causal softmax and ·V with the scores materialised (Megatron-LM's ``CoreAttention``)."""

    def forward(self, q, k, v):
        T = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(causal, float("-inf")).softmax(-1) @ v


class NestedAttention(Attention):
    """The GPT's attention with its core in a module of its own, two levels inside a block (``attn.core``)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.core = Core()

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).unbind(dim=3)  # -1: a tensor-parallel shard too
        out = self.core(*(t.transpose(1, 2) for t in (q, k, v)))
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))


def with_nested_cores(model: GPT, cfg: GPTConfig) -> GPT:
    """``model`` with each block's attention replaced by a :class:`NestedAttention` holding the same weights."""
    for block in model.blocks:
        attn = NestedAttention(cfg)
        attn.load_state_dict(block.attn.state_dict())
        block.attn = attn
    return model


class PostNormBlock(Block):
    """The GPT block with its norms after the residual adds (the original Transformer's and BERT's order): the
    second norm saves the sum, so a checkpoint's recomputation runs through the block's last projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


def with_post_norm(model: GPT) -> GPT:
    """``model`` with each block's forward in :class:`PostNormBlock`'s order (same modules, same weights)."""
    for block in model.blocks:
        block.__class__ = PostNormBlock
    return model


def build_model(kind: str) -> torch.nn.Module:
    """``gpt``, ``gpt-core`` (the same GPT, its attention cores nested modules), ``gpt-postnorm`` (the same GPT,
    its blocks post-norm) or ``mlp``."""
    torch.manual_seed(1234)
    if kind == "gpt-core":
        return with_nested_cores(GPT(GPT_CONFIG), GPT_CONFIG)
    if kind == "gpt-postnorm":
        return with_post_norm(GPT(GPT_CONFIG))
    return GPT(GPT_CONFIG) if kind == "gpt" else MLP(16, 32, depth=MLP_DEPTH)


def batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same global batches on every rank and in the reference."""
    g = torch.Generator().manual_seed(99)
    out = []
    for _ in range(STEPS):
        if kind.startswith("gpt"):
            tokens = torch.randint(0, GPT_CONFIG.vocab_size, (GLOBAL_BATCH, GPT_CONFIG.seq_len + 1), generator=g)
            out.append((tokens[:, :-1], tokens[:, 1:]))
        else:
            out.append((torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 16, generator=g)))
    return out


def _stages(kind: str, count: int) -> list[list[str]]:
    if kind == "gpt":
        units = [["tok", "pos"]] + [[f"blocks.{i}"] for i in range(6)] + [["ln_f", "head"]]
    else:
        units = [[f"layers.{2 * i}", f"layers.{2 * i + 1}"] for i in range(MLP_DEPTH)]
        units[-1].append(f"layers.{2 * MLP_DEPTH}")
    per = len(units) // count
    return [sum(units[i * per:(i + 1) * per], []) for i in range(count)]


def tp_styles(kind: str, sequence_parallel: bool = False) -> dict[str, str]:
    if kind == "mlp":
        return {f"layers.{4 * i + j}": style for i in range(MLP_DEPTH // 2)
                for j, style in ((0, "colwise"), (2, "rowwise"))}
    styles = {"tok": "vocab_embedding", "head": "vocab_head"}
    for i in range(GPT_CONFIG.layers):
        styles.update({f"blocks.{i}.attn.qkv": "colwise", f"blocks.{i}.attn.proj": "rowwise",
                       f"blocks.{i}.mlp.fc": "colwise", f"blocks.{i}.mlp.proj": "rowwise"})
        if sequence_parallel:
            styles.update({f"blocks.{i}.ln1": "sequence", f"blocks.{i}.ln2": "sequence"})
    return styles


def layout(kind: str, name: str, *, pp=1, dp=1, tp=1, data_parallel="ddp", schedule="1f1b",
           recompute=False, precision="fp32", stages=None, sequence_parallel=False) -> dict:
    """A case for the worker: manual_plan arguments (JSON-able) under a readable name."""
    virtual = 2 if schedule == "interleaved" else 1
    if stages is None:
        stages = _stages(kind, pp * virtual) if pp > 1 else [GPT_LAYERS if kind == "gpt" else MLP_LAYERS]
    rc = [f"blocks.{i}" for i in range(6)] if kind == "gpt" else [f"layers.{2 * i}" for i in range(MLP_DEPTH)]
    return {
        "name": f"{kind}:{name}{':recompute' if recompute else ''}{'' if precision == 'fp32' else ':' + precision}",
        "kind": kind,
        "plan": dict(stages=stages, pp=pp, dp=dp, tp=tp, global_batch_size=GLOBAL_BATCH,
                     microbatches=4 if pp > 1 else 2, schedule=schedule, data_parallel=data_parallel,
                     tensor_parallel=tp_styles(kind, sequence_parallel) if tp > 1 else {},
                     recompute=rc if recompute else [], precision=precision,
                     **({"sequence_parallel": True} if sequence_parallel else {})),
    }


#: Layouts also run with recompute: one per way recompute meets a wrapper (FSDP units, DTensor under TP, a
#: pipeline stage, interleaved virtual stages); the quick smoke world adds fsdp2xtp2 and dp2xpp2-1f1b.
RECOMPUTED_LAYOUTS = ("fsdp4", "tp4", "dp2xtp2", "fsdp2xpp2-1f1b", "pp4-interleaved", "pp2xtp2-1f1b-sp")


def all_layouts(kind: str) -> list[dict]:
    """Every layout and each schedule where pp > 1, some also with recompute (:data:`RECOMPUTED_LAYOUTS`); then
    bf16 mixed precision through each data-parallel wrapper (DDP with autocast, replicate, FSDP2) and the
    pipeline on the GPT, through DDP and a pipeline on the MLP."""
    base = [("dp4", dict(dp=4)), ("fsdp4", dict(dp=4, data_parallel="fsdp")), ("tp4", dict(tp=4)),
            ("dp2xtp2", dict(dp=2, tp=2)), ("fsdp2xtp2", dict(dp=2, tp=2, data_parallel="fsdp")),
            ("fsdp2xpp2-1f1b", dict(pp=2, dp=2, data_parallel="fsdp"))]
    # Each schedule runs under pure pp and under pp×tp; replicated pipelines (DDP over pp) under 1F1B. The MLP
    # (no embeddings, no tied weight) repeats only what differs for a plain stack of linears.
    schedules = {"pp4": ("gpipe", "interleaved"), "dp2xpp2": ("1f1b",),
                 "pp2xtp2": ("gpipe", "1f1b", "interleaved") if kind == "gpt" else ("interleaved",)}
    meshes = {"pp4": dict(pp=4), "dp2xpp2": dict(pp=2, dp=2), "pp2xtp2": dict(pp=2, tp=2)}
    base += [(f"{mesh}-{schedule}", dict(meshes[mesh], schedule=schedule))
             for mesh, names in schedules.items() for schedule in names]
    if kind == "gpt":  # pp2×tp2 under 1F1B with sequence parallelism: each stage splits and gathers its piece
        base = [(f"{name}-sp", dict(kw, sequence_parallel=True)) if name == "pp2xtp2-1f1b" else (name, kw)
                for name, kw in base]
    cases = [layout(kind, name, recompute=rc, **kw) for name, kw in base
             for rc in ((False, True) if name in RECOMPUTED_LAYOUTS else (False,))]
    if kind == "gpt":  # sequence parallelism splits the blocks' residual stream around their norms
        cases += [layout(kind, "tp4-sp", tp=4, sequence_parallel=True),
                  layout(kind, "fsdp2xtp2-sp", dp=2, tp=2, data_parallel="fsdp", sequence_parallel=True,
                         recompute=True)]
    mixed = [("dp4", dict(dp=4)), ("pp2xtp2-interleaved", dict(pp=2, tp=2, schedule="interleaved"))]
    if kind == "gpt":
        mixed += [("dp2xtp2", dict(dp=2, tp=2)), ("fsdp2xpp2-1f1b", dict(pp=2, dp=2, data_parallel="fsdp")),
                  ("dp2xtp2-sp", dict(dp=2, tp=2, sequence_parallel=True))]
    cases += [layout(kind, name, precision="bf16", **kw) for name, kw in mixed]
    if kind == "gpt":  # the token ids cross stage 0 (a non-contiguous integer slice) to reach pos's arange
        stages = [["tok"], ["pos", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3"],
                  ["blocks.4", "blocks.5", "ln_f", "head"]]
        cases.append(layout(kind, "pp4-tokens-cross-a-cut", pp=4, stages=stages))
    return cases


def serve_cases(spec: str, out: str, run_case, name_of=lambda case: case["name"]) -> None:
    """A worker's main loop: run every case of the JSON ``spec`` on this rank; rank 0 saves {name: result} to
    ``out``. A failing case stops the whole world at once (a lone failed rank would leave the others waiting in
    a collective)."""
    import traceback

    import torch.distributed as dist

    cases = json.loads(open(spec).read())
    results = {}
    for case in cases:
        try:
            results[name_of(case)] = run_case(case)
        except Exception:
            rank = dist.get_rank() if dist.is_initialized() else 0
            print(f"rank {rank}: {name_of(case)} failed\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            os._exit(1)
    if os.environ.get("RANK", "0") == "0":  # a case may have shut the process group down (it must come last)
        torch.save(results, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def torchrun(worker: Path, args: list, nproc: int = 4, timeout_s: int = 240) -> None:
    """Run ``worker args…`` on ``nproc`` CPU ranks under torchrun; raise with the world's output if it fails or
    runs past ``timeout_s``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(worker)] + [str(a) for a in args]
    # A new session so that a hung world is killed whole (torchrun and its ranks) on timeout.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own: kill them by pid too (found before torchrun dies and
        # they are re-parented), or they would hold the pipes open and communicate() would never return
        ranks = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"torchrun world timed out after {timeout_s} s:\n{stderr[-8000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}")


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, read from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def selected_tests(request) -> set[str]:
    """The names (parameters included) of the tests of the requesting test's module that this session runs.

    A module whose tests share one world (a module-scoped fixture; a world costs seconds of start-up per rank) puts
    in it only the cases of these tests, so that ``-m 'not slow'`` or ``-k`` starts a smaller world."""
    return {item.name for item in request.session.items if getattr(item, "module", None) is request.module}


def run_world(cases: list[dict], tmp_path: Path, nproc: int = 4, timeout_s: int = 240, worker: Path = WORKER) -> dict:
    """Run every case in one torchrun world of ``nproc`` CPU ranks (``worker``: the script each rank runs);
    returns {name: result} from rank 0."""
    spec = tmp_path / "cases.json"
    out = tmp_path / "results.pt"
    spec.write_text(json.dumps(cases))
    torchrun(worker, [spec, out], nproc, timeout_s)
    return torch.load(out, weights_only=False)


def train_one_process(model: torch.nn.Module, steps, lr: float = LR, loss_fn=None) -> tuple[list[float], dict]:
    """The reference every layout is compared with: AdamW steps of one process over whole global batches.
    ``steps`` holds ``(inputs, targets)``; a tuple of inputs is passed positionally. Returns (losses, final state)."""
    from autoplan.execute.batch import default_loss

    loss_fn = loss_fn or default_loss
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for inputs, targets in steps:
        loss = loss_fn(model(*inputs) if isinstance(inputs, tuple) else model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_parallel(pm, steps, lr: float = LR):
    """The same AdamW steps through a parallelized model's ``train_step``. Returns (optimizer, losses, full state)."""
    opt = torch.optim.AdamW(pm.parameters(), lr=lr)  # built before the first step (DDP over TP hides parameters)
    losses = []
    for inputs, targets in steps:
        losses.append(pm.train_step(inputs, targets))
        opt.step()
        opt.zero_grad()
    return opt, losses, pm.full_state_dict()


def reference(kind: str) -> dict:
    """Losses and final state of :data:`STEPS` AdamW steps on one process over the whole global batch, then the loss
    and outputs of the trained model on the first batch."""
    from autoplan.execute.batch import default_loss

    model = build_model(kind)
    losses, state = train_one_process(model, batches(kind))
    inputs, targets = batches(kind)[0]
    with torch.no_grad():
        outputs = model(inputs)
    return {"losses": losses, "state": state,
            "eval_loss": default_loss(outputs, targets).item(), "outputs": outputs}
