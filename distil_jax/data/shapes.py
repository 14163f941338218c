"""The three row shapes a dataset may have, and how each becomes token ids and a token mask.

* ``text``: one text column (Distily's).
* ``chat``: a column of conversations, each a list of turns ``{"role", "content"}`` (TRL's
  ``messages`` datasets), rendered with the tokenizer's chat template.
* ``prompt_completion``: a prompt column and a completion column (TRL's convention): plain
  strings are tokenized one after the other; when both hold lists of turns, prompt + completion
  is one conversation rendered with the chat template.

``encode_rows`` turns a batch of rows into ``input_ids`` and, with ``loss_on="completion"``,
``token_mask`` (1 on the tokens a loss counts: assistant turns, or the completion). The mask is
on tokens, as transformers' ``assistant_masks``; ``layout`` turns it into the per-position loss
mask (a position counts when the token it predicts does).

Errors are one line naming the fix (ValueError, as the rest of distil_jax.data).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

SHAPES = ("text", "chat", "prompt_completion")
LOSS_ON = ("all", "completion")

# transformers' marker for the assistant tokens (`return_assistant_tokens_mask`).
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def detect_shape(uri: str, columns: Sequence[str], column: str | None,
                 completion_column: str | None, first_row: Mapping | None) -> tuple[str, str, str | None]:
    """(shape, column, completion_column) of a dataset with these ``columns``.

    column None: detected: "messages" -> chat, "prompt" + "completion" -> prompt/completion,
    "text" -> text. A given column is chat when its first value is a list of turns, else text;
    with completion_column it is the prompt of prompt/completion."""
    columns = list(columns)
    if column is None:
        if "messages" in columns:
            column = "messages"
        elif "prompt" in columns and "completion" in columns:
            column, completion_column = "prompt", completion_column or "completion"
        elif "text" in columns:
            column = "text"
        else:
            raise ValueError(f"dataset {uri!r} has none of the columns 'messages', 'prompt' + "
                             f"'completion' or 'text' ({columns}): set dataset.column (and "
                             "dataset.completion_column for a completion)")
    for name in (column, completion_column):
        if name is not None and name not in columns:
            raise ValueError(f"dataset {uri!r} has no column {name!r}; available columns: "
                             f"{columns}: set column to one of them")
    if completion_column is not None:
        return "prompt_completion", column, completion_column
    value = None if first_row is None else first_row.get(column)
    return ("chat" if _is_turns(value) else "text"), column, None


def _is_turns(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], Mapping)


def check_loss_on(uri: str, shape: str, loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise ValueError(f"dataset.loss_on={loss_on!r}: use 'all' or 'completion'")
    if loss_on == "completion" and shape == "text":
        raise ValueError(f"dataset.loss_on='completion' needs chat rows (a messages column) or a "
                         f"prompt and a completion, but dataset {uri!r} is plain text: set "
                         "dataset.loss_on='all', or dataset.completion_column")


def require_chat_template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat template, needed to render chat rows: "
                         "use an instruct model's tokenizer (tokenizer_name_or_path) or set "
                         "tokenizer.chat_template")
    if not isinstance(template, str):  # several named templates: the default one
        template = template.get("default") if isinstance(template, Mapping) else None
        if not template:
            raise ValueError("the tokenizer has several chat templates and no 'default' one: "
                             "set tokenizer.chat_template to the one to train on")
    return template


def check_turns(messages: Any, where: str) -> list[dict]:
    """The turns of one conversation as plain dicts; ValueError naming the row and turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: a conversation must be a non-empty list of turns "
                         "{'role': ..., 'content': ...}; fix the row or drop it")
    turns = []
    for k, turn in enumerate(messages):
        for key in ("role", "content"):
            if not isinstance(turn, Mapping) or turn.get(key) is None:
                raise ValueError(f"{where}: turn {k} has no {key!r} ({turn!r}); every turn needs a "
                                 "role and a content: fix the row or drop it")
        turns.append(dict(turn))
    return turns


def encode_rows(rows: Mapping[str, list], tokenizer: Any, shape: str, column: str,
                completion_column: str | None, loss_on: str, first_index: int = 0) -> dict:
    """A batch of rows ({column: [values]}) -> {"input_ids": [[int]], "token_mask": [[int]]}
    ("token_mask" only with loss_on="completion"). No special tokens are added beyond what a
    chat template writes. first_index: the row number of the batch's first row (for errors)."""
    n = len(rows[column])
    if shape == "text":  # one batched call of the (fast) tokenizer
        for i, value in enumerate(rows[column]):
            if not isinstance(value, str):
                raise ValueError(f"row {first_index + i}: column {column!r} holds a "
                                 f"{type(value).__name__}, not text: set column to a text column")
        return {"input_ids": tokenizer(list(rows[column]), add_special_tokens=False,
                                       verbose=False)["input_ids"]}
    ids, masks = [], []
    for i in range(n):
        where = f"row {first_index + i}"
        if shape == "chat":
            seq, mask = encode_chat(tokenizer, check_turns(rows[column][i], where), None, loss_on)
        else:
            seq, mask = _encode_prompt_completion(tokenizer, rows[column][i],
                                                  rows[completion_column][i], loss_on, where)
        ids.append(seq)
        masks.append(mask)
    out = {"input_ids": ids}
    if loss_on == "completion":
        out["token_mask"] = masks
    return out


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _encode_prompt_completion(tokenizer, prompt, completion, loss_on, where):
    if _is_turns(prompt) or _is_turns(completion):
        turns = check_turns(prompt, where + " (prompt)")
        answer = check_turns(completion, where + " (completion)")
        return encode_chat(tokenizer, turns + answer, len(turns), loss_on)
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: the {name} is a {type(value).__name__}, not text or a list "
                             "of turns: point dataset.column / dataset.completion_column at text")
    p, c = _encode_text(tokenizer, prompt), _encode_text(tokenizer, completion)
    return p + c, [0] * len(p) + [1] * len(c)


def encode_chat(tokenizer: Any, turns: list[dict], prompt_turns: int | None,
                loss_on: str) -> tuple[list[int], list[int] | None]:
    """(ids, token mask or None) of one conversation rendered with the chat template.

    prompt_turns None: the counted tokens are the assistant turns'; an int: everything after
    the first prompt_turns turns (the completion of a chat-shaped prompt/completion row).
    Where the template marks assistant turns with ``{% generation %}`` and prompt_turns is None,
    transformers' ``assistant_masks`` is the mask. Otherwise a turn's tokens are found by
    rendering the conversation before it (with the generation prompt) and through it: the
    characters in between are the turn's (the tokens that cover them, as transformers counts)."""
    template = require_chat_template(tokenizer)
    if loss_on != "completion":
        return _render_ids(tokenizer, turns), None
    if prompt_turns is None and _GENERATION.search(template):
        enc = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), [int(m) for m in enc["assistant_masks"]]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    if prompt_turns is None:
        counted = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
        spans = [_turn_span(tokenizer, turns, i, i + 1, text) for i in counted]
    else:
        spans = [_turn_span(tokenizer, turns, prompt_turns, len(turns), text)]
    enc = tokenizer(text, add_special_tokens=False, verbose=False)
    mask = [0] * len(enc["input_ids"])
    for start, end in spans:
        if end <= start:
            continue
        first, last = enc.char_to_token(0, start), enc.char_to_token(0, end - 1)
        if first is None or last is None:
            continue
        mask[first:last + 1] = [1] * (last + 1 - first)
    return list(enc["input_ids"]), mask


def _render_ids(tokenizer, turns) -> list[int]:
    return list(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"])


def _turn_span(tokenizer, turns, start: int, stop: int, text: str) -> tuple[int, int]:
    """Characters of turns[start:stop] in the rendered conversation `text`."""
    if start == 0:
        raise ValueError("a conversation starts with an assistant turn (or an empty prompt): "
                         "nothing comes before it to prompt it; start it with a user turn")
    before = tokenizer.apply_chat_template(turns[:start], tokenize=False, add_generation_prompt=True)
    through = tokenizer.apply_chat_template(turns[:stop], tokenize=False)
    if not (through.startswith(before) and text.startswith(through)):
        raise ValueError("the chat template renders a conversation differently from its "
                         "beginning, so the assistant turns cannot be found: add {% generation %}"
                         " markers around the assistant turns to the template, or use "
                         "dataset.loss_on='all'")
    return len(before), len(through)
