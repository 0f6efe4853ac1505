"""meswitch.data.loading: every text set read through `datasets`, or the built-in reader where it is absent.

The two readers must agree on the files both can read (the GPU worker has no `datasets`); `datasets` alone reads
the rest: parquet and csv files, folders saved with save_to_disk, folders of data files, dataset ids in the local
Hugging Face cache (nothing is fetched from the Hub here), streamed with a limit.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import ClassVar

import pytest
import yaml

from meswitch.artifacts import sha256_file
from meswitch.compression.calibration import read_texts
from meswitch.data.loading import DataError, DataNotFound, DataSource, fingerprint, load_rows, load_texts
from meswitch.evaluation.metrics import EvalData
from meswitch.expert_card import CardError, load_card
from meswitch.routing.dataset import RoutingDataError, read_labelled

ROWS = [
    {"text": "first text", "prompt": "2 + 2 =", "answer": 4},
    {"text": "zweiter Text, ünïcödé \u2028 and a line separator inside", "score_from": 3},
    {"text": "third", "answer": 12, "metric": "final-number-exact-match", "prompt": "p", "extra": {"a": 1}},
    {"text": "  spaced  ", "domain": "math"},
]


@pytest.fixture(params=["datasets", "built-in"])
def reader(request, monkeypatch):
    """Each test twice: through `datasets`, and with it hidden (as on the GPU worker)."""
    if request.param == "datasets":
        pytest.importorskip("datasets")
    else:
        monkeypatch.setitem(sys.modules, "datasets", None)
    return request.param


def hide_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)


@pytest.fixture
def files(tmp_path):
    """The same rows as JSON lines (a BOM, blank lines), a JSON array, and a text file (CRLF, blank lines)."""
    lines = [json.dumps(r, ensure_ascii=False) for r in ROWS]
    (tmp_path / "rows.jsonl").write_text("\ufeff" + lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n  \n", "utf-8")
    (tmp_path / "rows.json").write_text(json.dumps(ROWS, ensure_ascii=False), "utf-8")
    (tmp_path / "lines.txt").write_bytes(b"one text\r\n\r\n   \ntwo\ttexts \x0c here\nlast")
    return tmp_path


def read_everything(folder):
    """What every caller of the loader gets from the files (rows, texts, evaluation data, labelled queries)."""
    optional = ("prompt", "answer", "score_from", "metric", "domain")
    out = {
        "rows": [load_rows(folder / name, optional=optional) for name in ("rows.jsonl", "rows.json")],
        "texts": [load_texts(folder / name) for name in ("rows.jsonl", "rows.json", "lines.txt")],
        "limited": load_texts(DataSource(str(folder / "lines.txt"), limit=1)),
        "all": load_rows(folder / "rows.jsonl", every_field=True),
        "eval": EvalData.load(folder / "rows.jsonl"),
        "fingerprint": fingerprint(DataSource(str(folder / "rows.jsonl"), limit=3)),
    }
    (folder / "q.jsonl").write_text("".join(json.dumps({"text": f"q{i}", "domain": "d"}) + "\n" for i in range(3)))
    out["labelled"] = read_labelled(folder / "q.jsonl")
    return out


@pytest.fixture
def warnings_logged():
    """The loader's warnings (Prefect's logging setup replaces the root handlers caplog reads: listen on the logger)."""
    logged: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("meswitch.data.loading").addHandler(handler)
    yield logged
    logging.getLogger("meswitch.data.loading").removeHandler(handler)


def test_both_readers_give_the_same_rows(files, monkeypatch, warnings_logged):
    pytest.importorskip("datasets")
    with_datasets = read_everything(files)
    assert not warnings_logged  # `datasets` read every file itself
    hide_datasets(monkeypatch)
    assert read_everything(files) == with_datasets
    assert with_datasets["texts"] == [[r["text"] for r in ROWS]] * 2 + [["one text", "two\ttexts \x0c here", "last"]]
    assert with_datasets["limited"] == ["one text"]
    assert with_datasets["rows"][0][0] == {"text": "first text", "prompt": "2 + 2 =", "answer": 4, "score_from": None,
                                           "metric": None, "domain": None}  # fmt: skip
    assert with_datasets["all"][2] == {"text": "third", "answer": 12, "metric": "final-number-exact-match",
                                       "prompt": "p", "extra": {"a": 1}}  # fmt: skip
    data = with_datasets["eval"]
    assert data.score_from == [0, 3, 0, 0] and [t.answer for t in data.tasks] == ["4", "12"]


def test_a_file_that_trips_datasets_is_read_all_the_same(tmp_path, warnings_logged):
    """datasets 5.2's JSON reader fails on blank lines in a file whose fields change type between rows."""
    pytest.importorskip("datasets")
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "answer": 4}\n\n{"text": "b", "answer": "x"}\n')
    assert load_rows(path, optional=("answer",)) == [{"text": "a", "answer": 4}, {"text": "b", "answer": "x"}]
    assert any("read by the built-in reader; `datasets` could not" in w for w in warnings_logged)


def test_a_plain_file_is_fingerprinted_by_its_bytes_as_before(files, reader):
    path = files / "rows.jsonl"
    assert fingerprint(path) == sha256_file(path)  # the pipeline's cache keys of earlier runs still hold
    assert fingerprint(DataSource(str(path), limit=2)) != fingerprint(DataSource(str(path), limit=3))
    assert fingerprint(DataSource(str(path), limit=2)) == fingerprint(DataSource(str(path), limit=2))


def test_errors_name_the_file_and_line_whichever_reader(tmp_path, reader):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: expected a JSON object with a 'text' field \(Expecting"):
        read_texts(bad)
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object with a 'text' field$"):
        load_texts(bad)
    bad.write_text('{"text": "ok", "domain": "a"}\n{"text": "b", "domain": 3}\n')
    with pytest.raises(RoutingDataError, match=r"bad\.jsonl:2: field 'domain' must be a string, not int"):
        read_labelled(bad)
    bad.write_text('{"text": "ok", "prompt": "p", "answer": 1, "metric": "nope"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: unknown task metric 'nope'"):
        EvalData.load(bad)
    bad.write_text("\n  \n")
    with pytest.raises(DataError, match=r"bad\.jsonl: no texts"):
        load_texts(bad)
    bad.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl"):
        load_texts(bad)
    with pytest.raises(DataNotFound, match=r"missing\.jsonl: not found") as missing:
        load_texts(tmp_path / "missing.jsonl")
    assert isinstance(missing.value, FileNotFoundError)  # as the hand-written readers raised
    (tmp_path / "ok.jsonl").write_text('{"text": "ok"}\n')
    with pytest.raises(DataError, match="a single file holds one split, 'train', not 'test'"):
        load_texts(DataSource(str(tmp_path / "ok.jsonl"), split="test"))


def test_without_datasets_only_local_json_and_text_files_are_read(tmp_path, monkeypatch):
    hide_datasets(monkeypatch)
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"needs the `datasets` library \(pip install 'meswitch\[data\]'\)"):
        load_texts(tmp_path / "rows.parquet")
    with pytest.raises(DataError, match="dataset id 'someone/some-set' needs the `datasets` library"):
        load_texts("someone/some-set")
    with pytest.raises(DataError, match="a folder needs the `datasets` library"):
        load_texts(tmp_path)


# -- what only `datasets` reads ---------------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A dataset id, ``meswitch-test/tiny`` (splits train and test, fields ``content`` and ``label``), present in
    the local Hugging Face cache as `load_dataset` leaves it, with the Hub offline: nothing is fetched."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json, JsonConfig

    for split, n in (("train", 5), ("test", 2)):
        rows = [{"content": f"{split} text {i}", "label": i % 2} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = DataFilesDict.from_patterns({s: [str(tmp_path / f"{s}.jsonl")] for s in ("train", "test")})

    class Tiny(Json):
        BUILDER_CONFIGS: ClassVar = [JsonConfig(name="default", data_files=files)]

    cache = tmp_path / "hf-datasets"
    Tiny(cache_dir=str(cache), dataset_name="tiny", hash="0123abcd").download_and_prepare()
    (cache / "tiny").rename(cache / "meswitch-test___tiny")  # where a namespaced id is cached
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


def test_a_dataset_id_in_the_local_cache_by_split_and_field(hub_cache):
    source = DataSource("meswitch-test/tiny", split="test", field="content", by_id=True)
    assert load_texts(source) == ["test text 0", "test text 1"]
    assert DataSource.of("meswitch-test/tiny") == DataSource("meswitch-test/tiny", by_id=True)
    streamed = DataSource("meswitch-test/tiny", field="content", streaming=True, limit=3, by_id=True)
    assert load_texts(streamed) == ["train text 0", "train text 1", "train text 2"]
    with pytest.raises(DataNotFound, match=r"no dataset 'meswitch-test/missing' in the Hugging Face cache"):
        load_texts(DataSource("meswitch-test/missing", by_id=True))
    with pytest.raises(DataError, match=r"no field 'text'; its fields: content, label"):
        load_texts(DataSource("meswitch-test/tiny", by_id=True))
    with pytest.raises(DataError, match="validation"):
        load_texts(DataSource("meswitch-test/tiny", split="validation", field="content", by_id=True))


def test_parquet_csv_saved_and_data_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["a", "b", "c"], "domain": ["x", "y", "x"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_dict(rows).to_csv(str(tmp_path / "rows.csv"), index=False)
    for name in ("rows.parquet", "rows.csv"):
        assert [(e.text, e.domain) for e in read_labelled(tmp_path / name)] == list(zip(*rows.values(), strict=True))
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(
        {"text": ["held out"], "domain": ["x"]})})  # fmt: skip
    saved.save_to_disk(str(tmp_path / "saved"))
    assert load_texts(DataSource(str(tmp_path / "saved"), split="test")) == ["held out"]
    assert load_texts(DataSource(str(tmp_path / "saved"), streaming=True, limit=2)) == ["a", "b"]
    with pytest.raises(DataError, match="no split 'dev'; its splits: train, test"):
        load_texts(DataSource(str(tmp_path / "saved"), split="dev"))
    (tmp_path / "folder").mkdir()
    for split in ("train", "test"):
        (tmp_path / "folder" / f"{split}.jsonl").write_text(json.dumps({"text": f"{split} row"}) + "\n")
    assert load_texts(DataSource(str(tmp_path / "folder"), split="test")) == ["test row"]
    write_card(tmp_path, evaluation={"dataset": "saved", "split": "test"})  # a card names a folder beside it
    assert EvalData.load(load_card(tmp_path).evaluation_data).texts == ["held out"]


# -- the expert card names a data set ------------------------------------------------------------------------------


def write_card(folder, **data):
    folder.mkdir(exist_ok=True)
    (folder / "expert.yaml").write_text(yaml.safe_dump({"name": "e", "domain": "d", "description": "x", **data}))


def test_a_card_names_a_dataset_file_or_folder_in_the_expert_folder(tmp_path, reader):
    folder = tmp_path / "expert"
    write_card(folder, calibration={"dataset": "data/calib.jsonl", "field": "body", "limit": 2}, evaluation="default")
    (folder / "data").mkdir()
    (folder / "data" / "calib.jsonl").write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(5)))
    card = load_card(folder)
    assert card.calibration_path == folder / "data" / "calib.jsonl"
    assert read_texts(card.calibration_data) == ["text 0", "text 1"]
    write_card(folder, calibration={"dataset": "data/calib.jsonl"})
    with pytest.raises(DataError, match=rf"{folder}/data/calib\.jsonl:1: expected a JSON object with a 'text' field"):
        read_texts(load_card(folder).calibration_data)  # the line of the file in the expert folder
    write_card(folder, calibration={"dataset": "data/missing.jsonl"})
    with pytest.raises(DataNotFound, match=rf"{folder}/expert\.yaml \(calibration dataset 'data/missing\.jsonl'\): "
                                           "not found"):  # fmt: skip
        read_texts(load_card(folder).calibration_data)


def test_a_card_names_a_dataset_id(hub_cache):
    folder = hub_cache.parent / "expert"
    write_card(folder, calibration={"dataset": "meswitch-test/tiny", "field": "content", "split": "test"})
    card = load_card(folder)
    assert card.calibration_path is None and read_texts(card.calibration_data) == ["test text 0", "test text 1"]
    write_card(folder, calibration={"dataset": "meswitch-test/nothing"})
    with pytest.raises(DataNotFound) as e:
        read_texts(load_card(folder).calibration_data)
    # the message names the expert folder and everything that was looked for
    assert f"{folder}/expert.yaml (calibration dataset 'meswitch-test/nothing', looked for in {folder} and as a " \
           "dataset id): not a local file or folder, and no dataset 'meswitch-test/nothing' in the Hugging Face " \
           f"cache ({hub_cache})" in str(e.value)  # fmt: skip
    write_card(folder, evaluation={"dataset": "meswitch-test/tiny"})
    with pytest.raises(DataError, match=r"expert\.yaml \(evaluation dataset 'meswitch-test/tiny', .*\): no field "
                                        "'text'; its fields: content, label"):  # fmt: skip
        EvalData.load(load_card(folder).evaluation_data)


def test_the_pipeline_reads_a_card_that_names_a_dataset(hub_cache):
    from meswitch.flows.tasks import read_card

    folder = hub_cache.parent / "expert"
    write_card(folder, calibration={"dataset": "meswitch-test/tiny", "field": "content"}, evaluation="default")
    refused = read_card.fn(str(folder))
    assert refused.card is None and "too little calibration text" in refused.error  # 5 short rows
    assert "(calibration dataset 'meswitch-test/tiny'" in refused.error
    write_card(folder, calibration={"dataset": "meswitch-test/gone"}, evaluation="default")
    refused = read_card.fn(str(folder))
    assert refused.error.startswith(f"calibration data: {folder}/expert.yaml (calibration dataset 'meswitch-test/gone'")


def test_card_dataset_entries_are_checked(tmp_path):
    folder = tmp_path / "expert"
    for entry, message in [
        ({"dataset": "x.jsonl", "splt": "train"}, r"calibration: unknown keys \['splt'\]"),
        ({"split": "train"}, "calibration: 'dataset' names the data set"),
        ({"dataset": "x.jsonl", "limit": 0}, "limit must be a positive number of rows"),
        ({"dataset": "x.jsonl", "streaming": "yes"}, "streaming must be a bool"),
        ({"dataset": "/etc/passwd"}, "must be a relative path inside the expert folder"),
        ({"dataset": "../elsewhere/data"}, "must be a relative path inside the expert folder"),
        (["calib.jsonl"], "calibration must be a file name, 'default', or"),
    ]:
        write_card(folder, calibration=entry)
        with pytest.raises(CardError, match=message):
            load_card(folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "train.jsonl").write_text('{"text": "secret"}\n')
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").symlink_to(outside / "train.jsonl")
    write_card(folder, calibration={"dataset": "data"})
    with pytest.raises(CardError, match=r"data/train\.jsonl: a link to .*outside/train\.jsonl, outside the expert"):
        load_card(folder)
