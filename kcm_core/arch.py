"""Where the feed-forward neurons live, for every supported architecture family.

All architecture knowledge sits in ``FAMILIES``: one row per family, naming the attribute paths of
the transformer layers, the FFN projections inside a layer, and the config fields that give sizes.
Nothing else in ``kcm_core`` tests a model's name or type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn


@dataclass(frozen=True)
class Family:
    """How one architecture family stores its FFN blocks and sizes.

    Paths are dotted attribute paths; each field is a tuple of candidates tried in order (the first
    that exists wins), so one row covers small layout changes between ``transformers`` releases.
    """

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]          # relative to the base model, e.g. "encoder.layer"
    up: tuple[str, ...]              # relative to one layer
    down: tuple[str, ...]
    gate: tuple[str, ...] = ()       # gated MLPs only (LLaMA-style)
    # Post-LN layers only (BERT, DistilBERT): the LayerNorm, relative to one layer, whose input is the
    # FFN's output plus the residual. A pre-LN layer's output goes on to the next layer's norm as it is.
    post_norm: tuple[str, ...] = ()
    transposed: bool = False         # GPT-2's Conv1D stores weights as (in, out)
    hidden_field: tuple[str, ...] = ("hidden_size",)
    layers_field: tuple[str, ...] = ("num_hidden_layers",)
    heads_field: tuple[str, ...] = ("num_attention_heads",)
    kv_heads_field: tuple[str, ...] = ()
    width_field: tuple[str, ...] = ("intermediate_size",)
    # What to use when the width field is None (GPT-2's n_inner=None means 4 * n_embd).
    width_default_factor: int = 4
    # The width field is a multiple of the hidden size, the width int(hidden * ratio) (DINOv2's mlp_ratio).
    width_is_ratio: bool = False
    vision: bool = False             # sequence length is patches + 1, no padding
    decoder: bool = False            # a causal decoder stack (GPT-2, LLaMA, ...), else an encoder
    # Parameter layout, for estimates from a config alone (no weights read):
    qkv_bias: bool = True            # Q, K, V projections carry biases
    dense_bias: bool = True          # output projection, FFN and two LayerNorms with biases
    pooler: bool = False             # a d x d pooler sits before the classifier (BERT family)
    # The config switch that gives the MLP's projections biases, where stock code has one (LLaMA's
    # ``mlp_bias``); FLAP's bias compensation needs a down-projection bias that stock code loads.
    mlp_bias_field: str | None = None
    attention_bias_field: str | None = None   # the switch that gives Q, K, V and O biases (LLaMA)
    # A family with no MLP-bias switch: the family whose stock class holds its weights plus MLP biases
    # and computes the same function (kcm_core.bias_carrier moves a model there when a repair adds a bias).
    bias_carrier: str | None = None
    # Which layers attend through ``sliding_window``: those ``layer_types`` names "sliding_attention"
    # (Qwen2), else every layer whenever the window is set (Mistral).
    window_by_layer_type: bool = False
    layer_scales: bool = False       # two per-channel scales per layer (DINOv2's layer_scale1/2)
    head_inputs: int = 1             # hidden-size vectors the classifier reads (DINOv2: CLS and patch mean)
    # Config switches that select a layout this row does not describe: (field, why it is refused).
    refused: tuple[tuple[str, str], ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        # MPNet keeps BERT's layer layout; its relative-position bias sits in the encoder, outside the
        # layers, and its classification head (dense + out_proj, like RoBERTa's) costs what a pooler does.
        model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet"),
        layers=("encoder.layer",),
        up=("intermediate.dense",),
        down=("output.dense",),
        post_norm=("output.LayerNorm",),
        pooler=True,
    ),
    Family(
        name="distilbert",
        model_types=("distilbert",),
        layers=("transformer.layer",),
        up=("ffn.lin1",),
        down=("ffn.lin2",),
        post_norm=("output_layer_norm",),
        hidden_field=("dim",),
        layers_field=("n_layers",),
        heads_field=("n_heads",),
        width_field=("hidden_dim",),
    ),
    Family(
        name="gpt2",
        decoder=True,
        model_types=("gpt2",),
        layers=("h",),
        up=("mlp.c_fc",),
        down=("mlp.c_proj",),
        transposed=True,
        hidden_field=("n_embd",),
        layers_field=("n_layer",),
        heads_field=("n_head",),
        width_field=("n_inner",),
    ),
    Family(
        name="llama",
        decoder=True,
        model_types=("llama",),
        layers=("layers",),
        up=("mlp.up_proj",),
        gate=("mlp.gate_proj",),
        down=("mlp.down_proj",),
        kv_heads_field=("num_key_value_heads",),
        qkv_bias=False,
        dense_bias=False,
        mlp_bias_field="mlp_bias",
        attention_bias_field="attention_bias",
    ),
    Family(
        name="mistral",              # LLaMA's layout without the mlp_bias switch, plus a sliding window
        decoder=True,
        model_types=("mistral",),
        layers=("layers",),
        up=("mlp.up_proj",),
        gate=("mlp.gate_proj",),
        down=("mlp.down_proj",),
        kv_heads_field=("num_key_value_heads",),
        qkv_bias=False,
        dense_bias=False,
        bias_carrier="llama",
    ),
    Family(
        name="qwen2",                # LLaMA's layout, but its Q, K, V projections carry biases
        decoder=True,
        model_types=("qwen2",),
        layers=("layers",),
        up=("mlp.up_proj",),
        gate=("mlp.gate_proj",),
        down=("mlp.down_proj",),
        kv_heads_field=("num_key_value_heads",),
        qkv_bias=True,
        dense_bias=False,
        bias_carrier="llama",
        window_by_layer_type=True,
    ),
    Family(
        name="vit",
        model_types=("vit",),
        layers=("layers", "encoder.layer"),
        up=("mlp.fc1", "intermediate.dense"),
        down=("mlp.fc2", "output.dense"),
        vision=True,
    ),
    Family(
        # ViT's layout plus a layer scale after attention and after the MLP (left in place: the FFN's
        # output is scaled after fc2, so fc2's output, which scaling and repair fit, is unchanged), a
        # width given as mlp_ratio, and a classifier on the class token concatenated with the mean of
        # the patch tokens (2 x hidden inputs).
        name="dinov2",
        model_types=("dinov2",),
        layers=("encoder.layer",),
        up=("mlp.fc1",),
        down=("mlp.fc2",),
        width_field=("mlp_ratio",),
        width_is_ratio=True,
        vision=True,
        layer_scales=True,
        head_inputs=2,
        refused=(("use_swiglu_ffn",
                  "its SwiGLU FFN (gate_proj, up_proj, down_proj) rounds its width to a multiple of 8 from "
                  "mlp_ratio, so a pruned width could not be written into a config that stock "
                  "Dinov2 code rebuilds; only the plain MLP (use_swiglu_ffn=False, fc1/fc2) is supported"),),
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for_config(config) -> Family:
    """The family row for a ``transformers`` config, or a ``ValueError`` naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            for field, why in family.refused:
                if getattr(config, field, False):
                    raise ValueError(f"Unsupported {type(config).__name__} with {field}={getattr(config, field)!r}: "
                                     f"{why}.")
            return family
    raise ValueError(
        f"Unsupported architecture: model_type {model_type!r} ({type(config).__name__}). "
        f"KCM Explorer supports model types {', '.join(SUPPORTED_MODEL_TYPES)} "
        "(BERT-family encoders incl. MPNet, DistilBERT, GPT-2, LLaMA/Mistral/Qwen2 gated MLPs, ViT, "
        "DINOv2 with its plain MLP)."
    )


def family_named(name: str) -> Family:
    """The family row called ``name`` (``Family.name``)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"no family named {name!r}")


def family_for_model(model: nn.Module) -> Family:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"Unsupported model class {type(model).__name__}: it has no Hugging Face config. "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    try:
        return family_for_config(config)
    except ValueError as err:
        raise ValueError(f"{type(model).__name__}: {err}") from None


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def first_module(root: nn.Module, candidates: Iterable[str]):
    """``(path, module)`` of the first of ``candidates`` (dotted paths) that ``root`` has, else ``(None, None)``."""
    for path in candidates:
        obj = _get_path(root, path)
        if obj is not None:
            return path, obj
    return None, None


def config_value(config, fields: tuple[str, ...], default=None):
    for name in fields:
        if hasattr(config, name):
            return getattr(config, name)
    return default


def config_ffn_width(config, family: Family) -> int:
    """The FFN width a config builds (before any per-layer ``kcm_ffn_widths``)."""
    width = config_value(config, family.width_field)
    hidden = int(config_value(config, family.hidden_field))
    if width is None:
        return family.width_default_factor * hidden
    if family.width_is_ratio:
        return int(hidden * width)                     # as the modeling code: int(hidden_size * mlp_ratio)
    return int(width)


def set_ffn_width(config, family: Family, width: int) -> bool:
    """Write ``width`` into the family's width field; returns whether the stock class now builds
    exactly ``width`` neurons.

    A ratio field (DINOv2's ``mlp_ratio``, width ``int(hidden * mlp_ratio)``) is a strict ``int`` in
    transformers 5's ``Dinov2Config``, so it can state only multiples of the hidden size: any other
    width gets the next multiple up (the class then builds at least ``width``, and ``kcm_ffn_widths``
    must say the real width: ``record_widths`` writes it, ``load_pruned`` slices to it)."""
    field = family.width_field[0]
    if not family.width_is_ratio:
        setattr(config, field, int(width))
        return True
    hidden = int(config_value(config, family.hidden_field))
    setattr(config, field, -(-int(width) // hidden))               # ceil(width / hidden), an int
    return int(width) % hidden == 0


@dataclass(frozen=True)
class FFNBlock:
    """One layer's feed-forward block: the modules and their qualified names in the model."""

    index: int
    up: nn.Module
    down: nn.Module
    gate: nn.Module | None
    transposed: bool
    up_name: str
    down_name: str
    gate_name: str | None

    @property
    def width(self) -> int:
        """Current number of neurons (rows of the up-projection)."""
        w = self.up.weight
        return int(w.shape[1] if self.transposed else w.shape[0])

    def down_rows(self):
        """The down-projection weights as one row per neuron, shape (N, d)."""
        w = self.down.weight
        return w if self.transposed else w.t()

    def up_cols(self):
        """The up-projection weights as one row per neuron, shape (N, d)."""
        w = self.up.weight
        return w.t() if self.transposed else w

    def gate_cols(self):
        if self.gate is None:
            return None
        return self.gate.weight.t() if self.transposed else self.gate.weight


def base_model(model: nn.Module) -> nn.Module:
    """The backbone under any task head (``model.base_model`` for Hugging Face models)."""
    return getattr(model, "base_model", model)


def transformer_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the module list of ``model``'s transformer layers."""
    family = family_for_model(model)
    base = base_model(model)
    layers_path, layers = first_module(base, family.layers)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__}: could not find its transformer layers at any of {family.layers}; "
            "this transformers release may have changed the layout."
        )
    return _module_prefix(model, base) + layers_path, layers


def post_norms(model: nn.Module) -> list[nn.Module] | None:
    """Per layer, the LayerNorm that divides the FFN's output (with the residual) in a post-LN model;
    None for a pre-LN model (there the layer's output reaches the next layer's norm unchanged)."""
    family = family_for_model(model)
    if not family.post_norm:
        return None
    _, layers = transformer_layers(model)
    norms = [first_module(layer, family.post_norm)[1] for layer in layers]
    if any(n is None for n in norms):
        raise ValueError(f"{type(model).__name__}: a layer has no LayerNorm at {family.post_norm}")
    return norms


def ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """Every FFN block of ``model`` in layer order; raises ``ValueError`` for unsupported models."""
    family = family_for_model(model)
    layers_path, layers = transformer_layers(model)
    blocks = []
    for i, layer in enumerate(layers):
        up_path, up = first_module(layer, family.up)
        down_path, down = first_module(layer, family.down)
        gate_path, gate = first_module(layer, family.gate) if family.gate else (None, None)
        if up is None or down is None or (family.gate and gate is None):
            raise ValueError(
                f"{type(model).__name__}: layer {i} has no FFN at {family.up} / {family.down}."
            )
        stem = f"{layers_path}.{i}."
        blocks.append(
            FFNBlock(
                index=i,
                up=up,
                down=down,
                gate=gate,
                transposed=family.transposed,
                up_name=stem + up_path,
                down_name=stem + down_path,
                gate_name=stem + gate_path if gate_path else None,
            )
        )
    return blocks


def _module_prefix(model: nn.Module, base: nn.Module) -> str:
    if base is model:
        return ""
    for name, module in model.named_children():
        if module is base:
            return name + "."
    return ""


@dataclass(frozen=True)
class ModelShape:
    """The sizes that the FLOPs model needs, read from a config alone (no weights)."""

    family: str
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_width: tuple[int, ...]   # per layer (pruned models may differ per layer)
    gated: bool
    vision: bool
    vocab_size: int
    max_positions: int
    num_labels: int
    image_tokens: int            # ViT: patches + 1; else 0
    qkv_bias: bool
    dense_bias: bool
    mlp_bias: bool               # FFN up (and gate) and down carry biases (dense_bias, or LLaMA's mlp_bias)
    head: str                    # "lm", "classifier", "pooled-classifier" or "none" (from architectures)
    decoder: bool = False        # a causal decoder stack (Family.decoder), else an encoder
    head_size: int = 0           # the config's explicit head_dim (Mistral-Nemo: 128, not 5120 / 32); 0: none
    out_bias: bool = False       # the attention's output projection carries a bias (LLaMA's attention_bias)
    layer_scales: bool = False   # two per-channel scales per layer (DINOv2)
    head_inputs: int = 1         # hidden-size vectors the classifier reads (DINOv2: 2)
    patch: int = 0               # vision: the patch side in pixels; else 0

    def tokens_for_image(self, height: int, width: int) -> int:
        """Tokens of one image of ``height`` x ``width`` pixels (patches + the class token). DINOv2
        interpolates its position grid, so its processor may feed another size than ``image_size``
        (DINOv2's released configs say 518 px, their processors crop 224 px)."""
        return (int(height) // self.patch) * (int(width) // self.patch) + 1

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads


def model_shape(config) -> ModelShape:
    family = family_for_config(config)
    layers = int(config_value(config, family.layers_field))
    hidden = int(config_value(config, family.hidden_field))
    heads = int(config_value(config, family.heads_field))
    kv_heads = int(config_value(config, family.kv_heads_field, heads) or heads)
    width = config_ffn_width(config, family)
    widths = tuple(int(w) for w in getattr(config, "kcm_ffn_widths", None) or [width] * layers)
    image_tokens = 0
    if family.vision:
        image_tokens = (int(config.image_size) // int(config.patch_size)) ** 2 + 1
    return ModelShape(
        family=family.name,
        model_type=config.model_type,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        ffn_width=widths,
        gated=bool(family.gate),
        vision=family.vision,
        vocab_size=int(getattr(config, "vocab_size", 0) or 0),
        max_positions=int(
            config_value(config, ("max_position_embeddings", "n_positions"), image_tokens) or 0
        ),
        num_labels=int(getattr(config, "num_labels", 0) or 0),
        image_tokens=image_tokens,
        qkv_bias=family.qkv_bias or bool(getattr(config, "attention_bias", False)),
        dense_bias=family.dense_bias,
        mlp_bias=family.dense_bias or bool(family.mlp_bias_field and getattr(config, family.mlp_bias_field, False)),
        head=_head_kind(config, family),
        decoder=family.decoder,
        head_size=_explicit_head_dim(config),
        out_bias=family.dense_bias or bool(family.attention_bias_field
                                           and getattr(config, family.attention_bias_field, False)),
        layer_scales=family.layer_scales,
        head_inputs=family.head_inputs,
        patch=int(config.patch_size) if family.vision else 0,
    )


def _explicit_head_dim(config) -> int:
    """A config's own ``head_dim`` (LLaMA, Mistral, Qwen2 may set one that is not hidden / heads); 0 if none."""
    value = getattr(config, "head_dim", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _head_kind(config, family: Family) -> str:
    """What sits on top of the layers, read from the config's ``architectures`` list."""
    names = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in names or "LMHead" in names:
        return "lm"
    if "Classification" in names:
        return "pooled-classifier" if family.pooler else "classifier"
    return "none"
