"""Fine-tune with the Lightning Trainer: the backbone frozen (BN statistics included)
while the head trains, then its last block unfrozen with BN in mode affine. Lightning's
own `BaseFinetuning.freeze` leaves BN normalising with batch statistics in training;
bnkit's callback pins the modes through every `model.train()` Lightning makes.

    python examples/lightning_finetune.py
"""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnkit.data import digits
from bnkit.lightning_callbacks import BNFinetuning


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            block(3, 16),
            block(16, 32),
            block(32, 32),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(
            [p for p in self.parameters() if p.requires_grad], lr=1e-3
        )


def loader(split, shuffle: bool = True) -> DataLoader:
    x, y = split
    data = TensorDataset(torch.as_tensor(x.transpose(0, 3, 1, 2)), torch.as_tensor(y))
    return DataLoader(data, batch_size=32, shuffle=shuffle)


torch.manual_seed(0)
source, target = digits("source", size=16), digits("target", size=16)
model = Classifier()
quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, accelerator="cpu")  # fmt: skip
pl.Trainer(max_epochs=2, **quiet).fit(model, loader(source.train))  # "pretraining"

callback = BNFinetuning(
    module="backbone", train_from="head", bn="frozen",  # epoch 0: the head only
    unfreeze_at_epoch=1, unfreeze_from="2", unfreeze_bn="affine",  # then the last block
    on_problem="raise",
)  # fmt: skip
trainer = pl.Trainer(max_epochs=2, callbacks=[callback], **quiet)
trainer.fit(model, loader(target.train))
for epoch, report in enumerate(callback.reports):
    print(f"epoch {epoch}: {report.counts()}")
print(callback.applied)
assert all(r.ok for r in callback.reports)
