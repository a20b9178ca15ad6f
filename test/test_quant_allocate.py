"""The global bit allocation: budget kept, tile rule kept, bounds hold, clear errors."""
import itertools

import numpy as np
import pytest

from qvla_ros.quant.allocate import BudgetError, allocate, assignment_cost, uniform_bits
from qvla_ros.quant.packing import bit_counts, check_row_tile, row_bits
from qvla_ros.quant.plan import BitPlan
from qvla_ros.quant.sensitivity import SensitivityTable

BITS = (0, 2, 3, 4, 8, 16)
FINGERPRINT = {"class": "Stand", "config": None, "architecture": "a" * 64, "weights": "b" * 64, "params": 1}


def synthetic_table(shapes, seed=0):
    """Costs shaped like real ones: a per-channel scale times a per-width error, plus noise."""
    rng = np.random.default_rng(seed)
    costs, ins = {}, {}
    for name, (n, k) in shapes.items():
        s = rng.lognormal(0, 1.5, size=(n, 1))
        c = s * np.array([0.0, 4.0 ** -2, 4.0 ** -3, 4.0 ** -4, 4.0 ** -8, 0.0]) * rng.lognormal(0, 0.2, size=(n, 6))
        c[:, 0] = s[:, 0] * rng.lognormal(0, 1, size=n)
        costs[name], ins[name] = c, k
    return SensitivityTable(BITS, costs, ins, {"estimator": "synthetic", "policy": FINGERPRINT})


@pytest.fixture(scope="module")
def table():
    return synthetic_table({f"layer{i}": ((256, 128) if i % 2 else (128, 256)) for i in range(8)})


def test_budget_and_tiles_are_kept_and_cost_falls_with_budget(table):
    costs = []
    for budget in (1.5, 2.5, 3.0, 4.0, 6.0, 8.0):
        a = allocate(table, budget)
        assert a.bits_per_param <= budget + 1e-9
        assert a.bits_per_param > budget - 0.15  # the budget is used
        for name, bits in a.bits.items():
            check_row_tile(bit_counts(bits), len(bits), 16)
            assert (bits == 0).sum() <= 0.5 * len(bits)
        # memory counted row by row from the layout equals the reported memory
        mem = sum(row_bits(int(b), table.in_features[n]) for n, bits in a.bits.items() for b in bits)
        assert mem == pytest.approx(a.memory_bits)
        assert a.cost == pytest.approx(assignment_cost(table, a.bits))
        # the bound ignores the tile rule, which costs up to ~10% on layers of 8-16 tiles
        assert a.dual_bound <= a.cost and a.relative_gap < 0.15
        assert allocate(table, budget, row_tile=1).relative_gap < 0.01
        costs.append(a.cost)
    assert all(x > y for x, y in zip(costs, costs[1:]))


def test_beats_uniform_at_equal_memory(table):
    for bits in (2, 3, 4):
        uniform = uniform_bits(table, bits)
        mem = sum(row_bits(bits, table.in_features[n]) * len(b) for n, b in uniform.items())
        params = sum(len(b) * table.in_features[n] for n, b in uniform.items())
        a = allocate(table, mem / params)
        assert a.cost < assignment_cost(table, uniform)


def test_bounds_against_brute_force():
    t = synthetic_table({"a": (3, 40), "b": (3, 24)}, seed=4)
    params = 3 * 40 + 3 * 24
    # every assignment of the 6 channels to the 6 widths, vectorised
    choice = np.array(list(itertools.product(range(len(BITS)), repeat=6)))
    costs = np.concatenate([t.costs["a"], t.costs["b"]])                          # [6 channels, 6 widths]
    mem = np.array([[row_bits(b, t.in_features[n]) for b in BITS] for n in ("a",) * 3 + ("b",) * 3])
    total_cost = costs[np.arange(6), choice].sum(axis=1)
    total_mem = mem[np.arange(6), choice].sum(axis=1)
    pruned = choice == BITS.index(0)
    allowed = (pruned[:, :3].sum(axis=1) <= 1) & (pruned[:, 3:].sum(axis=1) <= 1)  # prune cap floor(0.5 * 3)
    for budget in (3.0, 4.0, 7.0):
        best = total_cost[allowed & (total_mem <= budget * params)].min()
        a = allocate(t, budget)
        assert a.dual_bound <= best + 1e-12 <= a.cost + 1e-12
        assert a.cost <= best * 1.05 + 1e-12


def test_errors_name_the_problem(table):
    with pytest.raises(BudgetError, match="below the 1.1.* bits/param that pruning 50%"):
        allocate(table, 0.5)
    with pytest.raises(BudgetError, match="positive"):
        allocate(table, -1)
    with pytest.raises(BudgetError, match="not a number"):
        allocate(table, "four")
    with pytest.raises(ValueError, match="unknown bit-width 5"):
        allocate(table, 4.0, candidate_bits=(2, 5))
    nan = SensitivityTable(BITS, {"x": np.full((16, 6), np.nan)}, {"x": 8}, {})
    with pytest.raises(BudgetError, match="no measured sensitivity"):
        allocate(nan, 4.0)
    # without pruning the floor is every row at 2 bits
    with pytest.raises(BudgetError, match="below"):
        allocate(table, 2.0, candidate_bits=(2, 4, 8))


def test_plan_from_allocation_round_trips(table, tmp_path):
    a = allocate(table, 3.0)
    plan = a.to_plan(table, act_bits=8)
    loaded = BitPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.plan_id == plan.plan_id
    assert loaded.bits_per_param() == pytest.approx(a.bits_per_param)
    assert loaded.weight_nbytes() * 8 == pytest.approx(a.memory_bits, rel=1e-6)
    assert loaded.provenance["allocation"]["duality_gap"] == pytest.approx(a.duality_gap)
    assert all(l.act_bits == 8 for l in loaded.layers.values())


def test_ragged_and_small_layers():
    t = synthetic_table({"ragged": (40, 64), "small": (5, 64), "even": (64, 64)}, seed=2)
    a = allocate(t, 3.5)
    for name, bits in a.bits.items():
        check_row_tile(bit_counts(bits), len(bits), 16)
    assert a.bits_per_param <= 3.5


def test_whole_policy_budget_is_converted_exactly(table):
    """scope='whole': the budget counts every weight of the policy; the rest (unallocated layers,
    biases, norms... at their stored width) is charged first, the layers get what is left."""
    planned = sum(c.shape[0] * table.in_features[n] for n, c in table.costs.items())
    widths = {name: 16 for name in table.costs}
    widths["head"] = 32  # a Linear the table does not hold (kept float32)
    extra_params = 20_000  # head, embeddings, norms, biases, ...
    storage = {"params": planned + extra_params, "bits": 16 * planned + 32 * extra_params,
               "linear_weight_bits": widths}
    rest = 32 * extra_params
    for budget in (4.0, 5.0, 6.0):
        a = allocate(table, budget, scope="whole", storage=storage)
        assert a.budget_scope == "whole" and a.whole == {"params": storage["params"], "rest_bits": rest}
        whole = (a.memory_bits + rest) / storage["params"]
        assert a.whole_bits_per_param == pytest.approx(whole) and budget - 0.15 < whole <= budget + 1e-9
        # the same as the planned-layers budget the whole one converts to
        same = allocate(table, (budget * storage["params"] - rest) / planned)
        assert all((same.bits[n] == a.bits[n]).all() for n in a.bits)
        plan = a.to_plan(table)
        assert plan.budget_scope == "whole" and plan.whole_bits_per_param() == pytest.approx(whole)
        assert BitPlan.from_json(plan.to_json()).whole == a.whole
    # the storage record can come with the table (calibration writes it)
    with_meta = SensitivityTable(table.bits, table.costs, table.in_features, {**table.meta, "storage": storage})
    assert allocate(with_meta, 8.0, scope="whole").bits_per_param == allocate(
        table, 8.0, scope="whole", storage=storage).bits_per_param
    # the planned scope still reports the whole figure when the record is known
    assert allocate(with_meta, 3.0).whole_bits_per_param == pytest.approx(
        (allocate(table, 3.0).memory_bits + rest) / storage["params"])
    with pytest.raises(BudgetError, match="unquantized remainder alone costs"):
        allocate(table, rest / storage["params"], scope="whole", storage=storage)
    with pytest.raises(BudgetError, match="over the whole policy that pruning"):
        allocate(table, rest / storage["params"] + 0.01, scope="whole", storage=storage)
    with pytest.raises(BudgetError, match="storage record"):
        allocate(table, 8.0, scope="whole")  # an old table: no record
    with pytest.raises(BudgetError, match="no Linear 'layer0'"):
        allocate(table, 8.0, scope="whole", storage={**storage, "linear_weight_bits": {"head": 32}})
    with pytest.raises(BudgetError, match="scope"):
        allocate(table, 8.0, scope="everything", storage=storage)


def test_kernel_layout_budget_holds_on_the_gpu_layout_where_a_packed_one_overshoots(tmp_path):
    import torch

    from qvla_ros.kernels import prepare_packed
    from qvla_ros.quant.packing import PackedWeight

    # K = 1152 and 300 are not whole K-blocks: the kernel layout pads their rows (SigLIP's width)
    table = synthetic_table({"a": (128, 1152), "b": (64, 300), "c": (96, 4096)}, seed=3)
    params = sum(n * k for n, k in [(128, 1152), (64, 300), (96, 4096)])

    def resident_bits(allocation):
        total = 0
        for name, bits in allocation.bits.items():
            weight = torch.randn(len(bits), table.in_features[name]) * 0.05
            packed = PackedWeight.from_weight(weight, torch.from_numpy(bits.astype("int64")))
            total += prepare_packed(packed).nbytes() * 8
        return total

    for budget in (2.5, 3.0, 4.0):
        kernel = allocate(table, budget, layout="kernel")
        packed = allocate(table, budget)
        assert kernel.memory_bits <= budget * params
        assert resident_bits(kernel) == kernel.memory_bits  # priced exactly as the GPU holds it
        assert resident_bits(packed) > budget * params       # the packed pricing overshoots there
        plan = kernel.to_plan(table)
        assert plan.version == 3 and plan.layout == "kernel"
        assert plan.weight_bits() == kernel.memory_bits
        loaded = BitPlan.load(plan.save(tmp_path / f"k{budget}.json"))
        assert loaded.plan_id == plan.plan_id and loaded.layout == "kernel"
        assert packed.to_plan(table).version == 2
    with pytest.raises(BudgetError, match="layout must be one of"):
        allocate(table, 3.0, layout="gpu")
