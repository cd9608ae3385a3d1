"""Run by test_multiprocess.py under torchrun: trains, records what each rank saw, dumps it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from aitk.config.loader import load_job_file
from aitk.trainer.loop import Trainer


class RecordingTrainer(Trainer):
    seen: list[list[str]]

    def _setup(self) -> None:
        super()._setup()
        self.seen = []
        original = self.data.next_batch

        def recorded():
            batch = original()
            self.seen.append(list(batch.keys))
            return batch

        self.data.next_batch = recorded


def main() -> None:
    job_path, out_dir = sys.argv[1], Path(sys.argv[2])
    loaded = load_job_file(job_path)
    trainer = RecordingTrainer(loaded.job, loaded.job.config.process[0])
    result = trainer.run()
    torch.save(
        {"seen": trainer.seen, "network": trainer.network.network_state_dict(), "state": result.state,
         "world_size": trainer.session.world_size},
        out_dir / f"rank{trainer.session.rank}.pt",
    )


if __name__ == "__main__":
    main()
