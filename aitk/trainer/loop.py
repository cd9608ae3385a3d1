"""The training loop: steps, accumulation, and the cadence of save / sample / log.

It knows no architecture by name: everything model-specific goes through the ModelAdapter.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import JobFile, ProcessConfig
from aitk.fsutil import atomic_copy
from aitk.models.base import BatchContext, ModelAdapter
from aitk.trainer.conditioning import PromptConditioner
from aitk.trainer import checkpoint as ckpt
from aitk.trainer.reporting import MetricsWriter, RunLog, StatusFile, iso_now
from aitk.trainer.session import RunPaths, Session, start_session, torch_dtype
from aitk.trainer.state import CheckpointContent, TrainerState, read_content, write_content
from aitk.trainer.stop import StopController

MAX_NONFINITE_IN_A_ROW = 10
TEXT_CACHE_DIR_NAME = "_text_cache"  # in the first dataset's folder, next to _latent_cache


class TrainingAborted(RuntimeError):
    """The run cannot go on (e.g. the loss stays NaN); the last good checkpoint is kept."""


@dataclass
class RunResult:
    state: str  # completed | stopped
    step: int
    final_lora: Path | None
    output_dir: Path
    final_loras: list[Path] = field(default_factory=list)  # one per network (per expert for WAN 2.2)


class Trainer:
    def __init__(
        self,
        job: JobFile,
        process: ProcessConfig,
        *,
        stop: StopController | None = None,
        on_step_end: Callable[["Trainer", int], None] | None = None,
        checkpoint_pause_hook: Callable[[Path], None] | None = None,
    ) -> None:
        self.job = job
        self.process = process
        self.train_cfg = process.train
        self.stop = stop or StopController()
        self.on_step_end = on_step_end
        self.checkpoint_pause_hook = checkpoint_pause_hook or ckpt.pause_hook_from_env()
        self.paths = RunPaths(Path(process.training_folder) / job.config.name, job.config.name)
        self.state = TrainerState()
        self.text_encoders_released = False

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        from aitk.config.loader import dump_job
        from aitk.config.support import unsupported_failures
        from aitk.data import TrainingData
        from aitk.models.registry import create_adapter

        failures = unsupported_failures(self.job)
        if failures:
            raise TrainingAborted("this job asks for what this version cannot do yet:\n  " + "\n  ".join(failures))

        self.session: Session = start_session(self.process)
        self.grad_scaler = self.session.grad_scaler()
        main = self.session.is_main
        if main:
            self.paths.root.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(self.paths.log, enabled=main)
        self.log(
            f"{self.job.config.name}: device {self.session.device}, "
            f"{self.session.world_size} process{'es' if self.session.world_size > 1 else ''}, "
            f"precision {self.session.mixed_precision if self.session.mixed_precision != 'no' else 'fp32'}"
        )
        for note in self.session.notes:
            self.log(f"note: {note}")
        self.status = StatusFile(self.paths.status, self.train_cfg.steps) if main else None
        self._set_status(state="starting")
        if main:
            self.paths.config.write_text(dump_job(self.job))

        seed = self.process.training_seed if self.process.training_seed is not None else 42
        self.seed = seed
        from aitk.trainer.rng import seed_everything

        seed_everything(seed + self.session.rank)
        self.noise_generator = torch.Generator(device="cpu").manual_seed(seed + self.session.rank)

        adapter_cls = self._adapter_class()
        self.data = TrainingData(
            self.process.datasets,
            trigger_word=self.process.trigger_word,
            divisibility=adapter_cls.bucket_divisibility,
            batch_size=self.train_cfg.batch_size,
            seed=seed,
            rank=self.session.rank,
            world_size=self.session.world_size,
            log=self.log,
            frame_rule=adapter_cls.frame_rule,
        )
        for line in self.data.summary_lines:
            self.log(line)

        self.log(f"loading model {self.process.model.name_or_path}")
        self.adapter: ModelAdapter = create_adapter(
            self.process.model, self.session.device, self.session.weight_dtype
        )
        self.adapter.load()
        if self.process.model.quantize:
            self._quantize_base()
        if not self.adapter.uses_controls:
            for index, dataset in enumerate(self.process.datasets):
                if dataset.control_path:
                    self.log(
                        f"warning: datasets[{index}].control_path: {self.process.model.resolved_arch} does not "
                        "take control images (edit models such as flux_kontext do); they are not used"
                    )
        self.conditioner = PromptConditioner(self.adapter, self._text_cache())
        self.preview_requests = self._preview_requests()
        self._setup_network()
        self._setup_optimizer()

    def _quantize_base(self) -> None:
        from aitk.models.quantize import QuantizeError, quantize_frozen

        qtype = self.process.model.qtype
        try:
            for name, module in self.adapter.experts().items():
                count = quantize_frozen(module, qtype)
                which = "" if name == "main" else f" ({name})"
                self.log(f"quantized {count} linear layers of the base model{which} to {qtype or 'qfloat8'}")
        except (QuantizeError, ImportError) as exc:
            raise TrainingAborted(str(exc)) from exc

    def _text_cache(self) -> Any:
        """The text-embedding cache when cache_text_embeddings is on (train: or any dataset)."""
        datasets = self.process.datasets
        if not (self.train_cfg.cache_text_embeddings or any(d.cache_text_embeddings for d in datasets)):
            return None
        from aitk.data.text_cache import TextEmbeddingCache

        folder = Path(datasets[0].folder_path).expanduser() / TEXT_CACHE_DIR_NAME
        return TextEmbeddingCache(folder, self.adapter.text_encoder_id(), log=self.log)

    def _cache_text_embeddings(self) -> None:
        """Encode every caption a draw can produce, and the preview prompts, before training."""
        if self.conditioner.text_cache is None:
            return
        captions = self.data.all_captions()
        if captions is None:
            self.log(
                "warning: cache_text_embeddings: shuffle_tokens / token_dropout_rate make a new caption "
                "for every draw, so captions are encoded as they come (kept in memory)"
            )
            return
        prompts = {r.prompt for r in self.preview_requests} | {r.negative for r in self.preview_requests}
        wanted = list(dict.fromkeys(captions + sorted(prompts)))
        from tqdm import tqdm

        self._set_status(state="caching")
        with tqdm(total=len(wanted), desc="caching text embeddings", unit="caption",
                  disable=not self.session.is_main) as bar:
            encoded = self.conditioner.precompute(wanted, progress=bar.update)
        self.log(f"text-embedding cache: {encoded} captions encoded, {len(wanted) - encoded} reused")
        # Every prompt a step or a preview can ask for is cached: the text encoders can go.
        freed = self.adapter.release_text_encoders()
        if freed:
            self.text_encoders_released = True
            self.log(f"text encoders released after caching ({freed / 2**20:.0f} MiB of weights)")

    def _cached_prompt_kwargs(self, request: Any) -> dict[str, Any]:
        return self.adapter.preview_prompt_kwargs(
            self.conditioner([request.prompt]), self.conditioner([request.negative])
        )

    def _preview_requests(self) -> list[Any]:
        from aitk.trainer.sampling import preview_requests

        sample_cfg = self.process.sample
        if sample_cfg is None or self.train_cfg.disable_sampling:
            return []
        return preview_requests(sample_cfg, self.process.trigger_word)

    def _adapter_class(self) -> type[ModelAdapter]:
        from aitk.models.registry import adapter_class

        return adapter_class(self.process.model.resolved_arch)

    def _setup_network(self) -> None:
        from aitk.networks import inject_network

        net_cfg = self.process.network
        if net_cfg is None:
            raise TrainingAborted(
                "network: is missing; full fine-tuning is not supported yet. Add e.g. "
                "`network: {type: lora, linear: 16, linear_alpha: 16}`"
            )
        from aitk.networks.group import SINGLE, NetworkGroup

        include_conv = net_cfg.conv_rank is not None
        experts = self.adapter.experts()
        trained = self.adapter.trained_experts()
        networks = {}
        for expert in trained:
            networks[expert if len(experts) > 1 else SINGLE] = inject_network(
                experts[expert],
                linear_rank=net_cfg.linear_rank,
                linear_alpha=net_cfg.linear_alpha_value,
                conv_rank=net_cfg.conv_rank,
                conv_alpha=net_cfg.conv_alpha_value,
                dropout=net_cfg.dropout,
                only_if_contains=net_cfg.network_kwargs.only_if_contains,
                ignore_if_contains=net_cfg.network_kwargs.ignore_if_contains,
                candidates=self.adapter.network_candidates(include_conv),
                seed=self.seed,
            )
        self.network = NetworkGroup(networks)
        self.params = self.network.trainable_parameters()
        for name, handle in self.network.items():
            count = sum(p.numel() for p in handle.trainable_parameters())
            which = "" if self.network.is_single else f" ({name} expert)"
            self.log(
                f"network{which}: {len(handle.wrapped_module_names())} modules wrapped, "
                f"{count:,} trainable parameters"
            )
        from aitk.trainer.experts import ExpertRotation

        self.rotation = ExpertRotation(
            [] if self.network.is_single else list(self.network), self.train_cfg.switch_boundary_every
        )
        if not self.network.is_single:
            self.log(f"experts: {self.rotation.describe()}")
        denoiser = self.adapter.denoiser()
        for module in experts.values():
            if self.train_cfg.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            module.train()  # network dropout; the frozen base has no dropout in these models

    def _setup_optimizer(self) -> None:
        from aitk.optim import build_lr_scheduler, build_optimizer

        cfg = self.train_cfg
        lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.lr
        from aitk.trainer.experts import expert_learning_rate

        groups = [
            {"params": self.network.trainable_parameters(name), "lr": expert_learning_rate(name, lr, cfg.optimizer_params)}
            for name in self.network
        ]
        self.optimizer = build_optimizer(cfg.optimizer, groups, lr=lr, optimizer_params=cfg.optimizer_params)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer,
            cfg.lr_scheduler,
            total_steps=cfg.steps,
            warmup_steps=cfg.lr_warmup_steps,
            params=cfg.lr_scheduler_params,
        )
        from aitk.optim import NetworkEMA

        self.ema = NetworkEMA.from_config(self.network.named_trainable_parameters(), cfg.ema_config)

    # ------------------------------------------------------------------ resume
    def _signature(self) -> dict[str, Any]:
        from aitk.trainer.resume import run_signature

        return run_signature(self.process, self.network.wrapped_module_names(), list(self.network))

    def _resume(self) -> bool:
        from aitk.trainer.resume import IncompatibleCheckpoint, check_signature, choose_checkpoint
        from aitk.trainer.rng import restore_rng

        found = choose_checkpoint(
            self.paths.checkpoints, is_main=self.session.is_main,
            world_size=self.session.world_size, warn=self.log,
        )
        if found is None:
            return False
        content = read_content(found.path)
        try:
            check_signature(content.state.signature, self._signature(), found.path)
            self.network.load_network_state_dict(content.network)
            self.optimizer.load_state_dict(content.optimizer)
        except (IncompatibleCheckpoint, KeyError, ValueError, RuntimeError) as exc:
            raise TrainingAborted(f"cannot resume from {found.path}: {exc}") from exc
        self.lr_scheduler.load_state_dict(content.lr_scheduler)
        if self.ema is not None and content.ema is not None:
            self.ema.load_state_dict(content.ema)
        if self.grad_scaler is not None and content.grad_scaler is not None:
            self.grad_scaler.load_state_dict(content.grad_scaler)
        self.state = content.state
        self.data.load_state_dict(content.state.data)
        rank = self.session.rank
        if rank < len(content.rng_per_rank):
            restore_rng(content.rng_per_rank[rank], self.noise_generator)
        else:
            self.log(f"warning: the checkpoint has no random state for process {rank}; reseeding it")
        self.log(f"resuming from {found.path} (step {self.state.step} of {self.train_cfg.steps})")
        self._set_status(last_checkpoint=str(found.path), step=self.state.step)
        return True

    # ------------------------------------------------------------------ status
    def _set_status(self, **fields: Any) -> None:
        if self.status is not None:
            self.status.update(**fields)

    # ------------------------------------------------------------------ one step
    def _micro_step(self, scale: float) -> tuple[float, int]:
        from aitk.trainer.loss import diffusion_loss, latent_mask

        batch = self.data.next_batch()
        if batch.latents is not None:
            latents = batch.latents.to(self.session.device)
        else:
            latents = self.adapter.encode_images(batch.pixels)
        cond = self.conditioner(batch.captions)
        noisy = self.adapter.make_noisy_batch(
            latents, self.train_cfg, self.noise_generator, self._batch_context(batch)
        )
        weights = batch.loss_multiplier.to(self.session.device)
        if noisy.loss_weights is not None:
            weights = weights * noisy.loss_weights
        with self.session.autocast():
            prediction = self.adapter.predict(noisy, cond)
        mask = None
        if batch.masks is not None:
            mask = latent_mask(batch.masks.to(self.session.device), noisy.target)
        loss = diffusion_loss(
            prediction.float(),
            noisy.target.float(),
            loss_type=self.train_cfg.loss_type,
            huber_c=self.train_cfg.huber_c,
            sample_weights=weights,
            mask=mask,
        )
        scaled = loss * scale
        (self.grad_scaler.scale(scaled) if self.grad_scaler is not None else scaled).backward()
        return loss.item(), latents.shape[0]

    def _batch_context(self, batch: Any) -> BatchContext:
        device = self.session.device
        bucket = batch.bucket_size
        return BatchContext(
            original_sizes=list(batch.original_sizes),
            crops_top_left=list(batch.crops_top_left),
            target_sizes=[bucket] * len(batch) if bucket is not None else [],
            controls=batch.controls.to(device) if batch.controls is not None else None,
            first_frames=batch.first_frames.to(device) if batch.first_frames is not None else None,
            expert=self.active_expert,
        )

    def _sync(self, loss: float) -> tuple[float, bool]:
        """Average gradients and loss over processes; agree on stopping (one all-reduce)."""
        stop_flag = 1.0 if self.stop.requested else 0.0
        if self.session.world_size == 1:
            return loss, bool(stop_flag)
        import torch.distributed as dist

        params = self._step_params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss, stop_flag])])
        flat = flat.to(self.session.device)
        dist.all_reduce(flat)
        flat /= self.session.world_size
        offset = 0
        for param, grad in zip(params, grads):
            n = grad.numel()
            param.grad = flat[offset : offset + n].view_as(param).to(param.dtype)
            offset += n
        return flat[-2].item(), flat[-1].item() > 0

    @property
    def active_expert(self) -> str | None:
        """The expert trained at the current step (None for single-model runs)."""
        return self.rotation.active(self.state.step)

    def _step_params(self) -> list[torch.nn.Parameter]:
        """Parameters this step trains: the active expert's only, so the other's stay untouched."""
        expert = self.active_expert
        return self.params if expert is None else self.network.trainable_parameters(expert)

    def _optimizer_step(self) -> tuple[float, float, list[float], int, bool]:
        accumulation = self.train_cfg.accumulation_steps
        losses, samples = [], 0
        for _ in range(accumulation):
            loss, count = self._micro_step(1.0 / accumulation)
            losses.append(loss)
            samples += count
        mean_loss, stop = self._sync(sum(losses) / len(losses))
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.train_cfg.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self._step_params(), max_norm if max_norm and max_norm > 0 else float("inf")
        ).item()
        # With fp16 loss scaling an overflowing gradient is routine: the scaler skips that update
        # and lowers its scale. Anything else non-finite is a bad step.
        if not math.isfinite(mean_loss) or (scaler is None and not math.isfinite(grad_norm)):
            # Skip the update so one bad batch cannot poison the weights; the checkpoint stays good.
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            self.state.nonfinite_in_a_row += 1
            self.log(
                f"warning: step {self.state.step}: loss or gradient is not finite "
                f"(loss={mean_loss}, grad_norm={grad_norm}); the update was skipped"
            )
            if self.state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise TrainingAborted(
                    f"the loss was not finite for {MAX_NONFINITE_IN_A_ROW} steps in a row; lower "
                    "train.lr, set train.max_grad_norm, or use train.dtype fp32/bf16 instead of fp16"
                )
        else:
            self.state.nonfinite_in_a_row = 0
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
        lrs = [group["lr"] for group in self.optimizer.param_groups]  # the rates this step used
        self.lr_scheduler.step()
        return mean_loss, grad_norm, lrs, samples * self.session.world_size, stop

    # ------------------------------------------------------------------ save & sample
    def _save_lora(self, step: int | None) -> list[Path]:
        from aitk.trainer.lora_files import write_lora_files

        shown_step = self.state.step if step is None else step
        with self.ema.applied() if self.ema is not None else nullcontext():
            return write_lora_files(
                self.paths, step, shown_step, self.network, self.job, self.process, self.adapter
            )

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
        step = self.state.step
        rng = self._gather_rng()  # every process takes part; only the main one writes
        if not self.session.is_main:
            return
        self._set_status(state="saving")
        self.state.data = self.data.state_dict()
        self.state.signature = self._signature()
        loras = self._save_lora(None if final else step)
        if final:
            # The final file is also kept under its step name, so pruning never leaves a gap.
            from aitk.trainer.lora_files import lora_paths

            for lora, stepped in zip(loras, lora_paths(self.paths, step, self.network)):
                atomic_copy(lora, stepped)
        content = CheckpointContent(
            state=self.state,
            network=self.network.network_state_dict(),
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(),
            rng_per_rank=rng,
            ema=self.ema.state_dict() if self.ema is not None else None,
            grad_scaler=self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
        )
        folder = ckpt.write_checkpoint(
            self.paths.checkpoints,
            step,
            lambda tmp: write_content(tmp, content),
            pause_hook=self.checkpoint_pause_hook,
        )
        self._prune()
        self._set_status(state="training", last_checkpoint=str(folder), force=True)
        self.log(f"saved {', '.join(p.name for p in loras)} and checkpoint {folder.name} at step {step}")

    def _prune(self) -> None:
        keep = self.process.save.max_step_saves_to_keep
        if keep <= 0:
            return
        import shutil

        from aitk.trainer.lora_files import lora_paths

        for info in ckpt.list_checkpoints(self.paths.checkpoints)[keep:]:
            shutil.rmtree(info.path, ignore_errors=True)
            for path in lora_paths(self.paths, info.step, self.network):
                path.unlink(missing_ok=True)

    def _sample(self, step: int) -> None:
        """Previews are a view of the run, never a reason to lose it: a failure is a warning."""
        if not self.preview_requests or not self.session.is_main:
            return
        from aitk.trainer.sampling import render_previews

        self._set_status(state="sampling")
        experts = list(self.adapter.experts().values())
        for module in experts:
            module.eval()
        started = time.perf_counter()
        try:
            with self.ema.applied() if self.ema is not None else nullcontext(), self.adapter.preview_context():
                paths = render_previews(
                    self.adapter.sample_pipeline(self.process.sample.sampler),
                    self.preview_requests,
                    self.paths.samples,
                    step,
                    decode=self.adapter.decode_latents,
                    set_multiplier=self.network.set_multiplier,
                    extra_kwargs=self.adapter.preview_kwargs,
                    prompt_kwargs=self._cached_prompt_kwargs if self.text_encoders_released else None,
                )
            self.log(f"wrote {len(paths)} samples for step {step} in {time.perf_counter() - started:.1f} s")
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a preview size
            self.log(f"warning: samples for step {step} failed ({type(exc).__name__}: {exc}); training goes on")
        finally:
            for module in experts:
                module.train()
        self._set_status(state="training")

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        try:
            return self._run()
        except BaseException as exc:
            if getattr(self, "status", None) is not None:
                self._set_status(state="error", error=str(exc) or type(exc).__name__, force=True)
            raise
        finally:
            if getattr(self, "data", None) is not None:
                self.data.close()
            if getattr(self, "log", None) is not None:
                self.log.close()

    def _stop_requested_here(self) -> bool:
        """A stop seen by this process alone; with several processes the step's all-reduce
        decides, so that every process stops at the same step."""
        return self.session.world_size == 1 and self.stop.requested is not None

    def _metrics_record(
        self, step_index: int, loss: float, grad_norm: float, lrs: list[float], samples: int, step_time: float,
        expert: str | None = None,
    ) -> dict[str, Any]:
        return {
            "step": step_index,
            "timestamp": iso_now(),
            "loss": loss,
            "grad_norm": grad_norm,
            "step_time_s": step_time,
            "samples_per_s": samples / step_time if step_time > 0 else None,
            "gradient_stability": None,  # arrives with alpha scheduling (#5)
            "gradient_stability_avg": None,
            "expert": expert,
            "learning_rate": lrs[0] if len(lrs) == 1 else sum(lrs) / len(lrs),
            **{f"lr_{i}": lr for i, lr in enumerate(lrs)},
            "alpha_enabled": False,
        }

    def _run(self) -> RunResult:
        self._setup()
        resumed = self._resume()
        total = self.train_cfg.steps
        if resumed and self.state.step >= total:
            final = self.paths.lora_file(None)
            from aitk.trainer.lora_files import lora_paths

            if self.session.is_main and not all(p.exists() for p in lora_paths(self.paths, None, self.network)):
                self._save_lora(None)  # e.g. the final file was deleted: the checkpoint has it
            self._set_status(state="completed", step=self.state.step, force=True)
            self.log(f"{self.job.config.name} already finished {self.state.step} steps; nothing to do")
            return RunResult("completed", self.state.step, final, self.paths.root)
        metrics = (
            MetricsWriter(self.paths.metrics, self.state.step if resumed else None)
            if self.session.is_main
            else None
        )
        if self.data.needs_latent_cache:
            self._set_status(state="caching")
            self.data.cache_latents(self.adapter.encode_images, self.adapter.latent_space_id())
        self._cache_text_embeddings()
        sample_cfg = self.process.sample
        if not resumed and not self.train_cfg.skip_first_sample and self.state.step == 0:
            self._sample(0)

        from tqdm import tqdm

        bar = tqdm(
            total=total, initial=self.state.step, disable=not self.session.is_main,
            dynamic_ncols=True, unit="step",
        )
        self._set_status(state="training", step=self.state.step)
        started_at = time.perf_counter()
        first_step = self.state.step
        stopped = False
        while self.state.step < total:
            if self._stop_requested_here():  # e.g. Ctrl+C during a save, a sample or set-up
                stopped = True
                break
            step_started = time.perf_counter()
            expert = self.active_expert
            loss, grad_norm, lrs, samples, stop = self._optimizer_step()
            self.state.step += 1
            step_time = time.perf_counter() - step_started
            if metrics is not None:
                metrics.write(
                    self._metrics_record(self.state.step - 1, loss, grad_norm, lrs, samples, step_time, expert)
                )
            speed = (self.state.step - first_step) / (time.perf_counter() - started_at)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", refresh=False)
            bar.update(1)
            self._set_status(step=self.state.step, speed=speed, eta_s=(total - self.state.step) / speed)
            if self.on_step_end is not None:
                self.on_step_end(self, self.state.step)
            if self.state.step >= total:
                break  # a stop asked for during the last step changes nothing: the run completes
            if stop or self._stop_requested_here():
                stopped = True
                break
            if self.state.step % self.process.save.save_every == 0:
                self._save_checkpoint()
            if sample_cfg is not None and self.state.step % sample_cfg.sample_every == 0:
                self._sample(self.state.step)
        bar.close()

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
            return RunResult("stopped", self.state.step, None, self.paths.root)
        self._sample(self.state.step)
        self._set_status(state="completed", step=self.state.step, eta_s=0, force=True)
        from aitk.trainer.lora_files import lora_paths

        finals = lora_paths(self.paths, None, self.network)
        self.log(f"training complete: {', '.join(str(p) for p in finals)}")
        return RunResult("completed", self.state.step, finals[0], self.paths.root, finals)
