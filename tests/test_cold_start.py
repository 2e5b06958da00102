"""Cold start (issue 14): the checks of run.py import neither Lightning nor its metrics stack, W&B or
plotting; only a run that samples imports Lightning. Fresh interpreters (subprocesses), since this
test process has imported everything already; assertions are on the modules imported, not on time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgm.tasks.threads import SMALL_MODEL_PARAMETERS, WAIT_POLICY, auto_threads, choose_threads, physical_cores, \
    set_wait_policy

ROOT = Path(__file__).resolve().parents[1]
#: what a config check must not import: Lightning pulls torchmetrics, which pulls transformers,
#: torchvision, matplotlib and scipy (`python -X importtime -c "import lightning"`)
HEAVY = ("lightning", "torchmetrics", "torchvision", "transformers", "matplotlib", "wandb", "open_clip")
ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
       "OMP_NUM_THREADS": "1"}
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.M)


def python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def imported(stderr: str) -> set[str]:
    """The top-level packages ``python -X importtime`` reports."""
    return {name.split(".")[0] for name in IMPORT_LINE.findall(stderr)}


def test_importing_the_sample_task_imports_no_lightning_wandb_metrics_or_plotting():
    res = python("-c", "import json, sys, sgm.tasks.sample; "
                       f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []


def test_a_config_error_stops_before_lightning_is_imported(tmp_path):
    res = python("-X", "importtime", "run.py", "steps=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 1
    assert "steps must be an integer >= 1, got 0" in res.stderr
    modules = imported(res.stderr)
    assert "sgm" in modules and "torch" in modules  # the check ran (it imports the task module)
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))


@pytest.mark.parametrize("args, shows", [(["--help"], "Powered by Hydra"), (["--cfg", "job"], "sampler:")])
def test_help_and_cfg_import_no_torch(args, shows):
    res = python("-X", "importtime", "run.py", *args)
    assert res.returncode == 0 and shows in res.stdout
    modules = imported(res.stderr)
    assert "hydra" in modules
    assert "torch" not in modules and modules.isdisjoint(HEAVY)


VALIDATE = """
import json, sys
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write
from sgm.tasks.common import compose
cfg = compose("sample", sys.argv[2:], hydra=True)
with read_write(cfg.hydra), open_dict(cfg.hydra):
    cfg.hydra.runtime.output_dir = sys.argv[1]
HydraConfig.instance().set_config(cfg)
from sgm.tasks.sample import validate
plan = validate(cfg)
print(json.dumps({"images": len(plan.jobs), "metrics": plan.image_metrics is not None,
                  "heavy": sorted(m for m in %r if m in sys.modules)}))
"""


def test_the_whole_validate_step_of_the_default_run_imports_no_lightning(tmp_path):
    """Sampler, schedule, prompt syntax (conditioners on meta) and the digit metrics (their
    classifier read), all without Lightning."""
    res = python("-c", VALIDATE % (HEAVY,), str(tmp_path), "steps=2")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["images"] == 10 and out["metrics"]
    assert out["heavy"] == []


def test_wait_policy_is_set_unless_the_user_chose_one(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("KMP_BLOCKTIME", "200")
    assert set_wait_policy() == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "200"}
    assert os.environ["OMP_WAIT_POLICY"] == WAIT_POLICY["OMP_WAIT_POLICY"]


def test_run_py_sets_the_wait_policy_before_torch_starts():
    res = python("-c", "import runpy, sys; sys.argv = ['run.py', '--help']; import os\n"
                       "try:\n    runpy.run_path('run.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                       "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    assert res.stdout.strip().splitlines()[-1] == "PASSIVE False"


def test_auto_threads_one_for_a_small_unet_else_the_physical_cores():
    assert auto_threads(SMALL_MODEL_PARAMETERS - 1) == 1
    assert auto_threads(SMALL_MODEL_PARAMETERS) == physical_cores() >= 1
    assert physical_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("cpu_threads, expected", [(None, 1), (2, 2)])
def test_choose_threads_sets_torch(cpu_threads, expected):
    before = torch.get_num_threads()
    try:
        assert choose_threads(cpu_threads, torch.nn.Linear(8, 8)) == expected
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_tokenizing_loads_open_clips_tokenizer_alone_and_matches_the_package():
    """The BPE without open_clip's package (models, timm, and through timm W&B); the same token ids
    as open_clip's own SimpleTokenizer (the oracle, imported afterwards)."""
    code = ("import json, sys\nfrom sgm.conditioning.embedders import bpe_encode\n"
            "ids = bpe_encode('A photo of a Cat, 3!  caf\\u00e9 &amp; more')\n"
            "heavy = sorted(m for m in ('open_clip', 'timm', 'wandb') if m in sys.modules)\n"
            "from open_clip.tokenizer import SimpleTokenizer, basic_clean, whitespace_clean\n"
            "ref = SimpleTokenizer().encode(whitespace_clean(basic_clean('A photo of a Cat, 3!  caf\\u00e9 &amp; more')).lower())\n"
            "print(json.dumps({'ids': ids, 'ref': ref, 'heavy': heavy}))")
    res = python("-c", code)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["ids"] == out["ref"] and len(out["ids"]) > 8
