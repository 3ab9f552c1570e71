"""What a tool's answer becomes in ``Result.result``.

* structured content, when the tool gives it, as it is;
* otherwise text content: one block is its string, several a list of strings;
* otherwise (images, audio, resources, mixed blocks) the list of content
  blocks in MCP's own JSON form, e.g.
  ``{"type": "image", "data": "<base64>", "mimeType": "image/png"}``;
* no content at all is ``None``.

Falsy values (``0``, ``""``, ``[]``, ``false``) pass through untouched.
"""

from __future__ import annotations

from typing import Any

from mcp.types import CallToolResult, TextContent

__all__ = ["tool_error", "tool_output"]


def tool_output(answer: CallToolResult) -> Any:
    if answer.structured_content is not None:
        return answer.structured_content
    blocks = answer.content
    if not blocks:
        return None
    if all(isinstance(block, TextContent) for block in blocks):
        texts = [block.text for block in blocks if isinstance(block, TextContent)]
        return texts[0] if len(texts) == 1 else texts
    return [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in blocks]


def tool_error(answer: CallToolResult) -> str:
    """The message of an answer with ``isError`` set."""
    texts = [block.text for block in answer.content if isinstance(block, TextContent) and block.text.strip()]
    return " ".join(texts) or "the tool reported an error without a message"
