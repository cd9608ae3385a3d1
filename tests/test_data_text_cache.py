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
