"""linear and task_arithmetic: hand-computed values, guards, dtypes, bad input."""

from __future__ import annotations

import pytest
import torch

from weightmerge.api import merge_state_dicts

F64 = torch.float64


def sd(*values, dtype=F64):
    return {"t": torch.tensor(values, dtype=dtype)}


A, B, C = sd(1.0, 2.0, -4.0), sd(3.0, 0.0, 2.0), sd(-1.0, 4.0, 8.0)
BASE = sd(1.0, 1.0, 1.0)


def merge(base, models, method, params=None, dtype=F64):
    return merge_state_dicts(base, models, method, params, compute_dtype=dtype)["t"].tolist()


def test_linear_uniform_and_weighted():
    assert merge(None, [A, B, C], "linear") == [1.0, 2.0, 2.0]
    # weights 1, 2, 1: (A + 2B + C) / 4
    assert merge(None, [A, B, C], "linear", {"weight": [1.0, 2.0, 1.0]}) == [6 / 4, 6 / 4, 8 / 4]
    assert merge(None, [A, B, C], "linear", {"weight": [1.0, 2.0, 1.0], "normalize": False}) == [6, 6, 8]


def test_linear_ignores_the_base():
    assert merge(BASE, [A, B], "linear") == [2.0, 1.0, -1.0]


def test_linear_zero_weight_sum_is_the_weighted_sum():
    assert merge(None, [A, B], "linear", {"weight": [1.0, -1.0]}) == [-2.0, 2.0, -6.0]


def test_task_arithmetic_hand_computed():
    # task vectors: A-1 = [0, 1, -5], B-1 = [2, -1, 1]
    assert merge(BASE, [A, B], "task_arithmetic") == [3.0, 1.0, -3.0]
    assert merge(BASE, [A, B], "task_arithmetic", {"lambda": 0.5}) == [2.0, 1.0, -1.0]
    # weights 2, 1: 2*[0,1,-5] + [2,-1,1] = [2, 1, -9]; normalized / 3
    assert merge(BASE, [A, B], "task_arithmetic", {"weight": [2.0, 1.0]}) == [3.0, 2.0, -8.0]
    got = merge(BASE, [A, B], "task_arithmetic", {"weight": [2.0, 1.0], "normalize": True})
    assert got == pytest.approx([1 + 2 / 3, 1 + 1 / 3, 1 - 3.0], abs=1e-15)


def test_task_arithmetic_zero_weight_sum_divides_by_one():
    got = merge(BASE, [A, B], "task_arithmetic", {"weight": [1.0, -1.0], "normalize": True})
    assert got == [1 - 2.0, 1 + 2.0, 1 - 6.0]


def test_identical_experts_and_single_expert():
    assert merge(BASE, [A, A, A], "linear") == [1.0, 2.0, -4.0]
    assert merge(BASE, [A], "task_arithmetic") == [1.0, 2.0, -4.0]
    assert merge(BASE, [BASE, BASE], "task_arithmetic", {"lambda": 3.0}) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_half_in_half_out(method):
    base = {"t": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    models = [
        {"t": torch.tensor([1.5, 2.5], dtype=torch.bfloat16)},
        {"t": torch.tensor([0.5, 3.0], dtype=torch.bfloat16)},
    ]
    out = merge_state_dicts(base, models, method)["t"]
    assert out.dtype == torch.bfloat16
    expected = [1.0, 2.75] if method == "linear" else [1.0, 3.5]
    assert out.tolist() == expected


def test_bad_input():
    with pytest.raises(ValueError, match=r"'weight'.*3 values.*2 models"):
        merge(None, [A, B], "linear", {"weight": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="needs a base model"):
        merge(None, [A, B], "task_arithmetic")
    with pytest.raises(ValueError, match=r"unknown parameter 'lamda'.*did you mean 'lambda'"):
        merge(BASE, [A], "task_arithmetic", {"lamda": 0.3})
    with pytest.raises(TypeError, match="'normalize'"):
        merge(None, [A], "linear", {"normalize": "yes"})
