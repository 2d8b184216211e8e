"""Run a training command in 2 processes with torchrun (accelerate launch --cpu starts only one here,
REFERENCE §4); the same code runs under `accelerate launch` on GPUs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from training.config import to_toml

ROOT = Path(__file__).resolve().parents[1]
HAVE_TORCHRUN = shutil.which("torchrun") is not None


def torchrun(command: str, config, tmp_path: Path, processes: int = 2) -> None:
    """`torchrun --nproc_per_node N -m training <command> --config <config as TOML>`; fails with its stderr."""
    path = tmp_path / f"{command}.toml"
    path.write_text(to_toml(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([shutil.which("torchrun"), "--nproc_per_node", str(processes), "--master_port", str(port),
                           "-m", "training", command, "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
