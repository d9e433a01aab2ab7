"""The committed results under ``benchmarks/results/``: each names a command that still exists and remakes it,
and none holds a path of the machine it was made on.

Where the command is: a markdown file's ``Command:`` line, a JSON file's ``command`` field, ``summary.txt``'s
first line, the audit report's "Command" row. A CSV, a PNG or a plot's HTML goes by the markdown / JSON written
with it (the same stem, or the stem's first word: ``audit_groups.csv`` -> ``audit.json``), so that the CSVs stay
plain tables for ``pandas.read_csv`` and ``csv.DictReader``.

Files listed in ``AWAITING_RERUN`` were made before the writers were fixed and are remade only by a rerun the
lead does on an idle machine (timings) or after the engine's refactor lands (accuracy, audit); their checks are
expected to fail (strict): once a rerun fixes one, its entry must go.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the scripts in benchmarks/
HARNESSES = ("app_latency.py", "app_memory.py", "soak.py", "tome_reference.py", "newer_methods.py")
TEXT = {".md", ".json", ".csv", ".txt", ".html"}

# A path of some machine: a usual absolute root, a Windows drive, a home directory, or this checkout's own.
MACHINE_PATH = re.compile(r"(?<![\w.:/-])/(?:work|tmp|home|root|Users|mnt|media|opt|srv|var|usr|private|scratch"
                          r"|data|nfs|run|etc)/|(?<![\w])[A-Za-z]:\\[\w.]|~/")

# file -> the rerun that fixes it; (test, file) pairs below say which check fails until then (none today).
AWAITING_RERUN: dict[str, str] = {}
PATHS_AWAITING: set[str] = set()
COMMANDS_AWAITING: set[str] = set()


def results_files() -> list[str]:
    return sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*") if p.is_file())


def cases(awaiting: set[str], text_only: bool = False) -> list:
    files = [f for f in results_files() if not text_only or Path(f).suffix in TEXT]
    return [pytest.param(f, marks=pytest.mark.xfail(reason=f"made before the fix; rerun: {AWAITING_RERUN[f]}",
                                                    strict=True)) if f in awaiting else f for f in files]


def own_command(path: Path) -> str | None:
    """The command a results file records inside itself (None: it records none)."""
    if path.suffix == ".json":
        record = json.loads(path.read_text())
        return record.get("command") if isinstance(record, dict) else None
    if path.suffix not in {".md", ".txt", ".html"}:
        return None
    text = path.read_text(encoding="utf-8")
    found = (re.search(r"^Command: `([^`]+)`", text, re.M) or re.search(r"^Command: (.+)$", text, re.M)
             or re.search(r"<th>Command</th><td>([^<]+)</td>", text))
    return found.group(1).strip() if found else None


def command_of(path: Path) -> tuple[str | None, Path]:
    """(command, the file that records it): the file itself, else the markdown / JSON written with it."""
    command = own_command(path)
    if command:
        return command, path
    stems = dict.fromkeys([path.stem, path.stem.split("_")[0]])
    for stem in stems:
        for suffix in (".md", ".json"):
            record = path.with_name(stem + suffix)
            if record != path and record.is_file() and own_command(record):
                return own_command(record), record
    return None, path


def check_command(command: str, record: Path) -> None:
    """``command`` exists today and is the one that writes ``record``."""
    argv = shlex.split(command)
    if argv[:2] == ["python", "-m"] and argv[2:4] == ["patchslim", "benchmark"]:
        from patchslim.cli import build_parser
        from patchslim.commands.benchmark import configs

        try:
            args = build_parser().parse_args(argv[3:])
        except SystemExit:
            pytest.fail(f"{record.name}: {command!r} is not a valid benchmark command today")
        stems = {config.stem for config in configs(args).values()}
        assert record.stem in stems or record.parent.name in stems, \
            f"{record.name}: {command!r} writes {sorted(stems)}, not this file"
    elif argv[:2] == ["python", "-m"] and argv[2:4] in (["patchslim", "finetune"], ["patchslim", "evaluate"]):
        # a fine-tune's training record (STEM.training.json, copied from its --out) or the evaluation of a
        # fine-tuned checkpoint (evaluate --stem STEM writes STEM.{md,json,csv,html,png})
        from patchslim.cli import build_parser

        try:
            args = build_parser().parse_args(argv[3:])
        except SystemExit:
            pytest.fail(f"{record.name}: {command!r} is not a valid command today")
        if argv[3] == "finetune":
            from patchslim.finetune import default_stem

            stem = args.stem or default_stem(args.model, args.method, args.keep, args.distill)
            assert record.name == f"{stem}.training.json", f"{record.name}: {command!r} writes {stem}.training.json"
        else:
            assert record.stem == args.stem and args.out, f"{record.name}: {command!r} writes {args.stem}.*"
    elif len(argv) >= 2 and argv[0] == "python" and argv[1].startswith("benchmarks/"):
        script = argv[1].removeprefix("benchmarks/")
        assert script in HARNESSES and (ROOT / argv[1]).is_file(), f"{record.name}: no harness {argv[1]}"
        out = argv[argv.index("--out") + 1] if "--out" in argv[:-1] else None  # a harness told where to write
        assert record.stem == Path(script).stem or (out is not None and Path(out).name == record.name), \
            f"{record.name}: {argv[1]} writes another file"
    else:
        pytest.fail(f"{record.name}: {command!r} is neither `python -m patchslim benchmark` (or finetune / "
                    f"evaluate of a fine-tuned checkpoint) nor a harness in benchmarks/ ({', '.join(HARNESSES)})")


@pytest.mark.parametrize("name", cases(PATHS_AWAITING, text_only=True))
def test_results_file_holds_no_machine_path(name):
    text = (RESULTS / name).read_text(encoding="utf-8", errors="replace")
    found = [m.group(0) for m in MACHINE_PATH.finditer(text)]
    for own in {str(ROOT), str(Path.home())} - {"/"}:
        if own in text:
            found.append(own)
    assert not found, f"{name} holds paths of the machine it was made on: {sorted(set(found))[:5]}"


@pytest.mark.parametrize("name", cases(COMMANDS_AWAITING))
def test_results_file_names_its_command(name):
    command, record = command_of(RESULTS / name)
    assert command, f"{name} names no command (nor does a markdown / JSON file of its stem beside it)"
    check_command(command, record)


def test_awaiting_list_names_existing_files():
    files = set(results_files())
    assert set(AWAITING_RERUN) <= files
    assert PATHS_AWAITING | COMMANDS_AWAITING <= set(AWAITING_RERUN)


def test_machine_path_pattern():
    for text in ("file /work/main/assets/x.safetensors", "(/tmp/abc/d.csv)", "&quot;/home/u/a", "C:\\Users\\me",
                 "~/weights.pt"):
        assert MACHINE_PATH.search(text), text
    for text in ("rho 0.7/0.5", "https://cdn.plot.ly/plotly.min.js", "file assets/fashion_vit.safetensors",
                 "runs/audit_fashion", "images/s", "top-1 / top-5"):
        assert not MACHINE_PATH.search(text), text
