"""VQA loaders on every real layout, metric suites on hand-computed cases, scoring LLaVA-Med files,
and a tiny model finetuned and evaluated end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from downstream.datasets import DatasetLayoutError, load_vqa, to_conversations
from downstream.metrics import Item, evaluate_items, llava_normalize, paired_difference, summarize
from downstream.synthetic import (VQAItem, write_hf_parquet, write_llava_med_json, write_pathvqa_original, write_slake,
                                  write_vqa_rad_original)
from medvlm.imaging import load_image
from medvlm.sample_images import sample_path


def _items() -> list[VQAItem]:
    ct = load_image(sample_path("CT_small.dcm", "pydicom"))
    mr = load_image(sample_path("MR_small.dcm", "pydicom"))
    items = []
    for split, image, name, modality in (("train", ct, "ct_a", "CT"), ("train", mr, "mr_a", "MRI"),
                                         ("test", ct.rotate(90), "ct_b", "CT"), ("test", mr.rotate(90), "mr_b", "MRI")):
        items += [
            VQAItem(image, name, "Is this a CT scan?", "yes" if modality == "CT" else "no", "CLOSED", split,
                    {"organ": "HEAD", "question_type": "MODALITY", "modality": modality}),
            VQAItem(image, name, "What modality is shown?", modality, "OPEN", split,
                    {"organ": "HEAD", "question_type": "MODALITY", "modality": modality}),
            VQAItem(image, name, "Is there a fracture?", "no", "CLOSED", split, {"organ": "HEAD", "question_type": "ABN"}),
        ]
    return items


def test_vqa_rad_original_layout(tmp_path):
    write_vqa_rad_original(tmp_path, _items())
    test, report = load_vqa("vqa-rad", tmp_path, "test")
    assert report.layout == "vqa-rad-original" and len(test) == 6
    assert {r.answer_type for r in test} == {"closed", "open"}
    assert test[0].metadata["question_type"] == "MODALITY" and test[0].metadata["image_organ"] == "HEAD"
    train, _ = load_vqa("vqa-rad", tmp_path, "train")
    assert len(train) == 6 and all(Path(r.image).is_file() for r in train)


def test_vqa_rad_and_pathvqa_hugging_face_parquet(tmp_path):
    for dataset in ("vqa-rad", "pathvqa"):
        root = write_hf_parquet(tmp_path / dataset, _items())
        test, report = load_vqa(dataset, root, "test")
        assert report.layout == "hf-parquet" and len(test) == 6
        # no answer_type in the export: closed = a yes/no answer
        assert [r.answer_type for r in test] == ["closed", "open", "closed"] * 2
        assert all(Path(r.image).is_file() for r in test)


def test_slake_english_by_default(tmp_path):
    write_slake(tmp_path, _items())
    english, report = load_vqa("slake", tmp_path, "test")
    assert report.layout == "slake" and len(english) == 6
    assert all(r.metadata["q_lang"] == "en" for r in english)
    both, _ = load_vqa("slake", tmp_path, "test", lang="all")
    assert len(both) == 12


def test_pathvqa_original_pickles(tmp_path):
    write_pathvqa_original(tmp_path, _items())
    test, report = load_vqa("pathvqa", tmp_path, "test")
    assert report.layout == "pathvqa-original" and len(test) == 6
    assert test[1].answer == "CT" and test[1].answer_type == "open"


def test_pathvqa_pickle_with_code_is_refused(tmp_path):
    import os
    import pickle

    write_pathvqa_original(tmp_path, _items())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "qas" / "test" / "test_qa.pkl", "wb") as fh:
        pickle.dump([Evil()], fh)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_vqa("pathvqa", tmp_path, "test")


def test_llava_med_converted_json(tmp_path):
    path = write_llava_med_json(tmp_path / "test.json", [i for i in _items() if i.split == "test"], tmp_path / "images")
    records, report = load_vqa("vqa-rad", path, "test")
    assert report.layout == "llava-med-json" and len(records) == 6
    assert records[0].question == "Is this a CT scan?" and records[0].answer_type == "closed"


def test_missing_image_is_counted_not_dropped_silently(tmp_path):
    write_vqa_rad_original(tmp_path, _items())
    (tmp_path / "VQA_RAD Image Folder" / "ct_b.jpg").unlink()
    records, report = load_vqa("vqa-rad", tmp_path, "test")
    assert len(records) == 3 and report.skipped == {"image_missing": 3}


def test_wrong_root_lists_what_was_expected(tmp_path):
    with pytest.raises(DatasetLayoutError, match="VQA_RAD Dataset Public.json"):
        load_vqa("vqa-rad", tmp_path, "test")


# ------------------------------------------------------------------------------------ metrics
def test_llava_normalization_quirks():
    assert llava_normalize("no, there is no nodule.") == "no there is no nodule"
    assert llava_normalize("the answer is: yes!") == "answer is: yes"
    assert llava_normalize("t1-weighted mri (axial)") == "t1 weighted mri axial"
    assert llava_normalize("one") == "1" and llava_normalize("3.5 cm.") == "3.5 cm"
    assert llava_normalize("dont know") == "don't know" and llava_normalize("a.b.c") == "abc"


def _suite(items, suite, **kw):
    return summarize(items, suite, **kw)


def test_closed_suites_differ_where_llava_med_is_lenient():
    items = [
        Item("1", "Yes", "yes", "closed"),                    # right everywhere
        Item("2", "No", "yes", "closed"),                     # wrong: 2023 drops it from the denominator
        Item("3", "There is a nodule.", "no", "closed"),      # "no" inside "nodule": llava_med counts a hit
        Item("4", "It is supratentorial.", "supratentorial", "closed"),  # closed, not yes/no: llava_med misses it
        Item("5", "Maybe.", "yes", "closed"),                 # no yes/no at all: a miss everywhere
    ]
    assert _suite(items, "llava_med")["closed_accuracy"] == 40.0          # 1, 3 of 5
    assert _suite(items, "llava_med_2023")["closed_accuracy"] == 50.0     # 1, 3 of 4 (2 dropped)
    assert _suite(items, "llava_med_2023")["n_closed_counted"] == 4
    assert _suite(items, "strict")["closed_accuracy"] == 40.0             # 1, 4 of 5
    assert evaluate_items([Item("x", "yes and no", "no", "closed")], ["strict"])["suites"]["strict"]["closed_accuracy"] == 0.0


def test_open_metrics_with_partial_overlap():
    items = [Item("1", "left upper lobe of the lung", "left lung", "open")]
    llava = _suite(items, "llava_med", candidates=["left lung", "right lung", "liver"])
    # prediction words: left upper lobe of lung (5, "the" dropped); truth words: left lung
    assert llava["open_recall"] == 100.0 and llava["open_precision"] == 40.0
    assert llava["open_f1"] == pytest.approx(100 * 2 * 0.4 / 1.4, abs=0.01)
    assert llava["open_exact_match"] == 40.0                # 2 truth words found ÷ 5 prediction words
    assert llava["open_candidate_accuracy"] == 100.0        # nearest candidate: "left lung"
    strict = _suite(items, "strict")
    assert strict["open_exact_match"] == 0.0 and strict["open_recall"] == 100.0
    assert strict["open_precision"] == pytest.approx(40.0)


def test_every_metric_has_a_bootstrap_interval():
    items = [Item(str(i), "yes" if i % 3 else "no", "yes", "closed") for i in range(60)]
    result = _suite(items, "strict")
    low, high = result["closed_accuracy_ci"]
    assert low < result["closed_accuracy"] < high and 0 <= low and high <= 100


def test_paired_difference_of_two_runs():
    a = [Item(str(i), "no", "yes", "closed") for i in range(30)]
    b = [Item(str(i), "yes", "yes", "closed") for i in range(30)]
    d = paired_difference(a, b, "strict", "closed_accuracy")
    assert d["difference"] == 100.0 and d["ci"] == [100.0, 100.0]


def _llava_med_files(tmp_path):
    gt = [{"id": "q1", "image": "a.jpg", "answer_type": "CLOSED",
           "conversations": [{"from": "human", "value": "<image>\nIs there a nodule?"}, {"from": "gpt", "value": "no"}]},
          {"id": "q2", "image": "b.jpg", "answer_type": "OPEN",
           "conversations": [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "left lung"}]},
          {"id": "q3", "image": "c.jpg", "answer_type": "CLOSED",
           "conversations": [{"from": "human", "value": "<image>\nNormal?"}, {"from": "gpt", "value": "yes"}]}]
    preds = [{"question_id": "q3", "prompt": "Normal?", "text": "No.", "answer_id": "x", "model_id": "m"},
             {"question_id": "q1", "prompt": "Is there a nodule?", "text": "There is a nodule.", "answer_id": "y"},
             {"question_id": "q2", "prompt": "Where?", "text": "The left lung.", "answer_id": "z"}]
    (tmp_path / "test.json").write_text(json.dumps(gt))
    (tmp_path / "answers.jsonl").write_text("\n".join(map(json.dumps, preds)) + "\n")
    (tmp_path / "candidates.json").write_text(json.dumps({"0": ["left lung", "right lung", "yes", "no"]}))
    return tmp_path / "answers.jsonl", tmp_path / "test.json", tmp_path / "candidates.json"


def test_eval_score_reads_llava_med_files_order_independent(tmp_path, capsys):
    from medvlm.cli import main

    pred, gt, cand = _llava_med_files(tmp_path)
    assert main(["eval", "score", "--pred", str(pred), "--gt", str(gt), "--candidates", str(cand), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    llava = out["suites"]["llava_med"]
    assert llava["closed_accuracy"] == 50.0          # q1 "nodule" hit (quirk), q3 wrong
    assert out["suites"]["llava_med_2023"]["closed_accuracy"] == 100.0   # q3 dropped
    assert out["suites"]["strict"]["closed_accuracy"] == 0.0
    assert llava["open_recall"] == 100.0 and llava["open_exact_match"] == 100.0
    assert llava["open_candidate_accuracy"] == 100.0
    assert (llava["n_closed"], llava["n_open"]) == (2, 1)


def test_eval_score_names_a_missing_id(tmp_path):
    from downstream.evaluate import ScoreInputError, score_files

    pred, gt, _ = _llava_med_files(tmp_path)
    pred.write_text("\n".join(pred.read_text().splitlines()[:2]) + "\n")
    with pytest.raises(ScoreInputError, match="q2"):
        score_files(pred, gt)


def _with_repeated_id(tmp_path, answer_texts):
    """q1 asked twice (two different closed questions under one id), answered in file order."""
    pred, gt, _ = _llava_med_files(tmp_path)
    records = json.loads(gt.read_text())
    records.append({**records[0], "conversations": [records[0]["conversations"][0], {"from": "gpt", "value": "yes"}]})
    gt.write_text(json.dumps(records))
    lines = [json.loads(line) for line in pred.read_text().splitlines()]
    lines = [row for row in lines if row["question_id"] != "q1"]
    lines += [{"question_id": "q1", "text": text} for text in answer_texts]
    pred.write_text("".join(json.dumps(row) + "\n" for row in lines))
    return pred, gt


def test_eval_score_pairs_a_repeated_id_by_occurrence(tmp_path):
    from downstream.evaluate import score_files

    pred, gt = _with_repeated_id(tmp_path, ["no", "yes"])     # 1st q1 (gt no) ← "no", 2nd q1 (gt yes) ← "yes"
    result = score_files(pred, gt)
    assert result["suites"]["strict"]["closed_accuracy"] == round(100 * 2 / 3, 2)   # q3 answered "No." is wrong
    assert result["suites"]["strict"]["n_closed"] == 3
    assert result["repeated_ids"]["ids"] == ["q1"]


def test_eval_score_refuses_a_repeated_answer_for_one_question(tmp_path):
    from downstream.evaluate import ScoreInputError, score_files

    pred, gt, _ = _llava_med_files(tmp_path)
    with open(pred, "a") as fh:
        fh.write(json.dumps({"question_id": "q2", "text": "right lung"}) + "\n")   # last-one-wins would score this
    with pytest.raises(ScoreInputError, match=r"repeated ids with unequal counts \['q2 \(2 answers, 1 questions\)'\]"):
        score_files(pred, gt)


def test_candidate_file_order_breaks_ties(tmp_path):
    from downstream.metrics import read_candidates

    items = [Item("1", "lung", "left lung", "open")]              # covers both candidates equally well
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps({"0": ["right lung", "left lung"]}))
    assert summarize(items, "llava_med", read_candidates(path))["open_candidate_accuracy"] == 0.0
    path.write_text(json.dumps({"0": ["left lung", "right lung"]}))
    assert summarize(items, "llava_med", read_candidates(path))["open_candidate_accuracy"] == 100.0


def test_default_candidates_are_the_answers_in_question_order():
    items = [Item("1", "lung", "right lung", "open"), Item("2", "left", "left lung", "open")]
    # "lung" ties both answers: sorted candidates would pick "left lung" (wrong); question order picks "right lung"
    assert summarize(items, "llava_med")["open_candidate_accuracy"] == 100.0


def test_tiny_model_finetunes_and_evaluates_end_to_end(tmp_path):
    from downstream.evaluate import evaluate_model
    from downstream.finetune import finetune
    from medvlm.model import build_tiny, load_checkpoint, save_folder

    root = write_vqa_rad_original(tmp_path / "vqa_rad", _items())
    save_folder(build_tiny(), tmp_path / "base")
    result = finetune("vqa-rad", root, {"checkpoint": str(tmp_path / "base")}, tmp_path / "ft",
                      ["epochs=2", "batch_size=3", "lr=1e-3", "log_steps=1"])
    assert result.global_step == 4
    conversations = json.loads((tmp_path / "ft" / "data" / "vqa-rad_train.json").read_text())
    assert conversations[0]["conversations"][0]["value"] == "<image>\nIs this a CT scan?"
    records, _ = load_vqa("vqa-rad", root, "test")
    bundle = load_checkpoint(result.checkpoint)
    out = evaluate_model(bundle, records, tmp_path / "eval", batch_size=4, max_new_tokens=4, progress=False)
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and {"id", "question", "gt", "prediction", "answer_type"} <= set(answers[0])
    assert set(out["suites"]) == {"llava_med", "llava_med_2023", "llava_med_batch", "strict"}
    assert "question_type" in out["groups"]
    assert "| closed_accuracy |" in (tmp_path / "eval" / "report.md").read_text()
    likelihood = evaluate_model(bundle, records, tmp_path / "eval_ll", closed_mode="likelihood", max_new_tokens=4,
                                progress=False)
    predicted = [json.loads(line)["prediction"] for line in (tmp_path / "eval_ll" / "answers.jsonl").read_text().splitlines()]
    assert all(p in ("yes", "no") for p, r in zip(predicted, records) if r.answer_type == "closed")
    assert likelihood["settings"]["closed_mode"] == "likelihood"


def test_leakage_finds_shared_and_near_duplicate_images(tmp_path):
    from downstream.leakage import leakage_report

    items = _items()
    write_vqa_rad_original(tmp_path, items)
    train, _ = load_vqa("vqa-rad", tmp_path, "train")
    test, _ = load_vqa("vqa-rad", tmp_path, "test")
    none = leakage_report([r.image for r in train], [r.image for r in test])
    assert none["exact_duplicates"] == 0
    copy = tmp_path / "VQA_RAD Image Folder" / "ct_copy.png"
    load_image(train[0].image).save(copy)          # re-encoded: a near duplicate, not a byte copy
    report = leakage_report([r.image for r in train] + [str(copy)], [train[0].image, str(copy)])
    assert report["exact_duplicates"] == 2 and report["near_duplicates"] == 0
    report = leakage_report([r.image for r in train], [str(copy)])
    assert report["near_duplicates"] == 1


def test_to_conversations_keeps_paths_inside_the_root(tmp_path):
    write_vqa_rad_original(tmp_path, _items())
    records, _ = load_vqa("vqa-rad", tmp_path, "train")
    conv = to_conversations(records, tmp_path)
    assert conv[0]["image"] == "VQA_RAD Image Folder/ct_a.jpg"


def test_repeated_evaluation_reads_cached_features_and_answers_the_same(tmp_path):
    from medvlm.features import FeatureCache
    from medvlm.generate import generate_answers
    from medvlm.model import build_tiny

    write_vqa_rad_original(tmp_path / "vqa", _items())
    records, _ = load_vqa("vqa-rad", tmp_path / "vqa", "test")
    bundle = build_tiny()
    questions, images = [r.question for r in records], [r.image for r in records]
    plain = generate_answers(bundle, questions, images, max_new_tokens=5, batch_size=4)
    first = FeatureCache(bundle.model, bundle.image_processor, folder=tmp_path / "features")
    assert generate_answers(bundle, questions, images, max_new_tokens=5, batch_size=4, feature_cache=first) == plain
    assert len(list((tmp_path / "features").rglob("*.safetensors"))) == 2   # two distinct test images
    again = FeatureCache(bundle.model, bundle.image_processor, folder=tmp_path / "features")
    assert generate_answers(bundle, questions, images, max_new_tokens=5, batch_size=4, feature_cache=again) == plain
    single = [generate_answers(bundle, [q], [i], max_new_tokens=5, batch_size=1)[0] for q, i in zip(questions, images)]
    assert single == plain   # batching (left padding) changes no answer


def test_shared_prefix_generation_answers_as_transformers_generate_does_one_question_at_a_time(tmp_path):
    """Questions about one image reuse the prefill of the prompt up to the image; the answers equal plain
    ``generate`` with ``pixel_values`` and batch 1, whatever the batch boundaries and question order."""
    import torch

    from medvlm.data import preprocess_image
    from medvlm.generate import _stop_ids, generate_answers, prompt_ids, shared_prefix_length
    from medvlm.model import build_tiny

    write_vqa_rad_original(tmp_path / "vqa", _items())
    records = load_vqa("vqa-rad", tmp_path / "vqa", "train")[0] + load_vqa("vqa-rad", tmp_path / "vqa", "test")[0]
    records = records[::2] + records[1::2]   # questions about one image apart, as in VQA-RAD's own order
    questions, images = [r.question + " Answer briefly." * (i % 3) for i, r in enumerate(records)], [r.image for r in records]
    bundle = build_tiny()
    rows = [prompt_ids(bundle, q, True) for q in questions]
    prefix = shared_prefix_length(rows, bundle.model.config.image_token_id)
    assert prefix is not None and prefix >= bundle.num_image_tokens and len({len(r) for r in rows}) > 2
    expected = []
    with torch.no_grad():
        for row, image in zip(rows, images):
            ids = torch.tensor([row])
            pixels = preprocess_image(load_image(image), bundle.image_processor, "pad").unsqueeze(0)
            out = bundle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                        max_new_tokens=6, do_sample=False, eos_token_id=_stop_ids(bundle),
                                        pad_token_id=bundle.tokenizer.pad_token_id)
            expected.append(bundle.tokenizer.decode(out[0, len(row):], skip_special_tokens=True).strip())
    assert len(set(expected)) > 1   # the answers tell the prompts apart, so a mixed-up row would show
    for batch_size in (1, 5, 16):
        assert generate_answers(bundle, questions, images, max_new_tokens=6, batch_size=batch_size) == expected
    assert generate_answers(bundle, questions, images, max_new_tokens=6, batch_size=5, share_prefix=False) == expected


# ------------------------------------------------------------------------------------ LLaVA-Med's run_eval_batch.py rules
def test_llava_med_batch_closed_is_a_substring_rule_without_the_yes_no_guard():
    items = [Item("1", "It is supratentorial.", "supratentorial", "closed"),   # no yes/no in it: llava_med misses
             Item("2", "Yes, it is.", "yes", "closed"),
             Item("3", "Absent.", "no", "closed")]
    batch, llava = summarize(items, "llava_med_batch"), summarize(items, "llava_med")
    assert batch["closed_accuracy"] == round(100 * 2 / 3, 2) and llava["closed_accuracy"] == round(100 / 3, 2)
    assert batch["closed_recall"] == round(100 * 2 / 3, 2)          # token recall of 1, 1, 0
    assert batch["n_closed_counted"] == 3


def test_llava_med_batch_open_accuracy_is_the_ground_truth_inside_the_prediction():
    items = [Item("1", "The left lung is affected.", "left lung", "open"),
             Item("2", "Lung, left side.", "left lung", "open")]
    batch = summarize(items, "llava_med_batch")
    assert batch["open_substring_accuracy"] == 50.0                   # word order matters
    assert batch["open_recall"] == 100.0 == summarize(items, "llava_med")["open_recall"]
    assert "open_candidate_accuracy" not in batch


def test_llava_med_batch_is_offered_and_printed_by_eval_score(tmp_path, capsys):
    from medvlm.cli import main

    pred, gt, _ = _llava_med_files(tmp_path)
    assert main(["eval", "score", "--pred", str(pred), "--gt", str(gt), "--suite", "llava_med_batch"]) == 0
    table = capsys.readouterr().out
    assert "| metric | llava_med_batch |" in table and "| open_substring_accuracy |" in table


# ------------------------------------------------------------------------------------ registries: one unit each
def test_a_toy_suite_is_one_registered_unit(tmp_path, monkeypatch, capsys):
    from downstream import metrics
    from medvlm.cli import main

    toy = metrics.Suite("toy", ("closed_accuracy", "open_length"), lambda item, candidates: (
        {"closed_accuracy": float(item.answer.lower() in item.prediction.lower())}
        if item.answer_type == "closed" else {"open_length": float(len(item.prediction.split()) <= 3)}),
        labels={"open_length": "open answers of ≤ 3 words"})
    monkeypatch.setitem(metrics.SUITE_REGISTRY, "toy", toy)      # = metrics.register_suite(toy), undone after the test

    pred, gt, _ = _llava_med_files(tmp_path)
    assert main(["eval", "score", "--pred", str(pred), "--gt", str(gt), "--suite", "toy", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["suites"]["toy"]
    assert result["closed_accuracy"] == 50.0 and result["open_length"] == 100.0
    assert "toy" in metrics.SUITES
    assert "| open answers of ≤ 3 words |" in metrics.format_table({"suites": {"toy": result}})


def test_a_toy_dataset_is_one_registered_unit(tmp_path, monkeypatch):
    import csv

    from downstream import datasets
    from medvlm.cli import build_parser

    def load_csv(source, report):
        with open(source.root / "questions.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] == source.split]
        records = []
        for row in rows:
            datasets._add(records, report, datasets.VQARecord(
                row["id"], str(source.root / row["image"]), row["question"], row["answer"],
                "closed" if datasets.is_yes_no(row["answer"]) else "open", source.split, source.dataset))
        return records

    toy = datasets.DatasetSpec("toy-vqa", (datasets.Layout(
        "toy-csv", lambda root, split: (root / "questions.csv").is_file(), load_csv),), "questions.csv + images")
    monkeypatch.setitem(datasets.DATASET_REGISTRY, "toy-vqa", toy)

    load_image(sample_path("CT_small.dcm", "pydicom")).save(tmp_path / "ct.png")
    (tmp_path / "questions.csv").write_text("id,image,question,answer,split\n1,ct.png,Is this a CT?,yes,test\n"
                                            "2,ct.png,Which organ?,head,test\n3,ct.png,Any bleed?,no,train\n")
    records, report = load_vqa("toy-vqa", tmp_path, "test")
    assert report.layout == "toy-csv" and [r.answer_type for r in records] == ["closed", "open"]
    with pytest.raises(DatasetLayoutError, match="Expected one of: questions.csv \\+ images"):
        load_vqa("toy-vqa", tmp_path / "empty", "test")
    args = build_parser().parse_args(["eval", "leakage", "--dataset", "toy-vqa", "--root", str(tmp_path)])
    assert args.dataset == "toy-vqa"                              # the CLI's choices read the registry


def test_a_name_cannot_be_registered_twice():
    from downstream import metrics

    with pytest.raises(ValueError, match="registered already"):
        metrics.register_suite(metrics.Suite("strict", ("closed_accuracy",), lambda item, candidates: {}))


def test_evaluation_scores_each_question_when_ids_repeat(tmp_path, monkeypatch):
    """LLaVA-Med's converted test files repeat question ids: each record keeps its own prediction."""
    import medvlm.generate
    from downstream.datasets import VQARecord
    from downstream.evaluate import evaluate_model
    from medvlm.model import build_tiny

    image = str(write_vqa_rad_original(tmp_path / "vqa_rad", _items()) / "VQA_RAD Image Folder" / "ct_a.jpg")
    records = [VQARecord("7", image, "Is this a CT scan?", "yes", "closed", "test", "vqa-rad"),
               VQARecord("7", image, "Which organ is shown?", "liver", "open", "test", "vqa-rad")]
    echo = {"Is this a CT scan?": "yes", "Which organ is shown?": "liver"}
    monkeypatch.setattr(medvlm.generate, "generate_answers",
                        lambda bundle, questions, images, **kw: [echo[q.strip()] for q in questions])
    result = evaluate_model(build_tiny(), records, tmp_path / "eval", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == ["yes", "liver"]
    assert result["suites"]["strict"]["closed_accuracy"] == result["suites"]["strict"]["open_recall"] == 100.0
