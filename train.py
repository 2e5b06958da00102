"""Train: `python train.py data.root=DIR [lora=...] [~lora]` (see conf/train.yaml)."""

from sgm.tasks.shutdown import skip_collection_at_exit
from sgm.tasks.threads import set_wait_policy

set_wait_policy()  # OpenMP's passive wait, before anything imports torch (sgm/tasks/threads.py)
skip_collection_at_exit()  # the process ends ~1 s sooner (sgm/tasks/shutdown.py)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import sgm  # noqa: F401,E402 - registers the ${sgm.asset:NAME} resolver before Hydra resolves
from sgm.tasks.cli import check_command_line  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    from sgm.tasks.train import run

    return run(cfg)


if __name__ == "__main__":
    check_command_line()  # a named hint where Hydra would stop with a lexer trace or a missing plugin
    main()
