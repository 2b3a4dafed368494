"""Trains the tiny LM on 2 CPU processes with Lightning's default (popen) launcher; saves rank 0's params.

Run by tests/test_strategy.py as a subprocess: ``python tests/popen_train.py OUTPUT``.
"""

import sys

import torch

from lightning_dhp import DHPStrategy
from tests.helpers import cpu_trainer, token_data
from tests.tiny_lm import LMTask

if __name__ == "__main__":
    task = LMTask()
    trainer = cpu_trainer(2, DHPStrategy(20))
    trainer.fit(task, datamodule=token_data())
    if trainer.is_global_zero:
        torch.save(task.model.state_dict(), sys.argv[1])
