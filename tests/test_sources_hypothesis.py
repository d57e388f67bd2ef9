"""Property test: corrupted lines are counted skips or strict errors, never wrong rows.

For every text reader (each interaction file and each item/metadata file) a
small clean dataset is written, hypothesis corrupts a random subset of the
target file's data lines with corruptions that can never be a valid row
(a dropped or extra field, a truncated line, non-numeric numbers, empty or
mistyped ids, invalid UTF-8, broken JSON, missing required keys, and numeric
corruptions that ``float()``/``int()`` would take: ratings out of [0, 100] such as
-5, 200 or 1e9, numbers spelled ``1_000`` or with non-ASCII digits, and for
MovieLens a timestamp before 1995 such as 1000), and:

* lenient mode: every corrupted line is one counted bad row with its
  ``file:line``; every yielded row equals the row the clean file gives (for a
  corrupted item line: the same interactions with ``title=None``,
  ``genres=()``); no other exception escapes;
* strict mode: :class:`DataFormatError` naming the target file and the first
  corrupted line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pathlib
import tempfile
from typing import Any, Callable, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userllm_jax.data import sources
from userllm_jax.data.schema import DataFormatError, Interaction, ReadReport

MAX_EXAMPLES = 40


def _is_number(s: str) -> bool:
  try:
    return math.isfinite(float(s))
  except ValueError:
    return False


def junk(max_codepoint: int, forbidden: str = "") -> st.SearchStrategy[str]:
  """Non-numeric text without line breaks or ``forbidden`` characters."""
  return st.text(
      st.characters(max_codepoint=max_codepoint,
                    blacklist_categories=("Cs",),
                    blacklist_characters="\n\r" + forbidden),
      min_size=0, max_size=8).filter(lambda s: not _is_number(s))


@dataclasses.dataclass
class Target:
  """One file to corrupt inside a small dataset."""

  name: str
  family: str                       # 'delim' | 'csv' | 'json' | 'pyjson'
  filename: str                     # the file to corrupt
  records: list                     # field lists or dicts
  header: list[str]                 # lines before the data
  encoding: str
  companions: dict[str, bytes]      # other files of the dataset
  read: Callable[[pathlib.Path, ReadReport], Any]
  item_of: Optional[Callable[[Any], str]] = None  # item-file targets only
  sep: str = "\t"
  numeric: tuple = ()               # positions / keys that must be numbers
  ids: tuple = ()                   # positions / keys that must be ids
  texts: tuple = ()                 # optional text keys (JSON)
  lists: tuple = ()                 # list-of-string keys (JSON)
  key_groups: tuple = ()            # JSON: deleting a group -> bad row
  timestamp: Optional[int] = None   # delimited: the timestamp column
  rating: Optional[Any] = None      # the rating column / key (range [0, 100])
  ts_floor: bool = False            # MovieLens: timestamps before 1995 are bad

  def render(self, rec) -> str:
    if self.family == "delim":
      return self.sep.join(rec)
    if self.family == "csv":
      buf = io.StringIO()
      csv.writer(buf, lineterminator="").writerow(rec)
      return buf.getvalue()
    if self.family == "pyjson":
      return repr(rec)
    return json.dumps(rec, ensure_ascii=False)

  def write(self, root: pathlib.Path, lines: list[bytes]) -> None:
    for name, data in self.companions.items():
      (root / name).write_bytes(data)
    head = b"".join((h + "\n").encode(self.encoding) for h in self.header)
    (root / self.filename).write_bytes(head + b"".join(l + b"\n"
                                                       for l in lines))


def _enc(lines, encoding="utf-8") -> bytes:
  return "".join(l + "\n" for l in lines).encode(encoding)


# ----------------------------------------------------------------- datasets

ML100K_DATA = [["196", "242", "3", "881250949"], ["186", "302", "4",
                                                  "891717742"],
               ["22", "377", "1", "878887116"], ["244", "51", "2",
                                                 "880606923"],
               ["166", "346", "1", "886397596"], ["298", "474", "4",
                                                  "884182806"]]
ML100K_ITEM = [["242", "Kolya (1996)", "24-Jan-1997", "", "http://x/1", "0",
                "0", "1", "0"],
               ["302", "Misérables, Les (1995)", "", "", "u", "0", "1", "0",
                "1"],
               ["377", "Heavyweights (1994)", "", "", "u", "0", "0", "1", "0"],
               ["51", "Legends of the Fall (1994)", "", "", "u", "0", "1", "0",
                "1"],
               ["346", "Jackie Brown (1997)", "", "", "u", "0", "0", "1",
                "1"]]
ML100K_GENRE = b"unknown|0\nAction|1\nComedy|2\nDrama|3\n"


def _ml100k_targets():
  items = _enc(["|".join(r) for r in ML100K_ITEM], "latin-1")
  data = _enc(["\t".join(r) for r in ML100K_DATA], "latin-1")
  read = lambda d, rep: sources.read_ml100k(d, report=rep)
  return [
      Target("ml100k/u.data", "delim", "u.data", ML100K_DATA, [], "latin-1",
             {"u.item": items, "u.genre": ML100K_GENRE}, read, sep="\t",
             numeric=(2, 3), ids=(0, 1), timestamp=3, rating=2, ts_floor=True),
      Target("ml100k/u.item", "delim", "u.item", ML100K_ITEM, [], "latin-1",
             {"u.data": data, "u.genre": ML100K_GENRE}, read,
             item_of=lambda r: r[0], sep="|", ids=(0,),
             numeric=("flags",)),
  ]


ML1M_DATA = [["1", "1193", "5", "978300760"], ["1", "661", "3", "978302109"],
             ["2", "914", "3", "978301968"], ["3", "3408", "4", "978300275"],
             ["3", "2355", "5", "978824291"]]
ML1M_ITEM = [["1193", "One Flew Over the Cuckoo's Nest (1975)", "Drama"],
             ["661", "James and the Giant Peach (1996)",
              "Animation|Children's|Musical"],
             ["914", "My Fair Lady (1964)", "Musical|Romance"],
             ["3408", "Erin Brockovich (2000)", "Drama"],
             ["2355", "Bug's Life, A (1998)", ""]]


def _ml1m_targets():
  items = _enc(["::".join(r) for r in ML1M_ITEM], "latin-1")
  data = _enc(["::".join(r) for r in ML1M_DATA], "latin-1")
  read = lambda d, rep: sources.read_ml1m(d, report=rep)
  return [
      Target("ml1m/ratings.dat", "delim", "ratings.dat", ML1M_DATA, [],
             "latin-1", {"movies.dat": items}, read, sep="::",
             numeric=(2, 3), ids=(0, 1), timestamp=3, rating=2, ts_floor=True),
      Target("ml1m/movies.dat", "delim", "movies.dat", ML1M_ITEM, [],
             "latin-1", {"ratings.dat": data}, read, item_of=lambda r: r[0],
             sep="::", ids=(0,)),
  ]


MLCSV_DATA = [["1", "11", "3.5", "1147880044"], ["1", "4973", "4.0",
                                                 "1147868817"],
              ["2", "5", "0.5", "1147868828"], ["2", "11", "5.0",
                                                "1147868829"],
              ["3", "99", "2.5", "1147868830"]]
MLCSV_ITEM = [["11", "American President, The (1995)", "Comedy|Drama"],
              ["4973", "Amélie (Fabuleux destin d'Amélie Poulain; Le) (2001)",
               "Comedy|Romance"],
              ["5", 'Quote "Test", A (2000)', "(no genres listed)"],
              ["99", "Plain (1999)", "Drama"]]


def _csv_lines(rows):
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(rows)
  return buf.getvalue().encode()


def _mlcsv_targets():
  read = lambda d, rep: sources.read_ml_csv(d, report=rep)
  items = _csv_lines([["movieId", "title", "genres"]] + MLCSV_ITEM)
  data = _csv_lines([["userId", "movieId", "rating", "timestamp"]]
                    + MLCSV_DATA)
  return [
      Target("mlcsv/ratings.csv", "csv", "ratings.csv", MLCSV_DATA,
             ["userId,movieId,rating,timestamp"], "utf-8",
             {"movies.csv": items}, read, sep=",", numeric=(2, 3),
             ids=(0, 1), timestamp=3, rating=2, ts_floor=True),
      Target("mlcsv/movies.csv", "csv", "movies.csv", MLCSV_ITEM,
             ["movieId,title,genres"], "utf-8", {"ratings.csv": data}, read,
             item_of=lambda r: r[0], sep=",", ids=(0,)),
  ]


RB_DATA = [["196", "242", "3", "881250949"], ["196", "1633", "4.5",
                                              "881250950.7"],
           ["7", "999", "2", "881250951"], ["8", "242", "1", "881250952"]]
RB_ITEM = [["242", "Kolya", "1996", "Comedy"],
           ["1633", "Á köldum klaka (Cold Fever)", "1994", "Comedy Drama"],
           ["999", "Zed", "unknown", "unknown"]]
RB_INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
RB_ITEM_HEADER = ("item_id:token\tmovie_title:token_seq\trelease_year:token\t"
                  "class:token_seq")


def _recbole_targets():
  read = lambda d, rep: sources.read_recbole(d, report=rep)
  items = _enc([RB_ITEM_HEADER] + ["\t".join(r) for r in RB_ITEM])
  data = _enc([RB_INTER_HEADER] + ["\t".join(r) for r in RB_DATA])
  return [
      Target("recbole/.inter", "delim", "x.inter", RB_DATA,
             [RB_INTER_HEADER], "utf-8", {"x.item": items}, read, sep="\t",
             numeric=(2, 3), ids=(0, 1), timestamp=3, rating=2),
      Target("recbole/.item", "delim", "x.item", RB_ITEM, [RB_ITEM_HEADER],
             "utf-8", {"x.inter": data}, read, item_of=lambda r: r[0],
             sep="\t", ids=(0,)),
  ]


def _reviews_1418(n=5):
  return [{"reviewerID": f"A{i % 3}", "asin": f"B{i % 4}", "overall": 1.0 + i,
           "unixReviewTime": 1235433600 + i, "reviewText": f"Text {i}, ñ",
           "summary": "s"} for i in range(n)]


def _meta(key, version, n=4):
  out = []
  for i in range(n - 1):  # The last item has no metadata row.
    m = {key: f"B{i}", "title": f"Title {i} — é"}
    if version == "2014":
      m["categories"] = [["Movies & TV", f"G{i}"], ["Movies & TV"]]
    elif version == "2018":
      m["category"] = ["Movies & TV", f"G{i}"]
    else:
      m["main_category"] = "Prime Video"
      m["categories"] = [f"G{i}"]
    out.append(m)
  return out


def _amazon_targets():
  targets = []
  for version in ("2014", "2018", "2023"):
    read = (lambda v: lambda d, rep: sources.read_amazon(
        d, version=v, report=rep))(version)
    if version == "2023":
      reviews = [{"user_id": f"U{i % 3}", "asin": f"C{i}",
                  "parent_asin": f"B{i % 4}", "rating": float(1 + i),
                  "timestamp": 1440385637999 + 1000 * i, "text": f"T {i} ☕",
                  "title": "review title"} for i in range(5)]
      rname, mname, key = "Movies.jsonl", "meta_Movies.jsonl", "parent_asin"
      numeric, ids, texts = ("rating", "timestamp"), ("user_id",
                                                      "parent_asin"), ("text",)
      groups = (("user_id",), ("rating",), ("timestamp",),
                ("parent_asin", "asin"))
      lists = ("categories",)
    else:
      reviews = _reviews_1418()
      prefix = "reviews_" if version == "2014" else ""
      rname, mname, key = (f"{prefix}Movies.json", "meta_Movies.json",
                           "asin")
      numeric, ids = ("overall", "unixReviewTime"), ("reviewerID", "asin")
      texts = ("reviewText",)
      groups = (("reviewerID",), ("asin",), ("overall",),
                ("unixReviewTime",))
      lists = ("categories",) if version == "2014" else ("category",)
    meta = _meta(key, version)
    meta_family = "pyjson" if version == "2014" else "json"
    meta_lines = [repr(m) if version == "2014" else json.dumps(m)
                  for m in meta]
    targets.append(Target(
        f"amazon{version}/reviews", "json", rname, reviews, [], "utf-8",
        {mname: _enc(meta_lines)}, read, numeric=numeric, ids=ids, rating=numeric[0],
        texts=texts, key_groups=groups))
    targets.append(Target(
        f"amazon{version}/meta", meta_family, mname, meta, [], "utf-8",
        {rname: _enc([json.dumps(r) for r in reviews])}, read,
        item_of=(lambda k: lambda m: m[k])(key), ids=(key,),
        texts=("title",), lists=lists, key_groups=((key,),)))
  return targets


def _google_targets():
  read = lambda d, rep: sources.read_google_local(d, report=rep)
  reviews = [{"user_id": f"1{i % 2}", "name": "n", "time": 1566331951619 + i,
              "rating": 1 + i % 5, "text": None if i == 2 else f"t{i}",
              "pics": None, "resp": None, "gmap_id": f"0x{i % 3}"}
             for i in range(5)]
  meta = [{"name": f"Place {i}", "gmap_id": f"0x{i}",
           "category": None if i == 1 else ["Restaurant", f"C{i}"]}
          for i in range(2)]
  return [
      Target("google/review", "json", "review-Alaska.json", reviews, [],
             "utf-8", {"meta-Alaska.json": _enc(json.dumps(m) for m in meta)},
             read, numeric=("rating", "time"), ids=("user_id", "gmap_id"), rating="rating",
             texts=("text",), key_groups=(("user_id",), ("gmap_id",),
                                          ("rating",), ("time",))),
      Target("google/meta", "json", "meta-Alaska.json", meta, [], "utf-8",
             {"review-Alaska.json": _enc(json.dumps(r) for r in reviews)},
             read, item_of=lambda m: m["gmap_id"], ids=("gmap_id",),
             texts=("name",), lists=("category",),
             key_groups=(("gmap_id",),)),
  ]


TARGETS = (_ml100k_targets() + _ml1m_targets() + _mlcsv_targets()
           + _recbole_targets() + _amazon_targets() + _google_targets())


# ----------------------------------------------------------------- corruption


@st.composite
def corrupt_delimited(draw, t: Target, rec: list) -> bytes:
  """A delimited / CSV line that cannot parse as a valid row."""
  max_cp = 255 if t.encoding == "latin-1" else 0x2FFF
  forbid = ":" if t.sep == "::" else t.sep
  kinds = ["drop", "add", "truncate", "garbage", "empty_id"]
  if t.numeric:
    kinds.append("non_numeric")
  if t.encoding == "utf-8":
    kinds.append("bad_utf8")
  if t.timestamp is not None:
    kinds.append("ts_overflow")
  if t.rating is not None or t.timestamp is not None:
    kinds.append("bad_value")
  kind = draw(st.sampled_from(kinds))
  rec = list(rec)
  if kind == "drop":
    del rec[draw(st.integers(0, len(rec) - 1))]
  elif kind == "add":
    rec.insert(draw(st.integers(0, len(rec))), draw(junk(max_cp, forbid)))
  elif kind == "empty_id":
    rec[draw(st.sampled_from(t.ids))] = draw(st.sampled_from(["", " ",
                                                              "  "]))
  elif kind == "ts_overflow":  # Outside int64, or too long for int().
    rec[t.timestamp] = draw(st.sampled_from(
        [str(2**63), "-" + "9" * 25, "1" * 5000, "1e300"]))
  elif kind == "bad_value":
    choices = []
    if t.rating is not None:
      choices += [(t.rating, v) for v in _BAD_RATINGS]
    if t.timestamp is not None:
      choices += [(t.timestamp, v) for v in _BAD_TIMESTAMPS
                  + (_EARLY_TIMESTAMPS if t.ts_floor else [])]
    pos, value = draw(st.sampled_from(
        [(p, v) for p, v in choices if _encodable(v, t.encoding)]))
    rec[pos] = value
  elif kind == "non_numeric":
    pos = draw(st.sampled_from(t.numeric))
    if pos == "flags":  # u.item genre flags must be 0 or 1.
      pos = draw(st.integers(5, len(rec) - 1))
      rec[pos] = draw(junk(max_cp, forbid).filter(
          lambda s: s.strip() not in ("0", "1")))
    else:
      rec[pos] = draw(junk(max_cp, forbid))
  line = t.render(rec)
  if kind == "truncate":
    last_sep = line.rfind(t.sep)
    cut = draw(st.integers(1, last_sep))
    line = line[:cut]
    if not line.strip():
      line = line + "x"
  elif kind == "garbage":
    line = draw(junk(max_cp, forbid + '"').filter(lambda s: s.strip()))
  data = line.encode(t.encoding)
  if kind == "bad_utf8":
    at = draw(st.integers(0, len(data)))
    data = data[:at] + b"\xff" + data[at:]
  return data


_BAD_RATINGS = ["-5", "200", "1e9", "-0.5", "100.5", "1_0", "\u0663", "nan", "-inf"]
_BAD_TIMESTAMPS = ["881_250_949", "\uff18\uff18\uff11\uff12\uff15\uff10\uff19\uff14\uff19",
                   "\u0668\u0668\u0661\u0662\u0665\u0660\u0669\u0664\u0669"]


def _encodable(text: str, encoding: str) -> bool:
  try:
    text.encode(encoding)
    return True
  except UnicodeEncodeError:
    return False


_EARLY_TIMESTAMPS = ["1000", "0", "-881250949", "788918399"]
# JSON readers: out-of-range ratings as numbers and as strings.
_BAD_JSON_RATINGS = st.sampled_from([-5, 200, 1e9, -0.5, "-5", "200", "1e9", "1_0"])

_NON_ID = st.sampled_from([None, "", "   ", 1.5, [], {}, True])
_NON_NUMBER = st.one_of(st.sampled_from([None, True, [], {"a": 1}, "NaN",
                                         "inf", "-1e400", 10**400,
                                         -(10**30)]), junk(0x2FFF))
_NON_TEXT = st.sampled_from([5, 1.5, [], {"x": 1}, True])
_NON_LIST = st.sampled_from(["Drama", 5, {"a": 1}, [1], [None], ["ok", 2]])


@st.composite
def corrupt_json(draw, t: Target, rec: dict) -> bytes:
  kinds = ["truncate", "garbage", "not_object", "delete", "bad_id",
           "bad_utf8"]
  if t.numeric:
    kinds.append("bad_number")
  if t.rating is not None:
    kinds.append("bad_rating")
  if [k for k in t.texts if k in rec]:
    kinds.append("bad_text")
  if t.lists:
    kinds.append("bad_list")
  kind = draw(st.sampled_from(kinds))
  rec = dict(rec)
  if kind == "delete":
    for k in draw(st.sampled_from(t.key_groups)):
      rec.pop(k, None)
  elif kind == "bad_id":
    rec[draw(st.sampled_from(t.ids))] = draw(_NON_ID)
  elif kind == "bad_number":
    rec[draw(st.sampled_from(t.numeric))] = draw(_NON_NUMBER)
  elif kind == "bad_rating":
    rec[t.rating] = draw(_BAD_JSON_RATINGS)
  elif kind == "bad_text":
    rec[draw(st.sampled_from([k for k in t.texts if k in rec]))] = draw(
        _NON_TEXT)
  elif kind == "bad_list":
    key = draw(st.sampled_from(t.lists))
    if t.family == "pyjson":  # 2014 categories: a list of lists.
      rec[key] = draw(st.sampled_from(["Drama", 5, ["Drama"], [[1]],
                                       [["a", None]]]))
    else:
      rec[key] = draw(_NON_LIST)
  line = t.render(rec)
  if kind == "truncate":
    line = line[:draw(st.integers(1, len(line) - 1))]
  elif kind == "garbage":
    line = "{" + draw(junk(0x2FFF, "}"))
  elif kind == "not_object":
    line = json.dumps(draw(st.sampled_from([[1, 2], "text", 3, None,
                                            [rec]])))
  data = line.encode("utf-8")
  if kind == "bad_utf8":
    at = draw(st.integers(0, len(data)))
    data = data[:at] + b"\xff" + data[at:]
  return data


def corrupt(t: Target, rec) -> st.SearchStrategy[bytes]:
  if t.family in ("json", "pyjson"):
    return corrupt_json(t, rec)
  return corrupt_delimited(t, rec)


@st.composite
def corrupted_file(draw, t: Target):
  n = len(t.records)
  bad = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
  lines = []
  for i, rec in enumerate(t.records):
    if i in bad:
      lines.append(draw(corrupt(t, rec)))
    else:
      lines.append(t.render(rec).encode(t.encoding))
  return bad, lines


# ----------------------------------------------------------------- the test


def _clean_rows(t: Target, root: pathlib.Path) -> list[Interaction]:
  t.write(root, [t.render(r).encode(t.encoding) for r in t.records])
  report = ReadReport(strict=True)
  rows = list(t.read(root, report))
  assert report.rows_bad == 0 and rows
  return rows


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_corrupted_lines_never_yield_wrong_rows(target: Target):
  with tempfile.TemporaryDirectory() as tmp:
    clean = _clean_rows(target, pathlib.Path(tmp))
  if target.item_of is not None:
    # The clean dataset must actually join titles, or the check is vacuous.
    assert any(r.title is not None for r in clean)

  @settings(max_examples=MAX_EXAMPLES, deadline=None,
            suppress_health_check=[HealthCheck.too_slow])
  @given(corrupted_file(target))
  def check(case):
    bad, lines = case
    with tempfile.TemporaryDirectory() as tmp:
      root = pathlib.Path(tmp)
      target.write(root, lines)
      path = str(root / target.filename)
      offset = len(target.header) + 1
      if target.item_of is None:
        expected = [r for i, r in enumerate(clean) if i not in bad]
      else:
        lost = {target.item_of(target.records[i]) for i in bad}
        expected = [dataclasses.replace(r, title=None, genres=())
                    if r.item in lost else r for r in clean]
      report = ReadReport()
      rows = list(target.read(root, report))
      assert rows == expected
      assert report.rows_ok == len(expected)
      assert report.rows_bad == len(bad), report.summary()
      want = [f"{path}:{i + offset}: " for i in bad][:len(report.examples)]
      assert [e[:len(w)] for e, w in zip(report.examples, want)] == want, (
          report.examples)
      with pytest.raises(DataFormatError) as err:
        list(target.read(root, ReadReport(strict=True)))
      assert err.value.path == path
      assert err.value.line == bad[0] + offset

  check()
