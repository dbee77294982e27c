"""Sequence-classification reward models (``model:<folder or hub id>``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kltrain.models.loading import DTYPES
from kltrain.rewards.errors import RewardError, check
from kltrain.rewards.text import completion_text


def require_local_folder(source: str, where: str) -> None:
    """A name written as a path (``./rm``, ``/abs/rm``, ``a/b/c``) that does not exist is a
    missing folder, not a hub id to look up."""
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    if looks_local and not Path(source).expanduser().is_dir():
        what = "is a file, not a model folder" if Path(source).exists() else "does not exist"
        raise RewardError(f"{where}: the local folder {source} {what}")


def _refuse_new_weights(where: str, info: dict[str, Any]) -> None:
    """Weights transformers had to initialise at random (e.g. the classification head of a
    causal LM loaded as a reward model) would make the reward noise."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RewardError(
            f"{where}: these weights are not in the checkpoint and were newly initialised at "
            f"random: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}. It is not a "
            f"trained sequence-classification reward model (a causal LM?), so its score would "
            f"be noise; give a reward model trained with its classification head"
        )


class RewardModel:
    """A Hugging Face ``AutoModelForSequenceClassification`` scoring ``prompt + completion``.

    Text: string prompts are concatenated with the completion and tokenized with the model's
    special tokens (e.g. BOS); conversational prompts are rendered with the reward tokenizer's
    chat template (prompt messages + the completion as an ``assistant`` message) and tokenized
    without adding special tokens again. Batched (``batch_size``, right padding), under
    ``torch.inference_mode()``, ``trust_remote_code`` as given (off by default).

    Score of sample ``i`` from the logits ``z[i]`` (``[num_labels]``):

    - one logit (``num_labels == 1``): ``z[i, 0]`` (``output="logit"``, the default) or
      ``σ(z[i, 0])`` (``output="probability"``);
    - several classes: ``label`` (an index, or a name in the model's ``id2label``) is required;
      ``softmax(z[i])[label]`` (``output="probability"``, the default) or ``z[i, label]``
      (``output="logit"``).

    A model without a pad token id is run one sample at a time (its pooling needs a pad id to
    find the last token of a padded row); a tokenizer whose pad id differs from the model's
    is an error.
    """

    PARAMS = ("label", "output", "batch_size", "max_length", "dtype")
    DTYPES = DTYPES  # the model dtype names (config.DTypeName)

    def __init__(
        self,
        source: str,
        *,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        label: int | str | None = None,
        output: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        dtype: str = "fp32",
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        where = f"reward model {source!r}"
        if dtype not in self.DTYPES:
            raise RewardError(
                f"{where}: dtype must be one of {', '.join(self.DTYPES)}; got {dtype!r}"
            )
        check(
            isinstance(batch_size, int) and batch_size >= 1, f"{where}: batch_size ≥ 1", batch_size
        )
        check(
            max_length is None or (isinstance(max_length, int) and max_length >= 1),
            f"{where}: max_length ≥ 1 or null",
            max_length,
        )
        require_local_folder(source, where)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=trust_remote_code
            )
            self.model, info = AutoModelForSequenceClassification.from_pretrained(
                source,
                trust_remote_code=trust_remote_code,
                dtype=self.DTYPES[dtype],
                output_loading_info=True,
                use_kernels=False,  # no Hub binaries (as kltrain.models.loading.load_causal_lm)
            )
        except Exception as err:
            raise RewardError(
                f"could not load {where} (a local folder or hub id of a sequence-classification "
                f"model; offline only local folders work): {type(err).__name__}: {err}"
            ) from err
        _refuse_new_weights(where, info)
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        num_labels = int(self.model.config.num_labels)
        id2label = {int(k): v for k, v in (self.model.config.id2label or {}).items()}
        if num_labels == 1:
            if label not in (None, 0):
                raise RewardError(f"{where} has a single logit; label must be omitted or 0")
            self.label = 0
            self.output = output or "logit"
        else:
            if label is None:
                raise RewardError(
                    f"{where} has {num_labels} classes {id2label}; set kwargs label to the index "
                    f"or name of the class whose score is the reward"
                )
            if isinstance(label, str):
                by_name = {v: k for k, v in id2label.items()}
                if label not in by_name:
                    raise RewardError(f"{where}: no class named {label!r}; classes: {id2label}")
                label = by_name[label]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
                raise RewardError(f"{where}: label must be in [0, {num_labels}); got {label!r}")
            self.label = label
            self.output = output or "probability"
        if self.output not in ("logit", "probability"):
            raise RewardError(f"{where}: output must be 'logit' or 'probability'; got {output!r}")
        self.num_labels = num_labels
        pad_id = self.model.config.pad_token_id
        if pad_id is not None and self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = pad_id
        elif pad_id is not None and self.tokenizer.pad_token_id != pad_id:
            raise RewardError(
                f"{where}: the tokenizer's pad id {self.tokenizer.pad_token_id} differs from the "
                f"model's config.pad_token_id {pad_id}; the model would pool the wrong token"
            )
        self.batched = pad_id is not None
        self.tokenizer.padding_side = "right"

    def texts(self, prompts: list, completions: list) -> tuple[list[str], bool]:
        """The strings to score and whether they came from the chat template."""
        if not prompts or isinstance(prompts[0], str):
            return [p + completion_text(c) for p, c in zip(prompts, completions)], False
        if not getattr(self.tokenizer, "chat_template", None):
            raise RewardError(
                "conversational prompts need the reward model's tokenizer to have a chat template"
            )
        texts = []
        for p, c in zip(prompts, completions):
            reply = (
                list(c) if isinstance(c, (list, tuple)) else [{"role": "assistant", "content": c}]
            )
            texts.append(self.tokenizer.apply_chat_template([*p, *reply], tokenize=False))
        return texts, True

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        texts, templated = self.texts(prompts, completions)
        step = self.batch_size if self.batched else 1
        scores: list[float] = []
        for start in range(0, len(texts), step):
            enc = self.tokenizer(
                texts[start : start + step],
                padding=self.batched,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=not templated,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
                ).logits.float()
            if self.num_labels == 1:
                z = logits[:, 0]
                s = torch.sigmoid(z) if self.output == "probability" else z
            else:
                s = (
                    logits.softmax(-1)[:, self.label]
                    if self.output == "probability"
                    else logits[:, self.label]
                )
            scores.extend(s.cpu().tolist())
        return scores


# ----------------------------------------------------------------------------------------------
