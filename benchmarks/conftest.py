"""What the pytest-benchmark results files (benchmarks/results/*.json) record: the command and the
settings that shape the numbers (threads, load, build), and no host name or absolute path."""
import os
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_LOAD_AT_START = os.getloadavg()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.pop("node", None)  # the host name


def pytest_benchmark_update_commit_info(config, commit_info):
    commit_info.pop("project", None)  # the checkout's folder name


def _relative(value):
    """Strings with the checkout's or the home folder's absolute path, made relative."""
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v) for v in value]
    if isinstance(value, str):
        return value.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".").replace(
            str(Path.home()), "~")
    return value


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from rome_fast import backend_info

    info = backend_info()
    output_json["command"] = " ".join(
        ["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)"),
         "python -m pytest"] + [shlex.quote(a) for a in config.invocation_params.args])
    output_json["settings"] = {
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min_at_start": [round(x, 2) for x in _LOAD_AT_START],
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "compiled_core": {"cpu": info["cpu_ext"], "cuda": info["cuda_ext"]},
    }
    output_json.update(_relative({k: output_json[k] for k in output_json}))
