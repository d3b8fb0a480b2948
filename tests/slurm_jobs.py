"""Submitting and watching jobs on the local Slurm clusters of scripts/slurm-local.sh (one node,
or emulated nodes): shared by tests/test_slurm_cluster.py and tests/test_multinode.py."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import steps_logged, venv_env

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
"""Job states after which a job does not run again by itself."""


def submit(recipe, *flags) -> str:
    """``tsmtrain submit RECIPE FLAGS``; the job id."""
    done = subprocess.run([sys.executable, "-m", "tsmtrain", "submit", str(recipe), *flags],
                          capture_output=True, text=True, env=venv_env())
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted job (\d+)", done.stdout).group(1)


def job_state(job_id: str) -> str | None:
    """The job's state as ``scontrol`` reports it; ``None`` once Slurm has forgotten the job."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else None


def wait_for(job_id: str, log: Path, timeout: float = 600, until=ENDED) -> str:
    """Wait until the job is in one of ``until`` (by default: ended for good, not requeued);
    returns its state ("GONE" once forgotten). Past ``timeout`` seconds the job is cancelled and
    the test fails with its log.

    A requeued job starts again only once its credential has expired (slurm.conf's
    AuthInfo cred_expire; slurm-local.sh sets it short). Forcing an earlier start makes Slurm
    kill the job ("Job credential revoked")."""
    deadline, state = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state is None or state in until:
            return state or "GONE"
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} still {state} after {timeout} s; log:\n{log.read_text() if log.exists() else ''}")


def wait_for_steps(run_dir: Path, log: Path, steps: int, timeout: float = 300) -> None:
    """Wait until the run has logged ``steps`` optimizer steps; fail with the job's log if not."""
    deadline = time.monotonic() + timeout
    while steps_logged(run_dir) < steps and time.monotonic() < deadline:
        time.sleep(0.2)
    assert steps_logged(run_dir) >= steps, log.read_text() if log.exists() else "no log"


def usr2_requeue_and_finish(job: str, run_dir: Path, after_steps: int = 3) -> str:
    """``scancel --signal=USR2`` the job once it has logged ``after_steps`` steps, wait until it
    has requeued itself and finished, check that it did, and return its log."""
    log = run_dir / f"slurm-{job}.out"
    wait_for_steps(run_dir, log, after_steps)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = wait_for(job, log)
    text = log.read_text()
    assert state in ("COMPLETED", "GONE"), f"job {job} ended {state}; log:\n{text}"
    assert "requeueing job" in text and "resuming from" in text, text
    return text
