"""Sample images: `python run.py [sampler=euler] [guider.scale=5] [prompt="..."]` (see conf/sample.yaml)."""

from typing import Any

import hydra
from omegaconf import DictConfig

import sgm  # noqa: F401 - registers the ${sgm.asset:NAME} resolver before Hydra resolves
from sgm.tasks.cli import check_command_line


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> Any:
    """The run's metrics; with ``optimized_metric`` set, that metric for the sweeper (sgm.tasks.search)."""
    from sgm.tasks.sample import run
    from sgm.tasks.search import objective

    return objective(cfg, run(cfg))


if __name__ == "__main__":
    check_command_line()  # a named hint where Hydra would stop with a lexer trace or a missing plugin
    main()
