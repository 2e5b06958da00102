"""EMAWeights: the average follows the weights, is saved, resumed and swapped in at the end."""

import lightning as L
import pytest
import torch
from torch import nn

from sgm.tasks.callbacks import EMAWeights, SaveFinalWeights


class Line(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 1)
        self.frozen = nn.Linear(3, 1).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, generator=g)
        return torch.utils.data.DataLoader(list(zip(x, x.sum(1, keepdim=True))), batch_size=8)


class KeepFinalWeights(SaveFinalWeights):
    """SaveFinalWeights with the writing replaced by keeping the weights (what the file would hold)."""

    def __init__(self, saved: dict):
        super().__init__("unused.safetensors", mode="full")
        self.saved = saved

    def save(self, engine) -> None:
        self.saved.update({k: v.clone() for k, v in engine.state_dict().items()})


def fit(tmp_path, steps, ema, ckpt=None, saved=None):
    torch.manual_seed(0)
    model = Line()
    callbacks = [ema, KeepFinalWeights(saved if saved is not None else {})]
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, ckpt_path=ckpt)
    return model, trainer


def test_ema_follows_the_weights_and_is_what_the_final_file_holds(tmp_path):
    saved = {}
    ema = EMAWeights(decay=0.9)
    model, trainer = fit(tmp_path, 12, ema, saved=saved)
    assert set(ema.shadow) == {"net.weight", "net.bias"} and ema.updates == 12
    raw = model.net.weight.detach()
    # the file holds the average, the module keeps the raw weights for further training
    torch.testing.assert_close(saved["net.weight"], ema.shadow["net.weight"])
    assert not torch.allclose(saved["net.weight"], raw)
    assert torch.allclose(saved["frozen.weight"], model.frozen.weight)
    # the average lags behind the trained weights towards their start
    torch.manual_seed(0)
    start = Line().net.weight
    assert (saved["net.weight"] - start).norm() < (raw - start).norm()


def test_ema_state_survives_a_resume(tmp_path):
    ema = EMAWeights(decay=0.9)
    _, trainer = fit(tmp_path, 8, ema, saved={})
    ckpt = tmp_path / "eight.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = EMAWeights(decay=0.9)
    fit(tmp_path / "a", 8, restored, ckpt=str(ckpt), saved={})  # restore only: no further step
    assert restored.updates == 8
    torch.testing.assert_close(restored.shadow["net.weight"], ema.shadow["net.weight"])
    resumed = EMAWeights(decay=0.9)
    model, _ = fit(tmp_path / "b", 12, resumed, ckpt=str(ckpt), saved={})
    assert resumed.updates == 12  # the warm-up count goes on from the checkpoint
    assert not torch.allclose(resumed.shadow["net.weight"], ema.shadow["net.weight"])


def test_bad_decay_is_named():
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(decay=1.0)
