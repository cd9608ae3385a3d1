"""Command-line tools on network files: `aitk convert`, `aitk merge`, `aitk lora info`.

`commands.add_tool_commands` registers them on the `aitk` parser; the modules import torch only
when a command runs, so building the parser stays fast.
"""
