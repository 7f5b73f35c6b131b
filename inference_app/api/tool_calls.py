"""Tool calls for a model with no tool-call format of its own (Phi-3 has none): the tools are described in the
system message, the reply is constrained to {"name": ..., "arguments": {...}} (inference_app.api.structured_outputs),
and such a reply comes back in OpenAI's shape, a tool call with an id and its arguments as JSON text. Earlier calls
and their results in the conversation are rendered into the prompt as text the model can read.
"""

from __future__ import annotations

import json
import uuid

from inference_app.api.protocol import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall
from inference_app.service import Message

TOOLS_INSTRUCTION = (
    "You can call these tools (the JSON schema of each one's arguments is given):\n{tools}\n"
    'To call one, reply with only a JSON object: {{"name": <the tool\'s name>, "arguments": <its arguments>}}.'
)


def prompt_messages(request: ChatCompletionRequest) -> list[Message]:
    """The {"role", "content"} messages ModelService templates: the tools described in the system message (unless
    tool_choice is "none"), an assistant's tool calls as the JSON it would have written, a tool's result as a user
    message naming the call."""
    names = {call.id: call.function.name for message in request.messages for call in message.tool_calls or []}
    messages = [_prompt_message(message, names) for message in request.messages]
    if request.calls_tools:
        tools = "\n".join(_compact_json(tool.function.model_dump(exclude_none=True)) for tool in request.tools or [])
        instruction = TOOLS_INSTRUCTION.format(tools=tools)
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{instruction}"}
        else:
            messages.insert(0, {"role": "system", "content": instruction})
    return messages


def _prompt_message(message: ChatMessage, tool_names: dict[str, str]) -> Message:
    if message.role == "tool":
        name = tool_names.get(message.tool_call_id or "", "a tool")
        return {"role": "user", "content": f"Result of {name} (call {message.tool_call_id}): {message.content}"}
    texts = [message.content] if message.content else []
    texts += [_call_text(call) for call in message.tool_calls or []]
    return {"role": "system" if message.role == "developer" else message.role, "content": "\n".join(texts)}


def _compact_json(value: object) -> str:
    """JSON without optional spaces: tools cost prompt tokens in every request."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _call_text(call: ToolCall) -> str:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:  # shown as the text it was
        arguments = call.function.arguments
    return json.dumps({"name": call.function.name, "arguments": arguments})


def parse_tool_call(request: ChatCompletionRequest, text: str) -> ToolCall | None:
    """The reply as a tool call when it is one (a complete call object); None for a text reply, or a call the token
    budget cut short (returned as the text it is, with finish_reason "length")."""
    if not request.calls_tools or not text.startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return None
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False)),
    )
