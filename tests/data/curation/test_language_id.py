"""language_id: a tiny fastText classifier trained here on labelled lines stands in for lid.176 (which is never
downloaded); documents get their language and score in `metadata`, and the others are removed with their reason."""

import random

import pytest

from engine.data.curate import main
from engine.data.curation.language_id import LanguageID, predict
from engine.data.curation.pipeline import Pipeline
from engine.data.curation.runner import curate
from engine.data.curation.steps import CurationError, make_step
from tests.data.curation.corpus import read_jsonl, write_jsonl

EN_WORDS = "the of and to in is that it was for on are with as his they be at one have this from by".split()
FR_WORDS = "le la les de des et un une est que qui dans pour pas sur avec il elle nous vous sont au du".split()


def sentence(words: list[str], rng: random.Random, n: int = 10) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A 2-language fastText model (`__label__en`, `__label__fr`) trained on 40 generated lines, in lid.176's format."""
    fasttext = pytest.importorskip("fasttext")
    tmp = tmp_path_factory.mktemp("lid")
    rng = random.Random(0)
    labelled = (("en", EN_WORDS), ("fr", FR_WORDS))
    lines = [f"__label__{lang} {sentence(words, rng)}" for _ in range(20) for lang, words in labelled]
    (tmp / "train.txt").write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(
        input=str(tmp / "train.txt"), epoch=25, lr=0.5, dim=8, minCount=1, minn=2, maxn=3, bucket=5000, thread=1,
        seed=0, verbose=0,
    )  # fmt: skip
    model.save_model(str(tmp / "lid.bin"))
    return str(tmp / "lid.bin")


def run(tmp_path, docs: list[dict], **params) -> tuple[dict, list[dict]]:
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"
    report = curate([src], str(out), Pipeline([make_step("language_id", params)]), progress=False)
    return report["steps"][0], read_jsonl(out / "00000_in.jsonl.gz")


def test_labels_documents_and_removes_other_languages(tmp_path, model_path):
    rng = random.Random(1)
    en = "\n".join(sentence(EN_WORDS, rng) for _ in range(3))  # several lines: classified as one
    docs = [
        {"id": "en", "text": en, "metadata": {"source": "web"}},
        {"id": "en2", "text": sentence(EN_WORDS, rng)},
        {"id": "fr", "text": sentence(FR_WORDS, rng)},
    ]
    step, out = run(tmp_path, docs, model_path=model_path, languages=["en"], min_score=0.65)
    assert [d["id"] for d in out] == ["en", "en2"]
    assert out[0]["metadata"]["source"] == "web" and out[0]["text"] == en  # other fields and the text untouched
    for doc in out:
        assert set(doc["metadata"]) >= {"language", "language_score"}
        assert doc["metadata"]["language"] == "en" and doc["metadata"]["language_score"] > 0.65
    assert step["removed"] == {"language_not_kept": 1}
    (sample,) = step["samples"]
    assert sample["id"] == "fr" and sample["metadata"]["language"] == "fr"
    assert sample["metadata"]["language_score"] > 0.5


def test_min_score_removes_uncertain_documents_of_any_language(tmp_path, model_path):
    rng = random.Random(2)
    en, fr = sentence(EN_WORDS, rng), sentence(FR_WORDS, rng)
    mixed = " ".join(a + " " + b for a, b in zip(en.split()[:5], fr.split()[:5]))  # half and half: unsure
    model = LanguageID(model_path=model_path).model()
    scores = {name: predict(model, text)[0][1] for name, text in (("en", en), ("fr", fr), ("mixed", mixed))}
    assert scores["mixed"] < min(scores["en"], scores["fr"])
    threshold = (scores["mixed"] + min(scores["en"], scores["fr"])) / 2
    docs = [{"id": "en", "text": en}, {"id": "fr", "text": fr}, {"id": "mixed", "text": mixed}]
    step, out = run(tmp_path, docs, model_path=model_path, languages=[], min_score=threshold)
    assert [d["id"] for d in out] == ["en", "fr"] and [d["metadata"]["language"] for d in out] == ["en", "fr"]
    assert step["removed"] == {"language_low_score": 1}
    labelled = LanguageID(model_path=model_path, languages=["de"], label_only=True)
    assert labelled.label(fr)[1:] == (None, {"language": "fr", "language_score": scores["fr"]})


def test_without_a_model_file_it_fails_in_one_line_and_downloads_nothing(tmp_path, capsys):
    with pytest.raises(CurationError, match="downloads nothing: download one yourself .* pass its path as model_path"):
        make_step("language_id")
    with pytest.raises(CurationError, match=r"model file .*missing\.bin not found; language_id needs"):
        make_step("language_id", {"model_path": str(tmp_path / "missing.bin")})
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    assert main(["--input", src, "--output", str(tmp_path / "out"), "--steps", "language_id", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: step 'language_id': language_id needs a fastText") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_corrupt_model_or_a_metadata_field_that_is_not_an_object_is_one_line(tmp_path, model_path):
    fasttext = pytest.importorskip("fasttext")
    (tmp_path / "bad.bin").write_bytes(b"not a model")
    with pytest.raises(CurationError, match=r"bad\.bin: not a fastText model"):
        LanguageID(model_path=str(tmp_path / "bad.bin"))
    (tmp_path / "words.txt").write_text("the of and to in is that it was for\n" * 5)
    words = str(tmp_path / "words.txt")
    vectors = fasttext.train_unsupervised(words, dim=4, minCount=1, epoch=1, bucket=100, thread=1, verbose=0)
    vectors.save_model(str(tmp_path / "vectors.bin"))
    with pytest.raises(CurationError, match=r"vectors\.bin: a fastText skipgram model \(word vectors\), not a class"):
        LanguageID(model_path=str(tmp_path / "vectors.bin"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the of and"}, {"text": "le la les", "metadata": "web"}])
    pipeline = Pipeline([LanguageID(model_path=model_path, languages=[], min_score=0.0)])
    with pytest.raises(CurationError, match=r"in\.jsonl:2: 'metadata' is str, not an object"):
        curate([src], str(tmp_path / "out"), pipeline, progress=False)
