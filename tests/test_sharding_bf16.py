"""`test_sharding`'s sharded-equals-unsharded check on the tiny-bf16 fixture (bf16 weights, no
block scales), in a file of its own so that pytest-xdist runs it beside the tiny-fp8 case."""

from __future__ import annotations

from test_sharding import check_sharded_equals_unsharded


def test_sharded_equals_unsharded_bf16():
    check_sharded_equals_unsharded("tiny-bf16")
