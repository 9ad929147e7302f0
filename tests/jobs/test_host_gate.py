"""Latency jobs run alone on the host: the gate's locks, and the runner honouring them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service.errors import JobCancelled
from service.jobs.host_gate import HostGate
from service.jobs.records import JobRecord, JobStore
from service.jobs.runner import JobContext, JobRunner
from service.store.db import Database


def _wait_final(store: JobStore, job_id: str, timeout: float = 20) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = store.get(job_id)
        if not record.active:
            return record
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not finish: {store.get(job_id)}")


def test_an_exclusive_holder_waits_for_shared_holders_and_then_excludes_them(tmp_path: Path) -> None:
    gate = HostGate(tmp_path)
    events: list[str] = []
    shared_in, exclusive_in = threading.Event(), threading.Event()

    def exclusive() -> None:
        shared_in.wait()
        with gate.exclusive() as waited:
            events.append(f"exclusive in after {waited:.2f}")
            exclusive_in.set()
            time.sleep(0.2)
            events.append("exclusive out")

    thread = threading.Thread(target=exclusive)
    thread.start()
    with gate.shared():
        shared_in.set()
        time.sleep(0.3)
        assert not exclusive_in.is_set()  # still waiting for this shared holder
        events.append("shared out")
    exclusive_in.wait(5)
    with gate.shared() as waited:  # waits until the exclusive holder is done
        events.append("second shared in")
    thread.join()
    assert events[0] == "shared out" and events[1].startswith("exclusive in")
    assert events[2:] == ["exclusive out", "second shared in"] and waited > 0.05


def test_a_waiting_exclusive_holder_is_not_starved_by_new_shared_holders(tmp_path: Path) -> None:
    gate = HostGate(tmp_path)
    first = gate.shared()
    first.__enter__()
    got_in: list[str] = []
    exclusive = threading.Thread(target=lambda: got_in.append("exclusive") or _hold(gate.exclusive()))
    exclusive.start()
    time.sleep(0.2)  # the exclusive holder now waits at the run lock, holding the turnstile
    late = threading.Thread(target=lambda: _hold(gate.shared(), got_in, "late shared"))
    late.start()
    time.sleep(0.2)
    assert "late shared" not in got_in  # blocked at the turnstile behind the waiting exclusive holder
    first.__exit__(None, None, None)
    exclusive.join(5)
    late.join(5)
    assert got_in == ["exclusive", "late shared"]


def _hold(manager: Any, log: list[str] | None = None, name: str = "") -> None:
    with manager:
        if log is not None:
            log.append(name)
        time.sleep(0.05)


def test_the_gate_holds_across_processes(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from service.jobs.host_gate import HostGate\n"
            f"with HostGate(Path({str(tmp_path)!r})).shared():\n"
            "    print('in', flush=True); time.sleep(0.6)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "in"
    with HostGate(tmp_path).exclusive() as waited:
        pass
    assert waited > 0.3  # the other process held it for 0.6 s after saying so
    holder.wait(5)


def test_a_wait_callback_can_abandon_the_wait(tmp_path: Path) -> None:
    gate = HostGate(tmp_path)
    with gate.shared():

        def give_up(seconds: float) -> None:
            if seconds > 0.1:
                raise JobCancelled("cancelled while waiting")

        with pytest.raises(JobCancelled), gate.exclusive(give_up):
            pass
    with gate.exclusive():  # nothing left locked by the abandoned wait
        pass


def test_the_runner_never_overlaps_an_exclusive_job_with_another_job(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path / "jobs.db"))
    spans: dict[str, tuple[float, float]] = {}

    def work(ctx: JobContext) -> dict[str, Any]:
        began = time.monotonic()
        time.sleep(0.3)
        spans[ctx.job_id] = (began, time.monotonic())
        return {"exclusive": ctx.exclusive, "others": store.running_elsewhere(ctx.job_id)}

    runner = JobRunner(store, workers=3, gate=HostGate(tmp_path / "gate"))
    runner.register("evaluate", work)
    runner.register("benchmark", work, exclusive=True)
    runner.start()
    first = runner.submit("evaluate", {})[0]
    time.sleep(0.05)
    bench = runner.submit("benchmark", {})[0]
    time.sleep(0.05)
    late = runner.submit("evaluate", {})[0]
    finals = {job.id: _wait_final(store, job.id) for job in (first, bench, late)}
    runner.stop(1)
    assert all(f.status == "succeeded" for f in finals.values())
    b0, b1 = spans[bench.id]
    for other in (first.id, late.id):
        o0, o1 = spans[other]
        assert o1 <= b0 or b1 <= o0, "an ordinary job ran during the exclusive one"
    assert spans[first.id][1] <= b0 <= spans[late.id][0]  # first drains, late waits
    assert finals[bench.id].result == {"exclusive": True, "others": []}
    assert any("measured alone" in line for line in finals[bench.id].log_tail())
    assert any("waiting until it ends" in line for line in finals[late.id].log_tail())
