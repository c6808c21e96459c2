"""The Go-template subset renderer: what Go's text/template gives for the constructs the Modelfiles use."""
from __future__ import annotations

import pytest

from loraflow import LoraflowError
from loraflow.export import render

MESSAGES = {"Messages": [{"Role": "user", "Content": "Hi"}, {"Role": "assistant", "Content": "Hello"}],
            "System": "Be brief.", "Eos": "</s>"}


def test_fields_ranges_and_the_top_value():
    template = "{{ range .Messages }}[{{ .Role }}:{{ .Content }}{{ $.Eos }}]{{ end }}"
    assert render(template, MESSAGES) == "[user:Hi</s>][assistant:Hello</s>]"


def test_trim_markers_remove_all_white_space_on_their_side():
    assert render("a  \n {{- .System }} \n b", MESSAGES) == "aBe brief. \n b"
    assert render("a {{ .System -}} \n\n b", MESSAGES) == "a Be brief.b"
    assert render("{{- range .Messages }}\n  {{ .Role }}\n{{- end }}", MESSAGES) == "\n  user\n  assistant"


def test_conditions_and_else():
    template = '{{ range .Messages }}{{ if eq .Role "user" }}U{{ else }}A{{ end }}{{ end }}{{ if .Missing }}x{{ end }}'
    assert render(template, MESSAGES) == "UA"
    assert render("{{ if .System }}S: {{ .System }}{{ end }}", MESSAGES) == "S: Be brief."


@pytest.mark.parametrize("template", ["{{ range .Messages }}x", "{{ end }}", "{{ template \"x\" }}",
                                      "{{ if and .A .B }}x{{ end }}"])
def test_what_is_outside_the_subset_is_an_error(template):
    with pytest.raises(LoraflowError, match="template"):
        render(template, MESSAGES)
