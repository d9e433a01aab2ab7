"""Many users at once: one shared model, many threads, every result as if it had run alone.

The app serves every session from one cached model, each Streamlit session on its own thread. The engine
never mutates the model (the plan travels with the call), so 8 threads x 25 runs with different methods,
keep ratios, options and multi-stage plans must give each run exactly what the same run gives alone. The
session memory of long results is a bounded LRU, tested here too.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import patchslim
from patchslim import SlimPlan, Stage, bundled

THREADS = 8
RUNS_PER_THREAD = 25
RATIOS = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


def _methods() -> list[str]:
    """Every registered method; ``rl`` only when a trained policy for the bundled model exists."""
    from patchslim.policy import default_policy_path

    names = list(patchslim.method_names())
    if "rl" in names and not default_policy_path(bundled.BUNDLED_NAME).exists():
        names.remove("rl")
    return names


def _plans() -> list[SlimPlan]:
    """Single-stage plans of every method across keep ratios and options, plus multi-stage hybrids."""
    rng = random.Random(8)
    extra_options = {
        "uniform": [{"indexing": "survey"}, {"indexing": "zero"}],
        "grid": [{"anchor": "corner"}, {"anchor": "center"}],
        "entropy": [{}, {"tau": 2.0}],
        "attention": [{"score": "cls"}, {"score": "received"}],
        "tome": [{}, {"r": 10}],
        "evit": [{"fusion": "sum"}, {"fusion": "mean"}],
    }
    plans = []
    for method in _methods():
        for i, ratio in enumerate(RATIOS):
            choices = extra_options.get(method, [{}])
            options = dict(choices[i % len(choices)])
            plans.append(SlimPlan.single(method, ratio, seed=rng.randrange(1000),
                                         attention_blocks=(rng.randrange(6),) if i % 3 == 0 else (), **options))
    plans += [
        SlimPlan((Stage("grid", 0.5), Stage("attention", 0.5, blocks=(3,))), attention_blocks=(2,)),
        SlimPlan((Stage("uniform", 0.5), Stage("tome", blocks=(1, 2), options={"r": 10}),
                  Stage("evit", 0.5, blocks=(4,)))),
        SlimPlan((Stage("random", 0.7), Stage("entropy", 0.6, blocks=(2,)), Stage("attention", 0.5, blocks=(4,))),
                 seed=3),
        SlimPlan((Stage("tome", 0.8, blocks=(0, 1, 2)), Stage("lowrank", 0.5, blocks=(3,)))),
        SlimPlan((Stage("evit", 0.7, blocks=(1, 3)), Stage("random", 0.5, blocks=(5,))), seed=11,
                 attention_blocks="all"),
    ]
    return plans


def _fingerprint(trace: patchslim.Trace) -> dict[str, torch.Tensor]:
    """Everything a run produces that a person sees: logits, tokens, provenance, kept attention."""
    out = {"logits": trace.logits.float().cpu(), "tokens": torch.tensor(trace.tokens_per_block),
           "final_provenance": trace.final_provenance.dense().float().cpu()}
    for i, block in enumerate(trace.blocks):
        out[f"block{i}_provenance"] = block.provenance.dense().float().cpu()
    for block, attention in trace.attention.items():
        out[f"attention{block}"] = attention.float().cpu()
    return out


def test_8_threads_x_25_runs_match_the_same_runs_alone(fashion_random, fashion_batch):
    images = fashion_batch[0][:6]  # six canvas images of the bundled sample ``[6, 1, 48, 48]``
    plans = _plans()
    rng = random.Random(0)
    jobs = [(rng.randrange(len(plans)), rng.randrange(len(images))) for _ in range(THREADS * RUNS_PER_THREAD)]
    assert len({p for p, _ in jobs}) >= len(plans) * 3 // 4  # the jobs cover most plans
    before = {k: v.clone() for k, v in fashion_random.model.state_dict().items()}

    def run(job: tuple[int, int]) -> dict[str, torch.Tensor]:
        plan_index, image_index = job
        return _fingerprint(patchslim.run(fashion_random, images[image_index: image_index + 1], plans[plan_index]))

    alone = {job: run(job) for job in set(jobs)}

    start = threading.Barrier(THREADS)
    results: list[list[tuple[tuple[int, int], dict]]] = [[] for _ in range(THREADS)]

    def worker(index: int) -> None:
        mine = jobs[index * RUNS_PER_THREAD: (index + 1) * RUNS_PER_THREAD]
        start.wait()  # all threads begin together, so their forwards overlap
        for job in mine:
            results[index].append((job, run(job)))

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(worker, i) for i in range(THREADS)]:
            future.result()

    checked = exact = 0
    for thread_results in results:
        assert len(thread_results) == RUNS_PER_THREAD
        for job, got in thread_results:
            want = alone[job]
            assert got.keys() == want.keys(), (plans[job[0]], set(got) ^ set(want))
            for name, value in want.items():
                assert got[name].shape == value.shape, (name, plans[job[0]])
                torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0,
                                           msg=lambda m: f"{name} differs for {plans[job[0]]}: {m}")
            exact += all(torch.equal(got[n], want[n]) for n in want)
            checked += 1
    assert checked == THREADS * RUNS_PER_THREAD
    print(f"{checked} threaded runs checked, {exact} bit-for-bit equal to the run alone, all within 1e-6")
    assert exact >= checked * 0.9, f"only {exact}/{checked} runs bit-for-bit equal (all within 1e-6)"
    for key, value in fashion_random.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was changed by a run"


def test_threads_with_different_plans_on_one_batch_do_not_leak_options(fashion_random, fashion_batch):
    """Two plans that differ only in an option, raced many times: each thread always gets its own answer."""
    images = fashion_batch[0][:6]
    plan_a = SlimPlan.single("tome", 0.5, r=5)
    plan_b = SlimPlan.single("tome", 0.5, r=20)
    want_a = patchslim.run(fashion_random, images, plan_a).tokens_per_block
    want_b = patchslim.run(fashion_random, images, plan_b).tokens_per_block
    assert want_a != want_b
    barrier = threading.Barrier(4)
    wrong = []

    def race(plan, want):
        barrier.wait()
        for _ in range(10):
            got = patchslim.run(fashion_random, images, plan).tokens_per_block
            if got != want:
                wrong.append((plan, got))

    threads = [threading.Thread(target=race, args=(p, w)) for p, w in
               ((plan_a, want_a), (plan_b, want_b), (plan_a, want_a), (plan_b, want_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


# --------------------------------------------------------------------------- bounded session memory

def test_bounded_lru_keeps_the_most_recently_used():
    pytest.importorskip("streamlit")
    from app.state import BoundedLRU

    lru = BoundedLRU(3)
    for key in "abc":
        lru.put(key, key.upper())
    assert lru.get("a") == "A"  # a is now the most recently used
    lru.put("d", "D")  # evicts b, the least recently used
    assert lru.keys() == ["c", "a", "d"] and "b" not in lru and lru.get("b") is None
    lru.put("c", "C2")  # an update is a use
    lru.put("e", "E")
    assert lru.keys() == ["d", "c", "e"] and lru.get("c") == "C2"
    for i in range(1000):
        lru.put(i, bytearray(10))
    assert len(lru) == 3
    with pytest.raises(ValueError):
        BoundedLRU(0)


def test_bounded_lru_holds_its_bound_under_threads():
    pytest.importorskip("streamlit")
    from app.state import BoundedLRU

    lru = BoundedLRU(8)

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(2000):
            key = rng.randrange(50)
            if rng.random() < 0.5:
                lru.put(key, seed)
            else:
                lru.get(key)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lru) == 8 and len(set(lru.keys())) == 8


def test_session_results_are_a_bounded_lru():
    """``state.remember`` in a session keeps at most eight results, dropping the least recently used."""
    pytest.importorskip("streamlit")
    from app import state

    fake_session: dict = {}

    class FakeStreamlit:
        session_state = fake_session

    original = state.st
    state.st = FakeStreamlit
    try:
        for i in range(20):
            state.remember(("result", i), i)
            if i >= 1:
                assert state.remembered(("result", 1)) == 1  # kept alive by being read
        kept = fake_session[state._RESULTS_KEY].keys()
        assert len(kept) == state._RESULTS_MAX
        assert ("result", 1) in kept and ("result", 0) not in kept and ("result", 19) in kept
    finally:
        state.st = original


def test_every_streamlit_cache_is_bounded():
    """Every ``st.cache_resource`` / ``st.cache_data`` in app/ sets ``max_entries`` (the only bound that
    caps memory; a ttl alone does not), and they all live in app/state.py."""
    import ast
    from pathlib import Path

    app = Path(__file__).resolve().parent.parent / "app"
    found = []
    for path in app.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for deco in node.decorator_list:
                    target = deco.func if isinstance(deco, ast.Call) else deco
                    name = ast.unparse(target)
                    if name.endswith(("cache_resource", "cache_data")):
                        keywords = {k.arg for k in deco.keywords} if isinstance(deco, ast.Call) else set()
                        found.append((path.name, node.name, "max_entries" in keywords))
    assert found, "no caches found"
    assert {f for f, _, _ in found} == {"state.py"}, found
    assert all(bounded for _, _, bounded in found), [c for c in found if not c[2]]
