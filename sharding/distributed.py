"""Several processes (hosts) as one mesh: `jax.distributed.initialize`, and bringing results home.

Each process runs the same program (multi-controller JAX): it sees every device in `jax.devices()`,
holds only its own (`jax.local_devices()`), and loads only the param shards those devices hold
(checkpoints are read through `jax.make_array_from_callback` / Orbax, shard by shard).
"""

from __future__ import annotations

import os

import jax
import numpy as np

ENV = {"coordinator": "DSV32_COORDINATOR", "num_processes": "DSV32_NUM_PROCESSES",
       "process_id": "DSV32_PROCESS_ID"}


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, environ=os.environ) -> dict | None:
    """The multi-process settings from arguments, else from DSV32_COORDINATOR (HOST:PORT),
    DSV32_NUM_PROCESSES and DSV32_PROCESS_ID; None when none is given (one process). A partial
    set is an error naming what is missing."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for k, var in ENV.items():
        if given[k] is None and environ.get(var, "") != "":
            given[k] = environ[var]
    if all(v is None for v in given.values()):
        return None
    missing = [f"--{k.replace('_', '-')} (or {ENV[k]})" for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"multi-process run: {', '.join(missing)} not given "
                         "(--coordinator, --num-processes and --process-id go together)")
    host, _, port = str(given["coordinator"]).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator {given['coordinator']!r}: expected HOST:PORT")
    try:
        n, i = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise ValueError(f"num_processes {given['num_processes']!r} and process_id "
                         f"{given['process_id']!r} must be integers") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"process_id {i} must be in [0, num_processes={n})")
    return {"coordinator_address": str(given["coordinator"]), "num_processes": n, "process_id": i}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the multi-process run described by the arguments or the environment (see
    `settings`) before any other JAX call; False (nothing done) for a single process."""
    s = settings(coordinator, num_processes, process_id)
    if s is None:
        return False
    jax.distributed.initialize(**s)
    return True


def to_host(x) -> np.ndarray:
    """A (possibly multi-process, sharded) array -> the whole value as numpy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
