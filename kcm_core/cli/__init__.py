"""The command line, ``python -m kcm_core {flops,prune,evaluate,export,finetune,demo}``: the one part of
``kcm_core`` that prints (JSON to stdout, progress to stderr).

``commands``: the parser, ``main`` and one function per command; ``common``: what they share (sources,
output checks, the tail that writes the report and the export); ``lm``: ``prune`` and ``evaluate`` for
language models; ``streamed``: ``prune --stream``.
"""
from .commands import build_parser, main

__all__ = ["build_parser", "main"]
