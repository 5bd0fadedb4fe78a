"""Prompts of the long-context tasks: the task text plus the answer's start, through the chat template when the
tokenizer has one, built exactly as lm-eval builds a ``generate_until`` request with ``gen_prefix`` (so the task
files of :mod:`llmprune.evaluate.longctx.task_files` reproduce the dense numbers with plain lm-eval)."""

from __future__ import annotations

from llmprune.errors import ConfigError


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, text: str, answer_prefix: str, chat: bool) -> str:
    """``text`` as the user turn and ``answer_prefix`` as the start of the assistant turn (``chat``), or the two
    joined (with a space when neither has whitespace at the join, as lm-eval does).

    Raises:
        ConfigError: ``chat`` without a chat template, or a template that fails.
    """
    if not chat:
        sep = "" if not text or text[-1].isspace() or answer_prefix[:1].isspace() else " "
        return text + sep + answer_prefix
    if not has_chat_template(tokenizer):
        raise ConfigError("the tokenizer has no chat template (use --no-chat-template)")
    from jinja2.exceptions import TemplateError

    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": answer_prefix}]
    try:  # lm-eval: apply_chat_template(..., add_generation_prompt=False, continue_final_message=True)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True)
    except TemplateError as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"the tokenizer's chat template failed ({type(exc).__name__}: {msg[:300]})") from None


def encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt: no special tokens added (a chat template writes its own; lm-eval adds none)."""
    return tokenizer(prompt, add_special_tokens=False).input_ids


def count_tokens(tokenizer, prompt: str) -> int:
    """``len(encode(tokenizer, prompt))``."""
    return len(encode(tokenizer, prompt))
