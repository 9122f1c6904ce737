"""Parse a JATS article (PMC ``.nxml``, or PMC's OAI-PMH XML) into metadata, figures and inline mentions.

What counts as a figure: every ``<fig>`` anywhere in the article (``<body>``, ``<floats-group>``,
``<back>``), each ``<graphic>`` of it one image. A ``<fig-group>`` contributes its shared caption to the
sub-figures inside it. Captions (``<title>`` + ``<p>``) are flattened to plain text: inline markup
(``<italic>``, ``<sub>``, ``<xref>``…) keeps its text, block elements are separated by a space, runs of
whitespace collapse. Panels are found from bold single-letter markers (Springer/Nature style
``<bold>a</bold>``) or from textual markers ``(A)``, ``(B)``… that run in sequence.

Inline mentions are the body sentences that cite a figure with ``<xref ref-type="fig" rid="…">``;
ranges written as two xrefs joined by a dash ("Figs. 2–4") cite every figure in between, and an
``rid`` may list several ids.

Namespaced JATS (OAI-PMH) and plain ``.nxml`` are read the same way: namespaces are stripped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lxml import etree

XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
BLOCK_TAGS = {"p", "title", "label", "list-item", "def", "term", "disp-quote", "caption", "sec", "table-wrap",
              "disp-formula", "list", "attrib"}
SKIP_IN_TEXT = {"fig", "table-wrap", "disp-formula-group", "supplementary-material", "object-id"}
DASHES = "\u2013\u2014\u2012-"
PANEL_SENTINEL = "\u241e"  # marks a bold panel letter inside flattened caption text

# Abbreviations after which a period does not end a sentence in biomedical prose.
_ABBREVIATIONS = ("Fig", "Figs", "Tab", "Eq", "Eqs", "Ref", "Refs", "al", "vs", "e.g", "i.e", "approx", "No",
                  "Nos", "ca", "cf", "Dr", "Suppl", "Supp", "Ext", "St", "sp", "spp")
_SENTENCE_END = re.compile(r"(?<=[.!?])" + "".join(rf"(?<!\b{re.escape(a)}\.)" for a in _ABBREVIATIONS)
                           + r"\s+(?=[A-Z(\[])")


class JatsError(ValueError):
    """An article that cannot be parsed; the message names the file."""


@dataclass
class Panel:
    label: str
    text: str


@dataclass
class Figure:
    figure_id: str
    label: str
    caption: str                    # the full caption (group caption + own caption for sub-figures)
    graphics: list[str]             # xlink:href values, usually without file extension
    own_caption: str | None = None  # a fig-group member's own caption
    group_id: str | None = None
    panels: list[Panel] = field(default_factory=list)

    @property
    def is_compound(self) -> bool:
        return bool(self.panels) or self.group_id is not None


@dataclass
class Article:
    pmcid: str | None
    pmid: str | None
    journal: str | None
    year: int | None
    license: str | None
    license_url: str | None
    title: str | None
    figures: list[Figure]
    mentions: dict[str, list[str]]  # figure id → sentences citing it
    doi: str | None = None


def parse_article(data: bytes, source: str = "<bytes>") -> Article:
    """Parse JATS bytes; raises ``JatsError`` naming ``source`` when the XML is malformed."""
    parser = etree.XMLParser(recover=False, resolve_entities=False, no_network=True, huge_tree=True,
                             remove_comments=True, remove_pis=True)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise JatsError(f"{source}: malformed XML ({exc})") from exc
    _strip_namespaces(root)
    article = root if root.tag == "article" else root.find(".//article")
    if article is None:
        raise JatsError(f"{source}: no <article> element (not a JATS file)")
    figures = _figures(article)
    return Article(
        pmcid=_pmcid(article), pmid=_first_text(article, "front/article-meta/article-id[@pub-id-type='pmid']"),
        journal=_first_text(article, "front/journal-meta//journal-title"),
        year=_year(article), license=_license_text(article), license_url=_license_url(article),
        title=_flatten(article.find("front/article-meta/title-group/article-title")) or None,
        figures=figures, mentions=_mentions(article, figures),
        doi=_first_text(article, "front/article-meta/article-id[@pub-id-type='doi']"),
    )


def _strip_namespaces(root) -> None:
    for element in root.iter():
        if not isinstance(element.tag, str):
            continue
        if "}" in element.tag:
            element.tag = element.tag.split("}", 1)[1]
        for key in list(element.attrib):
            if key.startswith("{") and key != XLINK_HREF:
                local = key.split("}", 1)[1]
                if local not in element.attrib:
                    element.attrib[local] = element.attrib.pop(key)
    etree.cleanup_namespaces(root)


def _first_text(node, path: str) -> str | None:
    found = node.find(path)
    if found is None:
        return None
    text = _flatten(found)
    return text or None


def _pmcid(article) -> str | None:
    for kind in ("pmcid", "pmc", "accession", "pmc-uid"):
        value = _first_text(article, f"front/article-meta/article-id[@pub-id-type='{kind}']")
        if value:
            return value if value.upper().startswith("PMC") else f"PMC{value}"
    return None


def _year(article) -> int | None:
    dates = article.findall("front/article-meta/pub-date")
    preferred = sorted(dates, key=lambda d: 0 if (d.get("pub-type") or d.get("date-type")) in ("epub", "pub") else 1)
    for date in preferred:
        year = date.findtext("year")
        if year and year.strip().isdigit():
            return int(year.strip())
    return None


def _license_url(article) -> str | None:
    permissions = article.find("front/article-meta/permissions")
    if permissions is None:
        return None
    ref = permissions.find(".//license_ref")
    if ref is not None and (ref.text or "").strip():
        return ref.text.strip()
    lic = permissions.find(".//license")
    if lic is not None and lic.get(XLINK_HREF):
        return lic.get(XLINK_HREF)
    ext = permissions.find(".//ext-link")
    return ext.get(XLINK_HREF) if ext is not None else None


def _license_text(article) -> str | None:
    permissions = article.find("front/article-meta/permissions")
    if permissions is None:
        return None
    return normalise_license(_license_url(article), _flatten(permissions.find(".//license")))


_CC_URL = re.compile(r"creativecommons\.org/(licenses|publicdomain)/([a-z\-]+)", re.I)


def normalise_license(url: str | None, text: str | None = None) -> str | None:
    """``https://creativecommons.org/licenses/by-nc/4.0/`` → ``CC BY-NC``; CC0 / public-domain marks too."""
    for candidate in (url or "", text or ""):
        match = _CC_URL.search(candidate)
        if match:
            kind, code = match.group(1).lower(), match.group(2).lower()
            if kind == "publicdomain":
                return "CC0" if code == "zero" else "PDM"
            return "CC " + code.upper()
    if text:
        match = re.search(r"\bCC[ -]?(BY(?:[ -](?:NC|SA|ND))*|0)\b", text, re.I)
        if match:
            return "CC " + match.group(1).upper().replace(" ", "-") if match.group(1) != "0" else "CC0"
        return "other"
    return None


# ------------------------------------------------------------------------------------ text flattening
def _flatten(node, panels: bool = False) -> str:
    """Plain text of ``node``: inline markup kept as text, blocks separated, whitespace collapsed."""
    if node is None:
        return ""
    parts: list[str] = []
    _collect(node, parts, panels, top=True)
    return re.sub(r"\s+", " ", "".join(parts)).strip()


def _collect(node, parts: list[str], panels: bool, top: bool = False) -> None:
    tag = node.tag if isinstance(node.tag, str) else ""
    if not top and tag in SKIP_IN_TEXT:
        parts.append(node.tail or "")
        return
    block = tag in BLOCK_TAGS
    if block:
        parts.append(" ")
    text = node.text or ""
    if panels and tag == "bold" and len(node) == 0 and _PANEL_BOLD.fullmatch(text.strip()):
        parts.append(f"{PANEL_SENTINEL}{text}{PANEL_SENTINEL}")  # the bold text as written, marked
    else:
        parts.append(text)
        for child in node:
            if isinstance(child.tag, str):
                _collect(child, parts, panels)
            else:
                parts.append(child.tail or "")
    if block:
        parts.append(" ")
    if not top:
        parts.append(node.tail or "")


_PANEL_BOLD = re.compile(r"\(?[A-Za-z]\)?\.?")


# ------------------------------------------------------------------------------------ figures
def _figures(article) -> list[Figure]:
    figures: list[Figure] = []
    for fig in article.iter("fig"):
        group = fig.getparent() if fig.getparent() is not None and fig.getparent().tag == "fig-group" else None
        figure_id = fig.get("id") or f"fig{len(figures) + 1}"
        own_text, own_panels = _caption(fig)
        graphics = [g.get(XLINK_HREF) for g in fig.iter("graphic") if g.get(XLINK_HREF)]
        label = _flatten(fig.find("label"))
        if group is not None:
            group_text, group_panels = _caption(group)
            caption = " ".join(t for t in (group_text, own_text) if t)
            figures.append(Figure(figure_id, label or _flatten(group.find("label")), caption, graphics,
                                  own_caption=own_text or None, group_id=group.get("id") or "group",
                                  panels=own_panels or group_panels))
        else:
            figures.append(Figure(figure_id, label, own_text, graphics, panels=own_panels))
    return figures


def _caption(node) -> tuple[str, list[Panel]]:
    caption = node.find("caption")
    if caption is None:
        return "", []
    marked = _flatten(caption, panels=True)
    text = re.sub(r"\s+", " ", marked.replace(PANEL_SENTINEL, "")).strip()
    panels = _panels_from_bold(marked) or split_panels(text)
    return text, panels


def _panels_from_bold(marked: str) -> list[Panel]:
    pieces = re.split(rf"{PANEL_SENTINEL}([^{PANEL_SENTINEL}]*){PANEL_SENTINEL}", marked)
    if len(pieces) < 5:  # at least two markers
        return []
    labels = [marker.strip().strip("().") for marker in pieces[1::2]]
    if not _consecutive(labels):
        return []
    return [Panel(label, re.sub(r"\s+", " ", pieces[2 * i + 2]).strip(" ;,")) for i, label in enumerate(labels)]


_PAREN_MARKER = re.compile(r"\(([A-Za-z])\)")


def split_panels(caption: str) -> list[Panel]:
    """Split ``"(A) CT shows… (B) MRI shows…"`` into panels; markers must run A, B, C… (or a, b, c…)."""
    matches = list(_PAREN_MARKER.finditer(caption))
    chosen = []
    expected = None
    for match in matches:
        letter = match.group(1)
        if expected is None:
            if letter in "Aa":
                chosen, expected = [match], chr(ord(letter) + 1)
        elif letter == expected:
            chosen.append(match)
            expected = chr(ord(letter) + 1)
    if len(chosen) < 2:
        return []
    panels = []
    for i, match in enumerate(chosen):
        end = chosen[i + 1].start() if i + 1 < len(chosen) else len(caption)
        panels.append(Panel(match.group(1), caption[match.end():end].strip(" ;,")))
    return panels


def _consecutive(labels: list[str]) -> bool:
    return bool(labels) and labels[0] in "Aa" and all(
        ord(b) == ord(a) + 1 for a, b in zip(labels, labels[1:]))


# ------------------------------------------------------------------------------------ inline mentions
def _mentions(article, figures: list[Figure]) -> dict[str, list[str]]:
    figure_ids = [f.figure_id for f in figures]
    numbers = {f.figure_id: _label_number(f.label) for f in figures}
    mentions: dict[str, list[str]] = {fid: [] for fid in figure_ids}
    body = article.find("body")
    if body is None:
        return mentions
    for paragraph in body.iter("p"):
        if _inside(paragraph, ("fig", "table-wrap", "caption")):
            continue
        xrefs = [x for x in paragraph.iter("xref") if x.get("ref-type") == "fig"]
        if not xrefs:
            continue
        text, offsets = _text_with_offsets(paragraph, xrefs)
        spans = _sentence_spans(text)
        for xref, (start, ids) in zip(xrefs, offsets):
            cited = _expand_range(xref, ids, xrefs, numbers)
            span = next(((a, b) for a, b in spans if a <= start < b), None)
            if span is None:
                continue
            sentence = " ".join(text[span[0]:span[1]].split())
            for fid in cited:
                if fid in mentions and sentence not in mentions[fid]:
                    mentions[fid].append(sentence)
    return mentions


def _inside(node, tags: tuple[str, ...]) -> bool:
    parent = node.getparent()
    while parent is not None:
        if parent.tag in tags:
            return True
        parent = parent.getparent()
    return False


def _text_with_offsets(paragraph, xrefs) -> tuple[str, list[tuple[int, list[str]]]]:
    """The paragraph's text (nested figures left out) and where each fig xref starts in it."""
    targets = {id(x) for x in xrefs}
    parts: list[str] = []
    offsets: list[tuple[int, list[str]]] = []
    length = 0

    def walk(node, top=False):
        nonlocal length
        if not top and node.tag in SKIP_IN_TEXT:
            add(node.tail)
            return
        if id(node) in targets:
            offsets.append((length, (node.get("rid") or "").split()))
        add(node.text)
        for child in node:
            if isinstance(child.tag, str):
                walk(child)
            else:
                add(child.tail)
        if not top:
            add(node.tail)

    def add(value):
        nonlocal length
        if value:
            value = value.replace("\n", " ")
            parts.append(value)
            length += len(value)

    walk(paragraph, top=True)
    return "".join(parts), offsets


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return spans


def _label_number(label: str) -> int | None:
    match = re.search(r"\d+", label or "")
    return int(match.group(0)) if match else None


def _expand_range(xref, ids: list[str], xrefs: list, numbers: dict[str, int | None]) -> list[str]:
    """``<xref rid=F2/>–<xref rid=F4/>`` → F2, F3, F4: every figure whose label number lies in between
    (figures in ``<floats-group>`` are out of document order, so label numbers decide)."""
    cited = list(ids)
    index = xrefs.index(xref)
    if index + 1 < len(xrefs) and ids:
        between = (xref.tail or "").strip()
        nxt = xrefs[index + 1]
        last_ids = (nxt.get("rid") or "").split()
        if between and all(ch in DASHES for ch in between) and xref.getnext() is nxt and last_ids:
            low, high = numbers.get(ids[-1]), numbers.get(last_ids[0])
            if low is not None and high is not None and high > low:
                cited.extend(fid for fid, n in numbers.items() if n is not None and low < n < high)
    return cited
