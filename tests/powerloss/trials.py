"""Trying crash states: recording a run, opening each crash state in a child process as the
first process after a reboot would, judging what it holds, and the figures of a run.

A *recording* is a directory: ``record.log`` (the shim's log, see ``recording_io.c``),
``marks`` (the workload's marks, also in the log), ``recording.json`` (where the data
directory was, the workload's seed, writes and fsync policy) and ``data/`` (the store as the
run left it). :func:`record` makes one; ``crash_states.Recording`` reads it.

Opening a crash state
=====================

A child process (forked from a server process that parsed the log once, so that a crash state
making LMDB die with SIGBUS or abort kills only that child) builds the state, replaces
``rstmdb_storage.engine.boot_id`` with a new boot's id (the seam the tests use for "after the
power cut"), opens the store with the workload's configuration, reads every instance and
machine definition, runs ``verify()``, makes one more write, and opens the store once more.
When the open raises a :class:`StorageError`, it runs the documented repair
(``Storage.repair_wal``) and opens again.

The judgement
=============

* the store holds exactly the state after some prefix of the writes attempted before *k*,
  each instance with the sequence number its write was acknowledged with (acked ⊆ stored ⊆
  attempted): under the default policy (``every_write``) every write acknowledged before
  *k* (the one in flight may or may not be there); under the others any prefix;
* ``verify() == []``, the new write succeeds and the second open sees it;
* no signal, no error that is not a :class:`StorageError`;
* a refusal that repair fixes is allowed only under the non-default policies.

Commands (run by :func:`run_states`)::

    python tests/powerloss/trials.py serve RECORDING REQUESTS RESULTS WORKDIR [--keep]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

try:
    from powerloss.crash_states import (
        LMDB_FILE,
        Recording,
        Request,
        State,
        crash_state,
        materialize,
    )
except ModuleNotFoundError:  # run as a script: tests/ is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from powerloss.crash_states import (
        LMDB_FILE,
        Recording,
        Request,
        State,
        crash_state,
        materialize,
    )

HERE = Path(__file__).resolve().parent
SHIM_SOURCE = HERE / "recording_io.c"
WORKLOAD = HERE / "workload.py"

#: a child that takes longer than this is killed with SIGALRM (reported as a timeout)
CHILD_TIMEOUT_S = 120
#: the instance the child writes after opening a crash state
PROBE_ID = "powerloss-probe"


# --- opening a crash state (in a child) ------------------------------------------------------


def _error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)[:1000]}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()}"[:500])


def observe(data_dir: Path, policy: str, boot: str) -> dict[str, Any]:
    """Open the store on *data_dir* as the first process after a reboot (boot id *boot*),
    with the workload's configuration; report what it holds and every error met."""
    from powerloss import workload
    from rstmdb_storage import Instance, Storage, StorageError
    from rstmdb_storage import engine as engine_module

    engine_module.boot_id = lambda: boot  # the test seam: a new boot of the machine
    logger = logging.getLogger("rstmdb_storage")
    collect = _Collect()
    logger.addHandler(collect)
    logger.propagate = False
    config = workload.config(data_dir, policy)
    out: dict[str, Any] = {
        "open": None,
        "open_error": None,
        "repair": None,
        "repair_error": None,
        "reopen_error": None,
        "state": None,
        "applied_seq": None,
        "verify": None,
        "probe": None,
        "second_open": None,
        "errors": [],
        "untyped": None,
        "warnings": collect.messages,
    }
    try:
        storage = None
        try:
            storage = Storage.open(config)
            out["open"] = "first"
        except StorageError as exc:
            out["open_error"] = _error(exc)
            try:
                repair = Storage.repair_wal(config)
                out["repair"] = None if repair is None else asdict(repair)
            except StorageError as exc2:
                out["repair_error"] = _error(exc2)
            try:
                storage = Storage.open(config)
                out["open"] = "after_repair"
            except StorageError as exc3:
                out["reopen_error"] = _error(exc3)
        if storage is None:
            return out
        try:
            with storage:
                out["applied_seq"] = storage.applied_seq
                out["state"] = _read_state(storage, out["errors"])
                out["verify"] = [str(finding) for finding in storage.verify()]
                probe = Instance(id=PROBE_ID, machine="probe", version=1, state="written")
                out["probe"] = storage.put_instance(probe)
            with Storage.open(config) as again:
                found = again.get_instance(PROBE_ID)
                out["second_open"] = {
                    "applied_seq": again.applied_seq,
                    "count": again.count_instances(),
                    "probe": found is not None and found.last_wal_offset == out["probe"],
                }
        except StorageError as exc:
            out["errors"].append(f"{type(exc).__name__}: {exc}"[:1000])
    except Exception:
        out["untyped"] = traceback.format_exc()[-4000:]
    return out


def _read_state(storage: Any, errors: list[str]) -> State:
    from powerloss.workload import spec_of

    state: State = {}
    instances = 0
    for inst in storage.iter_instances():
        instances += 1
        state["instance:" + inst.id] = [spec_of(inst), inst.last_wal_offset]
        if storage.get_instance(inst.id) != inst:
            errors.append(f"get_instance({inst.id!r}) disagrees with iter_instances()")
    if storage.count_instances() != instances:
        errors.append(f"count_instances() is {storage.count_instances()}, {instances} listed")
    for machine in storage.list_machines():
        state[f"machine:{machine.name}:{machine.version}"] = [machine.definition, None]
    return json.loads(json.dumps(state))  # as the transcript holds it: JSON


# --- judging ------------------------------------------------------------------------------------


def judge(rec: Recording, k: int, obs: dict[str, Any]) -> dict[str, Any]:
    """The verdict on one crash state: its outcome, and every way it broke the promise."""
    acked, tried = rec.progress(k)
    default = rec.policy == "every_write"
    problems: list[str] = []
    verdict: dict[str, Any] = {"acked": acked, "tried": tried, "lost": 0, "matched": None}
    if obs.get("harness_error"):
        verdict.update(outcome="harness error", problems=[obs["harness_error"]])
        return verdict
    if obs.get("signal"):
        name = signal.Signals(obs["signal"]).name
        outcome = "timeout" if obs["signal"] == signal.SIGALRM else "signal"
        verdict.update(outcome=outcome, problems=[f"the child died of {name}"])
        return verdict
    if obs.get("exit") not in (0, None):
        verdict.update(outcome="harness error", problems=[f"the child exited {obs['exit']}"])
        return verdict
    if obs["untyped"]:
        problems.append(f"an error that is not a StorageError: {obs['untyped']}")
        outcome = "untyped"
    elif obs["open"] is None:
        outcome = "refused"
        problems.append(
            f"refused: {obs['open_error']}; repair: {obs['repair'] or obs['repair_error']}; "
            f"still refused: {obs['reopen_error']}"
        )
    elif obs["open"] == "after_repair":
        outcome = "repaired"
        if default:
            problems.append(
                f"refused under the default policy: {obs['open_error']}; repaired: "
                f"{obs['repair'] or obs['repair_error']}"
            )
    else:
        outcome = "opened"
    if obs["state"] is not None:
        prefix = _matching_prefix(rec, obs, tried)
        verdict["matched"] = prefix
        if prefix is None:
            problems.append(
                f"the store holds no prefix of the writes attempted ({tried} attempted, "
                f"{acked} acknowledged); applied_seq {obs['applied_seq']}; against the "
                f"{acked} acknowledged: " + _difference(rec.states[acked], obs["state"])
            )
        elif prefix < acked:
            verdict["lost"] = acked - prefix
            if default:  # under the others, losing the last acknowledged writes is allowed
                problems.append(
                    f"lost {acked - prefix} acknowledged write(s): the store holds the state "
                    f"after write {prefix} of the {acked} acknowledged"
                )
    if obs["verify"]:
        problems.append(f"verify() found {len(obs['verify'])}: {obs['verify'][:3]}")
    problems += [f"after opening: {error}" for error in obs["errors"]]
    if obs["state"] is not None and not obs["errors"] and not obs["untyped"]:
        second = obs["second_open"] or {}
        instances = sum(1 for key in obs["state"] if key.startswith("instance:"))
        if not second.get("probe") or second.get("count") != instances + 1:
            problems.append(f"the write after opening is not there when opened again: {second}")
    verdict.update(outcome=outcome, problems=problems)
    return verdict


def _matching_prefix(rec: Recording, obs: dict[str, Any], tried: int) -> int | None:
    """The number of writes whose state the store holds (exactly: every instance with the
    sequence number of its last write, and applied_seq), the longest first; None if none."""
    for p in range(tried, -1, -1):
        expected_seq = rec.writes[p - 1].seq if p else 0
        if obs["state"] == rec.states[p] and obs["applied_seq"] == expected_seq:
            return p
    return None


def _difference(expected: State, found: State) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    changed = sorted(key for key in set(expected) & set(found) if expected[key] != found[key])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing {missing[:4]}")
    if extra:
        parts.append(f"{len(extra)} not acknowledged {extra[:4]}")
    for key in changed[:3]:
        parts.append(f"{key}: seq {found[key][1]} for acknowledged seq {expected[key][1]}")
    if len(changed) > 3:
        parts.append(f"{len(changed) - 3} more changed")
    return "; ".join(parts) or "same instances, different applied_seq"


# --- trying crash states: a server that forks a child per state --------------------------------


def try_state(rec: Recording, request: Request, workdir: Path, keep: bool) -> dict[str, Any]:
    """Build and open one crash state in a forked child; return the result (the state's
    directory is kept when *keep*, or when it breaks the promise)."""
    lost = "".join(f"-lose{index}" for index in request.lose)
    lost += "".join(f"-drop{index}" for index in request.drop)
    target = workdir / f"state-{request.k}-{request.seed}-{request.mode}{lost}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    pid = os.fork()
    if pid == 0:  # the child: build, open, report; never return into the caller
        code = 0
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not the parent's test timeout
            signal.alarm(CHILD_TIMEOUT_S)
            state = crash_state(
                rec, request.k, request.seed, request.mode, request.lose, request.drop
            )
            materialize(state, target / "data")
            (target / "state.json").write_text(json.dumps(state.describe(), indent=1))
            (target / "summary.txt").write_text(state.summary() + "\n")
            obs = observe(target / "data", rec.policy, str(uuid.uuid4()))
            (target / "observation.json").write_text(json.dumps(obs, indent=1))
        except BaseException:
            with contextlib.suppress(BaseException):
                (target / "harness-error.txt").write_text(traceback.format_exc())
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    obs: dict[str, Any] = {}
    observation = target / "observation.json"
    if observation.exists():
        obs = json.loads(observation.read_text())
    if os.WIFSIGNALED(status):
        obs["signal"] = os.WTERMSIG(status)
    else:
        obs["exit"] = os.WEXITSTATUS(status)
    if (target / "harness-error.txt").exists():
        obs["harness_error"] = (target / "harness-error.txt").read_text()[-4000:]
    if not obs.get("signal") and not obs.get("harness_error") and "open" not in obs:
        obs["harness_error"] = f"the child exited {obs.get('exit')} without an observation"
    verdict = judge(rec, request.k, obs)
    summary = target / "summary.txt"
    described = target / "state.json"
    facts = json.loads(described.read_text()) if described.exists() else {}
    result = {
        **asdict(request),
        **verdict,
        "state": summary.read_text().strip() if summary.exists() else None,
        "last_op": rec.ops[request.k - 1].label() if request.k else "(nothing)",
        "files": sorted(facts.get("files", {})),
        "unsynced": sorted(facts.get("contents", {})),
        "names": facts.get("names", []),
        # opening kept (mapped, or died mapping) a data.mdb LMDB wrote after it last synced
        # it, instead of moving it aside to rebuild (read from what the child left, which is
        # there even when it died of a signal)
        "lmdb_trusted": (
            LMDB_FILE in facts.get("files", {})
            and LMDB_FILE in facts.get("contents", {})
            and not any((target / "data" / "indexes").glob("data.mdb.broken-*"))
        ),
        "warnings": obs.get("warnings", [])[:6],
        "open_error": obs.get("open_error"),
        "kept_at": str(target) if keep or verdict["problems"] else None,
    }
    result["known"] = known_cause(result) if verdict["problems"] else None
    if not result["kept_at"]:
        shutil.rmtree(target)
    return result


def serve(recording: Path, requests: Path, results: Path, workdir: Path, keep: bool) -> None:
    """Try every request in *requests* (JSON lines), appending a result line for each."""
    # Imported once here, so that every child has them (importing costs more than opening).
    import powerloss.workload  # noqa: F401
    import rstmdb_storage  # noqa: F401

    rec = Recording(recording)
    lines = [json.loads(line) for line in requests.read_text().splitlines() if line]
    with open(results, "a", encoding="utf-8") as out:
        for number, line in enumerate(lines, 1):
            result = try_state(rec, Request.of(line), workdir, keep)
            out.write(json.dumps(result) + "\n")
            out.flush()
            if number % 100 == 0:
                print(f"{results.name}: {number}/{len(lines)} states", file=sys.stderr)


def run_states(
    recording: Path,
    requests: list[Request],
    workdir: Path,
    workers: int,
    keep: bool = False,
) -> list[dict[str, Any]]:
    """Try *requests* with *workers* server processes at once; return the results in order."""
    workdir.mkdir(parents=True, exist_ok=True)
    shares = [requests[i::workers] for i in range(workers)]
    procs = []
    for i, share in enumerate(shares):
        if not share:
            continue
        req_path, res_path = workdir / f"requests-{i}.jsonl", workdir / f"results-{i}.jsonl"
        req_path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in share))
        res_path.write_text("")
        command = [sys.executable, str(Path(__file__)), "serve", str(recording)]
        command += [str(req_path), str(res_path), str(workdir)] + (["--keep"] if keep else [])
        procs.append((subprocess.Popen(command, env=_child_env()), res_path))
    codes = [proc.wait() for proc, _ in procs]
    if any(codes):
        raise RuntimeError(f"a crash-state server failed: exit codes {codes} (see its stderr)")
    results = []
    for _, res_path in procs:
        results += [json.loads(line) for line in res_path.read_text().splitlines()]
    order = {r.key(): i for i, r in enumerate(requests)}
    results.sort(key=lambda r: order[Request.of(_request_fields(r)).key()])
    return results


def _request_fields(result: dict[str, Any]) -> dict[str, Any]:
    return {name: result[name] for name in ("k", "seed", "mode", "why", "lose", "drop")}


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RSTMDB_FAILPOINTS")}
    paths = [str(HERE.parent), str(HERE.parent.parent)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    return env


# --- findings already reported --------------------------------------------------------------

#: findings in rstmdb_storage this harness has reported (not fixed here: it tests the store,
#: it does not change it), by the condition of the crash state that triggers them. A crash
#: state that breaks the promise and meets one of these conditions is counted as *known*;
#: tests/test_power_loss.py fails only on the others, and pins each of these with a
#: deterministic crash state under ``xfail(strict=True)``, which starts failing (XPASS) once
#: the store is fixed: then delete the entry here and the mark there.
KNOWN: dict[str, str] = {}  # none open: "commits-after-flush" and "repair-misses-zero-header"
# (both under the non-default policies) were fixed; their crash states are pinned in the suite


def known_cause(result: dict[str, Any]) -> str | None:
    """The entry of :data:`KNOWN` whose condition the crash state of *result* meets."""
    del result  # each entry adds its condition here
    return None


# --- recording ----------------------------------------------------------------------------------


def build_shim(target_dir: Path) -> Path:
    """Compile ``recording_io.c`` into *target_dir*; return the shared library."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("the power-loss tests need gcc (or cc) to build recording_io.c")
    target_dir.mkdir(parents=True, exist_ok=True)
    library = target_dir / "recording_io.so"
    command = [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror"]
    command += ["-o", str(library), str(SHIM_SOURCE), "-ldl", "-lpthread"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"building the shim failed: {' '.join(command)}\n{proc.stderr}")
    return library


def record(
    directory: Path, shim: Path, seed: int = 1, ops: int = 240, policy: str = "every_write"
) -> Path:
    """Run the workload once from an empty data directory under the shim; return the
    recording's directory (*directory*, which must not exist)."""
    directory.mkdir(parents=True)
    data = directory / "data"
    data.mkdir()
    prefix = os.path.realpath(data)
    env = _child_env()
    env.update(
        LD_PRELOAD=str(shim),
        RECORD_PREFIX=prefix,
        RECORD_LOG=str(directory / "record.log"),
        RECORD_ACKS=str(directory / "marks"),
    )
    command = [sys.executable, str(WORKLOAD), str(data), str(directory / "marks")]
    command += ["--seed", str(seed), "--ops", str(ops), "--policy", policy]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the workload failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    meta = {"prefix": prefix, "seed": seed, "ops": ops, "policy": policy}
    (directory / "recording.json").write_text(json.dumps(meta, indent=1) + "\n")
    return directory


# --- figures --------------------------------------------------------------------------------


def tally(results: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The figures of a run (``scripts/powerloss.py`` prints them)."""
    figures = dict.fromkeys(
        [
            "states tried",
            "opened",
            "acked writes checked",
            "lost",
            "refused",
            "refused then repaired",
            "signals",
            "timeouts",
            "untyped errors",
            "verify findings",
            "other findings",
            "harness errors",
            "broken promises",
            "of which known",
        ],
        0,
    )
    for result in results:
        figures["states tried"] += 1
        outcome = result["outcome"]
        figures["opened"] += outcome in ("opened", "repaired")
        figures["refused then repaired"] += outcome == "repaired"
        figures["refused"] += outcome == "refused"
        figures["signals"] += outcome == "signal"
        figures["timeouts"] += outcome == "timeout"
        figures["untyped errors"] += outcome == "untyped"
        figures["harness errors"] += outcome == "harness error"
        if outcome in ("opened", "repaired"):
            figures["acked writes checked"] += result["acked"]
        figures["lost"] += result["lost"]
        problems = result["problems"]
        figures["verify findings"] += any(p.startswith("verify()") for p in problems)
        figures["other findings"] += any(
            p.startswith(("the store holds", "after opening", "the write after")) for p in problems
        )
        figures["broken promises"] += bool(problems)
        figures["of which known"] += bool(problems) and result.get("known") is not None
    return figures


def findings(results: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (result for result in results if result["problems"])


def report(result: dict[str, Any], recording: Path) -> str:
    """One broken promise: where, what was lost or torn, what happened, how to rebuild it."""
    lose = "".join(f" --lose {index}" for index in result["lose"])
    lose += "".join(f" --drop {index}" for index in result["drop"])
    lines = [
        f"finding: k={result['k']} seed={result['seed']} mode={result['mode']}{lose} "
        f"({result['why']}; last operation {result['last_op']})",
        f"  outcome: {result['outcome']}; {result['acked']} acknowledged, "
        f"{result['tried']} attempted",
        f"  crash state: {result['state']}",
    ]
    lines += [f"  problem: {problem[:1500]}" for problem in result["problems"]]
    if result.get("known"):
        lines.append(f"  known ({result['known']}): {KNOWN[result['known']]}")
    lines.append(
        f"  reproduce: python scripts/powerloss.py --recording {recording} --state "
        f"{result['k']} --state-seed {result['seed']} --mode {result['mode']}{lose} --keep DIR"
    )
    if result.get("kept_at"):
        lines.append(f"  kept at: {result['kept_at']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"] and len(args) in (5, 6):
        keep = args[5:] == ["--keep"]
        serve(Path(args[1]), Path(args[2]), Path(args[3]), Path(args[4]), keep)
        return 0
    print(__doc__.rsplit("Commands", 1)[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
