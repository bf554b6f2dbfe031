"""Run the factorizations as tasks on a dask.distributed cluster (``--dask``).

``--dask local:N`` starts a :class:`distributed.LocalCluster` of N single-threaded worker
processes on this machine for the run; any other value is the address of a running scheduler
(``tcp://host:8786``) or the path of its ``--scheduler-file`` (``*.json``). Each
:class:`~onnx_lowrank.passes.FactorJob` becomes one task that runs
:func:`~onnx_lowrank.passes.run_job` on a worker with one BLAS thread, which is what the local
run does, so the output is byte-identical to ``--jobs N`` when the workers run the same numpy /
BLAS build on the same kind of CPU (a mismatch is reported as a warning).

The job is pickled as it is: a candidate whose weight is in memory ships it with the task; a
candidate that reads its weight lazily from an external data file ships only the path and offset,
and the worker reads it (the workers must then see the file at the same path). Nothing here
touches a candidate's matrix.

Needs the ``distributed`` extra: ``pip install "onnx-lowrank[distributed]"``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from threadpoolctl import threadpool_limits

from onnx_lowrank.model_io import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

    from onnx_lowrank.passes.jobs import FactorJob, JobExecutor, JobResult

__all__ = ["run_jobs", "executor", "CONNECT_TIMEOUT", "WORKER_TIMEOUT"]

logger = logging.getLogger(__name__)

#: Seconds to wait for a scheduler to answer before giving up with a one-line error.
CONNECT_TIMEOUT = 10.0
#: Seconds to wait for at least one worker when the scheduler has none yet.
WORKER_TIMEOUT = 60.0
#: Tasks in flight per worker thread. Submitting in a window rather than all at once bounds the
#: memory the client and the scheduler hold for jobs that ship their weight with the task.
WINDOW_PER_THREAD = 2

INSTALL_HINT = 'pip install "onnx-lowrank[distributed]"'


def executor(address: str) -> JobExecutor:
    """The pass's job executor for a dask cluster at ``address`` (see :func:`run_jobs`).

    The pass runs its jobs through whatever executor the workflow hands it
    (``PassState.executor``); this one submits them to the cluster, so the pass itself never
    imports this module.
    """

    def run(jobs: Sequence[FactorJob], progress: Callable[[int], Any]) -> list[JobResult]:
        return run_jobs(address, jobs, progress=progress)

    return run


def run_jobs(
    address: str,
    jobs: Sequence[FactorJob],
    *,
    progress: Callable[[int], Any] | None = None,
) -> list[JobResult]:
    """Run every job as a dask task; return their results in the order of ``jobs``.

    Parameters
    ----------
    address : str
        ``local:N`` (a local cluster of N worker processes, closed afterwards), a scheduler
        address (``tcp://host:8786``, ``host:8786``) or a scheduler file (``*.json``).
    jobs : sequence of FactorJob
        Submitted as they are (pickled); their candidates' weights are not read here.
    progress : callable, optional
        Called with ``1`` each time a task finishes.

    Raises
    ------
    ModelError
        dask.distributed is not installed, the cluster cannot be started or reached, it has no
        workers, or the workers cannot import onnx-lowrank; a worker's exception is re-raised
        with the label of its job.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ModelError(f"--dask needs dask.distributed, which is not installed: {INSTALL_HINT}") from None
    with _client(address) as client:
        _check_workers(client, address)
        return _run(client, jobs, progress)


# -- the task ---------------------------------------------------------------------------------

def _run_remote(job: FactorJob) -> JobResult:
    """The task: ``run_job`` with one BLAS thread, as the local run does it.

    The limit is set for the whole worker process and not restored: threadpoolctl's limits are
    process-wide, so a per-task ``with threadpool_limits(1)`` would be undone by the first task
    to finish while another thread of a multi-threaded worker is still inside BLAS (and BLAS
    results depend on the thread count in their last bits). Dask's nanny starts workers with
    ``OPENBLAS_NUM_THREADS=1`` etc. already; this also covers workers started without one.
    """
    from onnx_lowrank.passes.jobs import run_job

    threadpool_limits(limits=1)
    return run_job(job)


def _worker_info() -> dict[str, Any]:
    """What decides whether a worker computes the same bits as this process."""
    import numpy
    from threadpoolctl import threadpool_info

    from onnx_lowrank.version import __version__

    # Lists, not tuples: the answer may cross msgpack, which turns tuples into lists.
    blas = sorted([str(i.get("internal_api")), str(i.get("version")), str(i.get("architecture"))]
                  for i in threadpool_info() if i.get("user_api") == "blas")
    return {"onnx-lowrank": __version__, "numpy": numpy.__version__, "blas": blas}


# -- connecting -------------------------------------------------------------------------------

@contextmanager
def _client(address: str) -> Iterator[Client]:
    from distributed import Client

    address = address.strip()
    if address.startswith("local:"):
        with _local_cluster(address) as cluster:
            try:
                client = Client(cluster, set_as_default=False, timeout=CONNECT_TIMEOUT)
            except Exception as exc:
                raise ModelError(f"--dask {address}: cannot connect to the local cluster: {_one_line(exc)}") from None
            with client:
                yield client
        return
    kwargs: dict[str, Any] = {}
    if address.endswith(".json"):
        scheduler = _scheduler_file_address(address)
        kwargs["scheduler_file"] = address
    else:
        scheduler = kwargs["address"] = address
    # Probe first: a Client that fails half-way through its constructor prints a traceback from
    # its __del__ at exit and delays it by seconds; a bare connection fails cleanly.
    _probe(scheduler, address)
    try:
        client = Client(**kwargs, set_as_default=False, timeout=CONNECT_TIMEOUT)
    except Exception as exc:
        raise ModelError(f"--dask {address}: cannot connect to a dask scheduler within {CONNECT_TIMEOUT:g} s "
                         f"({_one_line(exc)})") from None
    with client:
        if not client.scheduler_info().get("workers"):
            logger.warning("dask scheduler %s has no workers yet: waiting up to %g s", address, WORKER_TIMEOUT)
            try:
                client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
            except Exception:
                raise ModelError(f"--dask {address}: the scheduler has no workers (waited {WORKER_TIMEOUT:g} s); "
                                 f"start some with `dask worker {address}`") from None
        yield client


def _scheduler_file_address(path: str) -> str:
    import json

    try:
        return str(json.loads(Path(path).read_text())["address"])
    except FileNotFoundError:
        raise ModelError(f"--dask {path}: no such scheduler file (`dask scheduler --scheduler-file` writes it)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"--dask {path}: not a dask scheduler file ({_one_line(exc)})") from None


def _probe(scheduler: str, address: str) -> None:
    """Open and close one connection to the scheduler; a one-line ModelError when that fails."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect
    from distributed.security import Security

    async def probe() -> None:
        comm = await connect(scheduler, timeout=CONNECT_TIMEOUT, **Security().get_connection_args("client"))
        await comm.close()

    try:  # in a thread of its own: the caller may be running an event loop (Jupyter)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, probe()).result()
    except (OSError, TimeoutError) as exc:
        raise ModelError(f"--dask {address}: cannot connect to a dask scheduler within {CONNECT_TIMEOUT:g} s "
                         f"({_one_line(exc)}); start one with `dask scheduler`, or use --dask local:N") from None
    except ValueError as exc:
        raise ModelError(f"--dask {address}: not a scheduler address ({_one_line(exc)}); "
                         "expected tcp://host:8786, a scheduler file (*.json) or local:N") from None
    except Exception as exc:
        raise ModelError(f"--dask {address}: the server there does not speak the dask protocol "
                         f"({type(exc).__name__}); give the scheduler's port (8786 by default), not the "
                         "dashboard's") from None


@contextmanager
def _local_cluster(address: str) -> Iterator[Any]:
    from distributed import LocalCluster

    n = int(address[len("local:"):])
    # The scheduler runs in this process: keep its INFO lines (start, "closing all comms", ...)
    # off the terminal for the cluster's whole life; LocalCluster's own silence_logs is undone
    # before its last messages.
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        try:
            # Worker processes with one thread each, as --jobs N runs N threads with one BLAS
            # thread each; no dashboard (no port to collide with).
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.ERROR)
        except Exception as exc:
            raise ModelError(f"--dask {address}: cannot start a local dask cluster: {_one_line(exc)}") from None
        try:
            yield cluster
        finally:
            cluster.close()
    finally:
        quiet.setLevel(level)


def _check_workers(client: Client, address: str) -> None:
    """Every worker imports onnx-lowrank; warn where its numerics may differ from this process."""
    here = _worker_info()
    infos = client.run(_worker_info, on_error="return")
    for worker, info in sorted(infos.items()):
        if isinstance(info, BaseException):
            raise ModelError(f"--dask {address}: worker {worker} cannot run onnx-lowrank ({_one_line(info)}); "
                             f"install the same onnx-lowrank on the workers")
        different = [key for key in ("onnx-lowrank", "numpy", "blas") if _same(info.get(key)) != _same(here[key])]
        if different:
            logger.warning("dask worker %s has a different %s than this machine (%s vs %s): its factors may differ "
                           "in the last bits from a local run", worker, "/".join(different),
                           [info.get(k) for k in different], [here[k] for k in different])


# -- running ----------------------------------------------------------------------------------

def _run(client: Client, jobs: list[FactorJob], progress: Callable[[int], Any] | None) -> list[JobResult]:
    from distributed import as_completed

    token = uuid.uuid4().hex[:12]
    results: list[Any] = [None] * len(jobs)
    index: dict[Any, int] = {}
    pending = iter(range(len(jobs)))

    def submit() -> Any | None:
        i = next(pending, None)
        if i is None:
            return None
        # An explicit unique key: the scheduler may be shared, and a job is not a pure function
        # of its repr. The prefix names the tasks on the dashboard.
        future = client.submit(_run_remote, jobs[i], key=f"onnx-lowrank-factorize-{token}-{i}", retries=0)
        index[future.key] = i
        return future

    window = max(4, WINDOW_PER_THREAD * max(1, sum(client.nthreads().values())))
    first = [f for f in (submit() for _ in range(min(window, len(jobs)))) if f is not None]
    done = as_completed(first, loop=client.loop)
    try:
        for future in done:
            i = index.pop(future.key)
            if future.status != "finished":
                exc = future.exception() if future.status == "error" else None  # else: cancelled
                raise _labelled(exc, jobs[i].label or f"job {i}")
            results[i] = future.result()
            future.release()
            if progress is not None:
                progress(1)
            nxt = submit()
            if nxt is not None:
                done.add(nxt)
    except BaseException:
        # An error or an interrupt: drop what is still queued or running on the cluster.
        remaining = list(getattr(done, "futures", ()))
        if remaining:
            client.cancel(remaining)
        raise
    return results


def _labelled(exc: BaseException | None, label: str) -> BaseException:
    """The worker's exception with the job's label in its message (same type where possible)."""
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover
        KilledWorker = ()  # type: ignore[assignment]  # noqa: N806
    if exc is None:
        return ModelError(f"{label}: the dask task was cancelled")
    if isinstance(exc, KilledWorker):
        return ModelError(f"{label}: dask workers died while factorizing it (out of memory? see the worker logs)")
    message = f"{label}: {exc}"
    try:
        new = type(exc)(message)
    except Exception:
        new = RuntimeError(f"{label}: {type(exc).__name__}: {exc}")
    new.__cause__ = exc  # keeps the remote traceback
    if hasattr(new, "add_note"):
        new.add_note(f"raised on a dask worker while factorizing {label}")
    return new


def _same(value: Any) -> str:
    """A canonical form for comparing answers that may have crossed msgpack (tuples -> lists)."""
    import json

    return json.dumps(value, sort_keys=True, default=str)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
