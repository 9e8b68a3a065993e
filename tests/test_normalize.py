"""The pure normalizer: rows from pages, and clear errors for pages that violate the model."""

from __future__ import annotations

import copy

import pytest

from worker.errors import MalformedPage
from worker.local import synth
from worker.messages import Api
from worker.normalize import (
    COLLECTION_FACE_COLUMNS,
    EMOTION_COLUMNS,
    FACE_COLUMNS,
    LANDMARK_COLUMNS,
    MATCH_COLUMNS,
    MAX_ENUM_CHARS,
    MAX_UNKNOWN_PER_PAGE,
    OTHER,
    normalize_page,
    parse_meta,
)


def _page(fixture: synth.JobFixture, n: int = 50) -> dict:
    return synth.page_body(fixture, 0, n, None)


def test_detection_rows_have_table_shapes() -> None:
    fx = synth.detection_job("det-shape", faces=50, attributes="ALL")
    rows = normalize_page(_page(fx), Api.FACE_DETECTION, "det-shape", 100)
    assert rows.elements == 50
    assert len(rows.faces) == 50
    assert all(len(r) == len(FACE_COLUMNS) for r in rows.faces)
    assert all(len(r) == len(LANDMARK_COLUMNS) for r in rows.landmarks)
    assert all(len(r) == len(EMOTION_COLUMNS) for r in rows.emotions)
    assert len(rows.landmarks) == len(rows.emotions) == 50  # one row per face, the elements as arrays
    assert rows.landmark_elements == 50 * 30 and rows.emotion_elements == 50 * 8
    assert all(len(r[2]) == len(r[3]) == len(r[4]) == 30 for r in rows.landmarks)
    # face_seq continues from seq_start: the stream position is the key.
    assert [r[1] for r in rows.faces] == list(range(100, 150))
    assert rows.matches == [] and rows.collection_faces == {}


def test_search_rows_keep_every_face_match() -> None:
    fx = synth.search_job("search-shape", persons_elements=200)
    page = _page(fx, 200)
    rows = normalize_page(page, Api.FACE_SEARCH, "search-shape", 0)
    expected = sum(len(p["FaceMatches"]) for p in page["Persons"])
    assert len(rows.matches) == expected
    assert any(len(p["FaceMatches"]) >= 2 for p in page["Persons"])
    assert all(len(r) == len(MATCH_COLUMNS) for r in rows.matches)
    assert all(len(r) == len(COLLECTION_FACE_COLUMNS) for r in rows.collection_faces.values())
    assert rows.landmark_elements == 200 * 5


def test_empty_page_and_missing_face_are_fine() -> None:
    rows = normalize_page({"JobStatus": "SUCCEEDED", "Faces": []}, Api.FACE_DETECTION, "j", 0)
    assert rows.elements == 0 and rows.faces == []
    rows = normalize_page({"JobStatus": "SUCCEEDED", "Persons": [{"Timestamp": 5, "Person": {"Index": 3}}]},
                          Api.FACE_SEARCH, "j", 0)
    assert rows.faces[0][2] == 5 and rows.faces[0][3] == 3
    assert rows.faces[0][FACE_COLUMNS.index("has_face")] is False


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda p: p["Faces"][3].pop("Timestamp"), "Faces[3].Timestamp"),
        (lambda p: p["Faces"][1].__setitem__("Timestamp", "12"), "Faces[1].Timestamp"),
        (lambda p: p["Faces"][0]["Face"]["BoundingBox"].__setitem__("Width", "wide"), "BoundingBox.Width"),
        (lambda p: p["Faces"][0]["Face"]["Smile"].__setitem__("Value", "yes"), "Smile.Value"),
        # Enumeration values this version does not know are stored (see below); wrong types are not.
        (lambda p: p["Faces"][0]["Face"]["Landmarks"][2].__setitem__("Type", 7), "Landmarks[2].Type"),
        (lambda p: p["Faces"][0]["Face"]["Landmarks"][2].pop("Type"), "Landmarks[2].Type"),
        (lambda p: p["Faces"][0]["Face"]["Emotions"][0].__setitem__("Type", {"name": "BORED"}), "Emotions[0].Type"),
        (lambda p: p["Faces"][0]["Face"]["Gender"].__setitem__("Value", 1), "Gender.Value"),
        (lambda p: p["VideoMetadata"].__setitem__("ColorRange", False), "ColorRange"),
        (lambda p: p.__setitem__("Faces", {"not": "a list"}), "Faces"),
        (lambda p: p["Faces"].__setitem__(0, "face"), "Faces[0]"),
        (lambda p: p["VideoMetadata"].__setitem__("DurationMillis", 1.5), "DurationMillis"),
        (lambda p: p.__setitem__("JobStatus", 1.0), "JobStatus"),
        (lambda p: p["Faces"][0]["Face"]["Landmarks"][0].__setitem__("Type", "x" * 257), "Landmarks[0].Type"),
        (lambda p: p["Faces"][0]["Face"]["Emotions"][1].__setitem__("Type", "SO\x00BER"), "Emotions[1].Type"),
        (lambda p: p["Faces"][0]["Face"]["AgeRange"].__setitem__("Low", True), "AgeRange.Low"),
    ],
)
def test_model_violations_name_the_path(mutate: object, fragment: str) -> None:
    fx = synth.detection_job("det-bad", faces=10, attributes="ALL")
    page = copy.deepcopy(_page(fx, 10))
    mutate(page)  # type: ignore[operator]
    with pytest.raises(MalformedPage) as err:
        normalize_page(page, Api.FACE_DETECTION, "det-bad", 0)
    assert fragment in str(err.value)


def test_search_match_without_face_id_is_malformed() -> None:
    fx = synth.search_job("search-bad", persons_elements=20)
    page = copy.deepcopy(_page(fx, 20))
    target = next(p for p in page["Persons"] if p["FaceMatches"])
    target["FaceMatches"][0]["Face"].pop("FaceId")
    with pytest.raises(MalformedPage, match="FaceId"):
        normalize_page(page, Api.FACE_SEARCH, "search-bad", 0)


def test_unknown_extra_fields_are_ignored() -> None:
    fx = synth.detection_job("det-extra", faces=5)
    page = copy.deepcopy(_page(fx, 5))
    page["SomethingNew"] = {"x": 1}
    page["Faces"][0]["Face"]["NewAttribute"] = {"Value": True}
    rows = normalize_page(page, Api.FACE_DETECTION, "det-extra", 0)
    assert rows.elements == 5


def test_unhashable_enum_values_are_malformed_not_crashes() -> None:
    fx = synth.detection_job("det-unhashable", faces=3, attributes="ALL")
    for member in ("Landmarks", "Emotions"):
        page = copy.deepcopy(_page(fx, 3))
        page["Faces"][1]["Face"][member][0]["Type"] = ["eyeLeft"]
        with pytest.raises(MalformedPage, match=f"Faces\\[1\\].Face.{member}\\[0\\].Type"):
            normalize_page(page, Api.FACE_DETECTION, "det-unhashable", 0)


def test_unknown_enumeration_values_are_stored_as_sent_and_reported() -> None:
    fx = synth.detection_job("det-new-values", faces=4, attributes="ALL")
    page = copy.deepcopy(_page(fx, 4))
    page["JobStatus"] = "SUCCEEDED"
    page["VideoMetadata"]["ColorRange"] = "HDR10"
    faces = [e["Face"] for e in page["Faces"]]
    faces[0]["Landmarks"][2]["Type"] = "earLeft"
    faces[3]["Landmarks"][2]["Type"] = "earLeft"
    faces[3]["Landmarks"][5]["Type"] = "x" * MAX_ENUM_CHARS  # the longest accepted
    faces[1]["Emotions"][0]["Type"] = "CONTEMPT"
    faces[2]["Gender"]["Value"] = "Nonbinary"
    faces[2]["Emotions"][4]["Type"] = ""  # a string PostgreSQL can store, so stored
    rows = normalize_page(page, Api.FACE_DETECTION, "det-new-values", 10)
    landmark = {(r[1], i): t for r in rows.landmarks for i, t in enumerate(r[2])}
    emotion = {(r[1], i): t for r in rows.emotions for i, t in enumerate(r[2])}
    assert landmark[(10, 2)] == landmark[(13, 2)] == "earLeft" and landmark[(13, 5)] == "x" * MAX_ENUM_CHARS
    assert emotion[(11, 0)] == "CONTEMPT" and emotion[(12, 4)] == ""
    assert rows.faces[2][FACE_COLUMNS.index("gender_value")] == "Nonbinary"
    assert rows.meta.color_range == "HDR10"
    assert rows.unknown == {"color_range": {"HDR10": 1}, "landmark_type": {"earLeft": 2, "x" * MAX_ENUM_CHARS: 1},
                            "emotion_type": {"CONTEMPT": 1, "": 1}, "gender": {"Nonbinary": 1}}
    # Known values report nothing.
    assert normalize_page(_page(fx, 4), Api.FACE_DETECTION, "det-new-values", 0).unknown == {}


def test_unknown_job_status_is_reported_by_parse_meta() -> None:
    unknown: dict[str, dict[str, int]] = {}
    meta = parse_meta({"JobStatus": "PARTIALLY_SUCCEEDED"}, unknown)
    assert meta.job_status == "PARTIALLY_SUCCEEDED" and unknown == {"job_status": {"PARTIALLY_SUCCEEDED": 1}}


def test_distinct_unknown_values_per_page_are_bounded() -> None:
    """All are stored; beyond MAX_UNKNOWN_PER_PAGE distinct values the report counts them together."""
    n = MAX_UNKNOWN_PER_PAGE + 8
    page = {"Faces": [{"Timestamp": 1, "Face": {"Landmarks": [{"Type": f"new{i}"} for i in range(n)] * 2}}]}
    rows = normalize_page(page, Api.FACE_DETECTION, "j", 0)
    assert [t for r in rows.landmarks for t in r[2]] == [f"new{i}" for i in range(n)] * 2
    reported = rows.unknown["landmark_type"]
    assert len(reported) == MAX_UNKNOWN_PER_PAGE + 1 and reported[OTHER] == 16
    assert sum(reported.values()) == 2 * n
