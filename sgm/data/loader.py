"""The train DataLoader that knows how far it got: the position a resumed run continues from."""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`~sgm.data.buckets.BucketBatchSampler` that counts the batches it
    has handed out (``position`` = (epoch, batches of that epoch consumed)) and is ``state_dict`` /
    ``load_state_dict``-able through its data module, so Lightning treats it as resumable."""

    def __init__(self, *args: Any, state_owner: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.state_owner = state_owner
        self.position: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing (no worker prefetch either) starts before the first next(), so a
        # set_epoch() after iter() and before the first batch is still honoured
        sampler = self.sampler
        epoch = sampler.epoch
        self.position = (epoch, sampler.first_batch(epoch))
        for batch in super().__iter__():
            self.position = (epoch, self.position[1] + 1)
            yield batch

    def state_dict(self) -> dict:
        """The owner's (data module's) resume state."""
        return self.state_owner.state_dict() if self.state_owner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Hand ``state`` to the owner (data module)."""
        if self.state_owner is not None and state:
            self.state_owner.load_state_dict(state)
