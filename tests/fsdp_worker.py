"""Run by test_fsdp.py: trains a job with the global batch pinned, so that N processes x batch b
train on exactly the samples and noise of 1 process x batch N*b.

Ordinary multi-process runs draw each process's batches and noise from its own streams, so they
are statistically, not bitwise, the single-process run. Here every process draws the whole global
batch (data order and noise from one stream seeded alike everywhere) and keeps its slice: the only
difference left between the runs is what FSDP changes (sharded weights, reduce-scattered and
averaged gradients, a sharded optimizer step, gathered saves).

usage: fsdp_worker.py JOB OUT_DIR [STOP_AT_STEP]
Writes OUT_DIR/rank<r>.json: the parameters' and optimizer state's element counts on this process.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

import aitk.data
from aitk.config.loader import load_job_file
from aitk.data.training_data import Batch, TrainingData
from aitk.models.base import NoisyBatch
from aitk.trainer.loop import Trainer


def _slice(value, part: slice, whole: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == whole:
        return value[part]
    if isinstance(value, list) and len(value) == whole:
        return value[part]
    return value


class GlobalBatchData(TrainingData):
    """Draws the global batch (world_size x batch_size, one sampler for all) and keeps its part."""

    def __init__(self, *args, batch_size: int, rank: int, world_size: int, **kwargs) -> None:
        super().__init__(*args, batch_size=batch_size * world_size, rank=0, world_size=1, **kwargs)
        self.part = slice(rank * batch_size, (rank + 1) * batch_size)
        self.whole = batch_size * world_size

    def next_batch(self) -> Batch:
        batch = super().next_batch()
        fields = {f.name: _slice(getattr(batch, f.name), self.part, len(batch)) for f in dataclasses.fields(batch)}
        return Batch(**fields)


class GlobalBatchTrainer(Trainer):
    def _setup(self) -> None:
        super()._setup()
        rank, world = self.session.rank, self.session.world_size
        # one noise stream, seeded alike on every process (the trainer seeds seed + rank)
        self.noise_generator = torch.Generator(device="cpu").manual_seed(self.seed)
        draw = self.adapter.make_noisy_batch

        def global_noise(latents, train_cfg, generator, context):
            local = latents.shape[0]
            whole = local * world
            # our latents in every slot: slot `rank` gets the noise and timesteps of its global index
            everything = latents.repeat(world, *([1] * (latents.dim() - 1)))
            context = dataclasses.replace(
                context, **{f: getattr(context, f) * world for f in ("original_sizes", "crops_top_left", "target_sizes")}
            )
            noisy = draw(everything, train_cfg, generator, context)
            part = slice(rank * local, (rank + 1) * local)
            return NoisyBatch(
                noisy_latents=noisy.noisy_latents[part],
                timesteps=_slice(noisy.timesteps, part, whole),
                target=noisy.target[part],
                loss_weights=_slice(noisy.loss_weights, part, whole),
                extra={k: _slice(v, part, whole) for k, v in noisy.extra.items()},
            )

        self.adapter.make_noisy_batch = global_noise


def _shard_counts(trainer: Trainer) -> dict:
    params = trainer.network.trainable_parameters()
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {
        "rank": trainer.session.rank,
        "world_size": trainer.session.world_size,
        "sharded": all(hasattr(p, "to_local") for p in params),
        "param_numel": sum(p.numel() for p in params),
        "param_local_numel": local,
        "optimizer_local_numel": sum(t.to_local().numel() if hasattr(t, "to_local") else t.numel() for t in state),
    }


def main() -> None:
    job_path, out_dir = sys.argv[1], Path(sys.argv[2])
    stop_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    aitk.data.TrainingData = GlobalBatchData  # set-up imports it from aitk.data

    def stop(trainer: Trainer, step: int) -> None:
        if step == stop_at:
            trainer.stop.request("test")

    loaded = load_job_file(job_path)
    trainer = GlobalBatchTrainer(loaded.job, loaded.job.config.process[0], on_step_end=stop)
    result = trainer.run()
    out_dir.mkdir(parents=True, exist_ok=True)
    record = _shard_counts(trainer) | {"state": result.state, "step": result.step}
    (out_dir / f"rank{trainer.session.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
