"""Trainer failures: why a run ends in error (status.json, log, exit code), non-finite steps
(train.nan_policy), out of memory in a step, and free disk space before training."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING


from aitk.trainer import checkpoint as ckpt
from aitk.trainer.errors import TrainingAborted
from aitk.trainer.reporting import RunLog, StatusFile

if TYPE_CHECKING:
    from aitk.trainer.failure import Failure

MAX_ROLLBACKS = 3  # train.nan_policy rollback: then the run stops with reason nan


class TrainerFailures:
    """Mixin of `aitk.trainer.loop.Trainer`."""

    def _record_failure(self, exc: BaseException) -> "Failure":
        """status.json (state error, reason, message, fix, step, last checkpoint) and one paragraph
        in log.txt; an internal error's traceback goes to the log too. A failure before the run's
        log exists (e.g. the job asks for what this version cannot do) creates both."""
        import traceback

        from aitk.trainer.failure import classify, paragraph

        failure = classify(exc, str(self.job_path) if self.job_path else None)
        main = self.session.is_main if getattr(self, "session", None) is not None else os.environ.get("RANK", "0") == "0"
        if not main:
            return failure
        try:
            if getattr(self, "log", None) is None:
                self.log = RunLog(self.paths.log)
            if getattr(self, "status", None) is None:
                self.status = StatusFile(self.paths.status, self.train_cfg.steps)
            last = self.status.data.get("last_checkpoint")
            if last is None:  # e.g. a failure before resuming: the newest complete one on disk
                found = ckpt.latest_complete_checkpoint(self.paths.checkpoints, warn=lambda _: None)
                last = str(found.path) if found is not None else None
            self.log(paragraph(failure, self.state.step, last))
            if failure.reason == "internal":
                self.log("".join(traceback.format_exception(exc)).rstrip())
            self._set_status(state="error", error=failure.message, **failure.fields(), step=self.state.step,
                             last_checkpoint=last, force=True)
        except OSError:  # the folder itself cannot be written (a full or read-only disk): say it on stderr
            pass
        return failure

    def _after_nonfinite_step(self, loss: float, grad_norm: float) -> None:
        """train.nan_policy: stop ends the run at once; skip ends it after nan_patience in a row;
        rollback asks the loop to roll back after nan_patience in a row (done between steps)."""
        policy, patience = self.train_cfg.nan_policy, self.train_cfg.nan_patience
        in_a_row = self.state.nonfinite_in_a_row
        if policy == "stop":
            raise TrainingAborted(
                f"the loss or gradient was not finite at step {self.state.step} (loss {loss}, gradient norm "
                f"{grad_norm}) and train.nan_policy is stop", reason="nan",
            )
        if in_a_row < patience:
            return
        if policy == "rollback":
            self.rollback_pending = True
            return
        raise TrainingAborted(
            f"the loss was not finite for {in_a_row} steps in a row (train.nan_patience {patience})", reason="nan",
        )

    def _out_of_memory(self, error: str) -> TrainingAborted:
        """Reason oom: free what the step held, and a fix from the memory plan (the cheapest
        settings that fit this device) when one can be made."""
        from aitk.trainer.memory_check import device_total_memory, fit_advice, free_cached_memory

        self.optimizer.zero_grad(set_to_none=True)  # nothing of the failed step is applied
        free_cached_memory(self.session.device)
        budget = device_total_memory(self.session.device)
        index = next(i for i, p in enumerate(self.job.config.process) if p is self.process)
        first_line = (error.strip().splitlines() or [""])[0]
        message = f"out of memory in the training step at step {self.state.step}" + (f": {first_line}" if first_line else "")
        return TrainingAborted(message, reason="oom", fix=fit_advice(self.job, index, budget))

    def _roll_back(self) -> None:
        """train.nan_policy rollback: the last complete checkpoint, with half the learning rate of
        the run so far (at most MAX_ROLLBACKS times; then the run stops with reason nan)."""
        rollbacks = self.state.nan_rollbacks + 1
        patience = self.train_cfg.nan_patience
        if rollbacks > MAX_ROLLBACKS:
            raise TrainingAborted(
                f"the loss was not finite for {patience} steps in a row after {MAX_ROLLBACKS} rollbacks "
                f"(learning rate now {self.state.lr_factor:g} of train.lr)", reason="nan",
            )
        found = self._last_good_checkpoint()
        if found is None:
            raise TrainingAborted(
                f"the loss was not finite for {patience} steps in a row at step {self.state.step} and there is "
                "no checkpoint to roll back to yet", reason="nan",
                fix="lower train.lr or set train.max_grad_norm; a smaller save.save_every gives rollback a "
                    "checkpoint sooner",
            )
        skipped = self.state.nonfinite_steps
        self._load_checkpoint(found.path)
        scale = 0.5 ** rollbacks / self.state.lr_factor  # the checkpoint's rate may predate earlier rollbacks
        scheduler = self.lr_scheduler
        scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= scale
            if "initial_lr" in group:
                group["initial_lr"] *= scale
        self.state.nan_rollbacks = rollbacks
        self.state.lr_factor = 0.5 ** rollbacks
        self.state.nonfinite_steps = max(skipped, self.state.nonfinite_steps)
        self.state.nonfinite_in_a_row = 0
        self.log(
            f"rollback {rollbacks} of {MAX_ROLLBACKS}: back to {found.path} (step {self.state.step}) with the "
            f"learning rate at {self.state.lr_factor:g} of train.lr"
        )
        self._set_status(step=self.state.step, last_checkpoint=str(found.path), nan_rollbacks=rollbacks, force=True)

    def _last_good_checkpoint(self) -> "ckpt.CheckpointInfo | None":
        """The newest complete checkpoint not written in the middle of a run of non-finite steps."""
        from aitk.trainer.state import TrainerState

        for info in ckpt.list_checkpoints(self.paths.checkpoints):
            if ckpt.verify_checkpoint(info.path) is not None:
                continue
            state = TrainerState.from_json((info.path / "trainer_state.json").read_text())
            if state.nonfinite_in_a_row == 0:
                return info
        return None

    def _check_disk_space(self) -> None:
        """Room for two checkpoints, the final files and the previews (reason io if not)."""
        from aitk.trainer.disk_check import SpaceNeeded, check_free_space, checkpoint_bytes, element_size
        from aitk.trainer.disk_check import preview_bytes, preview_rounds
        from aitk.trainer.session import torch_dtype

        if not self.session.is_main:
            return
        one, saved = checkpoint_bytes(
            self.params, self.train_cfg.optimizer, element_size(torch_dtype(self.process.save.dtype)),
            ema=self.ema is not None,
        )
        sample_cfg = self.process.sample
        rounds = 0
        if self.preview_requests and sample_cfg is not None:
            rounds = preview_rounds(self.train_cfg.steps - self.state.step, sample_cfg.sample_every,
                                    max(0, sample_cfg.sample_start_step - self.state.step))
        sizes = [(r.width, r.height, r.num_frames) for r in self.preview_requests]
        check_free_space(self.paths.root, SpaceNeeded(one, saved, preview_bytes(sizes, rounds)))
