"""LoRA header metadata: every ss_* / modelspec.* key of docs/lora-formats.md, the job's meta block, and the
weight hashes (sshs_model_hash, sshs_legacy_hash, modelspec.hash_sha256) recomputed from written files.

The hash checks below recompute each hash the way the readers do, independently of
aitk.networks.metadata: A1111 / additional-networks read the 8-byte header length, skip the header and
sha256 the rest; the legacy hash is sha256 of 64 KiB at 0x100000 of the file serialised with only its
ss_* keys, cut to 8 hex digits.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch

from aitk.config.schema import NetworkConfig, TrainConfig
from aitk.fsutil import atomic_write_bytes
from aitk.networks.metadata import (
    HASH_KEYS,
    PROTECTED_KEYS,
    lora_metadata,
    safetensors_bytes_with_hashes,
    verify_file_hashes,
    weight_hashes,
)


def _metadata(**changes) -> dict[str, str]:
    settings = TrainConfig(lr=2e-4, optimizer="adamw8bit", optimizer_params={"weight_decay": 0.01},
                           batch_size=2, gradient_accumulation=3, dtype="bf16", noise_offset=0.05,
                           steps=500).model_dump(mode="json")
    settings["network"] = NetworkConfig(type="lora", linear=16, linear_alpha=8, dropout=0.1).model_dump(mode="json")
    kwargs = dict(
        name="shapes", steps=500, network_dim=16, network_alpha=8.0, conv_dim=None, conv_alpha=None,
        base_model_version="sd_v1", architecture="stable-diffusion-v1/lora", resolution=(512, 512),
        training_settings=settings,
        meta={"author": "tester", "license": "cc-by-4.0", "description": "flat shapes", "tags": ["a", "b"],
              "version": 3, "sshs_model_hash": "forged", "modelspec.hash_sha256": "0xforged"},
        trigger_word="shp", base_model_name="stable-diffusion-v1-5/stable-diffusion-v1-5", seed=7,
        num_train_images=12,
    )
    kwargs.update(changes)
    return lora_metadata(**kwargs)


def _tensors(seed: int = 0, big: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 10240 if big else 8  # big: 1.25 MiB of fp16 (> 0x110000 bytes), so the legacy window holds tensor bytes
    return {
        "lora_unet_b.lora_up.weight": torch.randn(n, 16, generator=g).half(),
        "lora_unet_b.lora_down.weight": torch.randn(16, n, generator=g).half(),
        "lora_unet_b.alpha": torch.tensor(8.0),
        "lora_unet_a.lora_down.weight": torch.randn(16, n, generator=g).half(),
        "lora_unet_a.lora_up.weight": torch.randn(n, 16, generator=g).half(),
        "lora_unet_a.alpha": torch.tensor(8.0),
    }


def _a1111_model_hash(data: bytes) -> str:
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def _kohya_legacy_hash(path) -> str:
    tensors = safetensors.torch.load_file(str(path))
    with open(path, "rb") as handle:
        n = int.from_bytes(handle.read(8), "little")
        meta = json.loads(handle.read(n)).get("__metadata__", {})
    data = safetensors.torch.save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_every_key_of_the_outputs_spec_and_meta_block():
    md = _metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    # docs/lora-formats.md: ss_network_dim, ss_network_alpha, ss_base_model_version, ss_output_name,
    # ss_training_comment, ss_steps; modelspec architecture, title, resolution; meta; settings JSON
    assert md["ss_network_dim"] == "16" and md["ss_network_alpha"] == "8.0"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_output_name"] == "shapes"
    assert md["ss_training_comment"] == "shp" and md["ss_steps"] == "500"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.title"] == "shapes" and md["modelspec.resolution"] == "512x512"
    assert md["modelspec.sai_model_spec"] == "1.0.0" and md["modelspec.implementation"]
    assert md["modelspec.trigger_phrase"] == "shp" and md["modelspec.date"]
    assert json.loads(md["aitk_training_settings"])["lr"] == 2e-4
    # the kohya training keys UIs show, read off the settings
    assert md["ss_learning_rate"] == "0.0002" and md["ss_unet_lr"] == "0.0002"
    assert "ss_text_encoder_lr" not in md  # the text encoder is not trained
    assert md["ss_optimizer"] == "adamw8bit(weight_decay=0.01)"
    assert md["ss_lr_scheduler"] == "constant" and md["ss_max_train_steps"] == "500"
    assert md["ss_batch_size_per_device"] == "2" and md["ss_gradient_accumulation_steps"] == "3"
    assert md["ss_mixed_precision"] == "bf16" and md["ss_noise_offset"] == "0.05"
    assert md["ss_network_dropout"] == "0.1"
    assert md["ss_sd_model_name"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert md["ss_seed"] == "7" and md["ss_num_train_images"] == "12"
    assert float(md["ss_training_finished_at"]) > 1.6e9
    # the meta block: copied as given, and the modelspec fields of the same meaning filled
    assert md["author"] == "tester" and md["version"] == "3" and json.loads(md["tags"]) == ["a", "b"]
    assert md["modelspec.author"] == "tester" and md["modelspec.license"] == "cc-by-4.0"
    assert md["modelspec.description"] == "flat shapes" and md["modelspec.tags"] == "a, b"
    # the meta block cannot forge what must describe the file
    assert not set(HASH_KEYS) & set(md) and set(HASH_KEYS) <= PROTECTED_KEYS


def test_network_module_names_the_algorithm():
    assert _metadata()["ss_network_module"] == "networks.lora"
    lokr = _metadata(algo="lokr", conv_dim=4, conv_alpha=2.0)
    assert lokr["ss_network_module"] == "lycoris.kohya"
    assert json.loads(lokr["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0", "algo": "lokr"}
    dora = _metadata(algo="dora")
    assert dora["ss_network_module"] == "networks.lora" and json.loads(dora["ss_network_args"]) == {"dora_wd": "True"}


def test_an_explicit_modelspec_key_in_meta_wins():
    md = _metadata(meta={"author": "short", "modelspec.author": "Full Name", "modelspec.title": "Nice title"})
    assert md["modelspec.author"] == "Full Name" and md["modelspec.title"] == "Nice title"


def test_hashes_recomputed_from_the_written_file(tmp_path):
    md = _metadata()
    path = atomic_write_bytes(tmp_path / "shapes.safetensors", safetensors_bytes_with_hashes(_tensors(), md))
    data = path.read_bytes()
    assert len(data) > 0x110000  # the legacy window is tensor data, not an empty read
    with safetensors.safe_open(str(path), framework="pt") as f:
        back = dict(f.metadata())
    assert {k: back[k] for k in md} == md  # everything given is there, as given
    assert all(isinstance(v, str) for v in back.values())
    assert back["sshs_model_hash"] == _a1111_model_hash(data)
    assert back["modelspec.hash_sha256"] == "0x" + _a1111_model_hash(data)
    assert back["sshs_legacy_hash"] == _kohya_legacy_hash(path)
    assert len(back["sshs_legacy_hash"]) == 8 and back["sshs_model_hash"] != "forged"
    check = verify_file_hashes(path)
    assert check.ok and check.computed == {k: back[k] for k in HASH_KEYS}
    assert weight_hashes(_tensors(), md) == check.computed


def test_hashes_depend_on_the_weights_not_on_user_metadata(tmp_path):
    md = _metadata()
    first = weight_hashes(_tensors(), md)
    edited = weight_hashes(_tensors(), {**md, "author": "someone else", "modelspec.title": "renamed"})
    assert edited == first  # kohya's rule: editing user metadata keeps both hashes
    other = weight_hashes(_tensors(seed=1), md)
    assert other["sshs_model_hash"] != first["sshs_model_hash"]
    assert other["sshs_legacy_hash"] != first["sshs_legacy_hash"]
    # the model hash ignores the header entirely; the legacy one moves with the ss_* header size
    longer = weight_hashes(_tensors(), {**md, "ss_training_comment": "x" * 100})
    assert longer["sshs_model_hash"] == first["sshs_model_hash"]
    assert longer["sshs_legacy_hash"] != first["sshs_legacy_hash"]


def test_small_file_legacy_hash_is_the_empty_window(tmp_path):
    path = atomic_write_bytes(tmp_path / "s.safetensors", safetensors_bytes_with_hashes(_tensors(big=False), {}))
    check = verify_file_hashes(path)
    assert check.ok and check.stored["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]


def test_verifier_finds_changed_weights_and_missing_hashes(tmp_path):
    path = atomic_write_bytes(tmp_path / "t.safetensors", safetensors_bytes_with_hashes(_tensors(), _metadata()))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one byte of the last tensor
    path.write_bytes(bytes(data))
    check = verify_file_hashes(path)
    assert not check.ok and {"sshs_model_hash", "modelspec.hash_sha256"} <= set(check.mismatched)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(_tensors(big=False), str(plain), metadata={"ss_network_dim": "4"})
    check = verify_file_hashes(plain)
    assert not check.ok and check.missing == list(HASH_KEYS) and check.mismatched == []


def test_bytes_helper_rejects_non_str_values():
    with pytest.raises(TypeError, match="ss_steps"):
        safetensors_bytes_with_hashes(_tensors(big=False), {"ss_steps": 5})  # type: ignore[dict-item]
