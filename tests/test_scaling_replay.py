"""The layer-replay in ``fit_scales`` must give exactly what fitting with full forward passes gives.

The reference below is the plain algorithm of docs/method.md: for each layer, run the whole (masked,
already scaled) student forward, collect the kept activations at that layer's down-projection, solve
the ridge normal equations, fold the scales in. No replay, no early exit beyond the layer.
"""
import pytest
import torch
import transformers as T

from kcm_core.arch import ffn_blocks
from kcm_core.realise import mask_copy
from kcm_core.scaling import ScaleConfig, fit_scales, teacher_targets
from kcm_core.scores import random_scores
from kcm_core.select import select_top_k

CONFIGS = {
    "bert": lambda: T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=4, intermediate_size=37),
    "distilbert": lambda: T.DistilBertConfig(vocab_size=99, dim=32, n_layers=3, n_heads=4,
                                             hidden_dim=37),
    "gpt2": lambda: T.GPT2Config(vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_inner=37,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "llama": lambda: T.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=37, pad_token_id=0),
    "qwen2": lambda: T.Qwen2Config(vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=37, pad_token_id=0),
}


def _batches():
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        ids = torch.randint(1, 99, (5, 11), generator=gen)
        mask = torch.ones_like(ids)
        mask[:2, 7:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def reference_scales(model, plan, batches, ridge):
    targets = teacher_targets(model, batches)
    student = mask_copy(model, plan.without_scales())
    result = []
    for block, layer, target in zip(ffn_blocks(student), plan.layers, targets):
        keep = torch.tensor(layer.keep_idx)
        hs = []

        def grab(_m, args, batch_masks=[]):
            hs.append(args[0])

        for batch in batches:
            handle = block.down.register_forward_pre_hook(grab)
            with torch.no_grad():
                student(**batch)
            handle.remove()
            hs[-1] = hs[-1][batch["attention_mask"].bool()][:, keep].double()
        h = torch.cat(hs)                                         # (tokens, k)
        w = block.down_rows().detach()[keep].double()             # (k, d)
        a = (h[:, :, None] * w[None, :, :]).reshape(h.shape[0], -1, w.shape[1])  # (tokens, k, d)
        a = a.permute(0, 2, 1).reshape(-1, len(keep))             # (tokens*d, k): column i = h_i w_i
        b = target.double().reshape(-1)
        s = torch.linalg.solve(a.t() @ a + ridge * torch.eye(len(keep), dtype=torch.float64),
                               a.t() @ b + ridge)
        result.append(s)
        with torch.no_grad():
            wt = block.down.weight
            if block.transposed:
                wt[keep] *= s.to(wt.dtype)[:, None]
            else:
                wt[:, keep] *= s.to(wt.dtype)[None, :]
    return result


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_replayed_fit_equals_full_pass_reference(family):
    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_config(CONFIGS[family]()).eval()
    plan = select_top_k(random_scores([37] * 3, seed=1), 60)
    batches = _batches()
    fitted = fit_scales(model, plan, batches, ScaleConfig(ridge=1e-6))
    expected = reference_scales(model, plan, batches, ridge=1e-6)
    assert fitted.info.scaled_layers == 3
    for layer, ref in zip(fitted.layers, expected):
        got = torch.tensor(layer.scales, dtype=torch.float64)
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6), (got - ref).abs().max()
    # The fit is not trivial: with a tiny ridge the scales move away from 1.
    assert max(abs(s - 1) for s in fitted.layers[-1].scales) > 0.05
