"""One training run for tests/test_distributed.py, started by torchrun or as a plain process.

The CLI has no option for the heads' dropout, so the loss-equivalence test builds its request
here with every source of randomness that depends on the batch split turned off.
usage: python tests/ddp_worker.py MANIFEST OUT_DIR EPOCHS BATCH_SIZE [--resume]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from omnifuse_cli.config import DataConfig, MethodConfig, ModalitySpec, TrainConfig
from omnifuse_cli.engine.training import TrainRequest, run_training


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    manifest, out_dir, epochs, batch = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    request = TrainRequest(
        manifest=manifest, num_classes=3, out_dir=out_dir, overwrite=True,
        data=DataConfig(modalities=(ModalitySpec("labs", "vector"), ModalitySpec("text", "text"))),
        method=MethodConfig(embed_dim=16, dropout=0.0, cra_dropout=0.0, modality_drop=0.0,
                            ra_layers=(16, 8), num_ra=2),
        train=TrainConfig(epochs=epochs, batch_size=batch, seed=5, device="cpu", cache=False),
    )
    run_training(request, resume="--resume" in argv)


if __name__ == "__main__":
    main(sys.argv[1:])
