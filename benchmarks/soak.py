"""Soak test: several people at once in real browsers, against one ``streamlit run app/main.py``.

Starts the app headless on a free localhost port, opens ``--sessions`` Chromium pages (each its own
Streamlit session, all in one browser: Debian's ``/usr/bin/chromium`` through Playwright, never Playwright's
own download) and, for ``--minutes``, lets each do random things: pick a method, move rho with the keyboard,
upload an image (now and then a broken one), pick a gallery image, switch pages.

After every action the page is checked for what a person must never see: an exception box
(``stException``), an uncaught page error, a browser console error; the server's log is scanned for
tracebacks. Refusals of broken uploads (``st.error`` "This file cannot be used", which must appear) and the
Explore page's red "Label flipped" banner are expected and counted apart; so are browser messages about an
image of an earlier rerun that Streamlit freed before the browser fetched it (``/media/...`` 404, Streamlit's
known "MediaFileHandler: Missing file" race under fast clicking) and requests to the internet (offline).

After clicking a page link the driver waits for that page's title; a link not followed within a minute is
recorded with the actions before it (``navigation_not_followed``) and clicked once more, as a person would.
After an upload it waits until the uploader lists the file. An unexpected error message gets 15 s to leave
the page (the rerun an action causes can start a moment after the page looked idle, the message of before
still showing): one that stays is an error, one that goes is counted apart (``alerts_cleared_within_15_s``). The server's resident memory
(``/proc/<pid>/status``) is sampled before the sessions start, during, and at the end.

Usage::

    python benchmarks/soak.py                          # 4 sessions, 5 minutes
    python benchmarks/soak.py --sessions 2 --minutes 0.5

Writes ``benchmarks/results/soak.json``; exits 1 when errors were seen.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.local_server import LocalServer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "soak.json"
CHROMIUM = Path(os.environ.get("PATCHSLIM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHOTOS = REPO.parent / "shared" / "data" / "photos"
PAGES = ("Explore one image", "Compare methods", "Explain", "Benchmark", "Audit")
IMAGE_PAGES = PAGES[:3]
REFUSAL = "This file cannot be used"
FLIP_BANNER = "Label flipped"
STALE_MEDIA = re.compile(r"/media/[0-9a-f]+\.\w+")


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def image_files(folder: Path, seed: int) -> tuple[list[Path], list[Path]]:
    """Good uploads (the shared photos when present, plus generated ones) and a few broken files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    good = sorted(p for p in PHOTOS.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:6]
    for i in range(6):
        w, h = int(rng.integers(48, 800)), int(rng.integers(48, 600))
        array = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(array).resize((w, h), Image.NEAREST)
        path = folder / f"generated_{i}.{'jpg' if i % 2 else 'png'}"
        image.save(path)
        good.append(path)
    bad = []
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 120, 200)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (folder / "not_an_image.png").write_text("hello, I am text\n")
    (folder / "empty.png").write_bytes(b"")
    bad += [folder / "truncated.jpg", folder / "not_an_image.png", folder / "empty.png"]
    return good, bad


class Session:
    """One browser page = one Streamlit session, doing random things and recording what goes wrong."""

    def __init__(self, index: int, page, url: str, rng: random.Random, good: list[Path], bad: list[Path],
                 methods: list[str]) -> None:
        self.index, self.page, self.url, self.rng = index, page, url, rng
        self.good, self.bad, self.methods = good, bad, methods
        self.where = PAGES[0]
        self.actions: dict[str, int] = {}
        self.errors: list[dict] = []
        self.console_errors: list[dict] = []
        self.refusals = 0
        self.history: list[str] = []  # the session's actions, in order
        self.navigation_not_followed: list[dict] = []
        self.alerts_cleared: list[dict] = []  # unexpected messages that went within seconds (see check)
        self.flip_banners = 0
        self.stale_media: list[str] = []
        self.expect_refusal = False  # this action uploaded a broken file
        self.broken_upload_kept = False  # the session's current upload is broken (its refusal stays shown)
        self.offline_requests: list[str] = []
        page.set_default_timeout(120_000)  # a shared 2-core machine can take a while per rerun
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(dict(session=index, kind="page error",
                                                                 text=str(exc)[:300], where=self.where)))

    def _console(self, msg) -> None:
        if msg.type != "error":
            return
        url = (msg.location or {}).get("url", "")
        if "ERR_NAME_NOT_RESOLVED" in msg.text or "ERR_INTERNET_DISCONNECTED" in msg.text:
            # the page asked for something on the internet (this machine is offline): not an app error
            self.offline_requests.append(url or msg.text[:200])
            return
        if STALE_MEDIA.search(url) or STALE_MEDIA.search(msg.text):
            # an image of an earlier rerun, replaced (and freed by Streamlit's media manager) before the browser
            # fetched it: Streamlit's known "MediaFileHandler: Missing file" race under fast interactions
            self.stale_media.append(msg.text[:200])
            return
        self.console_errors.append(dict(session=self.index, text=msg.text[:300], url=url, where=self.where))

    async def wait_idle(self, timeout: float = 120.0) -> None:
        """Until the rerun finished: no running icon and no stale (greyed) element, twice in a row."""
        await asyncio.sleep(0.6)
        deadline = time.time() + timeout
        busy = self.page.locator('[data-testid="stStatusWidgetRunningIcon"], [data-stale="true"]')
        quiet = 0
        while time.time() < deadline:
            try:
                quiet = quiet + 1 if await busy.count() == 0 else 0
            except Exception:  # elements are replaced while the page reruns
                quiet = 0
            if quiet >= 2:
                return
            await asyncio.sleep(0.3)
        self.errors.append(dict(session=self.index, kind="timeout", text=f"still running after {timeout} s",
                                where=self.where))

    async def check(self, action: str) -> None:
        """Exception boxes and unexpected error alerts on the page after an action."""
        page = self.page
        for box in await page.locator('[data-testid="stException"]').all():
            self.errors.append(dict(session=self.index, kind="exception shown", action=action, where=self.where,
                                    text=(await box.inner_text())[:300]))
        for alert in await page.locator('[data-testid="stAlertContentError"]').all():
            try:
                text = (await alert.inner_text(timeout=5_000))[:300]
            except Exception:  # replaced by a rerun meanwhile
                continue
            if REFUSAL in text and self.broken_upload_kept:
                continue  # a broken upload's refusal stays shown until the next upload
            if text.startswith(FLIP_BANNER):
                self.flip_banners += 1  # the Explore page shows a changed prediction in red, by design
                continue
            went = await self.goes_away(text)
            if went is not None:
                self.alerts_cleared.append(dict(session=self.index, action=action, text=text[:120], seconds=went))
                continue
            uploader = await page.locator('[data-testid="stFileChipName"]').all_inner_texts()
            caption = await page.locator('[data-testid="stCaptionContainer"]', has_text="uploaded earlier").all_inner_texts()
            self.errors.append(dict(session=self.index, kind="error alert", action=action, where=self.where,
                                    text=text, uploader_shows=[u[:80] for u in uploader],
                                    caption=[c[:120] for c in caption], before=self.history[-4:]))
            if os.environ.get("SOAK_SCREENSHOTS"):
                await page.screenshot(path=f"{os.environ['SOAK_SCREENSHOTS']}/s{self.index}_alert_"
                                           f"{len(self.errors)}.png")

    async def goes_away(self, text: str, within: float = 15.0) -> float | None:
        """Seconds until an error message leaves the page, or None if it stays ``within`` seconds.

        The rerun an action causes may start a moment after the page looked idle (a busy server); the
        message of the page of before is then still shown. One that stays is what a person would see."""
        started = time.time()
        while time.time() - started < within:
            await asyncio.sleep(1.0)
            await self.wait_idle(30)
            if not await self.page.locator('[data-testid="stAlertContentError"]', has_text=text[:60]).count():
                return round(time.time() - started, 1)
        return None

    async def shown_page(self) -> str | None:
        """The page the browser shows (its title), or None when no title is there right now."""
        try:
            title = await self.page.locator('[data-testid="stMain"] h1').first.inner_text(timeout=5_000)
        except Exception:  # between reruns there may be no title for a moment
            return None
        return title.strip() if title.strip() in PAGES else None

    async def wait_for_file_chip(self, name: str, timeout: float = 120.0) -> None:
        """Until the uploader lists ``name`` (it shortens long names in the middle: "skimage...ronaut.png")."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for text in await self.page.locator('[data-testid="stFileChipName"]').all_inner_texts():
                head, _, tail = text.strip().partition("...")
                if text.strip() == name or (tail and name.startswith(head) and name.endswith(tail)):
                    return
            await asyncio.sleep(0.3)
        raise TimeoutError(f"the uploader did not list {name} within {timeout:.0f} s")

    async def follow_link(self, target: str) -> None:
        """Clicks the page link of ``target`` and waits for its title. A link that was not followed within a
        minute is recorded (with the actions before it) and clicked once more, as a person would."""
        page = self.page
        title = page.locator('[data-testid="stMain"] h1', has_text=target)
        for attempt in (1, 2):
            await page.locator('[data-testid="stSidebarNav"] a', has_text=target).first.click()
            try:
                await title.first.wait_for(timeout=60_000)
                if attempt == 2:
                    self.navigation_not_followed[-1]["second_click"] = "followed"
                return
            except Exception:  # the title did not come: say which page is shown instead
                shown = await self.shown_page()
                if attempt == 1:
                    self.navigation_not_followed.append(dict(session=self.index, wanted=target, shown=shown,
                                                             before=self.history[-3:]))
                    if os.environ.get("SOAK_SCREENSHOTS"):
                        await page.screenshot(path=f"{os.environ['SOAK_SCREENSHOTS']}/s{self.index}_nav_"
                                                   f"{len(self.navigation_not_followed)}.png")
                else:
                    self.navigation_not_followed[-1]["second_click"] = f"not followed either (shown: {shown})"
                    if shown is not None:
                        self.where = shown
                    raise RuntimeError(f"the link to {target} was not followed twice; {shown} is shown")

    async def act(self) -> str:
        kind = self.rng.choices(["method", "rho", "upload", "bad upload", "gallery", "page"],
                                [3, 4, 2, 0.5, 1.5, 1])[0]
        if kind in ("upload", "bad upload", "gallery") and self.where not in IMAGE_PAGES:
            kind = "page"
        page = self.page
        self.expect_refusal = False
        self.current = kind
        if kind == "method":
            method = self.rng.choice(self.methods)
            box = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]', has_text="Method")
            await box.locator("input").click()
            await page.keyboard.type(method)
            await page.keyboard.press("Enter")
            did = f"method {method}"
        elif kind == "rho":
            thumb = page.locator('[data-testid="stSidebar"] [data-testid="stSlider"]', has_text="Keep ratio").locator(
                'input[type="range"], [role="slider"]').first
            await thumb.focus()
            key = self.rng.choice(["ArrowLeft", "ArrowRight"])
            steps = self.rng.randint(1, 5)
            for _ in range(steps):
                await page.keyboard.press(key)
            did = f"rho {key} x{steps}"
        elif kind in ("upload", "bad upload"):
            await page.locator('[data-testid="stMain"] [data-testid="stRadio"]').get_by_text(
                "Upload", exact=True).first.click()
            await self.wait_idle()
            path = self.rng.choice(self.bad if kind == "bad upload" else self.good)
            await page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(str(path))
            # the file goes to the server first, then a rerun starts: wait until the uploader lists it, so
            # that the check after the rerun does not look at the page of before the upload
            await self.wait_for_file_chip(path.name)
            self.expect_refusal = self.broken_upload_kept = kind == "bad upload"
            did = f"{kind} {path.name}"
            if self.expect_refusal:
                try:
                    await page.locator('[data-testid="stAlertContentError"]', has_text=REFUSAL).first.wait_for(
                        timeout=120_000)
                    self.refusals += 1
                except Exception:
                    self.errors.append(dict(session=self.index, kind="refusal not shown", action=did,
                                            where=self.where, text=f"no '{REFUSAL}' message for {path.name}"))
        elif kind == "gallery":
            await page.locator('[data-testid="stMain"] [data-testid="stRadio"]').get_by_text(
                "Gallery", exact=True).first.click()
            await self.wait_idle()
            box = page.locator('[data-testid="stMain"] [data-testid="stSelectbox"]', has_text="Gallery image")
            if await box.count():
                await box.locator("input").first.click()
                for _ in range(self.rng.randint(1, 4)):
                    await page.keyboard.press("ArrowDown")
                await page.keyboard.press("Enter")
            did = "gallery"
        else:
            target = self.rng.choice([p for p in PAGES if p != self.where])
            await self.follow_link(target)
            self.where = target
            did = f"page {target}"
        self.actions[did.split()[0]] = self.actions.get(did.split()[0], 0) + 1
        self.history.append(f"{did} (on {self.where})")
        return did

    async def open(self) -> None:
        await self.page.goto(self.url)
        await self.page.locator('[data-testid="stSidebar"]').wait_for(timeout=240_000)
        await self.wait_idle(240)

    async def run(self, deadline: float) -> None:
        try:
            await self.open()
        except Exception as exc:  # the first screen did not come (an overloaded machine): note it, go on
            self.errors.append(dict(session=self.index, kind="driver", action="open", where=self.where,
                                    text=f"{type(exc).__name__}: {str(exc).splitlines()[0][:250]}"))
        while time.time() < deadline:
            did = "?"
            self.current = "?"
            try:
                did = await self.act()
                await self.wait_idle()
                await self.check(did)
            except Exception as exc:  # a locator that did not appear: the page is not in the state expected
                lines = str(exc).splitlines()
                why = [line.strip() for line in lines if "intercepts pointer events" in line or "not visible" in line
                       or "not enabled" in line][-1:]  # what Playwright saw in the way, when it says
                self.errors.append(dict(session=self.index, kind="driver", action=self.current, where=self.where,
                                        text=f"{type(exc).__name__}: {(lines or [''])[0][:250]}"
                                             + (f" | {why[0][:250]}" if why else "")))
                if os.environ.get("SOAK_SCREENSHOTS"):
                    await self.page.screenshot(path=f"{os.environ['SOAK_SCREENSHOTS']}/s{self.index}_"
                                                    f"{len(self.errors)}.png")
                await asyncio.sleep(1)


async def soak(url: str, server_pid: int, sessions: int, minutes: float, seed: int, folder: Path) -> dict:
    from playwright.async_api import async_playwright

    import patchslim

    methods = [m for m in patchslim.method_names()]
    good, bad = image_files(folder, seed)
    samples = [(0.0, rss_mb(server_pid))]
    began = time.time()
    deadline = began + minutes * 60
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pages = []
        for i in range(sessions):
            context = await browser.new_context(viewport={"width": 1500, "height": 1100})
            pages.append(await context.new_page())
        runners = [Session(i, pages[i], url, random.Random(seed * 100 + i), good, bad, methods)
                   for i in range(sessions)]

        async def sample() -> None:
            while time.time() < deadline:
                await asyncio.sleep(10)
                samples.append((time.time() - began, rss_mb(server_pid)))

        await asyncio.gather(sample(), *(r.run(deadline) for r in runners))
        await browser.close()
    samples.append((time.time() - began, rss_mb(server_pid)))
    return dict(runners=runners, samples=samples, seconds=time.time() - began, uploads=len(good), broken=len(bad))


def server_log_errors(log_path: Path) -> list[str]:
    """Tracebacks and errors in the server's log (Streamlit prints exceptions of script runs there)."""
    text = log_path.read_text(errors="replace")
    found = []
    for match in re.finditer(r"(Traceback \(most recent call last\):.*?\n(?=\S))|(^.*\b(ERROR|CRITICAL)\b.*$)",
                             text, re.S | re.M):
        found.append(match.group(0).strip()[-400:])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"no Chromium at {CHROMIUM}", file=sys.stderr)
        return 2
    from patchslim import bundled

    with tempfile.TemporaryDirectory(prefix="patchslim_soak_") as tmp:
        folder = Path(tmp)
        log_path = folder / "streamlit.log"
        server = LocalServer(log_path)
        with server as url:
            idle_rss = rss_mb(server.pid)
            outcome = asyncio.run(soak(url, server.pid, args.sessions, args.minutes, args.seed, folder))
            end_rss = rss_mb(server.pid)
            alive = server.alive()
            log_errors = server_log_errors(log_path)
    runners = outcome["runners"]
    everything = [e for r in runners for e in r.errors]
    # what a person would see (exception boxes, page errors, unexpected error alerts) vs the driver not finding
    # an element in time (a slow rerun on a loaded machine): reported apart
    errors = [e for e in everything if e["kind"] not in ("driver", "timeout")]
    slow = [e for e in everything if e["kind"] in ("driver", "timeout")]
    console = [e for r in runners for e in r.console_errors]
    samples = outcome["samples"]
    first_active = samples[1][1] if len(samples) > 1 else samples[0][1]
    actions: dict[str, int] = {}
    for r in runners:
        for k, v in r.actions.items():
            actions[k] = actions.get(k, 0) + v
    result = dict(
        sessions=args.sessions,
        minutes=args.minutes,
        seconds=round(outcome["seconds"], 1),
        model_weights="bundled checkpoint" if bundled.CHECKPOINT_PATH.exists() else "random init (no checkpoint)",
        actions_total=sum(actions.values()),
        actions_by_kind=actions,
        actions_per_session=[sum(r.actions.values()) for r in runners],
        expected_refusals_of_broken_uploads=sum(r.refusals for r in runners),
        errors_on_pages=errors,
        driver_timeouts=slow,
        console_errors=console,
        label_flip_banners_seen=sum(r.flip_banners for r in runners),
        stale_media_messages=sum(len(r.stale_media) for r in runners),
        navigation_not_followed=[e for r in runners for e in r.navigation_not_followed],
        alerts_cleared_within_15_s=[e for r in runners for e in r.alerts_cleared],
        offline_requests_ignored=sorted({u for r in runners for u in r.offline_requests}),
        server_log_errors=log_errors,
        server_alive_at_end=alive,
        server_rss_mb=dict(before_sessions=round(idle_rss, 1), first_sample=round(first_active, 1),
                           end=round(end_rss, 1), peak=round(max(r for _, r in samples), 1)),
        rss_samples=[dict(t=round(t, 1), rss_mb=round(r, 1)) for t, r in samples],
        distinct_uploads=outcome["uploads"], broken_files=outcome["broken"],
        python=platform.python_version(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        command=" ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    bad = len(errors) + len(console) + len(log_errors) + (0 if alive else 1)
    print(f"{args.sessions} sessions x {outcome['seconds']:.0f} s: {result['actions_total']} actions "
          f"{actions}; {len(errors)} page errors, {len(slow)} driver timeouts, {len(console)} console errors, {len(log_errors)} server log "
          f"errors; {result['expected_refusals_of_broken_uploads']} broken uploads refused as expected; server "
          f"RSS {idle_rss:.0f} MB before, {end_rss:.0f} MB after (peak {result['server_rss_mb']['peak']:.0f}); "
          f"{len(result['navigation_not_followed'])} page links not followed, "
          f"{len(result['alerts_cleared_within_15_s'])} stale messages cleared by the next rerun; wrote {args.out}")
    for e in (errors + console + slow)[:10]:
        print("  ", e)
    for e in log_errors[:5]:
        print("   server:", e.splitlines()[-1])
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
