"""Judge images without sampling: `python eval.py images=DIR_OR_RUN_FOLDER [metrics=[clip_score,fid]]` (conf/eval.yaml)."""

import hydra
from omegaconf import DictConfig

import sgm  # noqa: F401 - registers the ${sgm.asset:NAME} resolver before Hydra resolves
from sgm.tasks.cli import check_command_line


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    from sgm.tasks.evaluate import run

    return run(cfg)


if __name__ == "__main__":
    check_command_line()  # a named hint where Hydra would stop with a lexer trace or a missing plugin
    main()
