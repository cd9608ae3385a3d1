"""Training where the GPU is: `aitk cloud modal` (a job file run on Modal, its datasets uploaded to a
Modal volume and its output kept there) and `aitk cloud modal-pull` (the output copied home).

layout.py: where things live in the volume and in the container image (the docker image uses the
same /workspace layout); job_rewrite.py: the job file pointed at that layout; upload_plan.py: which
dataset files to upload (a manifest in the volume); volume_files.py: a volume's listing;
modal_app.py: the Modal image, volume, secret
and function; remote.py: what runs in the container; pull.py: results home; commands.py: the CLI.
Nothing here imports `modal` at module level: it costs nothing at `aitk` start.
"""
