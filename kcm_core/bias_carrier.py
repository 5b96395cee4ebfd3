"""A Mistral or Qwen2 model with MLP biases, held by the stock LLaMA class that loads them.

A repair that adds a bias to the down-projection (FLAP's ``bias``, ``scales+bias``, ``refit``'s
intercept: ``kcm_core.repair``) needs a class whose stock code loads that bias. LLaMA has a switch for
it (``mlp_bias``); Mistral and Qwen2 have none. Their decoders are LLaMA's (transformers 5: the same
RMSNorm, rotary embedding, grouped K/V attention, gated MLP and heads, reading the same config fields)
with two differences, which the carrier family's row in ``kcm_core.arch`` and this module cover:

- Qwen2's Q, K and V projections carry biases and its O projection none: LLaMA's ``attention_bias``
  gives all four one, and O's is zero.
- both may attend through a sliding window (Mistral's ``sliding_window`` on every layer; Qwen2's on the
  layers its ``layer_types`` marks, when ``use_sliding_window`` is on), which LLaMA has not. A window of
  at least ``max_position_embeddings`` tokens never hides a position the model can be given, so it
  changes nothing; a shorter one does, and the move is refused (``carrier_refusal`` says why).

The carrier's config keeps every field its class knows (sizes, ``rms_norm_eps``, ``rope_parameters``,
``head_dim``, ``tie_word_embeddings``, token ids, dtype) plus the ``kcm_*`` records, and drops the rest
(the window settings); ``kcm_moved_from`` names the class it came from. A move is checked on a probe:
the carrier's output must equal the model's to the export tolerance, else it is refused.
``tests/test_bias_carrier.py`` holds the known answers on tiny Qwen2 and Mistral models.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from .arch import Family, family_for_config, family_named, ffn_blocks, transformer_layers
from .runtime import eval_mode, model_device, quiet_transformers

MOVED_FROM = "kcm_moved_from"       # config key: the class a carried model was moved from
PROBE_TOKENS = 12                   # the probe every move is checked on: one sequence of this length


def carrier_family(config) -> Family | None:
    """The family whose stock class carries ``config``'s model with MLP biases; None when its family
    needs none (it has biases or a switch for them) or has no such family."""
    name = family_for_config(config).bias_carrier
    return family_named(name) if name else None


def carrier_refusal(config) -> str | None:
    """Why ``config``'s model cannot be moved to a class that loads MLP biases (a clause for a message),
    or None when it can be, with the same outputs."""
    family = family_for_config(config)
    if family.bias_carrier is None:
        return f"no other stock class holds a {family.name} model with MLP biases"
    window = _binding_window(config, family)
    target = family_named(family.bias_carrier).name
    if window is not None:
        size, layers = window
        return (f"{layers} through a sliding window of {size} tokens, shorter than its "
                f"max_position_embeddings ({config.max_position_embeddings}), and {target}'s stock classes attend "
                f"to every earlier position: past {size} tokens the two would differ")
    try:
        carrier_config(config, "")
    except (ValueError, TypeError) as err:
        return f"{target}'s config refuses its sizes ({err})"
    return None


def can_carry(config) -> bool:
    """Whether ``config``'s model moves to a class with MLP biases, its outputs unchanged."""
    return carrier_family(config) is not None and carrier_refusal(config) is None


def _binding_window(config, family: Family) -> tuple[int, str] | None:
    """(window, which layers use it) when a sliding window hides positions the model can be given."""
    size = getattr(config, "sliding_window", None)
    positions = getattr(config, "max_position_embeddings", None)
    if size is None or (positions is not None and int(size) >= int(positions)):
        return None
    if not family.window_by_layer_type:
        return int(size), "every layer attends"
    kinds = list(getattr(config, "layer_types", None) or [])
    sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    if not sliding:
        return None
    return int(size), f"layers {sliding} attend"


def carrier_config(config, moved_from: str):
    """The carrier family's config for ``config``'s model with MLP biases (and attention biases where
    the model has Q, K, V biases), ``moved_from`` (the model's class name) recorded in it."""
    from transformers import CONFIG_MAPPING

    family = family_for_config(config)
    target = family_named(family.bias_carrier)
    config_class = CONFIG_MAPPING[target.model_types[0]]
    known = set(config_class().to_dict())
    values = {k: v for k, v in config.to_dict().items()
              if (k in known or k.startswith("kcm_") or k == "_name_or_path")
              and k not in ("model_type", "architectures", "transformers_version")}
    heads = int(config.num_attention_heads)
    values["head_dim"] = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    values[target.mlp_bias_field] = True
    attention_bias = family.qkv_bias or bool(getattr(config, "attention_bias", False))
    values[target.attention_bias_field] = attention_bias
    values[MOVED_FROM] = moved_from
    new = config_class.from_dict(values)
    new._attn_implementation = getattr(config, "_attn_implementation", None)
    return new


def carrier_class_name(config, class_name: str) -> str:
    """The carrier's stock class for a model of class ``class_name`` (its auto-class counterpart:
    ``Qwen2ForCausalLM`` -> ``LlamaForCausalLM``); ``ValueError`` when it has none."""
    from transformers.models.auto import modeling_auto

    source = family_for_config(config)
    target = family_named(source.bias_carrier)
    found = set()
    for name in dir(modeling_auto):
        table = getattr(modeling_auto, name)
        if not (name.endswith("_MAPPING_NAMES") and isinstance(table, Mapping)):
            continue
        if any(table.get(t) == class_name for t in source.model_types) and table.get(target.model_types[0]):
            found.add(table[target.model_types[0]])
    if len(found) != 1:
        raise ValueError(f"{class_name}: no single stock {target.name} class holds it with MLP biases "
                         f"(found {sorted(found) or 'none'})")
    return found.pop()


def carrier_note(config) -> str | None:
    """One sentence for reports and export notes: why a carried model's class is not its own; None for
    a model that was not moved."""
    moved_from = getattr(config, MOVED_FROM, None)
    if not moved_from:
        return None
    target = family_for_config(config)
    now = (getattr(config, "architectures", None) or [target.name])[0]
    switches = f"`{target.mlp_bias_field}`"
    if getattr(config, target.attention_bias_field, False):
        switches += f" and `{target.attention_bias_field}` (its O projection's bias is zero)"
    return (f"The model is {now}, not {moved_from}: the repair adds biases to the down-projections, which "
            f"stock {moved_from} has no switch to load, and {now} with {switches} holds the same weights "
            f"and computes the same outputs (kcm_core.bias_carrier).")


def moved_config(config, class_name: str):
    """``carrier_config`` with ``architectures`` set to the carrier class: what an export of a moved
    model of class ``class_name`` writes as its ``config.json``."""
    new = carrier_config(config, class_name)
    new.architectures = [carrier_class_name(config, class_name)]
    return new


def into_carrier(model: nn.Module) -> nn.Module:
    """``model`` (Mistral or Qwen2, its down-projections possibly with biases) as its carrier class: the
    same tensors (shared, not copied; a zero bias wherever the carrier has one and ``model`` not), the
    same outputs. ``ValueError`` when the move would change them (``carrier_refusal``) or the probe
    disagrees. ``model`` itself is not modified, but shares its tensors with the result."""
    import transformers
    from accelerate import init_empty_weights

    reason = carrier_refusal(model.config)
    if reason is not None:
        raise ValueError(f"{type(model).__name__} cannot be moved to a class with MLP biases: {reason}")
    config = moved_config(model.config, type(model).__name__)
    cls = getattr(transformers, config.architectures[0])
    with init_empty_weights(include_buffers=False), quiet_transformers():
        carrier = cls(config)
    _match_ffn_widths(carrier, model)
    state = _completed(dict(model.state_dict(keep_vars=True)), carrier.state_dict(keep_vars=True),
                       type(model).__name__)
    carrier.load_state_dict(state, assign=True, strict=True)
    own = dict(model.named_buffers())
    for name, _ in list(carrier.named_buffers()):        # rotary tables as the model holds them
        if name in own:
            owner, _, attr = name.rpartition(".")
            carrier.get_submodule(owner)._buffers[attr] = own[name]
    if getattr(model, "generation_config", None) is not None:
        carrier.generation_config = copy.deepcopy(model.generation_config)
    carrier.train(model.training)
    check_same_outputs(model, carrier)
    return carrier


def _match_ffn_widths(carrier: nn.Module, model: nn.Module) -> None:
    """Give the carrier's (empty) FFN layers the model's widths, which may differ per layer."""
    for mine, theirs in zip(ffn_blocks(carrier), ffn_blocks(model)):
        for name, layer, source in ((mine.up_name, mine.up, theirs.up), (mine.gate_name, mine.gate, theirs.gate),
                                    (mine.down_name, mine.down, theirs.down)):
            if layer is None or layer.weight.shape == source.weight.shape:
                continue
            out, inp = source.weight.shape
            carrier.set_submodule(name, nn.Linear(inp, out, bias=layer.bias is not None, device="meta"))


def _completed(state: dict[str, torch.Tensor], wanted: Mapping[str, torch.Tensor],
               what: str) -> dict[str, torch.Tensor]:
    """``state`` with a zero bias for every bias the carrier has and the model lacks; ``ValueError`` for
    any other difference in names."""
    unused = sorted(k for k in state if k not in wanted)
    missing = [k for k in wanted if k not in state]
    odd = [k for k in missing if not (k.endswith(".bias") and k[:-len("bias")] + "weight" in state)]
    if unused or odd:
        raise ValueError(f"{what}'s weights do not map onto the carrier class: unused {unused[:3]}, "
                         f"missing {odd[:3]}")
    for key in missing:
        weight = state[key[:-len("bias")] + "weight"]
        state[key] = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                  requires_grad=weight.requires_grad)
    return state


def empty_carrier_layer(config, class_name: str) -> nn.Module:
    """One transformer layer of the carrier class for a model of class ``class_name``, its parameters
    empty (``meta``): what ``layer_with_biases`` completes a layer's tensors against."""
    import transformers
    from accelerate import init_empty_weights

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    if getattr(one, "layer_types", None):
        one.layer_types = one.layer_types[:1]
    moved = moved_config(one, class_name)
    with init_empty_weights(include_buffers=False), quiet_transformers():
        carrier = getattr(transformers, moved.architectures[0])(moved)
    return transformer_layers(carrier)[1][0]


def layer_with_biases(state: Mapping[str, torch.Tensor], carrier_layer: nn.Module) -> dict[str, torch.Tensor]:
    """One transformer layer's tensors (names relative to the layer) with a zero bias wherever
    ``carrier_layer`` (``empty_carrier_layer``) has one and they have not: the streamed mode writes a
    moved model layer by layer."""
    return _completed(dict(state), dict(carrier_layer.named_parameters()), "a layer")


def check_same_outputs(model: nn.Module, carrier: nn.Module) -> float:
    """The largest difference between the two models' outputs on a fixed probe (one sequence of
    ``PROBE_TOKENS`` seeded token ids); ``ValueError`` above the export tolerance of their dtype."""
    from .export.probe import TOLERANCE

    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model_device(model))
    outs = []
    for m in (model, carrier):
        with eval_mode(m), torch.no_grad():
            out = m(input_ids=ids, attention_mask=torch.ones_like(ids))
        value = getattr(out, "logits", None)
        outs.append((value if value is not None else out.last_hidden_state).double())
    diff = float((outs[0] - outs[1]).abs().max())
    dtype = next(model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, 1e-4)
    if not diff <= tolerance:
        raise ValueError(f"moving {type(model).__name__} to {type(carrier).__name__} changed its output by "
                         f"{diff:.3g} on a probe (tolerance {tolerance:g}); refused")
    return diff
