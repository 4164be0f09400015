"""Count the collectives a process issues, at the level of the process group, with torch.profiler.

torch's ``CommDebugMode`` sees DTensor's functional collectives only; FSDP2 calls ``dist.all_gather_into_tensor``
and DDP's C++ reducer calls the process group directly. Every c10d op, whoever issues it, is recorded by the
profiler: ``c10d::*`` dispatcher ops in the calling thread and ``gloo:*`` events in gloo's worker threads, with
input shapes and dtypes. This reads them into :class:`autoplan.cost.Collective` records:

- all-gather: ``c10d::_allgather_base_`` (FSDP2; its first input is the gathered result) and DTensor's
  ``_c10d_functional::all_gather_into_tensor`` (input × group size);
- reduce-scatter: ``c10d::_reduce_scatter_base_`` (its second input is the full input) and DTensor's
  ``_c10d_functional::reduce_scatter_tensor`` (its first). Gloo has no native reduce-scatter and runs it as an
  all-reduce of the input, so one ``gloo:all_reduce`` of that size is dropped for each;
- all-reduce: every other ``gloo:all_reduce`` (DDP's buckets, DTensor's partial sums, the loss mean);
- send: ``gloo:send`` (pipeline activations and gradients);
- all-to-all: ``gloo:all_to_all``, whose one shape is the rank's send buffer (the row exchange of a projection of
  unequal fused parts, autoplan.execute.tp_styles.FusedRowsColwise).
- broadcast: ``gloo:broadcast`` (the pipeline's loss, from its last stage).
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from torch.profiler import ProfilerActivity, profile

from autoplan.cost import Collective

DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
               "bool": 1, "unsigned char": 1, "signed char": 1, "short int": 2}


def _bytes(shape: list, dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"comm_counter: unknown dtype {dtype!r}; add it to DTYPE_BYTES")
    return math.prod(shape) * DTYPE_BYTES[dtype]


def collectives_of(events) -> list[Collective]:
    """The collectives among profiler ``events`` (``prof.profiler.kineto_results.events()``), in issue order."""
    events = sorted(events, key=lambda e: e.start_ns())
    scattered: Counter = Counter()
    out: list[Collective] = []
    for e in events:
        name = e.name()
        if name == "c10d::_reduce_scatter_base_":
            nbytes = _bytes(e.shapes()[1], e.dtypes()[1])
            scattered[nbytes] += 1
            out.append(Collective("reduce_scatter", nbytes))
        elif name == "_c10d_functional::reduce_scatter_tensor":
            nbytes = _bytes(e.shapes()[0], e.dtypes()[0])
            scattered[nbytes] += 1
            out.append(Collective("reduce_scatter", nbytes))
        elif name == "c10d::_allgather_base_":
            out.append(Collective("all_gather", _bytes(e.shapes()[0], e.dtypes()[0])))
        elif name == "_c10d_functional::all_gather_into_tensor":
            group_size = int(e.concrete_inputs()[1])
            out.append(Collective("all_gather", _bytes(e.shapes()[0], e.dtypes()[0]) * group_size, 1, group_size))
    for e in events:
        name = e.name()
        if name == "gloo:all_reduce":
            nbytes = _bytes(e.shapes()[0], e.dtypes()[0])
            if scattered[nbytes]:
                scattered[nbytes] -= 1  # the all-reduce gloo runs for a reduce-scatter
                continue
            out.append(Collective("all_reduce", nbytes))
        elif name == "gloo:send":
            out.append(Collective("send", _bytes(e.shapes()[0], e.dtypes()[0])))
        elif name == "gloo:all_to_all":
            out.append(Collective("all_to_all", _bytes(e.shapes()[0], e.dtypes()[0])))
        elif name == "gloo:broadcast":
            out.append(Collective("broadcast", _bytes(e.shapes()[0], e.dtypes()[0])))
    if sum(scattered.values()):
        raise AssertionError(f"reduce-scatters without their gloo all-reduce: {dict(scattered)}")
    return out


@contextmanager
def counted_collectives() -> Iterator[list[Collective]]:
    """``with counted_collectives() as found: ...``; afterwards ``found`` lists what this process issued."""
    found: list[Collective] = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield found
    found.extend(collectives_of(prof.profiler.kineto_results.events()))

