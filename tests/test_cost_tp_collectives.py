"""The tensor-parallel collectives layer_cost charges are the ones autoplan's own TP path issues.

A tiny GPT is traced, sharded by :func:`autoplan.execute.tensor_parallel.apply_tensor_parallel` with the styles
the trace found, and run forward and backward under a fake process group (one process standing for a world of 2,
so DTensor runs its real code path). A dispatch mode records every collective and its bytes; CommDebugMode counts
them by kind. On a cluster whose tp link moves 1000 B/s with no latency, the cost model's ``tp_comm_s`` of the
layers is exactly the recorded traffic priced by the ring formulas: an all-reduce of n bytes over 2 ranks takes
n / 1000 s, an all-gather of an n-byte result n / 2000 s.
"""

from collections import Counter

import pytest
import torch
import torch.distributed as dist

import autoplan
from autoplan.cluster import Cluster, Device
from autoplan.cost import layer_cost
from autoplan.models import GPT, GPTConfig

pytest.importorskip("torch.distributed.tensor.parallel", reason="needs DTensor tensor parallelism")
fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg", reason="needs torch's fake pg")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from autoplan.execute.tensor_parallel import apply_tensor_parallel  # noqa: E402

_DEVICE = Device("unit", 2**30, {"fp32": 1e12, "bf16": 1e12, "fp16": 1e12}, achievable_flops_fraction=1.0)
UNIT_LINK = Cluster(nodes=1, devices_per_node=2, device=_DEVICE, intra_node_bandwidth_Bps=1000.0,
                    inter_node_bandwidth_Bps=1000.0, intra_node_latency_s=0.0, inter_node_latency_s=0.0)
#: Seconds per byte of each collective over 2 ranks on that link, for the bytes of the tensor it returns.
PRICE_S_PER_BYTE = {"all_reduce": 1 / 1000, "all_gather_into_tensor": 1 / 2000}


class _Collectives(TorchDispatchMode):
    """(kind, bytes of the tensor the collective returns) of every c10d collective run under it."""

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size, self.calls = group_size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = func._overloadpacket.__name__
        if func.namespace in ("_c10d_functional", "c10d") and kind in PRICE_S_PER_BYTE:
            nbytes = args[0].numel() * args[0].element_size()
            self.calls.append((kind, nbytes * (self.group_size if kind == "all_gather_into_tensor" else 1)))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def mesh():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:Full backward hook")  # DTensor's hooks on the embedding, whose input is ids
def test_autoplans_tp_path_issues_what_layer_cost_charges(mesh):
    cfg = GPTConfig(vocab_size=64, seq_len=8, hidden=32, layers=2, heads=4)
    torch.manual_seed(0)
    model = GPT(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    graph = autoplan.trace(model, (tokens,))
    styles = {fqn: style for layer in graph.layers for g in layer.tp_groups for fqn, style in g.styles.items()}
    assert sorted(set(styles.values())) == ["colwise", "rowwise", "vocab_embedding", "vocab_head"]
    (head,) = graph.layer("head").tp_groups
    assert head.input_bytes == tokens.numel() * cfg.hidden * 4  # recorded by the tracer: the final hidden states
    apply_tensor_parallel(model, styles, mesh)

    recorder = _Collectives(group_size=2)
    with CommDebugMode() as counted, recorder:
        model(tokens).sum().backward()

    kinds = Counter(kind for kind, _ in recorder.calls)
    assert {str(op).split(".")[-1]: n for op, n in counted.get_comm_counts().items()} == dict(kinds)
    # Megatron-LM: the embedding all-reduces its output; each colwise → rowwise pair (2 per block) its output in
    # forward and its input gradient in backward; the vocabulary head gathers its logits and all-reduces its
    # input gradient.
    assert kinds == {"all_reduce": 1 + 2 * 2 * cfg.layers + 1, "all_gather_into_tensor": 1}
    measured_s = sum(nbytes * PRICE_S_PER_BYTE[kind] for kind, nbytes in recorder.calls)
    charged_s = sum(layer_cost(layer, traced_batch_size=graph.batch_size, traced_dtype_bytes=graph.dtype_bytes,
                               cluster=UNIT_LINK, tp=2, microbatch_size=graph.batch_size, precision="fp32").tp_comm_s
                    for layer in graph.layers)
    assert charged_s == pytest.approx(measured_s, rel=1e-12)
    logits_bytes = tokens.numel() * cfg.vocab_size * 4
    assert ("all_gather_into_tensor", logits_bytes) in recorder.calls
