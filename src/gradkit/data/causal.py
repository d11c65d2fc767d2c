"""Causal-language-model data: JSON lines of ``{"prompt": ..., "response": ...}`` (the loss is on the
response only), JSON lines with one text field (``text_field``), or a plain ``.txt`` file with one text
per non-blank line (the loss is on every token of those two).

Every bad input is one :class:`~gradkit.errors.GradkitError` line naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradkit.errors import GradkitError

PROMPT, RESPONSE = "prompt", "response"


@dataclass
class CausalLMData:
    """Examples for a causal language model: ``prompts[i]`` is conditioned on (no loss; ``""`` for
    plain text), ``responses[i]`` is trained on. ``lines[i]`` is the example's 1-based line in ``path``."""

    prompts: list[str]
    responses: list[str]
    path: str
    lines: list[int] = field(default_factory=list)
    text_field: str | None = None  # the JSON key of plain texts (None: prompt/response, or a .txt file)
    task: str = "causal-lm"

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def plain(self) -> bool:
        """True when the loss is on every token (no prompts)."""
        return not any(self.prompts)

    @property
    def num_outputs(self) -> int:
        return 0  # the model's own vocabulary: no head is added

    def select(self, rows: Sequence[int], path: str | None = None) -> CausalLMData:
        """The examples at ``rows`` (in that order), as a new data set named ``path``."""
        return CausalLMData(
            [self.prompts[i] for i in rows],
            [self.responses[i] for i in rows],
            self.path if path is None else path,
            [self.lines[i] for i in rows] if self.lines else [],
            self.text_field,
        )

    def where(self, i: int) -> str:
        """``path:line`` of example ``i``, for messages."""
        return f"{self.path}:{self.lines[i]}" if self.lines else f"{self.path} (example {i + 1})"


def _read(path: Path) -> str:
    if not path.is_file():
        raise GradkitError(f"{path}: no such file; pass the path of a JSON lines (or .txt) file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GradkitError(
            f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8 and run again"
        ) from None


def _string(path: Path, line: int, row: dict[str, Any], key: str, hint: str) -> str:
    if key not in row:
        keys = ", ".join(repr(k) for k in list(row)[:6]) or "none"
        raise GradkitError(f"{path}:{line}: no {key!r} key (the keys are {keys}); {hint}")
    value = row[key]
    if not isinstance(value, str):
        raise GradkitError(
            f"{path}:{line}: {key!r} is a JSON {type(value).__name__}, not a string; write it as a string"
        )
    return value


def load_causal_lm_data(path: str | os.PathLike | None, *, text_field: str | None = None) -> CausalLMData:
    """Read a causal-LM data file.

    - JSON lines (any suffix but ``.txt``), one object per non-blank line: ``"prompt"`` and ``"response"``
      strings (the prompt may be empty, the response may not), or with ``text_field`` the string
      under that key (the whole text is trained on).
    - ``.txt`` (without ``text_field``): every non-blank line is one text, trained on whole.
    """
    if path is None:
        raise GradkitError(
            '--task causal-lm needs --train FILE: JSON lines of {"prompt": ..., "response": ...} '
            "(or --text-field NAME, or a .txt file); there is no bundled causal-LM data set"
        )
    path = Path(path)
    text = _read(path)
    prompts: list[str] = []
    responses: list[str] = []
    lines: list[int] = []
    plain_txt = path.suffix.lower() == ".txt" and text_field is None
    hint = (
        f"each line needs a {text_field!r} string"
        if text_field is not None
        else 'each line needs "prompt" and "response" strings (or pass --text-field NAME for plain texts)'
    )
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if plain_txt:
            prompts.append("")
            responses.append(line)
            lines.append(number)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise GradkitError(
                f"{path}:{number}: not valid JSON ({err.msg}); each line must be one JSON object, e.g. "
                '{"prompt": "...", "response": "..."} (a plain-text file must end in .txt)'
            ) from None
        if not isinstance(row, dict):
            raise GradkitError(f"{path}:{number}: a JSON {type(row).__name__}, not an object; {hint}")
        if text_field is not None:
            prompt, response, what = "", _string(path, number, row, text_field, hint), text_field
        else:
            prompt = _string(path, number, row, PROMPT, hint)
            response, what = _string(path, number, row, RESPONSE, hint), RESPONSE
        if not response.strip():
            raise GradkitError(
                f"{path}:{number}: empty {what!r}: there is nothing to train on; fill it or remove the line"
            )
        prompts.append(prompt)
        responses.append(response)
        lines.append(number)
    if not responses:
        raise GradkitError(
            f"{path} holds no examples (only blank lines); pass a file with one example per line"
        )
    return CausalLMData(prompts, responses, str(path), lines, text_field)
