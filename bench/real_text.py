"""A corpus of real English prose for the data benchmarks, from Debian packages (no network needed
when they are in /var/cache/apt/archives; otherwise `apt-get download <package>` fetches them):

  dict-gcide       Webster's Revised Unabridged Dictionary (1913) + GCIDE: one document per entry
  fortunes         the fortune cookie files: one document per fortune
  python3.11-doc   the Python documentation, HTML -> text (html.parser): one document per page section
  perl-modules-5.36  the Perl core modules' POD documentation (code blocks left out): one document per =head1 section
  opencv-doc       the OpenCV tutorials (not the API reference), HTML -> text: one document per page section

Each package is unpacked with `dpkg-deb -x` into a scratch directory; the documents are written as
.jsonl ({"text": ...}, one file per source), which every lmforge reader takes with no setting:

    python bench/real_text.py --out /tmp/real-text                  # ~67 MB of text (50 MB once cleaned)
    python bench/data_scale.py --files '/tmp/real-text/*.jsonl'
    python bench/tokenize_vs_run_clm.py --files '/tmp/real-text/*.jsonl'

With --max-mb the output stops once that many MB of text are written (for a quick check).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

ARCHIVES = Path("/var/cache/apt/archives")
PACKAGES = ("dict-gcide", "fortunes", "python3.11-doc", "perl-modules-5.36", "opencv-doc")


def unpack(package: str, scratch: Path) -> Path:
    """The package's files under scratch/<package> (from the apt cache, else `apt-get download`)."""
    debs = sorted(ARCHIVES.glob(f"{package}_*.deb")) or sorted(scratch.glob(f"{package}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", package], cwd=scratch, check=True)
        debs = sorted(scratch.glob(f"{package}_*.deb"))
    target = scratch / package
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], check=True)
    return target


def gcide(root: Path) -> Iterator[str]:
    """One document per dictionary entry: the .dict.dz (dictzip is gzip) is entries separated by blank
    lines; a blank line followed by an indented line continues the entry."""
    (path,) = root.glob("usr/share/dictd/gcide.dict.dz")
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    entry: list[str] = []
    for block in text.split("\n\n"):
        if entry and block and not block[0].isspace():
            yield "\n".join(entry)
            entry = []
        if block.strip():
            entry.append(block.strip("\n"))
    if entry:
        yield "\n".join(entry)


def fortunes(root: Path) -> Iterator[str]:
    """One document per fortune (the files separate them with lines of '%')."""
    for path in sorted(root.glob("usr/share/games/fortunes/*")):
        if path.suffix or path.is_dir() or path.is_symlink():
            continue  # .dat index files, .u8 links
        for fortune in re.split(r"^%$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M):
            if fortune.strip():
                yield fortune.strip("\n")


class _Text(HTMLParser):
    """Text of an HTML page, one block per section (h1-h3 start a new one); code and navigation left out."""

    SKIP = {"script", "style", "pre", "nav"}
    BLOCK = {"p", "li", "dt", "dd", "div", "br", "tr", "h4", "h5", "h6"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skip += 1
        elif tag in ("h1", "h2", "h3"):
            self.sections.append([])
        elif tag in self.BLOCK:
            self.sections[-1].append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skip:
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.sections[-1].append(data)


def _python_doc_sections(html: str) -> Iterator[str]:
    # Sphinx pages: the content is in <div class="body" role="main">; the rest is navigation.
    start = html.find('role="main"')
    end = html.find('class="sphinxsidebar"', start)
    body = html[start:end] if start >= 0 and end > start else html
    parser = _Text()
    parser.feed(body)
    for section in parser.sections:
        lines = [" ".join(line.split()) for line in "".join(section).splitlines()]
        text = "\n".join(line for line in lines if line)
        if len(text.split()) >= 20:
            yield text


def python_doc(root: Path) -> Iterator[str]:
    for path in sorted(root.glob("usr/share/doc/python3*/html/**/*.html")):
        if path.is_symlink() or "_static" in path.parts or "genindex" in path.name:
            continue
        yield from _python_doc_sections(path.read_text(encoding="utf-8", errors="replace"))


# POD formatting codes with their text kept: B<bold>, C<code>, I<italic>, F<file>, S<...>, L<name|link> (the name).
_POD_CODE = re.compile(r"[BCIFSLXZE]<+\s*([^<>]*?)\s*>+")


def _pod_text(paragraph: str) -> str:
    for _ in range(3):  # nested codes, inside out
        paragraph = _POD_CODE.sub(lambda m: m.group(1).split("|")[0], paragraph)
    return paragraph


def perl_pod(root: Path) -> Iterator[str]:
    """One document per =head1 section of each module's POD: headings and prose paragraphs, without
    the verbatim (indented) code paragraphs."""
    for path in sorted(root.glob("usr/share/perl/*/**/*")):
        if path.suffix not in (".pod", ".pm") or path.is_symlink():
            continue
        section: list[str] = []
        in_pod = False
        for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            command = paragraph.split(None, 1)[0] if paragraph.strip() else ""
            if command == "=cut":
                in_pod = False
                continue
            if command.startswith("="):
                in_pod = True
                if command == "=head1" and section:
                    yield "\n".join(section)
                    section = []
                if command in ("=head1", "=head2", "=head3", "=head4", "=item"):
                    section.append(_pod_text(paragraph.split(None, 1)[1].strip()) if " " in paragraph.strip() else "")
                continue
            if in_pod and paragraph.strip() and not paragraph[:1].isspace():
                section.append(_pod_text(" ".join(paragraph.split())))
        if section:
            yield "\n".join(section)


def opencv_tutorials(root: Path) -> Iterator[str]:
    for path in sorted(root.glob("usr/share/doc/opencv-doc/**/tutorial_*.html")):
        if not path.is_symlink():
            yield from _python_doc_sections(path.read_text(encoding="utf-8", errors="replace"))


EXTRACT = {"dict-gcide": gcide, "fortunes": fortunes, "python3.11-doc": python_doc, "perl-modules-5.36": perl_pod,
           "opencv-doc": opencv_tutorials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the .jsonl files")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), choices=PACKAGES)
    parser.add_argument("--max-mb", type=float, help="stop after this many MB of text")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    with tempfile.TemporaryDirectory(prefix="real-text-") as tmp:
        for package in args.packages:
            root = unpack(package, Path(tmp))
            documents = size = 0
            with (args.out / f"{package}.jsonl").open("w", encoding="utf-8") as handle:
                for text in EXTRACT[package](root):
                    # A document never holds a blank line, so the text is also usable as "\n\n"-separated .txt.
                    text = re.sub(r"\n\s*\n", "\n", text).strip()
                    if not text:
                        continue
                    handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    documents += 1
                    size += len(text.encode("utf-8"))
                    if args.max_mb and total + size >= args.max_mb * 1e6:
                        break
            total += size
            print(f"{package}: {documents:,} documents, {size / 1e6:.1f} MB -> {args.out / (package + '.jsonl')}",
                  flush=True)
            if args.max_mb and total >= args.max_mb * 1e6:
                break
    print(f"total: {total / 1e6:.1f} MB of text in {len(glob.glob(str(args.out / '*.jsonl')))} files", flush=True)
    if not args.max_mb and total < 50e6:
        print("warning: under 50 MB; the benchmarks' targets ask for at least 50 MB", file=sys.stderr)


if __name__ == "__main__":
    main()
