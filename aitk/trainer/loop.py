"""The training loop: steps, accumulation, and the cadence of save / sample / log.

It knows no architecture by name: everything model-specific goes through the ModelAdapter.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aitk import startup_gc
from aitk.config.schema import JobFile, ProcessConfig
from aitk.models.base import BatchContext
from aitk.trainer import checkpoint as ckpt
from aitk.trainer import faults
from aitk.trainer.errors import TrainingAborted
from aitk.trainer.reporting import MetricsWriter, iso_now
from aitk.trainer.failing import TrainerFailures
from aitk.trainer.saving import TrainerSaving
from aitk.trainer.session import RunPaths
from aitk.trainer.setup import TrainerSetup
from aitk.trainer.state import TrainerState
from aitk.trainer.step_report import StepReporter
from aitk.trainer.step_timer import StepTimer
from aitk.trainer.stop import StopController
from aitk.trainer.control import CONTROL_REQUESTS, ControlRequests

if TYPE_CHECKING:
    from aitk.trainer.failure import Failure

__all__ = ["Trainer", "TrainingAborted", "RunResult"]


@dataclass
class RunResult:
    state: str  # completed | stopped
    step: int
    final_lora: Path | None
    output_dir: Path
    final_loras: list[Path] = field(default_factory=list)  # one per network (per expert for WAN 2.2)


class Trainer(TrainerSetup, TrainerSaving, TrainerFailures):
    """One training process of a job: set-up (setup.py), steps and cadence (here), saving and resume
    (saving.py), failures (failing.py)."""

    def __init__(
        self,
        job: JobFile,
        process: ProcessConfig,
        *,
        stop: StopController | None = None,
        on_step_end: Callable[["Trainer", int], None] | None = None,
        checkpoint_pause_hook: Callable[[Path], None] | None = None,
        job_path: Path | None = None,
    ) -> None:
        self.job_path = Path(job_path) if job_path is not None else None  # its folder may hold a .env
        self.job = job
        self.process = process
        self.train_cfg = process.train
        self.stop = stop or StopController()
        self.on_step_end = on_step_end
        self.checkpoint_pause_hook = checkpoint_pause_hook or ckpt.pause_hook_from_env()
        self.paths = RunPaths(Path(process.training_folder) / job.config.name, job.config.name)
        self.state = TrainerState()
        self.text_encoders_released = False
        self.update_skipped = False  # the last step's update was skipped (not finite / fp16 overflow)
        self.loss_scale: float | None = None  # fp16: the GradScaler scale the last step ran with
        self.controls = ControlRequests(self.paths.root / "control")
        self.requests: set[str] = set()
        self.timer = StepTimer(False, torch.device("cpu"))  # performance_log_every: set in _run
        self.wandb: Any = None  # logging.use_wandb: the WandbRun (main process)
        self.failure: Failure | None = None  # why the run ended in error (aitk.trainer.failure)
        self.rollback_pending = False  # train.nan_policy rollback: due before the next step
        self._named_params_by_expert: dict[str | None, dict[str, torch.nn.Parameter]] = {}
        self._foreach_clip: dict[str | None, bool] = {}

    # ------------------------------------------------------------------ status
    def _set_status(self, **fields: Any) -> None:
        if self.status is not None:
            self.status.update(**fields)

    # ------------------------------------------------------------------ one step
    def _micro_step(self, scale: float) -> tuple[torch.Tensor, int]:
        from aitk.trainer.loss import diffusion_loss, latent_mask

        timer = self.timer
        faults.raise_out_of_memory(self.state.step)
        with timer.phase("data"):
            batch = self.data.next_batch()
        with timer.phase("forward"):  # the encoders (when not cached), the denoiser and the loss
            with self.placement.using(*self.step_parts):  # parked (low_vram) VAE etc. come in for this
                if batch.latents is not None:
                    latents = batch.latents.to(self.session.device, non_blocking=True)
                else:
                    latents = self.adapter.encode_images(batch.pixels)
                noisy = self.adapter.make_noisy_batch(
                    latents, self.train_cfg, self.noise_generator, self._batch_context(batch)
                )
            cond = self.conditioner.for_batch(batch.captions, batch.is_reg, batch.control_files)
            weights = batch.loss_multiplier.to(self.session.device, non_blocking=True)
            if noisy.loss_weights is not None:
                weights = weights * noisy.loss_weights
            with self.session.autocast():
                prediction = self.adapter.predict(noisy, cond)
            mask = None
            if batch.masks is not None:
                mask = latent_mask(batch.masks.to(self.session.device, non_blocking=True), noisy.target)
            loss = diffusion_loss(
                prediction.float(),
                noisy.target.float(),
                loss_type=self.train_cfg.loss_type,
                huber_c=self.train_cfg.huber_c,
                sample_weights=weights,
                mask=mask,
            )
            loss = faults.poison_loss(loss, self.state.step)
        with timer.phase("backward"):
            scaled = loss * scale
            (self.grad_scaler.scale(scaled) if self.grad_scaler is not None else scaled).backward()
        return loss.detach(), latents.shape[0]  # read on the host once per step (_apply_update)

    def _batch_context(self, batch: Any) -> BatchContext:
        device = self.session.device
        bucket = batch.bucket_size
        return BatchContext(
            original_sizes=list(batch.original_sizes),
            crops_top_left=list(batch.crops_top_left),
            target_sizes=[bucket] * len(batch) if bucket is not None else [],
            controls=batch.controls.to(device, non_blocking=True) if batch.controls is not None else None,
            first_frames=batch.first_frames.to(device, non_blocking=True) if batch.first_frames is not None else None,
            expert=self.active_expert,
        )

    def _sync(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Average gradients and loss over processes; agree on stopping and on save-now /
        sample-now requests (one all-reduce). The requests are left in `self.requests`."""
        stop_flag = 1.0 if self.stop.requested else 0.0
        asked = self.controls.pending() if self.session.is_main else set()
        flags = [1.0 if name in asked else 0.0 for name in CONTROL_REQUESTS]
        if self.session.world_size == 1:
            self.requests = {n for n, f in zip(CONTROL_REQUESTS, flags) if f}
            return loss, bool(stop_flag)
        import torch.distributed as dist

        # FSDP has already reduce-scattered the gradients in backward: only the tail travels here
        params = self._step_params() if self.fsdp is None else []
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        device = self.session.device
        tail_tensor = torch.cat([loss.reshape(1).float().to(device),
                                 torch.tensor([stop_flag, *flags], dtype=torch.float32, device=device)])
        flat = torch.cat([g.reshape(-1).float().to(device) for g in grads] + [tail_tensor])
        dist.all_reduce(flat)
        flat /= self.session.world_size
        offset = 0
        for param, grad in zip(params, grads):
            n = grad.numel()
            param.grad = flat[offset : offset + n].view_as(param).to(param.dtype)
            offset += n
        tail = flat[-len(tail_tensor):]
        agreed = tail[1:].tolist()  # the flags decide what this process does next: read now
        self.requests = {n for n, f in zip(CONTROL_REQUESTS, agreed[1:]) if f > 0}
        return tail[0], agreed[0] > 0

    @property
    def active_expert(self) -> str | None:
        """The expert trained at the current step (None for single-model runs)."""
        return self.rotation.active(self.state.step)

    def _step_params(self) -> list[torch.nn.Parameter]:
        """Parameters this step trains: the active expert's only, so the other's stay untouched."""
        expert = self.active_expert
        return self.params if expert is None else list(self._step_named_params().values())

    def _step_named_params(self) -> dict[str, torch.nn.Parameter]:
        # built once per expert: the trained tensors keep their identity for the whole run (resume
        # and rollback copy values into them)
        expert = self.active_expert
        named = self._named_params_by_expert.get(expert)
        if named is None:
            source = self.network if expert is None else self.network[expert]
            named = self._named_params_by_expert[expert] = source.named_trainable_parameters()
        return named

    def _optimizer_step(self) -> tuple[float, float, list[float], int, bool, float | None]:
        accumulation = self.train_cfg.accumulation_steps
        losses, samples = [], 0
        for _ in range(accumulation):
            loss, count = self._micro_step(1.0 / accumulation)
            losses.append(loss)
            samples += count
        with self.timer.phase("optimizer"):  # the all-reduce, clipping, the update, EMA, the schedule
            return self._apply_update(sum(losses) / len(losses), samples)

    def _apply_update(self, loss: torch.Tensor, samples: int) -> tuple[float, float, list[float], int, bool, float | None]:
        """The optimizer step of the accumulated gradients (skipped when not finite)."""
        loss_on_device, stop = self._sync(loss)
        stability: float | None = None
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.train_cfg.max_grad_norm
        params = self._step_params()
        # foreach: one pass over all gradients (torch picks it by itself on CUDA only); not for
        # FSDP's sharded tensors. Decided once per expert: the tensors stay where they are.
        foreach = self._foreach_clip.get(self.active_expert)
        if foreach is None:
            foreach = self._foreach_clip[self.active_expert] = (
                self.fsdp is None and all(p.device.type in ("cpu", "cuda") for p in params))
        norm_on_device = torch.nn.utils.clip_grad_norm_(
            params, max_norm if max_norm and max_norm > 0 else float("inf"), foreach=foreach or None
        )
        signs = self._measure_signs()
        # The step's one host sync: loss, gradient norm and sign agreement travel together
        numbers = [loss_on_device, norm_on_device] + ([signs.agreement] if signs and signs.agreement is not None else [])
        device = loss_on_device.device
        # FSDP's norm is a DTensor: its full value (an all-reduce every process takes part in)
        local = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in numbers]
        values = torch.stack([n.detach().float().reshape(()).to(device, non_blocking=True) for n in local]).tolist()
        mean_loss, grad_norm = values[0], values[1]
        # With fp16 loss scaling an overflowing gradient is routine: the scaler skips that update
        # and lowers its scale. Anything else non-finite is a bad step.
        self.loss_scale = scaler.get_scale() if scaler is not None else None
        self.update_skipped = not (math.isfinite(mean_loss) and math.isfinite(grad_norm))
        if not math.isfinite(mean_loss) or (scaler is None and not math.isfinite(grad_norm)):
            # Skip the update so one bad batch cannot poison the weights; the checkpoint stays good.
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            self.state.nonfinite_in_a_row += 1
            self.state.nonfinite_steps += 1
            self.log(
                f"warning: step {self.state.step}: loss or gradient is not finite "
                f"(loss={mean_loss}, grad_norm={grad_norm}); the update was skipped"
            )
            self._after_nonfinite_step(mean_loss, grad_norm)
        elif self.update_skipped:  # fp16 overflow (unscale_ found inf / NaN): GradScaler's skip
            self.optimizer.zero_grad(set_to_none=True)
            scaler.update()
            self.log(
                f"warning: step {self.state.step}: fp16 gradient overflow at loss scale {self.loss_scale:g}; "
                f"the update was skipped and the scale lowered to {scaler.get_scale():g}"
            )
        else:
            self.state.nonfinite_in_a_row = 0
            if signs is not None:
                self.health.signs.commit(signs)
                stability = values[2] if signs.agreement is not None else None
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            if hasattr(self.optimizer, "last_gradient_stability"):  # automagic: its update-sign agreement
                stability = self.optimizer.last_gradient_stability
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
        if hasattr(self.optimizer, "mean_learning_rates"):  # automagic: mean of its per-element rates
            lrs = self.optimizer.mean_learning_rates()
        else:
            lrs = [group["lr"] for group in self.optimizer.param_groups]  # the rates this step used
        self.lr_scheduler.step()
        return mean_loss, grad_norm, lrs, samples * self.session.world_size, stop, stability

    def _measure_signs(self) -> Any:
        """This step's gradient signs for the stability metric (None when the optimizer reports
        its own, as automagic does, or on an FSDP process other than the main one, whose shards
        do not stand for the model)."""
        if hasattr(self.optimizer, "last_gradient_stability"):
            return None
        if self.fsdp is None:
            return self.health.measure_signs(self.active_expert, self._step_named_params())
        if not self.session.is_main:
            return None
        from aitk.trainer.fsdp_state import local_gradients

        return self.health.measure_signs(self.active_expert, local_gradients(self._step_named_params()))

    def _scratch_samples_dir(self) -> Path:
        """Where an FSDP process other than the main one puts the previews it renders too (one
        folder per process in the temp folder, emptied before each round)."""
        import shutil
        import tempfile

        scratch = Path(tempfile.gettempdir()) / f"aitk-fsdp-previews-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        return scratch

    def _sample(self, step: int) -> None:
        """Previews are a view of the run, never a reason to lose it: a failure is a warning.
        Under FSDP every process runs the sharded denoiser (each forward is a collective) and
        only the main one keeps the pictures."""
        if not self.preview_requests or not (self.session.is_main or self.fsdp is not None):
            return
        from aitk.trainer.sampling import preview_fields, render_previews, unrenderable_previews

        skipped = getattr(self, "_previews_skipped", None)
        if skipped is None:  # said once: previews that cannot render (a control image missing here...)
            skipped = self._previews_skipped = unrenderable_previews(
                self.preview_requests, self.process.model.resolved_arch
            )
            for index, why in skipped.items():
                self.log(f"warning: preview {index} ({self.preview_requests[index].prompt!r}) is skipped: {why}")
        self._set_status(state="sampling")
        experts = list(self.adapter.experts().values())
        for module in experts:
            module.eval()
        started = time.perf_counter()
        try:
            parts = (*self.adapter.text_encoders(), *self.adapter.auxiliary_modules())
            # Experts taking turns (low_vram): the one a preview runs first must be on the device
            # before the pipeline starts, which reads its device from its first module.
            from aitk.trainer.placing import expert_part

            self.placement.bring(expert_part(next(iter(self.adapter.experts()))))
            with (
                self.ema.applied() if self.ema is not None else nullcontext(),
                self.adapter.preview_context(),
                self.placement.using(*parts),
            ):
                paths = render_previews(
                    self.adapter.sample_pipeline(self.process.sample.sampler),
                    self.preview_requests,
                    self.paths.samples if self.session.is_main else self._scratch_samples_dir(),
                    step,
                    decode=self.adapter.decode_latents,
                    set_multiplier=self.network.set_multiplier,
                    extra_kwargs=self.adapter.preview_kwargs,
                    prompt_kwargs=self._cached_prompt_kwargs if self.text_encoders_released else None,
                    skip=skipped,
                    fields=preview_fields(self.process.model.resolved_arch),
                )
            self.log(f"wrote {len(paths)} samples for step {step} in {time.perf_counter() - started:.1f} s")
            if self.wandb is not None:
                self.wandb.log_previews(paths, [r.prompt for r in self.preview_requests], step)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a preview size
            if isinstance(exc, torch.OutOfMemoryError):
                from aitk.trainer.memory_check import free_cached_memory

                free_cached_memory(self.session.device)
                exc = type(exc)((str(exc).strip().splitlines() or [""])[0])  # one line in the log
            self.log(f"warning: samples for step {step} failed ({type(exc).__name__}: {exc}); training goes on")
        finally:
            for module in experts:
                module.train()
            if self.fsdp is not None:
                self.fsdp.reshard()  # the gathered preview weights (EMA ones too) must not train
        self._set_status(state="training")

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        try:
            result = self._run()
            self._wait_for_everyone()
            return result
        except BaseException as exc:
            self.failure = self._record_failure(exc)
            self._finish_wandb(self.failure.exit_code, "error")
            raise
        finally:
            if getattr(self, "data", None) is not None:
                self.data.close()
            if getattr(self, "log", None) is not None:
                self.log.close()

    def _finish_wandb(self, exit_code: int, state: str) -> None:
        if self.wandb is not None:
            wandb_run, self.wandb = self.wandb, None
            wandb_run.finish(exit_code, state)

    def _start_reporting(self, resumed: bool) -> None:
        """The step timer (performance_log_every), W&B (logging.use_wandb) and the verbose set-up
        lines; only the main process reports."""
        main = self.session.is_main
        self.timer = StepTimer(
            main and self.process.performance_log_every is not None, self.session.device,
            offloaders=lambda: [p.offloader for p in self.placement.parts.values() if p.offloader is not None],
        )
        logging_cfg = self.process.logging
        if main and logging_cfg.verbose:
            from aitk.trainer.setup_report import setup_lines

            for line in setup_lines(self):
                self.log(line)
        if main and logging_cfg.use_wandb:
            from aitk.trainer.wandb_run import WandbRun

            self.wandb = WandbRun.start(
                root=self.paths.root, job_name=self.job.config.name, project=logging_cfg.project_name,
                run_name=logging_cfg.run_name, config=self.job.model_dump(mode="json"), resumed=resumed,
                log=self.log,
            )

    def _wait_for_everyone(self) -> None:
        """Processes leave together: a process that exits while the main one is still saving or
        sampling can take the process group down with it (seen as SIGABRT under load)."""
        if getattr(self, "session", None) is not None and self.session.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()

    def _stop_requested_here(self) -> bool:
        """A stop seen by this process alone; with several processes the step's all-reduce
        decides, so that every process stops at the same step."""
        return self.session.world_size == 1 and self.stop.requested is not None

    def _metrics_record(
        self, step_index: int, loss: float, grad_norm: float, lrs: list[float], samples: int, step_time: float,
        expert: str | None, health: dict[str, Any],
    ) -> dict[str, Any]:
        # the groups this step trained (only the active expert's for WAN 2.2)
        sizes = [
            n if group.get("expert") in (None, expert) else 0
            for group, n in zip(self.optimizer.param_groups, self.group_sizes)
        ]
        return {
            "step": step_index,
            "timestamp": iso_now(),
            "loss": loss,
            "grad_norm": grad_norm,
            "step_time_s": step_time,
            "samples_per_s": samples / step_time if step_time > 0 else None,
            "expert": expert,
            # docs/outputs.md: the mean over trainable elements (groups weighted by their size)
            "learning_rate": sum(lr * n for lr, n in zip(lrs, sizes)) / max(1, sum(sizes)),
            **{f"lr_{i}": lr for i, lr in enumerate(lrs)},
            **health,  # gradient_stability(_avg), alpha_enabled and the phase fields
            "update_skipped": self.update_skipped,
            "nonfinite_steps": self.state.nonfinite_steps,
            **({"loss_scale": self.loss_scale} if self.loss_scale is not None else {}),
        }

    def _run(self) -> RunResult:
        self._setup()
        if self.grad_scaler is not None:  # fp16: GradScaler unscales fp32 gradients only, so the
            for param in self.params:  # trained weights are fp32 masters (the fp16 base runs in autocast)
                param.data = param.data.float()
        resumed = self._resume()
        total = self.train_cfg.steps
        if resumed and self.state.step >= total:
            from aitk.trainer.lora_files import lora_paths

            finals = lora_paths(self.paths, None, self.network)
            self._write_missing_final_files(finals)  # e.g. the final file was deleted: the checkpoint has it
            self._set_status(state="completed", step=self.state.step, force=True)
            self.log(f"{self.job.config.name} already finished {self.state.step} steps; nothing to do")
            return RunResult("completed", self.state.step, finals[0], self.paths.root, finals)
        self._check_disk_space()
        metrics = (
            MetricsWriter(self.paths.metrics, self.state.step if resumed else None, warn=self.log)
            if self.session.is_main
            else None
        )
        self._start_reporting(resumed)
        if self.data.needs_latent_cache:
            self._set_status(state="caching")
            with self.placement.using(*self.adapter.latent_encoder_names):
                self.data.cache_latents(self.adapter.encode_images, self.adapter.latent_space_id())
        self._cache_text_embeddings()
        sample_cfg = self.process.sample
        first_wanted = (not resumed and self.state.step == 0) or self.train_cfg.force_first_sample
        if first_wanted and not self.train_cfg.skip_first_sample:  # force_first_sample: on resume too
            self._sample(self.state.step)

        from tqdm import tqdm

        bar = tqdm(
            total=total, initial=self.state.step, disable=not self.session.is_main,
            dynamic_ncols=True, unit="step",
        )
        logging_cfg = self.process.logging
        reporter = StepReporter(
            metrics=metrics, log=self.log,
            show_loss=lambda loss, lr: bar.set_postfix(
                loss="n/a" if loss is None else f"{loss:.4f}", lr="n/a" if lr is None else f"{lr:.2e}", refresh=False
            ),
            total_steps=total, log_every=logging_cfg.log_every, verbose=logging_cfg.verbose,
            performance_every=self.process.performance_log_every, wandb=self.wandb,
        ) if self.session.is_main else None
        self._set_status(state="training", step=self.state.step)
        startup_gc.resume()  # what start-up made is frozen; the steps' garbage is collected (aitk/startup_gc.py)
        started_at = time.perf_counter()
        first_step = self.state.step
        stopped = False
        while self.state.step < total:
            if self._stop_requested_here():  # e.g. Ctrl+C during a save, a sample or set-up
                stopped = True
                break
            self.timer.begin_step()
            step_started = time.perf_counter()
            expert = self.active_expert
            try:
                loss, grad_norm, lrs, samples, stop, stability = self._optimizer_step()
            except torch.OutOfMemoryError as exc:
                out_of_memory: str | None = str(exc)
            else:
                out_of_memory = None
            if out_of_memory is not None:  # outside the handler: the failed step's tensors are unreachable
                raise self._out_of_memory(out_of_memory)
            health = self.health.after_step(expert, self.state.step, loss, stability)
            if self.requests and self.session.is_main:
                self.controls.done(self.requests)  # consumed even when the run ends at this step
            self.state.step += 1
            timings = self.timer.end_step()
            step_time = time.perf_counter() - step_started
            if self.train_cfg.compile and self.state.step == first_step + 1:
                self.log(f"train.compile: the first step took {step_time:.1f} s (the blocks compiled in it)")
            if reporter is not None:
                record = self._metrics_record(
                    self.state.step - 1, loss, grad_norm, lrs, samples, step_time, expert, health
                )
                reporter.step_done({**record, **timings}, self.state.step)
            speed = (self.state.step - first_step) / (time.perf_counter() - started_at)
            bar.update(1)
            self._set_status(step=self.state.step, speed=speed, eta_s=(total - self.state.step) / speed,
                             nonfinite_steps=self.state.nonfinite_steps)
            if self.on_step_end is not None:
                self.on_step_end(self, self.state.step)
            if self.rollback_pending:  # train.nan_policy rollback
                self.rollback_pending = False
                self._roll_back()
                if metrics is not None:
                    metrics.rewind(self.state.step)  # each step appears once, as on resume
                bar.n = self.state.step
                bar.refresh()
                first_step, started_at = self.state.step, time.perf_counter()
                continue
            if self.state.step >= total:
                break  # a stop asked for during the last step changes nothing: the run completes
            if stop or self._stop_requested_here():
                stopped = True
                break
            if self.state.step % self.process.save.save_every == 0 or "save_now" in self.requests:
                self._save_checkpoint()
            if (sample_cfg is not None and self.state.step % sample_cfg.sample_every == 0
                    and self.state.step >= sample_cfg.sample_start_step) or "sample_now" in self.requests:
                self._sample(self.state.step)

        bar.close()

        if reporter is not None:
            reporter.finish(self.state.step)
        if metrics is not None:
            metrics.close()
        if self.state.step > first_step:  # nothing new to save when stopped before any step
            self._save_checkpoint(final=not stopped)
        if stopped:
            self._set_status(state="stopped", step=self.state.step, force=True)
            self.log(
                f"stopped at step {self.state.step} of {total}; checkpoint saved in {self.paths.checkpoints}. "
                "Run the same job again to resume from there."
            )
            self._finish_wandb(0, "stopped")
            return RunResult("stopped", self.state.step, None, self.paths.root)
        self._sample(self.state.step)
        self._set_status(state="completed", step=self.state.step, eta_s=0, force=True)
        from aitk.trainer.lora_files import lora_paths

        finals = lora_paths(self.paths, None, self.network)
        self.log(f"training complete: {', '.join(str(p) for p in finals)}")
        if self.session.is_main:
            from aitk.trainer.publish import publish_run

            # never raises: a failed upload is one warning with the retry command; the run stays completed
            publish_run(self.job, self.process, output_dir=self.paths.root, lora_files=finals,
                        job_path=self.job_path, log=self.log)
        self._finish_wandb(0, "completed")
        return RunResult("completed", self.state.step, finals[0], self.paths.root, finals)

