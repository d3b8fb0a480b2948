"""Measure what a lost node does to a 2-node job on the emulated cluster (docs/cluster.md, "When a
node is lost"): for each fault on node2, the seconds from the fault to the job leaving the running
state, when no rank is left on either node, the lines the job's log says, and whether the next
start resumes exactly (final weights bitwise equal to those of an uninterrupted run).

    sudo scripts/slurm-local.sh start --nodes 2
    python scripts/fault_table.py --engine ddp --faults link-down,kill-ranks --out /tmp/faults
    python scripts/fault_table.py --engine horovod --faults kill-slurmd --epochs 30 --out /tmp/faults

Faults: ``link-down`` (``slurm-local.sh link node2 down``), ``kill-ranks`` (SIGKILL to node2's rank
and its loader worker), ``kill-slurmd`` (SIGKILL to node2's slurmd; use enough ``--epochs`` that
the run outlives Slurm's SlurmdTimeout). The recipe is the test suite's tiny one (TSM-ResNet18 at
32x32 on 24 rendered clips, 6 steps and one checkpoint per epoch). Prints one JSON line per fault.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "scripts" / "slurm-local.sh"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "GONE")


def sh(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check)


def write_recipe(out: Path, data: Path, name: str, engine: str, epochs: int) -> Path:
    doc = {"data": {"root": str(data), "train_list": str(data / "train.txt"), "val_list": str(data / "val.txt"),
                    "num_segments": 4, "input_size": 32, "short_side": 32, "flip": False, "workers": 1},
           "model": {"arch": "resnet18", "num_classes": 4, "dropout": 0.3},
           "optim": {"name": "sgd", "base_lr": 0.05, "base_batch": 4},
           "schedule": {"epochs": epochs, "warmup_epochs": 1},
           "dist": {"engine": engine},
           "train": {"batch_size": 2, "log_every": 1, "threads": 1, "seed": 5},
           "run": {"name": name, "dir": str(out / "runs")},
           "cluster": {"nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "time": "20:00"}}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def submit(recipe: Path) -> str:
    out = sh(sys.executable, "-m", "tsmtrain", "submit", recipe).stdout
    return re.search(r"submitted job (\d+)", out).group(1)


def job_state(job: str) -> str:
    match = re.search(r"JobState=(\S+)", sh("scontrol", "show", "job", "-o", job, check=False).stdout)
    return match.group(1) if match else "GONE"


def wait_state(job: str, states, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if state in states:
            return state
        time.sleep(0.25)
    return job_state(job)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max([json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line] or [0])


def node_processes(node: str) -> list[str]:
    """Processes on ``node`` that are not Slurm's own: ranks and loader workers."""
    left = []
    for pid in sh("bash", SLURM_LOCAL, "pids", node, check=False).stdout.split():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm not in ("slurmd", "slurmstepd", "bash", "sleep", "srun"):
            left.append(f"{node}:{comm}:{pid}")
    return left


def inject(fault: str) -> None:
    if fault == "link-down":
        sh("bash", SLURM_LOCAL, "link", "node2", "down")
    elif fault == "kill-ranks":
        for entry in node_processes("node2"):
            sh("kill", "-KILL", entry.rsplit(":", 1)[1], check=False)
    elif fault == "kill-slurmd":
        sh("kill", "-KILL", Path("/run/slurmd-node2.pid").read_text().strip())


def run_fault(fault: str, engine: str, epochs: int, out: Path, data: Path, reference: dict) -> dict:
    name = f"{fault}-{engine}-{epochs}"
    sh("rm", "-rf", out / "runs" / name)
    job = submit(write_recipe(out, data, name, engine, epochs))
    run_dir = out / "runs" / name
    while steps_logged(run_dir) < 9:  # past the first epoch's checkpoint (step 6)
        time.sleep(0.1)
    t0 = time.monotonic()
    inject(fault)
    state = wait_state(job, ENDED + ("PENDING", "COMPLETING", "NODE_FAIL", "REQUEUED"), timeout=300)
    to_end = time.monotonic() - t0
    to_no_rank = None
    while time.monotonic() - t0 < 120:
        if not node_processes("node1") + node_processes("node2"):
            to_no_rank = time.monotonic() - t0
            break
        time.sleep(0.25)
    left = node_processes("node1") + node_processes("node2")
    if fault == "link-down":
        sh("bash", SLURM_LOCAL, "link", "node2", "up")
    sh("scancel", job, check=False)
    wait_state(job, ENDED, timeout=120)
    sh("bash", SLURM_LOCAL, "start", "--nodes", "2")  # a killed slurmd comes back
    text = (run_dir / f"slurm-{job}.out").read_text()
    lines = [line for line in text.splitlines() if re.search(r"lost|srun: error|failed with", line)]
    job2 = submit(run_dir / "recipe.yaml")  # the next start
    wait_state(job2, ENDED)
    resumed = re.search(r"resuming from (\S+)", (run_dir / f"slurm-{job2}.out").read_text())
    final = load_checkpoint(latest_checkpoint(run_dir))
    exact = final["step"] == reference["step"] and all(torch.equal(v, final["model"][k])
                                                       for k, v in reference["model"].items())
    return dict(fault=fault, engine=engine, job=job, state=state, seconds_to_end=round(to_end, 1),
                seconds_to_no_rank=None if to_no_rank is None else round(to_no_rank, 1), left=left, lines=lines,
                resumed_from=resumed.group(1) if resumed else None, final_step=final["step"], exact=exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("ddp", "horovod"), required=True)
    parser.add_argument("--faults", default="link-down,kill-ranks,kill-slurmd")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    faults = args.faults.split(",")
    unknown = set(faults) - {"link-down", "kill-ranks", "kill-slurmd"}
    if unknown:
        parser.error(f"--faults: unknown {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "tiny"
    if not (data / "train.txt").exists():
        from tsmtrain.prep.synthetic import generate_demo_dataset

        generate_demo_dataset(data, num_classes=4, train_per_class=6, val_per_class=2, frames=8, size=32)
    ref_name = f"ref-{args.engine}-{args.epochs}"
    ref_dir = args.out / "runs" / ref_name
    if not (ref_dir / f"checkpoint-{6 * args.epochs:08d}.pt").exists():
        wait_state(submit(write_recipe(args.out, data, ref_name, args.engine, args.epochs)), ENDED)
    reference = load_checkpoint(latest_checkpoint(ref_dir))
    for fault in faults:
        print(json.dumps(run_fault(fault, args.engine, args.epochs, args.out, data, reference)), flush=True)


if __name__ == "__main__":
    main()
