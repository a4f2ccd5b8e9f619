"""A small document model rendered both as Markdown and as self-contained HTML.

Reports are built once as a list of blocks, so ``report.md`` and ``report.html`` cannot
disagree; images are referenced by file in Markdown and embedded as base64 in HTML.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Code:
    text: str


Block = Heading | Paragraph | Table | Image | Code


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def to_markdown(self, relative_to: Path) -> str:
        """Render as Markdown; image paths are written relative to ``relative_to``."""
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            if isinstance(block, Heading):
                out += [f"{'#' * block.level} {block.text}", ""]
            elif isinstance(block, Paragraph):
                out += [block.text, ""]
            elif isinstance(block, Table):
                if block.caption:
                    out += [f"*{block.caption}*", ""]
                out.append("| " + " | ".join(block.header) + " |")
                out.append("|" + "|".join(" --- " for _ in block.header) + "|")
                out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in block.rows]
                out.append("")
            elif isinstance(block, Image):
                out += [f"![{block.caption}]({_relative(block.path, relative_to)})", ""]
            elif isinstance(block, Code):
                out += ["```", block.text.rstrip(), "```", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        """Render as one self-contained HTML page with images embedded."""
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
            "th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}"
            "figcaption{color:#555;font-size:90%}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for block in self.blocks:
            if isinstance(block, Heading):
                parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
            elif isinstance(block, Paragraph):
                parts.append(f"<p>{html.escape(block.text)}</p>")
            elif isinstance(block, Table):
                rows = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows
                )
                header = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
                caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
                parts.append(f"<table>{caption}<tr>{header}</tr>{rows}</table>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                parts.append(
                    f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(block.caption)}'>"
                    f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
                )
            elif isinstance(block, Code):
                parts.append(f"<pre>{html.escape(block.text)}</pre>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)
