"""Shared tiny-model fixtures for the whole suite. CPU only, no network, built from configs in memory.

Odd, distinct sizes (hidden 32, FFN width 37, 4 heads, vocab 99) so a transposed dimension fails
loudly instead of broadcasting silently (Hugging Face's ``BertModelTester`` habit).

Fixtures (each returns a factory, so one test can build several models):

``tiny_model(family, task="classification", *, layers=2, dtype=None, attn=None, seed=0)``
    A freshly built, seeded model in eval mode. ``family`` is one of ``TINY_FAMILIES`` (bert, roberta,
    electra, xlm-roberta, mpnet, distilbert, gpt2, llama, mistral, qwen2, vit), or dinov2 (64 neurons per
    layer, see ``DINOV2_WIDTH``; its layer scales drawn in [0.5, 1.5]). ``task`` is
    "classification" (``*ForSequenceClassification`` / ``ViTForImageClassification`` /
    ``Dinov2ForImageClassification``, 2 labels),
    "base" (the bare backbone, ``AutoModel``) or "causal-lm" (decoder families only).
    ``attn="eager"`` forces eager attention (``FlopCounterMode`` does not see SDPA on CPU).

``tiny_batches(model, *, n_batches=2, batch_size=4, seq_len=9, labels=True, seed=0)``
    A list of batches for ``model``: ``input_ids`` with ``attention_mask`` (right padding on some
    rows, padded positions hold the pad id) and ``labels``; ``pixel_values`` (and labels) for ViT and DINOv2.

The same factories are importable as plain functions (``from conftest import build_tiny_model``)
for module-level parametrisation.
"""
from __future__ import annotations

import sys

import pytest
import torch
import transformers as T


@pytest.fixture(autouse=True)
def _keep_main_module():
    """``AppTest`` leaves ``sys.modules["__main__"]`` pointing at the last script it ran (app.py), and a
    process started later with the ``spawn`` method (``torch.multiprocessing.spawn``, the distributed
    tests) runs that module again in its child: the whole app, in bare mode. Every test ends with the
    main module it started with."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waiting
# made the core suite about 6x slower (measured: 119 s with 2 threads, 20 s with 1).
torch.set_num_threads(1)

HIDDEN, WIDTH, HEADS, KV_HEADS, VOCAB = 32, 37, 4, 2, 99
IMAGE, PATCH = 16, 4

TEXT_FAMILIES = ("bert", "roberta", "electra", "xlm-roberta", "mpnet", "distilbert", "gpt2", "llama",
                 "mistral", "qwen2")
DECODER_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
TINY_FAMILIES = TEXT_FAMILIES + ("vit",)
VISION_FAMILIES = ("vit", "dinov2")
# DINOv2's width is hidden x mlp_ratio, and transformers 5's Dinov2Config takes mlp_ratio as an int: its
# tiny model has 64 neurons per layer, not WIDTH, so it is not among TINY_FAMILIES (tests/test_dinov2.py).
DINOV2_WIDTH = 2 * HIDDEN


def tiny_config(family: str, layers: int = 2, attn: str | None = None, **overrides):
    """A tiny ``transformers`` config of ``family`` with the suite's odd sizes."""
    bert_like = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                     num_attention_heads=HEADS, intermediate_size=WIDTH)
    gated = dict(bert_like, num_key_value_heads=KV_HEADS, pad_token_id=0)
    if family == "bert":
        kw, cls = bert_like, T.BertConfig
    elif family == "roberta":
        kw, cls = dict(bert_like, pad_token_id=1), T.RobertaConfig
    elif family == "xlm-roberta":
        kw, cls = dict(bert_like, pad_token_id=1), T.XLMRobertaConfig
    elif family == "mpnet":
        kw, cls = dict(bert_like, pad_token_id=1), T.MPNetConfig
    elif family == "electra":
        kw, cls = dict(bert_like, embedding_size=HIDDEN), T.ElectraConfig
    elif family == "distilbert":
        kw = dict(vocab_size=VOCAB, dim=HIDDEN, n_layers=layers, n_heads=HEADS, hidden_dim=WIDTH)
        cls = T.DistilBertConfig
    elif family == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=HEADS, n_inner=WIDTH,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
        cls = T.GPT2Config
    elif family == "llama":
        kw, cls = gated, T.LlamaConfig
    elif family == "mistral":
        kw, cls = gated, T.MistralConfig
    elif family == "qwen2":
        kw, cls = gated, T.Qwen2Config
    elif family == "vit":
        kw = dict(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                  intermediate_size=WIDTH, image_size=IMAGE, patch_size=PATCH, num_channels=3)
        cls = T.ViTConfig
    elif family == "dinov2":
        kw = dict(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                  mlp_ratio=DINOV2_WIDTH // HIDDEN, image_size=IMAGE, patch_size=PATCH, num_channels=3)
        cls = T.Dinov2Config
    else:
        raise KeyError(f"no tiny config for family {family!r}")
    kw = {**kw, **overrides}
    if attn is not None:
        kw["attn_implementation"] = attn
    return cls(**kw)


def build_tiny_model(family: str, task: str = "classification", *, layers: int = 2,
                     dtype: torch.dtype | None = None, attn: str | None = None, seed: int = 0,
                     **overrides):
    """A seeded tiny model of ``family`` in eval mode (see the module docstring)."""
    config = tiny_config(family, layers=layers, attn=attn, **overrides)
    torch.manual_seed(seed)
    if task == "classification":
        if family == "vit":
            model = T.ViTForImageClassification(config)
        elif family == "dinov2":
            model = T.Dinov2ForImageClassification(config)
        else:
            model = T.AutoModelForSequenceClassification.from_config(config)
    elif task == "base":
        model = T.AutoModel.from_config(config)
    elif task == "causal-lm":
        if family not in DECODER_FAMILIES:
            raise KeyError(f"{family} has no causal-LM head in this suite")
        model = T.AutoModelForCausalLM.from_config(config)
    else:
        raise KeyError(f"unknown task {task!r}")
    if family == "dinov2":                    # layer scales of 1.0 would hide a scale applied twice or never
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lambda1"):
                    param.uniform_(0.5, 1.5)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_tiny_encoder(folder, words):
    """Save a seeded tiny ``BertModel`` (no head) with a WordPiece tokenizer over ``words`` to
    ``folder`` (the shape of a base encoder that fine-tuning or the demo starts from)."""
    from pathlib import Path
    folder = Path(folder)
    vocab = folder.parent / "vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                             num_attention_heads=HEADS, intermediate_size=WIDTH,
                             max_position_embeddings=64)).save_pretrained(folder)
    T.BertTokenizerFast(vocab=str(vocab)).save_pretrained(folder)
    return folder


def pad_id(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def make_batches(model, *, n_batches: int = 2, batch_size: int = 4, seq_len: int = 9,
                 labels: bool = True, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches for ``model``; text rows 1 and 3 of every batch end in padding (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    num_labels = int(getattr(model.config, "num_labels", 2) or 2)
    batches = []
    for _ in range(n_batches):
        batch: dict[str, torch.Tensor] = {}
        if model.config.model_type in VISION_FAMILIES:
            size = model.config.image_size
            batch["pixel_values"] = torch.randn(batch_size, 3, size, size, generator=gen)
        else:
            ids = torch.randint(2, VOCAB, (batch_size, seq_len), generator=gen)
            mask = torch.ones(batch_size, seq_len, dtype=torch.long)
            for row in range(1, batch_size, 2):              # row 1: 3 pads, row 3: 5 pads
                mask[row, max(1, seq_len - (row + 2)):] = 0
            ids = ids.masked_fill(mask == 0, pad_id(model))
            batch["input_ids"], batch["attention_mask"] = ids, mask
        if labels:
            batch["labels"] = torch.randint(0, num_labels, (batch_size,), generator=gen)
        batches.append(batch)
    return batches


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(family, task="classification", *, layers=2, dtype=None, attn=None)``."""
    return build_tiny_model


@pytest.fixture
def tiny_batches():
    """Factory: ``tiny_batches(model, *, n_batches=2, batch_size=4, seq_len=9, labels=True)``."""
    return make_batches


def state_snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor in ``model.state_dict()``, to prove it was not changed."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, snapshot: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == snapshot.keys() and all(torch.equal(now[k], snapshot[k]) for k in snapshot)


LM_WORDS = "the a good bad movie film great awful fun dull plot acting i love hate it was is very not".split()


def save_tiny_dinov2(folder, classes: tuple[str, ...]):
    """A tiny 3-layer DINOv2 classifier over ``classes`` saved in ``folder`` with the processor DINOv2
    checkpoints ship (``BitImageProcessor``: resize the shortest edge, centre crop, RGB)."""
    build_tiny_model("dinov2", layers=3, num_labels=len(classes), id2label=dict(enumerate(classes)),
                     label2id={c: i for i, c in enumerate(classes)}).save_pretrained(folder)
    T.BitImageProcessor.from_dict({"size": {"shortest_edge": IMAGE}, "crop_size": {"height": IMAGE, "width": IMAGE},
                                   "do_convert_rgb": True}).save_pretrained(folder)
    return folder


def save_tiny_lm(folder, family: str, *, positions: int = 32, vocab_size: int | None = None, **overrides):
    """Save a seeded tiny causal LM of ``family`` (gpt2, llama, mistral or qwen2) with a WordPiece tokenizer
    over ``LM_WORDS`` to ``folder``; the vocabulary has room for the end-of-text id some tokenizers add.
    Mistral's sliding window spans its whole context unless ``overrides`` (config fields) say otherwise."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + LM_WORDS
    folder.mkdir(parents=True)
    vocab_file = folder.parent / f"{folder.name}-vocab.txt"
    vocab_file.write_text("\n".join(vocab))
    tokenizer = T.BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
    size = vocab_size or len(vocab) + 1
    small = dict(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=positions, initializer_range=0.2)
    config = {"gpt2": lambda: T.GPT2Config(vocab_size=size, n_embd=32, n_layer=2, n_head=4, n_inner=37,
                                           n_positions=positions, initializer_range=0.2),
              "llama": lambda: T.LlamaConfig(**small, num_key_value_heads=2, **overrides),
              "mistral": lambda: T.MistralConfig(**{**small, "num_key_value_heads": 2, "sliding_window": positions,
                                                    **overrides}),
              "qwen2": lambda: T.Qwen2Config(**small, num_key_value_heads=2, **overrides)}[family]()
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def app_runner(timeout: float, *, errors: bool = False):
    """``make(page=None, **query)``: ``AppTest`` on app.py with ``query`` in the URL, run once (then on
    ``page``), asserting no exception was raised (with ``errors``, no ``st.error`` either)."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest
    app = str(Path(__file__).resolve().parents[1] / "app.py")

    def make(page: str | None = None, **query):
        at = AppTest.from_file(app, default_timeout=timeout)
        at.query_params.update(query)
        at.run()
        if page:
            at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        if errors:
            assert not at.error, [e.value for e in at.error]
        return at
    return make


def use_tiny_lm(monkeypatch, tmp_path, tiny_lm, *, stream: bool = False) -> None:
    """Point the app at ``tiny_lm_and_documents``' model and documents (blocks of 16 tokens), layer by
    layer with ``stream``, with its disk cache in ``tmp_path`` (never the user's) and a first wait long
    enough for an evaluation (AppTest fires no timers: a run waits for its result)."""
    from kcm_app import live
    model_dir, docs = tiny_lm
    monkeypatch.setenv("KCM_APP_MODEL", str(model_dir))
    monkeypatch.setenv("KCM_APP_DATA", str(docs))
    monkeypatch.setenv("KCM_APP_BLOCK_SIZE", "16")
    if stream:
        monkeypatch.setenv("KCM_APP_STREAM", "1")
    monkeypatch.setenv("KCM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(live, "FIRST_WAIT_S", 120)


def tiny_lm_and_documents(root):
    """A tiny LLaMA causal LM (64 positions, ``save_tiny_lm``) in ``root/model`` and 80 seeded documents
    of 20 to 40 of its words in ``root/docs.txt``: what the app's LM tests load."""
    import random
    rng = random.Random(0)
    docs = [" ".join(rng.choice(LM_WORDS) for _ in range(rng.randint(20, 40))) for _ in range(80)]
    (root / "docs.txt").write_text("\n".join(docs) + "\n")
    return save_tiny_lm(root / "model", "llama", positions=64), root / "docs.txt"


# --------------------------------------------------------------------------- export reload, two ways

def _reload_in_this_process(command, **_):
    """Stand-in for ``subprocess.run`` in ``kcm_core.export.verify``: the same reload jobs
    (``reload_check.run_job``: the user's loader, the probe, the output) run in this process. A fresh
    interpreter costs about 10 CPU seconds on the test machine (torch and transformers imported again).
    What only a fresh process shows (the export needs nothing this process holds; the stock loader
    imports no project code) is checked by the ``fresh`` variants in the full run and by
    tests/test_export.py, whose fixture and stock-loading test always start fresh processes."""
    import json
    import subprocess

    import numpy as np

    from kcm_core.export import reload_check
    from kcm_core.export.files import PROBE_FILE, PROBE_OUT_FILE
    folder, jobs, root = command[-3], json.loads(command[-2]), command[-1]
    probe = dict(np.load(f"{folder}/{PROBE_FILE}"))
    results, notes, path = {}, {}, list(sys.path)
    try:
        for fmt, loader, output in jobs:
            results[fmt] = reload_check.run_job(folder, fmt, loader, output, root, probe, notes)
    finally:
        sys.path[:] = path                                  # run_job puts ROOT first for load_pruned
    notes["project_code_imported"] = False                  # always true here; only a fresh process can tell
    np.savez(f"{folder}/{PROBE_OUT_FILE}", **results)
    return subprocess.CompletedProcess(command, 0, json.dumps(notes) + "\n", "")


@pytest.fixture(params=[pytest.param("fresh", marks=pytest.mark.slow), "in-process"])
def export_reload(request, monkeypatch):
    """Parametrises a test over how ``save_pruned`` reloads its export: in a fresh process, as users get
    it (the slow tier), and in this process through the same reload code (the fast tier). For tests
    whose subject is not the fresh process itself (a CLI run, a pipeline that ends in an export)."""
    if request.param == "in-process":
        reload_in_process(monkeypatch)
    return request.param


def reload_in_process(monkeypatch) -> None:
    """Make ``save_pruned`` reload its export in this process (``_reload_in_this_process``) until
    ``monkeypatch`` undoes it; for module fixtures that only need an export as their input."""
    import subprocess
    import types

    import kcm_core.export.verify as V
    monkeypatch.setattr(V, "subprocess", types.SimpleNamespace(run=_reload_in_this_process,
                                                               TimeoutExpired=subprocess.TimeoutExpired))
