"""Text-embedding cache: memory / disk, keys per encoder, missing(), corrupt entries."""

import torch

from aitk.data.text_cache import TextEmbeddingCache, text_key


def emb(v: float) -> dict[str, torch.Tensor]:
    return {"hidden": torch.full((2, 3), v), "pooled": torch.full((3,), -v)}


def test_memory_only():
    c = TextEmbeddingCache(None, "clip-a")
    assert c.get("a cat") is None
    assert c.missing(["a cat", "", "a cat", "dog"]) == ["a cat", "", "dog"]
    c.put("a cat", emb(1.0))
    c.put("", emb(0.0))  # the empty caption (caption dropout) is a caption like any other
    assert torch.equal(c.get("a cat")["hidden"], torch.full((2, 3), 1.0))
    assert torch.equal(c.get("")["pooled"], torch.zeros(3))
    assert c.missing(["a cat", "", "dog"]) == ["dog"]
    assert "a cat" in c and "dog" not in c and len(c) == 2


def test_put_copies_to_cpu_and_detaches():
    c = TextEmbeddingCache(None, "e")
    t = torch.ones(2, requires_grad=True)
    c.put("x", {"h": t * 2})
    got = c.get("x")["h"]
    assert not got.requires_grad and got.device.type == "cpu"


def test_disk_persistence_and_encoder_separation(tmp_path):
    folder = tmp_path / "te"
    c = TextEmbeddingCache(folder, "t5-xxl")
    c.put("a photo of sks", emb(2.0))
    c.put("", emb(0.5))
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(f"{text_key('t5-xxl', s)}.safetensors" for s in ["a photo of sks", ""])
    fresh = TextEmbeddingCache(folder, "t5-xxl")
    assert fresh.missing(["a photo of sks", "", "new"]) == ["new"]
    assert torch.equal(fresh.get("a photo of sks")["hidden"], torch.full((2, 3), 2.0))
    other = TextEmbeddingCache(folder, "clip-l")  # another encoder never reads these entries
    assert other.missing(["a photo of sks", ""]) == ["a photo of sks", ""]
    assert text_key("ab", "c") != text_key("a", "bc")


def test_corrupt_disk_entry_is_missing(tmp_path):
    logs: list[str] = []
    c = TextEmbeddingCache(tmp_path, "enc", log=logs.append)
    c.put("x", emb(1.0))
    (tmp_path / f"{text_key('enc', 'x')}.safetensors").write_bytes(b"garbage")
    fresh = TextEmbeddingCache(tmp_path, "enc", log=logs.append)
    assert fresh.get("x") is None
    assert any("unreadable" in m for m in logs)
    assert fresh.missing(["x"]) == ["x"]
    fresh.put("x", emb(3.0))
    assert torch.equal(TextEmbeddingCache(tmp_path, "enc").get("x")["hidden"], torch.full((2, 3), 3.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_unwritable_folder_falls_back_to_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    logs: list[str] = []
    c = TextEmbeddingCache(blocker / "sub", "enc", memory=False, log=logs.append)
    c.put("x", emb(1.0))
    assert torch.equal(c.get("x")["pooled"], torch.full((3,), -1.0))
    assert any("cannot write" in m for m in logs)


# ---------------------------------------------------------------- the trainer uses it


def _copy_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_latent_cache", "_text_cache"))
    return dst


def test_training_encodes_each_caption_once_and_reuses_the_disk_cache(make_job, shapes_dataset, tmp_path, monkeypatch):
    from aitk.config.loader import load_job_file
    from aitk.models.sd import SD15Adapter
    from aitk.trainer.loop import Trainer

    data = _copy_dataset(shapes_dataset, tmp_path / "data")
    encoded: list[str] = []
    original = SD15Adapter.encode_prompts

    def counting(self, prompts):
        encoded.extend(prompts)
        return original(self, prompts)

    monkeypatch.setattr(SD15Adapter, "encode_prompts", counting)

    def run(name: str):
        job = make_job(name, dataset={"folder_path": str(data), "caption_dropout_rate": 0.5},
                       train={"steps": 3, "cache_text_embeddings": True})
        loaded = load_job_file(job)
        trainer = Trainer(loaded.job, loaded.job.config.process[0])
        trainer.run()
        return trainer

    first = run("first")
    captions = first.data.all_captions()
    assert "" in captions  # caption dropout draws the empty prompt: it is cached too
    assert sorted(encoded) == sorted(set(encoded)), "a caption was encoded twice"
    assert set(captions) <= set(encoded)
    assert len(list((data / "_text_cache").glob("*.safetensors"))) == len(set(encoded))

    encoded.clear()
    run("second")
    assert encoded == []  # everything came from disk, training included

    caption_files = sorted(data.glob("*.txt"))
    caption_files[0].write_text("a brand new caption")
    encoded.clear()
    run("third")
    assert len(encoded) == 1 and encoded[0].endswith("a brand new caption")  # trigger word added
