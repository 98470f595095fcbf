"""The memory plan's activation estimate against measured saved-activation bytes at real width and
reduced depth, on CPU (one forward with gradients; autograd's saved tensors summed, each storage once,
weights left out).

    python benchmarks/memory_plan.py [--only janus sd35 flux]

- janus: two Llama blocks of Janus-Pro-7B's language model (hidden 4096, 32 heads, intermediate 11008),
  fp32 weights under bf16 autocast (the configs' bf16-mixed), 2 rows (one prompt's CFG pair) x 607
  tokens (32 prompt + 575 image tokens), with and without activation checkpointing;
- sd35: two SD3.5-Medium joint blocks (1536 wide, the first with dual attention), bf16 weights,
  2 rows x 1229 tokens (1024 latent + 205 text tokens at 512 px);
- flux: one double- and one single-stream FLUX.1-dev block (3072 wide), bf16, 1 row x 1280 tokens.

Prints a markdown table: estimate, measured, relative error.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from unirl_lightning.plan import activations as act
from unirl_lightning.plan.measure import saved_activation_bytes

MiB = 2**20


def janus(checkpointing: bool) -> tuple[float, float]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    h, i, heads, layers, rows, seq = 4096, 11008, 32, 2, 2, 607
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
    )
    model = LlamaModel(cfg).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = torch.randn(rows, seq, h, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, measured = saved_activation_bytes(
            lambda: model(inputs_embeds=x).last_hidden_state, model.parameters()
        )
    stack = act.llama_stack(h, i, heads, layers, mixed=True)
    # forward-time saved bytes: with checkpointing, the recomputed layer exists only in backward
    est = (
        rows * seq * (layers * stack.input_bytes + stack.extra)
        if checkpointing
        else stack.bytes(rows * seq, False)
    )
    return est, measured


def sd35() -> tuple[float, float]:
    from diffusers.models.attention import JointTransformerBlock

    d, rows, n_img, n_txt = 1536, 2, 1024, 205
    blocks = [
        JointTransformerBlock(
            dim=d,
            num_attention_heads=24,
            attention_head_dim=64,
            qk_norm="rms_norm",
            use_dual_attention=dual,
        ).to(torch.bfloat16)
        for dual in (True, False)
    ]
    x = torch.randn(rows, n_img, d, dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(rows, n_txt, d, dtype=torch.bfloat16, requires_grad=True)
    e = torch.randn(rows, d, dtype=torch.bfloat16, requires_grad=True)

    def run():
        cc, xx = c, x
        for b in blocks:
            cc, xx = b(xx, cc, e)
        return xx

    params = [p for b in blocks for p in b.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, measured = saved_activation_bytes(run, params)
    stack = act.mmdit_stack(d, 2, 1)
    return rows * (n_img + n_txt) * 2 * stack.per_token, measured


def flux() -> tuple[float, float]:
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    d, rows, n_img, n_txt = 3072, 1, 1024, 256
    double = FluxTransformerBlock(dim=d, num_attention_heads=24, attention_head_dim=128).to(torch.bfloat16)
    single = FluxSingleTransformerBlock(dim=d, num_attention_heads=24, attention_head_dim=128).to(
        torch.bfloat16
    )
    x = torch.randn(rows, n_img, d, dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(rows, n_txt, d, dtype=torch.bfloat16, requires_grad=True)
    e = torch.randn(rows, d, dtype=torch.bfloat16, requires_grad=True)
    rope = (torch.randn(n_img + n_txt, 128), torch.randn(n_img + n_txt, 128))

    def run():
        cc, xx = double(x, c, e, image_rotary_emb=rope)
        return single(xx, cc, e, image_rotary_emb=rope)[1]

    params = [*double.parameters(), *single.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, measured = saved_activation_bytes(run, params)
    stack = act.flux_stack(d, 1, 1)
    return rows * (n_img + n_txt) * 2 * stack.per_token, measured


CASES = {
    "janus": [
        ("Janus-Pro-7B LM, 2 blocks, no checkpointing", lambda: janus(False)),
        ("Janus-Pro-7B LM, 2 blocks, checkpointing (forward)", lambda: janus(True)),
    ],
    "sd35": [("SD3.5-Medium, 2 joint blocks (1 dual)", sd35)],
    "flux": [("FLUX.1-dev, 1 double + 1 single block", flux)],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print("| case | estimate MiB | measured MiB | error | seconds |\n|---|---|---|---|---|")
    for key in args.only:
        for name, fn in CASES[key]:
            t = time.perf_counter()
            est, measured = fn()
            print(
                f"| {name} | {est / MiB:.1f} | {measured / MiB:.1f} | {(est - measured) / measured:+.1%} "
                f"| {time.perf_counter() - t:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
