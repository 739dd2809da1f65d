"""Mutation check of the method tests: do one-line bugs in a method make its fast tests fail?

    python bench/mutants.py                        # every method, every mutant (2 mutants at a time)
    python bench/mutants.py --methods diffrect     # one method
    python bench/mutants.py --list                 # the mutants, without running anything
    python bench/mutants.py --methods diffcl --only 3 7 --jobs 1

Each mutant is a one-line bug kept in this file: an exact, unique piece of one source line (``old``) and what it
becomes (``new``), with the rule it breaks (``why``).  For every mutant the repository's tracked files are copied
(hard links, the mutated file written anew) to a temporary folder, the mutant is applied there, and the method's
fast tests (:data:`FAST_TESTS`) run in a child process with that copy first on ``PYTHONPATH``.  A mutant is
*caught* when the tests fail (or time out); a mutant whose ``old`` text is not found exactly once is reported
as *stale*, never as caught.  The unmutated copy runs first: a method whose tests fail without a mutant is
reported and skipped.

Prints a Markdown table (caught / total per method, then one line per mutant) and writes it to
``bench/results/mutants.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Mutant:
    """A one-line bug: ``old`` (an exact piece of one line of ``file``, unique in it) becomes ``new``."""

    file: str
    old: str
    new: str
    why: str


# The fast tests that must catch each method's mutants (pytest arguments, relative to the repository root).
FAST_TESTS: dict[str, list[str]] = {
    "diffrect": ["tests/test_diffrect.py", "tests/test_diffrect_nets.py", "-m", "not slow"],
    "diffcl": ["tests/test_diffcl.py", "tests/test_mamba.py", "-m", "not slow"],
    "genericssl": ["tests/test_genericssl.py", "-m", "not slow"],
}

# ---- DiffRect mutants ------------------------------------------------------------------------------------------
# (kept together; each names the rule of the paper / official code it breaks)

DIFFRECT: list[Mutant] = [
]

# ---- end of DiffRect mutants -----------------------------------------------------------------------------------


# ---- Diff-CL mutants -------------------------------------------------------------------------------------------
# (kept together; each names the rule of the paper / official code it breaks)

DIFFCL: list[Mutant] = [
]

# ---- end of Diff-CL mutants ------------------------------------------------------------------------------------


# ---- A&D (GenericSSL) mutants ----------------------------------------------------------------------------------
# (kept together; each names the rule of the paper / official code it breaks)

GENERICSSL: list[Mutant] = [
]

# ---- end of A&D mutants ----------------------------------------------------------------------------------------


MUTANTS: dict[str, list[Mutant]] = {"diffrect": DIFFRECT, "diffcl": DIFFCL, "genericssl": GENERICSSL}


@dataclasses.dataclass
class Outcome:
    method: str
    index: int  # 1-based within the method; 0 = the unmutated baseline
    status: str  # caught | missed | stale | timeout | passed | failed (baseline)
    seconds: float
    detail: str = ""


def tracked_files(root: Path) -> list[str]:
    """Every file git tracks, plus untracked files it does not ignore (work in progress counts too)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line and (root / line).is_file()]


def make_copy(root: Path, files: list[str], dest: Path) -> None:
    """Hard-link ``files`` of ``root`` into ``dest`` (a mutated file is unlinked and written anew)."""
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(root / rel, target)
        except OSError:
            shutil.copy2(root / rel, target)


def apply(mutant: Mutant, tree: Path) -> str | None:
    """Apply ``mutant`` in ``tree``; return None, or why it cannot be applied (stale)."""
    path = tree / mutant.file
    if not path.is_file():
        return f"no file {mutant.file}"
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        return f"'{mutant.old}' occurs {count} times in {mutant.file}"
    if "\n" in mutant.old or "\n" in mutant.new:
        return "a mutant changes one line"
    path.unlink()  # break the hard link: the source tree stays untouched
    path.write_text(text.replace(mutant.old, mutant.new))
    return None


def run_tests(method: str, tree: Path, timeout: float) -> tuple[str, float, str]:
    """Run ``method``'s fast tests in ``tree``: ``(passed|failed|timeout, seconds, last line)``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           *FAST_TESTS[method]]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, f"over {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else proc.stderr.strip().splitlines()[-1:] or [""]
    return ("passed" if proc.returncode == 0 else "failed"), time.perf_counter() - start, \
        (last if isinstance(last, str) else last[0])


def check(method: str, index: int, mutant: Mutant | None, files: list[str], work: Path,
          timeout: float) -> Outcome:
    """Copy the tree, apply ``mutant`` (None: the baseline), run the tests, classify."""
    tree = Path(tempfile.mkdtemp(prefix=f"{method}-{index}-", dir=work))
    try:
        make_copy(ROOT, files, tree)
        if mutant is not None:
            problem = apply(mutant, tree)
            if problem:
                return Outcome(method, index, "stale", 0.0, problem)
        result, seconds, last = run_tests(method, tree, timeout)
        if mutant is None:
            return Outcome(method, 0, result, seconds, last)
        status = {"failed": "caught", "timeout": "timeout", "passed": "missed"}[result]
        return Outcome(method, index, status, seconds, last)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def report(outcomes: list[Outcome], methods: list[str]) -> str:
    from bench.common import machine_lines

    lines = ["# Mutation check of the method tests", "", *machine_lines("cpu"),
             "- a mutant is caught when the method's fast tests fail (or time out) with it applied", "",
             "| method | mutants | caught | missed | stale | fast tests (baseline s) |", "|---|---|---|---|---|---|"]
    for method in methods:
        rows = [o for o in outcomes if o.method == method and o.index > 0]
        base = next((o for o in outcomes if o.method == method and o.index == 0), None)
        caught = sum(o.status in ("caught", "timeout") for o in rows)
        missed = sum(o.status == "missed" for o in rows)
        stale = sum(o.status == "stale" for o in rows)
        base_s = f"{base.seconds:.0f} ({base.status})" if base else "-"
        lines.append(f"| {method} | {len(MUTANTS[method])} | {caught} | {missed} | {stale} | {base_s} |")
    lines += ["", "| method | # | result | s | mutant (file: why) |", "|---|---|---|---|---|"]
    for o in sorted(outcomes, key=lambda o: (methods.index(o.method), o.index)):
        if o.index == 0:
            continue
        m = MUTANTS[o.method][o.index - 1]
        note = f" ({o.detail})" if o.status in ("stale", "missed") and o.detail else ""
        lines.append(f"| {o.method} | {o.index} | {o.status} | {o.seconds:.0f} | `{m.file}`: {m.why}{note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(MUTANTS), default=list(MUTANTS))
    parser.add_argument("--only", nargs="+", type=int, help="1-based mutant numbers (with one method)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (each test run 1 thread)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/mutants.md")
    args = parser.parse_args(argv)

    if args.list:
        for method in args.methods:
            for i, m in enumerate(MUTANTS[method], 1):
                print(f"{method} {i:2d} {m.file}: {m.why}\n      {m.old!r} -> {m.new!r}")
        return 0
    files = tracked_files(ROOT)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="semiseg-mutants-") as tmp:
        work = Path(tmp)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            bases = {m: pool.submit(check, m, 0, None, files, work, args.timeout) for m in args.methods}
            for method in args.methods:
                base = bases[method].result()
                outcomes.append(base)
                print(f"{method}: baseline {base.status} in {base.seconds:.0f} s ({base.detail})", flush=True)
            jobs = []
            for method in args.methods:
                if outcomes[[o.method for o in outcomes].index(method)].status != "passed":
                    print(f"{method}: its tests fail without a mutant; skipped", flush=True)
                    continue
                for i, mutant in enumerate(MUTANTS[method], 1):
                    if args.only and i not in args.only:
                        continue
                    jobs.append(pool.submit(check, method, i, mutant, files, work, args.timeout))
            for job in jobs:
                o = job.result()
                outcomes.append(o)
                m = MUTANTS[o.method][o.index - 1]
                print(f"{o.method} {o.index:2d} {o.status:7s} {o.seconds:5.0f} s  {m.why}", flush=True)
    text = report(outcomes, args.methods)
    print(text)
    if not args.no_write and not args.only:
        from bench.common import write_result

        print(f"written to {write_result('mutants.md', text)}")
    missed = [o for o in outcomes if o.status in ("missed", "stale")]
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
