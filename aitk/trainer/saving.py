"""Trainer checkpoints: resume, LoRA files, checkpoint folders and pruning."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitk.fsutil import atomic_copy
from aitk.trainer import checkpoint as ckpt
from aitk.trainer import faults
from aitk.trainer.errors import TrainingAborted
from aitk.trainer.state import CheckpointContent, read_content, write_content

if TYPE_CHECKING:
    from aitk.trainer.fsdp import ShardedRun


def alpha_state_path(checkpoint: Path) -> Path:
    """checkpoints/000000050 -> checkpoints/000000050_alpha_scheduler.json"""
    return checkpoint.with_name(checkpoint.name + "_alpha_scheduler.json")


class TrainerSaving:
    """Mixin of `aitk.trainer.loop.Trainer`: what is written to and read from the run folder.

    Under FSDP (`self.fsdp`, a ShardedRun) saving and resuming are collective: every process
    gathers or writes its shards, and only the main one writes the other files."""

    fsdp: "ShardedRun | None" = None  # set by set-up for a sharded full fine-tune

    def _signature(self) -> dict[str, Any]:
        from aitk.trainer.resume import run_signature

        signature = run_signature(
            self.process, self.network.wrapped_module_names(), list(self.network),
            self.network.text_encoder_module_names(),
        )
        # FSDP keys its optimizer state by parameter path, plain runs by position: not interchangeable
        signature["fsdp"] = self.fsdp is not None
        return signature

    def _resume(self) -> bool:
        from aitk.trainer.resume import choose_checkpoint

        found = choose_checkpoint(
            self.paths.checkpoints, is_main=self.session.is_main,
            world_size=self.session.world_size, warn=self.log,
        )
        if found is None:
            return False
        self._load_checkpoint(found.path)
        self.log(f"resuming from {found.path} (step {self.state.step} of {self.train_cfg.steps})")
        self._set_status(last_checkpoint=str(found.path), step=self.state.step)
        return True

    def _load_checkpoint(self, path: Path) -> None:
        """Network, optimizer, schedules, data position, random state and counters from a complete
        checkpoint (resume, and train.nan_policy rollback)."""
        from aitk.trainer.resume import IncompatibleCheckpoint, check_signature
        from aitk.trainer.rng import restore_rng

        found = ckpt.CheckpointInfo(path, int(path.name))
        # FSDP: the first process reads the model state and broadcasts it to the shards
        content = read_content(found.path, model_state=self.fsdp is None or self.session.is_main)
        try:
            check_signature(content.state.signature, self._signature(), found.path)
            if self.fsdp is not None:
                from aitk.trainer.fsdp_state import resume_fsdp

                resume_fsdp(self.fsdp, found.path, content, self.network, self.optimizer, self.ema)
                if content.fsdp["world_size"] != self.session.world_size:
                    content.health = None  # its sampled gradient signs are of other shards
            elif content.network is None:
                raise ValueError("it was written by an FSDP run with sharded state; resume it with FSDP")
            else:
                self.network.load_network_state_dict(content.network)
                self.optimizer.load_state_dict(content.optimizer)
        except (IncompatibleCheckpoint, KeyError, ValueError, RuntimeError) as exc:
            raise TrainingAborted(f"cannot resume from {found.path}: {exc}") from exc
        self.lr_scheduler.load_state_dict(content.lr_scheduler)
        if self.ema is not None and content.ema is not None and self.fsdp is None:
            self.ema.load_state_dict(content.ema)
        if self.grad_scaler is not None and content.grad_scaler is not None:
            self.grad_scaler.load_state_dict(content.grad_scaler)
        self.state = content.state
        self.data.load_state_dict(content.state.data)
        self.health.load_state_dict(content.state.health, content.health)
        rank = self.session.rank
        if rank < len(content.rng_per_rank):
            restore_rng(content.rng_per_rank[rank], self.noise_generator)
        else:
            self.log(f"warning: the checkpoint has no random state for process {rank}; reseeding it")

    def _save_lora(self, step: int | None) -> list[Path]:
        """The run's LoRA files or model folders; under FSDP a collective (the main process writes
        the weights the others help gather; they get [])."""
        from aitk.trainer.lora_files import write_lora_files

        shown_step = self.state.step if step is None else step
        with self.ema.applied() if self.ema is not None else nullcontext():
            if self.fsdp is not None:
                from aitk.trainer.lora_files import lora_paths
                from aitk.trainer.model_files import write_model_folders

                states = [handle.model_state_dict() for _, handle in self.network.items()]
                if not self.session.is_main:
                    return []
                targets = lora_paths(self.paths, step, self.network)
                return write_model_folders(targets, self.network, self.process.save, states=states)
            return write_lora_files(
                self.paths, step, shown_step, self.network, self.job, self.process, self.adapter
            )

    def _write_missing_final_files(self, finals: list[Path]) -> None:
        """A finished run whose final files are gone (e.g. deleted): the checkpoint has them."""
        missing = self.session.is_main and not all(p.exists() for p in finals)
        if self.fsdp is not None:  # writing them is a collective: every process must agree
            import torch.distributed as dist

            agreed = [missing]
            dist.broadcast_object_list(agreed, src=0)
            missing = agreed[0]
        elif not self.session.is_main:
            return
        if missing:
            self._save_lora(None)

    def _gather_rng(self) -> list[dict[str, Any]]:
        from aitk.trainer.rng import capture_rng

        mine = capture_rng(self.noise_generator)
        if self.session.world_size == 1:
            return [mine]
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.session.world_size
        dist.all_gather_object(everyone, mine)
        return everyone

    def _save_checkpoint(self, final: bool = False) -> None:
        """A refused write (full disk, read-only folder, quota) stops the run with reason io; the
        partial checkpoint is removed and the previous complete ones stay."""
        from aitk.networks.export import NonFiniteWeightsError
        from aitk.trainer.failure import disk_failure

        try:
            self._write_checkpoint(final)
        except NonFiniteWeightsError as exc:
            raise TrainingAborted(str(exc), reason="nan") from exc
        except Exception as exc:
            refused = disk_failure(exc, f"the checkpoint of step {self.state.step}", self.paths.root)
            if refused is None:
                raise
            raise refused from exc

    def _write_checkpoint(self, final: bool) -> None:
        step = self.state.step
        rng = self._gather_rng()  # every process takes part; only the main one writes
        if self.fsdp is None and not self.session.is_main:
            return
        main = self.session.is_main
        if main:
            self._set_status(state="saving")
        fsdp = self.fsdp
        # A sharded FSDP run gathers the model for its model folder only at the end of training.
        writes_models = fsdp is None or final or fsdp.full_checkpoints
        loras = self._save_lora(None if final else step) if writes_models else []
        sharded_tmp: Path | None = None
        if fsdp is None:
            network = self.network.network_state_dict()
            optimizer = self.optimizer.state_dict()
            ema = self.ema.state_dict() if self.ema is not None else None
        else:
            from aitk.trainer import fsdp_state

            network = optimizer = ema = None
            if fsdp.full_checkpoints:
                network = self.network.network_state_dict()  # gathered on the main process
                optimizer = fsdp_state.full_optimizer_state(fsdp, self.optimizer)
                ema = fsdp_state.full_ema_state(self.ema)
            else:
                import torch.distributed as dist

                where = [ckpt.begin_checkpoint(self.paths.checkpoints, step) if main else None]
                dist.broadcast_object_list(where, src=0)
                sharded_tmp = where[0]
                fsdp_state.save_sharded(fsdp, sharded_tmp, self.optimizer, self.ema)
            if not main:
                return
        self.state.data = self.data.state_dict()
        self.state.signature = self._signature()
        health_json, health_tensors = self.health.state_dict()
        self.state.health = health_json
        if final:
            # The final file is also kept under its step name, so pruning never leaves a gap.
            from aitk.trainer.lora_files import lora_paths

            for lora, stepped in zip(loras, lora_paths(self.paths, step, self.network)):
                if lora.is_dir():  # a full fine-tune's model folder
                    from aitk.trainer.model_files import copy_model_folder

                    copy_model_folder(lora, stepped)
                else:
                    atomic_copy(lora, stepped)
        content = CheckpointContent(
            state=self.state,
            network=network,
            optimizer=optimizer,
            lr_scheduler=self.lr_scheduler.state_dict(),
            rng_per_rank=rng,
            ema=ema,
            grad_scaler=self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            health=health_tensors,
            fsdp=fsdp_state.fsdp_info(fsdp, self.ema) if fsdp is not None else None,
        )
        if sharded_tmp is not None:  # the processes' shards are in: add the rest, then commit
            write_content(sharded_tmp, content)
            folder = ckpt.commit_checkpoint(
                self.paths.checkpoints, step, sharded_tmp, pause_hook=self.checkpoint_pause_hook
            )
        else:
            folder = ckpt.write_checkpoint(
                self.paths.checkpoints,
                step,
                lambda tmp: (write_content(tmp, content), faults.refuse_checkpoint_write(step, tmp)),
                pause_hook=self.checkpoint_pause_hook,
            )
        if health_json.get("alpha_scheduler") is not None:
            # beside the checkpoint, for users who look (the checkpoint's own copy is what resumes)
            import json

            from aitk.fsutil import atomic_write_bytes

            atomic_write_bytes(
                alpha_state_path(folder), json.dumps(health_json["alpha_scheduler"], indent=1).encode()
            )
        self._prune()
        self._set_status(state="training", last_checkpoint=str(folder), force=True)
        written = f"{', '.join(p.name for p in loras)} and " if loras else ""
        self.log(f"saved {written}checkpoint {folder.name} at step {step}")

    def _prune(self) -> None:
        keep = self.process.save.max_step_saves_to_keep
        if keep <= 0:
            return
        import shutil

        from aitk.trainer.lora_files import lora_paths

        for info in ckpt.list_checkpoints(self.paths.checkpoints)[keep:]:
            shutil.rmtree(info.path, ignore_errors=True)
            alpha_state_path(info.path).unlink(missing_ok=True)
            for path in lora_paths(self.paths, info.step, self.network):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    path.with_suffix(".safetensors").unlink(missing_ok=True)
                else:
                    path.unlink(missing_ok=True)

