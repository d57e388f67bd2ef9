"""Readers of every source layout: exact field values from small files."""

from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pytest

from userllm_jax.data import sources
from userllm_jax.data.schema import (DataError, DataFormatError, Interaction,
                                     MissingFileError, ReadReport)
from userllm_jax.data.sources import _io, synthetic

I = Interaction


def write(path: pathlib.Path, text: str, encoding: str = "utf-8") -> pathlib.Path:
  data = text.encode(encoding)
  if path.name.endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)
  return path


def jsonl(rows) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# --------------------------------------------------------------- MovieLens

U_GENRE = "unknown|0\nAction|1\nComedy|2\nDrama|3\n\n"


def _ml100k(tmp_path, gz_data=False):
  d = tmp_path / "ml-100k"
  d.mkdir()
  write(d / ("u.data.gz" if gz_data else "u.data"),
        "196\t242\t3\t881250949\r\n186\t302\t4\t891717742\r\n"
        "22\t377\t1\t878887116\n")
  write(d / "u.item",
        "242|Kolya (1996)|24-Jan-1997||http://x/Kolya|0|0|1|0\n"
        "302|Misérables, Les (1995)|01-Jan-1995||http://x/M|0|1|0|1\n",
        encoding="latin-1")
  write(d / "u.genre", U_GENRE)
  return d


def test_ml100k_exact_rows_latin1_and_missing_item(tmp_path):
  d = _ml100k(tmp_path)
  report = ReadReport()
  rows = list(sources.read_dataset("movielens-100k", str(d), report=report))
  assert rows == [
      I("196", "242", 881250949, 3.0, "Kolya (1996)", ("Comedy",)),
      I("186", "302", 891717742, 4.0, "Misérables, Les (1995)",
        ("Action", "Drama")),
      I("22", "377", 878887116, 1.0, None, ()),
  ]
  assert report.rows_ok == 3 and report.rows_bad == 0
  assert any("1 interaction(s) on 1 item(s) absent" in n and "'377'" in n
             for n in report.notes), report.notes
  assert [p.name for p in sources.source_files("movielens-100k", str(d))] == [
      "u.data", "u.item", "u.genre"]


def test_ml100k_gzipped_data_file(tmp_path):
  d = _ml100k(tmp_path, gz_data=True)
  rows = list(sources.read_ml100k(d, report=ReadReport(strict=True)))
  assert [r.item for r in rows] == ["242", "302", "377"]


def test_ml100k_bad_flag_and_field_count(tmp_path):
  d = _ml100k(tmp_path)
  write(d / "u.item", "242|Kolya (1996)|x||u|0|0|2|0\n302|Short|x\n",
        encoding="latin-1")
  report = ReadReport()
  rows = list(sources.read_ml100k(d, report=report))
  assert all(r.title is None for r in rows)
  assert report.rows_bad == 2
  assert report.by_reason == {"bad_field": 1, "field_count": 1}
  assert report.examples[0].startswith(f"{d / 'u.item'}:1: genre flags")
  assert report.examples[1].startswith(f"{d / 'u.item'}:2: expected 9")
  with pytest.raises(DataFormatError, match=r"u\.item:1: genre flags"):
    list(sources.read_ml100k(d, report=ReadReport(strict=True)))


def test_ml1m(tmp_path):
  d = tmp_path / "ml-1m"
  d.mkdir()
  write(d / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
  write(d / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|"
        "Musical\n"
        "3::Café Flor (1999)::\n", encoding="latin-1")
  rows = list(sources.read_dataset("movielens-1m", str(d),
                                   report=ReadReport(strict=True)))
  assert rows == [
      I("1", "1193", 978300760, 5.0,
        "One Flew Over the Cuckoo's Nest (1975)", ("Drama",)),
      I("1", "661", 978302109, 3.0, "James and the Giant Peach (1996)",
        ("Animation", "Children's", "Musical")),
  ]


def test_ml1m_missing_file_names_expected_path(tmp_path):
  d = tmp_path / "ml-1m"
  d.mkdir()
  write(d / "ratings.dat", "1::1193::5::978300760\n")
  with pytest.raises(MissingFileError, match=str(d / "movies.dat")):
    sources.read_dataset("movielens-1m", str(d), report=ReadReport())
  with pytest.raises(MissingFileError, match="nowhere"):
    sources.read_dataset("movielens-1m", str(tmp_path / "nowhere"),
                         report=ReadReport())
  with pytest.raises(DataError, match="needs --source"):
    sources.read_dataset("movielens-1m", None, report=ReadReport())


@pytest.mark.parametrize("name", ["movielens-20m", "movielens-25m",
                                  "movielens-32m"])
def test_ml_csv_quoted_titles_header_mapping(tmp_path, name):
  d = tmp_path / "ml"
  d.mkdir()
  write(d / "movies.csv",
        "movieId,title,genres\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "4973,Amélie (Fabuleux destin d'Amélie Poulain; Le) (2001),"
        "Comedy|Romance\n"
        '5,"Quote ""Test"", A (2000)",(no genres listed)\n')
  # Columns in a non-standard order: mapped by header name.
  write(d / "ratings.csv",
        "timestamp,userId,rating,movieId\n"
        "1147880044,1,3.5,11\n1147868817,1,4.0,4973\n1147868828,2,0.5,5\n")
  rows = list(sources.read_dataset(name, str(d),
                                   report=ReadReport(strict=True)))
  assert rows == [
      I("1", "11", 1147880044, 3.5, "American President, The (1995)",
        ("Comedy", "Drama", "Romance")),
      I("1", "4973", 1147868817, 4.0,
        "Amélie (Fabuleux destin d'Amélie Poulain; Le) (2001)",
        ("Comedy", "Romance")),
      I("2", "5", 1147868828, 0.5, 'Quote "Test", A (2000)', ()),
  ]


def test_ml_csv_bad_header_raises_even_lenient(tmp_path):
  d = tmp_path / "ml"
  d.mkdir()
  write(d / "movies.csv", "movieId,title,genres\n")
  write(d / "ratings.csv", "user,movieId,rating,timestamp\n1,2,3,4\n")
  with pytest.raises(DataFormatError, match=r"ratings\.csv:1: header is "
                     r"missing column\(s\) \['userId'\]"):
    list(sources.read_ml_csv(d, report=ReadReport()))


# --------------------------------------------------------------- RecBole


def test_recbole_fields_by_name(tmp_path):
  d = tmp_path / "rb"
  d.mkdir()
  write(d / "ml.inter",
        "timestamp:float\textra:token\titem_id:token\trating:float\t"
        "user_id:token\n"
        "881250949.0\tz\t242\t3\t196\n881250950.7\tz\t1633\t4.5\t196\n"
        "881250951\tz\t999\t2\t7\n")
  write(d / "ml.item",
        "release_year:token\tclass:token_seq\titem_id:token\t"
        "movie_title:token_seq\n"
        "1996\tComedy\t242\tKolya\n"
        "1994\tComedy Drama\t1633\tÁ köldum klaka (Cold Fever)\n")
  report = ReadReport()
  rows = list(sources.read_dataset("recbole", str(d), report=report))
  assert rows == [
      I("196", "242", 881250949, 3.0, "Kolya (1996)", ("Comedy",)),
      I("196", "1633", 881250950, 4.5,
        "Á köldum klaka (Cold Fever) (1994)", ("Comedy", "Drama")),
      I("7", "999", 881250951, 2.0, None, ()),
  ]
  assert any("absent from" in n for n in report.notes)
  plain = list(sources.read_recbole(d / "ml.inter", report=ReadReport(),
                                    title_with_year=False))
  assert plain[0].title == "Kolya"
  assert [p.name for p in sources.source_files("recbole", str(d))] == [
      "ml.inter", "ml.item"]


def test_recbole_without_item_file_and_bad_header(tmp_path):
  d = tmp_path / "rb"
  d.mkdir()
  write(d / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
        "a\tb\t10\n")
  report = ReadReport()
  assert list(sources.read_recbole(d, report=report)) == [I("a", "b", 10)]
  assert any("no matching .item" in n for n in report.notes)
  write(d / "x.inter", "user_id:token\titem_id\ttimestamp:float\na\tb\t1\n")
  with pytest.raises(DataFormatError, match=r"x\.inter:1: header column "
                     r"'item_id' is not 'name:type'"):
    list(sources.read_recbole(d, report=ReadReport()))
  write(d / "x.inter", "user_id:token\titem_id:token\n")
  with pytest.raises(DataFormatError, match=r"lacks required column\(s\) "
                     r"\['timestamp'\]"):
    list(sources.read_recbole(d, report=ReadReport()))


def test_movielens_name_accepts_recbole_dir(tmp_path):
  d = tmp_path / "rb"
  d.mkdir()
  write(d / "ml-1m.inter", "user_id:token\titem_id:token\trating:float\t"
        "timestamp:float\n1\t2\t5\t100\n")
  rows = list(sources.read_dataset("movielens-1m", str(d),
                                   report=ReadReport(strict=True)))
  assert rows == [I("1", "2", 100, 5.0)]


# --------------------------------------------------------------- Amazon

META_2014 = (
    "{'asin': '0000143561', 'title': 'Everyday Italian (with Giada "
    "de Laurentiis), Volume 1 (3 Pack)', 'categories': [['Movies & TV', "
    "'Movies'], ['Movies & TV', 'TV']], 'salesRank': {'Movies & TV': 376041}}"
    "\n"
    '{"asin": "0000589012", "categories": [["Movies & TV"]]}\n')


def test_amazon_2014_dir_python_literal_meta(tmp_path):
  d = tmp_path / "a14"
  d.mkdir()
  write(d / "reviews_Movies_and_TV_5.json.gz", jsonl([
      {"reviewerID": "A3R5OBKS7OM2IR", "asin": "0000143561",
       "reviewerName": "Stephen", "helpful": [0, 0],
       "reviewText": "Great, it's a \"must\" — really.", "overall": 5.0,
       "summary": "Five", "unixReviewTime": 1235433600,
       "reviewTime": "02 24, 2009"},
      {"reviewerID": "AH3QC2PC1VTGP", "asin": "0000589012",
       "reviewText": "ok", "overall": 2.0, "unixReviewTime": 1213228800},
      {"reviewerID": "X", "asin": "B000NOMETA", "reviewText": "",
       "overall": 3.0, "unixReviewTime": 1}]))
  write(d / "meta_Movies_and_TV.json.gz", META_2014)
  report = ReadReport(strict=True)
  rows = list(sources.read_dataset("amazon-2014", str(d), report=report))
  assert rows == [
      I("A3R5OBKS7OM2IR", "0000143561", 1235433600, 5.0,
        "Everyday Italian (with Giada de Laurentiis), Volume 1 (3 Pack)",
        ("Movies & TV", "Movies", "TV"), "Great, it's a \"must\" — really."),
      I("AH3QC2PC1VTGP", "0000589012", 1213228800, 2.0, None,
        ("Movies & TV",), "ok"),
      I("X", "B000NOMETA", 1, 3.0, None, (), ""),
  ]
  assert any("B000NOMETA" in n for n in report.notes)
  # Explicit REVIEWS,META gives the same rows.
  src = f"{d / 'reviews_Movies_and_TV_5.json.gz'},{d / 'meta_Movies_and_TV.json.gz'}"
  assert list(sources.read_dataset("amazon-2014", src,
                                   report=ReadReport())) == rows
  assert [p.name for p in sources.source_files("amazon-2014", str(d))] == [
      "reviews_Movies_and_TV_5.json.gz", "meta_Movies_and_TV.json.gz"]


def test_amazon_2018_missing_review_text_and_missing_meta(tmp_path):
  d = tmp_path / "a18"
  d.mkdir()
  write(d / "Movies_and_TV_5.json", jsonl([
      {"overall": 4.0, "verified": True, "reviewTime": "03 11, 2013",
       "reviewerID": "A1", "asin": "0005019281", "style": {"Format:": " DVD"},
       "unixReviewTime": 1362960000}]))
  with pytest.raises(MissingFileError,
                     match=str(d / "meta_Movies_and_TV.json.gz")):
    sources.read_dataset("amazon-2018", str(d), report=ReadReport())
  write(d / "meta_Movies_and_TV.json.gz", jsonl([
      {"asin": "0005019281", "title": "An American Christmas Carol VHS",
       "category": ["Movies & TV", "Movies"], "main_cat": "Movies & TV"}]))
  rows = list(sources.read_dataset("amazon-2018", str(d),
                                   report=ReadReport(strict=True)))
  assert rows == [I("A1", "0005019281", 1362960000, 4.0,
                    "An American Christmas Carol VHS",
                    ("Movies & TV", "Movies"), None)]


def test_amazon_2023_ms_timestamps_parent_asin(tmp_path):
  d = tmp_path / "a23"
  d.mkdir()
  write(d / "Movies_and_TV.jsonl", jsonl([
      {"rating": 5.0, "title": "Five Stars", "text": "Café ☕ lovers: yes",
       "images": [], "asin": "B01AB", "parent_asin": "B01P",
       "user_id": "AGGZ357AO26RQZVRLGU4D4N52DZQ", "timestamp": 1440385637999,
       "helpful_vote": 0, "verified_purchase": True},
      {"rating": 1, "text": None, "asin": "B02", "parent_asin": "B02",
       "user_id": "U2", "timestamp": 999}]))
  write(d / "meta_Movies_and_TV.jsonl.gz", jsonl([
      {"main_category": "Prime Video", "title": "Café Society",
       "categories": ["Comedy", "Prime Video"], "parent_asin": "B01P"},
      {"main_category": None, "title": "Zero", "categories": [],
       "parent_asin": "B02"}]))
  rows = list(sources.read_dataset("amazon-2023", str(d),
                                   report=ReadReport(strict=True)))
  assert rows == [
      I("AGGZ357AO26RQZVRLGU4D4N52DZQ", "B01P", 1440385637, 5.0,
        "Café Society", ("Prime Video", "Comedy"), "Café ☕ lovers: yes"),
      I("U2", "B02", 0, 1.0, "Zero", (), None),
  ]


def test_amazon_bad_rows_counted(tmp_path):
  d = tmp_path / "a"
  d.mkdir()
  good = {"reviewerID": "A", "asin": "x", "overall": 5,
          "unixReviewTime": 10}
  lines = [json.dumps(good),
           json.dumps({**good, "overall": "five"}),
           '{"reviewerID": "A", "asin"',
           json.dumps({k: v for k, v in good.items() if k != "asin"}),
           json.dumps([1, 2]),
           json.dumps({**good, "unixReviewTime": None})]
  write(d / "Books.json", "\n".join(lines) + "\n")
  write(d / "meta_Books.json", '{"asin": "x", "title": "T"}\n')
  report = ReadReport()
  rows = list(sources.read_amazon(d, version="2018", report=report))
  assert rows == [I("A", "x", 10, 5.0, "T", ())]
  assert report.rows_bad == 5
  assert report.by_reason == {"bad_number": 2, "bad_json": 2,
                              "missing_field": 1}
  f = d / "Books.json"
  assert [e.split(": ", 1)[0] for e in report.examples] == [
      f"{f}:2", f"{f}:3", f"{f}:4", f"{f}:5", f"{f}:6"]
  with pytest.raises(DataFormatError) as err:
    list(sources.read_amazon(d, version="2018", report=ReadReport(strict=True)))
  assert err.value.path == str(f) and err.value.line == 2
  assert "overall: expected a number, got 'five'" in str(err.value)


def test_amazon_source_errors(tmp_path):
  d = tmp_path / "a"
  d.mkdir()
  write(d / "Books.json", "")
  write(d / "Toys.json", "")
  with pytest.raises(DataError, match="several Amazon 2018 reviews files"):
    sources.source_files("amazon-2018", str(d))
  with pytest.raises(MissingFileError, match="meta_Toys.json.gz"):
    sources.source_files("amazon-2018", str(d), category="Toys")
  with pytest.raises(DataError, match="order is REVIEWS,META"):
    sources.source_files("amazon-2018",
                         f"{d / 'meta_Books.json'},{d / 'Books.json'}")


# --------------------------------------------------------------- Google


def test_google_local(tmp_path):
  d = tmp_path / "g"
  d.mkdir()
  write(d / "review-Alaska.json.gz", jsonl([
      {"user_id": "109129", "name": "Ann", "time": 1566331951619,
       "rating": 5, "text": "Great pho — ñ", "pics": None, "resp": None,
       "gmap_id": "0x56c897b9ce6000df:0xd707e127588a8c6c"},
      {"user_id": "1", "time": 1000, "rating": 3, "text": None,
       "gmap_id": "0xnometa"}]))
  write(d / "meta-Alaska.json.gz", jsonl([
      {"name": "Pho Lena", "address": "x", "gmap_id":
       "0x56c897b9ce6000df:0xd707e127588a8c6c",
       "category": ["Vietnamese restaurant", "Restaurant"], "avg_rating": 4.5},
      {"name": "Nameless", "gmap_id": "0xother", "category": None}]))
  report = ReadReport(strict=True)
  rows = list(sources.read_dataset("google-local", str(d), report=report))
  assert rows == [
      I("109129", "0x56c897b9ce6000df:0xd707e127588a8c6c", 1566331951, 5.0,
        "Pho Lena", ("Vietnamese restaurant", "Restaurant"), "Great pho — ñ"),
      I("1", "0xnometa", 1, 3.0, None, (), None),
  ]
  with pytest.raises(MissingFileError, match="meta-Texas.json.gz"):
    write(d / "review-Texas.json.gz", "")
    sources.source_files("google-local", str(d))


# --------------------------------------------------------------- bad input


def test_truncated_gzip_counts_file_and_line(tmp_path):
  d = tmp_path / "a"
  d.mkdir()
  rows = [{"reviewerID": f"u{i}", "asin": "x", "overall": 4,
           "unixReviewTime": i, "reviewText": "lorem ipsum " * 20}
          for i in range(200)]
  full = gzip.compress(jsonl(rows).encode())
  f = d / "Books.json.gz"
  f.write_bytes(full[:len(full) // 2])
  write(d / "meta_Books.json", '{"asin": "x", "title": "T"}\n')
  report = ReadReport()
  got = list(sources.read_amazon(d, version="2018", report=report))
  assert 0 < len(got) < 200
  assert got == [Interaction(r["reviewerID"], "x", r["unixReviewTime"], 4.0,
                             "T", (), r["reviewText"])
                 for r in rows[:len(got)]]
  assert report.rows_bad == 1 and report.by_reason == {"truncated_file": 1}
  assert report.examples[0].startswith(f"{f}:{len(got) + 1}: compressed "
                                       f"stream ends early")
  with pytest.raises(DataFormatError) as err:
    list(sources.read_amazon(d, version="2018", report=ReadReport(strict=True)))
  assert err.value.path == str(f) and err.value.line == len(got) + 1


def test_corrupt_gzip_crc(tmp_path):
  data = bytearray(gzip.compress(b"1\t2\t3\t4\n"))
  data[-8] ^= 0xFF  # CRC32 trailer.
  p = tmp_path / "x.gz"
  p.write_bytes(bytes(data))
  report = ReadReport()
  # The CRC is checked at the end of the stream: the line is already out,
  # and the corruption is still counted (and raised in strict mode).
  assert list(_io.iter_lines(p, report=report)) == [(1, "1\t2\t3\t4")]
  assert report.by_reason == {"truncated_file": 1}
  assert report.examples[0].startswith(f"{p}:2: compressed stream")
  assert "CRC check failed" in report.examples[0]


def test_encoding_error_is_a_bad_row_and_blank_lines_noted(tmp_path):
  d = tmp_path / "rb"
  d.mkdir()
  (d / "x.inter").write_bytes(
      b"user_id:token\titem_id:token\ttimestamp:float\n"
      b"a\tb\t1\n\n  \nc\t\xff\xfe\t2\nd\te\t3\n")
  report = ReadReport()
  rows = list(sources.read_recbole(d, report=report))
  assert rows == [I("a", "b", 1), I("d", "e", 3)]
  assert report.by_reason == {"encoding": 1}
  assert report.examples[0].startswith(f"{d / 'x.inter'}:5: not valid utf-8")
  assert any("skipped 2 blank line(s)" in n for n in report.notes)


def test_parse_seconds_exact_for_large_ms():
  assert _io.parse_seconds(1440385637999, milliseconds=True) == 1440385637
  assert _io.parse_seconds("1440385637999", milliseconds=True) == 1440385637
  assert _io.parse_seconds("881250949.0") == 881250949
  assert _io.parse_seconds(-1500, milliseconds=True) == -2
  assert _io.parse_seconds(str(2**63 - 1)) == 2**63 - 1
  for bad in ("nan", "inf", "", "1e", True, None, [1], 2**63, "1e300",
              10**400, "-" + "9" * 30):
    with pytest.raises(_io.RowError):
      _io.parse_seconds(bad)


# --------------------------------------------------------------- registry


def test_registry_names():
  with pytest.raises(ValueError, match="unknown dataset 'movielens'"):
    sources.read_dataset("movielens", None, report=ReadReport())
  assert sources.source_files("synthetic", None) == []


def test_synthetic_via_registry_matches_generator():
  report = ReadReport()
  rows = list(sources.read_dataset("synthetic", "ignored", report=report,
                                   num_users=3, num_items=20, num_genres=4,
                                   mean_length=6, seed=3))
  data = synthetic.generate_synthetic(3, 20, 4, 6, 3)
  assert len(rows) == data.num_interactions == report.rows_ok
  first = rows[0]
  i0 = int(data.items[0])
  assert first.user == "u0" and first.item == f"i{i0}"
  assert first.title == data.item_titles[i0]
  assert first.genres == data.item_genre_names(i0)
  assert first.timestamp == int(data.timestamps[0])
  assert first.rating == float(data.ratings[0])


# --------------------------------------------------------------- TFDS


def test_tfds_movielens_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow_datasets.structured.movielens  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  with tfds.testing.mock_data(num_examples=4):
    ds = tfds.data_source("movielens/100k-ratings", split="train")
    names = ds.dataset_info.features["movie_genres"].feature.names
    expected = []
    for ex in ds:
      expected.append(I(
          str(ex["user_id"]).strip(), str(ex["movie_id"]).strip(),
          int(ex["timestamp"]), float(ex["user_rating"]),
          str(ex["movie_title"]),
          tuple(dict.fromkeys(names[int(g)] for g in ex["movie_genres"]
                              if names[int(g)] != "(no genres listed)"))))
    report = ReadReport(strict=True)
    rows = list(sources.read_dataset("tfds:movielens/100k-ratings",
                                     report=report))
  assert rows == expected and report.rows_ok == 4
  assert sum(len(r.genres) for r in rows) > 4  # Mock rows carry genres.
  assert all(isinstance(g, str) for r in rows for g in r.genres)


# --------------------------------------------------------------- synthetic


def test_synthetic_planted_truth_is_recoverable():
  data = synthetic.generate_synthetic(200, 300, 10, 120, seed=0)
  hits, markov = 0, 0
  for u in range(data.num_users):
    items = data.items[data.user_slice(u)]
    counts = np.zeros(10)
    for g in data.item_genres[items].ravel():
      if g >= 0:
        counts[g] += 1
    fav = set(data.favourite_genres[u][data.favourite_genres[u] >= 0].tolist())
    hits += int(np.argmax(counts)) in fav
    follows = (data.successors[items[:-1]] == items[1:, None]).any(axis=1)
    markov += follows.mean()
  assert hits / data.num_users >= 0.97
  # p_markov=0.5 plus chance hits of a preference draw.
  assert 0.48 <= markov / data.num_users <= 0.65
  # Favourite-genre items are rated higher.
  user_of_row = np.repeat(np.arange(data.num_users), np.diff(data.offsets))
  fav_row = np.array([
      bool(set(data.item_genres[i][data.item_genres[i] >= 0].tolist())
           & set(data.favourite_genres[u].tolist()))
      for u, i in zip(user_of_row, data.items)])
  assert data.ratings[fav_row].mean() > data.ratings[~fav_row].mean() + 1.0
  assert 1 <= data.ratings.min() and data.ratings.max() <= 5


def test_synthetic_structure_determinism_and_ties():
  a = synthetic.generate_synthetic(50, 40, 6, 30, seed=7)
  b = synthetic.generate_synthetic(50, 40, 6, 30, seed=7)
  c = synthetic.generate_synthetic(50, 40, 6, 30, seed=8)
  for field in ("items", "ratings", "timestamps", "item_genres",
                "favourite_genres", "successors", "offsets"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert not np.array_equal(a.items, c.items)
  n_item_genres = (a.item_genres >= 0).sum(axis=1)
  assert n_item_genres.min() >= 1 and n_item_genres.max() <= 3
  for row in a.item_genres:
    g = row[row >= 0]
    assert len(set(g.tolist())) == len(g)
  assert set(np.unique(a.item_genres[a.item_genres >= 0])) == set(range(6))
  n_fav = (a.favourite_genres >= 0).sum(axis=1)
  assert set(n_fav.tolist()) <= {1, 2}
  ties = 0
  for u in range(a.num_users):
    ts = a.timestamps[a.user_slice(u)]
    assert np.all(np.diff(ts) >= 0)
    ties += int((np.diff(ts) == 0).sum())
  assert ties > 0
  assert np.diff(a.offsets).min() >= 5
  assert a.item_titles == b.item_titles and len(set(a.item_titles)) == 40


def test_synthetic_long_histories_fast():
  import time  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  data = synthetic.generate_synthetic(8, 1000, 12, 10_000, seed=1)
  elapsed = time.perf_counter() - t0
  assert data.num_interactions > 75_000
  assert np.diff(data.offsets).min() > 9_000
  assert elapsed < 10.0, elapsed


def test_synthetic_rejects_bad_settings():
  with pytest.raises(ValueError, match="num_items"):
    synthetic.generate_synthetic(2, 3, 5, 10, 0)
  with pytest.raises(ValueError, match="p_markov"):
    synthetic.generate_synthetic(2, 30, 5, 10, 0, p_markov=1.5)


# --------------------------------------------------------------- resolution


def test_google_local_states_and_explicit_pair(tmp_path):
  d = tmp_path / "g"
  d.mkdir()
  for state, n in (("Alaska", 2), ("Hawaii", 1)):
    write(d / f"review-{state}.json.gz", jsonl([
        {"user_id": f"{state}{k}", "gmap_id": f"0x{state}", "rating": 4,
         "time": 1000 * (k + 1), "text": "t"} for k in range(n)]))
    write(d / f"meta-{state}.json.gz", jsonl([
        {"gmap_id": f"0x{state}", "name": f"Shop {state}",
         "category": ["Store"]}]))
  rows = list(sources.read_dataset("google-local", str(d),
                                   report=ReadReport(strict=True)))
  assert [(r.user, r.title, r.timestamp) for r in rows] == [
      ("Alaska0", "Shop Alaska", 1), ("Alaska1", "Shop Alaska", 2),
      ("Hawaii0", "Shop Hawaii", 1)]
  only = list(sources.read_dataset("google-local", str(d), state="Hawaii",
                                   report=ReadReport()))
  assert [r.user for r in only] == ["Hawaii0"]
  pair = f"{d / 'review-Hawaii.json.gz'},{d / 'meta-Hawaii.json.gz'}"
  assert list(sources.read_dataset("google-local", pair,
                                   report=ReadReport())) == only
  assert [p.name for p in sources.source_files("google-local", str(d))] == [
      "review-Alaska.json.gz", "meta-Alaska.json.gz",
      "review-Hawaii.json.gz", "meta-Hawaii.json.gz"]


def test_amazon_single_reviews_file_finds_meta_next_to_it(tmp_path):
  d = tmp_path / "a"
  d.mkdir()
  write(d / "Books_5.json.gz", jsonl([
      {"reviewerID": "A", "asin": "x", "overall": 5, "unixReviewTime": 7}]))
  write(d / "meta_Books.json.gz", jsonl([{"asin": "x", "title": "Dune",
                                          "category": ["Books"]}]))
  rows = list(sources.read_dataset("amazon-2018", str(d / "Books_5.json.gz"),
                                   report=ReadReport(strict=True)))
  assert rows == [I("A", "x", 7, 5.0, "Dune", ("Books",))]


def test_recbole_several_inter_files_and_duplicates(tmp_path):
  d = tmp_path / "rb"
  d.mkdir()
  head = "user_id:token\titem_id:token\ttimestamp:float\n"
  write(d / "a.inter", head + "u\tx\t1\n")
  write(d / "b.inter", head + "v\ty\t2\n")
  write(d / "b.item", "item_id:token\ttitle:token_seq\n"
        "y\tFirst\ny\tSecond\n")
  with pytest.raises(DataFormatError, match="several .inter files"):
    sources.read_dataset("recbole", str(d), report=ReadReport())
  report = ReadReport()
  rows = list(sources.read_dataset("recbole", str(d), dataset="b",
                                   report=report))
  assert rows == [I("v", "y", 2, None, "First", ())]
  assert any("1 duplicate item row(s)" in n for n in report.notes)


def test_csv_field_over_size_limit_is_a_bad_row(tmp_path):
  d = tmp_path / "ml"
  d.mkdir()
  huge = "x" * 200_000  # Over csv's default field_size_limit (131072).
  write(d / "movies.csv", f'movieId,title,genres\n1,"{huge}",Drama\n'
        '2,"Fine, Title",Drama\n')
  write(d / "ratings.csv", "userId,movieId,rating,timestamp\n"
        f'1,"{huge}",3,900000004\n1,1,3,900000005\n1,2,4,900000006\n')
  report = ReadReport()
  rows = list(sources.read_ml_csv(d, report=report))
  assert rows == [I("1", "1", 900000005, 3.0, None, ()),
                  I("1", "2", 900000006, 4.0, "Fine, Title", ("Drama",))]
  assert report.by_reason == {"bad_csv": 2}
  assert report.examples[0].startswith(f"{d / 'movies.csv'}:2: unparsable")
  assert report.examples[1].startswith(f"{d / 'ratings.csv'}:2: unparsable")


def test_tfds_unprepared_dataset_is_a_clear_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataError, match=r"(?s)tfds:movielens/100k-ratings: "
                     r"cannot open split 'train'.*tfds build "
                     r"movielens/100k-ratings --file_format=array_record"):
    sources.read_dataset("tfds:movielens/100k-ratings", str(tmp_path),
                         report=ReadReport())


@pytest.mark.parametrize("reader", ["ml100k", "recbole"])
def test_fast_paths_check_rating_and_timestamp(tmp_path, reader):
  """Ratings -5, 200, 1e9 and numbers spelled 1_000 are bad rows with file:line on the
  fast paths too (as in _io.parse_rating); MovieLens also rejects pre-1995 timestamps."""
  d = tmp_path / reader
  d.mkdir()
  good = ["1\t10\t3\t881250949", "2\t11\t4.5\t881250950"]
  bad = ["3\t12\t-5\t881250951", "4\t13\t200\t881250952", "5\t14\t1e9\t881250953",
         "6\t15\t4\t881_250_954", "7\t16\t1_0\t881250955"]
  if reader == "ml100k":
    bad.append("8\t17\t4\t1000")
    write(d / "u.genre", "unknown|0\n")
    write(d / "u.item", "".join(f"{i}|T{i}|||u|0\n" for i in range(10, 18)))
    write(d / "u.data", "\n".join(good + bad) + "\n")
    read = lambda rep: sources.read_ml100k(d, report=rep)
    data, offset = d / "u.data", 1
  else:
    write(d / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
          + "\n".join(good + bad) + "\n")
    read = lambda rep: sources.read_recbole(d, report=rep)
    data, offset = d / "x.inter", 2
  report = ReadReport()
  rows = list(read(report))
  assert [(r.user, r.rating, r.timestamp) for r in rows] == [
      ("1", 3.0, 881250949), ("2", 4.5, 881250950)]
  assert report.rows_bad == len(bad), report.summary()
  assert [e.split(": ")[0] for e in report.examples] == [
      f"{data}:{i + len(good) + offset}" for i in range(len(bad))][:len(report.examples)]
