"""Regenerate the shipped calibration set, ``mergekit_symalign/data/calibration.jsonl``.

Run from a checkout with CPython 3.11 (the docstrings below are read from its standard
library)::

    python scripts/make_calibration.py

Two permissively licensed sources, shuffled together with a fixed seed (so that any prefix of
the file, which is what a small model's token budget reads, mixes both):

* the hand-written prompts of ``scripts/calibration_prompts.txt`` (instructions, math word
  problems, arithmetic, code, prose, questions, lists, dialogue), written for this project;
* the documentation strings of a fixed list of Python standard-library modules (English
  technical prose with code examples), under the PSF License
  (``mergekit_symalign/data/PSF-LICENSE.txt``, copied from the same Python).

Why shipped text, not text generated at merge time by the reference model (the data-free
quantization way): a streamed model pays a full pass over its weights for every generated
token, so ~29k tokens for an 8B model would be hundreds of passes over 16 GB, and nothing may
be downloaded at merge time. The set must give at least ``intermediate_size`` tokens (14,336
for Llama-3-8B) with the model's own tokenizer; a merge reads ``calibration.default_token_budget``
tokens of it (twice that width).
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "scripts" / "calibration_prompts.txt"
DATA = ROOT / "mergekit_symalign" / "data"
OUT = DATA / "calibration.jsonl"
SEED = 20240601
MODULES = (
    "abc argparse array ast asyncio.tasks base64 bisect calendar cmath codecs collections "
    "configparser contextlib copy csv dataclasses datetime decimal difflib doctest email.message "
    "enum fnmatch fractions functools gettext glob gzip hashlib heapq hmac html.parser http.client "
    "http.cookies imaplib inspect io ipaddress itertools json locale logging mailbox math "
    "mimetypes numbers operator optparse os pathlib pdb pickle pprint queue random re sched "
    "secrets selectors shelve shlex shutil smtplib socket sqlite3 statistics string struct "
    "subprocess tarfile tempfile textwrap threading timeit tokenize traceback turtle types typing "
    "unittest.case urllib.parse uuid warnings weakref wave xml.dom.minidom xml.etree.ElementTree "
    "zipfile zoneinfo"
).split()
MIN_CHARS, MAX_CHARS = 200, 1800


def docstrings():
    seen = set()
    for name in MODULES:
        module = importlib.import_module(name)
        objects = [module] + [obj for attr, obj in sorted(vars(module).items())
                              if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == module.__name__]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            doc = re.sub(r"\n{3,}", "\n\n", doc).strip()
            if len(doc) < MIN_CHARS or doc in seen:
                continue
            seen.add(doc)
            if len(doc) > MAX_CHARS:  # cut at a paragraph break
                cut = doc.rfind("\n\n", 0, MAX_CHARS)
                doc = doc[: cut if cut > MIN_CHARS else MAX_CHARS].strip()
            yield doc


def main() -> None:
    if sys.version_info[:2] != (3, 11):
        sys.exit("run with CPython 3.11 (the shipped set was built from its standard library)")
    prompts = [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = prompts + list(docstrings())
    random.Random(SEED).shuffle(records)
    with OUT.open("w", encoding="utf-8") as f:
        for text in records:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    shutil.copy(Path(inspect.getfile(inspect)).with_name("LICENSE.txt"), DATA / "PSF-LICENSE.txt")
    print(f"wrote {len(records)} records ({len(prompts)} prompts), {OUT.stat().st_size} bytes, to {OUT}")


if __name__ == "__main__":
    main()
