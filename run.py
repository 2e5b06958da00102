"""Sample images: `python run.py [sampler=euler] [guider.scale=5] [prompt="..."]` (see conf/sample.yaml)."""

from typing import Any

from sgm.tasks.shutdown import skip_collection_at_exit
from sgm.tasks.threads import set_wait_policy

set_wait_policy()  # OpenMP's passive wait, before anything imports torch (sgm/tasks/threads.py)
skip_collection_at_exit()  # the process ends ~1 s sooner (sgm/tasks/shutdown.py)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import sgm  # noqa: F401,E402 - registers the ${sgm.asset:NAME} resolver before Hydra resolves
from sgm.tasks.cli import check_command_line  # noqa: E402
from sgm.tasks.sample_numbers import check_numbers  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> Any:
    """The run's metrics; with ``optimized_metric`` set, that metric for the sweeper (sgm.tasks.search)."""
    if not cfg.get("from_image"):  # (a PNG's settings replace these: the task checks them)
        check_numbers(cfg)  # a mistyped number stops here, before torch and the model code are imported
    from sgm.tasks.sample import run
    from sgm.tasks.search import objective

    return objective(cfg, run(cfg))


if __name__ == "__main__":
    check_command_line()  # a named hint where Hydra would stop with a lexer trace or a missing plugin
    main()
