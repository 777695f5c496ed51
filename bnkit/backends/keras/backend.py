"""The Keras backend object with its capabilities: `core`'s operations on models,
`train`'s Trainer (compare), `deploy`'s Deployer (check, export) and `tta`'s
TestTimeAdapter. The capability modules import `core`; `core` imports none of them:
they are handed out here."""

from __future__ import annotations

from bnkit.backends.base import Deployer, TestTimeAdapter, Trainer
from bnkit.backends.keras.core import KerasBackend as KerasCore
from bnkit.backends.keras.deploy import KerasDeployer
from bnkit.backends.keras.train import KerasTrainer
from bnkit.backends.keras.tta import KerasTestTime


class KerasBackend(KerasCore):
    """bnkit's operations on Keras models, every capability included."""

    def trainer(self) -> Trainer:
        return KerasTrainer()

    def deployer(self) -> Deployer:
        return KerasDeployer()

    def test_time(self) -> TestTimeAdapter:
        return KerasTestTime()


def backend() -> KerasBackend:
    """This framework's backend object."""
    return KerasBackend()
