"""data-prep's handler on both buses: bad input fails the run once, a republish is one
run, and the stage is cached on the dataset's bytes, not its path or mtime."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

from lmforge.contracts import subjects
from lmforge.contracts.names import Header
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.quantization_request import read_overrides
from services.data_prep.handlers import DataPrepService
from tests.conftest import TEST_DATA


def _ready(run_id: str, uri: str, fmt: str = "text") -> ev.DatasetReady:
    return ev.DatasetReady(run_id=run_id, dataset_uri=uri, format=fmt, model_name="m")


def test_bad_dataset_requests_fail_with_the_path_and_the_rule(harness, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "sub").mkdir()
    cases = {
        "outside": ("/etc/passwd", "outside the allowed roots"),
        "missing": (str(tmp_path / "nope.jsonl"), "does not exist"),
        "emptydir": (str(tmp_path / "sub"), "holds no files"),
        "empty": (str(tmp_path / "empty.txt"), "no usable documents"),
        "format": (str(tmp_path / "empty.txt"), "format 'xml' is not supported"),
        "quantize": (str(tmp_path / "empty.txt"),
                     "quantization: --quantize awq is int4 only: --quantize-bits 8 needs "
                     "--quantize rtn"),
    }

    async def scenario():
        async with harness.service(DataPrepService, home=tmp_path / "home",
                                   data_roots=[tmp_path]):
            for run_id, (uri, _) in cases.items():
                fmt = "xml" if run_id == "format" else "text"
                event = _ready(run_id, uri, fmt)
                if run_id == "quantize":
                    event.quantization.method, event.quantization.bits = "awq", 8
                await harness.publish(event, run_id)
            failed = await harness.wait_for(subjects.STAGE_FAILED, len(cases))
            assert await harness.count(subjects.DATASET_PREPARED) == 0
        return {f.run_id: f for f in failed}

    failed = asyncio.run(scenario())
    for run_id, (_uri, rule) in cases.items():
        assert rule in failed[run_id].reason, failed[run_id].reason
        assert failed[run_id].stage == "data-prep" and not failed[run_id].dead_lettered
    assert "'/etc/passwd'" in failed["outside"].reason


def test_the_runs_quantization_choices_travel_with_its_dataset(harness, tmp_path):
    plain = _ready("plain", str(TEST_DATA / "fortunes-sample.txt"))
    asking = _ready("asking", str(TEST_DATA / "fortunes-sample.txt"))
    asking.quantization.method, asking.quantization.on_gate_failure = "rtn", "serve-fp"
    asking.quantization.max_ppl_increase = 0.0

    async def scenario():
        async with harness.service(DataPrepService, home=tmp_path / "home",
                                   data_roots=[TEST_DATA], dataprep_vocab_size=512,
                                   dataprep_semantic=False) as service:
            await harness.publish(plain, "plain")
            (first,) = await harness.wait_for(subjects.DATASET_PREPARED, 1, run_id="plain")
            await harness.publish(asking, "asking")
            (second,) = await harness.wait_for(subjects.DATASET_PREPARED, 1, run_id="asking")
            return (service.store.get_dir(first.dataset.digest),
                    service.store.get_dir(second.dataset.digest))

    plain_dir, asking_dir = asyncio.run(scenario())
    assert read_overrides(plain_dir) == {}
    # Not the same cached dataset: the request is part of what the stage is keyed on.
    assert plain_dir != asking_dir
    assert read_overrides(asking_dir) == {"method": "rtn", "on_gate_failure": "serve-fp",
                                          "max_ppl_increase": 0.0}


def test_same_dataset_ready_twice_is_one_run(harness, tmp_path):
    event = _ready("twice", str(TEST_DATA / "fortunes-sample.txt"))

    async def scenario():
        async with harness.service(DataPrepService, home=tmp_path / "home",
                                   data_roots=[TEST_DATA], dataprep_vocab_size=512,
                                   dataprep_semantic=False):
            await harness.publish(event, "twice:dataset.ready")
            await harness.publish(event, "twice:dataset.ready")
            (prepared,) = await harness.wait_for(subjects.DATASET_PREPARED, 1)
            # Outside the dedup window a republish carries a new msg id: still one run.
            await harness.publish(event, "twice:dataset.ready:later")
            assert await harness.count(subjects.DATASET_PREPARED) == 1
        return prepared

    prepared = asyncio.run(scenario())
    assert prepared.stats.records_read == 1429
    assert prepared.stats.train_tokens > 10_000
    assert prepared.dataset.digest.startswith("sha256:")


def test_touched_or_copied_data_is_reused_and_one_changed_byte_is_prepared_again(
        harness, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    original = data / "corpus.txt"
    shutil.copy(TEST_DATA / "fortunes-sample.txt", original)

    async def prepare(run_id: str, path) -> tuple[ev.DatasetPrepared, dict[str, str]]:
        await harness.publish(_ready(run_id, str(path)), run_id)
        (prepared,) = await harness.wait_for(subjects.DATASET_PREPARED, 1, run_id=run_id)
        (headers,) = await harness.headers(subjects.DATASET_PREPARED, run_id)
        return prepared, headers

    async def scenario():
        async with harness.service(DataPrepService, home=tmp_path / "home",
                                   data_roots=[data], dataprep_vocab_size=512,
                                   dataprep_semantic=False) as service:
            first, _ = await prepare("first", original)
            stored = sorted(p.name for p in (service.store.root / "sha256").iterdir())
            os.utime(original)  # touched: a new mtime, the same bytes
            touched, touched_h = await prepare("touched", original)
            copy = data / "elsewhere" / "copy.txt"
            copy.parent.mkdir()
            shutil.copy(original, copy)
            copied, copied_h = await prepare("copied", copy)
            assert sorted(p.name for p in (service.store.root / "sha256").iterdir()) == stored
            with original.open("r+b") as f:  # one byte changed
                f.seek(100)
                byte = f.read(1)
                f.seek(100)
                f.write(b"Q" if byte != b"Q" else b"R")
            changed, changed_h = await prepare("changed", original)
            return first, (touched, touched_h), (copied, copied_h), (changed, changed_h)

    first, touched, copied, changed = asyncio.run(scenario())
    for reused, headers in (touched, copied):
        assert headers[Header.CACHED_FROM] == "first"
        assert reused.dataset.digest == first.dataset.digest
        assert reused.stats == first.stats
    assert copied[0].run_id == "copied"
    assert Header.CACHED_FROM not in changed[1]
    assert changed[0].dataset.digest != first.dataset.digest


def test_a_later_run_of_the_same_model_drops_near_copies_of_what_it_was_prepared_from(
        harness, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    base = [f"Record {i}: the quarterly report for region {i} shows steady growth in sales "
            f"and a modest rise in support tickets, mostly about billing {i}." for i in range(40)]
    (data / "first.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in base))
    # The second export repeats ten records with one word changed, and adds new ones.
    again = [t.replace("modest", "small") for t in base[:10]] + [
        f"New topic {i}: the migration plan moves every service {i} to the new cluster in "
        f"three phases with a rollback step after each one of them {i}." for i in range(30)]
    (data / "second.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in again))

    async def scenario():
        async with harness.service(DataPrepService, home=tmp_path / "home", data_roots=[data],
                                   dataprep_vocab_size=300, dataprep_seq_len=32,
                                   dataprep_near_dup_earlier_runs=True, dataprep_semantic=False,
                                   dataprep_near_dup_threshold=0.5):
            await harness.publish(ev.DatasetReady(run_id="one", model_name="acme", format="",
                                                  dataset_uri=str(data / "first.jsonl")), "one")
            await harness.wait_for(subjects.DATASET_PREPARED, 1, run_id="one")
            await harness.publish(ev.DatasetReady(run_id="two", model_name="acme", format="",
                                                  dataset_uri=str(data / "second.jsonl")), "two")
            (second,) = await harness.wait_for(subjects.DATASET_PREPARED, 1, run_id="two")
            return second

    second = asyncio.run(scenario())
    assert second.stats.dropped["near_dup.seen_before"] == 10
    assert second.stats.records_kept == 30


def test_an_earlier_dataset_without_a_near_dup_index_is_reported_not_silently_skipped(
        harness, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    texts = [f"Ticket {i}: the printer on floor {i} jams whenever a long report is sent "
             f"to it after lunch, and the queue then stalls for everyone {i}." for i in range(30)]
    (data / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    home = tmp_path / "home"

    async def prepare(run_id, **settings):
        async with harness.service(DataPrepService, home=home, data_roots=[data],
                                   dataprep_vocab_size=300, dataprep_seq_len=32,
                                   dataprep_near_dup_earlier_runs=True, dataprep_semantic=False,
                                   **settings):
            await harness.publish(ev.DatasetReady(run_id=run_id, model_name="acme", format="",
                                                  dataset_uri=str(data / "a.jsonl")), run_id)
            (prepared,) = await harness.wait_for(subjects.DATASET_PREPARED, 1, run_id=run_id)
            return prepared

    async def scenario():
        first = await prepare("one", dataprep_near_dup=False)
        second = await prepare("two")
        return first, second

    first, second = asyncio.run(scenario())
    assert "near_dup.earlier_index_missing" not in first.stats.tallies
    assert second.stats.tallies["near_dup.earlier_index_missing"] == 1
    assert "has no near-dup index" in caplog.text


def test_a_prepared_dataset_is_counted_on_metrics_as_its_event_says(harness, tmp_path):
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    data = tmp_path / "data"
    data.mkdir()
    text = (TEST_DATA / "fortunes-sample.txt").read_text()
    planted = ("Thank you for the long letter about the engine and its cards. Write to me at "
               "ada.lovelace@analytical-engines.co.uk when the new drawings are ready, or call "
               "me on +1 415 555 0132 any afternoon this week, and we shall talk it over.")
    (data / "corpus.txt").write_text(f"{text}\n%\n{planted}\n%\n{planted}\n")
    before = {"in": value("lmforge_dataprep_documents_in_total"),
              "dup": value("lmforge_dataprep_documents_out_total", outcome="dropped",
                           reason="clean.exact_duplicate"),
              "email": value("lmforge_dataprep_pii_found_total", type="EMAIL")}

    async def scenario():
        async with harness.service(DataPrepService, home=tmp_path / "home", data_roots=[data],
                                   dataprep_vocab_size=512, dataprep_semantic=False):
            await harness.publish(_ready("metered", str(data / "corpus.txt")), "metered")
            (prepared,) = await harness.wait_for(subjects.DATASET_PREPARED, 1)
        return prepared

    stats = asyncio.run(scenario()).stats
    assert value("lmforge_dataprep_documents_in_total") - before["in"] == stats.records_read
    assert stats.dropped["clean.exact_duplicate"] >= 1
    assert value("lmforge_dataprep_documents_out_total", outcome="dropped",
                 reason="clean.exact_duplicate") - before["dup"] == \
        stats.dropped["clean.exact_duplicate"]
    assert stats.tallies["pii.EMAIL"] >= 1
    assert value("lmforge_dataprep_pii_found_total", type="EMAIL") - before["email"] == \
        stats.tallies["pii.EMAIL"]
    assert value("lmforge_dataprep_pii_found_total", type="documents_scrubbed") == 0
    kept = value("lmforge_dataprep_documents_out_total", outcome="kept", reason="train") + \
        value("lmforge_dataprep_documents_out_total", outcome="kept", reason="heldout")
    assert kept >= stats.records_kept > 0


def test_dataset_ready_carries_the_chat_template_and_packing_to_the_dataset(harness, tmp_path):
    """The run's --chat-template and --packing (TrainingRequest 20, 22) reach data-prep: a
    from-scratch tokenizer has no template, so without the run's the data is refused."""
    data = tmp_path / "data" / "chat.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"prompt": f"What follows {i}?",
                                        "response": f"{i + 1} follows {i}."}) + "\n"
                            for i in range(40)))
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    asked = ev.DatasetReady(run_id="chat", dataset_uri=str(data), format="jsonl",
                            model_name="m", training=ev.TrainingRequest(
                                chat_template=template, packing="unpacked"))
    bare = ev.DatasetReady(run_id="bare", dataset_uri=str(data), format="jsonl",
                           model_name="m")

    async def scenario():
        async with harness.service(DataPrepService, home=tmp_path / "home",
                                   data_roots=[data.parent], dataprep_vocab_size=300,
                                   dataprep_semantic=False, dataprep_quality=False) as service:
            await harness.publish(asked, "chat")
            (prepared,) = await harness.wait_for(subjects.DATASET_PREPARED, 1, run_id="chat")
            meta = json.loads((service.store.get_dir(prepared.dataset.digest)
                               / "dataset.json").read_text())
            await harness.publish(bare, "bare")
            (failed,) = await harness.wait_for(subjects.STAGE_FAILED, 1, run_id="bare")
        return meta, failed

    meta, failed = asyncio.run(scenario())
    assert meta["chat"] == {"packing": "unpacked", "template": "user"}
    assert meta["train"]["loss_mask"] is True
    assert "no chat template" in failed.reason
