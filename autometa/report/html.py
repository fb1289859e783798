"""Page assembly: escaping, tables, figures and the page around them.

Every user string (study, class, plugin and parameter names, values, failure reasons)
goes through :func:`esc`; only :class:`Markup` built here passes through unescaped. The
page is plain HTML with inline CSS: no script, no external URL, so it opens offline.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence


class Markup(str):
    """HTML built by this package (its user strings already escaped)."""


def esc(value: object) -> Markup:
    """``value`` as text in HTML: ``<``, ``>``, ``&`` and both quotes escaped."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def tag(name: str, content: object = "", **attrs: object) -> Markup:
    """``<name attrs>content</name>``; ``content`` is escaped unless it is Markup.

    Attribute names ending in ``_`` lose it (``class_`` → ``class``).
    """
    shown = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"'
                    for k, v in attrs.items() if v is not None)
    return Markup(f"<{name}{shown}>{esc(content)}</{name}>")


def join(parts: Iterable[object], sep: str = "\n") -> Markup:
    """The parts, each escaped unless Markup, joined by ``sep``."""
    return Markup(sep.join(esc(p) for p in parts))


def note(text: object) -> Markup:
    """A one-line note in place of something not shown (a figure without enough data)."""
    return tag("p", text, class_="note")


def table(header: Sequence[object], rows: Iterable[Sequence[object]], *,
          class_: str | None = None, numeric: Sequence[int] = ()) -> Markup:
    """A table; cells are escaped unless Markup. ``numeric``: right-aligned column indexes."""
    head = join((tag("th", h) for h in header), "")
    body = []
    for row in rows:
        cells = (tag("td", c, class_="num" if i in numeric else None)
                 for i, c in enumerate(row))
        body.append(tag("tr", join(cells, "")))
    return tag("table", Markup(tag("thead", tag("tr", head)) + tag("tbody", join(body))),
               class_=class_)


def key_values(pairs: Iterable[tuple[object, object]]) -> Markup:
    """A two-column table of names and values."""
    rows = [tag("tr", Markup(tag("th", k) + tag("td", v))) for k, v in pairs]
    return tag("table", tag("tbody", join(rows)), class_="kv")


def figure(svg: bytes, alt: str, caption: object = "", notes: Sequence[object] = ()
           ) -> Markup:
    """An SVG embedded as a data URL in ``<img>`` (decoded as an image: no script runs),
    with its caption and short notes under it."""
    data = base64.b64encode(svg).decode("ascii")
    img = Markup(f'<img src="data:image/svg+xml;base64,{data}" alt="{esc(alt)}">')
    cap = tag("figcaption", caption) if caption else Markup("")
    return tag("figure", Markup(img + cap + join((note(n) for n in notes), "")))


def section(title: object, *parts: object, id_: str | None = None, level: int = 2) -> Markup:
    """``<section>`` with a heading and its parts."""
    return tag("section", Markup(tag(f"h{level}", title) + join(parts)), id=id_)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232a;
       margin: 0 auto; max-width: 1200px; padding: 1.5em 2em 4em; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { border-bottom: 2px solid #d8dee4; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.6em; }
.lead { color: #4a5561; margin-top: 0; }
.counts span { display: inline-block; margin-right: .6em; padding: .1em .6em;
               border-radius: 1em; background: #eef1f4; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border-bottom: 1px solid #e3e7eb; padding: .3em .7em; text-align: left;
         vertical-align: top; }
thead th { background: #f4f6f8; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.params { min-width: 10em; overflow-wrap: anywhere; }
td.params span { display: inline-block; margin-right: .8em; }
tr.best td { background: #fff8e1; }
tr.tied td { background: #fffdf3; }
table.kv th { width: 14em; background: none; color: #4a5561; font-weight: 600; }
.badge { display: inline-block; padding: 0 .5em; border-radius: .8em; font-size: 12px;
         white-space: nowrap; background: #e7ecf1; color: #33414f; }
.badge.g1 { background: #ffe08a; color: #4d3800; }
.note { color: #6a737d; font-style: italic; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eef1f4; }
figcaption { color: #4a5561; font-size: 13px; }
pre { background: #f6f8fa; padding: .8em 1em; overflow-x: auto; font-size: 12.5px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr));
        gap: 0 2em; }
nav a { margin-right: 1em; }
footer { margin-top: 3em; color: #6a737d; font-size: 12px; }
"""


def page(title: str, body: Markup, *, footer: object = "") -> str:
    """The whole document: a title, the inline stylesheet and ``body``."""
    foot = tag("footer", footer) if footer else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # No script may run in a report: a policy that forbids any, and any fetch.
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n{foot}\n</body>\n</html>\n"
    )
