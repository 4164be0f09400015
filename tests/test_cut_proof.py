"""The pipeline cut proof (autoplan.trace.cut_proof): stateless layers that run at several places (T5's dropouts)
are split soundly, every call carried from the one stage that makes it; stateful ones are still refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoplan.trace.cut_proof import analyse_cuts
from autoplan.trace.skeleton import skeleton_stages


def _chain(parts, args, kwargs):
    x = ()
    for part in parts:
        x = part(*x, model_inputs=(args, kwargs))
    return parts[-1].rebuild_output(x) if hasattr(parts[-1], "rebuild_output") else x


class _SharedDropout(nn.Module):
    """One dropout module called twice; its first call's output is read on both sides of a cut after ``b``."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b, self.c = nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.drop(self.a(x))
        return self.c(self.drop(self.b(h))) + h


def test_a_dropout_run_twice_is_free_and_every_stage_reads_the_mask_of_the_stage_that_drew_it():
    model, x = _SharedDropout(), torch.randn(8, 4)
    layers = ["a", "drop", "b", "c"]
    cuts = analyse_cuts(model, layers, (x,), {})
    assert cuts.blocker is None and cuts.free == {1}
    # the first call (after a) crosses the cut before c as a value of its own, not a's output recomputed there
    assert cuts.carried(3) == [(1, 1), (1, 2)] and cuts.carried(2) == [(1, 1)]
    torch.manual_seed(0)
    expected = model(x)
    for stages in ([["a", "drop"], ["b", "c"]], [["a", "drop", "b"], ["c"]]):
        # stage 1 draws no mask of its own for the first call (it gets stage 0's), so in one process under the
        # same seed the chained stages draw exactly the whole model's masks
        torch.manual_seed(0)
        assert torch.equal(_chain(skeleton_stages(model, stages, cuts), (x,), {}), expected)


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += 1
        return x


class _StatefulTwice(nn.Module):
    def __init__(self, norm: bool):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.n = nn.BatchNorm1d(4, affine=False) if norm else _Counter()

    def forward(self, x):
        return self.b(self.n(self.a(self.n(x))))


@pytest.mark.parametrize("norm", [True, False])
def test_a_layer_with_buffers_run_twice_is_still_refused(norm):
    cuts = analyse_cuts(_StatefulTwice(norm), ["n", "a", "b"], (torch.randn(8, 4),), {})
    assert "run more than once" in cuts.blocker and "without parameters or buffers" in cuts.blocker


@pytest.mark.slow  # the quick tier has the free-layer rules on a toy model; the family matrix runs T5 pp2xtp2
def test_t5_stages_cut_anywhere_train_like_the_whole_model():
    pytest.importorskip("transformers")
    import models_hf
    from hf_worker import no_dropout

    model, inputs = models_hf.FAMILIES["t5"]()
    no_dropout(model)
    layers = ["encoder.embed_tokens", "encoder.dropout", "encoder.block.0", "encoder.block.1",
              "encoder.final_layer_norm", "decoder.embed_tokens", "decoder.dropout", "decoder.block.0",
              "decoder.block.1", "decoder.final_layer_norm", "lm_head"]
    cuts = analyse_cuts(model, layers, (), inputs)
    assert cuts.blocker is None and cuts.free == {1, 6}
    # the encoder's output after its second dropout call crosses every cut after the encoder (cross-attention)
    assert all((1, 2) in cuts.carried(c) for c in range(5, len(layers)))
    expected = model(**inputs).logits
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for bounds in ([0, 5, 11], [0, 1, 3, 6, 7, 9, 11]):  # at the encoder output; next to every free layer
        model.zero_grad()
        parts = skeleton_stages(model, [layers[a:b] for a, b in zip(bounds, bounds[1:])], cuts)
        logits = _chain(parts, (), inputs).logits
        assert torch.equal(logits, expected)
        logits.sum().backward()
        for name, p in model.named_parameters():  # the tied embedding sums its three gradients in another order
            assert torch.allclose(p.grad, grads[name], rtol=1e-5, atol=1e-5 * grads[name].abs().max()), name


def test_the_proof_is_reused_for_the_same_unchanged_model_and_made_again_when_anything_changes():
    import types

    model, x = _SharedDropout(), torch.randn(8, 4)
    layers = ["a", "drop", "b", "c"]
    first = analyse_cuts(model, layers, (x,), {})
    assert analyse_cuts(model, layers, (x,), {}) is first  # applying a plan after tracing: no second forward
    assert analyse_cuts(model, layers, (torch.randn(4, 4),), {}) is not first  # other input shapes
    assert analyse_cuts(_SharedDropout(), layers, (x,), {}) is not first  # another model object
    model.drop.p = 0.1  # a plain attribute
    second = analyse_cuts(model, layers, (x,), {})
    assert second is not first
    model.b = nn.Linear(4, 4)  # a module swapped
    assert analyse_cuts(model, layers, (x,), {}) is not second
    # a patched forward that reads a's weight directly: the proof is made again, and refuses it
    model.forward = types.MethodType(lambda self, x: self.c(self.b(self.drop(self.a(x)))) + self.a.weight.sum(),
                                     model)
    assert "made inside ['a']" in analyse_cuts(model, layers, (x,), {}).blocker
