"""Every warning a run gives at start about its job file, worked out from the job file alone.

`aitk validate` prints these before any model loads (and fails on them with --strict); the run
says the same things in its log when it reaches them. Warnings that need the built model (a layer
filter entry that matches nothing) are only known to the run.
"""

from __future__ import annotations

from collections.abc import Iterator

from aitk.config.schema import JobFile, ProcessConfig
from aitk.config.support import render_path, unsupported_warnings
from aitk.models.archs import TIMESTEP_TYPES


def run_start_warnings(job: JobFile) -> list[str]:
    """Support-table warnings, alpha schedule warnings and the data / network ones below."""
    from aitk.schedule.job_checks import alpha_schedule_warnings

    extra = [w for i, p in enumerate(job.config.process) for w in _process_warnings(i, p)]
    return unsupported_warnings(job) + alpha_schedule_warnings(job) + extra


def _process_warnings(index: int, process: ProcessConfig) -> Iterator[str]:
    where = ("config", "process", index)
    network = process.network
    if (network is not None and network.type.lower() == "lokr" and network.lokr_full_rank
            and network.alpha_schedule is not None and network.alpha_schedule.enabled):
        yield (f"{render_path(where + ('network', 'alpha_schedule'))}: with lokr_full_rank every LoKr factor is a "
               "full matrix, whose scale is 1 whatever the alpha (the LyCORIS convention); the schedule changes "
               "nothing. Fix: remove lokr_full_rank, or the schedule")
    train = process.train
    if train.linear_timesteps and train.timestep_type not in (None, "linear", "weighted") and process.model.resolved_arch \
            not in TIMESTEP_TYPES:  # flow-matching families (SD keeps its own types)
        yield (f"{render_path(where + ('train', 'linear_timesteps'))}: ai-toolkit draws linear timesteps with a "
               f"weighted loss whatever timestep_type says; here timestep_type {train.timestep_type!r} wins. Fix: "
               "remove one of the two (timestep_type: weighted is what linear_timesteps does)")
    text_cached = process.train.cache_text_embeddings or any(d.cache_text_embeddings for d in process.datasets)
    if train.unload_text_encoder and not text_cached and not train.train_text_encoder and not process.trigger_word:
        yield (f"{render_path(where + ('train', 'unload_text_encoder'))}: there is no trigger_word, so every sample "
               "trains on the blank prompt (captions are not used with unload_text_encoder). Fix: set trigger_word, "
               "or remove unload_text_encoder to train on the captions")
    for j, dataset in enumerate(process.datasets):
        at = where + ("datasets", j)
        if text_cached and (dataset.shuffle_tokens or dataset.token_dropout_rate > 0):
            yield (f"{render_path(at)}: shuffle_tokens / token_dropout_rate make a new caption for every draw, so "
                   "with cache_text_embeddings captions are encoded as they come (kept in memory), not ahead")
        if dataset.cache_latents or dataset.cache_latents_to_disk:
            if dataset.random_crop:
                yield (f"{render_path(at + ('random_crop',))}: crops are fixed (centre crop) while latents are "
                       "cached. Fix: turn off cache_latents / cache_latents_to_disk for random crops")
            if dataset.num_frames > 1 and dataset.temporal_jitter > 0:
                yield (f"{render_path(at + ('temporal_jitter',))}: each clip's frames are fixed (evenly spaced "
                       "from its first frame) while latents are cached. Fix: turn off latent caching for jitter")
