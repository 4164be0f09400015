"""The collectives the executor issues in one training step equal, in count and bytes, what the cost model
charges (autoplan.cost.traffic.plan_collectives), layout by layout, on 4 gloo ranks.

Counted with tests/comm_counter.py (torch.profiler over c10d). Collectives the cost model leaves out on purpose
are below ``CONTROL_BYTES``: the mean-loss all-reduce, the pipeline's loss broadcast. The all-reduce that keeps
the embedding and the head tied when they sit on different pipeline ranks is charged (autoplan.cost.tied); the
copy of that weight the head's rank holds without owning it, which FSDP gathers and scatters there too, is not,
and is added here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from distributed_helpers import GPT_CONFIG, layout, reference, run_world

WORKER = Path(__file__).with_name("collective_worker.py")
#: Below this a collective is control traffic the step time does not price (a loss scalar); the tiny GPT's smallest
#: priced collective (a tensor-parallel all-reduce of a 1 × 8 × 32 microbatch) is 1 KiB.
CONTROL_BYTES = 64


def _case(name: str, microbatches: int, fsdp_reshard: str = "step", **kw) -> dict:
    case = layout("gpt", name, **kw)
    case["plan"]["microbatches"] = microbatches
    case["name"] = f"{case['name']}:mb{microbatches}"
    if fsdp_reshard != "step":
        case["plan"]["fsdp_reshard"] = fsdp_reshard
        case["name"] += f":reshard-{fsdp_reshard}"
        case["numerics"] = True  # a new executor path: trains like one process too
    return case


CASES = [
    _case("ddp4", 2, dp=4),
    _case("fsdp4", 1, dp=4, data_parallel="fsdp"),
    _case("fsdp4", 4, dp=4, data_parallel="fsdp"),
    _case("fsdp4", 4, dp=4, data_parallel="fsdp", fsdp_reshard="microbatch"),  # ZeRO-3 per microbatch: 2m AG, m RS
    _case("tp4", 2, tp=4),
    _case("tp2xdp2", 2, tp=2, dp=2, recompute=True),
    _case("fsdp2xtp2", 2, tp=2, dp=2, data_parallel="fsdp"),
    _case("pp4-1f1b", 4, pp=4),
    _case("pp2xtp2-interleaved", 4, pp=2, tp=2, schedule="interleaved"),
    _case("fsdp2xpp2-gpipe", 4, pp=2, dp=2, data_parallel="fsdp", schedule="gpipe"),
    _case("tp4-sp", 2, tp=4, sequence_parallel=True),
    _case("tp2xdp2-sp", 2, tp=2, dp=2, recompute=True, sequence_parallel=True),
    _case("pp2xtp2-1f1b-sp", 4, pp=2, tp=2, sequence_parallel=True),  # a run cut by the stages: each splits and gathers
]


def _tied_copy_bytes(case: dict, rank: dict) -> int:
    """Under FSDP with pp > 1, the fp32 bytes of the tied weight a rank holding ``head`` but not ``tok`` keeps."""
    plan = case["plan"]
    if plan["pp"] == 1 or plan["data_parallel"] != "fsdp":
        return 0
    mine = [name for k in range(len(plan["stages"])) if k % plan["pp"] == rank["coords"]["pp"]
            for name in plan["stages"][k]]
    if "head" not in mine or "tok" in mine:
        return 0
    return GPT_CONFIG.vocab_size * GPT_CONFIG.hidden * 4 // plan["tp"]


def _compare(rank: dict, copy_bytes: int = 0) -> list[str]:
    """Mismatches between what ``rank`` issued and what it was charged, per kind."""
    issued: Counter = Counter()
    issued_bytes: Counter = Counter()
    for kind, nbytes in rank["issued"]:
        if nbytes >= CONTROL_BYTES:
            issued[kind] += 1
            issued_bytes[kind] += nbytes
    charged: Counter = Counter()
    charged_bytes: Counter = Counter()
    for kind, nbytes, count, axis in rank["charged"]:
        # FSDP's records count per unit (the root and every sizeable layer) and sum the bytes over units.
        units = rank["units"] if axis == "dp" and kind in ("all_gather", "reduce_scatter") else 1
        charged[kind] += count * units
        charged_bytes[kind] += nbytes * count
    if copy_bytes:
        for kind in ("all_gather", "reduce_scatter"):
            charged_bytes[kind] += copy_bytes
    problems = []
    for kind in sorted(set(issued) | set(charged)):
        if issued[kind] != charged[kind] or abs(issued_bytes[kind] - charged_bytes[kind]) > 1e-6 * max(
                1, charged_bytes[kind]):
            problems.append(f"{kind}: issued {issued[kind]} × {issued_bytes[kind]} B, charged {charged[kind]} × "
                            f"{charged_bytes[kind]:.0f} B")
    return problems


@pytest.mark.slow
def test_issued_collectives_equal_charged(tmp_path):
    results = run_world(CASES, tmp_path, nproc=4, worker=WORKER, timeout_s=400)
    failures = []
    for case in CASES:
        for rank in results[case["name"]]:
            problems = _compare(rank, _tied_copy_bytes(case, rank))
            if problems:
                failures.append(f"{case['name']} rank {rank['rank']} {rank['coords']}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)
    ref = reference("gpt")
    for case in (c for c in CASES if c.get("numerics")):
        got = results[case["name"]][0]
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), case["name"]
        for key, value in ref["state"].items():
            assert torch.allclose(got["state"][key], value, atol=1e-4, rtol=1e-4), (case["name"], key)
