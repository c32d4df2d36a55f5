"""Render a report's document, a list of blocks, as Markdown or as self-contained HTML.

A block is a tuple whose first item says its kind: ("h1", text), ("h2", text), ("p", text),
("ul", [items]), ("table", headers, rows), ("img", path relative to the report, caption). The
report decides what to say; this module only decides how it looks.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

Block = tuple


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(f"{block[1]}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]) + "\n")
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*\n")
    return "\n".join(out)


def _md_cell(cell: object) -> str:
    """A Markdown table cell: a pipe escaped, a line break as <br> (a raw newline would end the row)."""
    return str(cell).replace("|", "\\|").replace("\n", "<br>")


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;border:1px solid #eee}figcaption{font-style:italic;color:#555}")


def render_html(blocks: list[Block], directory: Path, title: str) -> str:
    """Self-contained HTML: figures inlined as base64 PNG, no external file or network access."""
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
           "</head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(block[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c)).replace(chr(10), '<br>')}</td>" for c in row) + "</tr>"
                           for row in block[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((directory / block[1]).read_bytes()).decode()
            out.append(f"<figure><img alt='{e(block[2])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{e(block[2])}</figcaption></figure>")
    out.append(f"<p><small>generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))} by peftlab report</small></p>")
    out.append("</body></html>")
    return "\n".join(out)
