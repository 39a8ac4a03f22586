"""Sample profiles for the sandbox, in the write shape, from HrFlow's own documentation
(shared/hrflow-api/profile-indexing-post.txt: the Harry Potter and John Doe examples,
made valid JSON)."""

from __future__ import annotations

from typing import Any

SAMPLE_SOURCE_KEY = "sandbox-source"
HARRY_POTTER_KEY = "c0ffee0000000000000000000000000000000001"
JOHN_DOE_KEY = "c0ffee0000000000000000000000000000000002"

_CONSENT = {
    "owner": {
        "parsing": True,
        "revealing": False,
        "embedding": True,
        "searching": False,
        "scoring": True,
        "reasoning": False,
    },
    "controller": {
        "parsing": True,
        "revealing": False,
        "embedding": True,
        "searching": False,
        "scoring": True,
        "reasoning": False,
    },
}


def _items(*names: str) -> list[dict[str, Any]]:
    return [{"name": name, "value": None} for name in names]


def harry_potter() -> dict[str, Any]:
    return {
        "reference": "harry-potter",
        "consent_algorithmic": _CONSENT,
        "info": {
            "full_name": "Harry Potter",
            "first_name": "Harry",
            "last_name": "Potter",
            "date_birth": "1990-08-09T00:00:00+0000",
            "email": "",
            "phone": "0202",
            "gender": None,
            "urls": {
                "from_resume": [],
                "linkedin": "",
                "twitter": "",
                "facebook": "",
                "github": "",
            },
            "picture": None,
            "location": {"text": None},
            "summary": "Brief summary",
        },
        "text": None,
        "experiences": [
            {
                "date_start": {"iso8601": "2016-01-01T00:00:00"},
                "date_end": {"iso8601": "2018-07-01T00:00:00"},
                "title": "Lead",
                "company": "Mathematic Departement",
                "description": "Developping.",
                "location": {"text": "Paris"},
                "certifications": _items("certificate exp"),
                "courses": _items("course exp"),
                "tasks": _items("task exp"),
                "skills": [{"name": "skill exp", "value": None, "type": "hard"}],
            }
        ],
        "educations": [
            {
                "date_start": {"iso8601": "2016-01-01T00:00:00"},
                "date_end": {"iso8601": "2018-01-01T00:00:00"},
                "title": "Mathematicien",
                "school": "University",
                "description": "Description",
                "location": {"text": "Scotland", "lat": "lat", "lng": "lng"},
                "certifications": _items("certificate edu"),
                "courses": _items("course edu"),
                "tasks": _items("task edu"),
                "skills": [{"name": "skill edu", "value": None, "type": "hard"}],
            }
        ],
        "certifications": _items("certificate exp", "certificate edu"),
        "courses": _items("course exp", "cours edu"),
        "tasks": _items("task exp", "task edu"),
        "skills": [
            {"name": "manual skill", "type": "hard", "value": None},
            {"name": "Creative spirit", "type": "soft", "value": None},
            {"name": "Writing skills", "type": "hard", "value": None},
            {"name": "Communication", "type": "soft", "value": None},
            {"name": "skill edu", "value": None, "type": "hard"},
            {"name": "skill exp", "value": None, "type": "hard"},
        ],
        "languages": _items("english"),
        "interests": _items("football"),
        "tags": [{"name": "archive", "value": False}],
        "metadatas": [],
        "labels": [{"stage": "yes", "job_key": "job_key"}],
        "attachments": [],
    }


def john_doe() -> dict[str, Any]:
    return {
        "reference": "my_profile",
        "consent_algorithmic": _CONSENT,
        "info": {
            "full_name": "John Doe",
            "first_name": "John",
            "last_name": "Doe",
            "date_birth": "1990-08-09T00:00:00+0000",
            "gender": "Male",
            "urls": {"from_resume": []},
            "picture": "picture public url",
            "location": {"text": None},
            "summary": "Brief summary",
        },
        "text": "In this section should be the bulk text of the whole profile with all the sections",
        "experiences": [
            {
                "date_start": {"iso8601": "2016-01-01T00:00:00"},
                "date_end": {"iso8601": "2018-07-01T00:00:00"},
                "title": "Lead software engineer",
                "company": "",
                "description": "Developping backend web apps using Python and Django framework.",
                "location": {"text": "Paris"},
                "certifications": _items("AWS cloud certification"),
                "courses": [],
                "tasks": _items("Continuous integration"),
                "skills": [{"name": "Django", "value": None, "type": "hard"}],
            }
        ],
        "educations": [
            {
                "date_start": {"iso8601": "2016-01-01T00:00:00"},
                "date_end": {"iso8601": "2018-01-01T00:00:00"},
                "title": "Msc in software engineering",
                "school": "Ecole Centrale Paris",
                "description": "Education description text",
                "location": {"text": "Paris"},
                "certifications": _items("certificate edu"),
                "courses": _items("Python programming"),
                "tasks": [],
                "skills": [],
            }
        ],
        "educations_duration": 2,
        "skills": [{"name": "manual skill", "type": "hard", "value": None}],
        "languages": _items("english"),
        "interests": _items("football"),
        "tags": [{"name": "job_reference", "value": "external_id"}],
        "attachments": [],
    }


SAMPLES: dict[str, Any] = {HARRY_POTTER_KEY: harry_potter, JOHN_DOE_KEY: john_doe}
