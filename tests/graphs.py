"""Hand-built ModelGraph fixtures for planner tests that must not depend on tracing: the closed-form graphs of
:mod:`autoplan.synthetic`, under the names the tests import."""

from autoplan.synthetic import gpt_like_graph, mlp_graph

__all__ = ["gpt_like_graph", "mlp_graph"]
