"""Audits on Ray: one actor per worker holds a loaded model, and the job's shard tasks stream through them.

An audit is a list of independent shard tasks (:meth:`~patchslim.audit.runner.AuditJob.shard_tasks`), each a
pure function of (model, data, plans, shard). On Ray (https://docs.ray.io), the driver builds the same
:class:`~patchslim.audit.runner.AuditJob` as the local runner, starts one :class:`AuditWorker` actor per
worker (one per GPU when the cluster has GPUs, else one per CPU slot), and hands each actor its next task as
soon as it returns the last one: the dispatch of :class:`ray.util.ActorPool`, one task in flight per actor,
written out so that a failed task is known by its shard. Each actor computes
:meth:`~patchslim.audit.runner.AuditJob.compute_task` and returns the arrays; the driver writes them as the
same part files the local runner writes, so resuming, ``--part`` and the report work unchanged, and only the
data (and a weights file) has to be visible to the workers, not the output folder.

Faults are Ray's to handle; this module has no queue, retry or heartbeat of its own:

- a worker process that dies is restarted by Ray (``max_restarts=-1``) and its task is run again
  (``max_task_retries``); a task whose worker died more often than that is reported failed, the other tasks
  finish, and the report lists the shards it lacks (rerunning the command retries them);
- a driver that dies takes its actors with it; the part files already written stay, and the same command
  resumes from them;
- each actor checks, before its first task, that it can read the data and loads the same model as the driver
  (same parameters, by digest): a worker that cannot see the data folder stops the audit with a message that
  says so, instead of reporting every image as undecodable;
- an address is probed with a plain TCP connection before ``ray.init`` (which would otherwise wait for
  minutes on an unreachable cluster).

The model reaches the actors by name and weights file (a :class:`ModelRecipe`: each actor loads it on its own
device) or, for a model built in memory (:func:`~patchslim.models.wrap_model`), through Ray's object store.

A local Ray (no address) is started on this machine's loopback interface only, with Ray's usage statistics
off; ``address="auto"`` or ``HOST:PORT`` (``ray://HOST:PORT`` for Ray Client) joins a running cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from patchslim.audit.runner import AuditJob, ShardResult, ShardTask
from patchslim.errors import ClusterError, DataNotFoundError, PatchslimError

DEFAULT_RETRIES = 3
PROBE_SECONDS = 3.0
DATA_SAMPLE = 64
RAY_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` records its address
# A Ray started by patchslim listens on loopback only and sends no usage statistics.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class ModelRecipe:
    """How a worker loads the model itself (:func:`~patchslim.models.load_model`'s arguments).

    The weights file (or ``local-dir:`` folder) must be at the same path on every node.
    """

    name: str
    weights: str | None = None
    pretrained: bool = True
    precision: str = "fp32"
    seed: int = 0

    def absolute(self) -> "ModelRecipe":
        """The same recipe with its weights file and ``local-dir:`` folder as absolute paths (workers start
        elsewhere)."""
        from patchslim.models import LOCAL_DIR_PREFIX

        name = self.name
        if name.startswith(LOCAL_DIR_PREFIX):
            name = LOCAL_DIR_PREFIX + os.path.abspath(name[len(LOCAL_DIR_PREFIX):])
        weights = os.path.abspath(self.weights) if self.weights else self.weights
        return replace(self, name=name, weights=weights)

    def load(self, device: str):
        from patchslim.models import load_model

        return load_model(self.name, device=device, weights=self.weights, pretrained=self.pretrained,
                          precision=self.precision, seed=self.seed)


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide an audit runs on Ray.

    Attributes:
        address: ``None`` starts a local Ray on this machine; ``"auto"``, ``HOST:PORT`` or ``ray://HOST:PORT``
            joins a running cluster. Ignored when this process is already connected to Ray.
        workers: actors (default: the cluster's GPUs, else its CPUs).
        retries: how often a task is run again after its worker died (``max_task_retries``).
        cpus: CPUs of a local Ray (default: this machine's, or ``workers`` if more).
        probe_seconds: how long the address probe waits for an answer.
    """

    address: str | None = None
    workers: int | None = None
    retries: int = DEFAULT_RETRIES
    cpus: int | None = None
    probe_seconds: float = PROBE_SECONDS

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise PatchslimError(f"--ray-workers must be at least 1, got {self.workers}")
        if self.retries < 0:
            raise PatchslimError(f"--ray-retries must be 0 or more, got {self.retries}")


@dataclass
class RayRunSummary:
    """What :func:`run_on_ray` did.

    Attributes:
        shards: shards in the audit.
        ran: shard tasks computed by this call.
        reused: shards whose parts were already there.
        failed: shard -> why its task failed (its worker died more often than the retries allow).
        seconds: wall time of the call, start-up included.
        startup_seconds: from the call to every actor holding its model (Ray's start or join, actors).
        workers: one line per actor: node, process id and device of its first process.
        restarts: worker processes that replaced a dead one (seen as a new process id behind an actor).
        complete: every (plan, shard) part exists.
    """

    shards: int
    ran: int
    reused: int
    failed: dict[int, str]
    seconds: float
    startup_seconds: float
    workers: list[str]
    restarts: int
    complete: bool


# --------------------------------------------------------------------------- checks run before any work

def probe_address(address: str, timeout: float = PROBE_SECONDS) -> str:
    """Checks that a Ray address answers before ``ray.init`` (which would wait for minutes); returns the address
    to pass to ``ray.init``.

    ``"auto"`` is resolved as Ray resolves it: ``$RAY_ADDRESS``, else the cluster ``ray start --head`` started
    on this machine.

    Raises:
        ClusterError: nothing to join, a malformed address, or no answer within ``timeout`` seconds.
    """
    text = address.strip()
    if text == "auto":
        text = os.environ.get("RAY_ADDRESS", "").strip()
        if not text or text == "auto":
            try:
                text = RAY_CLUSTER_FILE.read_text().strip()
            except OSError:
                text = ""
        if not text:
            raise ClusterError("--ray-address auto found no Ray cluster: none was started on this machine with "
                               "`ray start --head` and RAY_ADDRESS is not set; give the head node's HOST:PORT, or "
                               "leave --ray-address out to start a local Ray")
    host_port = text.split("://", 1)[1] if "://" in text else text
    host, sep, port = host_port.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--ray-address must be HOST:PORT (e.g. 10.0.0.5:6379, as `ray start --head` prints it), "
                           f"ray://HOST:PORT or auto, got {address!r}")
    start = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        waited = time.monotonic() - start
        why = "no answer" if isinstance(exc, (socket.timeout, TimeoutError)) else (exc.strerror or str(exc))
        raise ClusterError(f"cannot reach a Ray cluster at {text} ({why} after {waited:.1f} s): start one there "
                           "with `ray start --head`, check the address (the head node's HOST:PORT, port 6379 by "
                           "default) and any firewall between here and it, or leave --ray-address out to run on "
                           "a local Ray on this machine") from None
    return text


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def data_problem(data: Any, sample: int = DATA_SAMPLE) -> str | None:
    """Why this process cannot read ``data`` (None: it can): the zip or some of up to ``sample`` evenly spaced
    image files are missing. Canvases travel with the data and are always there."""
    reader = getattr(data, "reader", None)
    if data.canvases is not None or reader is None:
        return None
    zip_source = getattr(reader, "source", None)
    if isinstance(zip_source, (str, os.PathLike)):
        return None if Path(zip_source).is_file() else f"the zip {zip_source} is not there"
    paths = getattr(reader, "paths", None)
    if paths is None:
        return None
    positions = np.unique(np.asarray(data.positions)[np.linspace(0, len(data) - 1, min(sample, len(data)))
                                                     .astype(np.int64)]) if len(data) else []
    missing = [paths[int(p)] for p in positions if not os.path.exists(paths[int(p)])]
    if not missing:
        return None
    return f"{len(missing)} of {len(positions)} sampled image files are not there (e.g. {missing[0]})"


def absolute_paths(data: Any) -> Any:
    """``data`` with its files named by absolute paths (a worker's working folder is not the driver's); the
    items, labels and fingerprint are unchanged."""
    import copy

    from patchslim.data import FileReader, ZipReader

    reader = data.reader
    if isinstance(reader, FileReader) and not all(os.path.isabs(p) for p in reader.paths):
        reader = copy.copy(reader)
        reader.paths = [os.path.abspath(p) for p in reader.paths]
    elif isinstance(reader, ZipReader) and isinstance(reader.source, (str, os.PathLike)):
        reader = copy.copy(reader)
        reader.source = os.path.abspath(reader.source)
    else:
        return data
    return replace(data, reader=reader, fingerprint=data.fingerprint)


def weights_digest(model: Any) -> str:
    """A short digest of the model's parameters and buffers (the same model on every worker)."""
    import torch

    from patchslim.quantize import plain_tensors

    digest = hashlib.sha1()
    for name, tensor in plain_tensors(model.model.state_dict()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- the actor

class AuditWorker:
    """Holds a loaded model and computes shard tasks (a Ray actor; plain class, wrapped by :func:`run_on_ray`).

    The model is loaded and the data checked on the first call, not in ``__init__``: a process that Ray restarts
    after a crash does the same before its next task, and a failure reaches the driver as a task error with its
    message.
    """

    def __init__(self, shared: dict, job_args: dict, device: str, threads: int):
        # ``shared``: {"model": ModelRecipe or object ref of a LoadedModel, "data": object ref of the data}; the
        # refs are fetched on first use (Ray keeps them alive for a restarted actor too).
        self._shared, self._job_args = shared, job_args
        self._device, self._threads = device, threads
        self._job: AuditJob | None = None
        self._digest = ""

    def _ready(self) -> AuditJob:
        if self._job is None:
            import ray
            import torch

            torch.set_num_threads(self._threads)
            where = f"worker on {_node()} (pid {os.getpid()})"
            source, data = self._shared["model"], ray.get(self._shared["data"])
            if isinstance(source, ray.ObjectRef):
                source = ray.get(source)
            problem = data_problem(data)
            if problem:
                raise DataNotFoundError(
                    f"the Ray {where} cannot read the data: {problem}. Every worker must see the data at the same "
                    "path as the driver: put it on storage all nodes mount at that path (NFS, a mounted bucket) or "
                    "copy it there on every node")
            if isinstance(source, ModelRecipe):
                try:
                    model = source.load(self._device)
                except (PatchslimError, OSError) as exc:
                    raise ClusterError(f"the Ray {where} cannot load the model {source.name}: {exc}") from None
            else:
                model = source
            self._job = AuditJob(model, data, **self._job_args)
            self._digest = weights_digest(model)
        return self._job

    def check(self) -> dict:
        """Loads the model and checks the data; returns where this actor runs and its model's digest."""
        job = self._ready()
        return dict(node=_node(), pid=os.getpid(), device=str(job.model.device), digest=self._digest)

    def run(self, task: ShardTask) -> tuple[ShardResult, int]:
        """Computes a shard task; returns its result and this process's id."""
        return self._ready().compute_task(task), os.getpid()


def _node() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # pragma: no cover - outside Ray
        return socket.gethostname()


# --------------------------------------------------------------------------- Ray itself

@contextlib.contextmanager
def ray_session(settings: RaySettings) -> Iterator[Any]:
    """The ``ray`` module, connected: to the Ray this process already uses, else to ``settings.address``
    (probed first), else to a local Ray started here and stopped at the end.

    Raises:
        ClusterError: the address does not answer.
    """
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield sys.modules["ray"]
        return
    address = probe_address(settings.address, settings.probe_seconds) if settings.address else None
    on_this_machine = address is None or _is_loopback(address)
    for key, value in LOCAL_RAY_ENV.items():  # read by Ray when imported and by the processes it starts
        if on_this_machine or key == "RAY_USAGE_STATS_ENABLED":
            os.environ.setdefault(key, value)
    import ray
    from ray._private import ray_constants

    if on_this_machine:
        # Ray reads this flag when imported: an import earlier in this process, before the variable was set,
        # would bind a local Ray to the network interface instead of loopback.
        ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true")
    for attempt in (1, 2):
        try:
            if address is None:
                cpus = max(settings.cpus or os.cpu_count() or 1, settings.workers or 1)
                ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
            else:
                ray.init(address=address, logging_level="WARNING")
            break
        except Exception as exc:  # Ray raises a bare Exception when its processes start too slowly
            ray.shutdown()
            if "timed out during startup" not in str(exc):
                raise
            if attempt == 2:
                raise ClusterError(f"Ray did not start on this machine twice in a row ({exc}); it may be too "
                                   "busy: try again later or with fewer --ray-workers") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _failure(ray: Any, exc: BaseException, retries: int) -> tuple[str, BaseException | None]:
    """(why a task failed, in words; the error to stop the whole audit with, or None to go on)."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, PatchslimError):
            return str(cause), cause
        return f"it raised {type(cause).__name__ if cause else 'an error'}", exc
    if isinstance(exc, ray.exceptions.RayActorError):
        return (f"its Ray worker died {retries + 1} time(s) running it ({type(exc).__name__})", None)
    return f"Ray could not run it ({type(exc).__name__}: {exc})", None


def _actor_options(ray: Any, settings: RaySettings) -> tuple[int, dict, str, int]:
    """(actors, their resource options, their device, torch threads each) for the cluster we are on."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus:
        workers = settings.workers or gpus
        if workers > gpus:
            raise ClusterError(f"--ray-workers {workers} asks for more actors than the cluster's {gpus} GPU(s)")
        per = max(1, cpus // workers) if cpus else 1
        return workers, dict(num_gpus=1, num_cpus=1), "cuda", per
    workers = settings.workers or cpus
    if not workers or workers > cpus:
        raise ClusterError(f"--ray-workers {workers} asks for more actors than the cluster's {cpus} CPU(s)")
    return workers, dict(num_cpus=1), "cpu", 1


def run_on_ray(job: AuditJob, settings: RaySettings | None = None, model: ModelRecipe | None = None,
               progress: Callable[[int, int], None] | None = None,
               on_result: Callable[[int], None] | None = None) -> RayRunSummary:
    """Runs every missing shard task of ``job`` on Ray and writes their parts into ``job.out_dir``.

    Args:
        job: the job, built on the driver (its model checks the plans; its folder receives the parts).
        settings: where and how wide (default: a local Ray on every CPU of this machine).
        model: how the workers load the model; default: ``job.model`` itself, sent through the object store.
        progress: ``progress(done, total)`` in forwards of one image, after every shard.
        on_result: called with the shard index once its parts are written.

    Raises:
        ClusterError: the cluster cannot be reached, has too few resources, or its workers cannot load the model
            or load another one.
        DataNotFoundError: a worker cannot read the data.
    """
    settings = settings or RaySettings()
    t0 = time.perf_counter()
    job.claim()
    tasks = job.shard_tasks()
    shards = job.num_shards()
    total = sum((t.stop - t.start) * (1 + len(t.plans)) for t in tasks)
    if progress is not None:
        progress(0, total)
    if not tasks:
        return RayRunSummary(shards, 0, shards, {}, time.perf_counter() - t0, 0.0, [], 0, job.complete())
    with ray_session(settings) as ray:
        count, options, device, threads = _actor_options(ray, settings)
        count = min(count, len(tasks))
        job_args = dict(plans=job.plans, out_dir=job.out_dir, batch_size=job.batch_size, shard_size=job.shard_size,
                        workers=job.workers, seed=job.seed, evidence=job.evidence, share=job.share)
        shared = dict(model=model.absolute() if model is not None else ray.put(job.model),
                      data=ray.put(absolute_paths(job.data)))
        actor_class = ray.remote(max_restarts=-1, max_task_retries=settings.retries, **options)(AuditWorker)
        actors = [actor_class.remote(shared, job_args, device, threads) for _ in range(count)]
        try:
            checks = ray.get([a.check.remote() for a in actors])
        except ray.exceptions.RayTaskError as exc:
            raise _failure(ray, exc, settings.retries)[1] or ClusterError(str(exc)) from None
        expected = weights_digest(job.model)
        for c in checks:
            if c["digest"] != expected:
                raise ClusterError(f"the Ray worker on {c['node']} loaded other weights than this machine for "
                                   f"{job.model.name} (parameters differ): every node must have the same weights "
                                   "file at the same path")
        startup = time.perf_counter() - t0
        workers = [f"{c['node']} pid {c['pid']} ({c['device']})" for c in checks]
        pids = [{c["pid"]} for c in checks]
        failed: dict[int, str] = {}
        done = ran = 0
        pending = iter(tasks)
        running: dict[Any, tuple[ShardTask, int]] = {}

        def submit(k: int) -> None:  # actor k is free: give it the next task, if any
            task = next(pending, None)
            if task is not None:
                running[actors[k].run.remote(task)] = (task, k)

        for k in range(count):
            submit(k)
        try:
            while running:
                [ref], _ = ray.wait(list(running), num_returns=1)
                task, k = running.pop(ref)
                try:
                    result, pid = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    why, fatal = _failure(ray, exc, settings.retries)
                    if fatal is not None:
                        raise fatal from None
                    failed[task.shard] = why
                else:
                    job.write_result(result)
                    pids[k].add(pid)
                    ran += 1
                    if on_result is not None:
                        on_result(task.shard)
                done += (task.stop - task.start) * (1 + len(task.plans))
                if progress is not None:
                    progress(done, total)
                submit(k)
        finally:
            for actor in actors:  # a task still running (an error above) ends with its actor
                ray.kill(actor)
    return RayRunSummary(shards, ran, shards - len(tasks), failed, time.perf_counter() - t0, startup, workers,
                         sum(len(p) - 1 for p in pids), job.complete())
