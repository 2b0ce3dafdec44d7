"""The documentation pages cannot drift from the code.

* Every ```python block of docs/api.md and docs/mathematics.md runs, in order,
  in one namespace per page (a block may use what an earlier block of the same
  page defined), with JAX on the CPU (the default device inside the test only;
  the rest of the session keeps its own).
* No page under docs/ refers to material outside the repository.
* Every relative Markdown link in docs/*.md points to a file (or folder) that
  exists inside the repository, and an anchor into a Markdown page to one of
  its headings.
"""

import contextlib
import pathlib
import re
import textwrap

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
EXECUTED_PAGES = ("api.md", "mathematics.md")

# A fenced block: an opening fence of three or more backticks with an info
# string, the body, and a closing fence of the same backticks.
_FENCE = re.compile(r"^(?P<fence>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$",
                    re.M | re.S)
# [text](target) and ![alt](target), target up to the first space or ")".
_LINK = re.compile(r"!?\[[^\]]*\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, mailto:, ...


def python_blocks(page: pathlib.Path) -> list[tuple[int, str]]:
  """(first line number, source) of each ```python block of `page`, in order."""
  text = page.read_text(encoding="utf-8")
  blocks = []
  for match in _FENCE.finditer(text):
    if match.group("info").strip().split(" ")[0].lower() == "python":
      line = text.count("\n", 0, match.start("body")) + 1
      blocks.append((line, textwrap.dedent(match.group("body"))))
  return blocks


def markdown_without_code(text: str) -> str:
  """`text` with its fenced blocks and inline code spans blanked out."""
  text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
  return re.sub(r"`[^`\n]*`", "", text)


def on_cpu():
  """A context in which JAX computes on the CPU (the host always has one)."""
  try:
    return jax.default_device(jax.devices("cpu")[0])
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU: use what there is.
    return contextlib.nullcontext()


def doc_pages() -> list[pathlib.Path]:
  return sorted(DOCS.glob("*.md"))


def anchors(page: pathlib.Path) -> set[str]:
  """GitHub-style anchors of the headings of `page` (lower case, punctuation
  dropped, spaces to hyphens)."""
  slugs = set()
  for line in markdown_without_code(page.read_text(encoding="utf-8")).splitlines():
    heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if heading:
      slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
      slugs.add(slug.replace(" ", "-"))
  return slugs


@pytest.mark.parametrize("name", EXECUTED_PAGES)
def test_python_blocks_run(name):
  page = DOCS / name
  assert page.is_file(), f"{page} is missing"
  blocks = python_blocks(page)
  assert blocks, f"{name} has no ```python blocks"
  namespace = {"__name__": f"docs_{page.stem}"}
  with on_cpu():
    for line, source in blocks:
      code = compile(source, f"{page}:{line}", "exec")
      try:
        exec(code, namespace)  # pylint: disable=exec-used
      except Exception as e:  # pylint: disable=broad-except
        raise AssertionError(
            f"the ```python block at {name}:{line} failed: "
            f"{type(e).__name__}: {e}") from e


def test_no_reference_outside_the_repository():
  offenders = []
  for path in sorted(p for p in DOCS.rglob("*") if p.is_file()):
    text = path.read_text(encoding="utf-8", errors="replace")
    for needle in ("../shared", "DESIGN.md", "/work/shared"):
      if needle in text:
        offenders.append(f"{path.relative_to(REPO)} mentions {needle!r}")
  assert not offenders, "\n".join(offenders)


def test_relative_links_point_to_existing_files():
  broken = []
  for page in doc_pages():
    for match in _LINK.finditer(markdown_without_code(page.read_text(encoding="utf-8"))):
      target = match.group("target").strip("<>")
      if _EXTERNAL.match(target):
        continue
      path, _, anchor = target.partition("#")
      resolved = (page.parent / path).resolve() if path else page
      if not resolved.exists():
        broken.append(f"{page.name}: {target} (no such file)")
      elif REPO not in (resolved, *resolved.parents):
        broken.append(f"{page.name}: {target} (outside the repository)")
      elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        broken.append(f"{page.name}: {target} (no such heading)")
  assert not broken, "\n".join(broken)


def test_the_pages_exist_and_the_index_links_them():
  for name in ("README.md", *EXECUTED_PAGES):
    assert (DOCS / name).is_file(), f"docs/{name} is missing"
  index = (DOCS / "README.md").read_text(encoding="utf-8")
  for name in EXECUTED_PAGES:
    assert f"({name}" in index, f"docs/README.md does not link {name}"
