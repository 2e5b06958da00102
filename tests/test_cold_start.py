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


@pytest.mark.parametrize("override, message", [
    ("steps=0", "steps must be an integer >= 1, got 0"),
    ("H=33", "H and W must be positive multiples of 8 for this model"),
    ("strength=0.5", "strength=0.5 needs init_image=PATH"),
])
def test_a_mistyped_number_stops_before_torch_is_imported(tmp_path, override, message):
    """run.py checks the run's numbers (sgm.tasks.sample_numbers) before it imports the sample task."""
    res = python("-X", "importtime", "run.py", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 1 and message in res.stderr
    modules = imported(res.stderr)
    assert "sgm" in modules and "hydra" in modules
    assert "torch" not in modules and modules.isdisjoint(HEAVY), sorted(modules & {"torch", *HEAVY})


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_a_config_error_of_the_sampler_stops_before_lightning_is_imported(tmp_path):
    res = python("-X", "importtime", "run.py", "guider.scale=abc", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 1 and "scale must be a real number" in res.stderr
    modules = imported(res.stderr)
    assert "torch" in modules  # the check ran in the task module (it builds the sampler and guider)
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
@pytest.mark.parametrize("args, shows", [(["--help"], "Powered by Hydra"), (["--cfg", "job"], "sampler:")])
def test_help_and_cfg_import_no_torch(args, shows):
    res = python("-X", "importtime", "run.py", *args)
    assert res.returncode == 0 and shows in res.stdout
    modules = imported(res.stderr)
    assert "hydra" in modules
    assert "torch" not in modules and modules.isdisjoint(HEAVY)


# one fresh interpreter for three stages: importing the sample task, tokenizing with the digit model's
# CLIP BPE (open_clip's tokenizer module alone: not its package, timm, or through timm W&B), and the
# whole validate step of the default run
VALIDATE = """
import json, sys
heavy = lambda: sorted(m for m in %r + ("timm",) if m in sys.modules)
import sgm.tasks.sample
after_import = heavy()
from sgm.conditioning.embedders import bpe_encode
ids = bpe_encode(sys.argv[2])
after_tokenizing = heavy()
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write
from sgm.tasks.common import compose
cfg = compose("sample", sys.argv[3:], hydra=True)
with read_write(cfg.hydra), open_dict(cfg.hydra):
    cfg.hydra.runtime.output_dir = sys.argv[1]
HydraConfig.instance().set_config(cfg)
from sgm.tasks.sample import validate
plan = validate(cfg)
print(json.dumps({"images": len(plan.jobs), "metrics": plan.image_metrics is not None, "ids": ids,
                  "heavy": {"import": after_import, "tokenize": after_tokenizing, "validate": heavy()}}))
"""
TEXT = "A photo of a Cat, 3!  caf\u00e9 &amp; more"


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict:
    res = python("-c", VALIDATE % (HEAVY,), str(tmp_path_factory.mktemp("validate")), TEXT, "steps=2")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_importing_the_sample_task_imports_no_lightning_wandb_metrics_or_plotting(stages):
    assert stages["heavy"]["import"] == []


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_the_whole_validate_step_of_the_default_run_imports_no_lightning(stages):
    """Sampler, schedule, prompt syntax (conditioners on meta) and the digit metrics (their
    classifier read), all without Lightning."""
    assert stages["images"] == 10 and stages["metrics"]
    assert stages["heavy"]["validate"] == []


def test_wait_policy_is_set_unless_the_user_chose_one(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("KMP_BLOCKTIME", "200")
    assert set_wait_policy() == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "200"}
    assert os.environ["OMP_WAIT_POLICY"] == WAIT_POLICY["OMP_WAIT_POLICY"]


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
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


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_tokenizing_loads_open_clips_tokenizer_alone_and_matches_the_package(stages):
    """The BPE without open_clip's package (models, timm, and through timm W&B), in the fresh
    interpreter; the same token ids as open_clip's own SimpleTokenizer (the oracle, here)."""
    from open_clip.tokenizer import SimpleTokenizer, basic_clean, whitespace_clean

    assert stages["heavy"]["tokenize"] == []
    ref = SimpleTokenizer().encode(whitespace_clean(basic_clean(TEXT)).lower())
    assert stages["ids"] == ref and len(ref) > 8


@pytest.mark.parametrize("package", ["sgm.diffusion", "sgm.networks"])
def test_lazy_package_names_resolve_to_their_modules(package):
    """Every public name of the lazily loaded packages (sgm._lazy) is found where the table says,
    and submodules are reached as attributes, as with an eager ``__init__``."""
    import importlib

    pkg = importlib.import_module(package)
    for module, names in pkg._MODULES.items():
        for name in names:
            assert getattr(pkg, name) is getattr(importlib.import_module(module, package), name)
    assert set(pkg.__all__) <= set(dir(pkg))
    assert pkg.schedule if package == "sgm.diffusion" else pkg.sizes
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        pkg.no_such_name  # noqa: B018


@pytest.mark.slow  # a fresh interpreter that samples: about 8 s
def test_a_run_without_logger_imports_no_wandb(tmp_path):
    """The shipped model's OpenCLIP text tower needs open_clip, which imports timm, which would import
    W&B (sgm.conditioning.open_clip.import_open_clip hides it); W&B stays importable afterwards."""
    res = python("-c", "import runpy, sys\n"
                       f"sys.argv = ['run.py', '~logger', '~metrics', 'progress=false', 'steps=1', 'prompts=[a digit 1]', "
                       f"'hydra.run.dir={tmp_path / 'run'}']\n"
                       "try:\n    runpy.run_path('run.py', run_name='__main__')\nexcept SystemExit as exc:\n"
                       "    assert not exc.code, exc.code\n"
                       "found = sorted(m for m in ('wandb', 'lightning', 'open_clip', 'timm') if m in sys.modules)\n"
                       "import wandb\nprint(found, hasattr(wandb, 'init'))")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "['lightning', 'open_clip', 'timm'] True"
    assert list((tmp_path / "run").glob("*.png"))


CYCLE = """
import sys
if sys.argv[1] == "skip":
    from sgm.tasks.shutdown import skip_collection_at_exit
    skip_collection_at_exit()
class Node:
    def __del__(self):
        print("collected", flush=True)
node = Node()
node.self = node  # a reference cycle: only the cyclic collector frees it
del node
"""


@pytest.mark.parametrize("mode, collected", [("default", True), ("skip", False)])
def test_the_exit_handler_skips_the_collection_at_exit(mode, collected):
    """What sgm.tasks.shutdown changes: the collector's passes at interpreter exit (about 1 s with
    torch and Lightning loaded); without it, the exit collects the cycle."""
    res = python("-c", CYCLE, mode)
    assert res.returncode == 0, res.stderr
    assert ("collected" in res.stdout) is collected


@pytest.mark.parametrize("script", ["run.py", "train.py", "eval.py"])
def test_entry_scripts_register_the_quick_exit(script):
    import ast

    tree = ast.parse((ROOT / script).read_text())
    calls = [n.value.func.id for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and isinstance(n.value.func, ast.Name)]
    assert "skip_collection_at_exit" in calls
