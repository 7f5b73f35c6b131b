"""Structured outputs: what a request's response_format or tools allow the reply to be, as an llguidance grammar the
engine enforces token by token (inference_app.engine.grammar).

A schema is checked here, before any generation: a feature llguidance cannot enforce (e.g. "not", "uniqueItems",
look-around in a pattern, an unknown "format") is a 400 naming it, never a reply that ignores it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llguidance import LLMatcher

from inference_app.api.errors import ApiError
from inference_app.api.protocol import ChatCompletionRequest, NamedToolChoice, Tool

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # only in the type stub

# Compact JSON (no optional whitespace): the reply ends at the closing bracket instead of wandering into spaces and
# newlines a small or fine-tuned model may favour, and it costs fewer tokens.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def reply_grammar(request: ChatCompletionRequest) -> str | None:
    """The grammar the reply must follow; None: free text."""
    if request.calls_tools:
        return _tool_call_grammar(request)
    reply_format = request.response_format
    if reply_format is None or reply_format.type == "text":
        return None
    if reply_format.json_schema is None:  # json_object: any JSON object
        return json_schema_grammar({"type": "object"}, "response_format")
    return json_schema_grammar(reply_format.json_schema.json_schema, "response_format.json_schema.schema")


def json_schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The grammar of JSON text that matches `schema`; an ApiError (400, naming `param` and the feature) when the
    schema cannot be enforced."""
    grammar = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    return _checked(grammar, param)


def tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """A call of one of `tools`: {"name": ..., "arguments": {...}} with the arguments its function's schema allows."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": tool.function.parameters or {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _tool_call_grammar(request: ChatCompletionRequest) -> str:
    """tool_choice "required": a call of any tool; a named function: a call of that one; "auto" (or none given):
    either a call or text, which then may not start with "{" (so the reply's first character tells which)."""
    tools = request.tools or []
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        tools = [tool for tool in tools if tool.function.name == choice.function.name]
    schema = tool_call_schema(tools)
    if choice == "required" or isinstance(choice, NamedToolChoice):
        return json_schema_grammar(schema, "tools")
    _checked(LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS), "tools")  # names a bad schema
    call = json.dumps({**schema, "x-guidance": JSON_OPTIONS})
    return LLMatcher.grammar_from_lark(f"start: TEXT | call\ncall: %json {call}\nTEXT: /[^{{](.|\\n)*/\n")


def _checked(grammar: str, param: str) -> str:
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ApiError(
            400,
            f"the JSON schema in '{param}' uses what this server cannot enforce: {messages[0]}",
            param=param,
            code="unsupported_schema",
        )
    return grammar
