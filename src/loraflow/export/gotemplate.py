"""A small renderer for the subset of Go's text/template that the Modelfile templates use, to check them here
(Ollama itself cannot be installed).

    render('{{- range .Messages }}<|im_start|>{{ .Role }}\\n{{ .Content }}<|im_end|>\\n{{ end }}', {"Messages": [...]})

Supported: text; `{{ .Field }}` (of the current value, or `$.Field` of the top); `{{ range .List }}...{{ end }}`;
`{{ if .Field }}`, `{{ if eq .Field "text" }}`, `{{ else }}`, `{{ end }}`; the trim markers `{{-` and `-}}`, which
remove all white space before or after the action, as in Go. Anything else is a LoraflowError.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from loraflow import LoraflowError

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)


@dataclass
class Node:
    kind: str  # text, value, range, if
    argument: str = ""
    body: list = field(default_factory=list)
    otherwise: list = field(default_factory=list)


def lex(template: str) -> list[tuple[str, str]]:
    """[('text', ...), ('action', ...)] with the trim markers applied to the neighbouring text."""
    pieces, position = [], 0
    for match in ACTION.finditer(template):
        text = template[position:match.start()]
        if match.group(1):
            text = text.rstrip()
        pieces.append(["text", text])
        pieces.append(["action", match.group(2).strip(), bool(match.group(3))])
        position = match.end()
    pieces.append(["text", template[position:]])
    for index, piece in enumerate(pieces):  # `-}}` trims the text that follows
        if piece[0] == "action" and piece[2]:
            pieces[index + 1][1] = pieces[index + 1][1].lstrip()
    return [(piece[0], piece[1]) for piece in pieces if piece[0] == "action" or piece[1]]


def parse(pieces: list, position: int = 0, closers: tuple = ()) -> tuple[list, int, str]:
    """Nodes up to one of `closers` ('end', 'else'): (nodes, position after the closer, the closer)."""
    nodes = []
    while position < len(pieces):
        kind, content = pieces[position]
        position += 1
        if kind == "text":
            nodes.append(Node("text", content))
            continue
        word = content.split(" ", 1)[0]
        if word in ("end", "else"):
            if word not in closers:
                raise LoraflowError(f"template: unexpected {{{{ {content} }}}}")
            return nodes, position, word
        if word in ("range", "if"):
            node = Node(word, content[len(word):].strip())
            node.body, position, closer = parse(pieces, position, ("end", "else") if word == "if" else ("end",))
            if closer == "else":
                node.otherwise, position, _ = parse(pieces, position, ("end",))
            nodes.append(node)
        elif content.startswith((".", "$.")):
            nodes.append(Node("value", content))
        else:
            raise LoraflowError(f"template: {{{{ {content} }}}} is outside the supported subset")
    if closers:
        raise LoraflowError("template: a {{ range }} or {{ if }} has no {{ end }}")
    return nodes, position, ""


def lookup(reference: str, current, top):
    """`.Field` of the current value, `$.Field` of the top, `.` the current value itself."""
    value, path = (top, reference[2:]) if reference.startswith("$.") else (current, reference[1:])
    for name in filter(None, path.split(".")):
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


def condition(argument: str, current, top) -> bool:
    words = re.findall(r'"[^"]*"|\S+', argument)
    if words[0] == "eq" and len(words) == 3:
        left, right = (w[1:-1] if w.startswith('"') else lookup(w, current, top) for w in words[1:])
        return left == right
    if len(words) == 1:
        return bool(lookup(words[0], current, top))
    raise LoraflowError(f"template: the condition {argument!r} is outside the supported subset")


def evaluate(nodes: list, current, top) -> str:
    out = []
    for node in nodes:
        if node.kind == "text":
            out.append(node.argument)
        elif node.kind == "value":
            value = lookup(node.argument, current, top)
            out.append("" if value is None else str(value))
        elif node.kind == "range":
            out.extend(evaluate(node.body, item, top) for item in lookup(node.argument, current, top) or [])
        else:
            out.append(evaluate(node.body if condition(node.argument, current, top) else node.otherwise, current, top))
    return "".join(out)


def render(template: str, values: dict) -> str:
    """The text Go's text/template makes of `template` with `values` (within the subset above)."""
    nodes, _, _ = parse(lex(template))
    return evaluate(nodes, values, values)
