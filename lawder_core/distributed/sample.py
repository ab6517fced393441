"""`lawder sample --gpus N`: spread the masks over N Ray workers (or CPU workers), same images as one process.

One Ray actor per GPU (or CPU worker) loads the model once and then samples chunk after chunk, each with
`first_index` set to the chunk's offset: a process per chunk would pay for the imports, CUDA's start-up and the
model load every time. Sample i depends only on (seed, i), so the stitched result equals a single-process run
bit for bit (on the same device type). Chunks are a few batches long: small enough to balance the workers and
move the progress bar.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lawder_core.distributed.session import (
    check_local_gpus,
    ensure_ray,
    find_lawder_error,
    wait_for_resources,
)
from lawder_core.environment import DEFAULT_WAIT_S
from lawder_core.errors import TrainingError, UsageError, out_of_memory
from lawder_core.sample import SampleConfig, generate_here, sample_to_file, sampling_kwargs


def chunk_ranges(n: int, workers: int, batch_size: int, batches_per_chunk: int = 4) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n, whole batches of at most `batches_per_chunk` each."""
    if workers < 1 or batch_size < 1:
        raise UsageError("workers and --batch-size must be at least 1.")
    # Whole batches only: the same batches as one process, so even batch-dependent kernels give equal images.
    size = batch_size * max(1, min(batches_per_chunk, math.ceil(n / workers / batch_size)))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class SamplingWorker:
    """What one Ray actor holds: the run's model, loaded once on `device` (module level, so workers import it by
    name)."""

    def __init__(self, run: str, device: str) -> None:
        from lawder_core.sample import load_sampler

        self.loaded = load_sampler(run, device)

    def sample(self, masks: np.ndarray, first_index: int, kwargs: dict[str, Any]) -> np.ndarray:
        from lawder_core.sample import sample_loaded

        return sample_loaded(self.loaded, masks, first_index=first_index, **kwargs)

    def model_loads(self) -> int:
        """Models this worker's process has loaded (one, unless something reloads it per chunk)."""
        from lawder_core.sample import MODEL_LOADS

        return MODEL_LOADS[0]


def sample_distributed(run: str | os.PathLike, masks: np.ndarray, *, gpus: int, workers: int,
                       ray_address: str | None = None, progress: Callable[[int], None] | None = None,
                       wait: float = DEFAULT_WAIT_S, stats: dict[str, Any] | None = None,
                       **kwargs: Any) -> np.ndarray:
    """`sample_pairs` over `gpus` GPU workers, or `workers` CPU workers when gpus == 0. `stats`, when given, is
    filled with the workers, chunks and model loads of the run."""
    if gpus < 0 or workers < 0:
        raise UsageError("--gpus and --workers must be non-negative.")
    parallel = gpus if gpus > 0 else workers
    if parallel < 1:
        raise UsageError("distributed sampling needs --gpus N or --workers N of at least 1.")
    check_local_gpus(gpus, ray_address)
    ensure_ray(ray_address)  # before `import ray`: a local Ray's loopback mode is read at import
    import ray

    wait_for_resources(ray_address, {"GPU": 1.0} if gpus > 0 else {"CPU": 1.0}, wait)
    device = "cuda" if gpus > 0 else "cpu"
    chunks = chunk_ranges(len(masks), parallel, int(kwargs.get("batch_size", 16)))
    actor = ray.remote(num_gpus=1 if gpus > 0 else 0, num_cpus=1, max_restarts=0)(SamplingWorker)
    pool = [actor.remote(str(Path(run).resolve()), device) for _ in range(min(parallel, len(chunks)))]
    todo = list(reversed(chunks))
    pending: dict[Any, tuple[Any, int, int]] = {}
    out: np.ndarray | None = None
    try:
        idle = list(pool)
        while todo or pending:
            while todo and idle:  # one chunk in flight per worker
                start, stop = todo.pop()
                worker = idle.pop()
                pending[worker.sample.remote(masks[start:stop], start, kwargs)] = (worker, start, stop)
            done, _ = ray.wait(list(pending), num_returns=1)
            worker, start, stop = pending.pop(done[0])
            images = ray.get(done[0])
            idle.append(worker)
            if out is None:
                out = np.zeros((len(masks), *images.shape[1:]), np.uint8)
            out[start:stop] = images
            if progress is not None:
                progress(stop - start)
        if stats is not None:
            stats.update(workers=len(pool), chunks=len(chunks),
                         model_loads=sum(ray.get([w.model_loads.remote() for w in pool])))
    except Exception as err:
        for ref in pending:
            ray.cancel(ref, force=True)
        found = find_lawder_error(err) or out_of_memory(err)
        if found is not None:
            raise found from None
        raise TrainingError(f"distributed sampling failed: {err}", "See the worker log above.") from err
    finally:
        for worker in pool:
            ray.kill(worker)
    assert out is not None  # chunk_ranges covers at least one mask; plan_masks refuses an empty set
    return out


def generate_on_workers(cfg: SampleConfig, masks: np.ndarray, progress: Callable[[int], None] | None) -> np.ndarray:
    return sample_distributed(cfg.run, masks, gpus=cfg.gpus, workers=cfg.workers, ray_address=cfg.ray_address,
                              progress=progress, wait=cfg.wait_for_resources, **sampling_kwargs(cfg))


def run_sample(cfg: SampleConfig, progress: Callable[[int], None] | None = None,
               on_plan: Callable[[int], None] | None = None) -> dict[str, Any]:
    """`lawder sample`: in this process, or over Ray workers with --gpus N / --workers N (same images)."""
    generate = generate_on_workers if cfg.gpus > 0 or cfg.workers > 0 else generate_here
    return sample_to_file(cfg, progress=progress, on_plan=on_plan, generate_images=generate)
