"""The CP-SAT model of one strategy: stage cuts and per-layer choices that minimise the step time.

Data (from :class:`~autoplan.solve.tables.StrategyTables`): L layers in G segments of identical layers,
segment g = layers [a_g, b_g); S = pp·v stages, stage k on pipeline rank k mod pp; for each segment choice
c (tensor parallel on/off × recompute option): time t_gc, parameters P_gc, activation bytes A_gc, transient
bytes R_gc, autocast weight-copy bytes W_gc; per cut position j (after layer j−1): send time q_j and boundary bytes o_j; per rank r: in-flight
microbatches f_r; the tail (DP sync + optimizer) α + β·P, affine in a rank's parameters; model-state bytes
σ·P; bubble b = pp − 1 stage-times; M microbatches; device capacity C.

Variables:
    cut_k ∈ [k, L − S + k]         stage k runs layers [cut_k, cut_{k+1}); cut_0 = 0, cut_S = L
    y_kg = clamp(cut_k, a_g, b_g)   so stage k holds n_kg = y_{k+1,g} − y_kg layers of segment g
    m_kgc ∈ [0, b_g − a_g]          how many of those use choice c;  Σ_c m_kgc = n_kg
    u_kgc ∈ {0, 1}                  stage k uses choice c of segment g at least once: m_kgc ≤ (b_g − a_g)·u_kgc
    e_k = q[cut_{k+1}], o_k = o[cut_{k+1}]   (AddElement) the send after stage k
Constraints:
    cut_{k+1} ≥ cut_k + 1                                             every stage is non-empty
    Σ_k Σ_{c sharded} m_kgc equal over the segments of a tied weight  one tensor, one TP placement
    T_k = Σ_gc t_gc·m_kgc + e_k [k < S−1] ≤ s_max                     per-microbatch time of stage k
    T_r = Σ_{k≡r} T_k ≤ t_max                                          per-microbatch time of rank r
    T_r ≥ a_rj + b_rj·Σ_{k≡r} n_kG                                     cuts from the refined bound: rank r
                                                                      running n layers of the largest
                                                                      segment G needs ≥ need_r(n), convex
    α + β·Σ_{k≡r} Σ_gc P_gc·m_kgc ≤ tail_max                          DP sync + optimizer of rank r
    Σ_{k≡r} Σ_gc (σ·P_gc + W_gc + f_r·A_gc)·m_kgc + R_r + Σ_{k≡r}(o_{k−1} + o_k)
        + [r = (S−1) mod pp]·loss ≤ C,  R_r ≥ R_gc·u_kgc for k ≡ r       memory of rank r (the loss buffers
                                                                      are a constant of the last rank)
Objective:
    minimise M·t_max + b·s_max + tail_max      (s_max = t_max when v = 1)

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

from ortools.sat.python import cp_model

from ..cost.plan_cost import rank_state_bytes, rank_tail_s
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


def solve_strategy(tables: StrategyTables, *, cutoff_s: float | None, hint: Assignment | None,
                   time_limit_s: float, wall_limit_s: float | None = None, lower_bound_s: float | None = None,
                   seed: int = 0) -> ModelResult:
    """Solve one strategy exactly (up to the integer scaling) within ``time_limit_s``.

    ``cutoff_s``: only layouts strictly faster than this are wanted (INFEASIBLE then means "none faster").

    Example:
        >>> callable(solve_strategy)
        True
    """
    s = tables.strategy
    scale = Scale.for_tables(tables)
    L, S, pp = tables.num_layers, s.num_stages, s.pp
    segs, choices = tables.segments, tables.choices
    model = cp_model.CpModel()

    # cut[k]: first layer of stage k
    cut = [model.new_constant(0)] + [model.new_int_var(k, L - S + k, f"cut{k}") for k in range(1, S)] + \
          [model.new_constant(L)]
    for k in range(S):
        model.add(cut[k + 1] >= cut[k] + 1)

    # y[k][g] = clamp(cut[k], a_g, b_g); n[k][g] = y[k+1][g] - y[k][g]
    y = []
    for k in range(S + 1):
        row = []
        for g, seg in enumerate(segs):
            if k in (0, S):
                row.append(model.new_constant(min(max(0 if k == 0 else L, seg.start), seg.stop)))
                continue
            low = model.new_int_var(seg.start, max(seg.start, L), f"lo{k}_{g}")
            model.add_max_equality(low, [cut[k], seg.start])
            clamp = model.new_int_var(seg.start, seg.stop, f"y{k}_{g}")
            model.add_min_equality(clamp, [low, seg.stop])
            row.append(clamp)
        y.append(row)

    # m[k][g][c]: layers of segment g in stage k using choice c; u: used at least once
    m, u = {}, {}
    for k in range(S):
        for g, seg in enumerate(segs):
            vars_ = []
            for c in range(len(choices[g])):
                var = model.new_int_var(0, seg.size, f"m{k}_{g}_{c}")
                m[k, g, c] = var
                vars_.append(var)
                if choices[g][c].transient_bytes > 0:
                    u[k, g, c] = model.new_bool_var(f"u{k}_{g}_{c}")
                    model.add(var <= seg.size * u[k, g, c])
            model.add(sum(vars_) == y[k + 1][g] - y[k][g])

    # layers sharing a tied weight agree on tensor parallelism (singleton segments: one layer each)
    for tied in tables.tied_segments:
        sharded = [sum(m[k, g, c] for k in range(S) for c, ch in enumerate(choices[g]) if ch.choice.tp_on)
                   for g in tied]
        for other in sharded[1:]:
            model.add(other == sharded[0])

    # send after stage k (time and bytes), read from tables indexed by the cut position
    q_table = [0] + [scale.ticks(tables.p2p_s[j - 1]) for j in range(1, L + 1)]
    o_table = [0] + [scale.memory_units_up(tables.boundary_bytes[j - 1]) for j in range(1, L + 1)]
    send_t, send_o = [], []
    for k in range(S - 1):
        e = model.new_int_var(0, max(q_table), f"e{k}")
        model.add_element(cut[k + 1], q_table, e)
        o = model.new_int_var(0, max(o_table), f"o{k}")
        model.add_element(cut[k + 1], o_table, o)
        send_t.append(e)
        send_o.append(o)

    # affine tail and state bytes per parameter
    big = 10**9
    sync_a, opt_a = rank_tail_s(s, tables.cluster, big)
    sync_b, opt_b = rank_tail_s(s, tables.cluster, 2 * big)
    beta_s = ((sync_b + opt_b) - (sync_a + opt_a)) / big
    alpha_s = max(0.0, (sync_a + opt_a) - beta_s * big)
    sigma = rank_state_bytes(s, big) / big

    t_ticks = {(g, c): scale.ticks(ch.time_s) for g in range(len(segs)) for c, ch in enumerate(choices[g])}
    tail_ticks = {(g, c): scale.ticks(beta_s * ch.num_params) for g in range(len(segs))
                  for c, ch in enumerate(choices[g])}
    horizon = sum(max(t_ticks[g, c] for c in range(len(choices[g]))) * seg.size for g, seg in enumerate(segs))
    horizon += sum(q_table)
    t_max = model.new_int_var(0, horizon, "t_max")
    s_max = model.new_int_var(0, horizon, "s_max")
    tail_hi = scale.ticks(alpha_s) + sum(max(tail_ticks[g, c] for c in range(len(choices[g]))) * seg.size
                                         for g, seg in enumerate(segs))
    tail_max = model.new_int_var(0, tail_hi, "tail_max")
    cap = scale.memory_units_down(tables.capacity_bytes)
    need = None
    tables.refined_lower_bound_s()
    if tables.rank_need is not None:
        big, rows = tables.rank_need
        need = [_chords([scale.ticks_real(v) * (1 - 1e-6) for v in row]) for row in rows]
    need_table = None
    if need is not None and s.virtual_stages > 1:
        # The same bound as a table (AddElement) as well: it propagates on the integer counts, which closes
        # interleaved models (a rank sums several stages) several times faster; with one stage per rank its
        # presolve costs more than it saves, and the chords suffice.
        need_table = [[horizon + 1 if v == float("inf") else max(0, scale.ticks_down(v, 1e-6) - L)
                       for v in row] for row in rows]
    for r in range(pp):
        own = [k for k in range(S) if k % pp == r]
        flight = tables.in_flight[r]
        time_r = []
        tail_r = []
        mem_r = []
        transient = []
        for k in own:
            stage_time = []
            for g in range(len(segs)):
                for c, ch in enumerate(choices[g]):
                    stage_time.append(t_ticks[g, c] * m[k, g, c])
                    tail_r.append(tail_ticks[g, c] * m[k, g, c])
                    per_layer = ch.fixed_bytes(sigma) + flight * ch.activation_bytes
                    mem_r.append(scale.memory_units_up(per_layer) * m[k, g, c])
                    if (k, g, c) in u:
                        transient.append((scale.memory_units_up(ch.transient_bytes), u[k, g, c]))
            if k < S - 1:
                stage_time.append(send_t[k])
                mem_r.append(send_o[k])
            if s.virtual_stages > 1:
                model.add(sum(stage_time) <= s_max)
            time_r += stage_time
            if k > 0:
                mem_r.append(send_o[k - 1])
        model.add(sum(time_r) <= t_max)
        if need is not None:
            # Cuts: a rank running n of the largest segment's layers needs at least need_r(n) seconds (the
            # refined bound's per-rank relaxation). need_r is convex in n, so every chord through neighbouring
            # integers lies below it at all integers: T_r ≥ a_j + b_j·n, in ticks rounded down, less a margin
            # of one tick per layer for the rounding of the terms of T_r; n ≤ the most that fit in memory.
            count = sum(y[k + 1][big] - y[k][big] for k in own)
            for intercept, slope in need[r][1]:
                model.add(sum(time_r) >= math.floor(intercept) - L + math.floor(slope) * count)
            model.add(count <= need[r][0])
            if need_table is not None:
                floor_r = model.new_int_var(0, horizon + 1, f"need{r}")
                model.add_element(count, need_table[r], floor_r)
                model.add(sum(time_r) >= floor_r)
        if r == tables.last_rank and tables.loss_bytes:
            mem_r.append(scale.memory_units_up(tables.loss_bytes))
        model.add(scale.ticks(alpha_s) + sum(tail_r) <= tail_max)
        if transient:
            r_max = model.new_int_var(0, max(v for v, _ in transient), f"transient{r}")
            for value, used in transient:
                model.add(r_max >= value * used)
            mem_r.append(r_max)
        model.add(sum(mem_r) <= cap)

    if s.virtual_stages > 1:
        model.add(s.virtual_stages * s_max >= t_max)  # redundant (a rank is v stages); tightens the LP bound
        objective = s.microbatches * t_max + s.bubble_stage_times * s_max + tail_max
    else:  # one stage per rank: the slowest stage is the slowest rank
        objective = (s.microbatches + s.bubble_stage_times) * t_max + tail_max
    model.minimize(objective)
    if cutoff_s is not None:
        model.add(objective <= scale.ticks_down(cutoff_s))
    if lower_bound_s is not None and math.isfinite(lower_bound_s):
        # A proven bound (StrategyTables.refined_lower_bound_s), less a margin for the integer rounding.
        model.add(objective >= scale.ticks_down(lower_bound_s, 1e-5))

    if hint is not None:
        _add_hint(model, tables, hint, cut=cut, y=y, m=m, u=u, sends=list(zip(send_t, send_o)),
                  tables_qo=(q_table, o_table))

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed
    # Restarts cycling through the search heuristics close these small models' last gap best (measured on
    # GPT-3 175B strategies: 0.6 s to optimality against > 6 s for the default branching).
    solver.parameters.search_branching = cp_model.PORTFOLIO_WITH_QUICK_RESTART_SEARCH
    solver.parameters.max_deterministic_time = max(time_limit_s, 0.01)
    # Wall time only as a backstop, so that a loaded machine (other jobs on the cores) does not cut a solve short
    # and change the plan: the deterministic limit decides; the caller's overall deadline may stop it earlier.
    backstop_s = max(20 * time_limit_s, 1.0)
    solver.parameters.max_time_in_seconds = max(min(backstop_s, wall_limit_s or float("inf")), 0.02)
    code = solver.solve(model)
    status = solver.status_name(code)
    bound = scale.seconds(solver.best_objective_bound) if code in (cp_model.OPTIMAL, cp_model.FEASIBLE) else 0.0
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ModelResult(status if status in ("INFEASIBLE",) else "UNKNOWN", None, None, bound, solver.wall_time)
    cuts = [solver.value(c) for c in cut]
    assignment: Assignment = []
    for k in range(S):
        stage = []
        for g, seg in enumerate(segs):
            start = max(cuts[k], seg.start)
            counts = [solver.value(m[k, g, c]) for c in range(len(choices[g]))]
            i = start
            for c, count in enumerate(counts):
                for _ in range(count):
                    stage.append((i, choices[g][c].choice))
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


def _add_hint(model: cp_model.CpModel, tables: StrategyTables, hint: Assignment, *, cut: list, y: list,
              m: dict, u: dict, sends: list, tables_qo: tuple[list[int], list[int]]) -> None:
    """Feed a known layout as the solver's starting point (OR-Tools add_hint), every variable it fixes."""
    counts: dict[tuple[int, int, int], int] = {}
    for k, stage in enumerate(hint):
        for i, choice in stage:
            g = tables.segment_of[i]
            c = next((j for j, ch in enumerate(tables.choices[g]) if ch.choice == choice), None)
            if c is None:
                return  # a choice this model does not offer: no hint rather than a wrong one
            counts[k, g, c] = counts.get((k, g, c), 0) + 1
    starts = [stage[0][0] for stage in hint] + [tables.num_layers]
    for k in range(1, len(starts) - 1):
        model.add_hint(cut[k], starts[k])
        for g, seg in enumerate(tables.segments):
            model.add_hint(y[k][g], min(max(starts[k], seg.start), seg.stop))
    for key, var in m.items():
        model.add_hint(var, counts.get(key, 0))
    for key, var in u.items():
        model.add_hint(var, int(counts.get(key, 0) > 0))
    q_table, o_table = tables_qo
    for k, (e, o) in enumerate(sends):
        model.add_hint(e, q_table[starts[k + 1]])
        model.add_hint(o, o_table[starts[k + 1]])
