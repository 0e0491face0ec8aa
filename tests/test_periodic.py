"""kme.domain.periodic: each job at its own cadence, one forced early when asked."""
import pytest

from kme.domain import periodic

pytestmark = pytest.mark.engine_independent


def _jobs(ran: list, *cadences: float) -> tuple[periodic.Job, ...]:
    return tuple(periodic.Job(f"job{number}", lambda _config, number=number: ran.append(number),
                              lambda _config, seconds=seconds: seconds) for number, seconds in enumerate(cadences))


def test_every_job_runs_first_then_each_when_its_own_time_comes(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(periodic.time, "monotonic", lambda: now[0])
    ran: list = []
    schedule = periodic.Schedule(_jobs(ran, 1.0, 5.0))

    schedule.run_due(None)
    now[0] += 1.5
    schedule.run_due(None)
    now[0] += 4.0
    schedule.run_due(None)

    assert ran == [0, 1, 0, 0, 1]


def test_a_job_asked_for_now_runs_before_its_time_and_the_others_wait(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(periodic.time, "monotonic", lambda: now[0])
    ran: list = []
    jobs = _jobs(ran, 10.0, 10.0)
    schedule = periodic.Schedule(jobs)
    schedule.run_due(None)

    schedule.run_due(None, now_too=(jobs[1],))

    assert ran == [0, 1, 1]


def test_a_job_that_fails_stops_the_round_for_the_retry(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(periodic.time, "monotonic", lambda: now[0])
    ran: list = []
    failing = periodic.Job("failing", lambda _config: 1 / 0, lambda _config: 1.0)
    schedule = periodic.Schedule((failing, *_jobs(ran, 1.0)))

    with pytest.raises(ZeroDivisionError):
        schedule.run_due(None)

    assert ran == []


def test_jobs_that_move_no_key_are_paced_apart_from_the_housekeeping_that_does():
    class Config:
        class this_kme:
            housekeeping_interval_seconds = 0.2

    cadences = {job.name: job.seconds(Config) for job in periodic.PEER_JOBS + periodic.DATABASE_JOBS}
    assert cadences["peer probes"] == cadences["expiry"] == periodic.SLOW_SECONDS
    assert cadences["link sharing"] == cadences["settling"] == cadences["relays whose worker died"] == 0.2
