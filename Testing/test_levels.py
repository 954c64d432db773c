"""The level plan: pyramids and the split of the step budget, in one place."""
import pytest

from DEQRegistrationLib.levels import auto_pyramid, plan_levels, split_budget


@pytest.mark.parametrize("total,weights", [(120, [1, 1]), (7, [1, 1, 1]), (10, [3, 1]), (3, [1, 1, 1]),
                                           (5, [0.2, 0.3, 0.5]), (100, [1])])
def test_split_sums_to_the_budget_with_a_step_per_level(total, weights):
    steps = split_budget(total, weights)
    assert sum(steps) == total
    assert all(s >= 1 for s in steps)


def test_split_follows_the_weights():
    assert split_budget(120, [1, 1]) == [60, 60]
    assert split_budget(120, [1, 1, 1]) == [40, 40, 40]
    assert split_budget(11, [3, 1]) == [8, 3]


@pytest.mark.parametrize("budget", [1, 2])
def test_a_budget_below_the_number_of_levels_runs_exactly_that_many_steps(budget):
    levels = plan_levels([4, 2, 1], budget)
    assert sum(level.steps for level in levels) == budget
    assert len(levels) == budget
    assert [level.factor for level in levels] == [4, 2][:budget]  # the coarsest levels keep theirs


def test_auto_pyramid_by_size():
    assert auto_pyramid((160, 192, 224)) == [4, 2]
    assert auto_pyramid((64, 64, 64)) == [4, 2, 1]
    assert auto_pyramid((30, 30)) == [2, 1]          # a 1/4 level would have 7 voxels
    assert auto_pyramid((20, 300)) == [1]
