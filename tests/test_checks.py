"""dsv32_jax.engine.checks: the validation shared by the API and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dsv32_jax.engine.checks import (
    check_budget,
    check_ids,
    check_max_new_tokens,
    check_sampling,
    check_temperature,
    check_top_p,
)


@pytest.mark.parametrize("value", [0, 0.0, 0.7, 1, 2.5, np.float32(0.5), np.int64(1)])
def test_temperature_accepts(value):
    out = check_temperature(value)
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("value, match", [
    (math.nan, "finite"), (math.inf, "finite"), (-math.inf, "finite"), (-0.1, ">= 0"), (-1, ">= 0"),
    ("0.5", "number"), (None, "number"), (True, "number"), ([1.0], "number"),
])
def test_temperature_refuses(value, match):
    with pytest.raises(ValueError, match=match) as err:
        check_temperature(value)
    assert "temperature" in str(err.value)


@pytest.mark.parametrize("value", [1, 1.0, 0.95, 1e-6, np.float64(0.5)])
def test_top_p_accepts(value):
    assert check_top_p(value) == float(value)


@pytest.mark.parametrize("value, match", [
    (0, r"\(0, 1\]"), (0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (-0.5, r"\(0, 1\]"), (math.nan, "finite"),
    (math.inf, "finite"), ("1", "number"), (False, "number"),
])
def test_top_p_refuses(value, match):
    with pytest.raises(ValueError, match=match) as err:
        check_top_p(value)
    assert "top_p" in str(err.value)


def test_sampling_returns_both():
    assert check_sampling(0, 1) == (0.0, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        check_sampling(1.0, 2)
    with pytest.raises(ValueError, match="temperature"):
        check_sampling(math.nan, 0.9)


@pytest.mark.parametrize("value", [1, 7, np.int32(3), 10**6])
def test_max_new_tokens_accepts(value):
    out = check_max_new_tokens(value)
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [0, -3, 1.0, 2.5, "8", True, None, math.nan])
def test_max_new_tokens_refuses(value):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        check_max_new_tokens(value)


def test_ids():
    assert check_ids([0, np.int64(5), 9], "prompt", 10) == [0, 5, 9]
    assert check_ids(np.array([[1, 2], [3, 4]]), "prompt", 10) == [1, 2, 3, 4]
    assert check_ids((7, 10**6), "stop_tokens") == [7, 10**6]  # no vocab: only >= 0
    for bad, match in (([10], r"prompt: token ids \[10\] are outside \[0, 10\)"),
                       ([-1], r"prompt: token ids \[-1\] are outside \[0, 10\)"),
                       ([1.0], "prompt must be integer token ids, got 1.0"),
                       ([True], "prompt must be integer token ids, got True"),
                       (["3"], "prompt must be integer token ids")):
        with pytest.raises(ValueError, match=match):
            check_ids(bad, "prompt", 10)
    with pytest.raises(ValueError, match=r"stop_tokens: token ids \[-2\] are negative"):
        check_ids([-2], "stop_tokens")


def test_budget():
    assert check_budget(10, 118, 128) == 118  # exactly the context
    with pytest.raises(ValueError, match=r"= 129 exceeds the context of 128 positions; at most 118 new tokens"):
        check_budget(10, 119, 128)
    with pytest.raises(ValueError, match="leaves no room"):
        check_budget(128, 1, 128)
    with pytest.raises(ValueError, match="leaves no room"):
        check_budget(500, 1, 128)
    with pytest.raises(ValueError, match="at least one token"):
        check_budget(0, 1, 128)
    with pytest.raises(ValueError, match="max_new_tokens"):
        check_budget(10, 0, 128)
