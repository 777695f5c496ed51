"""The PyTorch backend object with its capabilities: `core`'s operations on modules,
`train`'s Trainer (compare), `deploy`'s Deployer (check, export) and `tta`'s
TestTimeAdapter. The capability modules import `core`; `core` imports none of them:
they are handed out here."""

from __future__ import annotations

from bnkit.backends.base import Deployer, TestTimeAdapter, Trainer
from bnkit.backends.torch.core import TorchBackend as TorchCore
from bnkit.backends.torch.deploy import TorchDeployer
from bnkit.backends.torch.train import TorchTrainer
from bnkit.backends.torch.tta import TorchTestTime


class TorchBackend(TorchCore):
    """bnkit's operations on PyTorch modules, every capability included."""

    def trainer(self) -> Trainer:
        return TorchTrainer()

    def deployer(self) -> Deployer:
        return TorchDeployer()

    def test_time(self) -> TestTimeAdapter:
        return TorchTestTime()


def backend() -> TorchBackend:
    """This framework's backend object."""
    return TorchBackend()
