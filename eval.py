"""Judge images without sampling: `python eval.py images=DIR_OR_RUN_FOLDER [metrics=[clip_score,fid]]` (conf/eval.yaml)."""

from sgm.tasks.shutdown import skip_collection_at_exit

skip_collection_at_exit()  # the process ends ~1 s sooner (sgm/tasks/shutdown.py)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import sgm  # noqa: F401,E402 - registers the ${sgm.asset:NAME} resolver before Hydra resolves
from sgm.tasks.cli import check_command_line  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    from sgm.tasks.evaluate import run

    return run(cfg)


if __name__ == "__main__":
    check_command_line()  # a named hint where Hydra would stop with a lexer trace or a missing plugin
    main()
