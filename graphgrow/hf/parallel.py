"""The checkpoint writer's tasks and the executors that run them: in this process, on a pool of processes, on
a Ray cluster, or on any ``concurrent.futures.Executor``.

Every output tensor's place is known before any is computed (the safetensors headers come from the shapes the
plan announces, so each tensor's offset in its file is fixed): :func:`~.checkpoint.rewrite_checkpoint` creates
each output file at its full size, header first, and a task (a run of source tensors, tasks about equal in
bytes) writes its tensors' bytes at their offsets with ``os.pwrite``, in any order, on any process that sees
the files.  The serial writer is the same task function run in this process, one unit a task, so both write
the same bytes.  A unit is the source tensors one ``plan.compute`` computes together (``plan.unit(name)``: the
stored pieces of one stacked-experts parameter, assembled, grown and cut at once); a unit is never split
between tasks.  A worker holds one unit's tensors at a time.
"""

from __future__ import annotations

import math
import os
import pickle
import uuid
from concurrent.futures import BrokenExecutor, Executor, as_completed, wait
from dataclasses import dataclass

from ..errors import GraphGrowError, InvalidArgumentError, UnsupportedModelError, first_line
from ..core.memory import available_memory

TASKS_PER_WORKER = 16  # more tasks than workers: a worker that drew small tensors takes another, and the check
# following the writer (layer_check.ChainedCheck) hears of finished layers about one layer at a time
MIN_TASK_BYTES = 64 << 20  # below this, a task's scheduling costs more than its tensors
BYTES_PER_WORKER = 2 << 30  # a worker process starts by importing torch (2-15 s here): one per 2 GiB written at most
WORKER_OVERHEAD = 1 << 30  # a worker's resident memory before its first tensor (python, torch: 0.65 GB here)


@dataclass
class WriteJob:
    """What every task needs: the source, the plan, the output folder, and where each new tensor goes."""

    src: object  # Checkpoint
    plan: object
    folder: str  # absolute: tasks may run on other machines (shared storage) and in other working directories
    announced: dict  # source name -> {new name: (shape, dtype)}
    places: dict  # new name -> (file name in folder, byte offset)


def run_task(job: WriteJob, names: list) -> tuple:
    """Compute the source tensors ``names`` (whole units) and write their new tensors' bytes in place;
    returns (source bytes done, the names) for the progress callback and the check following the writer."""
    import torch

    fds = {}
    try:
        for name in names:
            results = job.plan.compute(name, job.src.get(name))
            announced = job.announced[name]
            if not isinstance(results, dict) or set(results) != set(announced):
                got = sorted(results) if isinstance(results, dict) else type(results).__name__
                raise RuntimeError(f"plan.compute made {got} from tensor {name!r}, but plan.outputs "
                                   f"announced {sorted(announced)}")
            for new, tensor in results.items():
                shape, dtype = announced[new]
                ok = isinstance(tensor, torch.Tensor)
                if not ok or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                    what = f"{tuple(tensor.shape)} {tensor.dtype}" if ok else type(tensor).__name__
                    raise RuntimeError(f"plan.compute made tensor {new!r} (from {name!r}) as {what}, but "
                                       f"plan.outputs announced {shape} {dtype}")
                file, offset = job.places[new]
                if file not in fds:
                    fds[file] = os.open(os.path.join(job.folder, file), os.O_WRONLY)
                # the bytes through a numpy view: no copy (bf16 has no numpy dtype, uint8 does)
                _pwrite_all(fds[file], tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
                            offset)
            del results
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(job.src.nbytes(name) for name in names), list(names)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:  # (one pwrite writes at most 2 GiB on Linux)
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def units(src, plan) -> list:
    """The source names grouped by ``plan.unit`` (a name alone where the plan has none), in storage order."""
    unit_of = getattr(plan, "unit", None)
    grouped: dict = {}
    for name in src.names():
        grouped.setdefault(unit_of(name) if unit_of else name, []).append(name)
    return list(grouped.values())


def _unit_bytes(src, announced, unit) -> int:
    """A unit's bytes read and written: the cost a task balances."""
    out = sum(math.prod(shape) * dtype.itemsize for name in unit for shape, dtype in announced[name].values())
    return out + sum(src.nbytes(name) for name in unit)


def tasks(job: WriteJob, unit_list: list, workers: int) -> list:
    """Runs of consecutive units (neighbours in the files), each about 1/(TASKS_PER_WORKER x workers) of the
    bytes, at least MIN_TASK_BYTES; a unit larger than that is a task alone.  One unit a task for one worker."""
    if workers == 1:
        return unit_list
    costs = [_unit_bytes(job.src, job.announced, u) for u in unit_list]
    target = max(sum(costs) / (workers * TASKS_PER_WORKER), MIN_TASK_BYTES)
    out, run, size = [], [], 0
    for unit, cost in zip(unit_list, costs):
        run, size = run + unit, size + cost
        if size >= target:
            out.append(run)
            run, size = [], 0
    return out + ([run] if run else [])


def _available_memory() -> int:
    return available_memory() or 1 << 62  # unknown: memory does not cap


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers(src, announced, unit_list: list) -> int:
    """The CPU count, capped by memory (a worker holds one unit: its float32 arithmetic needs about four
    copies of the largest unit's tensors, plus :data:`WORKER_OVERHEAD`) and by the work (one worker per
    :data:`BYTES_PER_WORKER` written: a small checkpoint is written before a pool has started)."""
    largest = max((sum(math.prod(shape) for name in u for shape, _ in announced[name].values())
                   for u in unit_list), default=0)
    # a pickled weights file is loaded whole by each worker that reads it (memory-mapped where torch can)
    loaded = max((sum(src.nbytes(n) for n in names) for _, names in src.shards), default=0) if src.pickled else 0
    by_memory = _available_memory() // (4 * 4 * largest + loaded + WORKER_OVERHEAD)
    written = sum(math.prod(shape) * dtype.itemsize for specs in announced.values() for shape, dtype in specs.values())
    by_work = math.ceil(written / BYTES_PER_WORKER)
    return int(max(1, min(cpu_count(), by_memory, by_work, len(unit_list))))


def _pickled(job: WriteJob) -> bytes:
    try:
        return pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - pickle raises PicklingError, TypeError, AttributeError
        raise UnsupportedModelError(f"the growth plan cannot be sent to worker processes ({first_line(exc)}); "
                                    f"write with one worker (--workers 1, workers=1)") from None


# --- executors: run(job, units) yields run_task's results as tasks (runs of units: :func:`tasks`) finish; on an
# error, or when the caller stops, nothing is left running (the caller then removes the folder they write into)

class SerialWriter:
    """The tasks run one after the other in this process (the plan is used as given: nothing is pickled)."""

    workers = 1

    def run(self, job: WriteJob, unit_list: list):
        for unit in unit_list:  # (one unit a task: progress after each)
            yield run_task(job, unit)


_INSTALLED: dict = {}  # in a worker process: job key -> pickled WriteJob, then the WriteJob


def _keep_freed_memory() -> None:
    """In a worker process (which does nothing but stream tensors): glibc's malloc keeps freed blocks for reuse
    instead of returning every large one to the kernel.  Each tensor's float32 copies are the same few sizes
    over and over; fresh pages for each cost a page fault per 4 KiB, which was as long as the arithmetic."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large blocks from the heap, not from mmap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def _start_worker(key: str, blob: bytes, threads: int) -> None:
    """A pool worker's start (the pool's own processes: nobody else's memory settings are changed)."""
    _keep_freed_memory()
    _install(key, blob, threads)


def _install(key: str, blob: bytes, threads: int = 0) -> None:
    if key not in _INSTALLED:
        _INSTALLED.clear()  # (a Ray worker outlives a job: keep only the latest)
        _INSTALLED[key] = blob
    if threads:  # the pool's workers share the CPUs: torch's own threads would oversubscribe them
        import torch

        torch.set_num_threads(threads)


def _job(key: str) -> WriteJob:
    """The job, unpickled at its first task (an error there is the task's, not a broken pool's)."""
    job = _INSTALLED[key]
    if isinstance(job, (bytes, bytearray, memoryview)):
        try:
            job = _INSTALLED[key] = pickle.loads(job)
        except Exception as exc:  # noqa: BLE001 - a module missing on the worker's path, ...
            raise GraphGrowError(f"a worker process cannot read the growth plan ({first_line(exc)}): it needs the "
                                 f"same graphgrow and the plan's modules importable") from None
    return job


def _run_installed(key: str, names: list) -> tuple:
    return run_task(_job(key), names)


def _run_blob(key: str, blob: bytes, names: list) -> tuple:
    _install(key, blob)
    return run_task(_job(key), names)


def _drain(futures: list) -> None:
    for f in futures:
        f.cancel()
    wait(futures)  # tasks already running finish writing before their folder is removed


def _finished(futures: list, workers):
    """The futures' results as they finish; a worker process that died is one sentence."""
    try:
        for f in as_completed(futures):
            yield f.result()
    except BrokenExecutor:
        raise GraphGrowError(f"a worker process of the checkpoint writer died (out of memory? try fewer than "
                             f"{workers} workers)") from None


class PoolWriter:
    """The tasks on a pool of ``workers`` processes, started by "spawn" (a fork of a process running torch's
    threads can deadlock); the job is sent once to each worker."""

    def __init__(self, workers: int):
        self.workers = workers

    def run(self, job: WriteJob, unit_list: list):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        key, blob, task_list = uuid.uuid4().hex, _pickled(job), tasks(job, unit_list, self.workers)
        n = max(1, min(self.workers, len(task_list)))
        threads = max(1, cpu_count() // n)
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                                   initargs=(key, blob, threads))
        futures = [pool.submit(_run_installed, key, task) for task in task_list]
        try:
            yield from _finished(futures, n)
        finally:
            _drain(futures)
            pool.shutdown(wait=True, cancel_futures=True)


class ExecutorWriter:
    """The tasks submitted to a ``concurrent.futures.Executor`` the caller made (and shuts down); each task
    carries the pickled job, unpickled once per worker process."""

    def __init__(self, executor: Executor):
        self.executor = executor
        self.workers = getattr(executor, "_max_workers", None) or cpu_count()

    def run(self, job: WriteJob, unit_list: list):
        key, blob = uuid.uuid4().hex, _pickled(job)
        futures = [self.executor.submit(_run_blob, key, blob, task) for task in tasks(job, unit_list, self.workers)]
        try:
            yield from _finished(futures, self.workers)
        finally:
            _drain(futures)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InvalidArgumentError("writing on a Ray cluster needs ray (pip install 'graphgrow[ray]')") from None
    return ray


class RayWriter:
    """The tasks as Ray tasks (one CPU each) on the cluster at ``address`` ("auto": the running cluster; None:
    the session already open in this process, else as ``ray.init()`` finds or starts one); ``init`` goes to
    ``ray.init`` (a ``runtime_env``, ...).  The source and output folders must be on storage every node sees at
    the same path.  At most ``workers`` tasks in flight when given, else the cluster's CPU count."""

    def __init__(self, address: str | None = None, workers: int | None = None, **init):
        self.address, self.init, self.workers = address, init, workers
        self._started = False  # this writer opened the Ray session (and closes it after its run)

    def connect(self) -> None:
        """Connect now (the command line does, before planning: an address that does not answer is refused
        before any work); :meth:`run` connects otherwise."""
        ray = _import_ray()
        if ray.is_initialized():
            return
        import logging

        self._reachable()

        try:
            ray.init(address=self.address, logging_level=logging.WARNING, **self.init)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError, ...
            where = f"at {self.address}" if self.address else "here"
            raise InvalidArgumentError(f"no Ray cluster answers {where}: {first_line(exc)}") from None
        self._started = True

    def _reachable(self) -> None:
        """A host:port that does not accept connections is refused at once (ray.init retries it for minutes)."""
        import socket

        host, _, port = (self.address or "").removeprefix("ray://").rpartition(":")
        if not (host and port.isdigit()):
            return  # None, "auto", "local": ray.init answers at once
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise InvalidArgumentError(f"no Ray cluster answers at {self.address}: {first_line(exc)}") from None

    def run(self, job: WriteJob, unit_list: list):
        self.connect()
        ray = _import_ray()
        try:
            yield from self._run(ray, job, unit_list)
        finally:
            if self._started:
                self._started = False
                ray.shutdown()

    def _run(self, ray, job, unit_list):
        key, blob = uuid.uuid4().hex, ray.put(_pickled(job))
        remote = ray.remote(num_cpus=1)(_run_blob)
        limit = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        todo, pending = list(reversed(tasks(job, unit_list, max(limit, 2)))), []
        try:
            while todo or pending:
                while todo and len(pending) < limit:
                    pending.append(remote.remote(key, blob, todo.pop()))
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:  # the task's own error, without Ray's wrapping
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, BaseException) else exc) from None
                except ray.exceptions.RayError as exc:  # a worker or node lost, an object lost, ...
                    raise GraphGrowError(f"a Ray task of the checkpoint writer failed: {first_line(exc)}") from None
                yield result
        finally:
            for ref in pending:
                ray.cancel(ref)
            if pending:
                ray.wait(pending, num_returns=len(pending), timeout=600)


def writer(workers=None, executor=None):
    """The executor ``rewrite_checkpoint`` runs its tasks on: ``executor`` None (``workers`` processes, this
    process where that is 1, :func:`default_workers` where None), "ray" (:class:`RayWriter`), a RayWriter, or a
    ``concurrent.futures.Executor``.  Returns a writer, or None for the default (decided once the sizes are known)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidArgumentError(f"workers must be a whole number of at least 1, not {workers!r}")
    if executor is None:
        return None if workers is None else SerialWriter() if workers == 1 else PoolWriter(workers)
    if executor == "ray":
        return RayWriter(workers=workers)
    if isinstance(executor, str) and executor in ("process", "processes"):
        return None if workers is None else SerialWriter() if workers == 1 else PoolWriter(workers)
    if isinstance(executor, (RayWriter, SerialWriter, PoolWriter)):
        return executor
    if isinstance(executor, Executor):
        return ExecutorWriter(executor)
    raise InvalidArgumentError(f"executor must be None, 'ray', a RayWriter or a concurrent.futures.Executor, "
                               f"not {executor!r}")
