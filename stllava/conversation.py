"""Conversation templates, byte-exact to docs/Method.md#templates.

A :class:`Conversation` renders a list of ``(role, text)`` messages into the prompt string the
model was trained on. ``conv_templates`` maps a template name to a blank conversation; always
``.copy()`` it before appending.
"""
from __future__ import annotations

import dataclasses
from enum import Enum, auto

from stllava.constants import DEFAULT_IMAGE_TOKEN


class SeparatorStyle(Enum):
    TWO = auto()  # vicuna v1 / llava v1 / v1_sq: seps alternate between sep and sep2
    PLAIN = auto()  # alignment pretraining: text only


@dataclasses.dataclass
class Conversation:
    system: str
    roles: tuple[str, ...]
    messages: list[list] = dataclasses.field(default_factory=list)
    sep_style: SeparatorStyle = SeparatorStyle.TWO
    sep: str = " "
    sep2: str | None = "</s>"
    version: str = "v1"

    def append_message(self, role: str, text: str | None) -> None:
        """Append one message; ``text=None`` (or "") leaves the generation slot open."""
        if role not in self.roles:
            raise ValueError(
                f"role {role!r} is not a role of template {self.version!r}; valid roles: {list(self.roles)}"
            )
        self.messages.append([role, text])

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])

    @staticmethod
    def _first_image_text(text: str) -> str:
        # A first message holding <image> is rendered as "<image>\n" + the rest (docs/Method.md#separators).
        if DEFAULT_IMAGE_TOKEN in text:
            return DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        return text

    def get_prompt(self) -> str:
        """Return the rendered prompt string."""
        messages = [list(m) for m in self.messages]
        if messages and messages[0][1]:
            messages[0][1] = self._first_image_text(messages[0][1])
        seps = [self.sep, self.sep2]
        if self.sep_style is SeparatorStyle.TWO:
            out = self.system + seps[0]
            for i, (role, text) in enumerate(messages):
                out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
            return out
        if self.sep_style is SeparatorStyle.PLAIN:
            out = self.system
            for i, (_, text) in enumerate(messages):
                out += (text + seps[i % 2]) if text else ""
            return out
        raise ValueError(f"unknown separator style {self.sep_style}")

    def to_dict(self) -> dict:
        return {"system": self.system, "roles": self.roles, "messages": self.messages,
                "sep": self.sep, "sep2": self.sep2, "version": self.version}


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SQ_SYSTEM = VICUNA_SYSTEM + (
    "Also, the artificial intelligence assistant is a curious virtual user. The virtual user asks "
    "complex questions that are relevant to the content in the image, for example, asking about "
    "background knowledge of the objects in the image, asking to discuss about events happening in "
    "the image, etc. Again, do not ask about uncertain details."
)

conv_vicuna_v1 = Conversation(system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), version="v1")
conv_llava_v1 = Conversation(system=LLAVA_SYSTEM, roles=("USER", "ASSISTANT"), version="llava_v1")
conv_v1_sq = Conversation(system=SQ_SYSTEM, roles=("USER", "ASSISTANT", "VUSER"), version="v1_sq")
conv_plain = Conversation(system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="",
                          sep2="\n", version="plain")

conv_templates: dict[str, Conversation] = {
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llava_v1": conv_llava_v1,
    "v1_sq": conv_v1_sq,
    "plain": conv_plain,
}
default_conversation = conv_vicuna_v1


def get_conv_template(name: str, where: str = "") -> Conversation:
    """Return a fresh copy of template ``name``; a clear ValueError names the valid choices."""
    if name not in conv_templates:
        src = f" (from {where})" if where else ""
        raise ValueError(
            f"unknown conversation template {name!r}{src}; valid choices: {sorted(conv_templates)}"
        )
    return conv_templates[name].copy()
