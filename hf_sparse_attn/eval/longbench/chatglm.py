"""The official LongBench prompt path of ChatGLM2 / ChatGLM3 (THUDM/LongBench ``pred.py``), for their remote-code
tokenizers. It replaces the chat-template step of :func:`predict.build_inputs` for these tokenizers:

1. ``prompt = template.format(**sample)``;
2. middle truncation to ``max_length`` tokens (31500 for chatglm2-6b, chatglm2-6b-32k and chatglm3-6b-32k in the
   official ``model2maxlen.json``): the prompt is tokenized *with* the special tokens for ChatGLM2 (its ``[gMASK]
   sop`` prefix counts against the budget) and *without* them for ChatGLM3, as the official script does; the
   first and last ``max_length // 2`` tokens are decoded with ``skip_special_tokens=True`` and joined;
3. except on trec, triviaqa, samsum, lsht, lcc, repobench-p: ChatGLM2 wraps the text with
   ``tokenizer.build_prompt(prompt)`` (its chat round format) and tokenizes it; ChatGLM3 takes the token ids of
   ``tokenizer.build_chat_input(prompt)`` directly (role tokens and prefix included);
4. on the six tasks above the prompt is tokenized as it is (prefix added).

The official script picks the path by model name ("chatglm3" in it, else "chatglm"); here it is picked by what the
tokenizer offers, which gives the same choice for the published tokenizers (ChatGLM2's has ``build_prompt`` and no
``build_chat_input``, ChatGLM3's has ``build_chat_input``) and also works for a local path with any name.
"""

from __future__ import annotations

from typing import Optional

from .tasks import TaskSpec, build_prompt

__all__ = ["chatglm_prompt_style", "build_chatglm_inputs"]


def chatglm_prompt_style(tokenizer) -> Optional[str]:
    """"chatglm3" when the tokenizer has ``build_chat_input``, "chatglm2" when it has ``build_prompt``, else None."""
    if callable(getattr(tokenizer, "build_chat_input", None)):
        return "chatglm3"
    if callable(getattr(tokenizer, "build_prompt", None)):
        return "chatglm2"
    return None


def build_chatglm_inputs(tokenizer, spec: TaskSpec, sample: dict, max_length: int, style: str,
                         chat_template: bool = True) -> dict:
    """Model input of one sample, built as the official pred.py builds it for ChatGLM2 / ChatGLM3:
    a dict with ``input_ids`` [1, L] (and ``attention_mask`` [1, L])."""
    if style not in ("chatglm2", "chatglm3"):
        raise ValueError(f"style must be 'chatglm2' or 'chatglm3', got {style!r}")
    prompt = build_prompt(spec, sample)
    token_ids = tokenizer(prompt, truncation=False, add_special_tokens=style == "chatglm2")["input_ids"]
    if len(token_ids) > max_length:
        half = max_length // 2
        prompt = (tokenizer.decode(token_ids[:half], skip_special_tokens=True)
                  + tokenizer.decode(token_ids[-half:], skip_special_tokens=True))
    if chat_template and spec.use_chat_template:
        if style == "chatglm3":
            encoded = tokenizer.build_chat_input(prompt)
            return {"input_ids": encoded["input_ids"], "attention_mask": encoded.get("attention_mask")}
        prompt = tokenizer.build_prompt(prompt)
    encoded = tokenizer(prompt, truncation=False, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded.get("attention_mask")}
