"""The control policies and the budget."""

import pytest
import torch

from vtprune.budget import Budget
from vtprune.registry import make_policy
from vtprune.signals import ImageSignals


def select(name, n, keep, **options):
    return make_policy(name, options).select(ImageSignals(n_tokens=n), keep).kept


def test_uniform_takes_the_centre_of_each_bin():
    assert select("uniform", 16, 4).tolist() == [2, 6, 10, 14]
    assert select("uniform", 10, 3).tolist() == [1, 5, 8]
    assert select("uniform", 7, 1).tolist() == [3]
    assert select("uniform", 5, 5).tolist() == [0, 1, 2, 3, 4]


def test_random_is_seeded_sorted_and_distinct():
    first = select("random", 576, 64, seed=3)
    assert torch.equal(first, select("random", 576, 64, seed=3))
    assert not torch.equal(first, select("random", 576, 64, seed=4))
    assert torch.equal(first, first.unique()) and len(first) == 64


@pytest.mark.parametrize(
    ("keep", "available", "tokens"),
    [(64, 576, 64), (600, 576, 576), (1, 10, 1), (0.25, 576, 144), (1.0, 576, 576), (0.001, 576, 1)],
)
def test_budget_tokens(keep, available, tokens):
    assert Budget(keep).tokens(available) == tokens
