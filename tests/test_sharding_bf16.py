"""`test_sharding`'s sharded-equals-unsharded check on the tiny-bf16 fixture (bf16 weights, no
block scales), in a file of its own so that pytest-xdist runs it beside the tiny-fp8 case. Two
meshes, where the bf16 weights split over experts and tensor: (1,4,2) and (2,2,2), greedy decoding
on (2,2,2) (the bf16 weights split over all three axes, the cache over data); the tiny-fp8 case
runs all six and decodes on two (and on (2,2,2) in tests/test_multiprocess.py)."""

from __future__ import annotations

from test_sharding import check_sharded_equals_unsharded


def test_sharded_equals_unsharded_bf16():
    check_sharded_equals_unsharded("tiny-bf16", [(1, 4, 2), (2, 2, 2)], greedy_on=[[2, 2, 2]])
