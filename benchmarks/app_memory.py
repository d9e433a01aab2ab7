"""Does the app's memory stay bounded? 500 interactions in ``streamlit.testing.v1.AppTest``, RSS throughout.

A person (or a classroom of them, one after another) moves the method and rho, uploads new images, picks
gallery images and switches pages. AppTest runs the app's script in this process, with the same caches a
server has (``st.cache_resource`` / ``st.cache_data`` are process-wide), so the process's resident memory
(RSS, from ``/proc/self/status``) is the server's. Every ``--session-every`` interactions the session is
replaced by a new one (a new visitor), so session state must be released too.

Reported: RSS at the start (patchslim and streamlit imported, nothing run), at the first screen (model
loaded, first page drawn), after the warm-up (every page and method seen once, then random interactions
until a fifth of the run, caches filling), and at the end; the growth after warm-up and its slope (MB per
100 interactions, a least-squares fit). Targets: growth from the first screen < 200 MB, and flat after
warm-up (caches are bounded, so once they are full memory stops growing). The step from start to first
screen is the libraries the pages import (torch kernels, plotly, pandas, captum) and the model: paid once.

Usage::

    python benchmarks/app_memory.py                      # 500 interactions on the bundled model
    python benchmarks/app_memory.py --interactions 20    # a smoke run

Writes ``benchmarks/results/app_memory.json``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "app_memory.json"
PAGES = ("app_pages/explore.py", "app_pages/compare.py", "app_pages/explain.py", "app_pages/benchmark.py",
         "app_pages/audit.py")
RATIOS = [round(0.05 * i, 2) for i in range(1, 21)]


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def upload_pool(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` distinct small photos-like images (JPEG and PNG, various sizes): more than every cache holds."""
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(count):
        w, h = int(rng.integers(64, 640)), int(rng.integers(64, 480))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 255, 3)
        array = np.stack([(base[c] + xx * (c + 1) + yy * (3 - c) + rng.integers(0, 40, (h, w))) % 256
                          for c in range(3)], -1).astype(np.uint8)
        buffer = io.BytesIO()
        fmt = "JPEG" if i % 2 else "PNG"
        Image.fromarray(array).save(buffer, fmt)
        pool.append((f"upload_{i}.{fmt.lower().replace('jpeg', 'jpg')}", buffer.getvalue()))
    return pool


class Driver:
    """One visitor's session in AppTest, with the random interactions the benchmark draws."""

    def __init__(self, model: str, rng: random.Random, uploads: list[tuple[str, bytes]], timeout: float) -> None:
        from streamlit.testing.v1 import AppTest

        self.rng, self.uploads = rng, uploads
        self.at = AppTest.from_file(str(REPO / "app" / "main.py"), default_timeout=timeout).run()
        self.at.selectbox(key="model_name").set_value(model).run()
        self.page = PAGES[0]
        self.methods = list(self.at.selectbox(key="method").options)

    def errors(self) -> list[str]:
        return [e.value for e in self.at.exception]

    def step(self, kind: str | None = None, value=None) -> str:
        """One interaction (a rerun of the script); ``kind``/``value`` force it, else it is drawn at random.

        Returns:
            What it did, e.g. ``"rho 0.35"``.
        """
        at, rng = self.at, self.rng
        kind = kind or rng.choices(["method", "rho", "upload", "gallery", "page"], [3, 4, 2, 2, 1])[0]
        if kind in ("upload", "gallery") and self.page not in PAGES[:3]:
            kind = "page"  # only explore, compare and explain pick an image
        if kind == "method":
            method = value or rng.choice(self.methods)
            at.selectbox(key="method").set_value(method).run()
            return f"method {method}"
        if kind == "rho":
            ratio = rng.choice(RATIOS)
            at.slider(key="keep_ratio").set_value(ratio).run()
            return f"rho {ratio}"
        if kind == "upload":
            if at.radio(key="image_source").value != "Upload":
                at.radio(key="image_source").set_value("Upload").run()
            name, data = rng.choice(self.uploads)
            at.file_uploader(key="uploader").upload(name, data, "image/png").run()
            return f"upload {name}"
        if kind == "gallery":
            if at.radio(key="image_source").value != "Gallery":
                at.radio(key="image_source").set_value("Gallery").run()
            picker = [s for s in at.selectbox if s.key and s.key.startswith("gallery_pick")]
            if picker:
                choice = rng.choice(list(range(len(picker[0].options))))
                picker[0].set_value(choice).run()
            return "gallery"
        page = value or rng.choice([p for p in PAGES if p != self.page])
        at.switch_page(page).run()
        self.page = page
        return f"page {page}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=None, help="interactions counted as warm-up "
                        "(default: a fifth of them)")
    parser.add_argument("--session-every", type=int, default=100, help="start a new session every N interactions")
    parser.add_argument("--model", default="fashion-vit")
    parser.add_argument("--uploads", type=int, default=40, help="distinct images uploaded (caches hold fewer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import patchslim  # noqa: F401  (imports counted in the start figure)
    import streamlit  # noqa: F401
    from patchslim import bundled

    rng = random.Random(args.seed)
    uploads = upload_pool(args.uploads, args.seed)
    gc.collect()
    start_rss = rss_mb()
    began = time.time()
    driver = Driver(args.model, rng, uploads, args.timeout)
    gc.collect()
    first_screen_rss = rss_mb()  # model loaded, first page drawn
    samples: list[tuple[int, float]] = [(0, first_screen_rss)]
    errors: list[dict] = []
    kinds: dict[str, int] = {}
    sessions = 1
    # The warm-up starts with every page and every method once (code paths, libraries, first caches).
    scripted = [("page", page) for page in PAGES[1:]] + [("page", PAGES[0])] + \
        [("method", method) for method in driver.methods]
    warmup = args.warmup if args.warmup is not None else max(len(scripted), args.interactions // 5)
    for i in range(1, args.interactions + 1):
        if i % args.session_every == 0:
            driver = Driver(args.model, rng, uploads, args.timeout)  # the old session is dropped
            sessions += 1
        try:
            did = driver.step(*scripted.pop(0)) if scripted else driver.step()
        except RuntimeError as exc:  # AppTest's rerun timeout on an overloaded machine: note it, go on
            errors.append(dict(interaction=i, action="?", error=f"timeout: {str(exc)[:200]}"))
            driver = Driver(args.model, rng, uploads, args.timeout)
            sessions += 1
            continue
        kind = did.split()[0]
        kinds[kind] = kinds.get(kind, 0) + 1
        for message in driver.errors():
            errors.append(dict(interaction=i, action=did, error=message[:300]))
        if i % 10 == 0 or i == warmup or i == args.interactions:
            gc.collect()
            samples.append((i, rss_mb()))
            print(f"{i:4d} interactions  RSS {samples[-1][1]:7.1f} MB  ({did})", flush=True)
    end_rss = rss_mb()
    warm_rss = dict(samples)[warmup] if warmup in dict(samples) else samples[1][1]
    after = [(i, r) for i, r in samples if i >= warmup]
    slope = float(np.polyfit([i for i, _ in after], [r for _, r in after], 1)[0] * 100) if len(after) > 2 else None
    peak = max(r for _, r in samples)
    result = dict(
        model=args.model,
        weights="bundled checkpoint" if (args.model == bundled.BUNDLED_NAME and bundled.CHECKPOINT_PATH.exists())
        else "random init" if args.model == bundled.BUNDLED_NAME else "see app",
        interactions=args.interactions,
        warmup_interactions=warmup,
        sessions=sessions,
        distinct_uploads=len(uploads),
        interactions_by_kind=kinds,
        rss_mb=dict(start=round(start_rss, 1), first_screen=round(first_screen_rss, 1),
                    after_warmup=round(warm_rss, 1), end=round(end_rss, 1), peak=round(peak, 1)),
        growth_mb=round(end_rss - start_rss, 1),
        growth_after_warmup_mb=round(end_rss - warm_rss, 1),
        slope_after_warmup_mb_per_100=None if slope is None else round(slope, 2),
        target=dict(growth_mb_below=200, flat_after_warmup=True),
        growth_from_first_screen_mb=round(end_rss - first_screen_rss, 1),
        meets_target=bool(end_rss - first_screen_rss < 200 and end_rss - warm_rss < 200),
        errors=errors,
        samples=[dict(interaction=i, rss_mb=round(r, 1)) for i, r in samples],
        seconds=round(time.time() - began, 1),
        python=platform.python_version(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        command=" ".join(["python", "benchmarks/app_memory.py", *sys.argv[1:]]),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"RSS start {start_rss:.0f} MB, first screen {first_screen_rss:.0f} MB, after warm-up ({warmup}) "
          f"{warm_rss:.0f} MB, end {end_rss:.0f} MB "
          f"(growth {end_rss - start_rss:+.0f} MB; after warm-up {end_rss - warm_rss:+.0f} MB, slope "
          f"{slope if slope is not None else float('nan'):+.1f} MB/100); {len(errors)} errors; wrote {args.out}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
