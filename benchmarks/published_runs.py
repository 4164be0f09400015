"""Predicted against published iteration times: Megatron-LM SC'21 Table 1 (Narayanan et al. 2021) and
Korthikanti et al. 2022 Tables 4-5 (sequence parallelism and selective recompute).

    python benchmarks/published_runs.py                 # every row of both, tables on stdout
    python benchmarks/published_runs.py --out runs.json # and the figures as JSON
    python benchmarks/published_runs.py --rows 1.7B,18B # some rows only
    python benchmarks/published_runs.py --table korthikanti22   # one paper only (sc21, korthikanti22, both)

Korthikanti et al. 2022 (``benchmarks/data/korthikanti22.json``: Table 3's 22B, 175B, 530B and 1T models at
tp 8, no data parallelism) are rebuilt the same way with Megatron-LM's attention core in a module of its own
(``attn.core``), under each Table 5 column: full recompute of every block without sequence parallelism, and
sequence parallelism (the norms' ``sequence`` style) with only the core recomputed (the recompute option the trace
offers for each block's ``attn.core``, a module two levels inside the block);
Table 4's five settings are priced for one block of the 22B model. With sequence parallelism each block's colwise
linears keep their input's shard and gather it again in backward (autoplan's executor, as Megatron-LM): the cost
model charges those gathers exposed, as autoplan runs them, and Table 5's rows are priced so (``regather_s``: their
seconds per iteration); Table 4 prices Megatron-LM's own block, which hides them behind the input-gradient GEMMs
(:func:`megatron_hidden_regather_s`).

Each row of ``shared/calibration/megatron_sc21_table1.json`` (A100-80GB DGX nodes, sequence 2048, vocabulary
51,200, bf16/fp16 mixed precision, full recompute of every block) is rebuilt as the published run: a GPT of its
size traced on the meta device, the published mesh (tp × pp, the rest data parallel), micro-batch and global
batch, the schedule of ``examples/sc21/run_table_1.sh`` (interleaved with its layers per virtual stage where
it sets one, 1F1B otherwise), DDP, layers split evenly over the stages with the embedding on the first and the
head on the last. The plan is priced by :func:`autoplan.cost.plan_cost.estimate_breakdown` on the
``a100-80gb`` preset, unchanged: no figure here is fitted to the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import autoplan  # noqa: E402
from autoplan.cost.plan_cost import estimate_breakdown, layer_choice_cost, plan_layer_choices  # noqa: E402
from autoplan.cost.strategy import Strategy  # noqa: E402
from autoplan.cost.layer import compute_s  # noqa: E402
from autoplan.cost.sequence import backward_regathers, collectives_s, sequence_parallel_applies  # noqa: E402
from autoplan.models import Attention, Block, gpt  # noqa: E402
from autoplan.trace.low_precision_bytes import as_bf16_weights_everywhere  # noqa: E402
from autoplan.plan import Mesh, ModelInfo, Plan, SearchInfo, Stage  # noqa: E402

TABLE = Path(REPO.parent / "shared" / "calibration" / "megatron_sc21_table1.json")
SEQ_LEN = 2048
VOCAB = 51200
# Layers per virtual pipeline stage in NVIDIA/Megatron-LM examples/sc21/run_table_1.sh (interleaved schedule).
LAYERS_PER_VIRTUAL_STAGE = {"76B": 5, "145B": 5, "310B": 3, "530B": 1}


DROPOUT = 0.1  # Megatron-LM's attention and hidden dropout


class MegatronAttention(Attention):
    """Attention as Megatron-LM ran it in 2021: scores materialised, masked softmax, attention dropout, then the
    value product (no fused attention kernel), so the b·a·s² tensors are saved for backward and their softmax and
    dropout move 5·a·s²·b bytes (Korthikanti et al. 2022, §4.1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).unbind(dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        probs = F.dropout(scores.masked_fill(causal, float("-inf")).softmax(-1), DROPOUT, self.training)
        return self.proj((probs @ v).transpose(1, 2).reshape(B, T, -1))


class AttentionCore(torch.nn.Module):
    """Megatron-LM's ``CoreAttention``: QKᵀ, masked softmax, attention dropout and the product with V, the region
    Korthikanti et al. 2022 §5 recompute selectively. A module of its own so that a plan can recompute it alone
    (``recompute`` = ``blocks.i.attn.core``)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        return F.dropout(scores.masked_fill(causal, float("-inf")).softmax(-1), DROPOUT, self.training) @ v


class MegatronBlock(Block):
    """A GPT block with Megatron-LM's dropout after attention and after the MLP (before each residual add)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.attn(self.ln1(x)), DROPOUT, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), DROPOUT, self.training)


class Megatron22Attention(Attention):
    """:class:`MegatronAttention` with its core in a child module, ``attn.core`` (Megatron-LM 2022's
    ``CoreAttention``, what its selective recompute checkpoints)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).unbind(dim=3)
        out = self.core(*(t.transpose(1, 2) for t in (q, k, v)))
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))


def load_rows(path: Path = TABLE) -> list[dict]:
    """The published rows (see the module docstring)."""
    return json.loads(path.read_text())["rows"]


def trace_row(row: dict, core_module: bool = False) -> autoplan.ModelGraph:
    """The row's GPT with Megatron-LM's blocks (batch of one sequence) traced on the meta device; with
    ``core_module`` the attention core is a module of its own (``blocks.i.attn.core``)."""
    model, inputs = gpt("gpt3-175b", batch_size=1, device="meta", vocab_size=VOCAB, seq_len=SEQ_LEN,
                        hidden=row["hidden"], layers=row["layers"], heads=row["heads"])
    for block in model.blocks:
        block.__class__ = MegatronBlock
        if core_module:
            block.attn.__class__ = Megatron22Attention
            block.attn.core = AttentionCore(block.attn.head_dim)
        else:
            block.attn.__class__ = MegatronAttention
    graph = autoplan.trace(model, inputs)
    # Megatron-LM's bf16 runs keep bf16 weights, so their residual stream, pipeline sends and input gradients are
    # bf16 too, at every dp. autoplan's executor would run the dp = 1 rows under autocast, whose fp32 stream the
    # traced autocast bytes price (docs/cost_model.md, What a low precision keeps wide).
    graph.layers = as_bf16_weights_everywhere(graph.layers)
    return graph


def published_plan(graph: autoplan.ModelGraph, row: dict, *, virtual: int | None = None,
                   sequence_parallel: bool = False, recompute: str = "full") -> Plan:
    """The published layout of ``row`` as a :class:`Plan` over ``graph`` (see the module docstring): ``virtual``
    stages per rank (default: SC'21's script), Megatron sequence parallelism on or off, and ``recompute``
    ``"full"`` (every block), ``"selective"`` (every block's ``attn.core``, offered by the trace of a row traced
    with ``core_module``) or ``"none"``."""
    tp, pp = row["tp"], row["pp"]
    dp = row["gpus"] // (tp * pp)
    per_rank = row["layers"] // pp
    if recompute == "selective":
        # the cost model prices a recompute entry only through the layer's options (one it lacks is priced as no
        # recompute at all), so a graph without the core's option must not get here
        lacking = [layer.name for layer in graph.layers if layer.name.startswith("blocks.") and not any(
            option.module == f"{layer.name}.attn.core" for option in layer.recompute_options)]
        if lacking:
            raise ValueError(f"{lacking[:3]} have no option to recompute their attention core; trace the row with "
                             f"trace_2022 first")
    if virtual is None:
        label = row["label"]
        virtual = per_rank // LAYERS_PER_VIRTUAL_STAGE[label] if label in LAYERS_PER_VIRTUAL_STAGE else 1
    stages_count = pp * virtual
    names = [layer.name for layer in graph.layers]
    blocks = [n for n in names if n.startswith("blocks.")]
    head_end = names.index(blocks[0])
    per_stage = len(blocks) // stages_count
    stages = []
    for k in range(stages_count):
        layers = blocks[k * per_stage:(k + 1) * per_stage]
        if k == 0:
            layers = names[:head_end] + layers
        if k == stages_count - 1:
            layers = layers + names[names.index(blocks[-1]) + 1:]
        blocks_here = [b for b in layers if b.startswith("blocks.")]
        recomputed = {"full": blocks_here, "selective": [f"{b}.attn.core" for b in blocks_here], "none": []}
        stages.append(Stage(tuple(layers), tuple(recomputed[recompute])))
    styles = {}
    if tp > 1:
        for layer in graph.layers:
            for group in layer.tp_groups:
                styles.update(group.styles)
            if sequence_parallel and sequence_parallel_applies(layer, tp):
                styles.update({f"{layer.name}.{norm}": "sequence" for norm in layer.sequence_parallel.norms})
    cluster = autoplan.Cluster.preset("a100-80gb", nodes=row["gpus"] // 8)
    microbatches = row["batch"] // (dp * row["mbs"])
    return Plan(
        model=ModelInfo("GPT", "published", graph.num_params), cluster=cluster, global_batch_size=row["batch"],
        microbatch_size=row["mbs"], microbatches=microbatches, mesh=Mesh(pp=pp, dp=dp, tp=tp),
        schedule="interleaved" if virtual > 1 else "1f1b", data_parallel="ddp", stages=tuple(stages),
        tensor_parallel=styles, precision="bf16", virtual_stages=virtual, sequence_parallel=sequence_parallel,
        search=SearchInfo(solver="manual", status="PINNED"),
    )


def predict_row(row: dict, graph: autoplan.ModelGraph | None = None) -> dict:
    """Predicted vs published iteration time of ``row`` with the split of the prediction."""
    graph = graph or trace_row(row)
    cost = estimate_breakdown(graph, published_plan(graph, row))
    slow = cost.slowest_rank
    m = cost.strategy.microbatches
    return {
        "label": row["label"], "tp": row["tp"], "pp": row["pp"], "dp": cost.strategy.dp, "gpus": row["gpus"],
        "mbs": row["mbs"], "microbatches": m, "virtual_stages": cost.strategy.virtual_stages,
        "published_s": row["iter_s"], "predicted_s": cost.step_time_s, "ratio": cost.step_time_s / row["iter_s"],
        "compute_s": cost.compute_s, "recompute_s": cost.recompute_s, "tp_comm_s": m * slow.tp_comm_s,
        "p2p_s": m * slow.p2p_s, "dp_sync_s": cost.comm_s - m * (slow.tp_comm_s + slow.p2p_s),
        "bubble_s": cost.bubble_s, "optimizer_s": cost.optimizer_s,
    }


KORTHIKANTI = REPO / "benchmarks" / "data" / "korthikanti22.json"
# Korthikanti et al. 2022 Table 4/5 configurations: (sequence parallelism, recompute) per published column
SETTINGS_2022 = {"full_recompute": (False, "full"), "sp_selective": (True, "selective")}
LAYER_SETTINGS_2022 = {"baseline, no recompute": (False, "none"), "sequence parallelism": (True, "none"),
                       "baseline with full recompute": (False, "full"), "selective recompute": (False, "selective"),
                       "selective recompute + sequence parallelism": (True, "selective")}


def load_2022(path: Path = KORTHIKANTI) -> dict:
    """Korthikanti et al. 2022 Tables 3-5 as stored in ``benchmarks/data/korthikanti22.json``."""
    return json.loads(path.read_text())


def trace_2022(row: dict) -> autoplan.ModelGraph:
    """A Table 3 model with Megatron-LM's 2022 blocks: the trace offers recompute of each block's ``attn.core``."""
    return trace_row(row, core_module=True)


def predict_2022(row: dict, published: dict, graph: autoplan.ModelGraph | None = None) -> list[dict]:
    """Predicted vs published iteration time of a Table 3 model under both Table 5 columns, with the split."""
    graph = graph or trace_2022(row)
    out = []
    for column, (sequence_parallel, recompute) in SETTINGS_2022.items():
        plan = published_plan(graph, row, virtual=row["virtual_stages"], sequence_parallel=sequence_parallel,
                              recompute=recompute)
        cost = estimate_breakdown(graph, plan)
        slow, m = cost.slowest_rank, cost.strategy.microbatches
        regather_s = 0.0  # the gathers again in backward on one rank (its layers / pp blocks), priced exposed
        if sequence_parallel:
            (layer, _, option), = [c for c in plan_layer_choices(graph, plan)[0] if c[0].name == "blocks.0"]
            regathers = backward_regathers(layer, traced_batch_size=graph.batch_size,
                                           traced_dtype_bytes=graph.dtype_bytes, tp=row["tp"],
                                           microbatch_size=row["mbs"], precision="bf16", recompute=option)
            regather_s = m * row["layers"] / row["pp"] * collectives_s(tuple(g for _, g in regathers), plan.cluster)
        out.append({
            "label": row["label"], "setting": column, "sequence_parallel": sequence_parallel, "recompute": recompute,
            "tp": row["tp"], "pp": row["pp"], "dp": cost.strategy.dp, "gpus": row["gpus"], "mbs": row["mbs"],
            "microbatches": m, "virtual_stages": cost.strategy.virtual_stages, "published_s": published[column + "_s"],
            "predicted_s": cost.step_time_s, "ratio": cost.step_time_s / published[column + "_s"],
            "compute_s": cost.compute_s, "recompute_s": cost.recompute_s, "tp_comm_s": m * slow.tp_comm_s,
            "p2p_s": m * slow.p2p_s, "dp_sync_s": cost.comm_s - m * (slow.tp_comm_s + slow.p2p_s),
            "bubble_s": cost.bubble_s, "optimizer_s": cost.optimizer_s, "regather_s": regather_s,
            "peak_gib": max(r.peak_bytes for r in cost.ranks) / 2 ** 30,
        })
    return out


def megatron_hidden_regather_s(graph: autoplan.ModelGraph, layer, plan: Plan, option) -> float:
    """Seconds of one microbatch's backward all-gathers of the saved shards (:func:`backward_regathers`) that
    Megatron-LM hides: it issues each asynchronously before the colwise linear's input-gradient GEMM and waits
    for it before the weight-gradient GEMM (``LinearWithGradAccumulationAndAsyncCommunication``), so a gather is
    hidden up to that GEMM's time. The GEMM is bounded below by half the pair's forward matmul FLOPs over t (the
    colwise linears hold 3/4 of the attention pair's and 1/2 of the MLP pair's). autoplan's executor runs the
    gather where autograd needs the tensor, so its own price (the cost model's) keeps it exposed."""
    s = Strategy.of(plan)
    regathers = backward_regathers(layer, traced_batch_size=graph.batch_size, traced_dtype_bytes=graph.dtype_bytes,
                                   tp=s.tp, microbatch_size=s.microbatch_size, precision=s.precision,
                                   recompute=option)
    batch = s.microbatch_size / graph.batch_size
    return sum(min(collectives_s((gather,), plan.cluster),
                   compute_s(pair.forward_flops * batch / (2 * s.tp), plan.cluster, s.precision))
               for pair, gather in regathers)


def predict_layer_2022(row: dict, published_rows: list[dict], graph: autoplan.ModelGraph | None = None) -> list[dict]:
    """Table 4: one block of the 22B model (tp 8, micro-batch 4), forward and backward milliseconds predicted
    (backward includes recompute; both include the block's tensor-parallel collectives, as the paper's times do)
    against published. Priced as Megatron-LM ran it: the sequence-parallel gathers again in backward hidden
    behind the input-gradient GEMMs (:func:`megatron_hidden_regather_s`; ``megatron_hidden_ms``, what
    autoplan's executor would add)."""
    graph = graph or trace_2022(row)
    out = []
    for published in published_rows:
        sequence_parallel, recompute = LAYER_SETTINGS_2022[published["experiment"]]
        plan = published_plan(graph, row, virtual=1, sequence_parallel=sequence_parallel, recompute=recompute)
        (layer, tp_on, option), = [c for c in plan_layer_choices(graph, plan)[0] if c[0].name == "blocks.0"]
        c = layer_choice_cost(graph, layer, plan.cluster, Strategy.of(plan), tp_on, option)
        hidden_s = megatron_hidden_regather_s(graph, layer, plan, option) if sequence_parallel else 0.0
        # forward's collectives mirror backward's (all-reduce for all-reduce, gather for scatter), less the
        # gathers again in backward; what recompute runs again is backward's
        regather_s = collectives_s(tuple(g for _, g in backward_regathers(
            layer, traced_batch_size=graph.batch_size, traced_dtype_bytes=graph.dtype_bytes, tp=row["tp"],
            microbatch_size=row["mbs"], precision="bf16")), plan.cluster) if sequence_parallel else 0.0
        comm_fwd_s = (layer_choice_cost(graph, layer, plan.cluster, Strategy.of(plan), tp_on, None).tp_comm_s
                      - regather_s) / 2
        forward_ms = (c.forward_s + comm_fwd_s) * 1e3
        backward_ms = (c.backward_s + c.recompute_s + c.tp_comm_s - comm_fwd_s - hidden_s) * 1e3
        out.append({"experiment": published["experiment"], "predicted_forward_ms": forward_ms,
                    "predicted_backward_ms": backward_ms, "predicted_combined_ms": forward_ms + backward_ms,
                    "megatron_hidden_ms": hidden_s * 1e3, "published_combined_ms": published["combined_ms"],
                    "ratio": (forward_ms + backward_ms) / published["combined_ms"]})
    base = out[0]["predicted_combined_ms"]
    for r, published in zip(out, published_rows):
        r["predicted_overhead"], r["published_overhead"] = r["predicted_combined_ms"] / base - 1, published["overhead"]
    return out


def _line(r: dict) -> str:
    return (f"{r['label']:>5} tp{r['tp']} pp{r['pp']:<2} dp{r['dp']:<3} mb {r['mbs']:>2}×{r['microbatches']:<3} "
            f"v{r['virtual_stages']} | published {r['published_s']:6.2f} s predicted {r['predicted_s']:6.2f} s "
            f"ratio {r['ratio']:.2f} | compute {r['compute_s']:5.2f} recompute {r['recompute_s']:5.2f} "
            f"tp {r['tp_comm_s']:5.2f} p2p {r['p2p_s']:4.2f} dp {r['dp_sync_s']:4.2f} "
            f"bubble {r['bubble_s']:5.2f} opt {r['optimizer_s']:4.2f}")


def _line_2022(r: dict) -> str:
    setting = "SP + selective" if r["sequence_parallel"] else "full recomp."
    return (f"{r['label']:>5} tp{r['tp']} pp{r['pp']:<2} dp{r['dp']} mb {r['mbs']}×{r['microbatches']:<3} "
            f"v{r['virtual_stages']} {setting:<14} | published {r['published_s']:6.2f} s predicted "
            f"{r['predicted_s']:6.2f} s ratio {r['ratio']:.2f} | compute {r['compute_s']:5.2f} recompute "
            f"{r['recompute_s']:5.2f} tp {r['tp_comm_s']:4.2f} p2p {r['p2p_s']:4.2f} bubble {r['bubble_s']:5.2f} "
            f"opt {r['optimizer_s']:4.2f} | peak {r['peak_gib']:4.1f} GiB")


def _run_2022(wanted: list[str] | None) -> dict:
    data = load_2022()
    published = {r["label"]: r for r in data["table5_iteration_s"]["rows"]}
    rows, layers = [], []
    for row in data["table3_configs"]:
        if wanted and row["label"] not in wanted:
            continue
        graph = trace_2022(row)
        if row["label"] == "22B":
            layers = predict_layer_2022(row, data["table4_layer_22B_ms"]["rows"], graph)
            for r in layers:
                print(f"  22B block, {r['experiment']:<42} predicted {r['predicted_forward_ms']:4.1f} + "
                      f"{r['predicted_backward_ms']:4.1f} = {r['predicted_combined_ms']:4.1f} ms, published "
                      f"{r['published_combined_ms']:4.1f} ms, ratio {r['ratio']:.2f}, overhead "
                      f"{r['predicted_overhead']:+.1%} (published "
                      f"{'—' if r['published_overhead'] is None else format(r['published_overhead'], '+.0%')})"
                      + (f"; Megatron hides {r['megatron_hidden_ms']:.2f} ms of gathers again" if
                         r["megatron_hidden_ms"] else ""))
        for result in predict_2022(row, published[row["label"]], graph):
            rows.append(result)
            print(_line_2022(result), flush=True)
    return {"source": data["source"], "rows": rows, "table4_22B_block": layers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--rows", help="comma-separated labels (default: every row)")
    parser.add_argument("--table", choices=("sc21", "korthikanti22", "both"), default="both",
                        help="SC'21 Table 1, Korthikanti et al. 2022 Tables 4-5, or both (default)")
    args = parser.parse_args(argv)
    wanted = args.rows.split(",") if args.rows else None
    labels = {r["label"] for r in load_rows()} | {r["label"] for r in load_2022()["table3_configs"]}
    if wanted and set(wanted) - labels:
        parser.error(f"unknown rows {sorted(set(wanted) - labels)}; the tables have {sorted(labels)}")
    out: dict = {}
    if args.table in ("sc21", "both"):
        print("Megatron-LM SC'21 Table 1 (full recompute):")
        results = []
        for row in load_rows():
            if wanted and row["label"] not in wanted:
                continue
            start = time.perf_counter()
            result = predict_row(row)
            result["wall_s"] = time.perf_counter() - start
            results.append(result)
            print(_line(result), flush=True)
        if results:
            print(f"worst |ratio − 1| = {max(abs(r['ratio'] - 1) for r in results):.3f} over {len(results)} rows")
        out["sc21"] = {"source": json.loads(TABLE.read_text())["source"], "rows": results}
    if args.table in ("korthikanti22", "both"):
        print("Korthikanti et al. 2022 Table 5 (full recompute vs sequence parallelism + selective recompute):")
        out["korthikanti22"] = _run_2022(wanted)
        rows = out["korthikanti22"]["rows"]
        if rows:
            print(f"worst |ratio − 1| = {max(abs(r['ratio'] - 1) for r in rows):.3f} over {len(rows)} runs")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
