"""Global bit allocation: a multiple-choice knapsack over every channel of every layer.

    minimise   sum_c S[c, b_c]                      (action cost, from sensitivity.py)
    subject to sum_c mem(b_c, K_c) <= budget * P    (bits, every stored byte counted in the chosen
                                                     layout: packing.row_bits, or with
                                                     layout="kernel" kernels.layout.resident_row_bits
                                                     plus each layer's slot table)
               per layer: rows at each width a multiple of the row tile (the kernels' granularity)
               per layer: at most max_prune_fraction of the rows pruned

Solved in three steps:
1. Lagrangian relaxation: every channel picks argmin_b S[c, b] + lambda * mem(b); lambda is found by
   bisection as the smallest price whose choices fit the budget. The dual function at the bracket
   gives a lower bound on the optimum of the relaxed problem (tile rule dropped), hence of ours.
2. Tile repair per layer at that lambda: widths are visited from the widest down; a width whose
   row count breaks the tile rule gives its cheapest rows to narrower widths or takes rows from
   them, whichever costs less in the Lagrangian.
3. Greedy in tile-sized moves: first demote (least cost per bit saved) while over the budget, then
   promote (most cost saved per bit spent) while anything fits.
The reported duality gap (primal cost - dual bound) says how far from optimal the result can be.

Budget scope: scope="planned" counts bits per weight of the allocated layers only (the knapsack's
own units); scope="whole" counts them over the WHOLE policy (accounting.py): with P every weight of
the policy and R the stored bits of everything not allocated (other layers, biases, embeddings,
norms, action head, at their stored width), a whole budget B becomes exactly B * P - R bits for the
allocated layers. P and R come from the policy's storage record, which calibration writes into the
sensitivity table's meta ("storage"), or from `storage=` (accounting.policy_storage(policy)).
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .accounting import check_storage, rest_of_policy
from ..kernels.layout import LAYER_TABLE_BYTES, resident_row_bits
from .packing import DEFAULT_ROW_TILE, row_bits
from .plan import KERNEL_LAYOUT_VERSION, LAYOUTS, PLAN_VERSION, BitPlan, LayerPlan
from .quantizer import ALL_BITS, check_bits
from .sensitivity import SensitivityTable


class BudgetError(ValueError):
    """The budget cannot be met (or is not a budget)."""


@dataclass
class _Layer:
    name: str
    in_features: int
    cost: np.ndarray        # [N, J] action cost per option
    mem: np.ndarray         # [J] bits per row per option
    widths: tuple[int, ...]  # [J] bit-width per option, sorted by mem ascending
    prune_cap: int          # most rows that may be pruned
    unit: int               # rows per greedy move (row tile, or 1 for layers smaller than it)
    ragged: int | None      # option index allowed a count not a multiple of the tile
    assign: np.ndarray = field(default=None)  # [N] option index

    @property
    def n(self) -> int:
        return self.cost.shape[0]

    def memory(self) -> float:
        return float(self.mem[self.assign].sum())

    def total_cost(self) -> float:
        return float(self.cost[np.arange(self.n), self.assign].sum())


@dataclass
class Allocation:
    """The result: per-layer per-channel widths, and how good they are."""
    bits: dict[str, np.ndarray]
    in_features: dict[str, int]
    cost: float
    memory_bits: float
    params: int
    budget_bits_per_param: float
    lagrange_multiplier: float
    dual_bound: float
    seconds: float
    row_tile: int
    candidate_bits: tuple[int, ...]
    max_prune_fraction: float
    #: what budget_bits_per_param counts: "planned" layers or "whole" policy
    budget_scope: str = "planned"
    #: the rest of the policy {"params", "rest_bits"} (accounting.rest_of_policy), None if unknown
    whole: dict[str, int] | None = None
    #: the layout memory_bits prices rows in: "packed" or "kernel" (plan.LAYOUTS)
    layout: str = "packed"

    @property
    def bits_per_param(self) -> float:
        """Bits per weight of the allocated layers."""
        return self.memory_bits / self.params

    @property
    def whole_bits_per_param(self) -> float | None:
        """Bits per weight of the whole policy (None when the rest of the policy is unknown)."""
        if self.whole is None:
            return None
        return (self.memory_bits + self.whole["rest_bits"]) / self.whole["params"]

    @property
    def duality_gap(self) -> float:
        return self.cost - self.dual_bound

    @property
    def relative_gap(self) -> float:
        return self.duality_gap / self.cost if self.cost > 0 else 0.0

    def report(self) -> dict[str, Any]:
        whole = self.whole_bits_per_param
        return {"budget_bits_per_param": self.budget_bits_per_param, "budget_scope": self.budget_scope,
                "bits_per_param": round(self.bits_per_param, 6),
                "whole_bits_per_param": None if whole is None else round(whole, 6),
                "action_cost": self.cost, "dual_bound": self.dual_bound, "duality_gap": self.duality_gap,
                "relative_gap": self.relative_gap, "lagrange_multiplier": self.lagrange_multiplier,
                "seconds": round(self.seconds, 3), "row_tile": self.row_tile,
                "candidate_bits": list(self.candidate_bits), "max_prune_fraction": self.max_prune_fraction,
                **({"layout": "kernel"} if self.layout == "kernel" else {})}

    def to_plan(self, table: SensitivityTable, act_bits: int | Mapping[str, int] = 16,
                model: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None) -> BitPlan:
        """The BitPlan of this allocation for the model the table was measured on."""
        fingerprint = dict(model or table.meta.get("policy") or {})
        if "architecture" not in fingerprint:
            raise BudgetError("the sensitivity table does not name its model (meta['policy']); pass model=")
        layers = {}
        for name, bits in self.bits.items():
            a = act_bits[name] if isinstance(act_bits, Mapping) else act_bits
            layers[name] = LayerPlan(name, self.in_features[name], len(bits), bits, int(a))
        prov = {"calibration": {k: v for k, v in table.meta.items() if k not in ("policy", "storage")},
                "allocation": self.report()}
        prov.update(provenance or {})
        return BitPlan(layers=layers, model=fingerprint, budget_bits_per_param=self.budget_bits_per_param,
                       row_tile=self.row_tile, candidate_bits=self.candidate_bits,
                       action_cost=float(self.cost), provenance=prov, whole=self.whole,
                       budget_scope=self.budget_scope,
                       version=KERNEL_LAYOUT_VERSION if self.layout == "kernel" else PLAN_VERSION)


# ---- problem setup ----------------------------------------------------------------------------
def _build_layers(table: SensitivityTable, candidate_bits: Sequence[int], row_tile: int,
                  max_prune_fraction: float, layers: Sequence[str] | None, layout: str = "packed") -> list[_Layer]:
    names = list(table.costs) if layers is None else list(layers)
    out = []
    for name in names:
        if name not in table.costs:
            raise BudgetError(f"the sensitivity table has no layer {name!r}")
        full = table.costs[name]
        k = table.in_features[name]
        # "kernel": priced as a GPU holds the row (K-block padding included), larger than the
        # packed buffers for every width, so the budget then holds on both
        price = resident_row_bits if layout == "kernel" else row_bits
        widths = sorted(candidate_bits, key=lambda b: price(b, k))
        cost = np.stack([full[:, table.column(b)] if b != 16 or 16 in table.bits else np.zeros(full.shape[0])
                         for b in widths], axis=1).astype(np.float64)
        if not np.isfinite(cost).all():
            bad = int((~np.isfinite(cost).all(axis=1)).sum())
            raise BudgetError(f"layer {name!r}: {bad} channels have no measured sensitivity (NaN); "
                              "allocate needs the full table")
        n = cost.shape[0]
        small = n < row_tile
        cap = int(np.floor(max_prune_fraction * n)) if 0 in widths else 0
        if not small:
            cap = cap // row_tile * row_tile
        ragged = None
        if not small and n % row_tile:
            kept = [j for j, b in enumerate(widths) if b != 0]
            ragged = kept[0]  # the narrowest kept width absorbs the remainder
        out.append(_Layer(name, k, cost, np.array([price(b, k) for b in widths], dtype=np.float64),
                          tuple(widths), cap, 1 if small else row_tile, ragged))
    return out


def minimum_bits(layers: Sequence[_Layer]) -> float:
    """Fewest bits any allowed assignment takes: prune up to each layer's cap, the rest narrowest."""
    total = 0.0
    for layer in layers:
        kept = [j for j, b in enumerate(layer.widths) if b != 0]
        pruned = layer.prune_cap if 0 in layer.widths else 0
        total += (layer.n - pruned) * layer.mem[kept[0]]
        if pruned:
            total += pruned * layer.mem[layer.widths.index(0)]  # a pruned row keeps its output index
    return total


# ---- step 1: lagrangian -----------------------------------------------------------------------
def _choose(layer: _Layer, lam: float) -> np.ndarray:
    # ties go to the option with less memory (options are sorted by memory)
    return np.argmin(layer.cost + lam * layer.mem[None, :], axis=1)


def _enforce_prune_cap(layer: _Layer, lam: float) -> None:
    if 0 not in layer.widths:
        return
    j0 = layer.widths.index(0)
    pruned = np.flatnonzero(layer.assign == j0)
    excess = len(pruned) - layer.prune_cap
    if excess <= 0:
        return
    score = layer.cost[pruned] + lam * layer.mem[None, :]
    score[:, j0] = np.inf
    best = np.argmin(score, axis=1)
    delta = score[np.arange(len(pruned)), best] - (layer.cost[pruned, j0] + lam * layer.mem[j0])
    move = np.argsort(delta, kind="stable")[:excess]
    layer.assign[pruned[move]] = best[move]


def _dual(layers: Sequence[_Layer], lam: float, budget: float) -> float:
    return sum(float((l.cost + lam * l.mem[None, :]).min(axis=1).sum()) for l in layers) - lam * budget


# ---- step 2: tile repair ----------------------------------------------------------------------
def _repair_tiles(layer: _Layer, lam: float) -> None:
    if layer.unit == 1:
        return
    tile = layer.unit
    score = layer.cost + lam * layer.mem[None, :]
    j0 = layer.widths.index(0) if 0 in layer.widths else None
    order = list(range(len(layer.widths) - 1, 0, -1))  # widest first; the narrowest takes the rest
    for j in order:
        target = (layer.n % tile) if layer.ragged == j else 0
        count = int((layer.assign == j).sum())
        rem = (count - target) % tile
        if rem == 0:
            continue
        lower = np.arange(j)
        pruned_now = int((layer.assign == j0).sum()) if j0 is not None else 0
        # option "down": rem rows of width j go to their best narrower option
        here = np.flatnonzero(layer.assign == j)
        alt = score[np.ix_(here, lower)].copy()
        if j0 is not None and pruned_now + rem > layer.prune_cap:
            alt[:, j0] = np.inf
        down_cost, down = np.inf, None
        if len(here) >= rem and np.isfinite(alt).any():
            best = np.argmin(alt, axis=1)
            delta = alt[np.arange(len(here)), best] - score[here, j]
            pick = np.argsort(delta, kind="stable")[:rem]
            if np.isfinite(delta[pick]).all():
                down_cost, down = float(delta[pick].sum()), (here[pick], lower[best[pick]])
        # option "up": tile - rem rows from narrower options move to width j
        need = tile - rem
        below = np.flatnonzero(layer.assign < j)
        up_cost, up = np.inf, None
        if len(below) >= need:
            delta = score[below, j] - score[below, layer.assign[below]]
            pick = np.argsort(delta, kind="stable")[:need]
            up_cost, up = float(delta[pick].sum()), below[pick]
        if down is None and up is None:
            raise BudgetError(f"layer {layer.name!r}: cannot arrange {layer.n} rows in groups of {tile}")
        if up is None or (down is not None and down_cost <= up_cost):
            layer.assign[down[0]] = down[1]
        else:
            layer.assign[up] = j


# ---- step 3: greedy moves in tile units -------------------------------------------------------
def _moves(layer: _Layer, promote: bool) -> list[tuple[float, float, float, int, int]]:
    """Candidate moves of `unit` rows from option a to option b: (priority, d_cost, d_mem, a, b).
    Promotions: priority = -(cost saved per bit spent). Demotions: cost added per bit saved."""
    out = []
    u = layer.unit
    j0 = layer.widths.index(0) if 0 in layer.widths else None
    pruned = int((layer.assign == j0).sum()) if j0 is not None else 0
    for a in range(len(layer.widths)):
        rows = np.flatnonzero(layer.assign == a)
        if len(rows) < u:
            continue
        targets = range(a + 1, len(layer.widths)) if promote else range(a)
        for b in targets:
            if not promote and b == j0 and pruned + u > layer.prune_cap:
                continue
            # a ragged width must keep its remainder: only whole units leave or join it
            d = layer.cost[rows, b] - layer.cost[rows, a]
            pick = np.argpartition(d, u - 1)[:u] if len(rows) > u else np.arange(len(rows))
            d_cost = float(d[pick].sum())
            d_mem = float(u * (layer.mem[b] - layer.mem[a]))
            if promote:
                if d_cost >= 0 or d_mem <= 0:
                    continue
                out.append((d_cost / d_mem, d_cost, d_mem, a, b))
            else:
                if d_mem >= 0:
                    continue
                out.append((d_cost / -d_mem, d_cost, d_mem, a, b))
    return out


def _apply_move(layer: _Layer, a: int, b: int) -> None:
    rows = np.flatnonzero(layer.assign == a)
    d = layer.cost[rows, b] - layer.cost[rows, a]
    pick = np.argpartition(d, layer.unit - 1)[:layer.unit] if len(rows) > layer.unit else np.arange(len(rows))
    layer.assign[rows[pick]] = b


def _greedy(layers: list[_Layer], budget: float, promote: bool) -> None:
    used = sum(l.memory() for l in layers)
    version = [0] * len(layers)
    heap: list[tuple[float, int, int, float, float, int, int]] = []

    def push(i):
        for prio, d_cost, d_mem, a, b in _moves(layers[i], promote):
            heapq.heappush(heap, (prio, i, version[i], d_cost, d_mem, a, b))

    for i in range(len(layers)):
        push(i)
    while heap:
        if not promote and used <= budget:
            break
        prio, i, ver, d_cost, d_mem, a, b = heapq.heappop(heap)
        if ver != version[i]:
            continue
        if promote and used + d_mem > budget:
            continue  # never fits again: the budget left only shrinks
        _apply_move(layers[i], a, b)
        used += d_mem
        version[i] += 1
        push(i)


# ---- the solver -------------------------------------------------------------------------------
def allocate(table: SensitivityTable, budget_bits_per_param: float, *,
             candidate_bits: Sequence[int] = ALL_BITS, row_tile: int = DEFAULT_ROW_TILE,
             max_prune_fraction: float = 0.5, layers: Sequence[str] | None = None,
             iterations: int = 60, scope: str = "planned",
             storage: Mapping[str, Any] | None = None, layout: str = "packed") -> Allocation:
    """Widths for every channel of the table's layers under `budget_bits_per_param`, counted over
    the allocated layers (scope="planned") or over the whole policy (scope="whole"; needs the
    policy's storage record: the table's meta["storage"] or `storage`). layout: price rows as the
    packed buffers hold them ("packed": CPU, checkpoint) or as the GPU kernels do ("kernel"; the
    plan is then a version 3 plan). See the module docstring."""
    started = time.time()
    try:
        budget_bpp = float(budget_bits_per_param)
    except (TypeError, ValueError):
        raise BudgetError(f"budget {budget_bits_per_param!r} is not a number of bits per parameter") from None
    if not np.isfinite(budget_bpp) or budget_bpp <= 0:
        raise BudgetError(f"budget must be a positive number of bits per parameter, got {budget_bits_per_param!r}")
    candidate_bits = tuple(sorted({check_bits(b) for b in candidate_bits}))
    missing = [b for b in candidate_bits if b not in table.bits and b != 16]
    if missing:
        raise BudgetError(f"candidate widths {missing} are not in the sensitivity table (it has {list(table.bits)})")
    if not any(b != 0 for b in candidate_bits):
        raise BudgetError("candidate widths must include at least one kept width (2, 3, 4, 8 or 16)")
    if not 0.0 <= max_prune_fraction <= 1.0:
        raise BudgetError(f"max_prune_fraction must be in [0, 1], got {max_prune_fraction}")
    if scope not in ("planned", "whole"):
        raise BudgetError(f"budget scope must be 'planned' or 'whole', got {scope!r}")
    if layout not in LAYOUTS:
        raise BudgetError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    work = _build_layers(table, candidate_bits, row_tile, max_prune_fraction, layers, layout)
    params = sum(l.n * l.in_features for l in work)
    record = storage if storage is not None else table.meta.get("storage")
    whole = None
    if record is not None:
        try:
            whole = rest_of_policy(check_storage(record), {l.name: l.n * l.in_features for l in work})
        except ValueError as exc:
            raise BudgetError(f"the policy's storage record does not fit the table: {exc}") from None
    if scope == "whole":
        if whole is None:
            raise BudgetError("a whole-policy budget needs the policy's storage record, which this sensitivity "
                              "table lacks (calibrated before it was recorded): re-run calibrate, give the "
                              "policy (qvla allocate --policy), or budget the planned layers (--budget-scope planned)")
        rest_bpp = whole["rest_bits"] / whole["params"]
        if budget_bpp * whole["params"] <= whole["rest_bits"]:
            raise BudgetError(
                f"budget {budget_bpp:g} bits/param over the whole policy is below the {rest_bpp:.4f} bits/param "
                f"that the unquantized remainder alone costs ({whole['params'] - params} of {whole['params']} "
                f"weights, at their stored width)")
        budget = budget_bpp * whole["params"] - whole["rest_bits"]
    else:
        budget = budget_bpp * params
    # every layer's slot table (kernel layout) costs the same whatever its rows get: out of the
    # budget up front
    tables = len(work) * LAYER_TABLE_BYTES * 8 if layout == "kernel" else 0
    budget -= tables
    floor_bits = minimum_bits(work)
    if budget < floor_bits:
        lowest_bits = floor_bits + tables
        lowest = (f"{(lowest_bits + whole['rest_bits']) / whole['params']:.4f} bits/param over the whole policy"
                  if scope == "whole" else f"{lowest_bits / params:.4f} bits/param")
        raise BudgetError(
            f"budget {budget_bpp:g} bits/param{' over the whole policy' if scope == 'whole' else ''} is below "
            f"the {lowest} that pruning {max_prune_fraction:.0%} of the rows and storing the rest at "
            f"{min(b for b in candidate_bits if b != 0)} bits reaches (scales, zeros and row indices included)")

    def solve(lam: float) -> float:
        for l in work:
            l.assign = _choose(l, lam)
            _enforce_prune_cap(l, lam)
        return sum(l.memory() for l in work)

    # bracket the price: lam_lo (choices over budget) .. lam_hi (choices within budget)
    lam_lo, lam_hi = 0.0, 1.0
    if solve(0.0) <= budget:
        lam_hi = 0.0
    else:
        top = max(float(l.cost.max()) for l in work)
        lam_hi = max(top, 1e-30)
        while solve(lam_hi) > budget and lam_hi < 1e30:
            lam_lo, lam_hi = lam_hi, lam_hi * 4
        for _ in range(iterations):
            mid = 0.5 * (lam_lo + lam_hi) if lam_lo > 0 else lam_hi / 16
            if lam_lo == 0 and mid < 1e-300:
                break
            if solve(mid) > budget:
                lam_lo = mid
            else:
                lam_hi = mid
            if lam_lo > 0 and (lam_hi - lam_lo) <= 1e-9 * lam_hi:
                break
    dual = max(_dual(work, lam_lo, budget), _dual(work, lam_hi, budget))
    solve(lam_hi)
    for l in work:
        _repair_tiles(l, lam_hi)
    _greedy(work, budget, promote=False)
    _greedy(work, budget, promote=True)
    used = sum(l.memory() for l in work)
    if used > budget * (1 + 1e-12):
        raise BudgetError(f"could not fit {budget_bpp:g} bits/param ({scope}) with the row tile {row_tile} "
                          f"(best found {(used + tables) / params:.4f} over the planned layers)")
    used += tables
    bits = {l.name: np.asarray(l.widths, dtype=np.uint8)[l.assign] for l in work}
    cost = sum(l.total_cost() for l in work)
    return Allocation(bits=bits, in_features={l.name: l.in_features for l in work}, cost=cost,
                      memory_bits=used, params=params, budget_bits_per_param=budget_bpp,
                      lagrange_multiplier=lam_hi, dual_bound=min(dual, cost), seconds=time.time() - started,
                      row_tile=row_tile, candidate_bits=candidate_bits, max_prune_fraction=max_prune_fraction,
                      budget_scope=scope, whole=whole, layout=layout)


def uniform_bits(table: SensitivityTable, bits: int) -> dict[str, np.ndarray]:
    """Every channel of every layer at one width (the round-to-nearest baseline's plan)."""
    bits = check_bits(bits)
    return {name: np.full(c.shape[0], bits, dtype=np.uint8) for name, c in table.costs.items()}


def assignment_cost(table: SensitivityTable, bits: Mapping[str, np.ndarray]) -> float:
    """Summed predicted action cost of an assignment (16-bit rows cost 0)."""
    total = 0.0
    for name, b in bits.items():
        costs = table.costs[name]
        for w in np.unique(b):
            if int(w) == 16 and 16 not in table.bits:
                continue
            total += float(costs[b == w, table.column(int(w))].sum())
    return total
