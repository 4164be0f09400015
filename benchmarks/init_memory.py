"""Memory of building a model on meta and letting ``parallelize`` allocate each rank's part.

    torchrun --standalone --nproc_per_node 4 benchmarks/init_memory.py \
        [--out benchmarks/results/init_memory.json] [--no-real]

A ~200M-parameter GPT (vocabulary 50,304, hidden 1,024, 12 layers, tied head) under FSDP over 4 gloo CPU ranks
(one stage, dp = 4). Each rank samples its resident set size (RSS, /proc/self/statm) every 2 ms from a thread
while ``autoplan.parallelize`` runs, and reports the peak growth over the RSS just before, against:

- its shard: the bytes of the parameters it holds after FSDP (its DTensor shards);
- the whole model: every parameter at fp32;
- the largest module's own tensors at full size (the embedding), which initialization holds once, briefly
  (see :mod:`autoplan.execute.materialize`).

Then (unless ``--no-real``) the same for the model built for real on every rank before ``parallelize`` (the
growth then also counts building the model). Rank 0 prints a table and writes JSON.
"""

import argparse
import json
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

import autoplan
from autoplan.execute.manual import manual_plan
from autoplan.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=50304, seq_len=1024, hidden=1024, layers=12, heads=16)
PAGE_BYTES = 4096
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


class PeakRss:
    """Samples RSS from a thread while the ``with`` block runs."""

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def measure(build_on_meta: bool) -> dict:
    dist.barrier()
    with PeakRss() as rss:
        with torch.device("meta") if build_on_meta else torch.device("cpu"):
            model = GPT(CONFIG)
        whole = sum(p.numel() for p in model.parameters()) * 4
        largest = max(sum(t.numel() * t.element_size() for t in list(m.parameters(recurse=False)))
                      for m in model.modules())
        layers = ["tok", "pos"] + [f"blocks.{i}" for i in range(CONFIG.layers)] + ["ln_f", "head"]
        plan = manual_plan(model, [layers], dp=dist.get_world_size(), data_parallel="fsdp", global_batch_size=8)
        start = time.perf_counter()
        pm = autoplan.parallelize(model, plan=plan)
        wall_s = time.perf_counter() - start
    shard = sum(p.to_local().numel() * p.element_size() for p in pm.parameters())
    row = {"built_on": "meta" if build_on_meta else "cpu", "rss_growth_bytes": rss.growth, "shard_bytes": shard,
           "whole_model_bytes": whole, "largest_module_bytes": largest, "parallelize_s": wall_s}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    del pm, model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/init_memory.json")
    parser.add_argument("--no-real", action="store_true", help="skip the model built for real on every rank")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    results = {"config": CONFIG.__dict__, "ranks": dist.get_world_size(), "meta": measure(True)}
    if not args.no_real:
        results["real"] = measure(False)
    if dist.get_rank() == 0:
        params = results["meta"][0]["whole_model_bytes"] // 4
        print(f"GPT {params / 1e6:.0f}M parameters, FSDP over {results['ranks']} gloo ranks "
              f"(whole model {results['meta'][0]['whole_model_bytes'] / MIB:,.0f} MiB fp32)")
        print(f"{'built on':<9}{'rank':>5}{'RSS growth MiB':>16}{'shard MiB':>11}{'growth/shard':>14}"
              f"{'growth/whole':>14}{'parallelize s':>15}")
        for kind in ("meta", "real"):
            for rank, row in enumerate(results.get(kind, [])):
                print(f"{row['built_on']:<9}{rank:>5}{row['rss_growth_bytes'] / MIB:>16,.0f}"
                      f"{row['shard_bytes'] / MIB:>11,.0f}{row['rss_growth_bytes'] / row['shard_bytes']:>14.2f}"
                      f"{row['rss_growth_bytes'] / row['whole_model_bytes']:>14.2f}{row['parallelize_s']:>15.1f}")
        print(f"largest module's own tensors (held once at full size while initializing): "
              f"{results['meta'][0]['largest_module_bytes'] / MIB:,.0f} MiB")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
