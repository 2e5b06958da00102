"""Every config file composes and instantiates; the CLI reaches the objects; sgm YAML imports.

Composition goes through conftest's ``compose``, runs through ``run_task`` (in-process); the
tests named ``test_cli_*`` and the sweeps launch run.py itself, as a user would.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sgm.config import SGM_ALIASES, convert_sgm_config, load_sgm_yaml, resolve_target
from sgm.diffusion import (DiscreteDenoiser, DiscreteSampling, EpsScaling, EpsWeighting, EulerEDMSampler,
                           LegacyDDPMDiscretization, StandardDiffusionLoss, VanillaCFG)
from sgm.diffusion.guiders import NoDynamicThresholding
from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA = Path(__file__).parent / "data"


SAME_AS_HYDRA = [  # (config, overrides): every kind the tests use, defaults-list and value overrides mixed
    ("sample", ["discretization.rho=5", "discretization=edm", "seed=abc", "strength=nan", "prompt='a café (2)'",
                "~logger", "~weights.dtype", "++seed=3"]),
    ("sample", ["model=tiny", "steps=3", "weights.checkpoint=null", "lora.files=['/a b.safetensors',/c.pt]",
                "lora.strengths=[0.5,1]", "+extra.key=1", "hydra.run.dir=/tmp/x"]),
    ("sample", ["patches=[freeu]", "patches.freeu.b1=1.1", "+denoiser=edm", "hydra/launcher=slurm",
                "guider=cfg_rescale"]),
    ("train", ["~lora", "data.root=/x", "trainer.max_steps=30", "validation.prompts=[a red cube]", "resume=/r/l.ckpt"]),
]


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_cached_compose_is_hydras_compose(compose):
    """conftest's compose (a cached composition plus the value overrides applied as Hydra applies
    them) gives what Hydra's own compose gives, hydra node included, and fails alike."""
    from hydra.errors import ConfigCompositionException

    from sgm.tasks.common import compose as hydra_compose

    for k, (config_name, overrides) in enumerate(SAME_AS_HYDRA):
        for hydra in (True, False) if k == 0 else (True,):  # the hydra node holds what Hydra records of them
            want = OmegaConf.to_yaml(hydra_compose(config_name, overrides, hydra=hydra))
            assert OmegaConf.to_yaml(compose(config_name, overrides, hydra=hydra)) == want, (overrides, hydra)
    for bad in (["no_such_key=1"], ["model=tiny", "+seed=2"], ["~weights.nothing"]):
        with pytest.raises(ConfigCompositionException) as want:
            hydra_compose("sample", bad)
        with pytest.raises(ConfigCompositionException) as got:
            compose("sample", bad)
        assert str(got.value) == str(want.value)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_have_the_promised_files():
    assert {"edm", "ddpm"} <= set(_options("discretization"))
    assert {"identity", "cfg", "cfg_rescale", "cfg_interval"} <= set(_options("guider"))
    assert set(_options("sampler")) == {"euler", "heun", "euler_a", "dpmpp_2s_a", "dpmpp_2m", "dpmpp_2m_sde", "lms",
                                        "ddpm", "ddim", "lcm", "tcd",
                                        "uni_pc", "uni_pc_bh2", "deis", "ipndm", "ipndm_v", "res_multistep",
                                        "restart", "er_sde", "heunpp2", "euler_cfg_pp", "euler_a_cfg_pp", "dpmpp_2m_cfg_pp",
                                        "dpm_2", "dpm_2_a", "dpm_fast", "dpm_adaptive", "dpmpp_sde", "dpmpp_3m_sde"}
    assert _options("denoiser")


@pytest.mark.parametrize("group", [pytest.param("denoiser", marks=pytest.mark.slow), "sigma_sampler",
                                   pytest.param("loss_weighting", marks=pytest.mark.slow), "loss"])  # slow: 2 s or more
def test_every_training_option_composes_and_instantiates(compose, group):
    for name in _options(group):
        cfg = compose("sample", [f"+{group}={name}"])
        obj = instantiate(cfg[group])
        assert type(obj).__module__.startswith("sgm."), (group, name, obj)


def test_sgm_compose_gives_the_runs_config(compose):
    from sgm.tasks.common import CONF_DIR
    from sgm.tasks.common import compose as sgm_compose

    assert CONF_DIR == CONF
    cfg = sgm_compose("sample", ["model=tiny", "steps=3"])
    assert cfg == compose("sample", ["model=tiny", "steps=3"])
    assert cfg.steps == 3 and cfg.weights.random
    assert Path(sgm_compose("sample").weights.checkpoint).is_file()  # ${sgm.asset:NAME} resolves
    assert "lora" in sgm_compose("train", ["model=tiny"])


def test_edm_defaults_to_the_models_trained_range(compose):
    disc = instantiate(compose("sample", ["discretization=edm"]).discretization)
    assert (disc.sigma_min, disc.sigma_max, disc.rho) == (0.0292, 14.6146, 3.0)


def test_overrides_reach_the_sampler_and_the_schedule(compose):
    from sgm.diffusion.schedule import sampling_sigmas

    cfg = compose("sample", ["sampler=heun", "discretization=edm", "discretization.rho=5", "guider.scale=-2.5",
                             "steps=7"])
    sampler, disc = instantiate(cfg.sampler), instantiate(cfg.discretization)
    assert type(sampler).__name__ == "HeunEDMSampler" and sampler.guider.scale == -2.5
    assert disc.rho == 5 and len(sampling_sigmas(disc, cfg.steps)) == 8


def _run(*args, cwd=ROOT, timeout=120):
    """``python run.py ARGS`` as a new process (the CLI itself: --cfg, errors, multirun)."""
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_cli_cfg_job_shows_rho_reaching_the_schedule():
    res = _run("sampler=euler", "discretization=edm", "discretization.rho=3", "--cfg", "job", "--resolve")
    assert res.returncode == 0, res.stderr
    job = yaml.safe_load(res.stdout)
    assert job["sampler"]["_target_"].endswith("EulerEDMSampler") and "discretization" not in job["sampler"]
    assert job["discretization"]["rho"] == 3 and job["discretization"]["sigma_min"] == 0.0292
    raw = yaml.safe_load(_run("discretization.rho=3", "--cfg", "job").stdout)
    assert raw["discretization"]["sigma_max"] == "${oc.select:model.denoiser.sigma_max,null}"


def test_cli_unknown_sampler_lists_the_choices():
    res = _run("sampler=ddim_fast")
    assert res.returncode != 0
    assert "sampler/ddim_fast" in res.stderr and "Available options" in res.stderr
    for name in _options("sampler"):
        assert name in res.stderr


@pytest.mark.parametrize(
    "override, group, name",
    [("discretization.rho=0", "discretization", "rho"), ("discretization.sigma_min=20", "discretization", "sigma_min"),
     ("guider.scale=nan", "sampler", "scale")],
)
def test_bad_values_fail_at_construction_naming_the_parameter(compose, override, group, name):
    cfg = compose("sample", [override])
    with pytest.raises(InstantiationException, match=name):
        instantiate(cfg[group])


def test_bad_value_fails_before_writing_anything(run_task, tmp_path):
    with pytest.raises(ValueError, match="steps must be an integer"):
        run_task("sample", ["steps=0"], tmp_path / "run")
    assert not list((tmp_path / "run").glob("*.png"))


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_run_writes_images_grid_and_metrics(run_task, tmp_path):
    """The shipped default (model=digits, metrics=digits): ten digits, judged in metrics.json."""
    out = tmp_path / "run"
    run_task("sample", ["progress=false", "steps=8", "sampler=dpmpp_2m"], out)
    assert len(list(out.glob("0*.png"))) == 10 and (out / "grid.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 10 and metrics["network_evaluations_per_batch"] == 8  # one (uc + c) call per step
    assert metrics["labelled_images"] == 10 and metrics["accuracy"] >= 0.8 and metrics["frechet_distance"] > 0
    from PIL import Image

    meta = Image.open(out / "00003.png").text
    assert meta["prompt"] == "a handwritten digit three" and meta["seed"] == "45"
    assert "EulerEDMSampler" not in meta["config"]


@pytest.mark.slow
def test_multirun_sweeps_the_guidance_scale(tmp_path):
    """``python run.py -m guider.scale=1,3,5``: the script's own ``__main__`` in this process (conftest.run_script)."""
    code = run_script("run.py", ["-m", "guider.scale=1,3,5", "progress=false", "steps=4",
                                 f"hydra.sweep.dir={tmp_path}/sweep"])
    assert code == 0
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 3
    scales = [yaml.safe_load((r.parent / ".hydra" / "config.yaml").read_text())["guider"]["scale"] for r in runs]
    assert scales == [1, 3, 5]
    # the sweep summarizes itself: one row per value, a plot per metric, a grid per value
    import csv

    with open(tmp_path / "sweep" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["guider.scale"] for r in rows] == ["1", "3", "5"] and all(float(r["seconds_per_image"]) > 0 for r in rows)
    assert (tmp_path / "sweep" / "summary.md").is_file()
    assert (tmp_path / "sweep" / "summary_seconds_per_image.png").is_file()
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["frechet_distance"]) > 0 for r in rows)
    for metric in ("accuracy", "frechet_distance"):  # a metric constant over the sweep gets no plot
        assert (tmp_path / "sweep" / f"summary_{metric}.png").is_file() == (len({r[metric] for r in rows}) > 1)
    # one W&B run per job, grouped by the sweep, each with the job's metrics
    from test_run import wandb_records

    runs = [wandb_records(r.parent) for r in sorted((tmp_path / "sweep").glob("*/metrics.json"))]
    assert len({rec["run"][0].run.run_id for rec in runs}) == 3
    assert {rec["run"][0].run.run_group for rec in runs} == {"sweep"}
    recorded = [yaml.safe_load((r.parent / ".hydra" / "overrides.yaml").read_text())
                for r in sorted((tmp_path / "sweep").glob("*/metrics.json"))]
    names = [rec["run"][0].run.display_name for rec in runs]  # each named by its job's overrides, as Hydra records them
    assert names == [",".join(sorted(o)) for o in recorded]
    assert [n.split(",")[0] for n in names] == [f"guider.scale={s}" for s in (1, 3, 5)] and "steps=4" in names[0]
    for rec in runs:
        keys = {item.key or "/".join(item.nested_key) for h in rec.get("history", []) for item in h.history.item}
        assert {"accuracy", "frechet_distance"} <= keys, keys
    assert sorted(p.name for p in (tmp_path / "sweep").glob("grid_*.png")) == [
        "grid_guider.scale=1.png", "grid_guider.scale=3.png", "grid_guider.scale=5.png"]


# --- original sgm YAML ---------------------------------------------------------------------
def test_sgm_yaml_builds_the_same_objects():
    sampler = load_sgm_yaml(DATA / "sgm_sampling.yaml", key="sampler_config")
    assert isinstance(sampler, EulerEDMSampler) and sampler.num_steps == 40
    assert isinstance(sampler.discretization, LegacyDDPMDiscretization)
    assert isinstance(sampler.guider, VanillaCFG) and isinstance(sampler.guider.dyn_thresh, NoDynamicThresholding)
    den = load_sgm_yaml(DATA / "sgm_sampling.yaml", key="denoiser_config")
    assert isinstance(den, DiscreteDenoiser) and isinstance(den.scaling, EpsScaling)
    loss = load_sgm_yaml(DATA / "sgm_sampling.yaml", key="loss_fn_config")
    assert isinstance(loss, StandardDiffusionLoss) and isinstance(loss.loss_weighting, EpsWeighting)
    assert isinstance(loss.sigma_sampler, DiscreteSampling) and loss.offset_noise_level == 0.05
    # and it samples like our own config of the same parts
    ours = EulerEDMSampler(LegacyDDPMDiscretization(), 40, VanillaCFG(5.0))
    x = torch.randn(2, 3)
    den_fn = lambda x, s, c: x / (1 + s[:, None] ** 2)  # noqa: E731
    torch.testing.assert_close(sampler(den_fn, x, {}, {}), ours(den_fn, x, {}, {}))


def test_every_alias_resolves():
    for old in list(SGM_ALIASES):
        assert callable(resolve_target(old)), old


def test_unknown_sgm_target_is_named():
    node = {"target": "sgm.modules.diffusionmodules.sampling.DDIMSampler", "params": {"num_steps": 3}}
    with pytest.raises(ValueError, match="sgm.modules.diffusionmodules.sampling.DDIMSampler"):
        convert_sgm_config({"sampler_config": node})


@pytest.mark.slow
def test_parallel_launcher_runs_a_summarized_sweep(tmp_path, capfd):
    """``python run.py -m hydra/launcher=parallel ...``: the script's own ``__main__`` in this process
    (conftest.run_script); the joblib launcher runs the jobs in its own worker processes."""
    from joblib.externals.loky import get_reusable_executor

    try:
        code = run_script("run.py", ["-m", "hydra/launcher=parallel", "guider.scale=0,3", "steps=3", "progress=false",
                                     "cpu_threads=1", "~logger", f"hydra.sweep.dir={tmp_path}/sweep"])
    finally:
        get_reusable_executor().shutdown(wait=True)  # the launcher's idle workers, not left to their timeout
    shown = capfd.readouterr()
    assert code == 0, shown.err[-3000:]
    assert "Joblib.Parallel" in shown.out + shown.err
    assert len((tmp_path / "sweep" / "summary.csv").read_text().splitlines()) == 3


def test_slurm_launcher_config_composes(compose):
    launcher = OmegaConf.to_container(compose("sample", ["hydra/launcher=slurm"], hydra=True).hydra.launcher)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["gpus_per_node"] == 1
