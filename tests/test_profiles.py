"""The profile model and the GET → write transform, on HrFlow's own Harry Potter example."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

import pytest
from pydantic import ValidationError

from hrflow_client.profiles import (
    Profile,
    ProfileWrite,
    payload_fingerprint,
    profile_to_indexing_payload,
)
from workers.handlers.edit import merged_tags, profile_changes, profile_text, years_covered


def _items(*names: str) -> list[dict[str, Any]]:
    return [{"name": name, "value": None} for name in names]


_CONSENT = {
    party: {
        "parsing": True,
        "revealing": False,
        "embedding": True,
        "searching": False,
        "scoring": True,
        "reasoning": False,
    }
    for party in ("owner", "controller")
}

# profile-indexing-post.txt, the 201 answer's "data" (the GET shape), made valid JSON.
DOCS_GET_ANSWER: dict[str, Any] = {
    "id": 42,
    "key": "profile_key",
    "reference": None,
    "archive": None,
    "consent_algorithmic": _CONSENT,
    "source": {
        "id": 7,
        "key": "source_key",
        "name": "source name",
        "type": "api",
        "subtype": "http_api",
    },
    "updated_at": "2020-07-29T11:45:37+0000",
    "created_at": "2020-07-29T11:45:37+0000",
    "info": {
        "full_name": "Harry Potter",
        "first_name": "Harry",
        "last_name": "Potter",
        "date_birth": "1990-08-09T00:00:00+0000",
        "email": "",
        "phone": "0202",
        "location": {"text": None, "lat": None, "lng": None, "gmaps": None, "fields": None},
        "urls": {
            "from_resume": [],
            "linkedin": "",
            "twitter": "",
            "facebook": "",
            "github": "",
            "picture": "",
        },
        "picture": None,
        "gender": None,
        "summary": "Brief summary",
    },
    "text_language": None,
    "text": None,
    "experiences_duration": 5,
    "educations_duration": 4,
    "experiences": [
        {
            "key": "c4ade5ca8f3ebab04acc5e91fde5f9bb400d60cb",
            "title": "Lead",
            "description": "Developping.",
            "location": {"text": "Paris", "lat": None, "lng": None, "gmaps": None, "fields": None},
            "date_start": "2018-01-01T00:00:00",
            "date_end": "2018-07-01T00:00:00",
            "company": "Mathematic Departement",
            "certifications": _items("certificate exp"),
            "courses": _items("cours exp"),
            "tasks": _items("tache exp"),
            "skills": [{"name": "skill exp", "value": None, "type": "hard"}],
        }
    ],
    "educations": [
        {
            "key": "3ea49b56c3dc6e4a0bde8bc2ca159560e1f57cb5",
            "title": "Mathematicien",
            "description": "Description",
            "location": {
                "text": "Scotland",
                "lat": "lat",
                "lng": "lng",
                "gmaps": None,
                "fields": None,
            },
            "date_start": "2016-01-01T00:00:00",
            "date_end": "2018-01-01T00:00:00",
            "school": "University",
            "certifications": _items("certificate edu"),
            "courses": _items("cours edu"),
            "tasks": _items("tache edu"),
            "skills": [{"name": "skill edu", "value": None, "type": "hard"}],
        }
    ],
    "attachments": [],
    "certifications": _items("certificate exp", "certificate edu"),
    "courses": _items("cours exp", "cours edu"),
    "tasks": _items("tache exp", "tache edu"),
    "skills": [
        {"name": "manual skill", "type": "hard", "value": None},
        {"name": "Creative spirit", "type": "soft", "value": None},
        {"name": "Writing skills", "type": "hard", "value": None},
        {"name": "Communication", "type": "soft", "value": None},
        {"name": "skill edu", "value": None, "type": "hard"},
        {"name": "skill exp", "value": None, "type": "hard"},
    ],
    "languages": [{"name": "english", "value": None}],
    "interests": [{"name": "football", "value": None}],
    "labels": [{"stage": "yes", "job_key": "job_key"}],
    "tags": [{"name": "archive", "value": False}],
    "metadatas": [],
}

# The same page's request example (the POST shape): top-level, info and period keys.
DOCS_POST_KEYS = {
    "consent_algorithmic", "info", "text", "experiences", "educations", "certifications",
    "courses", "tasks", "skills", "languages", "interests", "tags", "labels", "attachments",
}  # fmt: skip
DOCS_POST_INFO_KEYS = {
    "full_name", "first_name", "last_name", "date_birth", "gender", "urls", "picture",
    "location", "summary",
}  # fmt: skip
DOCS_POST_EXPERIENCE_KEYS = {
    "date_start", "date_end", "title", "company", "description", "location",
    "certifications", "courses", "tasks", "skills",
}  # fmt: skip
# Body parameters the page documents beyond its example.
DOCUMENTED_EXTRA_KEYS = {
    "source_key", "reference", "created_at", "text_language", "experiences_duration",
    "educations_duration", "metadatas",
}  # fmt: skip


def _payload(profile: dict[str, Any] | None = None) -> dict[str, Any]:
    model = profile_to_indexing_payload(profile or DOCS_GET_ANSWER, "target-source")
    return model.to_json()


def test_the_docs_get_answer_becomes_a_body_of_the_post_examples_shape() -> None:
    payload = _payload()
    assert set(payload) == DOCS_POST_KEYS | DOCUMENTED_EXTRA_KEYS
    assert set(payload["info"]) == DOCS_POST_INFO_KEYS | {"email", "phone"}
    assert set(payload["experiences"][0]) == DOCS_POST_EXPERIENCE_KEYS
    assert set(payload["educations"][0]) == DOCS_POST_EXPERIENCE_KEYS - {"company"} | {"school"}


def test_the_date_trap_period_dates_are_wrapped_other_dates_are_not() -> None:
    payload = _payload()
    experience, education = payload["experiences"][0], payload["educations"][0]
    assert experience["date_start"] == {"iso8601": "2018-01-01T00:00:00"}
    assert experience["date_end"] == {"iso8601": "2018-07-01T00:00:00"}
    assert education["date_start"] == {"iso8601": "2016-01-01T00:00:00"}
    assert education["date_end"] == {"iso8601": "2018-01-01T00:00:00"}
    assert payload["info"]["date_birth"] == "1990-08-09T00:00:00+0000"
    assert payload["created_at"] == "2020-07-29T11:45:37+0000"


def test_already_wrapped_and_missing_dates_are_neither_double_wrapped_nor_invented() -> None:
    profile = copy.deepcopy(DOCS_GET_ANSWER)
    profile["experiences"][0]["date_start"] = {"iso8601": "2018-01-01T00:00:00"}
    profile["experiences"][0]["date_end"] = None
    experience = _payload(profile)["experiences"][0]
    assert experience["date_start"] == {"iso8601": "2018-01-01T00:00:00"}
    assert experience["date_end"] is None


def test_read_only_fields_are_dropped_and_the_source_becomes_source_key() -> None:
    payload = _payload()
    for name in ("id", "key", "archive", "source", "updated_at"):
        assert name not in payload
    assert payload["source_key"] == "target-source"
    assert "key" not in payload["experiences"][0]
    assert payload["experiences"][0]["location"] == {"text": "Paris", "lat": None, "lng": None}
    assert payload["educations"][0]["location"] == {"text": "Scotland", "lat": "lat", "lng": "lng"}
    assert payload["info"]["location"] == {"text": None, "lat": None, "lng": None}
    assert "picture" not in payload["info"]["urls"]


def test_content_is_carried_over_field_by_field() -> None:
    payload = _payload()
    assert payload["consent_algorithmic"] == _CONSENT
    assert payload["info"]["full_name"] == "Harry Potter"
    assert payload["info"]["phone"] == "0202"
    assert payload["experiences"][0]["company"] == "Mathematic Departement"
    assert payload["experiences"][0]["skills"] == [
        {"name": "skill exp", "value": None, "type": "hard"}
    ]
    assert payload["educations"][0]["school"] == "University"
    assert payload["skills"] == DOCS_GET_ANSWER["skills"]
    assert payload["tags"] == [{"name": "archive", "value": False}]
    assert payload["labels"] == [
        {
            "stage": "yes",
            "job_key": "job_key",
            "date_stage": None,
            "rating": None,
            "date_rating": None,
        }
    ]
    assert (payload["experiences_duration"], payload["educations_duration"]) == (5, 4)


def test_reading_is_lenient_unknown_fields_are_kept_but_never_written() -> None:
    profile = {**DOCS_GET_ANSWER, "hard_skills": [{"name": "x"}], "new_field": {"a": 1}}
    profile["info"] = {**DOCS_GET_ANSWER["info"], "nationality": "British"}
    model = Profile.model_validate(profile)
    assert model.model_extra == {"hard_skills": [{"name": "x"}], "new_field": {"a": 1}}
    assert model.info.model_extra == {"nationality": "British"}
    payload = _payload(profile)
    assert "new_field" not in payload
    assert "nationality" not in payload["info"]


def test_null_lists_read_as_empty_lists() -> None:
    model = Profile.model_validate({"key": "k", "skills": None, "tags": None, "info": None})
    assert (model.skills, model.tags, model.info.full_name) == ([], [], None)


@pytest.mark.parametrize(
    "change",
    [
        {"experiences": [{"title": "Lead", "date_start": "2018-01-01T00:00:00"}]},
        {"educations": [{"date_end": "2018-01-01"}]},
        {"id": 1},
        {"source": {"key": "sk"}},
        {"skills": [{"name": "x", "type": "medium"}]},
        {"experiences": [{"location": {"text": "Paris", "gmaps": None}}]},
    ],
)
def test_writing_is_strict(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ProfileWrite.model_validate({"source_key": "sk", **change})


def test_a_put_body_carries_only_what_was_set() -> None:
    body = ProfileWrite.model_validate({"source_key": "sk", "key": "pk", "text": "t"}).to_json()
    assert body == {"source_key": "sk", "key": "pk", "text": "t"}


def test_the_fingerprint_ignores_target_and_key_but_not_content() -> None:
    first = profile_to_indexing_payload(DOCS_GET_ANSWER, "a")
    other_source = profile_to_indexing_payload(DOCS_GET_ANSWER, "b")
    changed = profile_to_indexing_payload({**DOCS_GET_ANSWER, "text": "changed"}, "a")
    assert payload_fingerprint(first) == payload_fingerprint(other_source)
    assert payload_fingerprint(first) != payload_fingerprint(changed)


# --- the edit handler's pure parts ---------------------------------------------------------------


def test_tags_merge_without_duplicates_and_our_value_wins() -> None:
    tags = Profile.model_validate(
        {
            "tags": [
                {"name": "archive", "value": False},
                {"name": "team", "value": "a"},
                {"name": "team", "value": "b"},
            ]
        }
    ).tags
    merged = merged_tags(tags, {"team": "c", "reviewed": "yes"})
    assert merged == [
        {"name": "archive", "value": False},
        {"name": "team", "value": "c"},
        {"name": "reviewed", "value": "yes"},
    ]


def test_the_text_combines_names_summary_and_periods() -> None:
    text = profile_text(Profile.model_validate(DOCS_GET_ANSWER))
    assert text == (
        "Harry Potter Brief summary Lead Mathematic Departement Developping. "
        "Mathematicien University Description manual skill Creative spirit Writing skills "
        "Communication skill edu skill exp english football"
    )
    assert "0202" not in text


def test_years_covered_counts_overlaps_once_and_open_ends_until_now() -> None:
    periods = Profile.model_validate(
        {
            "experiences": [
                {"date_start": "2016-01-01T00:00:00", "date_end": "2018-01-01T00:00:00"},
                {"date_start": "2017-01-01T00:00:00+0000", "date_end": "2019-01-01T00:00:00"},
                {"date_start": "2021-01-01T00:00:00", "date_end": None},
                {"date_start": None, "date_end": "2020-01-01T00:00:00"},
            ]
        }
    ).experiences
    assert years_covered(periods, now=datetime(2022, 1, 1)) == round((1096 + 365) / 365.25, 2)
    assert years_covered([], now=datetime(2022, 1, 1)) is None


def test_profile_changes_hold_only_what_is_missing() -> None:
    now = datetime(2022, 1, 1)
    complete = Profile.model_validate(
        {**DOCS_GET_ANSWER, "text": "already here", "tags": [{"name": "reviewed", "value": "yes"}]}
    )
    assert profile_changes(complete, {"reviewed": "yes"}, now) == {}
    bare = Profile.model_validate(
        {**DOCS_GET_ANSWER, "experiences_duration": None, "educations_duration": None}
    )
    changes = profile_changes(bare, {"reviewed": "yes"}, now)
    assert set(changes) == {"tags", "text", "experiences_duration", "educations_duration"}
    assert changes["experiences_duration"] == round(181 / 365.25, 2)
    assert changes["educations_duration"] == round(731 / 365.25, 2)
