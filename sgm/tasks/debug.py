"""What train.py does for the Lightning debug flags that the ``debug`` group (conf/debug) sets.

``trainer.overfit_batches``: Lightning disables shuffling by swapping a ``SequentialSampler`` into
the train loader, which breaks the bucket sampler (it yields whole batches, and keeps the resume
position). :func:`apply_overfit` gives the same run without the swap: the data module unshuffled
(``data.shuffle=false``), each epoch cut to those batches (``trainer.limit_train_batches``).
``trainer.fast_dev_run`` needs nothing here: the checkpoint and weights callbacks skip it.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def apply_overfit(cfg: DictConfig) -> bool:
    """Move ``trainer.overfit_batches`` (a count, or a fraction of the batches) to
    ``trainer.limit_train_batches`` with ``data.shuffle=false``; returns whether it did."""
    value = cfg.trainer.get("overfit_batches") or 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
            or (isinstance(value, float) and value > 1):
        raise ValueError(f"trainer.overfit_batches must be a number of batches or a fraction in (0, 1], got {value!r}")
    if not value:
        return False
    with open_dict(cfg):
        cfg.trainer.overfit_batches = 0
        cfg.trainer.limit_train_batches = value
        cfg.data.shuffle = False
    log.info("trainer.overfit_batches=%s: the first %s training batch(es), unshuffled, every epoch "
             "(trainer.limit_train_batches=%s, data.shuffle=false)", value, value, value)
    return True
