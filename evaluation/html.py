"""One page per output folder (index.html): the results table, the plots and the videos, so a user shares one
folder and a colleague opens it in a browser. Plain HTML, no script, no network: files are linked by name."""

from __future__ import annotations

import html

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#eee}img{max-width:100%}"
         ".videos{display:flex;flex-wrap:wrap;gap:16px}.videos figure{margin:0}video{width:480px}")


def markdown_to_html(text: str) -> str:
    """The Markdown our reports write (headings, pipe tables, paragraphs, **bold**, `code`) as HTML."""
    out, table, paragraph = [], [], []

    def inline(s: str) -> str:
        s = html.escape(s)
        for mark, tag in (("**", "b"), ("`", "code")):
            parts = s.split(mark)
            s = "".join(p if k % 2 == 0 else f"<{tag}>{p}</{tag}>" for k, p in enumerate(parts))
        return s

    def flush() -> None:
        if paragraph:
            out.append(f"<p>{inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            if paragraph:
                flush()
            table.append(line)
        elif line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif not line.strip():
            flush()
        else:
            if table:
                flush()
            paragraph.append(line.strip())
    flush()
    return "\n".join(out)


def page(title: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")


def image(name: str, alt: str) -> str:
    return f"<p><img src='{html.escape(name)}' alt='{html.escape(alt)}'></p>"


def videos(items: list[tuple[str, str]]) -> str:
    """Videos side by side, each with its caption: (file name, caption)."""
    figures = "".join(f"<figure><video src='{html.escape(name)}' autoplay loop muted playsinline controls></video>"
                      f"<figcaption>{html.escape(text)}</figcaption></figure>" for name, text in items)
    return f"<div class='videos'>{figures}</div>"


def evaluation_page(markdown: str) -> str:
    """``wm eval``'s page: its results (``results.md``) and plot (``results.png``)."""
    return page("evaluation results", [markdown_to_html(markdown), image("results.png", "success per method")])


def demo_page(title: str, markdown: str, films: list[tuple[str, str]]) -> str:
    """``wm demo``'s page: what was filmed, the videos playing side by side, the summary sheet."""
    return page(title, [markdown_to_html(markdown), videos(films),
                        image("summary.png", "first, last and goal frame of every episode")])
