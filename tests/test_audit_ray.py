"""Audits on Ray: the same tables as the local and torchrun runners, and the faults Ray must absorb.

One local Ray for the module, on loopback only (started here, stopped at the end); every audit is small (the
bundled architecture with random weights, 24-48 tiny PNGs). The faults are real: a worker process killed
from outside in the middle of a task, a driver killed with SIGKILL, a shard whose worker dies every time,
workers that cannot see the data folder, an address where nothing listens.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchslim.audit.ray_runner import LOCAL_RAY_ENV, ModelRecipe, RaySettings, probe_address, run_on_ray
from patchslim.audit.report import build_report, disparity_csv, groups_csv, skipped_csv
from patchslim.audit.runner import AuditJob, audit_plans
from patchslim.data import FileReader, load_labelled
from patchslim.errors import ClusterError, DataNotFoundError
from patchslim.evaluate import parse_variants

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ModelRecipe("fashion-vit", pretrained=False)
GROUPINGS = ["group", "brightness"]

pytestmark = pytest.mark.usefixtures("one_thread")  # the same threads as each Ray worker: identical sums


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 CPUs on loopback; yields its address (127.0.0.1:PORT)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # loopback, even if ray was imported before the variable was set
    for attempt in range(3):  # Ray gives its processes 30 s to start: a loaded machine may need another try
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                     object_store_memory=256 * 1024**2)
            break
        except Exception as exc:
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, fashion_sample) -> Path:
    """48 canvas PNGs in ROOT/<group>/<class>/<image>: groups 'dim' and 'lit', six classes."""
    images, labels = fashion_sample
    names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    root = tmp_path_factory.mktemp("photos")
    picked = [i for i in range(len(labels)) if labels[i] in (0, 1, 3, 5, 7, 8)][:48]
    for k, i in enumerate(picked):
        folder = root / ("dim" if k % 2 else "lit") / names[labels[i]].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        scale = 0.6 if k % 2 else 1.0
        Image.fromarray((images[i] * scale).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def _job(model, data, out: Path, shard_size: int = 8) -> AuditJob:
    return AuditJob(model, data, audit_plans(parse_variants("random,evit"), [0.5]), out, batch_size=4,
                    shard_size=shard_size)


def _tables(job: AuditJob, failed=None) -> tuple[str, str, str]:
    report = build_report(job, GROUPINGS, n_boot=100, failed=failed)
    return groups_csv(report), disparity_csv(report), skipped_csv(report)


def _parts(job: AuditJob) -> dict[str, dict[str, np.ndarray]]:
    """Every part file's arrays but the timings."""
    out = {}
    for path in sorted(job.parts_dir.glob("*.npz")):
        with np.load(path) as part:
            out[path.name] = {k: part[k] for k in part.files if "seconds" not in k}
    return out


def _same_parts(a: AuditJob, b: AuditJob) -> None:
    pa, pb = _parts(a), _parts(b)
    assert pa.keys() == pb.keys() and len(pa) == a.num_shards() * 3
    for name in pa:
        for key in pa[name]:
            np.testing.assert_array_equal(pa[name][key], pb[name][key], err_msg=f"{name}: {key}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, **kwargs) -> list[str]:
    return [sys.executable, "-m", "patchslim", "audit", "--no-pretrained", "--device", "cpu", "--methods",
            "random,evit", "--keep", "0.5", "--batch-size", "4", "--workers", "0", "--bootstrap", "100",
            "--no-progress", "--groups", ",".join(GROUPINGS), *args]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------- the same answer everywhere

def test_local_torchrun_and_ray_give_identical_tables(ray_cluster, fashion_random, photos, tmp_path):
    data = load_labelled(photos, fashion_random)
    local = _job(fashion_random, data, tmp_path / "local")
    local.run()
    on_ray = _job(fashion_random, data, tmp_path / "ray")
    summary = run_on_ray(on_ray, RaySettings(workers=2), RECIPE)
    assert (summary.ran, summary.failed, summary.complete, len(summary.workers)) == (6, {}, True, 2)
    # torchrun: two ranks on this machine's loopback, each taking every other shard of the same --out.
    out = tmp_path / "torchrun"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr",
                          "127.0.0.1", "--nproc-per-node", "2", "-m", "patchslim", "audit", *_cli(
                              "--data", str(photos), "--out", str(out), "--shard-size", "8", "--part", "env")[4:]],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    torchrun = _job(fashion_random, data, out)
    assert torchrun.complete()
    expected = _tables(local)
    assert _tables(on_ray) == expected
    assert _tables(torchrun) == expected
    _same_parts(local, on_ray)
    _same_parts(local, torchrun)


def test_an_in_memory_model_reaches_the_workers_through_the_object_store(ray_cluster, fashion_random, photos,
                                                                         tmp_path):
    data = load_labelled(photos, fashion_random).subset(16)
    local = _job(fashion_random, data, tmp_path / "local")
    local.run()
    on_ray = _job(fashion_random, data, tmp_path / "ray")
    summary = run_on_ray(on_ray, RaySettings(workers=1))  # no recipe: the driver's model object itself
    assert summary.complete and summary.ran == 2
    assert _tables(on_ray) == _tables(local)
    # A worker that loads other weights than the driver's is refused before any work.
    other = _job(fashion_random, data, tmp_path / "other")
    with pytest.raises(ClusterError, match="other weights"):
        run_on_ray(other, RaySettings(workers=1), ModelRecipe("fashion-vit", pretrained=False, seed=1))
    assert not list(other.parts_dir.glob("*.npz"))


# --------------------------------------------------------------------------- faults

class _StallOnce(FileReader):
    """Reads files, but the first time position ``at`` is read it writes its process id to ``marker`` and waits
    (to be killed from outside)."""

    def __init__(self, paths, at: int, marker: str):
        super().__init__(paths)
        self.at, self.marker = at, marker

    def __call__(self, position: int):
        if position == self.at and not os.path.exists(self.marker):
            with open(self.marker, "x") as f:
                f.write(str(os.getpid()))
            time.sleep(300)
        return super().__call__(position)


class _DieAt(FileReader):
    """Reads files, but the process dies whenever position ``at`` is read."""

    def __init__(self, paths, at: int):
        super().__init__(paths)
        self.at = at

    def __call__(self, position: int):
        if position == self.at:
            os._exit(1)
        return super().__call__(position)


def _by_value():
    """Ray workers cannot import this test module: send its reader classes by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_worker_killed_mid_audit_is_replaced_and_every_shard_counts_once(ray_cluster, fashion_random, photos,
                                                                           tmp_path):
    _by_value()
    data = load_labelled(photos, fashion_random)
    local = _job(fashion_random, data, tmp_path / "local")
    local.run()
    marker = tmp_path / "stalled.pid"
    stalled = replace(data, reader=_StallOnce(data.reader.paths, 20, str(marker)))
    killed = []

    def kill_when_stalled() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text():
                pid = int(marker.read_text())
                os.kill(pid, signal.SIGKILL)  # the Ray worker process running shard 2, mid-task
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_stalled, daemon=True)
    killer.start()
    job = _job(fashion_random, stalled, tmp_path / "ray")
    summary = run_on_ray(job, RaySettings(workers=2, retries=2), RECIPE)
    killer.join(5)
    assert killed, "the stalled worker was never seen"
    assert (summary.failed, summary.complete, summary.ran) == ({}, True, 6)
    assert summary.restarts == 1  # a new process took the killed one's place and finished shard 2
    assert _tables(job) == _tables(local)  # every (plan, shard) counted once: the same tables
    _same_parts(local, job)


def test_a_shard_whose_worker_dies_every_time_is_reported_and_the_rest_finish(ray_cluster, fashion_random, photos,
                                                                              tmp_path):
    _by_value()
    data = load_labelled(photos, fashion_random).subset(24)
    poisoned = replace(data, reader=_DieAt(data.reader.paths, int(data.positions[13])))
    job = _job(fashion_random, poisoned, tmp_path / "out")
    summary = run_on_ray(job, RaySettings(workers=2, retries=1), RECIPE)
    assert list(summary.failed) == [1] and "died 2 time(s)" in summary.failed[1]
    assert summary.ran == 2 and not summary.complete
    report = build_report(job, GROUPINGS, n_boot=100, failed=summary.failed)
    assert report.audited == 16
    missing = [s for s in report.skipped if s.kind == "shard"]
    assert [(s.item, s.count) for s in missing] == [("shard 1 (items 8-15)", 8)]
    assert "died 2 time(s)" in missing[0].reason and "run the same command again" in missing[0].reason
    # Once the cause is gone, the same job retries only the missing shard and completes.
    healed = _job(fashion_random, data, tmp_path / "out")
    again = run_on_ray(healed, RaySettings(workers=1), RECIPE)
    assert (again.ran, again.reused, again.complete) == (1, 2, True)
    local = _job(fashion_random, data, tmp_path / "local")
    local.run()
    assert _tables(healed) == _tables(local)


def test_workers_that_cannot_see_the_data_stop_the_audit_with_a_clear_message(ray_cluster, fashion_random, photos,
                                                                              tmp_path):
    copy = tmp_path / "photos"
    shutil.copytree(photos, copy)
    data = load_labelled(copy, fashion_random).subset(16)  # the driver sees the folder...
    copy.rename(tmp_path / "elsewhere")  # ...the workers, started now, do not
    job = _job(fashion_random, data, tmp_path / "out")
    with pytest.raises(DataNotFoundError) as info:
        run_on_ray(job, RaySettings(workers=1), RECIPE)
    message = str(info.value)
    assert "cannot read the data" in message and "16 of 16 sampled image files are not there" in message
    assert str(copy) in message and "same path" in message
    assert not list(job.parts_dir.glob("*.npz"))


def test_an_unreachable_address_fails_within_seconds_with_what_to_do(tmp_path, photos):
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ClusterError) as info:
        probe_address(f"127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - start < 5
    assert f"127.0.0.1:{port}" in str(info.value) and "ray start --head" in str(info.value)
    with pytest.raises(ClusterError, match="HOST:PORT"):
        probe_address("no-port-here")
    # The CLI: one error line, exit 2, before any Ray starts.
    start = time.monotonic()
    run = subprocess.run(_cli("--data", str(photos), "--out", str(tmp_path / "out"), "--engine", "ray",
                              "--ray-address", f"ray://127.0.0.1:{port}"),
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and f"cannot reach a Ray cluster at ray://127.0.0.1:{port}" in run.stderr
    assert not (tmp_path / "out" / "parts").exists() or not list((tmp_path / "out" / "parts").glob("*.npz"))


@pytest.mark.slow
def test_a_killed_driver_resumes_from_the_part_files(ray_cluster, fashion_random, photos, tmp_path):
    out = tmp_path / "out"
    command = _cli("--data", str(photos), "--out", str(out), "--limit", "24", "--shard-size", "2", "--engine",
                   "ray", "--ray-address", ray_cluster, "--ray-workers", "1")
    driver = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if list((out / "parts").glob("baseline__*.npz")):  # a shard's last part: one shard is complete
            break
        time.sleep(0.02)
    assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    driver.send_signal(signal.SIGKILL)  # the driver dies mid-audit; its actors go with it
    driver.wait(30)
    driver.stderr.close()
    done_before = len(list((out / "parts").glob("baseline__*.npz")))
    assert 1 <= done_before < 12
    rerun = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reused = int(rerun.stdout.split("resumed: ")[1].split(" of 12")[0])
    assert reused == done_before  # every shard finished before the kill, none of the others
    data = load_labelled(photos, fashion_random).subset(24)
    local = _job(fashion_random, data, tmp_path / "local", shard_size=2)
    local.run()
    resumed = _job(fashion_random, data, out, shard_size=2)
    assert _tables(resumed) == _tables(local)


# --------------------------------------------------------------------------- the scale benchmark (correctness)

def test_the_ray_scale_benchmark_compares_both_runners_on_the_same_job(ray_cluster, tmp_path):
    from patchslim.benchmarks import BENCHMARKS, TIMED
    from patchslim.benchmarks.ray_scale import RayScaleConfig, run_ray_scale

    assert "ray_scale" in BENCHMARKS and "ray_scale" in TIMED  # rerun on an idle machine only
    config = RayScaleConfig(pretrained=False, data="bundled", methods=("random", "tome"), keep_ratios=(0.5,),
                            limit=24, batch_size=8, shard_size=8, cores=2, work=tmp_path / "work")
    ticks = []
    result = run_ray_scale(config, ticks.append)
    assert [t.split(":")[0] for t in ticks] == ["local 1", "ray 1"]
    local, ray = result.rows
    assert (local["runner"], ray["runner"]) == ("local", "ray")
    assert (ray["workers"], ray["threads_each"], local["threads_each"]) == (2, 1, 2)  # equal cores
    assert local["images"] == ray["images"] == 24 and ray["shards"] == 3
    assert ray["identical"] is True  # both runners wrote the same predictions (probabilities within 1e-6)
    files = result.write(tmp_path / "results", "python -m patchslim benchmark --which ray_scale")
    text = files["md"].read_text()
    assert "Command: `python -m patchslim benchmark --which ray_scale`" in text
    assert "the target is at most +15 %" in text and str(tmp_path) not in text
