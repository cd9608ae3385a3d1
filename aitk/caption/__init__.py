"""Captions written by a vision-language model: `aitk caption FOLDER`, the `caption` job type and
the web UI's Caption action (docs/captions.md).

- families.py  which models caption (Florence-2, Qwen2.5-VL), their defaults, which family an id is
- options.py   the options of one captioning run (the command line and the job file both fill them)
- media.py     an image or a video's sampled frames, ready for the model; the reason when unusable
- folder.py    the files of a folder to caption, resume (what already has a caption), atomic writes
- models.py    loading a model and its processor; captions for a batch of items
- run.py       the loop: batches, progress bar, progress file, summary
- command.py   `aitk caption` and the caption job of `aitk run`
- tiny.py      tiny random-init models of both families, built offline (tests)

Nothing here imports torch or transformers at module level: `aitk --help` stays fast.
"""
