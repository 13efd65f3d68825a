"""The chaos driver: SIGKILL a resumable job at random moments, restart it, compare with an uninterrupted run.

For each job, one uninterrupted run in a directory of its own is the reference. Then rounds: each
starts in a fresh directory and kills the job's process (or, for the Ray engine, a worker) a few
times, restarting it after each kill, then lets it finish. A kill is one of
- `startup`: at a random moment between the start and the reference's first journal line;
- `scoring`: once the journal has grown by a random number of lines (1-4, short of the last),
  plus a random part of the time the reference took per line;
- `power_loss`: as `scoring`, then the journal's last line is replaced by NUL bytes up to the next
  4 KiB (what a power loss leaves when the data of the last write never reached the disk);
- `final_write`: while one of the final outputs is written (as soon as its temporary file exists,
  or, for an output larger than a write buffer, once it holds a random part of the output's bytes),
  or between one output in place and the next. Those windows last milliseconds, so near the end
  of the job the driver runs it in steps (SIGCONT ... SIGSTOP; 0.5 ms, then 0.1 ms once the journal
  is complete) and looks at the files while it is stopped: the kill lands where the driver saw it;
- `worker`: a random live worker process, after 0-3 new journal lines (jobs with workers).

Where each kill landed is read from the files, not assumed: journal lines before and after, which
temporary file it left. A round passes when its outputs equal the reference's (`Output.compare`),
its directory holds exactly the reference's file names (a stray temporary or lock file is a
leftover), and no process of the job outlives it. The plan is seeded; where a kill lands is not.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lever_lm.chaos.jobs import Job
from lever_lm.chaos.watch import Process, alive, complete_lines, descendants, process, stopped
from lever_lm.io import temporary_name_pattern

MODES = ("startup", "scoring", "power_loss", "final_write")
WORKER_MODE = "worker"
KILLS_PER_ROUND = 5  # at most, then the round runs to the end and is compared
POLL_SECONDS = 0.02
STEP_SECONDS = 0.0005  # how long the job runs between two looks near its final write...
FINE_STEP_SECONDS = 0.0001  # ...and once its journal is complete
SNAPSHOT_SECONDS = 0.5  # how often the job's process tree is recorded (and before every kill)
SETTLE_SECONDS = 90.0  # how long the processes of a killed job may take to go (Ray's agents take ~60 s)
EXIT_GRACE_SECONDS = 5.0  # ...and those of a job that ended by itself
MAX_LINE_STEP = 4  # a scoring kill waits for 1..this many new journal lines (never the last one)
PAGE = 4096


class ChaosError(Exception):
    """The chaos run itself cannot go on (a job that fails on its own, a timeout)."""


@dataclass
class Kill:
    """One SIGKILL: what was planned, what it hit, and where it landed."""

    job: str
    round: int
    mode: str
    target: str = "job"
    hit: bool = False  # it killed a live process
    phase: str = ""
    lines_before: int = 0  # journal records when the killed process started (for a worker: at the kill)
    lines_after: int = 0
    note: str = ""

    def describe(self) -> str:
        if not self.hit:
            return f"{self.mode}: missed ({self.phase})"
        journal = (
            f"journal {self.lines_after} lines"
            if self.target != "job"
            else f"journal {self.lines_before}->{self.lines_after} lines"
        )
        note = f"; {self.note}" if self.note else ""
        return f"{self.mode}: killed {self.target} in {self.phase} ({journal}){note}"


@dataclass
class Round:
    job: str
    number: int
    kills: list[Kill] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differences and not self.leftovers

    def verdict(self) -> str:
        if self.ok:
            return "identical to the uninterrupted run, no leftovers"
        return "; ".join([*(f"DIFFERENT: {d}" for d in self.differences), *(f"LEFTOVER: {x}" for x in self.leftovers)])


@dataclass
class ChaosReport:
    rounds: list[Round]
    seconds: float

    @property
    def kills(self) -> list[Kill]:
        return [kill for r in self.rounds for kill in r.kills]

    @property
    def ok(self) -> bool:
        return bool(self.rounds) and all(r.ok for r in self.rounds)

    def summary(self) -> str:
        hits = [k for k in self.kills if k.hit]
        by_phase: dict[str, int] = {}
        for kill in hits:
            key = kill.phase.split(":")[0].split(" (")[0]
            by_phase[key] = by_phase.get(key, 0) + 1
        phases = ", ".join(f"{phase} {n}" for phase, n in by_phase.items())
        failed = [f"{r.job} round {r.number}" for r in self.rounds if not r.ok]
        verdict = "identical, no leftovers" if self.ok else f"FAILED ({', '.join(failed) or 'no round ran'})"
        return (
            f"{len(self.kills)} kills, {len(hits)} hit a live process ({phases or '-'}); "
            f"{len(self.rounds)} rounds in {self.seconds:.0f}s; verdict: {verdict}"
        )


@dataclass
class Reference:
    """The uninterrupted run: its outputs' compared values, its file names, its journal, its start-up time."""

    directory: Path
    values: dict[str, object]
    files: set[str]
    records: int
    startup_seconds: float  # until the first journal record
    seconds_per_record: float

    def size(self, output: str) -> int:
        return (self.directory / output).stat().st_size


def run_chaos(
    jobs: Sequence[Job],
    kills: int,
    seed: int,
    workdir: Path,
    say: Callable[[str], None] = print,
    modes: Sequence[str] | None = None,
    kills_per_round: int = KILLS_PER_ROUND,
    settle_seconds: float = SETTLE_SECONDS,
) -> ChaosReport:
    """Kill each job `kills` times (seeded plan) and compare every round with the job's uninterrupted run.

    `modes`: the kinds of kill to draw from (default: all that apply to the job; `worker` only
    to jobs with workers). `settle_seconds`: how long a killed job's processes may take to go.
    """
    started = time.time()
    rng = random.Random(seed)
    rounds: list[Round] = []
    for job in jobs:
        home = workdir / job.name
        say(f"[{job.name}] uninterrupted reference run")
        reference = run_reference(job, home / "reference", home / "logs")
        say(
            f"[{job.name}] reference: {reference.records} journal records, first after {reference.startup_seconds:.1f}s"
        )
        allowed = [m for m in modes or (*MODES, WORKER_MODE) if m != WORKER_MODE or job.workers]
        for number, plan in enumerate(plan_rounds(rng, allowed, kills, kills_per_round), start=1):
            result = ChaosRound(job, number, reference, home, rng, say, settle_seconds).run(plan)
            rounds.append(result)
            say(f"[{job.name} round {number}] {result.verdict()} ({result.seconds:.0f}s)")
    report = ChaosReport(rounds, time.time() - started)
    say(f"chaos: {report.summary()}")
    return report


def final_write_points(outputs: int) -> list[tuple[str, int]]:
    """Where a final-write kill may aim: each output's temporary file, and each moment between one
    output in place and the next."""
    return [("temporary", i) for i in range(outputs)] + [("between", i) for i in range(outputs - 1)]


def plan_rounds(rng: random.Random, modes: Sequence[str], kills: int, per_round: int) -> list[list[str]]:
    """`kills` modes, every mode once before any repeats (in a seeded order), cut into rounds; a
    `final_write` kill comes last and ends its round, as it comes after all the scoring."""
    sequence: list[str] = []
    while modes and len(sequence) < kills:
        batch = list(modes)
        rng.shuffle(batch)
        sequence += sorted(batch, key=lambda mode: mode == "final_write")  # stable: the others stay shuffled
    rounds, current = [], []
    for mode in sequence[:kills]:
        current.append(mode)
        if mode == "final_write" or len(current) == per_round:
            rounds.append(current)
            current = []
    return rounds + ([current] if current else [])


def run_reference(job: Job, directory: Path, logs: Path) -> Reference:
    directory.mkdir(parents=True, exist_ok=True)
    run = JobProcess(job, directory, logs / "reference.log")
    first = last = None
    try:
        while run.popen.poll() is None:
            records = run.records()
            if records:
                first = first or (time.time(), records)
                last = (time.time(), records)
            time.sleep(POLL_SECONDS)
            run.check_timeout()
    finally:
        run.stop()
    run.require_success()
    values = {o.path: o.compare(directory / o.path, directory) for o in job.outputs}
    startup = first[0] - run.started if first else 0.0
    per_record = (last[0] - first[0]) / (last[1] - first[1]) if first and last[1] > first[1] else 0.0
    return Reference(directory, values, relative_files(directory), run.records(), startup, per_record)


def relative_files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir()}


class JobProcess:
    """One process of a job, its log, and the processes it started (recorded as it runs)."""

    def __init__(self, job: Job, run_dir: Path, log_path: Path):
        self.job, self.run_dir, self.log_path = job, run_dir, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.records_at_start = self.records()
        self.started = time.time()
        self.started_ns = time.time_ns()
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                job.command(run_dir), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **job.env}
            )
        self.seen: set[Process] = set()
        self._snapshot_at = 0.0

    def journal(self) -> Path | None:
        found = sorted(self.run_dir.glob(self.job.journal))
        return found[0] if found else None

    def records(self) -> int:
        """Journal lines after the header."""
        return max(complete_lines(self.journal()) - 1, 0)

    def snapshot(self, force: bool = False) -> None:
        """Record the job's process tree (its Ray, its workers...): none of it may outlive the job."""
        if force or time.time() >= self._snapshot_at:
            self._snapshot_at = time.time() + SNAPSHOT_SECONDS
            if self.popen.poll() is None:
                self.seen |= descendants(self.popen.pid)

    def workers(self) -> dict[int, int]:
        if not self.job.workers:
            return {}
        return self.job.workers(self.log_path.read_text(errors="replace"))

    def stop(self) -> None:
        """SIGKILL, unless it has ended (a stopped process dies too)."""
        self.popen.kill()
        self.popen.wait()

    def check_timeout(self) -> None:
        if time.time() - self.started > self.job.timeout:
            self.stop()
            raise ChaosError(f"{self.job.name}: a run took over {self.job.timeout:.0f}s; see {self.log_path}")

    def require_success(self) -> None:
        if self.popen.wait() != 0:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise ChaosError(
                f"{self.job.name}: a run exited with {self.popen.returncode} ({self.log_path}): " + " | ".join(tail)
            )


class ChaosRound:
    """One round: a fresh directory, the planned kills with a restart after each, a last run to the end."""

    def __init__(self, job: Job, number: int, reference: Reference, home: Path, rng: random.Random, say, settle: float):
        self.job, self.number, self.reference, self.rng, self.say = job, number, reference, rng, say
        self.settle = settle
        self.run_dir = home / f"round-{number}"
        self.logs = home / "logs"
        self.result = Round(job.name, number)
        self.current: JobProcess | None = None
        self.processes = 0
        self.seen: set[Process] = set()
        self.last_kill = 0.0

    def run(self, plan: Sequence[str]) -> Round:
        started = time.time()
        self.run_dir.mkdir(parents=True)
        try:
            for mode in plan:
                kill = self.kill(mode)
                self.result.kills.append(kill)
                self.say(f"[{self.job.name} round {self.number}] kill {len(self.result.kills)}: {kill.describe()}")
            self.finish()
        except ChaosError as error:  # a run that failed on its own after a kill: the round fails
            self.result.differences.append(str(error))
        else:
            self.compare()
        finally:  # after an error or Ctrl-C: never leave the job running, or stopped
            if self.current is not None:
                self.current.stop()
        self.result.leftovers += self.strays()
        self.result.seconds = time.time() - started
        return self.result

    # -- processes ---------------------------------------------------------------------------------

    def start(self) -> JobProcess:
        self.processes += 1
        log = self.logs / f"round-{self.number}-run-{self.processes}.log"
        self.current = JobProcess(self.job, self.run_dir, log)
        return self.current

    def ensure_running(self) -> JobProcess:
        if self.current is None or self.current.popen.poll() is not None:
            if self.current is not None:
                self.current.require_success()  # it ended on its own: it must have succeeded
                self.seen |= self.current.seen
            return self.start()
        return self.current

    def wait_for(self, run: JobProcess, trigger: Callable[[], bool]) -> bool:
        """Wait until `trigger` holds (True) or the process ends (False)."""
        while True:
            if trigger():
                return True
            if run.popen.poll() is not None:
                return False
            run.snapshot()
            run.check_timeout()
            time.sleep(POLL_SECONDS)

    def step_until(self, run: JobProcess, trigger: Callable[[], bool], fine: Callable[[], bool]) -> bool:
        """Run the job in short steps until `trigger` holds while it is stopped (True; it stays stopped
        for the kill) or it ends (False). A step lets it run for STEP_SECONDS, FINE_STEP_SECONDS once
        `fine()` says the window is near.

        The job's main thread (where the final write runs) shares the driver's CPU at nice 19: while
        the driver waits for that CPU, the job hardly runs, so a step stays short on a loaded machine
        (not always: the driver can be kept off its CPU for milliseconds).
        """
        own = os.sched_getaffinity(0)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {min(own)})
            os.sched_setaffinity(run.popen.pid, {min(own)})
            os.setpriority(os.PRIO_PROCESS, run.popen.pid, 19)
        try:
            while True:
                run.popen.send_signal(signal.SIGSTOP)  # never to a reaped (reusable) pid: Popen checks
                if run.popen.poll() is not None:
                    return False
                stopped(run.popen.pid)
                if trigger():
                    return True
                run.check_timeout()
                run.popen.send_signal(signal.SIGCONT)
                time.sleep(FINE_STEP_SECONDS if fine() else STEP_SECONDS)
        finally:
            os.sched_setaffinity(0, own)

    def finish(self) -> None:
        """Let the round's last process end, or run the job once more to the end after a kill."""
        run = self.current or self.start()
        while run.popen.poll() is None:
            run.snapshot()
            run.check_timeout()
            time.sleep(POLL_SECONDS)
        run.require_success()
        self.seen |= run.seen

    # -- kills -------------------------------------------------------------------------------------

    def kill(self, mode: str) -> Kill:
        run = self.ensure_running()
        kill = Kill(self.job.name, self.number, mode, lines_before=run.records_at_start)
        if mode == WORKER_MODE:
            return self.kill_worker(run, kill)
        if mode == "startup":
            delay = self.rng.uniform(0, self.reference.startup_seconds)
            fired = self.wait_for(run, lambda: time.time() - run.started >= delay)
        elif mode == "final_write":
            fired = self.wait_for_final_write(run, kill)
        else:  # scoring, power_loss
            now, last = run.records(), self.reference.records
            target = min(now + self.rng.randint(1, MAX_LINE_STEP), max(last - 1, now + 1))
            delay = self.rng.uniform(0, self.reference.seconds_per_record)
            fired = self.wait_for(run, lambda: run.records() >= target)
            if fired:
                until = time.time() + delay
                self.wait_for(run, lambda: time.time() >= until)
        if fired:
            if mode != "final_write":  # that one took its snapshot before: no delay inside the window
                run.snapshot(force=True)
            run.popen.kill()  # SIGKILL, unless Popen has already reaped the process (its pid may be reused)
            self.last_kill = time.time()
        run.popen.wait()
        self.seen |= run.seen
        kill.hit = run.popen.returncode == -signal.SIGKILL
        kill.lines_after = run.records()
        kill.phase = self.landed(run) if kill.hit else f"the run had ended with exit {run.popen.returncode}"
        if kill.hit and mode == "power_loss":
            kill.note = self.zero_last_line(run)
        if kill.hit and mode == "final_write":
            kill.note = kill.note + "; " + self.left_temporaries()
        if not kill.hit:
            run.require_success()
        self.current = None
        return kill

    def wait_for_final_write(self, run: JobProcess, kill: Kill) -> bool:
        """Stop the job at a random point of its final write (`final_write_points`), stepping it there."""
        outputs = [o.path for o in self.job.outputs]
        point, index = self.rng.choice(final_write_points(len(outputs)))
        fraction = 0.0  # of the output's bytes: 0 is the temporary file's creation
        if point == "temporary" and self.reference.size(outputs[index]) > io.DEFAULT_BUFFER_SIZE:
            fraction = self.rng.choice([0.0, self.rng.uniform(0, 1)])
        output = outputs[index]
        pattern, threshold = temporary_name_pattern(output), fraction * self.reference.size(output)
        kill.note = (
            f"aimed at {output} in place, before {outputs[index + 1]}"
            if point == "between"
            else f"aimed at {output}'s temporary file " + (f"at {threshold:.0f} bytes" if fraction else "created")
        )
        near_end = max(self.reference.records - MAX_LINE_STEP, 0)
        if not self.wait_for(run, lambda: run.records() >= near_end and self.journal_opened(run)):
            return False
        run.snapshot(force=True)  # now, not in the window: reading /proc takes milliseconds

        def reached() -> bool:
            if point == "temporary":
                temporaries = [p for p in self.run_dir.iterdir() if pattern.fullmatch(p.name)]
                if any(_modified_since(p, run.started_ns) and _size(p) >= threshold for p in temporaries):
                    return True
            return _modified_since(self.run_dir / output, run.started_ns)  # in place (or the window passed)

        return self.step_until(run, reached, fine=lambda: run.records() >= self.reference.records)

    def journal_opened(self, run: JobProcess) -> bool:
        """The process has opened its journal (it touched a file beside it): its start-up is over."""
        journal = run.journal()
        return journal is not None and any(_modified_since(p, run.started_ns) for p in journal.parent.iterdir())

    def kill_worker(self, run: JobProcess, kill: Kill) -> Kill:
        target = run.records() + self.rng.randint(0, MAX_LINE_STEP - 1)
        killed: list[tuple[int, Process]] = []

        def pick() -> bool:
            if run.records() < target:
                return False
            workers = [(n, process(pid)) for n, pid in sorted(run.workers().items())]
            live = [(n, p) for n, p in workers if p is not None and alive(p)]
            if live:
                killed.append(self.rng.choice(live))
            return bool(live)

        if not self.wait_for(run, pick):
            kill.phase = "the run had ended before a worker could be killed"
            run.require_success()
            return kill
        number, worker = killed[0]
        run.snapshot(force=True)
        os.kill(worker.pid, signal.SIGKILL)
        self.last_kill = time.time()
        self.seen.add(worker)
        kill.target, kill.hit = f"Ray worker {number} (pid {worker.pid})", True
        kill.lines_before = kill.lines_after = run.records()
        kill.phase = "scoring" if kill.lines_after < self.reference.records else "the end of scoring"
        kill.note = "the job goes on"
        return kill

    def landed(self, run: JobProcess) -> str:
        """Where the job was when it died, from its files."""
        temporaries = [output for output, path in self.temporaries() if _modified_since(path, run.started_ns)]
        if temporaries:
            return f"final write: {temporaries[0]} being written"
        rewritten = [o.path for o in self.job.outputs if _modified_since(self.run_dir / o.path, run.started_ns)]
        if len(rewritten) == len(self.job.outputs):
            return "after the final write"
        if rewritten:
            return f"final write: after {', '.join(rewritten)}"
        if not self.journal_opened(run):
            return "start-up (journal not opened yet)"
        lines = run.records()
        if lines >= self.reference.records:
            return "between the last journal line and the final write"
        if lines == run.records_at_start:
            return "start-up or the first query (journal open, no new line)"
        return "scoring"

    def temporaries(self) -> list[tuple[str, Path]]:
        return [
            (o.path, path)
            for o in self.job.outputs
            for path in sorted(self.run_dir.iterdir())
            if temporary_name_pattern(o.path).fullmatch(path.name)
        ]

    def left_temporaries(self) -> str:
        left = [f"{path.name} ({path.stat().st_size} bytes)" for _, path in self.temporaries()]
        return f"left {', '.join(left)}" if left else "left no temporary file"

    def zero_last_line(self, run: JobProcess) -> str:
        """Replace the journal's last line by NUL bytes up to the next page: a power loss's tail."""
        journal = run.journal()
        if journal is None:
            return "no journal to damage"
        data = journal.read_bytes()
        cut = data.rstrip(b"\n").rfind(b"\n") + 1  # start of the last complete line (or of a torn tail)
        end = -(-len(data) // PAGE) * PAGE
        journal.write_bytes(data[:cut] + b"\0" * (max(end, cut + 1) - cut))
        kept = max(complete_lines(journal) - 1, 0)
        return f"journal tail of {len(data) - cut} bytes zeroed up to byte {end} (power loss): {kept} records kept"

    # -- the verdict -------------------------------------------------------------------------------

    def compare(self) -> None:
        reference, result = self.reference, self.result
        for output in self.job.outputs:
            path = self.run_dir / output.path
            if not path.is_file():
                result.differences.append(f"{output.path} is missing")
                continue
            value = output.compare(path, self.run_dir)
            if value != reference.values[output.path]:
                result.differences.append(f"{output.path}: {describe_difference(reference.values[output.path], value)}")
        files, outputs = relative_files(self.run_dir), {o.path for o in self.job.outputs}
        result.leftovers += [
            f"{name} (the uninterrupted run has no such file)" for name in sorted(files - reference.files)
        ]
        result.differences += [f"{name} is missing" for name in sorted(reference.files - files - outputs)]

    def strays(self) -> list[str]:
        """Processes of this round's runs still alive after the settle time (killed now, by pid)."""
        seen = self.seen | (self.current.seen if self.current else set())
        deadline = max(self.last_kill + self.settle, time.time() + EXIT_GRACE_SECONDS)
        while (left := [p for p in seen if alive(p)]) and time.time() < deadline:
            time.sleep(0.2)
        for stray in left:
            os.kill(stray.pid, signal.SIGKILL)
        return [f"process {p.pid} ({p.name}) outlived the job" for p in sorted(left, key=lambda p: p.pid)]


def _size(path: Path) -> float:
    """The file's size; infinite once it is gone (renamed into place)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return float("inf")


def _modified_since(path: Path, since_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= since_ns
    except FileNotFoundError:
        return False


def describe_difference(expected: object, found: object) -> str:
    """Where two compared values first differ: a byte offset, or a key path."""
    if isinstance(expected, bytes) and isinstance(found, bytes):
        offset = next((i for i, (a, b) in enumerate(zip(expected, found)) if a != b), min(len(expected), len(found)))
        return f"{len(found)} bytes where the uninterrupted run has {len(expected)}; first difference at byte {offset}"
    return f"differs at {first_key_difference(expected, found) or 'the top level'}"


def first_key_difference(expected: object, found: object, where: str = "") -> str:
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in sorted(set(expected) | set(found), key=str):
            if expected.get(key, KeyError) != found.get(key, KeyError):
                return first_key_difference(expected.get(key), found.get(key), f"{where}.{key}" if where else str(key))
    if isinstance(expected, list) and isinstance(found, list) and len(expected) == len(found):
        for i, (a, b) in enumerate(zip(expected, found)):
            if a != b:
                return first_key_difference(a, b, f"{where}[{i}]")
    return f"{where} ({expected!r:.60} vs {found!r:.60})"
