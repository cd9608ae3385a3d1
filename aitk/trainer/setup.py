"""Trainer set-up: data, model, quantization, text-embedding cache, networks, optimizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aitk.models.base import ModelAdapter
from aitk.trainer.conditioning import PromptConditioner
from aitk.trainer.errors import TrainingAborted
from aitk.trainer.reporting import RunLog, StatusFile
from aitk.trainer.session import Session, start_session

TEXT_CACHE_DIR_NAME = "_text_cache"  # in the first dataset's folder, next to _latent_cache
# kohya / diffusers / our own text-encoder key prefixes, skipped when continuing from a LoRA
TEXT_ENCODER_KEY_PREFIXES = ("lora_te", "text_encoder", "te1.", "te2.", "text_encoders.")


class TrainerSetup:
    """Mixin of `aitk.trainer.loop.Trainer`: everything done once before the first step."""

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
        for warning in self._job_warnings():
            self.log(f"warning: {warning}")
        self.status = StatusFile(self.paths.status, self.train_cfg.steps, warn=self.log) if main else None
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
            pin_memory=torch.device(self.session.device).type == "cuda",  # copies to the GPU overlap the step
        )
        for line in self.data.summary_lines:
            self.log(line)

        from aitk.hub_files import HubFileError, prepare_job_downloads

        try:  # the job's token (.env) for every download; a gated / missing hub model stops here
            prepare_job_downloads(self.job_path, self.process.model.name_or_path)
        except HubFileError as exc:
            raise TrainingAborted(str(exc), reason="model") from exc
        from aitk.trainer.memory_check import PlanCheck

        self.plan_check = PlanCheck(
            self.job, self.process, self.session.device,
            str(self.job_path) if self.job_path else "job.yaml", self.log,
        )
        self.plan_check.start()  # plans while the model loads (GPU runs only)
        self.log(f"loading model {self.process.model.name_or_path}")
        self.adapter: ModelAdapter = create_adapter(
            self.process.model, self.session.device, self.session.weight_dtype
        )
        self.adapter.load()
        try:  # what only the loaded model can tell, before any preview or step
            self.adapter.check_train_settings(self.train_cfg)
        except ValueError as exc:
            raise TrainingAborted(str(exc)) from exc
        from aitk.models.attention import apply_attention_backend

        apply_attention_backend(self.adapter, self.train_cfg, self.log)  # one log line: what runs, or why not
        self._place_model()
        self.conditioner = PromptConditioner(
            self.adapter, self._text_cache(),
            encoding=lambda: self.placement.using(*self.adapter.text_encoders()),
        )
        self.preview_requests = self._preview_requests()
        sample_cfg = self.process.sample
        if self.preview_requests and sample_cfg is not None and "sampler" in sample_cfg.model_fields_set:
            note = self.adapter.preview_sampler_note(sample_cfg.sampler)
            if note:
                self.log(f"note: sample.sampler {sample_cfg.sampler!r}: previews use {note}")
        self._setup_network()
        self.placement.move_trainable(self.params)  # made next to host-side base weights
        self._apply_speed_switches()
        self._setup_optimizer()
        self.plan_check.report()

    def _apply_speed_switches(self) -> None:
        """train.allow_tf32, channels_last and compile (aitk/trainer/speed.py), once the networks
        are in the denoisers (compiled blocks include their LoRA layers)."""
        from aitk.trainer import speed

        cfg = self.train_cfg
        notes = [speed.apply_tf32(cfg.allow_tf32, self.session.device)]
        for module in self.adapter.experts().values():
            notes.append(speed.apply_channels_last(module, cfg.channels_last))
            if cfg.compile:
                blocks = self.adapter.offload_blocks(module)
                if blocks:
                    speed.compile_blocks(blocks)
                    self.log(f"train.compile: {len(blocks)} blocks of {type(module).__name__} compile during the "
                             "first step")
                else:
                    notes.append(f"train.compile: {type(module).__name__} names no repeated blocks; it runs as is")
        for note in filter(None, notes):
            self.log(f"note: {note}")

    def _job_warnings(self) -> list[str]:
        """The job file's "not supported" warnings about this process entry (`aitk validate`
        prints the same), so the run's log has them too."""
        from aitk.config.support import render_path, unsupported_warnings

        index = next(i for i, p in enumerate(self.job.config.process) if p is self.process)
        prefix = render_path(("config", "process", index)) + "."
        return [w for w in unsupported_warnings(self.job) if w.startswith(prefix)]

    def _place_model(self) -> None:
        """Bring the loaded (host) parts to the device as the memory settings say, quantizing on
        the way (aitk.trainer.placing, aitk.trainer.quantizing)."""
        from aitk.hub_files import HubFileError
        from aitk.models.offload import DeviceLedger
        from aitk.models.quantize import QuantizeError
        from aitk.models.recovery import RecoveryAdapterError
        from aitk.trainer.placing import place_adapter, step_part_names
        from aitk.trainer.quantizing import BaseQuantization

        model_cfg = self.process.model
        latents_cached = all(d.cache_latents or d.cache_latents_to_disk for d in self.process.datasets)
        self.device_ledger = DeviceLedger()  # what the placement put on the device (tests read it)
        try:
            quantization = BaseQuantization(
                self.adapter, model_cfg, has_network=self.process.network is not None,
                job_path=self.job_path, log=self.log,
            )
            self.placement = place_adapter(
                self.adapter, model_cfg,
                text_cached=self._text_cache_wanted() or self.train_cfg.unload_text_encoder,
                latents_cached=latents_cached,
                device=self.session.device,
                fully_trained=frozenset() if self.process.network else frozenset(self.adapter.trained_experts()),
                sharded=self.session.fsdp is not None,
                quantizer=quantization.quantizer,
                after_quantize=quantization.after_quantize, ledger=self.device_ledger, log=self.log,
            )
        except (QuantizeError, ImportError, HubFileError, RecoveryAdapterError) as exc:
            raise TrainingAborted(str(exc)) from exc
        for name in self.adapter.text_encoders():
            quantization.log_part(name)
        self.step_parts = step_part_names(self.adapter, latents_cached)

    def _text_cache_wanted(self) -> bool:
        """cache_text_embeddings is on (train: or any dataset)."""
        return self.train_cfg.cache_text_embeddings or any(d.cache_text_embeddings for d in self.process.datasets)

    def _text_cache(self) -> Any:
        """The text-embedding cache when cache_text_embeddings is on."""
        datasets = self.process.datasets
        if not self._text_cache_wanted():
            return None
        from aitk.data.text_cache import TextEmbeddingCache

        folder = Path(datasets[0].folder_path).expanduser() / TEXT_CACHE_DIR_NAME
        return TextEmbeddingCache(folder, self.adapter.text_encoder_id(), log=self.log)

    def _cache_text_embeddings(self) -> None:
        """Encode every caption a draw can produce, and the preview prompts, before training (or
        with unload_text_encoder alone, the prompts that replace the captions) and release the
        text encoders."""
        if self.conditioner.text_cache is None:
            if self.train_cfg.unload_text_encoder:
                self._unload_text_encoders()
            return
        if self.train_cfg.unload_text_encoder:  # ai-toolkit too uses the cached captions then
            self.log("note: train.unload_text_encoder with cache_text_embeddings: steps use the cached caption "
                     "embeddings, not the trigger word")
        reads_controls = self.adapter.prompt_reads_controls  # then each caption with its control files
        captions = self.data.all_captions_with_controls() if reads_controls else self.data.all_captions()
        if captions is None:
            self.log(
                "warning: cache_text_embeddings: shuffle_tokens / token_dropout_rate make a new caption "
                "for every draw, so captions are encoded as they come (kept in memory)"
            )
            return
        wanted = list(dict.fromkeys([*captions, *self._preview_prompts()]))
        from tqdm import tqdm

        self._set_status(state="caching")
        with tqdm(total=len(wanted), desc="caching text embeddings", unit="caption",
                  disable=not self.session.is_main) as bar:
            encoded = self.conditioner.precompute(wanted, progress=bar.update)
        self.log(f"text-embedding cache: {encoded} captions encoded, {len(wanted) - encoded} reused")
        # Every prompt a step or a preview can ask for is cached: the text encoders can go.
        freed = self._release_text_encoders()
        if freed:
            self.log(f"text encoders released after caching ({freed / 2**20:.0f} MiB of weights)")

    def _unload_text_encoders(self) -> None:
        """train.unload_text_encoder (ai-toolkit's): the trigger word (or the blank prompt), the
        blank prompt and the preview prompts are encoded once; captions are not used after that."""
        trigger = self.process.trigger_word
        self.conditioner.use_fixed_prompts(trigger, self._preview_prompts())
        freed = self._release_text_encoders()
        prompt = f"the trigger word {trigger!r}" if trigger else "the blank prompt"
        regs = " (regularisation samples: the blank prompt)" if trigger and any(
            d.is_reg for d in self.process.datasets) else ""
        released = (f"text encoders released ({freed / 2**20:.0f} MiB of weights)" if freed
                    else "this model keeps its text encoders")
        self.log(f"unload_text_encoder: every training sample is conditioned on {prompt} in place of its "
                 f"caption{regs}; {released}")

    def _release_text_encoders(self) -> int:
        """Free the text encoders once every prompt a step or a preview can ask for is encoded;
        returns the bytes of weights freed (0: this model keeps them)."""
        for name in self.adapter.text_encoders():
            self.placement.release(name)
        freed = self.adapter.release_text_encoders()
        if freed:
            self.text_encoders_released = True
            self.conditioner.encoders_released = True
        return freed

    def _preview_prompts(self) -> list[Any]:
        """Every prompt and negative prompt of the previews (sorted, once each); with the preview's
        control image files where the model reads the prompt with them."""
        if not self.adapter.prompt_reads_controls:
            return sorted({r.prompt for r in self.preview_requests} | {r.negative for r in self.preview_requests})
        entries = []
        for request in self.preview_requests:
            files = self.adapter.preview_control_files(request)
            entries += [(request.prompt, files), (request.negative, files)]
        return list(dict.fromkeys(entries))

    def _cached_prompt_kwargs(self, request: Any) -> dict[str, Any]:
        files = [self.adapter.preview_control_files(request)]
        return self.adapter.preview_prompt_kwargs(
            self.conditioner([request.prompt], files), self.conditioner([request.negative], files)
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
        from aitk.networks.build import build_expert_networks, network_algo
        from aitk.networks.group import NetworkGroup

        net_cfg = self.process.network
        if net_cfg is None:
            self._setup_full_model()
            return

        experts = self.adapter.experts()
        try:
            algo = network_algo(net_cfg.type, net_cfg.dora)
            networks = build_expert_networks(
                self.adapter, net_cfg, seed=self.seed, warn=lambda m: self.log(f"warning: {m}")
            )
        except ValueError as exc:  # settings that select nothing or do not combine: a job error
            raise TrainingAborted(f"network: {exc}") from exc
        self.network = NetworkGroup(networks, self._text_encoder_networks())
        self.params = self.network.trainable_parameters()
        if self.session.mixed_precision != "no":
            # fp32 master weights: bf16 / fp16 is the frozen base's dtype and the autocast dtype of
            # the forward; the network's own weights, their gradients and the optimizer state stay
            # fp32, so small updates are not rounded away (mixed precision as accelerate and kohya do)
            for param in self.params:
                param.data = param.data.float()
        for name, handle in self.network.items():
            count = sum(p.numel() for p in handle.trainable_parameters())
            which = "" if self.network.is_single else f" ({name} expert)"
            self.log(
                f"network{which}: {algo}, {len(handle.wrapped_module_names())} modules wrapped, "
                f"{count:,} trainable parameters"
            )
        for name, handle in self.network.text_encoders.items():
            count = sum(p.numel() for p in handle.trainable_parameters())
            self.log(
                f"network ({name}): {algo}, {len(handle.wrapped_module_names())} modules wrapped, "
                f"{count:,} trainable parameters; alpha {handle.linear_alpha:g} (the alpha schedule "
                "acts on the denoiser's network only)"
            )
        if self.network.text_encoders:
            self.conditioner.train_text_encoders(
                [self.adapter.text_encoders()[name] for name in self.network.text_encoders]
            )
        if net_cfg.pretrained_lora_path:
            self._load_pretrained_network(net_cfg.pretrained_lora_path)
        if algo == "lokr" and net_cfg.lokr_full_rank and getattr(net_cfg.alpha_schedule, "enabled", False):
            self.log(
                "warning: network.alpha_schedule: with lokr_full_rank every LoKr factor is a full matrix, "
                "whose scale is 1 whatever the alpha (the LyCORIS convention); the schedule changes nothing"
            )
        from aitk.trainer.experts import ExpertRotation

        self.rotation = ExpertRotation(
            [] if self.network.is_single else list(self.network), self.train_cfg.switch_boundary_every
        )
        if not self.network.is_single:
            self.log(f"experts: {self.rotation.describe()}")
        from aitk.trainer.health import TrainingHealth

        self.health = TrainingHealth(self.network, net_cfg, self.log)
        for module in experts.values():
            if self.train_cfg.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            module.train()  # network dropout; the frozen base has no dropout in these models

    def _text_encoder_networks(self) -> dict[str, Any]:
        """train.train_text_encoder: a LoRA on each text encoder (aitk.networks.text_encoders)."""
        if not self.train_cfg.train_text_encoder:
            return {}
        from aitk.networks.text_encoders import build_text_encoder_networks

        try:
            return build_text_encoder_networks(self.adapter, self.process.network, seed=self.seed)
        except ValueError as exc:
            raise TrainingAborted(str(exc)) from exc

    def _setup_full_model(self) -> None:
        """No network section: fine-tune the (trained experts') denoiser weights themselves."""
        from aitk.networks.full import FullModelHandle
        from aitk.networks.group import SINGLE, NetworkGroup
        from aitk.trainer.experts import ExpertRotation
        from aitk.trainer.health import TrainingHealth

        experts = self.adapter.experts()
        handles = {
            (expert if len(experts) > 1 else SINGLE): FullModelHandle(experts[expert])
            for expert in self.adapter.trained_experts()
        }
        for module in experts.values():
            if self.train_cfg.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            module.train()
        if self.session.fsdp is not None:
            self._shard_full_model(handles)  # before the optimizer and EMA take the parameters
        self.network = NetworkGroup(handles)
        self.params = self.network.trainable_parameters()
        for name, handle in self.network.items():
            count = sum(p.numel() for p in handle.trainable_parameters())
            which = "" if self.network.is_single else f" ({name} expert)"
            self.log(f"full fine-tune{which}: {count:,} trainable parameters (no network: section)")
        self.rotation = ExpertRotation(
            [] if self.network.is_single else list(self.network), self.train_cfg.switch_boundary_every
        )
        self.health = TrainingHealth(self.network, None, self.log)

    def _shard_full_model(self, handles: dict[str, Any]) -> None:
        """FSDP2: each trained denoiser's parameters become shards over the processes."""
        from aitk.trainer.fsdp import ShardedRun

        self.fsdp = ShardedRun(
            self.session.fsdp, {name: handle.module for name, handle in handles.items()}, self.session.device,
            self.adapter.offload_blocks,
        )
        self.log(self.fsdp.describe())

    def _load_pretrained_network(self, pretrained: str) -> None:
        """network.pretrained_lora_path: start from an existing LoRA (ours, kohya or diffusers).

        For a multi-expert model, `<stem>_<expert>.safetensors` next to the given path is used for
        each expert when it exists (the files this trainer writes), else the given file itself.
        A checkpoint of this run, when there is one, still wins (resume comes after)."""
        from aitk.hub_files import HubFileError, parse_file_reference, resolve_lora_file, use_job_token
        from aitk.networks.export import load_lora_file, load_network_file

        given = parse_file_reference(pretrained)
        if not isinstance(given, Path):  # owner/repo/file.safetensors or owner/repo: one file for every expert
            use_job_token(self.job_path)
            try:
                given = resolve_lora_file(pretrained, key="network.pretrained_lora_path", log=self.log)
            except HubFileError as exc:
                raise TrainingAborted(str(exc)) from exc
        for expert, handle in self.network.items():
            path = given
            if not self.network.is_single:
                own = given.with_name(f"{given.stem}_{expert}{given.suffix}")
                path = own if own.is_file() else given
            if not path.is_file():
                raise TrainingAborted(
                    f"network.pretrained_lora_path: {str(path)!r} does not exist - give the .safetensors "
                    "file of the LoRA to continue from (a local file, owner/repo/file.safetensors or owner/repo)"
                )
            try:
                tensors, metadata = load_lora_file(path)
            except Exception as exc:  # noqa: BLE001 - a broken or foreign file is a job error
                raise TrainingAborted(f"network.pretrained_lora_path: {path} cannot be read ({exc})") from exc
            denoiser_only = {k: v for k, v in tensors.items() if not k.startswith(TEXT_ENCODER_KEY_PREFIXES)}
            used_by_encoders = self._load_pretrained_text_encoders(path, tensors, metadata)
            if len(denoiser_only) + used_by_encoders < len(tensors):
                why = (
                    "set train.train_text_encoder: true to train the text encoder from them"
                    if self.adapter.text_encoder_lora_prefixes else "this model trains the denoiser only"
                )
                self.log(
                    f"note: {path.name}: {len(tensors) - len(denoiser_only) - used_by_encoders} text-encoder "
                    f"tensors are not used ({why})"
                )
            try:
                load_network_file(
                    handle, (denoiser_only, metadata), prefix=self.adapter.lora_prefix,
                    key_for=self.adapter.lora_key_stem, diffusers_prefix=self.adapter.diffusers_lora_prefix,
                    fused=self.adapter.lora_fused_weights,  # other tools' fused q / k / v files split too
                )
            except (KeyError, ValueError, RuntimeError) as exc:
                raise TrainingAborted(
                    f"network.pretrained_lora_path: {path} does not fit this network ({exc}). Use the same "
                    "network type, rank (network.linear / conv) and target modules as the run that made it"
                ) from exc
            which = "" if self.network.is_single else f" ({expert} expert)"
            self.log(f"network{which}: starting from {path}")

    def _load_pretrained_text_encoders(self, path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> int:
        """The text-encoder part of network.pretrained_lora_path into the text-encoder networks
        (kohya lora_te_ / lora_te1_ / lora_te2_ or diffusers text_encoder. keys); returns how many
        tensors were used. An encoder the file has nothing for starts from scratch (logged)."""
        if not self.network.text_encoders:
            return 0
        from aitk.networks.export import load_network_file, text_encoder_tensors
        from aitk.networks.text_encoders import text_encoder_namings

        namings = text_encoder_namings(self.adapter)
        used = 0
        for name, handle in self.network.text_encoders.items():
            own = text_encoder_tensors(tensors, namings[name])
            if not own:
                self.log(f"note: {path.name} has no LoRA for {name}; its network starts from scratch")
                continue
            try:
                load_network_file(
                    handle, (own, metadata), prefix=namings[name].prefix, key_for=namings[name].key_stem,
                    diffusers_prefix=name,
                )
            except (KeyError, ValueError, RuntimeError) as exc:
                raise TrainingAborted(
                    f"network.pretrained_lora_path: the {name} part of {path} does not fit this network ({exc}). "
                    "Use the same network type, rank and network_kwargs as the run that made it"
                ) from exc
            used += len(own)
            self.log(f"network ({name}): starting from {path}")
        return used

    def _setup_optimizer(self) -> None:
        from aitk.optim import build_lr_scheduler
        from aitk.optim.factory import text_encoder_param_group
        from aitk.trainer.experts import expert_optimizer

        cfg = self.train_cfg
        if self.network.text_encoders:
            # kohya's split: the (single) denoiser network at unet_lr / lr, the text encoders' at
            # text_encoder_lr, one param group each
            from aitk.networks.group import SINGLE
            from aitk.optim import build_optimizer

            unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.lr
            groups = [
                {"params": self.network.trainable_parameters(SINGLE), "lr": unet_lr},
                text_encoder_param_group(self.network.text_encoder_parameters(), cfg),
            ]
            self.optimizer = build_optimizer(cfg.optimizer, groups, lr=unet_lr, optimizer_params=cfg.optimizer_params)
        else:
            self.optimizer = expert_optimizer(self.network, cfg)
        # trainable elements per group: the metrics' learning_rate is their weighted mean
        self.group_sizes = [sum(p.numel() for p in g["params"]) for g in self.optimizer.param_groups]
        if self.network.text_encoders:
            denoiser, encoders = self.optimizer.param_groups[0], self.optimizer.param_groups[-1]
            self.log(
                f"optimizer groups: lr_0 {denoiser['lr']:g} for the denoiser ({self.group_sizes[0]:,} parameters), "
                f"lr_1 {encoders['lr']:g} for the text encoders ({self.group_sizes[-1]:,} parameters)"
            )
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer,
            cfg.lr_scheduler,
            total_steps=cfg.steps,
            warmup_steps=cfg.lr_warmup_steps,
            params=cfg.lr_scheduler_params,
        )
        from aitk.optim import NetworkEMA

        self.ema = NetworkEMA.from_config(self.network.named_trainable_parameters(), cfg.ema_config)

