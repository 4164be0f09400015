"""The CP-SAT model of one strategy: stage cuts and per-layer choices that minimise the step time.

Data (from :class:`~autoplan.solve.tables.StrategyTables`): L layers in G segments of identical layers,
segment g = layers [a_g, b_g); S = pp·v stages, stage k on pipeline rank k mod pp; for each segment choice
c (tensor parallel on/off × recompute option): time t_gc, parameters P_gc, activation bytes A_gc, transient
bytes R_gc, autocast weight-copy bytes W_gc; per cut position j (after layer j−1): send time q_j and boundary
bytes o_j; per rank r: in-flight microbatches f_r; the tail (DP sync + optimizer) α + β·P, affine in a rank's
parameters, and model-state bytes σ·P (both from :mod:`autoplan.cost.plan_cost`'s formulas); bubble
b = pp − 1 stage-times; M microbatches; device capacity C.

Variables (helper that makes them):
    cut_k ∈ [k, L − S + k]         stage k runs layers [cut_k, cut_{k+1}); cut_0 = 0, cut_S = L    _stage_cuts
    y_kg = clamp(cut_k, a_g, b_g)   so stage k holds n_kg = y_{k+1,g} − y_kg layers of segment g    _stage_cuts
    m_kgc ∈ [0, b_g − a_g]          how many of those use choice c;  Σ_c m_kgc = n_kg             _choice_counts
    u_kgc ∈ {0, 1}                  stage k uses choice c of g at least once: m_kgc ≤ (b_g − a_g)·u_kgc
    e_k = q[cut_{k+1}], o_k = o[cut_{k+1}]   (AddElement) the send after stage k                   _sends
Constraints (one helper per family):
    cut_{k+1} ≥ cut_k + 1                                        every stage is non-empty          _stage_cuts
    Σ_k Σ_{c sharded} m_kgc equal over a tied weight's segments  one tensor, one TP placement       _tied_agree
    T_k = Σ_gc t_gc·m_kgc + e_k [k < S−1] ≤ s_max                per-microbatch time of stage k    _rank_time
    T_r = Σ_{k≡r} T_k ≤ t_max                                     per-microbatch time of rank r     _rank_time
    T_r ≥ a_rj + b_rj·Σ_{k≡r} n_kG                                refined-bound cuts: n layers of   _bound_cuts
                                                                 the largest segment G need ≥ need_r(n), convex
    α + β·Σ_{k≡r} Σ_gc P_gc·m_kgc + τ_r ≤ tail_max                DP sync + optimizer of rank r     _rank_tail
                                                                 (τ_r: tied-weight sync + β·copy)  _tied_ticks
    Σ_{k≡r} Σ_gc (σ·P_gc + W_gc + f_r·A_gc)·m_kgc + R_r + Σ_{k≡r}(o_{k−1} + o_k)
        + [r = (S−1) mod pp]·loss + σ·copy_r ≤ C,                 memory of rank r (loss: the last   _rank_memory
        R_r ≥ R_gc·u_kgc for k ≡ r                                rank's; copy_r: its tied copies)
Objective:
    minimise M·t_max + b·s_max + tail_max      (s_max = t_max when v = 1)                          _objective

This is :func:`autoplan.cost.plan_cost.compose` term by term. Seconds and bytes become integers in one place,
:class:`Scale`: time in units of 10⁻⁸ of the strategy's lower bound per microbatch (rounded to nearest),
memory in units of capacity / 2²⁶ (each term rounded up, the capacity down, so that a layout the model accepts
always fits). Runs are deterministic: one worker, a fixed seed, and a deterministic-time limit.

Example:
    >>> from autoplan.solve.cpsat import Scale
    >>> Scale(time_unit_s=1e-3, memory_unit_bytes=1024).ticks(0.0105)
    10
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from ortools.sat.python import cp_model

from .bounds import RefinedBound
from .tables import Assignment, StrategyTables

__all__ = ["Scale", "ModelResult", "solve_strategy"]


@dataclass(frozen=True)
class Scale:
    """The one place seconds and bytes become CP-SAT integers."""

    time_unit_s: float
    memory_unit_bytes: float

    def ticks(self, seconds: float) -> int:
        return int(round(seconds / self.time_unit_s))

    def ticks_real(self, seconds: float) -> float:
        """Unrounded ticks, for bounds that round down themselves (inf stays inf)."""
        return seconds / self.time_unit_s

    def ticks_down(self, seconds: float, slack: float = 0.0) -> int:
        """Ticks rounded down after shrinking by the relative ``slack``: safe for lower bounds and cutoffs."""
        return int(math.floor(seconds * (1 - slack) / self.time_unit_s))

    def seconds(self, ticks: float) -> float:
        return ticks * self.time_unit_s

    def memory_units_up(self, nbytes: float) -> int:
        return int(math.ceil(nbytes / self.memory_unit_bytes - 1e-9))

    def memory_units_down(self, nbytes: float) -> int:
        return int(math.floor(nbytes / self.memory_unit_bytes))

    @classmethod
    def for_tables(cls, tables: StrategyTables) -> "Scale":
        fastest = sum(min(c.time_s for c in tables.choices[g]) for g in tables.segment_of)
        per_mb = max(fastest / tables.strategy.pp, 1e-15)
        return cls(time_unit_s=per_mb * 1e-8, memory_unit_bytes=tables.capacity_bytes / 2**26)


@dataclass(frozen=True)
class ModelResult:
    status: str  # OPTIMAL | FEASIBLE | INFEASIBLE | UNKNOWN (no solution within the limit)
    assignment: Assignment | None
    objective_s: float | None  # the model's objective in seconds (integer-scaled)
    bound_s: float  # proven lower bound in seconds
    wall_s: float


@dataclass
class _Vars:
    """The model's decision variables, named as in the module docstring."""

    cut: list  # cut_k
    y: list  # y_kg
    m: dict  # m_kgc
    u: dict  # u_kgc
    send_t: list  # e_k (ticks)
    send_o: list  # o_k (memory units)
    q_table: list[int]  # q_j: send ticks of a cut at j
    o_table: list[int]  # o_j: boundary memory units of a cut at j


def solve_strategy(tables: StrategyTables, bound: RefinedBound, *, cutoff_s: float | None,
                   hint: Assignment | None, time_limit_s: float, wall_limit_s: float | None = None,
                   lower_bound_s: float | None = None, seed: int = 0) -> ModelResult:
    """Solve one strategy exactly (up to the integer scaling) within ``time_limit_s``.

    ``bound``: the strategy's refined bound (:func:`autoplan.solve.bounds.refined_bound`), whose per-rank table
    becomes cuts. ``cutoff_s``: only layouts strictly faster than this are wanted (INFEASIBLE then means "none
    faster"). ``lower_bound_s``: a proven floor on the objective.

    Example:
        >>> from autoplan.solve.tables import example_tables
        >>> from autoplan.solve.bounds import refined_bound
        >>> from autoplan.solve.greedy import greedy
        >>> t = example_tables(mesh={"pp": 2, "tp": 1}, microbatch_size=1)
        >>> result = solve_strategy(t, refined_bound(t), cutoff_s=None, hint=None, time_limit_s=5.0)
        >>> result.status, t.evaluate(result.assignment).step_time_s <= greedy(t)[1].step_time_s
        ('OPTIMAL', True)
    """
    s = tables.strategy
    scale = Scale.for_tables(tables)
    model = cp_model.CpModel()
    v = _stage_cuts(model, tables)
    _choice_counts(model, tables, v)
    _tied_agree(model, tables, v)
    _sends(model, tables, scale, v)
    alpha_s, beta_s = tables.tail_terms
    t_ticks = {(g, c): scale.ticks(ch.time_s) for g, rows in enumerate(tables.choices) for c, ch in enumerate(rows)}
    tail_ticks = {(g, c): scale.ticks(beta_s * ch.num_params) for g, rows in enumerate(tables.choices)
                  for c, ch in enumerate(rows)}
    horizon = sum(max(t_ticks[g, c] for c in range(len(rows))) * seg.size
                  for g, (rows, seg) in enumerate(zip(tables.choices, tables.segments))) + sum(v.q_table)
    t_max = model.new_int_var(0, horizon, "t_max")
    s_max = model.new_int_var(0, horizon, "s_max")
    tail_hi = scale.ticks(alpha_s) + sum(max(tail_ticks[g, c] for c in range(len(rows))) * seg.size
                                         for g, (rows, seg) in enumerate(zip(tables.choices, tables.segments)))
    tied = _tied_ticks(tables, scale, v, beta_s)
    tail_hi += max((sum(max(t.off, t.on) for t in terms) for terms in tied), default=0)
    tail_max = model.new_int_var(0, tail_hi, "tail_max")
    need, need_table = _need_rows(bound, scale, s.virtual_stages, horizon, tables.num_layers)
    for r in range(s.pp):
        time_r = _rank_time(model, tables, v, t_ticks, r, s_max, t_max)
        if need is not None:
            _bound_cuts(model, tables, v, r, time_r, bound.segments or (bound.segment,), need[r],
                        need_table[r] if need_table is not None else None, horizon)
        tied_r = sum(_chosen(t.off, t.on, t.sharded) for t in tied[r]) if tied else 0
        model.add(scale.ticks(alpha_s) + _rank_tail(tables, v, tail_ticks, r) + tied_r <= tail_max)
        _rank_memory(model, tables, scale, v, r, tied[r] if tied else [])
    objective = _objective(model, tables, scale, t_max, s_max, tail_max, cutoff_s, lower_bound_s)
    if hint is not None:
        _add_hint(model, tables, hint, v)
    return _solve(model, tables, v, objective, scale, time_limit_s, wall_limit_s, seed)


def _stage_cuts(model: cp_model.CpModel, tables: StrategyTables) -> _Vars:
    """cut_k (stage k runs layers [cut_k, cut_{k+1}), every stage non-empty) and y_kg = clamp(cut_k, a_g, b_g)."""
    L, S = tables.num_layers, tables.strategy.num_stages
    cut = [model.new_constant(0)] + [model.new_int_var(k, L - S + k, f"cut{k}") for k in range(1, S)] + \
          [model.new_constant(L)]
    for k in range(S):
        model.add(cut[k + 1] >= cut[k] + 1)
    y = []
    for k in range(S + 1):
        row = []
        for g, seg in enumerate(tables.segments):
            if k in (0, S):
                row.append(model.new_constant(min(max(0 if k == 0 else L, seg.start), seg.stop)))
                continue
            low = model.new_int_var(seg.start, max(seg.start, L), f"lo{k}_{g}")
            model.add_max_equality(low, [cut[k], seg.start])
            clamp = model.new_int_var(seg.start, seg.stop, f"y{k}_{g}")
            model.add_min_equality(clamp, [low, seg.stop])
            row.append(clamp)
        y.append(row)
    return _Vars(cut, y, {}, {}, [], [], [], [])


def _choice_counts(model: cp_model.CpModel, tables: StrategyTables, v: _Vars) -> None:
    """m_kgc with Σ_c m_kgc = n_kg = y_{k+1,g} − y_kg, and u_kgc ≥ [m_kgc > 0] where the choice has transient
    bytes (the only place u is read)."""
    for k in range(tables.strategy.num_stages):
        for g, seg in enumerate(tables.segments):
            vars_ = []
            for c, ch in enumerate(tables.choices[g]):
                var = model.new_int_var(0, seg.size, f"m{k}_{g}_{c}")
                v.m[k, g, c] = var
                vars_.append(var)
                if ch.transient_bytes > 0:
                    v.u[k, g, c] = model.new_bool_var(f"u{k}_{g}_{c}")
                    model.add(var <= seg.size * v.u[k, g, c])
            model.add(sum(vars_) == v.y[k + 1][g] - v.y[k][g])


def _tied_agree(model: cp_model.CpModel, tables: StrategyTables, v: _Vars) -> None:
    """Σ_k Σ_{c sharded} m_kgc equal over the segments of a tied weight (singleton segments: one layer each)."""
    S, choices = tables.strategy.num_stages, tables.choices
    for tied in tables.tied_segments:
        sharded = [sum(v.m[k, g, c] for k in range(S) for c, ch in enumerate(choices[g]) if ch.choice.tp_on)
                   for g in tied]
        for other in sharded[1:]:
            model.add(other == sharded[0])


def _sends(model: cp_model.CpModel, tables: StrategyTables, scale: Scale, v: _Vars) -> None:
    """e_k = q[cut_{k+1}], o_k = o[cut_{k+1}]: the send after stage k, read from tables by cut position."""
    L = tables.num_layers
    v.q_table = [0] + [scale.ticks(tables.p2p_s[j - 1]) for j in range(1, L + 1)]
    v.o_table = [0] + [scale.memory_units_up(tables.boundary_bytes[j - 1]) for j in range(1, L + 1)]
    for k in range(tables.strategy.num_stages - 1):
        e = model.new_int_var(0, max(v.q_table), f"e{k}")
        model.add_element(v.cut[k + 1], v.q_table, e)
        o = model.new_int_var(0, max(v.o_table), f"o{k}")
        model.add_element(v.cut[k + 1], v.o_table, o)
        v.send_t.append(e)
        v.send_o.append(o)


def _own_stages(tables: StrategyTables, r: int) -> list[int]:
    return [k for k in range(tables.strategy.num_stages) if k % tables.strategy.pp == r]


def _rank_time(model: cp_model.CpModel, tables: StrategyTables, v: _Vars, t_ticks: dict, r: int,
               s_max: cp_model.IntVar, t_max: cp_model.IntVar) -> list:
    """T_k = Σ_gc t_gc·m_kgc + e_k [k < S−1] ≤ s_max (interleaved only) and T_r = Σ_{k≡r} T_k ≤ t_max; returns
    the terms of T_r."""
    s = tables.strategy
    time_r = []
    for k in _own_stages(tables, r):
        stage_time = [t_ticks[g, c] * v.m[k, g, c] for g in range(len(tables.segments))
                      for c in range(len(tables.choices[g]))]
        if k < s.num_stages - 1:
            stage_time.append(v.send_t[k])
        if s.virtual_stages > 1:
            model.add(sum(stage_time) <= s_max)
        time_r += stage_time
    model.add(sum(time_r) <= t_max)
    return time_r


def _need_rows(bound: RefinedBound, scale: Scale, virtual_stages: int, horizon: int,
               num_layers: int) -> tuple[list | None, list | None]:
    """need_r(n) of the refined bound in ticks: as chords (always), and as a table for AddElement (interleaved)."""
    if not bound.rank_need_s:
        return None, None
    rows = bound.rank_need_s
    need = [_chords([scale.ticks_real(x) * (1 - 1e-6) for x in row]) for row in rows]
    if virtual_stages == 1:
        return need, None
    # The same bound as a table (AddElement) as well: it propagates on the integer counts, which closes
    # interleaved models (a rank sums several stages) several times faster; with one stage per rank its presolve
    # costs more than it saves, and the chords suffice.
    table = [[horizon + 1 if x == float("inf") else max(0, scale.ticks_down(x, 1e-6) - num_layers) for x in row]
             for row in rows]
    return need, table


def _bound_cuts(model: cp_model.CpModel, tables: StrategyTables, v: _Vars, r: int, time_r: list, big: tuple[int, ...],
                need_r: tuple[int, list[tuple[float, float]]], table_r: list[int] | None, horizon: int) -> None:
    """T_r ≥ a_rj + b_rj·Σ_{k≡r} n_kG: a rank running n of the largest segment G's layers (and of the segments the
    bound counts with it, ``big``) needs at least need_r(n) seconds (the refined bound's per-rank relaxation). need_r is convex in n, so every chord through
    neighbouring integers lies below it at all integers: in ticks rounded down, less a margin of one tick per
    layer for the rounding of the terms of T_r; n ≤ the most that fit in memory."""
    L = tables.num_layers
    own = _own_stages(tables, r)
    count = sum(v.y[k + 1][g] - v.y[k][g] for k in own for g in big)
    n_max, chords = need_r
    for intercept, slope in chords:
        model.add(sum(time_r) >= math.floor(intercept) - L + math.floor(slope) * count)
    model.add(count <= n_max)
    if table_r is not None:
        floor_r = model.new_int_var(0, horizon + 1, f"need{r}")
        model.add_element(count, table_r, floor_r)
        model.add(sum(time_r) >= floor_r)


def _rank_tail(tables: StrategyTables, v: _Vars, tail_ticks: dict, r: int):
    """β·Σ_{k≡r} Σ_gc P_gc·m_kgc in ticks: the part of rank r's DP sync + optimizer that grows with its
    parameters (the caller adds α and bounds the sum by tail_max)."""
    return sum(tail_ticks[g, c] * v.m[k, g, c] for k in _own_stages(tables, r)
               for g in range(len(tables.segments)) for c in range(len(tables.choices[g])))


class _TiedRank(NamedTuple):
    off: int  # tail ticks unsharded: the gradient sync + β·copy
    on: int  # sharded
    mem_off: int  # memory units of the copy's model states, unsharded
    mem_on: int
    sharded: object  # the 0/1 expression "sharded", or None when fixed


def _chosen(off: int, on: int, sharded: object):
    return off + (on - off) * sharded if sharded is not None else off


def _tied_ticks(tables: StrategyTables, scale: Scale, v: _Vars, beta_s: float) -> list[list[_TiedRank]]:
    """Per rank, the tied weights (:attr:`StrategyTables.tied_sync_terms`): the term rank r adds to its tail (the
    gradient sync, and the copy's sync and optimizer step at β per parameter) and to its memory (the copy's model
    states at σ per parameter), unsharded and sharded."""
    terms = tables.tied_sync_terms
    if not terms:
        return []
    sigma = tables.state_bytes_per_param
    out: list[list[_TiedRank]] = [[] for _ in range(tables.strategy.pp)]
    for term in terms:
        x = None
        if term.decider is not None:
            x = sum(v.m[k, term.decider, c] for k in range(tables.strategy.num_stages)
                    for c, ch in enumerate(tables.choices[term.decider]) if ch.choice.tp_on)
        for r in range(tables.strategy.pp):
            out[r].append(_TiedRank(scale.ticks(term.off_s[r] + beta_s * term.off_copy[r]),
                                    scale.ticks(term.on_s[r] + beta_s * term.on_copy[r]),
                                    scale.memory_units_up(sigma * term.off_copy[r]),
                                    scale.memory_units_up(sigma * term.on_copy[r]), x))
    return out


def _rank_memory(model: cp_model.CpModel, tables: StrategyTables, scale: Scale, v: _Vars, r: int,
                 tied: list[_TiedRank]) -> None:
    """Σ_{k≡r} Σ_gc (σ·P_gc + W_gc + f_r·A_gc)·m_kgc + R_r + Σ_{k≡r}(o_{k−1} + o_k) + [r = last]·loss + σ·copy_r ≤ C,
    with R_r ≥ R_gc·u_kgc for k ≡ r."""
    S = tables.strategy.num_stages
    sigma, flight = tables.state_bytes_per_param, tables.in_flight[r]
    mem_r, transient = [], []
    for k in _own_stages(tables, r):
        for g in range(len(tables.segments)):
            for c, ch in enumerate(tables.choices[g]):
                per_layer = ch.fixed_bytes(sigma) + flight * ch.activation_bytes
                mem_r.append(scale.memory_units_up(per_layer) * v.m[k, g, c])
                if (k, g, c) in v.u:
                    transient.append((scale.memory_units_up(ch.transient_bytes), v.u[k, g, c]))
        if k < S - 1:
            mem_r.append(v.send_o[k])
        if k > 0:
            mem_r.append(v.send_o[k - 1])
    if r == tables.last_rank and tables.loss_bytes:
        mem_r.append(scale.memory_units_up(tables.loss_bytes))
    mem_r += [_chosen(t.mem_off, t.mem_on, t.sharded) for t in tied if t.mem_off or t.mem_on]
    if transient:
        r_max = model.new_int_var(0, max(value for value, _ in transient), f"transient{r}")
        for value, used in transient:
            model.add(r_max >= value * used)
        mem_r.append(r_max)
    model.add(sum(mem_r) <= scale.memory_units_down(tables.capacity_bytes))


def _objective(model: cp_model.CpModel, tables: StrategyTables, scale: Scale, t_max, s_max, tail_max,
               cutoff_s: float | None, lower_bound_s: float | None):
    """minimise M·t_max + b·s_max + tail_max (s_max = t_max when v = 1), within the cutoff and above the floor."""
    s = tables.strategy
    if s.virtual_stages > 1:
        model.add(s.virtual_stages * s_max >= t_max)  # redundant (a rank is v stages); tightens the LP bound
        objective = s.microbatches * t_max + s.bubble_stage_times * s_max + tail_max
    else:  # one stage per rank: the slowest stage is the slowest rank
        objective = (s.microbatches + s.bubble_stage_times) * t_max + tail_max
    model.minimize(objective)
    if cutoff_s is not None:
        model.add(objective <= scale.ticks_down(cutoff_s))
    if lower_bound_s is not None and math.isfinite(lower_bound_s):
        # A proven bound (autoplan.solve.bounds.refined_bound), less a margin for the integer rounding.
        model.add(objective >= scale.ticks_down(lower_bound_s, 1e-5))
    return objective


def _solve(model: cp_model.CpModel, tables: StrategyTables, v: _Vars, objective, scale: Scale,
           time_limit_s: float, wall_limit_s: float | None, seed: int) -> ModelResult:
    """Run CP-SAT deterministically and read the assignment back (only after checking the status)."""
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed
    # Restarts cycling through the search heuristics close these small models' last gap best (measured on
    # GPT-3 175B strategies: 0.6 s to optimality against > 6 s for the default branching).
    solver.parameters.search_branching = cp_model.PORTFOLIO_WITH_QUICK_RESTART_SEARCH
    solver.parameters.max_deterministic_time = max(time_limit_s, 0.01)
    # Wall time only as a backstop, so that a loaded machine (other jobs on the cores) does not cut a solve short
    # and change the plan: the deterministic limit decides; the caller's overall deadline may stop it earlier.
    # (generous: on a machine shared with other jobs a 0.1 s-deterministic solve was measured taking > 2 s of wall)
    backstop_s = max(100 * time_limit_s, 10.0)
    solver.parameters.max_time_in_seconds = max(min(backstop_s, wall_limit_s or float("inf")), 0.02)
    code = solver.solve(model)
    status = solver.status_name(code)
    bound = scale.seconds(solver.best_objective_bound) if code in (cp_model.OPTIMAL, cp_model.FEASIBLE) else 0.0
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ModelResult(status if status in ("INFEASIBLE",) else "UNKNOWN", None, None, bound, solver.wall_time)
    cuts = [solver.value(c) for c in v.cut]
    assignment: Assignment = []
    for k in range(tables.strategy.num_stages):
        stage = []
        for g, seg in enumerate(tables.segments):
            i = max(cuts[k], seg.start)
            for c in range(len(tables.choices[g])):
                for _ in range(solver.value(v.m[k, g, c])):
                    stage.append((i, tables.choices[g][c].choice))
                    i += 1
        assignment.append(stage)
    return ModelResult(status, assignment, scale.seconds(solver.objective_value), bound, solver.wall_time)


def _chords(values: list[float]) -> tuple[int, list[tuple[float, float]]]:
    """(largest n with a finite value, the distinct chords (a, b) of values[j]..values[j+1] as a + b·n)."""
    finite = [n for n, v in enumerate(values) if v != float("inf")]
    n_max = finite[-1] if finite else 0
    chords: list[tuple[float, float]] = []
    for j in range(n_max):
        slope = values[j + 1] - values[j]
        if chords and abs(slope - chords[-1][1]) <= 1e-9 * max(1.0, abs(slope)):
            continue
        chords.append((values[j] - slope * j, slope))
    return n_max, chords


def _add_hint(model: cp_model.CpModel, tables: StrategyTables, hint: Assignment, v: _Vars) -> None:
    """Feed a known layout as the solver's starting point (OR-Tools add_hint), every variable it fixes."""
    counts: dict[tuple[int, int, int], int] = {}
    index: list[dict] = []  # per segment, each choice's first row (one lookup per layer, not a scan)
    for rows in tables.choices:
        first: dict = {}
        for j, ch in enumerate(rows):
            first.setdefault(ch.choice, j)
        index.append(first)
    for k, stage in enumerate(hint):
        for i, choice in stage:
            g = tables.segment_of[i]
            c = index[g].get(choice)
            if c is None:
                return  # a choice this model does not offer: no hint rather than a wrong one
            counts[k, g, c] = counts.get((k, g, c), 0) + 1
    starts = [stage[0][0] for stage in hint] + [tables.num_layers]
    for k in range(1, len(starts) - 1):
        model.add_hint(v.cut[k], starts[k])
        for g, seg in enumerate(tables.segments):
            model.add_hint(v.y[k][g], min(max(starts[k], seg.start), seg.stop))
    for key, var in v.m.items():
        model.add_hint(var, counts.get(key, 0))
    for key, var in v.u.items():
        model.add_hint(var, int(counts.get(key, 0) > 0))
    for k, (e, o) in enumerate(zip(v.send_t, v.send_o)):
        model.add_hint(e, v.q_table[starts[k + 1]])
        model.add_hint(o, v.o_table[starts[k + 1]])
