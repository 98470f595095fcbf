"""Text policies for reasoning / prompt expansion: sample a text with exact log-probs, re-score it.

A text policy reads a prompt (e.g. a riddle) and writes a text (e.g. the plain prompt an image
model should draw). Sampling is Gumbel-max with a `torch.Generator` over the policy's
(temperature-scaled, optionally vocabulary-restricted) next-token distribution, and the rollout
keeps each token's log-prob under exactly that distribution; `logprobs` re-scores the same
tokens teacher-forced, with gradient, under the same temperature and restriction, so on-policy
ratios are 1.

- :class:`TextPolicy`: the interface (`generate`, `logprobs`, `make_reference`) over four small
  primitives a model family implements (`encode_prompts`, `encode_targets`, `decode`,
  `forward_logits`).
- :class:`HFTextPolicy`: any transformers causal LM + tokenizer (Hub id / folder, or objects).
- :class:`TinyTextPolicy`: the built-in word-level causal transformer for the synthetic world.

Layout: prompts are left-padded, generated tokens follow; position ids count real tokens only,
so a row's positions do not depend on its padding.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from unirl_lightning.data.reasoning import reasoning_words
from unirl_lightning.models.folder import load_weights, read_config, save_folder
from unirl_lightning.models.hf_cache import cache_kwargs, output_cache
from unirl_lightning.models.policy import Policy
from unirl_lightning.models.tiny import CachedBlock
from unirl_lightning.objectives import gumbel_noise
from unirl_lightning.worlds.words import WordTokenizer, split_words, world_words


@dataclass
class TextRollout:
    """Sampled texts. tokens: long `[B, T]` (pad after EOS); logprobs: float32 `[B, T]` under the
    sampling distribution (0 where masked); mask: bool `[B, T]` the generated tokens, EOS included;
    temperature: of the sampling distribution (0 = greedy; log-probs then at temperature 1)."""

    texts: list[str]
    tokens: Tensor
    logprobs: Tensor
    mask: Tensor
    temperature: float = 1.0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: Tensor | Sequence[int]) -> "TextRollout":
        """The sub-rollout of rows `index` (micro-batches)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.tokens.device)
        return replace(self, texts=[self.texts[i] for i in idx.tolist()], tokens=self.tokens[idx],
                       logprobs=self.logprobs[idx], mask=self.mask[idx])




def positions(attention_mask: Tensor) -> Tensor:
    """Position ids `[B, S]` counting only real tokens (left padding does not shift them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def text_matches(text: str, target: str) -> bool:
    """Equality up to case, spacing and punctuation spacing (word-level)."""
    return split_words(text) == split_words(target)


class TextPolicy(Policy):
    """Base class of text policies (see the module docstring).

    Subclasses set `eos_id`, `pad_id` and optionally the buffer `output_mask` (bool `[V]`: tokens
    the policy may write; None = all), and implement the four primitives below.
    """

    eos_id: int
    pad_id: int
    output_mask: Tensor | None

    fsdp_entry_points: tuple[str, ...] = ("generate", "logprobs")

    # -- to implement
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> left-padded ids long `[B, P]` and attention mask long `[B, P]`, on the policy's
        device."""

    @abstractmethod
    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> token ids to write (no EOS), for teacher forcing (supervised warm starts)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids (EOS excluded) -> text."""

    @abstractmethod
    def forward_logits(
        self,
        ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Any]:
        """One causal pass over new tokens `ids` `[B, S]` (after `cache`'s tokens): attention_mask
        `[B, S_past + S]`, position_ids `[B, S]` -> logits `[B, S, V]` and the extended cache."""

    # -- shared machinery
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def log_dist(self, logits: Tensor, temperature: float) -> Tensor:
        """float32 log-probs `[..., V]` of the sampling distribution (temperature 0 -> 1, restricted)."""
        logits = logits.float()
        if temperature > 0:
            logits = logits / temperature
        if self.output_mask is not None:
            logits = logits.masked_fill(~self.output_mask[: logits.shape[-1]], float("-inf"))
        return logits.log_softmax(-1)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> TextRollout:
        """Sample one text per prompt (temperature 0: greedy) -> :class:`TextRollout` with `T <=
        max_new_tokens`."""
        if max_new_tokens < 1 or temperature < 0:
            raise ValueError(
                f"need max_new_tokens >= 1 and temperature >= 0, got {max_new_tokens}, {temperature}"
            )
        ids, am = self.encode_prompts(prompts)
        batch, dev = ids.shape[0], ids.device
        logits, cache = self.forward_logits(ids, am, positions(am), None, use_cache=True)
        done = torch.zeros(batch, dtype=torch.bool, device=dev)
        tokens, logps, masks = [], [], []
        for _ in range(max_new_tokens):
            logp = self.log_dist(logits[:, -1], temperature)
            score = logp if temperature == 0 else logp + gumbel_noise(logp.shape, generator, dev)
            tok = score.argmax(-1)
            live = ~done
            logps.append(torch.where(live, logp.gather(-1, tok[:, None])[:, 0], 0.0))
            tok = torch.where(live, tok, self.pad_id)
            tokens.append(tok)
            masks.append(live)
            done = done | (tok == self.eos_id)
            # sharded (FSDP) ranks must run the same forwards (each gathers parameters): no early stop there
            if bool(done.all()) and not getattr(self, "_fsdp_sharded", False):
                break
            # Finished rows keep feeding pad (attended, like teacher forcing does; never scored).
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
            logits, cache = self.forward_logits(
                tok[:, None], am, am.sum(-1, keepdim=True) - 1, cache, use_cache=True
            )
        tok_t, mask_t = torch.stack(tokens, 1), torch.stack(masks, 1)
        texts = [
            self.decode([t for t, m in zip(row, mrow) if m and t != self.eos_id])
            for row, mrow in zip(tok_t.tolist(), mask_t.tolist())
        ]
        return TextRollout(texts, tok_t, torch.stack(logps, 1), mask_t, float(temperature))

    def logprobs(self, prompts: Sequence[str], rollout: TextRollout) -> Tensor:
        """Teacher-forced log-probs `[B, T]` of `rollout.tokens` (with gradient; 0 where masked)."""
        ids, am = self.encode_prompts(prompts)
        tokens = rollout.tokens.to(ids.device)
        p, t = ids.shape[1], tokens.shape[1]
        full_am = torch.cat([am, torch.ones_like(tokens)], 1)
        logits, _ = self.forward_logits(torch.cat([ids, tokens], 1), full_am, positions(full_am))
        logp = self.log_dist(logits[:, p - 1 : p - 1 + t], rollout.temperature)
        out = logp.gather(-1, tokens[..., None])[..., 0]
        return out.masked_fill(~rollout.mask.to(out.device), 0.0)

    def target_rollout(self, texts: Sequence[str], temperature: float = 1.0) -> TextRollout:
        """Given texts as a rollout (ids + EOS, logprobs 0), to score them by `logprobs` (SFT)."""
        rows = [ids + [self.eos_id] for ids in self.encode_targets(texts)]
        t = max(len(r) for r in rows)
        tokens = torch.tensor(
            [r + [self.pad_id] * (t - len(r)) for r in rows], dtype=torch.long, device=self.device
        )
        mask = torch.tensor(
            [[i < len(r) for i in range(t)] for r in rows], dtype=torch.bool, device=self.device
        )
        return TextRollout(
            list(texts), tokens, torch.zeros(tokens.shape, device=self.device), mask, temperature
        )

    @property
    def output_words(self) -> list[str] | None:
        """The words this policy may write (None: unrestricted), to check against an image model's
        vocabulary."""
        return None


# ---- any transformers causal LM -------------------------------------------------------------------
def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: rollout and training passes must be the same function (ratio 1)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


class HFTextPolicy(TextPolicy):
    """A transformers causal LM and its tokenizer as a text policy.

    Args:
        pretrained: Hub id or folder for `AutoModelForCausalLM` / `AutoTokenizer` (when `model` is None).
        model, tokenizer: ready objects instead (tests build tiny random ones).
        allowed_words: restrict the output to these words' tokens (+ EOS), e.g. the words an image
            model's text encoder knows; None: any token.
        prompt_template: `str.format` template around each prompt, e.g. "Q: {prompt}\\nA:".
        chat_template: wrap prompts with the tokenizer's chat template (instruct models).
        max_prompt_len: prompts are truncated (on the left) to this many tokens.
        dtype: model dtype when loading ("float32", "bfloat16", ...).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        allowed_words: list[str] | None = None,
        prompt_template: str = "{prompt}",
        chat_template: bool = False,
        max_prompt_len: int = 256,
        dtype: str = "float32",
    ):
        super().__init__()
        if model is None or tokenizer is None:
            if pretrained is None:
                raise ValueError(
                    "HFTextPolicy needs `pretrained` (Hub id or folder) or both `model` and `tokenizer`"
                )
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = model or AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, dtype))
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(pretrained)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token: generation could not stop")
        self.pretrained, self.model, self.tokenizer = pretrained, model, tokenizer
        self.prompt_template, self.chat_template, self.max_prompt_len = (
            prompt_template,
            chat_template,
            max_prompt_len,
        )
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        disable_dropout(model)
        self._allowed_words = list(allowed_words) if allowed_words is not None else None
        self.register_buffer("output_mask", self._allowed_mask(), persistent=False)

    def _allowed_mask(self) -> Tensor | None:
        if self._allowed_words is None:
            return None
        size = self.model.get_output_embeddings().weight.shape[0]
        mask = torch.zeros(size, dtype=torch.bool)
        for w in self._allowed_words:  # both the word-initial and the bare form of a BPE word
            for form in (w, " " + w):
                mask[self.tokenizer.encode(form, add_special_tokens=False)] = True
        mask[self.eos_id] = True
        return mask

    @property
    def output_words(self) -> list[str] | None:
        return self._allowed_words

    def _format(self, prompt: str) -> str:
        text = self.prompt_template.format(prompt=prompt)
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        rows = [
            self.tokenizer.encode(self._format(p), add_special_tokens=not self.chat_template)[
                -self.max_prompt_len :
            ]
            for p in prompts
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
        am = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids.to(self.device), am.to(self.device)

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def forward_logits(self, ids, attention_mask, position_ids, cache=None, use_cache=False):
        out = self.model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(self.model, cache),
        )
        return out.logits, (output_cache(out) if use_cache else None)

    def fsdp_units(self) -> list[nn.Module]:
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        return list(layers) if layers is not None else []

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Model and tokenizer (transformers format) plus this wrapper's options."""
        path = Path(path)
        if state_dict is not None:
            state_dict = {
                k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")
            }
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)
        (path / "text_policy.json").write_text(
            json.dumps(
                {
                    "allowed_words": self._allowed_words,
                    "prompt_template": self.prompt_template,
                    "chat_template": self.chat_template,
                    "max_prompt_len": self.max_prompt_len,
                }
            )
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "HFTextPolicy":
        meta = Path(path) / "text_policy.json"
        options = json.loads(meta.read_text()) if meta.is_file() else {}
        return cls(str(path), **{**options, **kwargs})


# ---- the built-in model --------------------------------------------------------------------------
SPECIALS = ("[PAD]", "[BOS]", "[SEP]", "[EOS]", "[UNK]")
PAD, BOS, SEP, EOS, UNK = range(len(SPECIALS))


@dataclass
class TinyTextConfig:
    """The built-in text policy: sizes, input vocabulary (`words`), output vocabulary (`output_words`).

    Defaults: the reasoning task's words in, the world's words out (what `TinyFlowModel`'s
    text encoder knows), about 0.1M parameters.
    """

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    max_len: int = 48
    max_prompt_len: int = 24
    words: list[str] = field(default_factory=reasoning_words)
    output_words: list[str] = field(default_factory=world_words)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        missing = [w for w in self.output_words if w not in set(self.words)]
        if missing:
            raise ValueError(f"output_words must be a subset of words; missing {missing[:5]}")


class TinyTextPolicy(TextPolicy):
    """The built-in text policy: a tiny word-level causal transformer.

    Sequence: `[PAD].. [BOS] prompt words [SEP] generated words [EOS]`; unknown prompt words map to
    [UNK]; the output is restricted to `config.output_words` and [EOS].
    """

    def __init__(self, config: TinyTextConfig | None = None, **overrides):
        super().__init__()
        cfg = config or TinyTextConfig(**overrides)
        self.config = cfg
        self.words = WordTokenizer(cfg.words)
        self.eos_id, self.pad_id = EOS, PAD
        vocab = len(SPECIALS) + len(self.words)
        self.tok_emb = nn.Embedding(vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(
            CachedBlock(cfg.d_model, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[[len(SPECIALS) + self.words.index[w] for w in cfg.output_words]] = True
        mask[EOS] = True
        self.register_buffer("output_mask", mask, persistent=False)

    @property
    def output_words(self) -> list[str]:
        return list(self.config.output_words)

    def _ids(self, text: str) -> list[int]:
        return [len(SPECIALS) + i if i >= 0 else UNK for i in self.words.encode(text, unk_id=-1)]

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        keep = self.config.max_prompt_len - 2
        rows = [[BOS] + self._ids(p)[-keep:] + [SEP] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows], dtype=torch.long, device=self.device)
        am = torch.tensor(
            [[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=self.device
        )
        return ids, am

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._ids(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.words.decode(i - len(SPECIALS) for i in ids if i >= len(SPECIALS))

    def forward_logits(self, ids, attention_mask, position_ids, cache=None, use_cache=False):
        if int(position_ids.max()) >= self.config.max_len:
            raise ValueError(
                f"sequence longer than max_len={self.config.max_len}; raise it or generate fewer tokens"
            )
        s, total = ids.shape[1], attention_mask.shape[1]
        q_idx = torch.arange(total - s, total, device=ids.device)[:, None]
        k_idx = torch.arange(total, device=ids.device)[None]
        # Causal over real keys; a query always sees itself (left-pad rows would otherwise be all-masked ->
        # NaN).
        allowed = ((k_idx <= q_idx) & attention_mask.bool()[:, None, :]) | (k_idx == q_idx)
        if use_cache and cache is None:
            cache = [[] for _ in self.blocks]
        x = self.tok_emb(ids) + self.pos_emb(position_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, allowed[:, None], cache[i] if use_cache else None)
        return self.head(self.ln_f(x)), (cache if use_cache else None)

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        save_folder(path, self.config, state_dict if state_dict is not None else self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "TinyTextPolicy":
        return load_weights(cls(TinyTextConfig(**{**read_config(path, cls.__name__), **overrides})), path)
